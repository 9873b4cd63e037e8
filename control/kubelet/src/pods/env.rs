//! A container's environment: `env` (values, `$(VAR)` references,
//! `valueFrom` ConfigMap/Secret keys, fieldRef, resourceFieldRef),
//! `envFrom`, and the service variables every pod gets.

use super::ObjectSource;
use crate::json::str_at as s;
use base64::Engine;
use serde_json::Value;
use std::collections::BTreeMap;

/// Why an environment could not be built (→ CreateContainerConfigError).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct EnvError(pub String);

/// Expands `$(NAME)` from `vars`; `$$(NAME)` escapes to `$(NAME)`; an
/// unknown reference is left as written (Kubernetes' rule).
pub fn expand(input: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let bytes = input.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && i + 1 < bytes.len() {
            if bytes[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if bytes[i + 1] == b'('
                && let Some(end) = input[i + 2..].find(')')
            {
                let name = &input[i + 2..i + 2 + end];
                match vars.get(name) {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&input[i..i + 3 + end]),
                }
                i += 3 + end;
                continue;
            }
        }
        let ch = input[i..].chars().next().unwrap_or('$');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// The value of a downward-API field path of a pod.
pub fn field_ref(pod: &Value, path: &str) -> Result<String, EnvError> {
    let bracket = |prefix: &str| -> Option<String> {
        let rest = path.strip_prefix(prefix)?.strip_prefix("['")?;
        Some(rest.strip_suffix("']")?.to_owned())
    };
    if let Some(k) = bracket("metadata.labels") {
        return Ok(pod
            .pointer("/metadata/labels")
            .and_then(|l| l.get(&k))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned());
    }
    if let Some(k) = bracket("metadata.annotations") {
        return Ok(pod
            .pointer("/metadata/annotations")
            .and_then(|l| l.get(&k))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned());
    }
    let map_text = |p: &str| {
        let mut lines: Vec<String> = pod
            .pointer(p)
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", serde_json::to_string(v).unwrap_or_default()))
            .collect();
        lines.sort();
        lines.join("\n")
    };
    let v = match path {
        "metadata.name" => s(pod, "/metadata/name"),
        "metadata.namespace" => s(pod, "/metadata/namespace"),
        "metadata.uid" => s(pod, "/metadata/uid"),
        "metadata.labels" => return Ok(map_text("/metadata/labels")),
        "metadata.annotations" => return Ok(map_text("/metadata/annotations")),
        "spec.nodeName" => s(pod, "/spec/nodeName"),
        "spec.serviceAccountName" => s(pod, "/spec/serviceAccountName"),
        "status.hostIP" => s(pod, "/status/hostIP"),
        "status.podIP" => s(pod, "/status/podIP"),
        "status.hostIPs" | "status.podIPs" => {
            let key = if path == "status.hostIPs" {
                "/status/hostIPs"
            } else {
                "/status/podIPs"
            };
            let ips: Vec<&str> = pod
                .pointer(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|i| i.get("ip").and_then(Value::as_str))
                .collect();
            return Ok(ips.join(","));
        }
        other => {
            return Err(EnvError(format!(
                "unsupported fieldRef fieldPath {other:?}"
            )));
        }
    };
    Ok(v.unwrap_or("").to_owned())
}

/// Parses a CPU quantity into millicores.
pub fn cpu_millis(q: &str) -> Option<u64> {
    if let Some(m) = q.strip_suffix('m') {
        return m.parse().ok();
    }
    let f: f64 = q.parse().ok()?;
    Some((f * 1000.0).ceil() as u64)
}

/// Parses a memory quantity into bytes.
pub fn bytes(q: &str) -> Option<u64> {
    let units: [(&str, f64); 12] = [
        ("Ki", 1024.0),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    for (suffix, mult) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|n| (n * mult).round() as u64);
        }
    }
    if let Some(m) = q.strip_suffix('m') {
        return m.parse::<f64>().ok().map(|n| (n / 1000.0).ceil() as u64);
    }
    q.parse::<f64>().ok().map(|n| n.round() as u64)
}

/// resourceFieldRef: `limits.cpu` etc. of a container, divided by
/// `divisor`, rounded up (the downward API's rule). An unset limit reports
/// the node's allocatable.
pub fn resource_ref(
    container: &Value,
    resource: &str,
    divisor: Option<&str>,
    node_cpu_millis: u64,
    node_memory: u64,
) -> Result<String, EnvError> {
    let (section, name) = resource
        .split_once('.')
        .ok_or_else(|| EnvError(format!("unsupported resourceFieldRef {resource:?}")))?;
    let q = container
        .pointer(&format!("/resources/{section}/{name}"))
        .and_then(Value::as_str);
    match name {
        "cpu" => {
            let millis = q.and_then(cpu_millis).unwrap_or(if section == "limits" {
                node_cpu_millis
            } else {
                0
            });
            let div = divisor
                .and_then(cpu_millis)
                .filter(|d| *d > 0)
                .unwrap_or(1000);
            Ok(millis.div_ceil(div).to_string())
        }
        "memory" | "ephemeral-storage" => {
            let b = q
                .and_then(bytes)
                .unwrap_or(if section == "limits" { node_memory } else { 0 });
            let div = divisor.and_then(bytes).filter(|d| *d > 0).unwrap_or(1);
            Ok(b.div_ceil(div).to_string())
        }
        _ => Err(EnvError(format!(
            "unsupported resourceFieldRef {resource:?}"
        ))),
    }
}

