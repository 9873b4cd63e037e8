//! Disruption controller: keeps each PodDisruptionBudget's status true —
//! how many of its pods are expected, how many are healthy, how many must
//! stay healthy, and so how many voluntary disruptions (evictions) are
//! allowed right now. The API's `pods/eviction` reads that status and
//! refuses (429) an eviction that would break the budget, so `kubectl
//! drain` waits for replacements to become Ready before taking the next
//! pod.
//!
//! Counting follows upstream: with an integer `minAvailable` the expected
//! count is the number of pods the selector matches; with a percentage or
//! `maxUnavailable` it is the scale of the pods' controllers
//! (ReplicaSet/StatefulSet `spec.replicas`, each counted once), falling
//! back to the pod count for pods without one. A pod counts as healthy
//! when it is Ready and not being deleted, and not already in
//! `status.disruptedPods` (an eviction the API granted whose deletion the
//! informer has not seen yet); entries there older than two minutes are
//! dropped, as upstream does.

use crate::{
    client::{Client, PODS, REPLICA_SETS},
    error::Result,
    informer::{Change, Informer, Informers},
    meta,
    queue::Queue,
    runner::{Reconciler, Requeue},
};
use serde_json::{Value, json};
use skep_apiserver::selectors::LabelSelector;
use std::{collections::BTreeMap, sync::Arc, time::Duration};

pub const PDBS: crate::client::Gvr = ("policy", "v1", "poddisruptionbudgets");
const STATEFUL_SETS: crate::client::Gvr = ("apps", "v1", "statefulsets");
/// How long a granted eviction keeps its pod out of the healthy count.
const DISRUPTED_FOR: chrono::TimeDelta = chrono::TimeDelta::seconds(120);

#[derive(Debug)]
pub struct DisruptionController {
    client: Client,
    budgets: Arc<Informer>,
    pods: Arc<Informer>,
    replica_sets: Arc<Informer>,
    stateful_sets: Arc<Informer>,
}

/// A budget's selector: absent selects nothing, `{}` every pod of the
/// namespace (policy/v1 semantics).
pub fn budget_selector(pdb: &Value) -> Option<LabelSelector> {
    let s = pdb.pointer("/spec/selector")?;
    if s.is_null() {
        return None;
    }
    LabelSelector::from_json(s).ok()
}

/// An `IntOrString` against `total`: an integer as is, a percentage of
/// `total` rounded up (upstream rounds both minAvailable and
/// maxUnavailable percentages up).
fn scaled(v: &Value, total: i64) -> Option<i64> {
    if let Some(n) = v.as_i64() {
        return Some(n);
    }
    let p: i64 = v.as_str()?.strip_suffix('%')?.parse().ok()?;
    Some((p * total + 99) / 100)
}

/// What the status says, computed from the pods.
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    expected: i64,
    healthy: i64,
    desired: i64,
}

impl Counts {
    fn allowed(&self) -> i64 {
        (self.healthy - self.desired).max(0)
    }
}

impl DisruptionController {
    pub fn start(
        client: &Client,
        informers: &Informers,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let queue = Queue::new();
        let c = Arc::new(Self {
            client: client.clone(),
            budgets: informers.get_or_create(client.info(PDBS)?),
            pods: informers.get_or_create(client.info(PODS)?),
            replica_sets: informers.get_or_create(client.info(REPLICA_SETS)?),
            stateful_sets: informers.get_or_create(client.info(STATEFUL_SETS)?),
        });
        let q = queue.clone();
        c.budgets.on_change(Arc::new(move |ch: &Change| {
            if let Some(b) = &ch.new {
                q.add(meta::key(b));
            }
        }));
        // A pod change concerns the budgets of its namespace that select
        // it (before or after the change).
        let (q, weak) = (queue.clone(), Arc::downgrade(&c));
        c.pods.on_change(Arc::new(move |ch: &Change| {
            let Some(c) = weak.upgrade() else { return };
            let Some(ns) = ch.object().and_then(|o| meta::namespace(o)) else {
                return;
            };
            for b in c.budgets.list_ns(ns) {
                let Some(sel) = budget_selector(&b) else {
                    continue;
                };
                if [&ch.old, &ch.new]
                    .into_iter()
                    .flatten()
                    .any(|p| sel.matches(&meta::labels(p)))
                {
                    q.add(meta::key(&b));
                }
            }
        }));
        Ok(crate::runner::spawn(c, queue, 1))
    }

    /// The scale behind `pods`: each controller's replicas once, plus one
    /// per pod without a (known) controller.
    fn expected_by_scale(&self, pods: &[Arc<Value>]) -> i64 {
        let mut controllers: BTreeMap<String, i64> = BTreeMap::new();
        let mut loose = 0;
        for p in pods {
            let scale = [
                ("ReplicaSet", &self.replica_sets),
                ("StatefulSet", &self.stateful_sets),
            ]
            .into_iter()
            .find_map(|(kind, inf)| {
                let key = meta::controller_key(p, kind)?;
                let owner = inf.get(&key)?;
                let n = owner.pointer("/spec/replicas").and_then(Value::as_i64)?;
                Some((key, n))
            });
            match scale {
                Some((key, n)) => {
                    controllers.insert(key, n);
                }
                None => loose += 1,
            }
        }
        controllers.values().sum::<i64>() + loose
    }

