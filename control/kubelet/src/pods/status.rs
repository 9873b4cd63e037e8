//! Pure pieces of a pod's status: QoS class, container resources, the
//! restart rule, a container's status object.

use crate::json::str_at as s;
use crate::runtime::{ContainerInfo, ContainerState, Resources};
use serde_json::{Value, json};

pub fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn now() -> String {
    time(&chrono::Utc::now())
}

/// Guaranteed, Burstable or BestEffort (Kubernetes' rules over every
/// init and app container).
pub fn qos_class(pod: &Value) -> &'static str {
    let containers: Vec<&Value> = ["/spec/containers", "/spec/initContainers"]
        .iter()
        .flat_map(|p| {
            pod.pointer(p)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in &containers {
        for res in ["cpu", "memory"] {
            let limit = s(c, &format!("/resources/limits/{res}"));
            let request = s(c, &format!("/resources/requests/{res}")).or(limit);
            if limit.is_some() || request.is_some() {
                any = true;
            }
            if limit.is_none() || request != limit {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// The cgroup settings of a container.
pub fn resources(c: &Value) -> Resources {
    let limit_cpu = s(c, "/resources/limits/cpu").and_then(super::env::cpu_millis);
    Resources {
        cpu_limit_millis: limit_cpu,
        cpu_request_millis: s(c, "/resources/requests/cpu")
            .and_then(super::env::cpu_millis)
            .or(limit_cpu),
        memory_limit_bytes: s(c, "/resources/limits/memory").and_then(super::env::bytes),
    }
}

/// Whether a container that exited with `code` is started again.
pub fn restarts(policy: &str, sidecar: bool, code: i32) -> bool {
    sidecar
        || match policy {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        }
}

fn terminated(info: &ContainerInfo, runtime: &str) -> Value {
    let ContainerState::Exited {
        started_at,
        finished_at,
        exit_code,
        reason,
        message,
    } = &info.state
    else {
        return json!({});
    };
    let mut t = json!({"exitCode": exit_code, "reason": reason,
        "finishedAt": time(finished_at), "containerID": format!("{runtime}://{}", info.id)});
    t["startedAt"] = match started_at {
        Some(st) => json!(time(st)),
        None => json!(time(finished_at)),
    };
    if let Some(m) = message {
        t["message"] = json!(m);
    }
    json!({"terminated": t})
}

/// What a container status says, given its current and previous instance.
#[derive(Debug)]
pub struct ContainerFacts<'a> {
    pub name: &'a str,
    pub image: &'a str,
    pub current: Option<&'a ContainerInfo>,
    pub previous: Option<&'a ContainerInfo>,
    /// (reason, message) when the container is waiting (back-off, image
    /// pull error, config error, initializing).
    pub waiting: Option<(&'a str, &'a str)>,
    pub ready: bool,
    pub started: bool,
    pub runtime: &'a str,
}

pub fn container_status(f: &ContainerFacts<'_>) -> Value {
    let mut st = json!({"name": f.name, "image": f.image, "imageID": "",
        "ready": f.ready, "restartCount": f.current.map_or(0, |c| c.labels.attempt),
        "started": f.started, "lastState": {}});
    if let Some(c) = f.current {
        st["containerID"] = json!(format!("{}://{}", f.runtime, c.id));
        st["imageID"] = json!(c.image_id);
    }
    let waiting = |reason: &str, message: &str| {
        let mut w = json!({"reason": reason});
        if !message.is_empty() {
            w["message"] = json!(message);
        }
        json!({"waiting": w})
    };
    match (f.current, f.waiting) {
        (Some(c), Some((reason, message))) if matches!(c.state, ContainerState::Exited { .. }) => {
            st["state"] = waiting(reason, message);
            st["lastState"] = terminated(c, f.runtime);
        }
        (Some(c), _) => {
            st["state"] = match &c.state {
                ContainerState::Created => waiting("ContainerCreating", ""),
                ContainerState::Running { started_at } => {
                    json!({"running": {"startedAt": time(started_at)}})
                }
                ContainerState::Exited { .. } => terminated(c, f.runtime),
            };
            if let Some(p) = f.previous {
                st["lastState"] = terminated(p, f.runtime);
            }
        }
        (None, Some((reason, message))) => st["state"] = waiting(reason, message),
        (None, None) => st["state"] = waiting("ContainerCreating", ""),
    }
    st
}

/// A condition, keeping `lastTransitionTime` from `old` when its status
/// did not change.
pub fn condition(old: &Value, kind: &str, ok: bool, reason: Option<&str>) -> Value {
    let status = if ok { "True" } else { "False" };
    let prev = old
        .pointer("/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| s(c, "/type") == Some(kind)));
    let since = match prev {
        Some(p) if s(p, "/status") == Some(status) => p
            .get("lastTransitionTime")
            .cloned()
            .unwrap_or_else(|| json!(now())),
        _ => json!(now()),
    };
    let mut c =
        json!({"type": kind, "status": status, "lastProbeTime": null, "lastTransitionTime": since});
    if let Some(r) = reason {
        c["reason"] = json!(r);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qos() {
        let g = json!({"spec": {"containers": [{"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]}});
        assert_eq!(qos_class(&g), "Guaranteed");
        let b = json!({"spec": {"containers": [{"resources": {"requests": {"cpu": "1"}}}]}});
        assert_eq!(qos_class(&b), "Burstable");
        let e = json!({"spec": {"containers": [{"name": "a"}]}});
        assert_eq!(qos_class(&e), "BestEffort");
    }

    #[test]
    fn restart_rules() {
        assert!(restarts("Always", false, 0));
        assert!(!restarts("OnFailure", false, 0));
        assert!(restarts("OnFailure", false, 1));
        assert!(!restarts("Never", false, 1));
        assert!(restarts("Never", true, 0));
    }
}
