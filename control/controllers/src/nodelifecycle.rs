//! Node lifecycle: a node whose kubelet stops reporting is marked
//! unreachable, and pods leave nodes they may not stay on.
//!
//! * Health: a node's heartbeat is its Lease in `kube-node-lease`
//!   (`renewTime`) or its Ready condition's `lastHeartbeatTime`. When
//!   neither has changed for the grace period (as observed by this
//!   controller, so clocks need not agree) Ready becomes Unknown and the
//!   node gets `node.kubernetes.io/unreachable:NoExecute`; a kubelet
//!   reporting Ready=False gets `node.kubernetes.io/not-ready:NoExecute`;
//!   Ready=True removes both.
//! * Taint eviction: a pod bound to a node with a NoExecute taint it does
//!   not tolerate is deleted; one it tolerates for `tolerationSeconds` is
//!   deleted when that time has passed since the taint was added. Their
//!   owners replace them elsewhere.
//! * Pod GC: pods bound to a node that no longer exists are deleted at
//!   once (no kubelet will ever finish them).

use crate::{
    client::{Client, NODES, PODS},
    error::Result,
    events::EventType,
    informer::{Change, Informer, Informers},
    meta,
    queue::Queue,
    runner::{Reconciler, Requeue},
};
use serde_json::{Value, json};

/// The events' source, as upstream names it.
const COMPONENT: &str = "node-controller";
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

#[derive(Debug)]
pub struct NodeLifecycle {
    client: Client,
    nodes: Arc<Informer>,
    pods: Arc<Informer>,
    leases: Arc<Informer>,
    grace: Duration,
    /// node → (last heartbeat seen, when we saw it change).
    heartbeats: Mutex<HashMap<String, (String, Instant)>>,
    pod_queue: Arc<Queue>,
}

