//! `meta.k8s.io/v1 Table` output: the columns `kubectl get` shows for each
//! resource on a real cluster (priority 1 columns appear with `-o wide`).

use crate::{objects, resources::ResourceInfo};
use serde_json::{Value, json};

struct Col {
    name: &'static str,
    ty: &'static str,
    priority: u8,
}

const fn col(name: &'static str) -> Col {
    Col {
        name,
        ty: "string",
        priority: 0,
    }
}
const fn int(name: &'static str) -> Col {
    Col {
        name,
        ty: "integer",
        priority: 0,
    }
}
const fn wide(name: &'static str) -> Col {
    Col {
        name,
        ty: "string",
        priority: 1,
    }
}

fn columns(info: &ResourceInfo) -> Vec<Col> {
    match (info.group.as_str(), info.plural.as_str()) {
        ("", "pods") => vec![
            col("Name"),
            col("Ready"),
            col("Status"),
            col("Restarts"),
            col("Age"),
            wide("IP"),
            wide("Node"),
            wide("Nominated Node"),
            wide("Readiness Gates"),
        ],
        ("", "namespaces") => vec![col("Name"), col("Status"), col("Age")],
        ("", "nodes") => vec![
            col("Name"),
            col("Status"),
            col("Roles"),
            col("Age"),
            col("Version"),
            wide("Internal-IP"),
            wide("External-IP"),
            wide("OS-Image"),
            wide("Kernel-Version"),
            wide("Container-Runtime"),
        ],
        ("", "services") => vec![
            col("Name"),
            col("Type"),
            col("Cluster-IP"),
            col("External-IP"),
            col("Port(s)"),
            col("Age"),
            wide("Selector"),
        ],
        ("", "configmaps") => vec![col("Name"), int("Data"), col("Age")],
        ("", "secrets") => vec![col("Name"), col("Type"), int("Data"), col("Age")],
        ("", "serviceaccounts") => vec![col("Name"), int("Secrets"), col("Age")],
        ("", "endpoints") => vec![col("Name"), col("Endpoints"), col("Age")],
        ("", "events") => vec![
            col("Last Seen"),
            col("Type"),
            col("Reason"),
            col("Object"),
            col("Message"),
        ],
        ("", "persistentvolumes") => vec![
            col("Name"),
            col("Capacity"),
            col("Access Modes"),
            col("Reclaim Policy"),
            col("Status"),
            col("Claim"),
            col("StorageClass"),
            col("Reason"),
            col("Age"),
        ],
        ("storage.k8s.io", "storageclasses") => vec![
            col("Name"),
            col("Provisioner"),
            col("ReclaimPolicy"),
            col("VolumeBindingMode"),
            col("AllowVolumeExpansion"),
            col("Age"),
        ],
        ("", "persistentvolumeclaims") => vec![
            col("Name"),
            col("Status"),
            col("Volume"),
            col("Capacity"),
            col("Access Modes"),
            col("StorageClass"),
            col("Age"),
        ],
        ("apps", "deployments") => vec![
            col("Name"),
            col("Ready"),
            int("Up-to-date"),
            int("Available"),
            col("Age"),
            wide("Containers"),
            wide("Images"),
            wide("Selector"),
        ],
        ("apps", "replicasets") | ("", "replicationcontrollers") => vec![
            col("Name"),
            int("Desired"),
            int("Current"),
            int("Ready"),
            col("Age"),
            wide("Containers"),
            wide("Images"),
            wide("Selector"),
        ],
        ("apps", "statefulsets") => vec![
            col("Name"),
            col("Ready"),
            col("Age"),
            wide("Containers"),
            wide("Images"),
        ],
        ("apps", "daemonsets") => vec![
            col("Name"),
            int("Desired"),
            int("Current"),
            int("Ready"),
            int("Up-to-date"),
            int("Available"),
            col("Node Selector"),
            col("Age"),
            wide("Containers"),
            wide("Images"),
            wide("Selector"),
        ],
        ("batch", "jobs") => vec![
            col("Name"),
            col("Status"),
            col("Completions"),
            col("Duration"),
            col("Age"),
        ],
        ("autoscaling", "horizontalpodautoscalers") => vec![
            col("Name"),
            col("Reference"),
            col("Targets"),
            col("MinPods"),
            int("MaxPods"),
            int("Replicas"),
            col("Age"),
        ],
        ("batch", "cronjobs") => vec![
            col("Name"),
            col("Schedule"),
            col("Timezone"),
            col("Suspend"),
            int("Active"),
            col("Last Schedule"),
            col("Age"),
        ],
        ("networking.k8s.io", "networkpolicies") => {
            vec![col("Name"), col("Pod-Selector"), col("Age")]
        }
        ("discovery.k8s.io", "endpointslices") => vec![
            col("Name"),
            col("AddressType"),
            col("Ports"),
            col("Endpoints"),
            col("Age"),
        ],
        ("coordination.k8s.io", "leases") => vec![col("Name"), col("Holder"), col("Age")],
        ("scheduling.k8s.io", "priorityclasses") => vec![
            col("Name"),
            col("Value"),
            col("Global-Default"),
            col("Age"),
            col("PreemptionPolicy"),
        ],
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            vec![col("Name"), col("Created At")]
        }
        ("skep.io", "securityidentities") => {
            vec![col("ID"), col("Namespace"), col("Labels"), col("Age")]
        }
        _ => vec![col("Name"), col("Age")],
    }
}

