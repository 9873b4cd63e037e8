//! Informers: one list + watch of a resource's storage prefix, a shared
//! in-memory cache of its objects, and change notifications to every
//! registered handler.
//!
//! The watch starts at the list's revision, so no change between the two is
//! missed; when the store answers `Compacted` (the informer fell behind the
//! history) it lists again and reports the difference as changes.

use crate::meta;
use serde_json::Value;
use skep_apiserver::{objects, resources::ResourceInfo};
use skep_store::{Event, Store, StoreError};
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};
use tokio::sync::watch;

/// One change: `old` is `None` for an addition, `new` for a deletion.
#[derive(Debug, Clone)]
pub struct Change {
    pub old: Option<Arc<Value>>,
    pub new: Option<Arc<Value>>,
}

impl Change {
    /// The newest state known (the deleted object for a deletion).
    pub fn object(&self) -> Option<&Arc<Value>> {
        self.new.as_ref().or(self.old.as_ref())
    }
}

pub type Handler = Arc<dyn Fn(&Change) + Send + Sync>;

/// Decodes a stored object for the cache without `metadata.managedFields`,
/// as client-go's informers are told to (`TransformStripManagedFields`): no
/// controller reads them, and they are often the largest part of an object
/// (every field its creator set, defaults included). Controllers' writes
/// send no managedFields, which keeps the live ones (apiserver `apply.rs`).
fn decode(kv: &skep_store::KeyValue) -> Result<Value, skep_apiserver::status::ApiError> {
    objects::from_kv_without_managed_fields(kv)
}

/// A resource's shared cache, kept current by a watch.
pub struct Informer {
    pub info: Arc<ResourceInfo>,
    cache: RwLock<BTreeMap<String, Arc<Value>>>,
    handlers: Mutex<Vec<Handler>>,
    /// The store revision the cache reflects (0 until the first list).
    revision: watch::Sender<i64>,
}

impl std::fmt::Debug for Informer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Informer")
            .field("resource", &self.info.group_resource())
            .field("revision", &*self.revision.borrow())
            .finish()
    }
}

impl Informer {
    pub fn new(info: Arc<ResourceInfo>) -> Arc<Self> {
        Arc::new(Self {
            info,
            cache: RwLock::new(BTreeMap::new()),
            handlers: Mutex::new(Vec::new()),
            revision: watch::channel(0).0,
        })
    }