    fn counts(&self, pdb: &Value, pods: &[Arc<Value>], disrupted: &[String]) -> Counts {
        let spec = pdb.get("spec").cloned().unwrap_or(Value::Null);
        let healthy = pods
            .iter()
            .filter(|p| {
                meta::pod_ready(p)
                    && !meta::is_deleting(p)
                    && !disrupted.iter().any(|d| d == meta::name(p))
            })
            .count() as i64;
        let (expected, desired) = match (spec.get("minAvailable"), spec.get("maxUnavailable")) {
            (Some(min), _) if min.is_i64() => (pods.len() as i64, min.as_i64().unwrap_or(0)),
            (Some(min), _) if !min.is_null() => {
                let expected = self.expected_by_scale(pods);
                (expected, scaled(min, expected).unwrap_or(expected))
            }
            (_, Some(max)) if !max.is_null() => {
                let expected = self.expected_by_scale(pods);
                let max = scaled(max, expected).unwrap_or(0);
                (expected, (expected - max).max(0))
            }
            // Neither: nothing may be disrupted (the API's validation
            // requires one; this is the safe reading of a broken object).
            _ => (pods.len() as i64, pods.len() as i64),
        };
        Counts {
            expected,
            healthy,
            desired,
        }
    }
}

#[async_trait::async_trait]
impl Reconciler for DisruptionController {
    fn name(&self) -> &'static str {
        "disruption"
    }

    async fn reconcile(&self, key: &str) -> Result<Requeue> {
        let Some(pdb) = self.budgets.get(key) else {
            return Ok(Requeue::No);
        };
        let ns = meta::namespace(&pdb).unwrap_or("default").to_owned();
        let pods: Vec<Arc<Value>> = match budget_selector(&pdb) {
            Some(sel) => self
                .pods
                .list_ns(&ns)
                .into_iter()
                .filter(|p| !meta::pod_terminal(p) && sel.matches(&meta::labels(p)))
                .collect(),
            None => Vec::new(),
        };
        // Granted evictions still pending, minus the stale ones and the
        // pods already gone.
        let now = chrono::Utc::now();
        let mut disrupted = serde_json::Map::new();
        let mut recheck = None;
        if let Some(m) = pdb
            .pointer("/status/disruptedPods")
            .and_then(Value::as_object)
        {
            for (name, at) in m {
                let since = at
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| now - t.with_timezone(&chrono::Utc));
                let live = pods.iter().any(|p| meta::name(p) == name);
                if let Some(since) = since
                    && since < DISRUPTED_FOR
                    && live
                {
                    disrupted.insert(name.clone(), at.clone());
                    let left = (DISRUPTED_FOR - since).to_std().unwrap_or_default();
                    recheck = Some(recheck.map_or(left, |r: Duration| r.min(left)));
                }
            }
        }
        let names: Vec<String> = disrupted.keys().cloned().collect();
        let counts = self.counts(&pdb, &pods, &names);
        let allowed = counts.allowed();
        let (cond_status, reason, message) = if allowed > 0 {
            ("True", "SufficientPods", String::new())
        } else {
            ("False", "InsufficientPods", String::new())
        };
        let old_cond = meta::condition(&pdb, "DisruptionAllowed");
        let transition = match old_cond {
            Some(c) if c.get("status").and_then(Value::as_str) == Some(cond_status) => c
                .get("lastTransitionTime")
                .cloned()
                .unwrap_or_else(|| json!(meta::now_rfc3339())),
            _ => json!(meta::now_rfc3339()),
        };
        let status = json!({
            "observedGeneration": meta::generation(&pdb),
            "disruptedPods": disrupted,
            "disruptionsAllowed": allowed,
            "currentHealthy": counts.healthy,
            "desiredHealthy": counts.desired,
            "expectedPods": counts.expected,
            "conditions": [{
                "type": "DisruptionAllowed", "status": cond_status, "reason": reason,
                "message": message, "observedGeneration": meta::generation(&pdb),
                "lastTransitionTime": transition,
            }],
        });
        let old = pdb.get("status").cloned().unwrap_or(Value::Null);
        if old != status {
            // A full replacement of the status, on the version read: an
            // eviction granted meanwhile (which also writes the status)
            // makes this a conflict, retried with its disruptedPods.
            let mut updated = (*pdb).clone();
            updated["status"] = status;
            let info = self.client.info(PDBS)?;
            let route = skep_apiserver::routes::ResourceRoute {
                info,
                namespace: Some(ns.clone()),
                name: Some(meta::name(&pdb).to_owned()),
                subresource: Some("status".into()),
            };
            crate::client::ignore_not_found(
                self.client
                    .api
                    .update(&route, updated, &skep_apiserver::api::Query::new())
                    .await
                    .map_err(crate::Error::from),
            )?;
        }
        Ok(recheck.map_or(Requeue::No, |d| {
            Requeue::After(d + Duration::from_millis(100))
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn percentages_round_up_and_integers_pass_through() {
        assert_eq!(scaled(&json!(2), 10), Some(2));
        assert_eq!(scaled(&json!("50%"), 3), Some(2));
        assert_eq!(scaled(&json!("34%"), 3), Some(2));
        assert_eq!(scaled(&json!("0%"), 3), Some(0));
        assert_eq!(scaled(&json!("x"), 3), None);
    }

    #[test]
    fn empty_selector_selects_all_and_absent_none() {
        let all = budget_selector(&json!({"spec": {"selector": {}}})).unwrap();
        assert!(all.matches(&BTreeMap::new()));
        assert!(budget_selector(&json!({"spec": {}})).is_none());
        assert!(budget_selector(&json!({"spec": {"selector": null}})).is_none());
    }

    #[test]
    fn allowed_is_healthy_beyond_desired() {
        let c = Counts {
            expected: 3,
            healthy: 3,
            desired: 2,
        };
        assert_eq!(c.allowed(), 1);
        let c = Counts {
            expected: 3,
            healthy: 1,
            desired: 2,
        };
        assert_eq!(c.allowed(), 0);
    }
}