/// kube's HumanDuration: "5s", "3m20s", "2d3h", "45d", "2y100d".
pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    if s < 120 {
        return format!("{s}s");
    }
    let m = s / 60;
    if m < 10 {
        return two_units(m, "m", s % 60, "s");
    }
    if m < 180 {
        return format!("{m}m");
    }
    let h = s / 3600;
    if h < 8 {
        return two_units(h, "h", m % 60, "m");
    }
    if h < 48 {
        return format!("{h}h");
    }
    let d = h / 24;
    if h < 24 * 8 {
        return two_units(d, "d", h % 24, "h");
    }
    if d < 365 * 2 {
        return format!("{d}d");
    }
    let y = d / 365;
    if d < 365 * 8 {
        return two_units(y, "y", d % 365, "d");
    }
    format!("{y}y")
}

/// `3m20s`; the smaller unit is left out when it is 0 (`3m`).
fn two_units(n: i64, unit: &str, rem: i64, rem_unit: &str) -> String {
    if rem == 0 {
        format!("{n}{unit}")
    } else {
        format!("{n}{unit}{rem}{rem_unit}")
    }
}

fn age_of(ts: Option<&str>) -> String {
    match ts.and_then(rfc3339) {
        Some(t) => {
            human_duration((chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds())
        }
        None => "<unknown>".into(),
    }
}

fn s(v: &Value, ptr: &str) -> String {
    match v.pointer(ptr) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => String::new(),
    }
}

fn rfc3339(t: &str) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    chrono::DateTime::parse_from_rfc3339(t).ok()
}

/// The string at `ptr`, or `default` when it is absent or empty (a field
/// the API server leaves unset but kubectl shows with its default).
fn s_or(v: &Value, ptr: &str, default: &str) -> String {
    let found = s(v, ptr);
    if found.is_empty() {
        default.to_owned()
    } else {
        found
    }
}

/// `parts` joined with `sep`, or `empty` when there are none.
fn joined(parts: &[String], sep: &str, empty: &str) -> String {
    if parts.is_empty() {
        empty.to_owned()
    } else {
        parts.join(sep)
    }
}

fn n(v: &Value, ptr: &str) -> i64 {
    v.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

/// kubectl's TARGETS of an HPA: `cpu: 250%/50%, memory: 10Mi/100Mi`
/// (current from status.currentMetrics, `<unknown>` until measured).
fn hpa_targets(o: &Value) -> String {
    let specs: Vec<Value> = match o.pointer("/spec/metrics").and_then(Value::as_array) {
        Some(m) => m.clone(),
        // autoscaling/v1 objects (and v2 without metrics): CPU at 80 %.
        None => vec![
            json!({"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization",
            "averageUtilization": o.pointer("/spec/targetCPUUtilizationPercentage").and_then(Value::as_i64).unwrap_or(80)}}}),
        ],
    };
    let current = o
        .pointer("/status/currentMetrics")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let parts: Vec<String> = specs
        .iter()
        .map(|m| {
            let kind = s(m, "/type");
            if kind != "Resource" {
                return format!("<{}>", kind.to_lowercase());
            }
            let res = s(m, "/resource/name");
            let cur = current
                .iter()
                .find(|c| s(c, "/type") == "Resource" && s(c, "/resource/name") == res);
            if s(m, "/resource/target/type") == "Utilization" {
                let now = cur
                    .and_then(|c| c.pointer("/resource/current/averageUtilization"))
                    .and_then(Value::as_i64)
                    .map_or_else(|| "<unknown>".to_string(), |u| format!("{u}%"));
                format!(
                    "{res}: {now}/{}%",
                    n(m, "/resource/target/averageUtilization")
                )
            } else {
                let now = cur
                    .map(|c| s(c, "/resource/current/averageValue"))
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| "<unknown>".to_string());
                format!("{res}: {now}/{}", s(m, "/resource/target/averageValue"))
            }
        })
        .collect();
    joined(&parts, ", ", "<none>")
}

