//! Periodic compaction, as kube-apiserver does it: every interval, compact
//! to the revision that was current one interval ago. History therefore
//! covers at least one interval, which is how long a watcher may lag or a
//! paginated list may take before it gets "410 Gone".

use crate::{Revision, Store};
use std::{sync::Arc, time::Duration};
use tokio::task::JoinHandle;

/// A running compaction loop; dropping it stops the loop.
#[derive(Debug)]
pub struct Compactor {
    task: JoinHandle<()>,
}

impl Compactor {
    /// Starts compacting `store` every `interval` (kube-apiserver's default
    /// is 5 minutes).
    pub fn spawn(store: Arc<dyn Store>, interval: Duration) -> Self {
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut previous: Option<Revision> = None;
            loop {
                ticker.tick().await;
                let current = match store.revision().await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "compaction: cannot read the revision");
                        continue;
                    }
                };
                if let Some(target) = previous.filter(|&r| r > 0) {
                    match store.compact(target).await {
                        Ok(()) => tracing::debug!(revision = target, "store compacted"),
                        Err(e) => {
                            tracing::warn!(revision = target, error = %e, "compaction failed")
                        }
                    }
                }
                previous = Some(current);
            }
        });
        Self { task }
    }
}

impl Drop for Compactor {
    fn drop(&mut self) {
        self.task.abort();
    }
}
