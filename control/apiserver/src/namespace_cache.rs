//! Namespaces known to accept new objects, kept current by a store watch,
//! so a create does not read its namespace from the store (upstream's
//! NamespaceLifecycle admission reads an informer likewise). Every pod
//! create, and the event the scheduler writes for it, asked the store
//! before; under 16 concurrent creates that was two of the five store
//! round trips a pod cost.
//!
//! The cache only ever answers "yes, active"; anything else (unknown,
//! terminating, the watch not running) makes the caller read the store,
//! which stays the authority. A namespace this server writes is not
//! trusted again until the watch has delivered that write, so this
//! server never admits into a namespace it has just marked for deletion.
//! A deletion made through another server (etcd HA) is seen when its
//! watch event arrives, milliseconds later, as with upstream's informer;
//! the namespace controller removes anything created in that window.

use crate::objects;
use serde_json::Value;
use skep_store::{Event, Store, StoreError};
use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

const PREFIX: &str = "/registry/namespaces/";
/// Pause before listing again after the watch failed.
const RETRY: Duration = Duration::from_millis(200);

#[derive(Debug, Default)]
pub struct NamespaceCache {
    started: AtomicBool,
    state: RwLock<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Active namespaces and the revision they were last seen at.
    active: HashMap<String, i64>,
    /// Namespaces this server wrote, with the revision the cache must
    /// reach for them before it is trusted again.
    pending: HashMap<String, i64>,
}

impl NamespaceCache {
    /// True only when `ns` is known to exist and not to be terminating.
    /// Starts the watch on first use.
    pub fn accepts(self: &Arc<Self>, store: &Arc<dyn Store>, ns: &str) -> bool {
        if !self.started.swap(true, Ordering::AcqRel) {
            tokio::spawn(run(Arc::downgrade(self), store.clone()));
        }
        let Ok(s) = self.state.read() else {
            return false;
        };
        match s.active.get(ns) {
            Some(seen) => s.pending.get(ns).is_none_or(|want| seen >= want),
            None => false,
        }
    }

    /// This server wrote namespace `ns` at `revision`: until the watch has
    /// delivered that write, answers about it come from the store.
    pub fn wrote(&self, ns: &str, revision: i64) {
        if let Ok(mut s) = self.state.write() {
            let want = s.pending.entry(ns.to_owned()).or_default();
            *want = (*want).max(revision);
        }
    }

    fn apply(&self, ev: &Event) {
        let Ok(mut s) = self.state.write() else {
            return;
        };
        let (name, revision) = match ev {
            Event::Put { kv, .. } => {
                let name = kv.key.strip_prefix(PREFIX).unwrap_or(&kv.key).to_owned();
                match objects::from_kv(kv) {
                    Ok(obj) if is_active(&obj) => {
                        s.active.insert(name.clone(), kv.mod_revision);
                    }
                    _ => {
                        s.active.remove(&name);
                    }
                }
                (name, kv.mod_revision)
            }
            Event::Delete { key, revision, .. } => {
                let name = key.strip_prefix(PREFIX).unwrap_or(key).to_owned();
                s.active.remove(&name);
                (name, *revision)
            }
        };
        if s.pending.get(&name).is_some_and(|want| revision >= *want) {
            s.pending.remove(&name);
        }
    }

    /// Forgets every namespace (the watch stopped: nothing is known).
    fn clear(&self) {
        if let Ok(mut s) = self.state.write() {
            s.active.clear();
        }
    }
}

fn is_active(ns: &Value) -> bool {
    ns.pointer("/metadata/deletionTimestamp")
        .is_none_or(Value::is_null)
        && ns.pointer("/status/phase").and_then(Value::as_str) != Some("Terminating")
}

/// Lists, then follows the watch; starts over after an error, and ends
/// when the cache is dropped.
async fn run(cache: Weak<NamespaceCache>, store: Arc<dyn Store>) {
    loop {
        match follow(&cache, &store).await {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(error = %e, "namespace cache watch ended; listing again");
                match cache.upgrade() {
                    Some(c) => c.clear(),
                    None => return,
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// `Ok` when the cache is gone; `Err` when the store failed.
async fn follow(cache: &Weak<NamespaceCache>, store: &Arc<dyn Store>) -> Result<(), StoreError> {
    let mut active = HashMap::new();
    let listed_at = skep_store::list_each(store.as_ref(), PREFIX, 1000, None, |kv| {
        if let Ok(obj) = objects::from_kv(kv)
            && is_active(&obj)
        {
            let name = kv.key.strip_prefix(PREFIX).unwrap_or(&kv.key);
            active.insert(name.to_owned(), kv.mod_revision);
        }
    })
    .await?;
    {
        let Some(c) = cache.upgrade() else {
            return Ok(());
        };
        if let Ok(mut s) = c.state.write() {
            s.active = active;
            s.pending.retain(|_, want| *want > listed_at);
        }
    }
    let mut watch = store.watch(PREFIX, listed_at).await?;
    while let Some(ev) = watch.next().await {
        let ev = ev?;
        let Some(c) = cache.upgrade() else {
            return Ok(());
        };
        c.apply(&ev);
    }
    Err(StoreError::Closed)
}
