//! `status.loadBalancer.ingress` of skep's Ingresses: the addresses of
//! the nodes whose proxy is serving (Node annotation
//! [`crate::PORTS_ANNOTATION`]; ExternalIP when a node has one, else
//! InternalIP). One writer, in the server (with the admin's credentials:
//! nodes may read Ingresses but not write their status). It is driven by
//! list+watch of Nodes, Ingresses and IngressClasses (the same reflectors
//! as the proxy's feed, [`crate::watch`]): after each burst of events the
//! cached Ingresses are compared with the node addresses and only what
//! differs is written, so a new Ingress gets its status within a watch
//! round-trip. A failed write is retried after [`RETRY`]; a backstop pass
//! runs every [`BACKSTOP`] regardless.

use crate::{
    routes::is_ours,
    watch::{Change, apply_change, reflect},
};
use serde_json::{Value, json};
use skep_client::Client;
use std::{collections::BTreeMap, time::Duration};
use tokio::{sync::mpsc, time::Instant};

/// Events closer than this are handled together.
const BATCH: Duration = Duration::from_millis(20);
/// A pass whose writes failed is repeated after this.
const RETRY: Duration = Duration::from_secs(1);
/// Every this long the cache is checked again even without events.
const BACKSTOP: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Node,
    Ingress,
    Class,
}

fn items(list: &Value) -> impl Iterator<Item = &Value> {
    list.get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The addresses of the nodes that serve Ingress traffic, sorted.
pub fn node_addresses(nodes: &Value) -> Vec<String> {
    addresses_of(items(nodes))
}

fn addresses_of<'a>(nodes: impl Iterator<Item = &'a Value>) -> Vec<String> {
    let mut out: Vec<String> = nodes
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

/// What the writer knows, keyed `namespace/name`.
#[derive(Debug, Default)]
struct Cache {
    nodes: BTreeMap<String, Value>,
    ingresses: BTreeMap<String, Value>,
    classes: BTreeMap<String, Value>,
    /// Which kinds have had their first full list.
    listed: [bool; 3],
}

impl Cache {
    fn apply(&mut self, (kind, change): (Kind, Change)) {
        let (map, i) = match kind {
            Kind::Node => (&mut self.nodes, 0),
            Kind::Ingress => (&mut self.ingresses, 1),
            Kind::Class => (&mut self.classes, 2),
        };
        if apply_change(map, change) {
            self.listed[i] = true;
        }
    }
}

/// Writes the status of every cached Ingress of skep's whose addresses
/// differ; a written Ingress is replaced in the cache by the API's
/// answer, so it is not written again before its watch event arrives.
async fn sync(client: &Client, cache: &mut Cache) -> Result<(), skep_client::ClientError> {
    let addresses = addresses_of(cache.nodes.values());
    let want = if addresses.is_empty() {
        Value::Null
    } else {
        Value::Array(addresses.iter().map(|ip| json!({"ip": ip})).collect())
    };
    let mut stale = Vec::new();
    for (key, ing) in &cache.ingresses {
        if !is_ours(ing, &cache.classes) {
            continue;
        }
        let current = ing
            .pointer("/status/loadBalancer/ingress")
            .unwrap_or(&Value::Null);
        let same =
            *current == want || (want.is_null() && current.as_array().is_some_and(Vec::is_empty));
        if !same {
            stale.push(key.clone());
        }
    }
    let mut result = Ok(());
    for key in stale {
        let (ns, name) = key.split_once('/').unwrap_or(("default", &key));
        let path = format!("/apis/networking.k8s.io/v1/namespaces/{ns}/ingresses/{name}/status");
        let patch = json!({"status": {"loadBalancer": {"ingress": want}}});
        match client.merge_patch(&path, &patch).await {
            Ok(updated) => {
                tracing::info!(ingress = %key, addresses = ?addresses, "ingress status updated");
                if updated.pointer("/metadata/name").is_some() {
                    cache.ingresses.insert(key, updated);
                }
            }
            // Deleted meanwhile: its watch event follows.
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                tracing::debug!(ingress = %key, error = %e, "ingress status write failed; retrying");
                result = Err(e);
            }
        }
    }
    result
}

/// Keeps the status of skep's Ingresses current (server side).
pub fn spawn(client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (tx, mut rx) = mpsc::channel(1024);
        let reflectors: Vec<_> = [
            (Kind::Node, "/api/v1/nodes"),
            (Kind::Ingress, "/apis/networking.k8s.io/v1/ingresses"),
            (Kind::Class, "/apis/networking.k8s.io/v1/ingressclasses"),
        ]
        .into_iter()
        .map(|(kind, path)| {
            tokio::spawn(reflect(
                client.clone(),
                path,
                |_: &Value| true,
                kind,
                tx.clone(),
            ))
        })
        .collect();
        drop(tx);
        let mut cache = Cache::default();
        let mut next_pass = Instant::now() + BACKSTOP;
        loop {
            tokio::select! {
                up = rx.recv() => {
                    let Some(up) = up else { break };
                    cache.apply(up);
                    let deadline = Instant::now() + BATCH;
                    while let Ok(Some(up)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                        cache.apply(up);
                    }
                }
                () = tokio::time::sleep_until(next_pass) => {}
            }
            // A pass from a partial view (Ingresses but no Nodes yet)
            // would clear addresses that are right.
            if !cache.listed.iter().all(|l| *l) {
                next_pass = Instant::now() + BACKSTOP;
                continue;
            }
            next_pass = match sync(&client, &mut cache).await {
                Ok(()) => Instant::now() + BACKSTOP,
                Err(_) => Instant::now() + RETRY,
            };
        }
        for r in reflectors {
            r.abort();
        }
    })
}
