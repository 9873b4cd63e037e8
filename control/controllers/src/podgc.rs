//! Pod garbage collection, as kube-controller-manager's pod GC:
//! * terminated pods (Succeeded or Failed) beyond a threshold are deleted,
//!   the oldest first, so finished Jobs' pods do not pile up forever;
//! * pods bound to a node that no longer exists are deleted once the node
//!   has been missing for the quarantine (it may be re-registering);
//! * pods being deleted that were never scheduled are removed at once: no
//!   kubelet will ever confirm their end.
//!
//! Orphans are first marked Failed with a DisruptionTarget condition
//! (reason DeletionByPodGC) so whoever watches them sees why, then
//! deleted without a grace period; the rest are deleted normally.

use crate::{
    client::{Client, NODES, PODS},
    error::Result,
    informer::{Informer, Informers},
    meta,
};
use serde_json::{Value, json};
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

#[derive(Debug, Clone, Copy)]
pub struct PodGcOptions {
    /// Terminated pods kept at most (`--terminated-pod-gc-threshold`);
    /// 0 turns that part off, as upstream.
    pub terminated_threshold: usize,
    /// How long a node must be missing before its pods are deleted.
    pub quarantine: Duration,
    /// How often the collector looks.
    pub period: Duration,
}

impl Default for PodGcOptions {
    fn default() -> Self {
        // Upstream's values.
        Self {
            terminated_threshold: 12_500,
            quarantine: Duration::from_secs(40),
            period: Duration::from_secs(20),
        }
    }
}

#[derive(Debug)]
pub struct PodGc {
    client: Client,
    pods: Arc<Informer>,
    nodes: Arc<Informer>,
    options: PodGcOptions,
}

/// What one pass decided.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    terminated: Vec<String>,
    orphaned: Vec<String>,
    unscheduled_terminating: Vec<String>,
}

/// The pure part of a pass: `missing_since` remembers when each absent
/// node was first noticed.
fn plan(
    pods: &[Arc<Value>],
    nodes: &HashSet<String>,
    missing_since: &mut HashMap<String, Instant>,
    now: Instant,
    options: &PodGcOptions,
) -> Plan {
    let mut out = Plan::default();
    if options.terminated_threshold > 0 {
        let mut terminated: Vec<&Arc<Value>> = pods
            .iter()
            .filter(|p| meta::pod_terminal(p) && !meta::is_deleting(p))
            .collect();
        if terminated.len() > options.terminated_threshold {
            // RFC 3339 timestamps of one format sort as times do.
            terminated.sort_by(|a, b| {
                let t = |p: &Value| {
                    p.pointer("/metadata/creationTimestamp")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned()
                };
                t(a).cmp(&t(b))
                    .then_with(|| meta::key(a).cmp(&meta::key(b)))
            });
            let excess = terminated.len() - options.terminated_threshold;
            out.terminated = terminated[..excess].iter().map(|p| meta::key(p)).collect();
        }
    }
    let mut still_missing = HashSet::new();
    for p in pods {
        let node = meta::node_name(p);
        if node.is_empty() {
            if meta::is_deleting(p) {
                out.unscheduled_terminating.push(meta::key(p));
            }
            continue;
        }
        if nodes.contains(node) {
            continue;
        }
        still_missing.insert(node.to_owned());
        let since = *missing_since.entry(node.to_owned()).or_insert(now);
        if now.duration_since(since) >= options.quarantine {
            out.orphaned.push(meta::key(p));
        }
    }
    missing_since.retain(|n, _| still_missing.contains(n));
    out
}

impl PodGc {
    pub fn start(
        client: &Client,
        informers: &Informers,
        options: PodGcOptions,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let gc = Arc::new(Self {
            client: client.clone(),
            pods: informers.get_or_create(client.info(PODS)?),
            nodes: informers.get_or_create(client.info(NODES)?),
            options,
        });
        Ok(vec![tokio::spawn(gc.run())])
    }

    async fn run(self: Arc<Self>) {
        // Both caches must be complete: a node absent from an unsynced
        // cache is not a missing node.
        self.pods.synced().await;
        self.nodes.synced().await;
        let mut missing_since = HashMap::new();
        let mut tick = tokio::time::interval(self.options.period);
        loop {
            tick.tick().await;
            let nodes: HashSet<String> = self
                .nodes
                .list()
                .iter()
                .map(|n| meta::name(n).to_owned())
                .collect();
            let pods = self.pods.list();
            let plan = plan(
                &pods,
                &nodes,
                &mut missing_since,
                Instant::now(),
                &self.options,
            );
            self.carry_out(plan).await;
        }
    }