fn or_none(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

pub fn selector_string(sel: Option<&Value>) -> String {
    let Some(sel) = sel else {
        return "<none>".into();
    };
    let mut parts: Vec<String> = Vec::new();
    let labels = sel
        .get("matchLabels")
        .or(Some(sel))
        .and_then(Value::as_object);
    if let Some(m) = labels {
        for (k, v) in m {
            if let Some(v) = v.as_str() {
                parts.push(format!("{k}={v}"));
            }
        }
    }
    if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
        for e in exprs {
            let key = s(e, "/key");
            let vals: Vec<String> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            parts.push(match s(e, "/operator").as_str() {
                "In" => format!("{key} in ({})", vals.join(",")),
                "NotIn" => format!("{key} notin ({})", vals.join(",")),
                "Exists" => key,
                _ => format!("!{key}"),
            });
        }
    }
    joined(&parts, ",", "<none>")
}

fn containers_and_images(spec: Option<&Value>) -> (String, String) {
    let cs: Vec<&Value> = spec
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    (
        cs.iter()
            .map(|c| s(c, "/name"))
            .collect::<Vec<_>>()
            .join(","),
        cs.iter()
            .map(|c| s(c, "/image"))
            .collect::<Vec<_>>()
            .join(","),
    )
}

fn pod_row(o: &Value) -> Vec<Value> {
    let total = o
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let statuses: Vec<&Value> = o
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let ready = statuses
        .iter()
        .filter(|c| c.get("ready") == Some(&Value::Bool(true)))
        .count();
    let restarts: i64 = statuses.iter().map(|c| n(c, "/restartCount")).sum();
    let mut status = s(o, "/status/reason");
    if status.is_empty() {
        status = s(o, "/status/phase");
    }
    for c in &statuses {
        let waiting = s(c, "/state/waiting/reason");
        if !waiting.is_empty() {
            status = waiting;
        } else {
            let term = s(c, "/state/terminated/reason");
            if !term.is_empty() && status == "Running" {
                status = term;
            }
        }
    }
    if o.pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
    {
        status = "Terminating".into();
    }
    vec![
        json!(objects::name(o)),
        json!(format!("{ready}/{total}")),
        json!(status),
        json!(restarts.to_string()),
        json!(age_of(objects::meta_str(o, "creationTimestamp"))),
        json!(or_none(s(o, "/status/podIP"))),
        json!(or_none(s(o, "/spec/nodeName"))),
        json!(or_none(s(o, "/status/nominatedNodeName"))),
        json!("<none>"),
    ]
}

fn service_row(o: &Value) -> Vec<Value> {
    let ports: Vec<String> = o
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let np = n(p, "/nodePort");
            if np > 0 {
                format!("{}:{}/{}", n(p, "/port"), np, s(p, "/protocol"))
            } else {
                format!("{}/{}", n(p, "/port"), s(p, "/protocol"))
            }
        })
        .collect();
    let ty = s(o, "/spec/type");
    let external: Vec<String> = o
        .pointer("/status/loadBalancer/ingress")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|i| s(i, "/ip"))
        .chain(
            o.pointer("/spec/externalIPs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned)),
        )
        .collect();
    let external = if ty == "ExternalName" {
        s(o, "/spec/externalName")
    } else if external.is_empty() {
        if ty == "LoadBalancer" {
            "<pending>".into()
        } else {
            "<none>".into()
        }
    } else {
        external.join(",")
    };
    vec![
        json!(objects::name(o)),
        json!(ty),
        json!(or_none(s(o, "/spec/clusterIP"))),
        json!(external),
        json!(joined(&ports, ",", "<none>")),
        json!(age_of(objects::meta_str(o, "creationTimestamp"))),
        json!(selector_string(o.pointer("/spec/selector"))),
    ]
}

