//! Feeds the snapshot from the store: list Services, EndpointSlices and Pods
//! at one revision, then watch all three from there. A watch that reports
//! `Compacted` (or fails any other way) starts over with a fresh list.

use crate::{
    metrics::Metrics,
    model::{self, Pod, Service, Slice, Snapshot},
};
use arc_swap::ArcSwapOption;
use serde_json::Value;
use skep_store::{Event, KeyValue, Revision, Store, StoreError};
use std::{collections::HashMap, sync::Arc, time::Duration};
use tokio::sync::mpsc;

pub(crate) const SERVICES: &str = "/registry/services/";
pub(crate) const SLICES: &str = "/registry/discovery.k8s.io/endpointslices/";
pub(crate) const PODS: &str = "/registry/pods/";

/// Changes arriving within this window after a first one are applied in the
/// same rebuild, so a burst of writes costs one rebuild, not one per write.
const COALESCE: Duration = Duration::from_millis(20);
/// A rebuild happens at the latest this long after the first pending change,
/// even while changes keep arriving.
const MAX_DELAY: Duration = Duration::from_millis(200);
const RETRY: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Objects {
    services: HashMap<String, Service>,
    slices: HashMap<String, Slice>,
    pods: HashMap<String, Pod>,
}

impl Objects {
    /// Records the object at `key`; true when what DNS sees of it changed
    /// (most writes, such as pod status updates, change nothing DNS uses,
    /// and then cost no rebuild).
    fn apply_value(&mut self, key: &str, value: &[u8]) -> bool {
        let v: Value = match serde_json::from_slice(value) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(key, error = %e, "stored object is not JSON; ignored by DNS");
                return false;
            }
        };
        fn set<T: PartialEq>(map: &mut HashMap<String, T>, key: &str, new: Option<T>) -> bool {
            match new {
                Some(n) => {
                    if map.get(key) == Some(&n) {
                        return false;
                    }
                    map.insert(key.to_owned(), n);
                    true
                }
                None => map.remove(key).is_some(),
            }
        }
        if key.starts_with(SERVICES) {
            set(&mut self.services, key, Service::parse(&v))
        } else if key.starts_with(SLICES) {
            set(&mut self.slices, key, Slice::parse(&v))
        } else if key.starts_with(PODS) {
            set(&mut self.pods, key, Pod::parse(&v))
        } else {
            false
        }
    }

    fn remove(&mut self, key: &str) -> bool {
        let a = self.services.remove(key).is_some();
        let b = self.slices.remove(key).is_some();
        let c = self.pods.remove(key).is_some();
        a || b || c
    }

    fn snapshot(&self, zone: &str, revision: Revision) -> Snapshot {
        model::build(
            zone,
            revision,
            self.services.values(),
            self.slices.values(),
            self.pods.values(),
        )
    }
}

/// Runs until the store shuts down (a watch ends without error).
pub(crate) async fn run(
    store: Arc<dyn Store>,
    zone: String,
    target: Arc<ArcSwapOption<Snapshot>>,
    metrics: Arc<Metrics>,
) {
    let publish = Publish {
        zone: &zone,
        target: &target,
        metrics: &metrics,
    };
    loop {
        match sync_and_follow(&store, &publish).await {
            Ok(()) => {
                tracing::info!("store closed; DNS feed stops");
                return;
            }
            Err(StoreError::Compacted { .. }) => {
                tracing::info!("DNS watch fell behind a compaction; listing again");
            }
            Err(e) => {
                tracing::warn!(error = %e, "DNS feed from the store failed; retrying");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

async fn list_all(
    store: &Arc<dyn Store>,
    prefix: &str,
    revision: Option<Revision>,
) -> Result<(Vec<KeyValue>, Revision), StoreError> {
    let mut items = Vec::new();
    let rev = skep_store::list_each(store.as_ref(), prefix, 1000, revision, |kv| {
        items.push(kv.clone())
    })
    .await?;
    Ok((items, rev))
}

/// Where a new snapshot goes: the served slot, and the gauges describing it.
struct Publish<'a> {
    zone: &'a str,
    target: &'a ArcSwapOption<Snapshot>,
    metrics: &'a Metrics,
}

impl Publish<'_> {
    fn swap(&self, objects: &Objects, revision: Revision) {
        let snap = objects.snapshot(self.zone, revision);
        self.metrics
            .snapshot(objects.services.len(), snap.nodes.len(), revision);
        self.target.store(Some(Arc::new(snap)));
    }
}

async fn sync_and_follow(store: &Arc<dyn Store>, publish: &Publish<'_>) -> Result<(), StoreError> {
    let mut objects = Objects::default();
    // All three lists at one revision, so the first snapshot is consistent.
    let (svcs, rev) = list_all(store, SERVICES, None).await?;
    let (slices, _) = list_all(store, SLICES, Some(rev)).await?;
    let (pods, _) = list_all(store, PODS, Some(rev)).await?;
    for kv in svcs.iter().chain(&slices).chain(&pods) {
        objects.apply_value(&kv.key, &kv.value);
    }
    publish.swap(&objects, rev);
    tracing::info!(
        revision = rev,
        services = objects.services.len(),
        "DNS snapshot synced"
    );

    let (tx, mut rx) = mpsc::channel::<Result<Event, StoreError>>(1024);
    let mut forwarders = tokio::task::JoinSet::new();
    for prefix in [SERVICES, SLICES, PODS] {
        let mut watch = store.watch(prefix, rev).await?;
        let tx = tx.clone();
        forwarders.spawn(async move {
            while let Some(ev) = watch.next().await {
                let failed = ev.is_err();
                if tx.send(ev).await.is_err() || failed {
                    return;
                }
            }
        });
    }
    drop(tx);

    let mut revision = rev;
    while let Some(first) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + MAX_DELAY;
        let mut next = Some(first);
        let mut changed = false;
        while let Some(ev) = next.take() {
            let ev = ev?;
            revision = revision.max(ev.revision());
            changed |= match ev {
                Event::Put { kv, .. } => objects.apply_value(&kv.key, &kv.value),
                Event::Delete { key, .. } => objects.remove(&key),
            };
            let wait =
                COALESCE.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            if wait.is_zero() {
                break;
            }
            if let Ok(Some(ev)) = tokio::time::timeout(wait, rx.recv()).await {
                next = Some(ev);
            }
        }
        if changed {
            publish.swap(&objects, revision);
            tracing::debug!(revision, "DNS snapshot swapped");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn only_changes_dns_uses_cause_a_rebuild() {
        let mut o = Objects::default();
        let key = "/registry/pods/default/p";
        let mut pod = json!({"metadata": {"name": "p", "namespace": "default"},
            "spec": {}, "status": {"phase": "Pending", "podIP": "10.42.0.9"}});
        assert!(o.apply_value(key, &serde_json::to_vec(&pod).unwrap()));
        pod["status"]["phase"] = json!("Running");
        assert!(!o.apply_value(key, &serde_json::to_vec(&pod).unwrap()));
        pod["status"]["podIP"] = json!("10.42.0.10");
        assert!(o.apply_value(key, &serde_json::to_vec(&pod).unwrap()));
        assert!(o.remove(key));
        assert!(!o.remove(key));
    }
}
