//! Drives a reconcile function over a work queue with a few workers.

use crate::{error::Error, queue::Queue};
use std::{sync::Arc, time::Duration};

/// What a reconcile asks for after success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Requeue {
    #[default]
    No,
    /// Look again later (time-based conditions: minReadySeconds,
    /// deadlines), even without a change.
    After(Duration),
}

/// A level-triggered control loop: `reconcile(key)` converges the object
/// named `key` to its desired state, whatever the events that led there.
#[async_trait::async_trait]
pub trait Reconciler: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    async fn reconcile(&self, key: &str) -> Result<Requeue, Error>;
}

/// Runs `workers` tasks taking keys from `queue`.
pub fn spawn<R: Reconciler>(
    r: Arc<R>,
    queue: Arc<Queue>,
    workers: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers.max(1))
        .map(|_| {
            let r = r.clone();
            let queue = queue.clone();
            tokio::spawn(async move {
                loop {
                    let key = queue.get().await;
                    match r.reconcile(&key).await {
                        Ok(requeue) => {
                            queue.forget(&key);
                            if let Requeue::After(d) = requeue {
                                queue.add_after(key.clone(), d);
                            }
                        }
                        Err(e) => {
                            // Conflicts are expected (someone wrote first):
                            // not worth a warning.
                            if e.is_conflict() || queue.failures(&key) < 3 {
                                tracing::debug!(controller = r.name(), %key, error = %e, "reconcile failed; retrying");
                            } else {
                                tracing::warn!(controller = r.name(), %key, error = %e, "reconcile failed; retrying");
                            }
                            queue.add_rate_limited(&key);
                        }
                    }
                    queue.done(&key);
                }
            })
        })
        .collect()
}