fn row(info: &ResourceInfo, o: &Value) -> Vec<Value> {
    let name = json!(objects::name(o));
    let age = json!(age_of(objects::meta_str(o, "creationTimestamp")));
    let data_len = |f: &str| o.get(f).and_then(Value::as_object).map_or(0, |m| m.len());
    match (info.group.as_str(), info.plural.as_str()) {
        ("", "pods") => pod_row(o),
        ("", "services") => service_row(o),
        ("", "namespaces") => vec![name, json!(s(o, "/status/phase")), age],
        ("", "nodes") => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|c| c.iter().find(|c| s(c, "/type") == "Ready"))
                .map(|c| {
                    if s(c, "/status") == "True" {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                })
                .unwrap_or("Unknown");
            let mut status = ready.to_string();
            if o.pointer("/spec/unschedulable") == Some(&Value::Bool(true)) {
                status.push_str(",SchedulingDisabled");
            }
            let roles: Vec<String> = o
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| {
                    k.strip_prefix("node-role.kubernetes.io/")
                        .map(str::to_owned)
                })
                .collect();
            let addr = |t: &str| {
                o.pointer("/status/addresses")
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().find(|x| s(x, "/type") == t))
                    .map(|x| s(x, "/address"))
                    .unwrap_or_else(|| "<none>".into())
            };
            vec![
                name,
                json!(status),
                json!(joined(&roles, ",", "<none>")),
                age,
                json!(s(o, "/status/nodeInfo/kubeletVersion")),
                json!(addr("InternalIP")),
                json!(addr("ExternalIP")),
                json!(s(o, "/status/nodeInfo/osImage")),
                json!(s(o, "/status/nodeInfo/kernelVersion")),
                json!(s(o, "/status/nodeInfo/containerRuntimeVersion")),
            ]
        }
        ("", "configmaps") => vec![name, json!(data_len("data") + data_len("binaryData")), age],
        ("", "secrets") => vec![name, json!(s(o, "/type")), json!(data_len("data")), age],
        ("", "serviceaccounts") => vec![
            name,
            json!(
                o.get("secrets")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len)
            ),
            age,
        ],
        ("", "endpoints") => {
            let mut eps = Vec::new();
            for subset in o
                .get("subsets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let ports: Vec<i64> = subset
                    .get("ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|p| n(p, "/port"))
                    .collect();
                for a in subset
                    .get("addresses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    for p in &ports {
                        eps.push(format!("{}:{p}", s(a, "/ip")));
                    }
                }
            }
            vec![name, json!(joined(&eps, ",", "<none>")), age]
        }
        ("", "events") => vec![
            json!(age_of(
                o.get("lastTimestamp")
                    .and_then(Value::as_str)
                    .or(objects::meta_str(o, "creationTimestamp"))
            )),
            json!(s(o, "/type")),
            json!(s(o, "/reason")),
            json!(format!(
                "{}/{}",
                s(o, "/involvedObject/kind").to_lowercase(),
                s(o, "/involvedObject/name")
            )),
            json!(s(o, "/message")),
        ],
        ("", "persistentvolumes") => {
            let claim = if s(o, "/spec/claimRef/name").is_empty() {
                String::new()
            } else {
                format!(
                    "{}/{}",
                    s(o, "/spec/claimRef/namespace"),
                    s(o, "/spec/claimRef/name")
                )
            };
            vec![
                name,
                json!(s(o, "/spec/capacity/storage")),
                json!(short_access_modes(o.pointer("/spec/accessModes"))),
                json!(s(o, "/spec/persistentVolumeReclaimPolicy")),
                json!(s(o, "/status/phase")),
                json!(claim),
                json!(s(o, "/spec/storageClassName")),
                json!(s(o, "/status/reason")),
                age,
            ]
        }
        ("storage.k8s.io", "storageclasses") => {
            let default = o
                .pointer("/metadata/annotations/storageclass.kubernetes.io~1is-default-class")
                .and_then(Value::as_str)
                == Some("true");
            vec![
                json!(if default {
                    format!("{} (default)", objects::name(o))
                } else {
                    objects::name(o).to_owned()
                }),
                json!(s(o, "/provisioner")),
                json!(s_or(o, "/reclaimPolicy", "Delete")),
                json!(s_or(o, "/volumeBindingMode", "Immediate")),
                json!(
                    o.get("allowVolumeExpansion")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)
                ),
                age,
            ]
        }
        ("", "persistentvolumeclaims") => vec![
            name,
            json!(s(o, "/status/phase")),
            json!(s(o, "/spec/volumeName")),
            json!(s(o, "/status/capacity/storage")),
            json!(short_access_modes(o.pointer("/status/accessModes"))),
            json!(s(o, "/spec/storageClassName")),
            age,
        ],
        ("apps", "deployments") => {
            let (c, i) = containers_and_images(o.pointer("/spec/template/spec"));
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    n(o, "/status/readyReplicas"),
                    n(o, "/spec/replicas")
                )),
                json!(n(o, "/status/updatedReplicas")),
                json!(n(o, "/status/availableReplicas")),
                age,
                json!(c),
                json!(i),
                json!(selector_string(o.pointer("/spec/selector"))),
            ]
        }
        ("apps", "replicasets") | ("", "replicationcontrollers") => {
            let (c, i) = containers_and_images(o.pointer("/spec/template/spec"));
            vec![
                name,
                json!(n(o, "/spec/replicas")),
                json!(n(o, "/status/replicas")),
                json!(n(o, "/status/readyReplicas")),
                age,
                json!(c),
                json!(i),
                json!(selector_string(o.pointer("/spec/selector"))),
            ]
        }
        ("apps", "statefulsets") => {
            let (c, i) = containers_and_images(o.pointer("/spec/template/spec"));
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    n(o, "/status/readyReplicas"),
                    n(o, "/spec/replicas")
                )),
                age,
                json!(c),
                json!(i),
            ]
        }
        ("apps", "daemonsets") => {
            let (c, i) = containers_and_images(o.pointer("/spec/template/spec"));
            vec![
                name,
                json!(n(o, "/status/desiredNumberScheduled")),
                json!(n(o, "/status/currentNumberScheduled")),
                json!(n(o, "/status/numberReady")),
                json!(n(o, "/status/updatedNumberScheduled")),
                json!(n(o, "/status/numberAvailable")),
                json!(selector_string(
                    o.pointer("/spec/template/spec/nodeSelector")
                )),
                age,
                json!(c),
                json!(i),
                json!(selector_string(o.pointer("/spec/selector"))),
            ]
        }
        ("batch", "jobs") => {
            let status = if n(o, "/status/succeeded") >= n(o, "/spec/completions").max(1) {
                "Complete"
            } else if n(o, "/status/failed") > 0 && n(o, "/status/active") == 0 {
                "Failed"
            } else {
                "Running"
            };
            let at = |ptr: &str| o.pointer(ptr).and_then(Value::as_str).and_then(rfc3339);
            let duration = match (at("/status/startTime"), at("/status/completionTime")) {
                (Some(a), Some(b)) => human_duration((b - a).num_seconds()),
                (Some(a), None) => human_duration(
                    (chrono::Utc::now() - a.with_timezone(&chrono::Utc)).num_seconds(),
                ),
                _ => String::new(),
            };
            vec![
                name,
                json!(status),
                json!(format!(
                    "{}/{}",
                    n(o, "/status/succeeded"),
                    n(o, "/spec/completions").max(1)
                )),
                json!(duration),
                age,
            ]
        }
        ("autoscaling", "horizontalpodautoscalers") => vec![
            name,
            json!(format!(
                "{}/{}",
                s(o, "/spec/scaleTargetRef/kind"),
                s(o, "/spec/scaleTargetRef/name")
            )),
            json!(hpa_targets(o)),
            json!(
                o.pointer("/spec/minReplicas")
                    .and_then(Value::as_i64)
                    .map_or_else(|| "<unset>".to_string(), |m| m.to_string())
            ),
            json!(n(o, "/spec/maxReplicas")),
            json!(n(o, "/status/currentReplicas")),
            age,
        ],
        ("batch", "cronjobs") => vec![
            name,
            json!(s(o, "/spec/schedule")),
            json!(or_none(s(o, "/spec/timeZone"))),
            json!(s(o, "/spec/suspend")),
            json!(
                o.pointer("/status/active")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len)
            ),
            json!(
                o.pointer("/status/lastScheduleTime")
                    .and_then(Value::as_str)
                    .map(|t| age_of(Some(t)))
                    .unwrap_or_else(|| "<none>".into())
            ),
            age,
        ],
        ("networking.k8s.io", "networkpolicies") => {
            let sel = selector_string(o.pointer("/spec/podSelector"));
            vec![
                name,
                json!(if sel == "<none>" {
                    "<none>".to_string()
                } else {
                    sel
                }),
                age,
            ]
        }
        ("discovery.k8s.io", "endpointslices") => {
            let ports: Vec<String> = o
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| n(p, "/port").to_string())
                .collect();
            let eps: Vec<String> = o
                .get("endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|e| {
                    e.get("addresses")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                })
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect();
            vec![
                name,
                json!(s(o, "/addressType")),
                json!(joined(&ports, ",", "<unset>")),
                json!(joined(&eps, ",", "<unset>")),
                age,
            ]
        }
        ("coordination.k8s.io", "leases") => vec![name, json!(s(o, "/spec/holderIdentity")), age],
        ("scheduling.k8s.io", "priorityclasses") => vec![
            name,
            json!(o.get("value").and_then(Value::as_i64).unwrap_or(0)),
            json!(
                o.get("globalDefault")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
            ),
            age,
            json!(s_or(o, "/preemptionPolicy", "PreemptLowerPriority")),
        ],
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            vec![
                name,
                json!(objects::meta_str(o, "creationTimestamp").unwrap_or("")),
            ]
        }
        ("skep.io", "securityidentities") => {
            let labels = o.get("securityLabels").and_then(Value::as_object);
            let label = |k: &(&String, &Value)| format!("{}={}", k.0, k.1.as_str().unwrap_or(""));
            // The pod labels first: they are what tells identities apart
            // within a namespace; the namespace's own labels follow.
            let shown: Vec<String> = labels
                .into_iter()
                .flatten()
                .filter(|(k, _)| k.starts_with("pod:"))
                .chain(labels.into_iter().flatten().filter(|(k, _)| {
                    // The name label repeats the NAMESPACE column.
                    k.starts_with("namespace:") && *k != "namespace:kubernetes.io/metadata.name"
                }))
                .map(|kv| label(&kv))
                .collect();
            vec![
                name,
                json!(s(o, "/securityLabels/k8s:io.kubernetes.pod.namespace")),
                json!(or_none(shown.join(","))),
                age,
            ]
        }
        _ => vec![name, age],
    }
}