fn secret_value(secret: &Value, key: &str) -> Option<String> {
    if let Some(v) = secret.pointer("/stringData").and_then(|d| d.get(key)) {
        return v.as_str().map(str::to_owned);
    }
    let b64 = secret.get("data")?.get(key)?.as_str()?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some(String::from_utf8_lossy(&raw).into_owned())
}

fn configmap_value(cm: &Value, key: &str) -> Option<String> {
    if let Some(v) = cm
        .get("data")
        .and_then(|d| d.get(key))
        .and_then(Value::as_str)
    {
        return Some(v.to_owned());
    }
    let b64 = cm.get("binaryData")?.get(key)?.as_str()?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some(String::from_utf8_lossy(&raw).into_owned())
}

/// Node facts the environment may refer to.
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// Builds the environment of `container` in `pod`: image env first, then
/// service variables, envFrom, env (later entries win, as in Kubernetes).
pub async fn build(
    pod: &Value,
    container: &Value,
    image_env: &[(String, String)],
    service_env: &[(String, String)],
    objects: &dyn ObjectSource,
    node: &NodeFacts,
) -> Result<Vec<(String, String)>, EnvError> {
    let ns = s(pod, "/metadata/namespace").unwrap_or("default");
    let mut order: Vec<String> = Vec::new();
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let set = |order: &mut Vec<String>, vars: &mut BTreeMap<String, String>, k: String, v| {
        if !vars.contains_key(&k) {
            order.push(k.clone());
        }
        vars.insert(k, v);
    };
    for (k, v) in image_env.iter().chain(service_env) {
        set(&mut order, &mut vars, k.clone(), v.clone());
    }
    for from in container
        .get("envFrom")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let prefix = s(from, "/prefix").unwrap_or("");
        let (kind, r) = if let Some(r) = from.get("configMapRef") {
            ("configmaps", r)
        } else if let Some(r) = from.get("secretRef") {
            ("secrets", r)
        } else {
            continue;
        };
        let name = s(r, "/name").unwrap_or("");
        let optional = r.get("optional").and_then(Value::as_bool).unwrap_or(false);
        let Some(obj) = objects.get(kind, ns, name).await else {
            if optional {
                continue;
            }
            return Err(EnvError(format!(
                "{} {name:?} not found",
                if kind == "secrets" {
                    "secret"
                } else {
                    "configmap"
                }
            )));
        };
        let keys: Vec<String> = ["data", "binaryData", "stringData"]
            .iter()
            .flat_map(|f| {
                obj.get(*f)
                    .and_then(Value::as_object)
                    .into_iter()
                    .flat_map(|m| m.keys().cloned())
            })
            .collect();
        for k in keys {
            let v = if kind == "secrets" {
                secret_value(&obj, &k)
            } else {
                configmap_value(&obj, &k)
            };
            if let Some(v) = v {
                set(&mut order, &mut vars, format!("{prefix}{k}"), v);
            }
        }
    }
    for e in container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(name) = s(e, "/name") else { continue };
        let value = if let Some(v) = e.get("value").and_then(Value::as_str) {
            expand(v, &vars)
        } else if let Some(from) = e.get("valueFrom") {
            if let Some(f) = from.get("fieldRef") {
                field_ref(pod, s(f, "/fieldPath").unwrap_or(""))?
            } else if let Some(r) = from.get("resourceFieldRef") {
                let target = match s(r, "/containerName") {
                    Some(c) if !c.is_empty() => find_container(pod, c).ok_or_else(|| {
                        EnvError(format!("resourceFieldRef: no container {c:?} in the pod"))
                    })?,
                    _ => container.clone(),
                };
                resource_ref(
                    &target,
                    s(r, "/resource").unwrap_or(""),
                    r.get("divisor").and_then(Value::as_str),
                    node.cpu_millis,
                    node.memory_bytes,
                )?
            } else if let Some((kind, r)) = from
                .get("configMapKeyRef")
                .map(|r| ("configmaps", r))
                .or_else(|| from.get("secretKeyRef").map(|r| ("secrets", r)))
            {
                let obj_name = s(r, "/name").unwrap_or("");
                let key = s(r, "/key").unwrap_or("");
                let optional = r.get("optional").and_then(Value::as_bool).unwrap_or(false);
                let what = if kind == "secrets" {
                    "secret"
                } else {
                    "configmap"
                };
                let value = match objects.get(kind, ns, obj_name).await {
                    None => None,
                    Some(obj) => {
                        let v = if kind == "secrets" {
                            secret_value(&obj, key)
                        } else {
                            configmap_value(&obj, key)
                        };
                        if v.is_none() && !optional {
                            return Err(EnvError(format!(
                                "couldn't find key {key} in {what} {ns}/{obj_name}"
                            )));
                        }
                        v
                    }
                };
                match value {
                    Some(v) => v,
                    None if optional => continue,
                    None => return Err(EnvError(format!("{what} {obj_name:?} not found"))),
                }
            } else {
                continue;
            }
        } else {
            String::new()
        };
        set(&mut order, &mut vars, name.to_owned(), value);
    }
    Ok(order
        .into_iter()
        .filter_map(|k| vars.get(&k).map(|v| (k.clone(), v.clone())))
        .collect())
}