    async fn carry_out(&self, plan: Plan) {
        for key in plan.terminated {
            let Some(p) = self.pods.get(&key) else {
                continue;
            };
            let (ns, name) = meta::split_key(&key);
            tracing::info!(pod = %key, "deleting a terminated pod over the threshold");
            if let Err(e) = self
                .client
                .delete(PODS, ns, name, Some(meta::uid(&p)))
                .await
                && !e.is_not_found()
            {
                tracing::warn!(pod = %key, error = %e, "deleting a terminated pod failed");
            }
        }
        for key in plan.orphaned {
            let Some(p) = self.pods.get(&key) else {
                continue;
            };
            let (ns, name) = meta::split_key(&key);
            tracing::info!(pod = %key, node = %meta::node_name(&p), "deleting a pod whose node is gone");
            if !meta::pod_terminal(&p) {
                let conditions = meta::with_condition(
                    &p,
                    json!({
                        "type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC",
                        "message": "PodGC: node no longer exists",
                        "lastTransitionTime": meta::now_rfc3339(),
                    }),
                );
                let patch = json!({"status": {"phase": "Failed", "conditions": conditions}});
                if let Err(e) = self
                    .client
                    .patch(PODS, ns, name, Some("status"), patch)
                    .await
                    && !e.is_not_found()
                {
                    tracing::debug!(pod = %key, error = %e, "marking an orphaned pod failed");
                }
            }
            self.force_delete(&key, &p).await;
        }
        for key in plan.unscheduled_terminating {
            let Some(p) = self.pods.get(&key) else {
                continue;
            };
            tracing::info!(pod = %key, "removing a deleted pod that was never scheduled");
            self.force_delete(&key, &p).await;
        }
    }

    async fn force_delete(&self, key: &str, p: &Value) {
        let (ns, name) = meta::split_key(key);
        if let Err(e) = self
            .client
            .force_delete(PODS, ns, name, Some(meta::uid(p)))
            .await
            && !e.is_not_found()
        {
            tracing::warn!(pod = %key, error = %e, "deleting a pod failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str, phase: &str, created: &str) -> Arc<Value> {
        Arc::new(json!({"metadata": {"name": name, "namespace": "default",
                                     "creationTimestamp": created},
                        "spec": {"nodeName": node}, "status": {"phase": phase}}))
    }

    #[test]
    fn terminated_pods_over_the_threshold_go_oldest_first() {
        let pods = vec![
            pod("new", "n1", "Succeeded", "2026-01-03T00:00:00Z"),
            pod("old", "n1", "Failed", "2026-01-01T00:00:00Z"),
            pod("mid", "n1", "Succeeded", "2026-01-02T00:00:00Z"),
            pod("running", "n1", "Running", "2025-01-01T00:00:00Z"),
        ];
        let nodes = HashSet::from(["n1".to_owned()]);
        let options = PodGcOptions {
            terminated_threshold: 1,
            ..Default::default()
        };
        let p = plan(&pods, &nodes, &mut HashMap::new(), Instant::now(), &options);
        assert_eq!(p.terminated, vec!["default/old", "default/mid"]);
        assert!(p.orphaned.is_empty());
    }

    #[test]
    fn orphans_wait_out_the_quarantine() {
        let pods = vec![pod("a", "gone", "Running", "2026-01-01T00:00:00Z")];
        let nodes = HashSet::new();
        let options = PodGcOptions::default();
        let mut since = HashMap::new();
        let t0 = Instant::now();
        assert!(
            plan(&pods, &nodes, &mut since, t0, &options)
                .orphaned
                .is_empty()
        );
        let later = t0 + Duration::from_secs(41);
        assert_eq!(
            plan(&pods, &nodes, &mut since, later, &options).orphaned,
            vec!["default/a"]
        );
        // A node that comes back is forgotten.
        let back = HashSet::from(["gone".to_owned()]);
        assert!(
            plan(&pods, &back, &mut since, later, &options)
                .orphaned
                .is_empty()
        );
        assert!(since.is_empty());
    }
}
