//! Defaulting of built-in types: the fields kube-apiserver fills in, so
//! clients (and later the controllers and kubelet) see the same objects they
//! would on any cluster.

use serde_json::{Map, Value, json};

fn obj(v: &mut Value) -> Option<&mut Map<String, Value>> {
    v.as_object_mut()
}

fn default_field(m: &mut Map<String, Value>, key: &str, value: Value) {
    if m.get(key).is_none_or(Value::is_null) {
        m.insert(key.to_owned(), value);
    }
}

fn child<'a>(m: &'a mut Map<String, Value>, key: &str) -> Option<&'a mut Map<String, Value>> {
    if m.get(key).is_none_or(Value::is_null) {
        m.insert(key.to_owned(), json!({}));
    }
    m.get_mut(key).and_then(Value::as_object_mut)
}

fn image_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        return "IfNotPresent";
    }
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn container(c: &mut Value) {
    let Some(c) = obj(c) else { return };
    let image = c
        .get("image")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    default_field(c, "imagePullPolicy", json!(image_pull_policy(&image)));
    default_field(c, "terminationMessagePath", json!("/dev/termination-log"));
    default_field(c, "terminationMessagePolicy", json!("File"));
    default_field(c, "resources", json!({}));
    if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports {
            if let Some(p) = obj(p) {
                default_field(p, "protocol", json!("TCP"));
            }
        }
    }
}

/// Pod spec defaults (also applied to workload templates).
pub fn pod_spec(spec: &mut Value) {
    let Some(s) = obj(spec) else { return };
    default_field(s, "restartPolicy", json!("Always"));
    default_field(s, "dnsPolicy", json!("ClusterFirst"));
    default_field(s, "schedulerName", json!("default-scheduler"));
    default_field(s, "terminationGracePeriodSeconds", json!(30));
    default_field(s, "securityContext", json!({}));
    default_field(s, "enableServiceLinks", json!(true));
    if s.get("serviceAccountName").is_none_or(Value::is_null) {
        let sa = s
            .get("serviceAccount")
            .cloned()
            .unwrap_or_else(|| json!("default"));
        s.insert("serviceAccountName".into(), sa);
    }
    let sa = s
        .get("serviceAccountName")
        .cloned()
        .unwrap_or(json!("default"));
    default_field(s, "serviceAccount", sa);
    for kind in ["initContainers", "containers"] {
        if let Some(cs) = s.get_mut(kind).and_then(Value::as_array_mut) {
            cs.iter_mut().for_each(container);
        }
    }
}

/// QoS class from the containers' requests and limits.
pub fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = spec
        .get("containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let mut any = false;
    let mut guaranteed = !containers.is_empty();
    for c in &containers {
        let req = c.pointer("/resources/requests");
        let lim = c.pointer("/resources/limits");
        let has = |v: Option<&Value>| v.and_then(Value::as_object).is_some_and(|m| !m.is_empty());
        if has(req) || has(lim) {
            any = true;
        }
        for r in ["cpu", "memory"] {
            let l = lim.and_then(|l| l.get(r));
            let q = req.and_then(|q| q.get(r)).or(l);
            if l.is_none() || q != l {
                guaranteed = false;
            }
        }
    }
    if guaranteed {
        "Guaranteed"
    } else if any {
        "Burstable"
    } else {
        "BestEffort"
    }
}

fn template(obj: &mut Value) {
    if let Some(spec) = obj.pointer_mut("/spec/template/spec") {
        pod_spec(spec);
    }
}