/// A container (init, sidecar or app) of `pod` by name.
pub fn find_container(pod: &Value, name: &str) -> Option<Value> {
    ["/spec/containers", "/spec/initContainers"]
        .iter()
        .flat_map(|p| {
            pod.pointer(p)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .find(|c| c.get("name").and_then(Value::as_str) == Some(name))
        .cloned()
}

/// Docker-link style variables for the services of a namespace (plus the
/// `kubernetes` service of `default`, which every pod gets).
pub fn service_env(services: &[Value]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for svc in services {
        let ip = s(svc, "/spec/clusterIP").unwrap_or("");
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let name = s(svc, "/metadata/name")
            .unwrap_or("")
            .to_uppercase()
            .replace('-', "_");
        let ports = svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        let port = first.get("port").and_then(Value::as_u64).unwrap_or(0);
        out.push((format!("{name}_SERVICE_HOST"), ip.to_owned()));
        out.push((format!("{name}_SERVICE_PORT"), port.to_string()));
        for p in &ports {
            let pn = p.get("port").and_then(Value::as_u64).unwrap_or(0);
            let proto = s(p, "/protocol").unwrap_or("TCP");
            if let Some(pname) = p
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
            {
                out.push((
                    format!(
                        "{name}_SERVICE_PORT_{}",
                        pname.to_uppercase().replace('-', "_")
                    ),
                    pn.to_string(),
                ));
            }
            let lower = proto.to_lowercase();
            let base = format!("{name}_PORT_{pn}_{proto}");
            out.push((base.clone(), format!("{lower}://{ip}:{pn}")));
            out.push((format!("{base}_PROTO"), lower));
            out.push((format!("{base}_PORT"), pn.to_string()));
            out.push((format!("{base}_ADDR"), ip.to_owned()));
        }
        let proto = s(first, "/protocol").unwrap_or("TCP").to_lowercase();
        out.push((format!("{name}_PORT"), format!("{proto}://{ip}:{port}")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let vars: BTreeMap<String, String> = [("A".to_string(), "x".to_string())].into();
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &vars), "x-$(B)-$(A)-$");
    }

    #[test]
    fn quantities() {
        assert_eq!(cpu_millis("250m"), Some(250));
        assert_eq!(cpu_millis("1.5"), Some(1500));
        assert_eq!(bytes("64Mi"), Some(64 << 20));
        assert_eq!(bytes("1G"), Some(1_000_000_000));
        let c = json!({"resources": {"limits": {"memory": "64Mi", "cpu": "500m"}}});
        assert_eq!(
            resource_ref(&c, "limits.memory", Some("1Mi"), 2000, 1 << 30).unwrap(),
            "64"
        );
        assert_eq!(
            resource_ref(&c, "limits.cpu", None, 2000, 1 << 30).unwrap(),
            "1"
        );
        assert_eq!(
            resource_ref(&c, "limits.cpu", Some("1m"), 2000, 1 << 30).unwrap(),
            "500"
        );
        assert_eq!(
            resource_ref(&json!({}), "limits.cpu", Some("1m"), 2000, 1).unwrap(),
            "2000"
        );
    }

    #[test]
    fn field_refs() {
        let pod = json!({"metadata": {"name": "p", "namespace": "n", "labels": {"app": "web"}},
                         "status": {"podIP": "10.42.0.9", "podIPs": [{"ip": "10.42.0.9"}]}});
        assert_eq!(field_ref(&pod, "metadata.labels['app']").unwrap(), "web");
        assert_eq!(field_ref(&pod, "status.podIPs").unwrap(), "10.42.0.9");
        assert!(field_ref(&pod, "spec.bogus").is_err());
    }

    #[test]
    fn service_variables() {
        let svc = json!({"metadata": {"name": "my-svc"}, "spec": {"clusterIP": "10.43.0.7",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}});
        let env = service_env(&[svc]);
        assert!(env.contains(&("MY_SVC_SERVICE_HOST".into(), "10.43.0.7".into())));
        assert!(env.contains(&("MY_SVC_PORT_80_TCP_ADDR".into(), "10.43.0.7".into())));
        assert!(env.contains(&("MY_SVC_PORT".into(), "tcp://10.43.0.7:80".into())));
    }
}
