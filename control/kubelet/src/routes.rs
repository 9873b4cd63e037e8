//! Routes to the other nodes' pods (native routing on one L2): for every
//! other Node with a `spec.podCIDR` and an IPv4 InternalIP, the main table
//! holds `PODCIDR via NODEIP proto 83`. Only proto-83 routes are touched
//! (see `skep_dataplane::podnet::routes`), so the agent never removes
//! routes it did not make.

use futures::StreamExt;
use serde_json::Value;
use skep_client::Client;
use skep_dataplane::podnet::routes::{CidrRoute, RouteSync, RouteSyncError, sync_cidr_routes};
use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

/// Node changes arriving within this window are applied together.
const BATCH: Duration = Duration::from_millis(50);
/// Routes are re-checked this often even without Node changes (someone
/// may have flushed them).
const RESYNC: Duration = Duration::from_secs(60);
const NODES: &str = "/api/v1/nodes";

/// A node's pod CIDR and where to send its traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRoute {
    pub node: String,
    pub pod_cidr: Ipv4Addr,
    pub prefix_len: u8,
    pub node_ip: Ipv4Addr,
}

/// The route for a Node object: `None` until it has an IPv4 podCIDR and an
/// IPv4 InternalIP.
pub fn node_route(node: &Value) -> Option<NodeRoute> {
    let name = node.pointer("/metadata/name")?.as_str()?.to_owned();
    let spec = node.get("spec")?;
    let cidr = spec
        .get("podCIDR")
        .and_then(Value::as_str)
        .into_iter()
        .chain(
            spec.get("podCIDRs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str),
        )
        .find_map(|c| c.parse::<crate::ipam::Ipv4Cidr>().ok())?;
    let node_ip = node
        .pointer("/status/addresses")?
        .as_array()?
        .iter()
        .filter(|a| a.get("type").and_then(Value::as_str) == Some("InternalIP"))
        .find_map(|a| a.get("address")?.as_str()?.parse::<Ipv4Addr>().ok())?;
    Some(NodeRoute {
        node: name,
        pod_cidr: cidr.addr,
        prefix_len: cidr.prefix_len,
        node_ip,
    })
}

/// Makes the main table of the calling thread's namespace hold exactly the
/// routes to the pod CIDRs of every node but `local_node`.
pub async fn sync_node_routes(
    local_node: &str,
    routes: &[NodeRoute],
) -> Result<RouteSync, RouteSyncError> {
    sync_cidr_routes(&desired(local_node, routes)).await
}

fn desired(local_node: &str, routes: &[NodeRoute]) -> Vec<CidrRoute> {
    routes
        .iter()
        .filter(|r| r.node != local_node)
        .map(|r| CidrRoute {
            cidr: r.pod_cidr,
            prefix_len: r.prefix_len,
            gateway: r.node_ip,
        })
        .collect()
}

/// Keeps the node routes equal to the Nodes in the API, until the task is
/// dropped; every API failure restarts from a full list.
pub async fn run(client: Client, local_node: String) {
    loop {
        if let Err(e) = follow(&client, &local_node).await {
            tracing::warn!(error = %e, "node route sync: watch failed; relisting");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn name_of(obj: &Value) -> String {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

async fn apply(local: &str, nodes: &BTreeMap<String, Value>) {
    let routes: Vec<NodeRoute> = nodes.values().filter_map(node_route).collect();
    if let Err(e) = sync_node_routes(local, &routes).await {
        // Retried on the next change or resync; a route that cannot be
        // made (gateway not on a connected network) must not stop the rest.
        tracing::warn!(error = %e, "node routes not fully applied");
    }
}

async fn follow(client: &Client, local: &str) -> Result<(), String> {
    let list = client.get(NODES).await.map_err(|e| e.to_string())?;
    let mut nodes: BTreeMap<String, Value> = list
        .get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|n| (name_of(n), n.clone()))
        .collect();
    let rv = list
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("0")
        .to_owned();
    apply(local, &nodes).await;
    let mut watch = client
        .watch(&format!(
            "{NODES}?resourceVersion={rv}&allowWatchBookmarks=true"
        ))
        .await
        .map_err(|e| e.to_string())?;
    let mut resync = tokio::time::interval(RESYNC);
    resync.reset();
    loop {
        let first = tokio::select! {
            e = watch.next() => Some(e),
            _ = resync.tick() => None,
        };
        let periodic = first.is_none();
        let mut events = Vec::new();
        if let Some(e) = first {
            events.push(e);
            let deadline = tokio::time::Instant::now() + BATCH;
            loop {
                tokio::select! {
                    e = watch.next() => events.push(e),
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        let before: Vec<NodeRoute> = nodes.values().filter_map(node_route).collect();
        for event in events {
            let event = match event {
                None => return Err("the API server ended the watch".into()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(ev)) => ev,
            };
            match event.kind.as_str() {
                "ADDED" | "MODIFIED" => {
                    nodes.insert(name_of(&event.object), event.object);
                }
                "DELETED" => {
                    nodes.remove(&name_of(&event.object));
                }
                "ERROR" => return Err(format!("watch error: {}", event.object)),
                _ => {}
            }
        }
        let after: Vec<NodeRoute> = nodes.values().filter_map(node_route).collect();
        // Heartbeats modify every Node every 10 s; only real changes (or
        // the periodic resync) touch the routing table.
        if periodic || before != after {
            apply(local, &nodes).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn nodes_become_routes_to_the_other_nodes() {
        let n = |name: &str, cidr: Option<&str>, ip: &str| {
            json!({"metadata": {"name": name},
                   "spec": cidr.map(|c| json!({"podCIDR": c})).unwrap_or(json!({})),
                   "status": {"addresses": [{"type": "Hostname", "address": name},
                                            {"type": "InternalIP", "address": ip}]}})
        };
        let a = node_route(&n("a", Some("10.42.1.0/24"), "10.99.0.1")).unwrap();
        assert_eq!(
            a,
            NodeRoute {
                node: "a".into(),
                pod_cidr: Ipv4Addr::new(10, 42, 1, 0),
                prefix_len: 24,
                node_ip: Ipv4Addr::new(10, 99, 0, 1)
            }
        );
        assert!(
            node_route(&n("b", None, "10.99.0.2")).is_none(),
            "no podCIDR yet"
        );
        assert!(
            node_route(&n("c", Some("10.42.3.0/24"), "fd00::3")).is_none(),
            "IPv6 only"
        );
        let v6_first = json!({"metadata": {"name": "d"},
            "spec": {"podCIDRs": ["fd00:42::/64", "10.42.4.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.99.0.4"}]}});
        assert_eq!(
            node_route(&v6_first).unwrap().pod_cidr,
            Ipv4Addr::new(10, 42, 4, 0)
        );
        let b = node_route(&n("b", Some("10.42.2.0/24"), "10.99.0.2")).unwrap();
        let want = desired("a", &[a, b]);
        assert_eq!(
            want,
            vec![CidrRoute {
                cidr: Ipv4Addr::new(10, 42, 2, 0),
                prefix_len: 24,
                gateway: Ipv4Addr::new(10, 99, 0, 2)
            }]
        );
    }
}
