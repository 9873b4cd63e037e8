//! Meshed pods of the other nodes into this node's `SKEP_MESH_PODS`, so a
//! local sidecar opens mTLS to them too (the pod workers keep the entries
//! of this node's pods, with their strict flag; to_pod only ever sees local
//! pods, so remote entries never refuse anything here).
//!
//! A pod counts as meshed once its status lists the injected sidecar (its
//! kubelet only injects where the capture works). List, then watch; any
//! failure relists.

use futures::StreamExt;
use serde_json::Value;
use skep_client::Client;
use std::{collections::HashMap, net::Ipv4Addr, path::PathBuf, time::Duration};

use super::SIDECAR_NAME;

const PODS: &str = "/api/v1/pods";

/// The address under which a remote pod is meshed, if it is.
fn meshed_remote(pod: &Value, node: &str) -> Option<Ipv4Addr> {
    let on = pod.pointer("/spec/nodeName").and_then(Value::as_str)?;
    if on == node
        || pod
            .pointer("/spec/hostNetwork")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    {
        return None;
    }
    let has_sidecar = pod
        .pointer("/status/initContainerStatuses")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_NAME))
        });
    if !has_sidecar {
        return None;
    }
    pod.pointer("/status/podIP")
        .and_then(Value::as_str)?
        .parse()
        .ok()
}

fn uid(pod: &Value) -> String {
    pod.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

/// Current remote meshed pods (uid → address) and the map they go to.
struct Peers {
    pin_root: PathBuf,
    known: HashMap<String, Ipv4Addr>,
}

impl Peers {
    fn set(&mut self, uid: String, addr: Option<Ipv4Addr>) {
        let old = self.known.get(&uid).copied();
        if old == addr {
            return;
        }
        let result = skep_dataplane::mesh::MeshPods::open(&self.pin_root).and_then(|mut m| {
            if let Some(o) = old {
                m.remove(o)?;
            }
            if let Some(a) = addr {
                m.set(a, false)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            tracing::warn!(error = %e, "updating remote meshed pods failed");
            return;
        }
        match addr {
            Some(a) => self.known.insert(uid, a),
            None => self.known.remove(&uid),
        };
    }
}

/// Runs until the process ends.
pub async fn run(client: Client, node: String, pin_root: PathBuf) {
    let mut peers = Peers {
        pin_root,
        known: HashMap::new(),
    };
    loop {
        if let Err(e) = sync(&client, &node, &mut peers).await {
            tracing::debug!(error = %e, "remote meshed pods: relisting");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn sync(client: &Client, node: &str, peers: &mut Peers) -> Result<(), String> {
    let list = client.get(PODS).await.map_err(|e| e.to_string())?;
    let mut seen: HashMap<String, Option<Ipv4Addr>> = HashMap::new();
    for pod in list
        .get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        seen.insert(uid(pod), meshed_remote(pod, node));
    }
    let gone: Vec<String> = peers
        .known
        .keys()
        .filter(|u| !seen.contains_key(*u))
        .cloned()
        .collect();
    for u in gone {
        peers.set(u, None);
    }
    for (u, a) in seen {
        peers.set(u, a);
    }
    let rv = list
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("0");
    let mut watch = client
        .watch(&format!(
            "{PODS}?resourceVersion={rv}&allowWatchBookmarks=true"
        ))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let event = match watch.next().await {
            None => return Err("the API server ended the watch".into()),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(ev)) => ev,
        };
        match event.kind.as_str() {
            "ERROR" => return Err(format!("watch error: {}", event.object)),
            "DELETED" => peers.set(uid(&event.object), None),
            "ADDED" | "MODIFIED" => {
                let addr = meshed_remote(&event.object, node);
                peers.set(uid(&event.object), addr);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_remote_pods_with_the_sidecar() {
        let pod = |node: &str, sidecar: bool| {
            json!({"spec": {"nodeName": node},
                   "status": {"podIP": "10.42.1.5",
                              "initContainerStatuses": if sidecar {
                                  json!([{"name": SIDECAR_NAME}]) } else { json!([]) }}})
        };
        assert_eq!(
            meshed_remote(&pod("b", true), "a"),
            Some(Ipv4Addr::new(10, 42, 1, 5))
        );
        assert_eq!(meshed_remote(&pod("a", true), "a"), None, "local pod");
        assert_eq!(meshed_remote(&pod("b", false), "a"), None, "no sidecar");
    }
}
