//! Feeds the proxy from the API: one list+watch per kind (Ingresses,
//! IngressClasses, Services, EndpointSlices, Secrets of type
//! `kubernetes.io/tls`) keeps a cache; after each burst of events
//! (20 ms) a new routing snapshot is built and swapped in. A failed or
//! ended watch relists that kind; the proxy keeps serving the last table
//! meanwhile.

use crate::{
    proxy::Proxy,
    routes::{self, BuildContext, Objects},
    tls::CertCache,
};
use futures::StreamExt;
use serde_json::Value;
use skep_client::Client;
use std::{collections::BTreeMap, sync::Arc, time::Duration};
use tokio::sync::mpsc;

const BATCH: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ingress,
    Class,
    Service,
    Slice,
    Secret,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Ingress,
        Kind::Class,
        Kind::Service,
        Kind::Slice,
        Kind::Secret,
    ];

    fn path(self) -> &'static str {
        match self {
            Kind::Ingress => "/apis/networking.k8s.io/v1/ingresses",
            Kind::Class => "/apis/networking.k8s.io/v1/ingressclasses",
            Kind::Service => "/api/v1/services",
            Kind::Slice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Secret => "/api/v1/secrets",
        }
    }

    fn map(self, o: &mut Objects) -> &mut BTreeMap<String, Value> {
        match self {
            Kind::Ingress => &mut o.ingresses,
            Kind::Class => &mut o.classes,
            Kind::Service => &mut o.services,
            Kind::Slice => &mut o.slices,
            Kind::Secret => &mut o.secrets,
        }
    }
}

/// What a reflector reports about its kind.
#[derive(Debug)]
pub(crate) enum Change {
    /// A full list: replaces everything of the kind.
    Replace(Vec<Value>),
    /// ADDED or MODIFIED.
    Upsert(Value),
    Deleted(Value),
}

type Update = (Kind, Change);

/// Only TLS Secrets matter; the others are not kept in memory.
fn keep(kind: Kind, obj: &Value) -> bool {
    kind != Kind::Secret || obj.get("type").and_then(Value::as_str) == Some("kubernetes.io/tls")
}

/// List+watch of `path` until `tx` closes, relisting when a watch fails
/// or ends; objects `keep` refuses are reported as deleted (an object
/// that stops qualifying leaves the cache). Shared by the proxy's feed
/// and the status writer.
pub(crate) async fn reflect<T: Copy + std::fmt::Debug>(
    client: Client,
    path: &'static str,
    keep: impl Fn(&Value) -> bool,
    tag: T,
    tx: mpsc::Sender<(T, Change)>,
) {
    loop {
        if let Err(e) = reflect_once(&client, path, &keep, tag, &tx).await {
            if tx.is_closed() {
                return;
            }
            tracing::debug!(kind = ?tag, error = %e, "ingress watch ended; relisting");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn reflect_once<T: Copy>(
    client: &Client,
    path: &str,
    keep: &impl Fn(&Value) -> bool,
    tag: T,
    tx: &mpsc::Sender<(T, Change)>,
) -> Result<(), String> {
    let list = client.get(path).await.map_err(|e| e.to_string())?;
    let rv = list
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("0")
        .to_owned();
    let items: Vec<Value> = list
        .get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|o| keep(o))
        .cloned()
        .collect();
    tx.send((tag, Change::Replace(items)))
        .await
        .map_err(|_| "the receiver stopped".to_string())?;
    let mut stream = client
        .watch(&format!(
            "{path}?resourceVersion={rv}&allowWatchBookmarks=true"
        ))
        .await
        .map_err(|e| e.to_string())?;
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(|e| e.to_string())?;
        match ev.kind.as_str() {
            "ADDED" | "MODIFIED" | "DELETED" => {
                // A Secret whose type changed away from TLS is a delete.
                let change = if ev.kind == "DELETED" || !keep(&ev.object) {
                    Change::Deleted(ev.object)
                } else {
                    Change::Upsert(ev.object)
                };
                tx.send((tag, change))
                    .await
                    .map_err(|_| "the receiver stopped".to_string())?;
            }
            "ERROR" => return Err(format!("watch error: {}", ev.object)),
            _ => {}
        }
    }
    Err("the API server ended the watch".into())
}

/// Applies a reflector's change to a cache keyed `namespace/name`;
/// true for a full list.
pub(crate) fn apply_change(map: &mut BTreeMap<String, Value>, change: Change) -> bool {
    match change {
        Change::Replace(items) => {
            map.clear();
            for o in items {
                map.insert(routes::key(&o), o);
            }
            true
        }
        Change::Upsert(obj) => {
            map.insert(routes::key(&obj), obj);
            false
        }
        Change::Deleted(obj) => {
            map.remove(&routes::key(&obj));
            false
        }
    }
}

fn apply(objs: &mut Objects, listed: &mut [bool; 5], (kind, change): Update) {
    if apply_change(kind.map(objs), change)
        && let Some(i) = Kind::ALL.iter().position(|k| *k == kind)
    {
        listed[i] = true;
    }
}

/// Keeps `proxy` routed from the API until the task is dropped.
pub async fn run(client: Client, proxy: Arc<Proxy>) {
    let (tx, mut rx) = mpsc::channel(1024);
    let reflectors: Vec<_> = Kind::ALL
        .iter()
        .map(|k| {
            let kind = *k;
            tokio::spawn(reflect(
                client.clone(),
                kind.path(),
                move |o: &Value| keep(kind, o),
                kind,
                tx.clone(),
            ))
        })
        .collect();
    drop(tx);
    let mut objs = Objects::default();
    let mut listed = [false; 5];
    let mut certs = CertCache::default();
    let mut last_ingresses = Vec::new();
    while let Some(first) = rx.recv().await {
        apply(&mut objs, &mut listed, first);
        let deadline = tokio::time::Instant::now() + BATCH;
        while let Ok(Some(up)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            apply(&mut objs, &mut listed, up);
        }
        // A table from a partial view (Ingresses but no Services yet)
        // would answer 503s that are not true.
        if !listed.iter().all(|l| *l) {
            continue;
        }
        let snap = routes::build(
            &objs,
            BuildContext {
                registry: &proxy.registry,
                certs: &mut certs,
            },
        );
        if snap.ingresses != last_ingresses {
            tracing::info!(ingresses = ?snap.ingresses, "ingress routes updated");
            last_ingresses = snap.ingresses.clone();
        }
        proxy.update(snap);
    }
    for r in reflectors {
        r.abort();
    }
}
