//! PodTopologySpread: `spec.topologySpreadConstraints` of the pod being
//! scheduled. For each constraint, the pods of the pod's namespace that
//! its labelSelector matches are counted per topology domain (the value of
//! `topologyKey` on their node) over the nodes the pod could use (its
//! nodeSelector and required node affinity — upstream's default
//! `nodeAffinityPolicy: Honor` — and having the key). Placing the pod in a
//! domain makes that domain's count +1 (when the pod matches its own
//! selector); the skew is that minus the smallest count of any eligible
//! domain (0 when fewer domains exist than `minDomains`).
//!
//! * `whenUnsatisfiable: DoNotSchedule` — a filter: a node without the key,
//!   or whose domain would exceed `maxSkew`, is rejected.
//! * `ScheduleAnyway` — a score: emptier domains score higher (0–100).

use crate::meta;
use serde_json::Value;
use skep_apiserver::selectors::LabelSelector;
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

#[derive(Debug)]
struct Constraint {
    max_skew: i64,
    key: String,
    hard: bool,
    /// Matching pods per domain, every eligible domain present.
    counts: HashMap<String, i64>,
    /// The smallest count of any eligible domain (0 below minDomains).
    min: i64,
    max: i64,
    /// Whether the pod matches its own selector (then it adds 1).
    self_match: i64,
}

/// Why a node fails the hard constraints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misfit {
    MissingLabel,
    Skew,
}

/// The constraints of one pod, counted once per decision.
#[derive(Debug)]
pub struct Spread {
    constraints: Vec<Constraint>,
}

pub fn needed(pod: &Value) -> bool {
    pod.pointer("/spec/topologySpreadConstraints")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
}

impl Spread {
    /// `nodes`: every node's labels and whether the pod's node selection
    /// admits it; `placed`: pods by the node they are on.
    pub fn new(
        pod: &Value,
        nodes: &[(String, BTreeMap<String, String>, bool)],
        placed: &HashMap<String, Vec<Arc<Value>>>,
    ) -> Self {
        let ns = meta::namespace(pod).unwrap_or("default");
        let own = meta::labels(pod);
        let mut constraints = Vec::new();
        let list = pod
            .pointer("/spec/topologySpreadConstraints")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for c in list {
            let Some(key) = c.get("topologyKey").and_then(Value::as_str) else {
                continue;
            };
            // A constraint without a selector counts nothing (upstream).
            let selector = c
                .get("labelSelector")
                .and_then(|s| LabelSelector::from_json(s).ok());
            let max_skew = c.get("maxSkew").and_then(Value::as_i64).unwrap_or(1).max(1);
            let hard = c.get("whenUnsatisfiable").and_then(Value::as_str) != Some("ScheduleAnyway");
            let min_domains = c.get("minDomains").and_then(Value::as_i64).unwrap_or(1);
            let mut counts: HashMap<String, i64> = HashMap::new();
            for (name, labels, eligible) in nodes {
                let Some(domain) = labels.get(key).filter(|_| *eligible) else {
                    continue;
                };
                let matching = selector.as_ref().map_or(0, |sel| {
                    placed
                        .get(name)
                        .into_iter()
                        .flatten()
                        .filter(|p| {
                            meta::namespace(p) == Some(ns)
                                && !meta::is_deleting(p)
                                && sel.matches(&meta::labels(p))
                        })
                        .count() as i64
                });
                *counts.entry(domain.clone()).or_default() += matching;
            }
            let min = if (counts.len() as i64) < min_domains {
                0
            } else {
                counts.values().copied().min().unwrap_or(0)
            };
            let max = counts.values().copied().max().unwrap_or(0);
            let self_match = i64::from(selector.as_ref().is_some_and(|s| s.matches(&own)));
            constraints.push(Constraint {
                max_skew,
                key: key.to_owned(),
                hard,
                counts,
                min,
                max,
                self_match,
            });
        }
        Self { constraints }
    }

    /// The hard constraints' verdict on a node with `labels`.
    pub fn check(&self, labels: &BTreeMap<String, String>) -> Option<Misfit> {
        for c in self.constraints.iter().filter(|c| c.hard) {
            let Some(domain) = labels.get(&c.key) else {
                return Some(Misfit::MissingLabel);
            };
            let count = c.counts.get(domain).copied().unwrap_or(0);
            if count + c.self_match - c.min > c.max_skew {
                return Some(Misfit::Skew);
            }
        }
        None
    }

