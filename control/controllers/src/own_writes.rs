//! Read-your-own-writes for controllers (upstream's "expectations"): the
//! newest revision a key's reconcile wrote. The next reconcile of that key
//! first waits until the informer cache has caught up with it, so it never
//! acts on a state older than its own writes (and, say, creates a pod twice).

use crate::{
    client::{Client, PODS},
    error::Result,
    informer::Informer,
    meta,
};
use serde_json::Value;
use std::{collections::HashMap, sync::Mutex, time::Duration};

/// How long a reconcile waits for the cache before going on anyway (the
/// write may have been superseded or the watch may be relisting).
const CATCH_UP: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct OwnWrites {
    written: Mutex<HashMap<String, i64>>,
}

impl OwnWrites {
    /// Records that reconciling `key` wrote revision `rev`.
    pub fn note(&self, key: &str, rev: i64) {
        if let Ok(mut w) = self.written.lock() {
            let e = w.entry(key.to_owned()).or_insert(0);
            *e = (*e).max(rev);
        }
    }

    /// Waits until `cache` has seen this key's last write.
    pub async fn catch_up(&self, key: &str, cache: &Informer) {
        let rev = self
            .written
            .lock()
            .ok()
            .and_then(|w| w.get(key).copied())
            .unwrap_or(0);
        if rev > 0 {
            cache.wait_for(rev, CATCH_UP).await;
        }
    }

    /// The start of a reconcile of `key`: waits until `cache` (where this
    /// key's writes go) has seen them, then reads the object from
    /// `objects`. `None` when it is gone, and what was known about the key
    /// is dropped with it.
    pub async fn current(
        &self,
        key: &str,
        cache: &Informer,
        objects: &Informer,
    ) -> Option<std::sync::Arc<Value>> {
        self.catch_up(key, cache).await;
        let o = objects.get(key);
        if o.is_none() {
            self.forget(key);
        }
        o
    }

    /// Deletes `pod` (only that incarnation: uid precondition) on behalf of
    /// `key`, remembering the write; a pod already gone is fine.
    pub async fn delete_pod(&self, client: &Client, key: &str, pod: &Value) -> Result<()> {
        match client
            .delete(
                PODS,
                meta::namespace(pod),
                meta::name(pod),
                Some(meta::uid(pod)),
            )
            .await
        {
            Ok(out) => {
                self.note(key, meta::resource_version(&out));
                Ok(())
            }
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Drops what is known about a key whose object is gone.
    pub fn forget(&self, key: &str) {
        if let Ok(mut w) = self.written.lock() {
            w.remove(key);
        }
    }
}
