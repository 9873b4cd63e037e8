//! Events the controllers and the scheduler post (`Scheduled`,
//! `FailedScheduling`, `SuccessfulCreate`, `ScalingReplicaSet`,
//! `SuccessfulRescale`, …), so that `kubectl describe` and `kubectl get
//! events` tell what the control plane did, as on any cluster.
//!
//! Recording never blocks a reconcile: [`Recorder::record`] queues the
//! event (dropping it, with a log line, when the queue is full) and one
//! task writes them in order. Like client-go's correlator, an event equal
//! to one posted in the last ten minutes (same object, component, type,
//! reason and message) is not posted again: the existing Event gets its
//! `count` raised and `lastTimestamp` moved, so a pod retried a hundred
//! times shows one line "x100", not a hundred.

use crate::client::Client;
use serde_json::{Value, json};
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::sync::mpsc;

const EVENTS: crate::client::Gvr = ("", "v1", "events");
/// Events waiting to be written; beyond this they are dropped (logged):
/// events are advisory and a burst must not grow memory without bound.
const QUEUE: usize = 4096;
/// How long an identical event is folded into the first one.
const AGGREGATE_FOR: Duration = Duration::from_secs(600);
/// Events remembered for aggregation (oldest forgotten first).
const REMEMBER: usize = 4096;

/// Normal or Warning, as `Event.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// One event to post about `involved` (an object reference).
#[derive(Debug, Clone)]
struct Pending {
    component: &'static str,
    involved: Value,
    namespace: String,
    kind: EventType,
    reason: String,
    message: String,
}

impl Pending {
    fn key(&self) -> String {
        format!(
            "{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}",
            self.component,
            self.involved
                .get("uid")
                .and_then(Value::as_str)
                .unwrap_or(""),
            self.kind.as_str(),
            self.reason,
            self.message
        )
    }
}

/// The sending side, cloned into every controller's [`Client`].
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Pending>,
    /// Events dropped so far (a full queue).
    dropped: Arc<AtomicU64>,
}

impl Recorder {
    /// Starts the writer task (on the current tokio runtime) and returns
    /// the recorder and the task.
    pub fn start(client: Client) -> (Recorder, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(write_events(client, rx));
        (
            Recorder {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            task,
        )
    }

    /// Queues an event about `obj`, a `kind` (`Pod`, `ReplicaSet`, …),
    /// from `component` (e.g. `default-scheduler`, `replicaset-controller`).
    pub fn record(
        &self,
        component: &'static str,
        kind_of: &'static str,
        obj: &Value,
        kind: EventType,
        reason: &str,
        message: String,
    ) {
        let md = obj.get("metadata").cloned().unwrap_or(Value::Null);
        let field = |k: &str| md.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let namespace = match field("namespace") {
            // Cluster-scoped objects (nodes) have their events in default.
            ns if ns.is_empty() => "default".to_owned(),
            ns => ns,
        };
        let involved = json!({
            "apiVersion": api_version(kind_of),
            "kind": kind_of,
            "namespace": md.get("namespace"),
            "name": field("name"),
            "uid": field("uid"),
            "resourceVersion": field("resourceVersion"),
        });
        let pending = Pending {
            component,
            involved,
            namespace,
            kind,
            reason: reason.to_owned(),
            message,
        };
        if let Err(e) = self.tx.try_send(pending) {
            let p = match &e {
                mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p) => p,
            };
            // A burst can drop thousands: log the 1st, 2nd, 4th, … only.
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(reason = %p.reason, object = %p.involved["name"], dropped = n,
                    "events dropped: the event queue is full (events are advisory; the objects are fine)");
            }
        }
    }
}

/// The group/version of the kinds controllers post events about.
fn api_version(kind: &str) -> &'static str {
    match kind {
        "ReplicaSet" | "Deployment" | "StatefulSet" | "DaemonSet" => "apps/v1",
        "Job" | "CronJob" => "batch/v1",
        "HorizontalPodAutoscaler" => "autoscaling/v2",
        // Pod, Node, PersistentVolumeClaim, PersistentVolume.
        _ => "v1",
    }
}

/// What the writer remembers of an event it posted.
struct Posted {
    name: String,
    namespace: String,
    count: u64,
    first: Instant,
}

/// The writer: creates new events, raises the count of repeated ones.
async fn write_events(client: Client, mut rx: mpsc::Receiver<Pending>) {
    let mut posted: HashMap<String, Posted> = HashMap::new();
    let mut order: VecDeque<String> = VecDeque::new();
    while let Some(p) = rx.recv().await {
        let key = p.key();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        if let Some(seen) = posted.get_mut(&key)
            && seen.first.elapsed() < AGGREGATE_FOR
        {
            seen.count += 1;
            let patch = json!({"count": seen.count, "lastTimestamp": now});
            match client
                .patch(EVENTS, Some(&seen.namespace), &seen.name, None, patch)
                .await
            {
                Ok(_) => continue,
                // Deleted (its TTL, or by hand): post it afresh below.
                Err(e) => tracing::debug!(error = %e, "raising an event's count failed"),
            }
        }
        let involved_name = p.involved["name"].as_str().unwrap_or("").to_owned();
        // Upstream's naming: the object's name and the time in hex nanos.
        let nanos = chrono::Utc::now()
            .timestamp_nanos_opt()
            .unwrap_or_default()
            .unsigned_abs();
        let name = format!("{involved_name}.{nanos:x}");
        let event = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": p.namespace},
            "involvedObject": p.involved,
            "reason": p.reason,
            "message": p.message,
            "type": p.kind.as_str(),
            "source": {"component": p.component},
            "reportingComponent": p.component,
            "reportingInstance": p.component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        });
        match client.create(EVENTS, Some(&p.namespace), event).await {
            Ok(_) => {
                if posted.len() >= REMEMBER
                    && let Some(old) = order.pop_front()
                {
                    posted.remove(&old);
                }
                if posted.contains_key(&key) {
                    order.retain(|k| k != &key);
                }
                order.push_back(key.clone());
                posted.insert(
                    key,
                    Posted {
                        name,
                        namespace: p.namespace,
                        count: 1,
                        first: Instant::now(),
                    },
                );
            }
            Err(e) => {
                tracing::debug!(reason = %p.reason, object = %involved_name, error = %e, "posting an event failed")
            }
        }
    }
}
