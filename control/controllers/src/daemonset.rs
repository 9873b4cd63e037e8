//! DaemonSet controller: one pod per eligible node. A node is eligible
//! when it matches the template's nodeSelector / required node affinity
//! and every NoSchedule/NoExecute taint is tolerated (with the tolerations
//! upstream adds to daemon pods). Pods are created with a required node
//! affinity to their node (`matchFields metadata.name`), as upstream does,
//! and the scheduler binds them. RollingUpdate replaces pods whose
//! `controller-revision-hash` label differs from the template's, at most
//! `maxUnavailable` unavailable at a time; OnDelete waits for the user.

use crate::{
    client::{Client, NODES, PODS},
    deployment::{int_or_percent, template_hash},
    enqueue,
    error::Result,
    events::EventType,
    informer::{Change, Informer, Informers},
    meta,
    own_writes::OwnWrites,
    queue::Queue,
    runner::{Reconciler, Requeue},
    scheduler::{affinity_matches, tolerates},
};
use serde_json::{Value, json};
use std::{collections::BTreeMap, sync::Arc};

pub const DAEMON_SETS: crate::client::Gvr = ("apps", "v1", "daemonsets");
pub const HASH_LABEL: &str = "controller-revision-hash";

/// Tolerations every daemon pod gets, so node conditions do not evict it.
fn daemon_tolerations() -> Vec<Value> {
    let mut t = vec![
        json!({"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}),
        json!({"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"}),
    ];
    for k in [
        "node.kubernetes.io/disk-pressure",
        "node.kubernetes.io/memory-pressure",
        "node.kubernetes.io/pid-pressure",
        "node.kubernetes.io/unschedulable",
    ] {
        t.push(json!({"key": k, "operator": "Exists", "effect": "NoSchedule"}));
    }
    t
}

#[derive(Debug)]
pub struct DaemonSetController {
    client: Client,
    sets: Arc<Informer>,
    pods: Arc<Informer>,
    nodes: Arc<Informer>,
    revisions: Arc<Informer>,
    written: OwnWrites,
}

/// The node a daemon pod is for: where it is bound, else its affinity.
fn target_node(p: &Value) -> Option<String> {
    if !meta::node_name(p).is_empty() {
        return Some(meta::node_name(p).to_owned());
    }
    p.pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms/0/matchFields/0/values/0")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

impl DaemonSetController {
    pub fn start(
        client: &Client,
        informers: &Informers,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let queue = Queue::new();
        let c = Arc::new(Self {
            client: client.clone(),
            sets: informers.get_or_create(client.info(DAEMON_SETS)?),
            pods: informers.get_or_create(client.info(PODS)?),
            nodes: informers.get_or_create(client.info(NODES)?),
            revisions: informers
                .get_or_create(client.info(crate::revisions::CONTROLLER_REVISIONS)?),
            written: OwnWrites::default(),
        });
        c.sets.on_change(enqueue::own_key(&queue));
        let (q, sets) = (queue.clone(), c.sets.clone());
        c.nodes.on_change(Arc::new(move |ch: &Change| {
            // Only what changes eligibility matters, not heartbeats.
            if let (Some(o), Some(n)) = (&ch.old, &ch.new)
                && o.get("spec") == n.get("spec")
                && meta::labels(o) == meta::labels(n)
            {
                return;
            }
            for ds in sets.list() {
                q.add(meta::key(&ds));
            }
        }));
        for inf in [&c.pods, &c.revisions] {
            inf.on_change(enqueue::controller_of(&queue, "DaemonSet"));
        }
        Ok(crate::runner::spawn(c, queue, 2))
    }

    /// The pod this DaemonSet runs on `node`.
    fn pod_for(ds: &Value, node: &str, hash: &str) -> Value {
        let tmpl = ds.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let mut labels = tmpl
            .pointer("/metadata/labels")
            .cloned()
            .unwrap_or(json!({}));
        labels[HASH_LABEL] = json!(hash);
        let mut spec = tmpl.get("spec").cloned().unwrap_or(json!({}));
        // Pin to the node: every required term gets the node's name as a
        // field requirement (upstream's ReplaceDaemonSetPodNodeNameNodeAffinity),
        // so the template's own expressions still hold.
        let pin = json!([{"key": "metadata.name", "operator": "In", "values": [node]}]);
        let mut terms: Vec<Value> = spec
            .pointer("/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if terms.is_empty() {
            terms.push(json!({}));
        }
        for t in &mut terms {
            t["matchFields"] = pin.clone();
        }
        spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] =
            json!({"nodeSelectorTerms": terms});
        let mut tolerations = spec
            .get("tolerations")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for t in daemon_tolerations() {
            if !tolerations
                .iter()
                .any(|x| x.get("key") == t.get("key") && x.get("effect") == t.get("effect"))
            {
                tolerations.push(t);
            }
        }
        spec["tolerations"] = json!(tolerations);
        let mut metadata = json!({
            "generateName": format!("{}-", meta::name(ds)),
            "namespace": meta::namespace(ds),
            "labels": labels,
            "ownerReferences": [meta::controller_ref(ds, "apps/v1", "DaemonSet")],
        });
        if let Some(a) = tmpl.pointer("/metadata/annotations") {
            metadata["annotations"] = a.clone();
        }
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
    }

    /// Whether the daemon pod may run on `node`.
    fn eligible(probe: &Value, node: &Value) -> bool {
        affinity_matches(probe, node)
            && node
                .pointer("/spec/taints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .all(|t| {
                    !matches!(
                        t.get("effect").and_then(Value::as_str),
                        Some("NoSchedule" | "NoExecute")
                    ) || tolerates(probe, t)
                })
    }

    async fn delete(&self, key: &str, p: &Value) -> Result<()> {
        self.written.delete_pod(&self.client, key, p).await
    }
}

#[async_trait::async_trait]
impl Reconciler for DaemonSetController {
    fn name(&self) -> &'static str {
        "daemonset"
    }

    async fn reconcile(&self, key: &str) -> Result<Requeue> {
        let Some(ds) = self
            .written
            .current(key, &self.pods, &self.sets)
            .await
            .filter(|ds| !meta::is_deleting(ds))
        else {
            return Ok(Requeue::No);
        };
        let uid = meta::uid(&ds).to_owned();
        let ns = meta::namespace(&ds).unwrap_or("default").to_owned();
        let template = ds.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let hash = template_hash(&template, 0);
        // The template's ControllerRevision (what `kubectl rollout
        // history/undo ds` read and apply).
        let current_revision = crate::revisions::ensure_current(
            &self.client,
            &self.revisions,
            &ds,
            "DaemonSet",
            &hash,
        )
        .await?;
        let mut by_node: BTreeMap<String, Vec<Arc<Value>>> = BTreeMap::new();
        for p in self.pods.list_ns(&ns) {
            if meta::controller_uid(&p) == Some(uid.as_str())
                && meta::pod_active(&p)
                && let Some(n) = target_node(&p)
            {
                by_node.entry(n).or_default().push(p);
            }
        }
        let nodes = self.nodes.list();
        let mut desired = 0;
        let mut misscheduled = 0;
        let mut scheduled = 0;
        let mut ready = 0;
        let mut updated = 0;
        let mut stale: Vec<Arc<Value>> = Vec::new();
        let mut unavailable = 0;
        for node in &nodes {
            let name = meta::name(node);
            let probe = Self::pod_for(&ds, name, &hash);
            let pods = by_node.remove(name).unwrap_or_default();
            if Self::eligible(&probe, node) {
                desired += 1;
                if pods.is_empty() {
                    let out = self.client.create(PODS, Some(&ns), probe).await?;
                    self.written.note(key, meta::resource_version(&out));
                    self.client.event(
                        "daemonset-controller",
                        "DaemonSet",
                        &ds,
                        EventType::Normal,
                        "SuccessfulCreate",
                        format!("Created pod: {}", meta::name(&out)),
                    );
                    unavailable += 1;
                    continue;
                }
                scheduled += 1;
                // Keep the newest-template pod, drop duplicates.
                let mut pods = pods;
                pods.sort_by_key(|p| meta::labels(p).get(HASH_LABEL) != Some(&hash));
                for extra in &pods[1..] {
                    self.delete(key, extra).await?;
                }
                let p = &pods[0];
                let is_ready = meta::pod_ready(p);
                if is_ready {
                    ready += 1;
                } else {
                    unavailable += 1;
                }
                if meta::labels(p).get(HASH_LABEL) == Some(&hash) {
                    updated += 1;
                } else {
                    stale.push(p.clone());
                }
            } else if !pods.is_empty() {
                misscheduled += 1;
                for p in &pods {
                    self.delete(key, p).await?;
                }
            }
        }
        // Pods for nodes that are gone.
        for pods in by_node.values() {
            for p in pods {
                self.delete(key, p).await?;
            }
        }
        // Rolling update: replace stale pods within maxUnavailable
        // (not-ready stale pods first: they cost nothing).
        let rolling = ds
            .pointer("/spec/updateStrategy/type")
            .and_then(Value::as_str)
            != Some("OnDelete");
        if rolling && !stale.is_empty() {
            let max_unavailable = int_or_percent(
                ds.pointer("/spec/updateStrategy/rollingUpdate/maxUnavailable"),
                desired,
                false,
                1,
            )
            .max(1);
            stale.sort_by_key(|p| meta::pod_ready(p));
            let mut budget = max_unavailable - unavailable;
            for p in &stale {
                if !meta::pod_ready(p) {
                    self.delete(key, p).await?;
                } else if budget > 0 {
                    budget -= 1;
                    self.delete(key, p).await?;
                }
            }
        }
        // Revisions still worn by a pod are kept beyond the history limit.
        let mut in_use: std::collections::HashSet<String> = self
            .pods
            .list_ns(&ns)
            .iter()
            .filter(|p| meta::controller_uid(p) == Some(uid.as_str()))
            .filter_map(|p| {
                meta::labels(p)
                    .get(HASH_LABEL)
                    .map(|h| format!("{}-{h}", meta::name(&ds)))
            })
            .collect();
        in_use.insert(current_revision);
        crate::revisions::prune(&self.client, &self.revisions, &ds, &in_use).await?;
        let old_status = ds.get("status").cloned().unwrap_or(json!({}));
        let mut status = old_status.clone();
        status["desiredNumberScheduled"] = json!(desired);
        status["currentNumberScheduled"] = json!(scheduled);
        status["numberMisscheduled"] = json!(misscheduled);
        status["numberReady"] = json!(ready);
        status["numberAvailable"] = json!(ready);
        status["numberUnavailable"] = json!((desired - ready).max(0));
        status["updatedNumberScheduled"] = json!(updated);
        status["observedGeneration"] = json!(meta::generation(&ds));
        if status != old_status {
            crate::client::ignore_not_found(
                self.client
                    .patch(
                        DAEMON_SETS,
                        Some(&ns),
                        meta::name(&ds),
                        Some("status"),
                        json!({"status": status}),
                    )
                    .await,
            )?;
        }
        Ok(Requeue::No)
    }
}
