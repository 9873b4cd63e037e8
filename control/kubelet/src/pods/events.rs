//! Events the kubelet posts about pods (Pulled, Created, Started, Killing,
//! Unhealthy, BackOff, Failed, FailedMount …). Posting never blocks a
//! pod's worker: each event is sent from its own task, and a failure is
//! only logged.

use serde_json::{Value, json};
use skep_client::Client;

#[derive(Clone)]
pub struct Recorder {
    client: Client,
    node: String,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("node", &self.node)
            .finish()
    }
}

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    Warning,
}

impl Recorder {
    pub fn new(client: Client, node: String) -> Self {
        Self { client, node }
    }

    /// Records an event about `pod` (and, with `container`, its field path).
    pub fn pod(
        &self,
        pod: &Value,
        container: Option<&str>,
        kind: Kind,
        reason: &str,
        message: String,
    ) {
        let ns = pod
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        let name = pod
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let now = chrono::Utc::now();
        let field_path = container.map(|c| {
            let init = pod
                .pointer("/spec/initContainers")
                .and_then(Value::as_array)
                .is_some_and(|a| {
                    a.iter()
                        .any(|x| x.get("name").and_then(Value::as_str) == Some(c))
                });
            if init {
                format!("spec.initContainers{{{c}}}")
            } else {
                format!("spec.containers{{{c}}}")
            }
        });
        let mut involved = json!({"kind": "Pod", "apiVersion": "v1", "namespace": ns, "name": name,
            "uid": pod.pointer("/metadata/uid")});
        if let Some(fp) = field_path {
            involved["fieldPath"] = json!(fp);
        }
        let event = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": format!("{name}."), "namespace": ns},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": if kind == Kind::Normal { "Normal" } else { "Warning" },
            "source": {"component": "kubelet", "host": self.node},
            "reportingComponent": "kubelet",
            "reportingInstance": self.node,
            "firstTimestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "lastTimestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "count": 1,
        });
        let client = self.client.clone();
        tokio::spawn(async move {
            if let Err(e) = client
                .create(&format!("/api/v1/namespaces/{ns}/events"), &event)
                .await
            {
                tracing::debug!(error = %e, "posting an event failed");
            }
        });
    }
}