fn heartbeat_of(node: &Value, lease: Option<&Value>) -> String {
    let lease_renew = lease
        .and_then(|l| l.pointer("/spec/renewTime"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let status_beat = meta::condition(node, "Ready")
        .and_then(|c| c.get("lastHeartbeatTime"))
        .and_then(Value::as_str)
        .unwrap_or("");
    format!("{lease_renew}|{status_beat}")
}

fn taints(node: &Value) -> Vec<Value> {
    node.pointer("/spec/taints")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn ready_status(node: &Value) -> &str {
    meta::condition(node, "Ready")
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        .unwrap_or("Unknown")
}

/// Seconds until the pod must leave the node (0: now), `None` when it may
/// stay.
fn eviction_delay(pod: &Value, node: &Value, now: chrono::DateTime<chrono::Utc>) -> Option<i64> {
    let mut delay: Option<i64> = None;
    for t in taints(node) {
        if t.get("effect").and_then(Value::as_str) != Some("NoExecute") {
            continue;
        }
        let key = t.get("key").and_then(Value::as_str).unwrap_or("");
        let value = t.get("value").and_then(Value::as_str).unwrap_or("");
        let toleration = pod
            .pointer("/spec/tolerations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|tol| {
                let tk = tol.get("key").and_then(Value::as_str).unwrap_or("");
                let op = tol
                    .get("operator")
                    .and_then(Value::as_str)
                    .unwrap_or("Equal");
                let tv = tol.get("value").and_then(Value::as_str).unwrap_or("");
                let te = tol.get("effect").and_then(Value::as_str).unwrap_or("");
                (tk.is_empty() && op == "Exists" || tk == key)
                    && (op == "Exists" || tv == value)
                    && (te.is_empty() || te == "NoExecute")
            });
        let left = match toleration {
            None => 0,
            Some(tol) => match tol.get("tolerationSeconds").and_then(Value::as_i64) {
                None => continue, // tolerated forever
                Some(secs) => {
                    let added = t
                        .get("timeAdded")
                        .and_then(Value::as_str)
                        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                        .map(|d| d.with_timezone(&chrono::Utc))
                        .unwrap_or(now);
                    (secs - (now - added).num_seconds()).max(0)
                }
            },
        };
        delay = Some(delay.map_or(left, |d| d.min(left)));
    }
    delay
}

impl NodeLifecycle {
    pub fn start(
        client: &Client,
        informers: &Informers,
        grace: Duration,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let node_queue = Queue::new();
        let c = Arc::new(Self {
            client: client.clone(),
            nodes: informers.get_or_create(client.info(NODES)?),
            pods: informers.get_or_create(client.info(PODS)?),
            leases: informers.get_or_create(client.info(crate::client::LEASES)?),
            grace,
            heartbeats: Mutex::new(HashMap::new()),
            pod_queue: Queue::new(),
        });
        let (nq, pq, pods) = (node_queue.clone(), c.pod_queue.clone(), c.pods.clone());
        c.nodes.on_change(Arc::new(move |ch: &Change| {
            let Some(n) = ch.object() else { return };
            nq.add(meta::name(n));
            // Taints or the node's existence changed: its pods may have
            // to go.
            let taints_changed =
                ch.old.as_ref().map(|o| taints(o)) != ch.new.as_ref().map(|n| taints(n));
            if taints_changed {
                let name = meta::name(n);
                for p in pods.list() {
                    if meta::node_name(&p) == name {
                        pq.add(meta::key(&p));
                    }
                }
            }
        }));
        let nq = node_queue.clone();
        c.leases.on_change(Arc::new(move |ch: &Change| {
            if let Some(l) = ch.object()
                && meta::namespace(l) == Some("kube-node-lease")
            {
                nq.add(meta::name(l));
            }
        }));
        let pq = c.pod_queue.clone();
        c.pods.on_change(Arc::new(move |ch: &Change| {
            if let Some(p) = &ch.new
                && !meta::node_name(p).is_empty()
                && ch
                    .old
                    .as_ref()
                    .is_none_or(|o| meta::node_name(o) != meta::node_name(p))
            {
                pq.add(meta::key(p));
            }
        }));
        let mut tasks = crate::runner::spawn(c.clone(), node_queue, 1);
        tasks.extend(crate::runner::spawn(
            Arc::new(TaintEviction(c.clone())),
            c.pod_queue.clone(),
            2,
        ));
        Ok(tasks)
    }

    async fn set_taints(
        &self,
        node: &Value,
        want_unreachable: bool,
        want_not_ready: bool,
    ) -> Result<()> {
        let current = taints(node);
        let has = |k: &str| {
            current.iter().any(|t| {
                t.get("key").and_then(Value::as_str) == Some(k)
                    && t.get("effect").and_then(Value::as_str) == Some("NoExecute")
            })
        };
        let (had_unreachable, had_not_ready) = (has(UNREACHABLE), has(NOT_READY));
        if had_unreachable == want_unreachable && had_not_ready == want_not_ready {
            return Ok(());
        }
        let mut next: Vec<Value> = current
            .into_iter()
            .filter(|t| {
                let k = t.get("key").and_then(Value::as_str);
                let mine = k == Some(UNREACHABLE) || k == Some(NOT_READY);
                let keep = match k {
                    Some(UNREACHABLE) => want_unreachable,
                    Some(NOT_READY) => want_not_ready,
                    _ => true,
                };
                !mine || keep
            })
            .collect();
        let now = meta::now_rfc3339();
        for (k, want, had) in [
            (UNREACHABLE, want_unreachable, had_unreachable),
            (NOT_READY, want_not_ready, had_not_ready),
        ] {
            if want && !had {
                next.push(json!({"key": k, "effect": "NoExecute", "timeAdded": now}));
            }
        }
        let patch = json!({"metadata": {"resourceVersion": meta::resource_version(node).to_string()},
                           "spec": {"taints": if next.is_empty() { Value::Null } else { json!(next) }}});
        crate::client::ignore_not_found(
            self.client
                .patch(NODES, None, meta::name(node), None, patch)
                .await,
        )?;
        Ok(())
    }

    /// Deletes `pod` (that incarnation) without a grace period: its node
    /// is gone, so no kubelet will ever finish it. Already gone is fine.
    async fn force_delete_pod(&self, pod: &Value) -> Result<()> {
        crate::client::ignore_not_found(
            self.client
                .force_delete(
                    PODS,
                    meta::namespace(pod),
                    meta::name(pod),
                    Some(meta::uid(pod)),
                )
                .await,
        )?;
        Ok(())
    }

    async fn mark_unknown(&self, node: &Value) -> Result<()> {
        let now = meta::now_rfc3339();
        let conditions: Vec<Value> = node
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|mut c| {
                if c.get("type").and_then(Value::as_str) == Some("Ready") {
                    c["status"] = json!("Unknown");
                    c["reason"] = json!("NodeStatusUnknown");
                    c["message"] = json!("Kubelet stopped posting node status.");
                    c["lastTransitionTime"] = json!(now);
                }
                c
            })
            .collect();
        crate::client::ignore_not_found(
            self.client
                .patch(
                    NODES,
                    None,
                    meta::name(node),
                    Some("status"),
                    json!({"status": {"conditions": conditions}}),
                )
                .await,
        )?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Reconciler for NodeLifecycle {
    fn name(&self) -> &'static str {
        "node-lifecycle"
    }

    async fn reconcile(&self, name: &str) -> Result<Requeue> {
        let Some(node) = self.nodes.get(name) else {
            if let Ok(mut h) = self.heartbeats.lock() {
                h.remove(name);
            }
            // Pod GC: its pods will never be finished by a kubelet.
            for p in self.pods.list() {
                if meta::node_name(&p) == name {
                    self.force_delete_pod(&p).await?;
                }
            }
            return Ok(Requeue::No);
        };
        let lease = self.leases.get(&format!("kube-node-lease/{name}"));
        let beat = heartbeat_of(&node, lease.as_deref());
        let silent_for = match self.heartbeats.lock() {
            Ok(mut h) => {
                let e = h
                    .entry(name.to_owned())
                    .or_insert_with(|| (beat.clone(), Instant::now()));
                if e.0 != beat {
                    *e = (beat, Instant::now());
                }
                e.1.elapsed()
            }
            Err(_) => Duration::ZERO,
        };
        let status = ready_status(&node).to_owned();
        if silent_for > self.grace && status != "Unknown" {
            tracing::warn!(node = %name, silent_s = silent_for.as_secs(), "node stopped reporting; marking it unreachable");
            self.mark_unknown(&node).await?;
            self.client.event(
                COMPONENT,
                "Node",
                &node,
                EventType::Normal,
                "NodeNotReady",
                format!("Node {name} status is now: NodeNotReady"),
            );
            return Ok(Requeue::After(Duration::from_millis(100)));
        }
        let unreachable = status == "Unknown" && silent_for > self.grace;
        self.set_taints(&node, unreachable, status == "False")
            .await?;
        // Look again when the grace period could run out.
        let check_in = self.grace.saturating_sub(silent_for) + Duration::from_millis(500);
        Ok(Requeue::After(
            check_in.min(self.grace.max(Duration::from_secs(1))),
        ))
    }
}

/// Pod keys → deletion when a NoExecute taint says so.
#[derive(Debug)]
struct TaintEviction(Arc<NodeLifecycle>);

#[async_trait::async_trait]
impl Reconciler for TaintEviction {
    fn name(&self) -> &'static str {
        "taint-eviction"
    }

    async fn reconcile(&self, key: &str) -> Result<Requeue> {
        let c = &self.0;
        let Some(pod) = c.pods.get(key) else {
            return Ok(Requeue::No);
        };
        if meta::is_deleting(&pod) || meta::node_name(&pod).is_empty() {
            return Ok(Requeue::No);
        }
        let Some(node) = c.nodes.get(meta::node_name(&pod)) else {
            // Bound to a node that does not exist (anymore): pod GC, once
            // the node cache has been listed.
            if c.nodes.revision() > 0 {
                c.force_delete_pod(&pod).await?;
            }
            return Ok(Requeue::No);
        };
        match eviction_delay(&pod, &node, chrono::Utc::now()) {
            None => Ok(Requeue::No),
            Some(0) => {
                tracing::info!(pod = %key, node = %meta::name(&node), "evicting: untolerated NoExecute taint");
                c.client.event(
                    COMPONENT,
                    "Pod",
                    &pod,
                    EventType::Normal,
                    "TaintManagerEviction",
                    format!("Marking for deletion Pod {key}"),
                );
                crate::client::ignore_not_found(
                    c.client
                        .delete(
                            PODS,
                            meta::namespace(&pod),
                            meta::name(&pod),
                            Some(meta::uid(&pod)),
                        )
                        .await,
                )?;
                Ok(Requeue::No)
            }
            Some(secs) => Ok(Requeue::After(Duration::from_secs(secs as u64))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_follows_tolerations() {
        let now = chrono::Utc::now();
        let added = (now - chrono::Duration::seconds(10)).to_rfc3339();
        let node = json!({"spec": {"taints": [{"key": UNREACHABLE, "effect": "NoExecute", "timeAdded": added}]}});
        let bare = json!({"spec": {}});
        assert_eq!(eviction_delay(&bare, &node, now), Some(0));
        let forever = json!({"spec": {"tolerations": [{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"}]}});
        assert_eq!(eviction_delay(&forever, &node, now), None);
        let for_30 = json!({"spec": {"tolerations": [{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}]}});
        assert_eq!(eviction_delay(&for_30, &node, now), Some(20));
        let healthy = json!({"spec": {}});
        assert_eq!(eviction_delay(&bare, &healthy, now), None);
    }
}
