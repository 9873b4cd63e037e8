//! The recent flows of this node: a ring of the last [`RING_CAPACITY`]
//! for history queries, and a broadcast of new ones for followers.

use super::proto;
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};
use tokio::sync::broadcast;

/// How many flows a node keeps for history queries (Hubble's default
/// ring is 4095; flows are small, and `--since` wants more).
pub const RING_CAPACITY: usize = 8192;

/// How far a follower may fall behind before it misses flows.
const LIVE_BUFFER: usize = 4096;

/// Shared between the ingest loop and every request.
#[derive(Debug)]
pub struct FlowStore {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    ring: VecDeque<Arc<proto::Flow>>,
    live: broadcast::Sender<Arc<proto::Flow>>,
}

impl Default for FlowStore {
    fn default() -> Self {
        Self::new()
    }
}

impl FlowStore {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                ring: VecDeque::with_capacity(RING_CAPACITY),
                live: broadcast::channel(LIVE_BUFFER).0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The lock guards plain data; a panic elsewhere cannot leave it
        // half-updated, so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends a flow (dropping the oldest when full) and hands it to the
    /// followers.
    pub fn push(&self, flow: proto::Flow) {
        let flow = Arc::new(flow);
        let mut inner = self.lock();
        if inner.ring.len() == RING_CAPACITY {
            inner.ring.pop_front();
        }
        inner.ring.push_back(flow.clone());
        // No follower: nothing to do.
        let _ = inner.live.send(flow);
    }

    /// The history, oldest first.
    pub fn history(&self) -> Vec<Arc<proto::Flow>> {
        self.lock().ring.iter().cloned().collect()
    }

    /// The history and a subscription to every flow pushed after it, taken
    /// under one lock so that no flow is missed or seen twice.
    pub fn history_and_follow(
        &self,
    ) -> (Vec<Arc<proto::Flow>>, broadcast::Receiver<Arc<proto::Flow>>) {
        let inner = self.lock();
        (inner.ring.iter().cloned().collect(), inner.live.subscribe())
    }

    pub fn len(&self) -> usize {
        self.lock().ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(n: i64) -> proto::Flow {
        proto::Flow {
            time_unix_nanos: n,
            ..Default::default()
        }
    }

    #[test]
    fn the_ring_keeps_the_newest() {
        let store = FlowStore::new();
        for n in 0..(RING_CAPACITY as i64 + 10) {
            store.push(flow(n));
        }
        let h = store.history();
        assert_eq!(h.len(), RING_CAPACITY);
        assert_eq!(h[0].time_unix_nanos, 10);
        assert_eq!(
            h[RING_CAPACITY - 1].time_unix_nanos,
            RING_CAPACITY as i64 + 9
        );
    }

    #[tokio::test]
    async fn followers_get_what_comes_after_their_history() {
        let store = FlowStore::new();
        store.push(flow(1));
        let (h, mut rx) = store.history_and_follow();
        store.push(flow(2));
        assert_eq!(h.len(), 1);
        assert_eq!(rx.recv().await.ok().map(|f| f.time_unix_nanos), Some(2));
    }
}