    /// Registers a handler; call before [`Informer::run`] starts so it
    /// sees the initial list as additions.
    pub fn on_change(&self, h: Handler) {
        if let Ok(mut hs) = self.handlers.lock() {
            hs.push(h);
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<Value>> {
        self.cache.read().ok()?.get(key).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Value>> {
        self.cache
            .read()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Objects of one namespace (keys are `ns/name`, so a range scan).
    pub fn list_ns(&self, ns: &str) -> Vec<Arc<Value>> {
        let lo = format!("{ns}/");
        let hi = format!("{ns}0"); // '0' follows '/'
        self.cache
            .read()
            .map(|c| c.range(lo..hi).map(|(_, v)| v.clone()).collect())
            .unwrap_or_default()
    }

    pub fn revision(&self) -> i64 {
        *self.revision.borrow()
    }

    /// Waits until the cache reflects revision `rev` (a controller's own
    /// write), at most `timeout`; returns whether it does. Reading the
    /// cache after this gives read-your-writes without an API call.
    pub async fn wait_for(&self, rev: i64, timeout: Duration) -> bool {
        let mut rx = self.revision.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= rev))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits for the first list.
    pub async fn synced(&self) {
        let mut rx = self.revision.subscribe();
        let _ = rx.wait_for(|r| *r > 0).await;
    }

    fn notify(&self, change: &Change) {
        let handlers = self.handlers.lock().map(|h| h.clone()).unwrap_or_default();
        for h in handlers {
            h(change);
        }
    }

    fn cache_key(&self, store_key: &str) -> String {
        store_key
            .strip_prefix(&self.info.storage_prefix())
            .unwrap_or(store_key)
            .to_owned()
    }

    /// Lists and watches until the store goes away.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>) {
        loop {
            let rev = match self.relist(&store).await {
                Ok(rev) => rev,
                Err(e) => {
                    tracing::warn!(resource = %self.info.group_resource(), error = %e, "informer list failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            match self.follow(&store, rev).await {
                Ok(()) => return,
                Err(StoreError::Compacted { .. }) => {
                    tracing::info!(resource = %self.info.group_resource(), "watch history compacted; listing again");
                }
                Err(e) => {
                    tracing::warn!(resource = %self.info.group_resource(), error = %e, "informer watch failed; listing again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Replaces the cache by a fresh list and notifies the differences.
    async fn relist(&self, store: &Arc<dyn Store>) -> Result<i64, StoreError> {
        let prefix = self.info.storage_prefix();
        let mut fresh = BTreeMap::new();
        let rev =
            skep_store::list_each(store.as_ref(), &prefix, 1000, None, |kv| match decode(kv) {
                Ok(v) => {
                    fresh.insert(self.cache_key(&kv.key), Arc::new(v));
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping an undecodable object")
                }
            })
            .await?;
        let mut changes = Vec::new();
        if let Ok(mut cache) = self.cache.write() {
            for (k, v) in &fresh {
                match cache.get(k) {
                    Some(old) if meta::resource_version(old) == meta::resource_version(v) => {}
                    old => changes.push(Change {
                        old: old.cloned(),
                        new: Some(v.clone()),
                    }),
                }
            }
            for (k, v) in cache.iter() {
                if !fresh.contains_key(k) {
                    changes.push(Change {
                        old: Some(v.clone()),
                        new: None,
                    });
                }
            }
            *cache = fresh;
        }
        // Handlers first, then the revision: whoever waits for a revision
        // also sees what the handlers did with it.
        for c in &changes {
            self.notify(c);
        }
        self.revision.send_replace(rev.max(1));
        Ok(rev)
    }

    async fn follow(&self, store: &Arc<dyn Store>, from: i64) -> Result<(), StoreError> {
        let mut w = store.watch(&self.info.storage_prefix(), from).await?;
        while let Some(ev) = w.next().await {
            let ev = ev?;
            let rev = ev.revision();
            let key = self.cache_key(ev.key());
            let change = match &ev {
                Event::Put { kv, .. } => match decode(kv) {
                    Ok(v) => {
                        let new = Arc::new(v);
                        let old = self
                            .cache
                            .write()
                            .ok()
                            .and_then(|mut c| c.insert(key, new.clone()));
                        Some(Change {
                            old,
                            new: Some(new),
                        })
                    }
                    Err(e) => {
                        tracing::warn!(key = %ev.key(), error = %e, "skipping an undecodable object");
                        None
                    }
                },
                Event::Delete { .. } => self
                    .cache
                    .write()
                    .ok()
                    .and_then(|mut c| c.remove(&key))
                    .map(|old| Change {
                        old: Some(old),
                        new: None,
                    }),
            };
            if let Some(c) = change {
                self.notify(&c);
            }
            self.revision.send_replace(rev);
        }
        Ok(())
    }
}

/// The informers of one controller manager, one per resource, shared by
/// every controller that needs it.
#[derive(Debug, Default)]
pub struct Informers {
    by_resource: Mutex<BTreeMap<String, Arc<Informer>>>,
}

impl Informers {
    pub fn get_or_create(&self, info: Arc<ResourceInfo>) -> Arc<Informer> {
        let k = info.storage_prefix();
        match self.by_resource.lock() {
            Ok(mut m) => m.entry(k).or_insert_with(|| Informer::new(info)).clone(),
            Err(_) => Informer::new(info),
        }
    }

    pub fn all(&self) -> Vec<Arc<Informer>> {
        self.by_resource
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}