/// What `includeObject` asks for in each row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(v: Option<&str>) -> Self {
        match v {
            Some("None") => Self::None,
            Some("Object") => Self::Object,
            _ => Self::Metadata,
        }
    }
}

/// A Table of `objects`.
pub fn table(
    info: &ResourceInfo,
    objects: &[Value],
    list_meta: Value,
    include: IncludeObject,
) -> Value {
    let cols = columns(info);
    let defs: Vec<Value> = cols
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "type": c.ty,
                "format": if c.name == "Name" { "name" } else { "" },
                "description": "",
                "priority": c.priority,
            })
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut cells = row(info, o);
            cells.truncate(cols.len());
            let mut r = json!({ "cells": cells });
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => r["object"] = objects::partial_metadata(o),
                IncludeObject::Object => r["object"] = o.clone(),
            }
            r
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": defs,
        "rows": rows,
    })
}

/// Access modes as kubectl prints them (RWO, ROX, RWX, RWOP).
fn short_access_modes(modes: Option<&Value>) -> String {
    modes
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .map(|m| match m {
                    "ReadWriteOnce" => "RWO",
                    "ReadOnlyMany" => "ROX",
                    "ReadWriteMany" => "RWX",
                    "ReadWriteOncePod" => "RWOP",
                    x => x,
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_match_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(3 * 3600 + 60 * 5), "3h5m");
        assert_eq!(human_duration(26 * 3600), "26h");
        assert_eq!(human_duration(3 * 86400), "3d");
        assert_eq!(human_duration(100 * 86400), "100d");
    }

    #[test]
    fn pod_rows() {
        let reg = crate::resources::Registry::builtin();
        let pods = reg.lookup("", "v1", "pods").unwrap();
        let pod = json!({"metadata": {"name": "p", "creationTimestamp": objects::now_rfc3339()},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.42.0.5", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 2, "state": {"running": {}}},
                {"name": "b", "ready": false, "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        let t = table(&pods, &[pod], json!({}), IncludeObject::Metadata);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[1], "1/2");
        assert_eq!(cells[2], "CrashLoopBackOff");
        assert_eq!(cells[3], "3");
        assert_eq!(cells[5], "10.42.0.5");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }
}
