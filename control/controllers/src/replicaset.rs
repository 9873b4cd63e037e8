//! ReplicaSet controller: keeps `spec.replicas` active pods made from the
//! template (named by generateName `<rs>-`, owned by the ReplicaSet), and
//! reports replicas/fullyLabeled/ready/available/observedGeneration.
//!
//! Matching pods without a controller are adopted, owned pods that stop
//! matching the selector are released.
//!
//! After its own writes a reconcile waits until the pod cache shows them
//! (the cache revision reaches the write's), so a quick second reconcile
//! never counts stale pods and over-creates.

use crate::{
    client::{Client, PODS, REPLICA_SETS},
    enqueue,
    error::Result,
    events::EventType,
    informer::{Change, Informer, Informers},
    meta,
    own_writes::OwnWrites,
    queue::Queue,
    runner::{Reconciler, Requeue},
};
use futures::future::join_all;

/// The events' source, as upstream names it.
const COMPONENT: &str = "replicaset-controller";
use serde_json::{Value, json};
use std::{sync::Arc, time::Duration};

/// At most this many pods are created or deleted per reconcile, as the
/// upstream controller's burst.
const BURST: usize = 500;

#[derive(Debug)]
pub struct ReplicaSetController {
    client: Client,
    sets: Arc<Informer>,
    pods: Arc<Informer>,
    /// Revision of this controller's last pod write per ReplicaSet.
    written: OwnWrites,
}

impl ReplicaSetController {
    pub fn start(
        client: &Client,
        informers: &Informers,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let queue = Queue::new();
        let c = Arc::new(Self {
            client: client.clone(),
            sets: informers.get_or_create(client.info(REPLICA_SETS)?),
            pods: informers.get_or_create(client.info(PODS)?),
            written: OwnWrites::default(),
        });
        c.sets.on_change(enqueue::own_key(&queue));
        let q = queue.clone();
        let sets = c.sets.clone();
        c.pods.on_change(Arc::new(move |ch: &Change| {
            // An orphan may be adopted by a ReplicaSet whose selector
            // matches it.
            if let Some(p) = &ch.new
                && meta::controller_uid(p).is_none()
                && meta::pod_active(p)
            {
                enqueue::adopters(&q, &sets, p);
            }
            // Wake the owning ReplicaSet (old and new owner, in case the
            // reference changed).
            for p in [&ch.old, &ch.new].into_iter().flatten() {
                enqueue::live_controller(&q, &sets, "ReplicaSet", p);
            }
        }));
        Ok(crate::runner::spawn(c, queue, 4))
    }

