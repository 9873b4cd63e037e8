//! A work queue of object keys, as client-go's: a key is queued at most
//! once, is never processed by two workers at a time (a key added while it
//! is processed is queued again when the worker is done), and failures are
//! retried with per-key exponential backoff.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::Notify;

const BASE_DELAY: Duration = Duration::from_millis(5);
const MAX_DELAY: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<String>,
    /// Queued or waiting to be queued again after processing.
    dirty: HashSet<String>,
    processing: HashSet<String>,
    failures: HashMap<String, u32>,
}

#[derive(Debug, Default)]
pub struct Queue {
    state: Mutex<State>,
    notify: Notify,
}

impl Queue {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn add(&self, key: impl Into<String>) {
        let key = key.into();
        let Ok(mut s) = self.state.lock() else { return };
        if !s.dirty.insert(key.clone()) {
            return;
        }
        if !s.processing.contains(&key) {
            s.queue.push_back(key);
            drop(s);
            self.notify.notify_one();
        }
    }

    pub fn add_after(self: &Arc<Self>, key: impl Into<String>, delay: Duration) {
        let key = key.into();
        if delay.is_zero() {
            self.add(key);
            return;
        }
        let q = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            q.add(key);
        });
    }

    /// Re-queues a failed key after its backoff (5 ms doubling, ≤ 60 s).
    pub fn add_rate_limited(self: &Arc<Self>, key: &str) {
        let n = match self.state.lock() {
            Ok(mut s) => {
                let n = s.failures.entry(key.to_owned()).or_insert(0);
                *n += 1;
                *n
            }
            Err(_) => 1,
        };
        let delay = BASE_DELAY
            .saturating_mul(1u32 << (n - 1).min(20))
            .min(MAX_DELAY);
        self.add_after(key.to_owned(), delay);
    }

    /// Clears a key's failure count after a success.
    pub fn forget(&self, key: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.failures.remove(key);
        }
    }

    pub fn failures(&self, key: &str) -> u32 {
        self.state
            .lock()
            .map(|s| s.failures.get(key).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// The next key to process; waits while the queue is empty.
    pub async fn get(&self) -> String {
        loop {
            let notified = self.notify.notified();
            if let Ok(mut s) = self.state.lock()
                && let Some(k) = s.queue.pop_front()
            {
                s.dirty.remove(&k);
                s.processing.insert(k.clone());
                if !s.queue.is_empty() {
                    self.notify.notify_one();
                }
                return k;
            }
            notified.await;
        }
    }

    /// Marks a key processed; queues it again if it was added meanwhile.
    pub fn done(&self, key: &str) {
        let Ok(mut s) = self.state.lock() else { return };
        s.processing.remove(key);
        if s.dirty.contains(key) {
            s.queue.push_back(key.to_owned());
            drop(s);
            self.notify.notify_one();
        }
    }

    pub fn len(&self) -> usize {
        self.state.lock().map(|s| s.queue.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn deduplicates_and_requeues_keys_added_while_processing() {
        let q = Queue::new();
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.len(), 2);
        let k = q.get().await;
        assert_eq!(k, "a");
        q.add("a"); // while processing: not queued twice, not handed out
        assert_eq!(q.get().await, "b");
        assert!(q.is_empty());
        q.done("a");
        assert_eq!(q.get().await, "a");
    }

    #[tokio::test]
    async fn failures_back_off_and_forget_resets() {
        let q = Queue::new();
        q.add_rate_limited("x");
        q.add_rate_limited("x");
        assert_eq!(q.failures("x"), 2);
        let got = tokio::time::timeout(Duration::from_secs(1), q.get()).await;
        assert_eq!(got.unwrap(), "x");
        q.forget("x");
        assert_eq!(q.failures("x"), 0);
    }
}