/// Applies the defaults of a built-in type, on create (and on update of the
/// fields a client may have removed).
pub fn apply(group: &str, plural: &str, object: &mut Value) {
    match (group, plural) {
        ("", "pods") => {
            if let Some(spec) = object.get_mut("spec") {
                pod_spec(spec);
            }
            let qos = qos_class(object.get("spec").unwrap_or(&Value::Null));
            if let Some(m) = obj(object)
                && let Some(status) = child(m, "status")
            {
                default_field(status, "phase", json!("Pending"));
                default_field(status, "qosClass", json!(qos));
            }
        }
        ("", "namespaces") => {
            if let Some(m) = obj(object) {
                // Upstream always sets this label to the name (so policies
                // can select a namespace by name); a client cannot change it.
                if let Some(name) = m
                    .get("metadata")
                    .and_then(|md| md.get("name"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    && let Some(md) = child(m, "metadata")
                    && let Some(labels) = child(md, "labels")
                {
                    labels.insert("kubernetes.io/metadata.name".into(), json!(name));
                }
                if let Some(spec) = child(m, "spec") {
                    default_field(spec, "finalizers", json!(["kubernetes"]));
                }
                if let Some(status) = child(m, "status") {
                    default_field(status, "phase", json!("Active"));
                }
            }
        }
        ("", "services") => {
            let Some(m) = obj(object) else { return };
            if let Some(spec) = child(m, "spec") {
                default_field(spec, "type", json!("ClusterIP"));
                let external_name =
                    spec.get("type").and_then(Value::as_str) == Some("ExternalName");
                default_field(spec, "sessionAffinity", json!("None"));
                if !external_name {
                    default_field(spec, "internalTrafficPolicy", json!("Cluster"));
                    default_field(spec, "ipFamilyPolicy", json!("SingleStack"));
                    default_field(spec, "ipFamilies", json!(["IPv4"]));
                }
                if matches!(
                    spec.get("type").and_then(Value::as_str),
                    Some("NodePort" | "LoadBalancer")
                ) {
                    default_field(spec, "externalTrafficPolicy", json!("Cluster"));
                }
                if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports {
                        if let Some(p) = obj(p) {
                            default_field(p, "protocol", json!("TCP"));
                            let port = p.get("port").cloned().unwrap_or(Value::Null);
                            default_field(p, "targetPort", port);
                        }
                    }
                }
            }
            if let Some(status) = child(m, "status") {
                default_field(status, "loadBalancer", json!({}));
            }
        }
        ("apps", "deployments") => {
            template(object);
            let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
                return;
            };
            default_field(spec, "replicas", json!(1));
            default_field(spec, "revisionHistoryLimit", json!(10));
            default_field(spec, "progressDeadlineSeconds", json!(600));
            // `strategy: {}` and a RollingUpdate without parameters get the
            // upstream defaults too.
            if let Some(strategy) = child(spec, "strategy") {
                default_field(strategy, "type", json!("RollingUpdate"));
                if strategy.get("type").and_then(Value::as_str) == Some("RollingUpdate")
                    && let Some(ru) = child(strategy, "rollingUpdate")
                {
                    default_field(ru, "maxSurge", json!("25%"));
                    default_field(ru, "maxUnavailable", json!("25%"));
                }
            }
        }
        ("apps", "replicasets") | ("", "replicationcontrollers") => {
            template(object);
            if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
                default_field(spec, "replicas", json!(1));
            }
        }
        ("apps", "statefulsets") => {
            template(object);
            let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
                return;
            };
            default_field(spec, "replicas", json!(1));
            default_field(spec, "podManagementPolicy", json!("OrderedReady"));
            default_field(spec, "revisionHistoryLimit", json!(10));
            default_field(
                spec,
                "updateStrategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
            );
        }
        ("apps", "daemonsets") => {
            template(object);
            let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
                return;
            };
            default_field(spec, "revisionHistoryLimit", json!(10));
            default_field(
                spec,
                "updateStrategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}),
            );
        }
        ("batch", "jobs") => {
            template(object);
            let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
                return;
            };
            default_field(spec, "parallelism", json!(1));
            if spec.get("completions").is_none() {
                spec.insert("completions".into(), json!(1));
            }
            default_field(spec, "backoffLimit", json!(6));
            default_field(spec, "completionMode", json!("NonIndexed"));
            default_field(spec, "suspend", json!(false));
        }
        ("batch", "cronjobs") => {
            if let Some(spec) = object.pointer_mut("/spec/jobTemplate/spec/template/spec") {
                pod_spec(spec);
            }
            let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
                return;
            };
            default_field(spec, "concurrencyPolicy", json!("Allow"));
            default_field(spec, "suspend", json!(false));
            default_field(spec, "successfulJobsHistoryLimit", json!(3));
            default_field(spec, "failedJobsHistoryLimit", json!(1));
        }
        ("networking.k8s.io", "networkpolicies") => {
            let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
                return;
            };
            // Upstream's defaulting: Ingress always, Egress when the policy
            // has egress rules; each port's protocol TCP.
            let has_types = spec
                .get("policyTypes")
                .and_then(Value::as_array)
                .is_some_and(|t| !t.is_empty());
            if !has_types {
                let egress = spec
                    .get("egress")
                    .and_then(Value::as_array)
                    .is_some_and(|e| !e.is_empty());
                let types = if egress {
                    json!(["Ingress", "Egress"])
                } else {
                    json!(["Ingress"])
                };
                spec.insert("policyTypes".into(), types);
            }
            for dir in ["ingress", "egress"] {
                for rule in spec
                    .get_mut(dir)
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    for port in rule
                        .get_mut("ports")
                        .and_then(Value::as_array_mut)
                        .into_iter()
                        .flatten()
                    {
                        if let Some(port) = obj(port) {
                            default_field(port, "protocol", json!("TCP"));
                        }
                    }
                }
            }
        }
        ("", "secrets") => {
            if let Some(m) = obj(object) {
                default_field(m, "type", json!("Opaque"));
                // stringData is write-only: merged into data (base64).
                if let Some(Value::Object(sd)) = m.remove("stringData") {
                    use base64::Engine;
                    let data = child(m, "data");
                    if let Some(data) = data {
                        for (k, v) in sd {
                            let s = v.as_str().unwrap_or_default();
                            data.insert(
                                k,
                                json!(base64::engine::general_purpose::STANDARD.encode(s)),
                            );
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_labelled_with_their_name() {
        let mut ns =
            json!({"metadata": {"name": "team-a", "labels": {"kubernetes.io/metadata.name": "x"}}});
        apply("", "namespaces", &mut ns);
        assert_eq!(
            ns["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "team-a"
        );
        let mut bare = json!({"metadata": {"name": "b"}});
        apply("", "namespaces", &mut bare);
        assert_eq!(
            bare["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "b"
        );
    }

    #[test]
    fn network_policy_types_and_protocols_default_like_upstream() {
        let mut p = json!({"spec": {"podSelector": {}, "egress": [{"ports": [{"port": 53}]}]}});
        apply("networking.k8s.io", "networkpolicies", &mut p);
        assert_eq!(p["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(p["spec"]["egress"][0]["ports"][0]["protocol"], "TCP");
        let mut q = json!({"spec": {"podSelector": {}, "egress": []}});
        apply("networking.k8s.io", "networkpolicies", &mut q);
        assert_eq!(q["spec"]["policyTypes"], json!(["Ingress"]));
        let mut r = json!({"spec": {"podSelector": {}, "policyTypes": ["Egress"]}});
        apply("networking.k8s.io", "networkpolicies", &mut r);
        assert_eq!(r["spec"]["policyTypes"], json!(["Egress"]));
    }

    #[test]
    fn pod_defaults() {
        let mut pod = json!({"spec": {"containers": [{"name": "a", "image": "busybox", "ports": [{"containerPort": 80}]}]}});
        apply("", "pods", &mut pod);
        assert_eq!(pod["spec"]["restartPolicy"], "Always");
        assert_eq!(pod["spec"]["serviceAccountName"], "default");
        assert_eq!(pod["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(pod["spec"]["containers"][0]["ports"][0]["protocol"], "TCP");
        assert_eq!(pod["status"]["phase"], "Pending");
        assert_eq!(pod["status"]["qosClass"], "BestEffort");
    }

    #[test]
    fn qos() {
        let g = json!({"containers": [{"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]});
        assert_eq!(qos_class(&g), "Guaranteed");
        let b = json!({"containers": [{"resources": {"requests": {"cpu": "1"}}}]});
        assert_eq!(qos_class(&b), "Burstable");
    }

    #[test]
    fn secret_string_data_is_encoded() {
        let mut s = json!({"stringData": {"k": "v"}});
        apply("", "secrets", &mut s);
        assert_eq!(s["data"]["k"], "dg==");
        assert!(s.get("stringData").is_none());
        assert_eq!(s["type"], "Opaque");
    }
}