    fn pod_from_template(rs: &Value) -> Value {
        let tmpl = rs.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let mut metadata = json!({
            "generateName": format!("{}-", meta::name(rs)),
            "namespace": meta::namespace(rs),
            "ownerReferences": [meta::controller_ref(rs, "apps/v1", "ReplicaSet")],
        });
        for f in ["labels", "annotations", "finalizers"] {
            if let Some(v) = tmpl.pointer(&format!("/metadata/{f}")) {
                metadata[f] = v.clone();
            }
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": tmpl.get("spec").cloned().unwrap_or(json!({})),
        })
    }

    /// Takes matching orphans (no controller) and lets go of owned pods
    /// the selector no longer matches, as upstream's ControllerRefManager.
    /// Returns whether anything changed.
    async fn adopt_and_release(&self, key: &str, rs: &Value) -> Result<bool> {
        crate::adoption::adopt_and_release(
            &self.client,
            &self.written,
            key,
            rs,
            meta::controller_ref(rs, "apps/v1", "ReplicaSet"),
            &self.pods,
            meta::pod_active,
        )
        .await
    }

    /// Order of deletion when scaling down: unassigned before assigned,
    /// pending before running, not ready before ready, newer before older.
    fn deletion_rank(p: &Value) -> (u8, u8, u8, std::cmp::Reverse<String>) {
        let assigned = u8::from(!meta::node_name(p).is_empty());
        let running = u8::from(meta::pod_phase(p) == "Running");
        let ready = u8::from(meta::pod_ready(p));
        let created = p
            .pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        (assigned, running, ready, std::cmp::Reverse(created))
    }

    async fn create_pods(&self, key: &str, rs: &Value, n: usize) -> Result<()> {
        let ns = meta::namespace(rs).unwrap_or("default").to_owned();
        let pod = Self::pod_from_template(rs);
        let results =
            join_all((0..n.min(BURST)).map(|_| self.client.create(PODS, Some(&ns), pod.clone())))
                .await;
        let mut first_err = None;
        for r in results {
            match r {
                Ok(p) => {
                    self.written.note(key, meta::resource_version(&p));
                    self.client.event(
                        COMPONENT,
                        "ReplicaSet",
                        rs,
                        EventType::Normal,
                        "SuccessfulCreate",
                        format!("Created pod: {}", meta::name(&p)),
                    );
                }
                Err(e) => {
                    self.client.event(
                        COMPONENT,
                        "ReplicaSet",
                        rs,
                        EventType::Warning,
                        "FailedCreate",
                        format!("Error creating: {e}"),
                    );
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn delete_pods(
        &self,
        key: &str,
        rs: &Value,
        mut pods: Vec<Arc<Value>>,
        n: usize,
    ) -> Result<()> {
        pods.sort_by_key(|p| Self::deletion_rank(p));
        let victims: Vec<_> = pods.into_iter().take(n.min(BURST)).collect();
        let results = join_all(victims.iter().map(|p| {
            self.client
                .delete(PODS, meta::namespace(p), meta::name(p), Some(meta::uid(p)))
        }))
        .await;
        let mut first_err = None;
        for (r, victim) in results.into_iter().zip(&victims) {
            match r {
                Ok(p) => {
                    self.written.note(key, meta::resource_version(&p));
                    self.client.event(
                        COMPONENT,
                        "ReplicaSet",
                        rs,
                        EventType::Normal,
                        "SuccessfulDelete",
                        format!("Deleted pod: {}", meta::name(victim)),
                    );
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[async_trait::async_trait]
impl Reconciler for ReplicaSetController {
    fn name(&self) -> &'static str {
        "replicaset"
    }

    async fn reconcile(&self, key: &str) -> Result<Requeue> {
        let Some(rs) = self.written.current(key, &self.pods, &self.sets).await else {
            return Ok(Requeue::No);
        };
        let uid = meta::uid(&rs).to_owned();
        let ns = meta::namespace(&rs).unwrap_or("default").to_owned();
        if !meta::is_deleting(&rs) && self.adopt_and_release(key, &rs).await? {
            // The cache shows the new ownership on the next pass.
            return Ok(Requeue::After(Duration::from_millis(1)));
        }
        let owned: Vec<Arc<Value>> = self
            .pods
            .list_ns(&ns)
            .into_iter()
            .filter(|p| meta::controller_uid(p) == Some(uid.as_str()))
            .collect();
        let active: Vec<Arc<Value>> = owned
            .iter()
            .filter(|p| meta::pod_active(p))
            .cloned()
            .collect();
        let want = rs
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1)
            .max(0) as usize;
        let mut sync_err = None;
        if !meta::is_deleting(&rs) {
            let r = if active.len() < want {
                self.create_pods(key, &rs, want - active.len()).await
            } else if active.len() > want {
                self.delete_pods(key, &rs, active.clone(), active.len() - want)
                    .await
            } else {
                Ok(())
            };
            if let Err(e) = r {
                sync_err = Some(e);
            }
        }

        // Status from what the cache shows now (pods just created appear
        // in the next pass, which their events trigger).
        let now = chrono::Utc::now();
        let min_ready = rs
            .pointer("/spec/minReadySeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let selector = meta::selector(&rs);
        let tmpl_labels = rs
            .pointer("/spec/template/metadata/labels")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let mut ready = 0;
        let mut available = 0;
        let mut fully_labeled = 0;
        let mut recheck: Option<i64> = None;
        for p in &active {
            if meta::pod_ready(p) {
                ready += 1;
            }
            let (avail, wait) = meta::pod_available(p, min_ready, now);
            if avail {
                available += 1;
            }
            if let Some(w) = wait {
                recheck = Some(recheck.map_or(w, |r: i64| r.min(w)));
            }
            let labels = meta::labels(p);
            if tmpl_labels
                .iter()
                .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
                || selector.as_ref().is_some_and(|s| s.matches(&labels))
            {
                fully_labeled += 1;
            }
        }
        let mut status = rs.get("status").cloned().unwrap_or(json!({}));
        status["replicas"] = json!(active.len());
        status["fullyLabeledReplicas"] = json!(fully_labeled);
        status["readyReplicas"] = json!(ready);
        status["availableReplicas"] = json!(available);
        status["observedGeneration"] = json!(meta::generation(&rs));
        if Some(&status) != rs.get("status") {
            let r = self
                .client
                .patch(
                    REPLICA_SETS,
                    Some(&ns),
                    meta::name(&rs),
                    Some("status"),
                    json!({"status": status}),
                )
                .await;
            match r {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = sync_err {
            return Err(e);
        }
        Ok(match recheck {
            Some(s) => Requeue::After(Duration::from_secs(s.max(1) as u64)),
            None => Requeue::No,
        })
    }
}
