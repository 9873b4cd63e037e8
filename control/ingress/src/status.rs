//! `status.loadBalancer.ingress` of skep's Ingresses: the addresses of
//! the nodes whose proxy is serving (Node annotation
//! [`crate::PORTS_ANNOTATION`]; ExternalIP when a node has one, else
//! InternalIP). One writer, in the server (with the admin's credentials:
//! nodes may read Ingresses but not write their status); it re-checks
//! every few seconds and writes only what differs.

use crate::routes::{self, is_ours};
use serde_json::{Value, json};
use skep_client::Client;
use std::{collections::BTreeMap, time::Duration};

const PERIOD: Duration = Duration::from_secs(3);

fn items(list: &Value) -> impl Iterator<Item = &Value> {
    list.get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The addresses of the nodes that serve Ingress traffic, sorted.
pub fn node_addresses(nodes: &Value) -> Vec<String> {
    let mut out: Vec<String> = items(nodes)
        .filter(|n| {
            n.pointer("/metadata/annotations/ingress.skep.io~1ports")
                .and_then(Value::as_str)
                .is_some_and(|v| !v.is_empty())
        })
        .filter_map(|n| {
            let addrs = n.pointer("/status/addresses")?.as_array()?;
            let of = |t: &str| {
                addrs
                    .iter()
                    .find(|a| a.get("type").and_then(Value::as_str) == Some(t))
                    .and_then(|a| a.get("address").and_then(Value::as_str))
            };
            of("ExternalIP")
                .or_else(|| of("InternalIP"))
                .map(str::to_owned)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

async fn sync_once(client: &Client) -> Result<(), skep_client::ClientError> {
    let nodes = client.get("/api/v1/nodes").await?;
    let ingresses = client.get("/apis/networking.k8s.io/v1/ingresses").await?;
    let classes_list = client
        .get("/apis/networking.k8s.io/v1/ingressclasses")
        .await?;
    let classes: BTreeMap<String, Value> = items(&classes_list)
        .map(|c| (routes::key(c), c.clone()))
        .collect();
    let addresses = node_addresses(&nodes);
    let desired: Vec<Value> = addresses.iter().map(|ip| json!({"ip": ip})).collect();
    for ing in items(&ingresses).filter(|i| is_ours(i, &classes)) {
        let current = ing
            .pointer("/status/loadBalancer/ingress")
            .cloned()
            .unwrap_or(Value::Null);
        let want = if desired.is_empty() {
            Value::Null
        } else {
            Value::Array(desired.clone())
        };
        let same =
            current == want || (want.is_null() && current.as_array().is_some_and(Vec::is_empty));
        if same {
            continue;
        }
        let ns = ing
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let name = ing
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let path = format!("/apis/networking.k8s.io/v1/namespaces/{ns}/ingresses/{name}/status");
        let patch = json!({"status": {"loadBalancer": {"ingress": want}}});
        match client.merge_patch(&path, &patch).await {
            Ok(_) => {
                tracing::info!(ingress = %format!("{ns}/{name}"), addresses = ?addresses, "ingress status updated")
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Keeps the status of skep's Ingresses current (server side).
pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = sync_once(&client).await {
                tracing::debug!(error = %e, "ingress status pass failed; retrying");
            }
            tokio::time::sleep(PERIOD).await;
        }
    })
}