    /// The soft constraints' score for a node, 0–100 (100: its domains
    /// are the emptiest); 100 when there are none.
    pub fn score(&self, labels: &BTreeMap<String, String>) -> i64 {
        let soft: Vec<&Constraint> = self.constraints.iter().filter(|c| !c.hard).collect();
        if soft.is_empty() {
            return 100;
        }
        let total: i64 = soft
            .iter()
            .map(|c| {
                let Some(domain) = labels.get(&c.key) else {
                    // No domain: as bad as the fullest one.
                    return 0;
                };
                let count = c.counts.get(domain).copied().unwrap_or(0);
                let range = (c.max - c.min).max(1);
                100 * (c.max - count.min(c.max)) / range
            })
            .sum();
        total / soft.len() as i64
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn labels(zone: Option<&str>) -> BTreeMap<String, String> {
        zone.map(|z| BTreeMap::from([("zone".to_owned(), z.to_owned())]))
            .unwrap_or_default()
    }

    fn pod(name: &str) -> Arc<Value> {
        Arc::new(json!({"metadata": {"name": name, "namespace": "d", "labels": {"app": "web"}}}))
    }

    fn spreading(when: &str) -> Value {
        json!({"metadata": {"name": "new", "namespace": "d", "labels": {"app": "web"}},
               "spec": {"topologySpreadConstraints": [{
                   "maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": when,
                   "labelSelector": {"matchLabels": {"app": "web"}}}]}})
    }

    fn nodes() -> Vec<(String, BTreeMap<String, String>, bool)> {
        vec![
            ("a1".into(), labels(Some("a")), true),
            ("a2".into(), labels(Some("a")), true),
            ("b1".into(), labels(Some("b")), true),
            ("x".into(), labels(None), true),
        ]
    }

    #[test]
    fn hard_constraint_keeps_zones_within_max_skew() {
        // Zone a has 2 pods, zone b 1: a third in a would make skew 2.
        let placed = HashMap::from([
            ("a1".to_owned(), vec![pod("p1")]),
            ("a2".to_owned(), vec![pod("p2")]),
            ("b1".to_owned(), vec![pod("p3")]),
        ]);
        let s = Spread::new(&spreading("DoNotSchedule"), &nodes(), &placed);
        assert_eq!(s.check(&labels(Some("a"))), Some(Misfit::Skew));
        assert_eq!(s.check(&labels(Some("b"))), None);
        assert_eq!(s.check(&labels(None)), Some(Misfit::MissingLabel));
    }

    #[test]
    fn ineligible_nodes_do_not_make_domains() {
        // Zone b exists only on a node the pod cannot use: it does not
        // hold the minimum at 0.
        let mut n = nodes();
        n[2].2 = false;
        let placed = HashMap::from([("a1".to_owned(), vec![pod("p1")])]);
        let s = Spread::new(&spreading("DoNotSchedule"), &n, &placed);
        assert_eq!(s.check(&labels(Some("a"))), None);
    }

    #[test]
    fn soft_constraint_prefers_the_emptier_zone() {
        let placed = HashMap::from([("a1".to_owned(), vec![pod("p1"), pod("p2")])]);
        let s = Spread::new(&spreading("ScheduleAnyway"), &nodes(), &placed);
        assert!(s.check(&labels(Some("a"))).is_none(), "soft never filters");
        assert!(s.score(&labels(Some("b"))) > s.score(&labels(Some("a"))));
    }

    #[test]
    fn other_namespaces_and_other_labels_do_not_count() {
        let other_ns = Arc::new(
            json!({"metadata": {"name": "o", "namespace": "e", "labels": {"app": "web"}}}),
        );
        let other_app =
            Arc::new(json!({"metadata": {"name": "q", "namespace": "d", "labels": {"app": "db"}}}));
        let placed = HashMap::from([("a1".to_owned(), vec![other_ns, other_app, pod("p1")])]);
        let s = Spread::new(&spreading("DoNotSchedule"), &nodes(), &placed);
        // a: 1, b: 0 → another in a is skew 2.
        assert_eq!(s.check(&labels(Some("a"))), Some(Misfit::Skew));
    }
}
