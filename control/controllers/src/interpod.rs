//! Scheduling filters that look at the pods already on nodes: host port
//! conflicts and required inter-pod affinity / anti-affinity (terms with
//! a labelSelector, namespaces — the pod's own by default — and a
//! topologyKey). Only computed for pods that ask for them, since they need
//! a pass over every placed pod.

use crate::meta;
use serde_json::Value;
use skep_apiserver::selectors::LabelSelector;
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

/// (protocol, host IP, port) a container binds on its node.
fn host_ports(p: &Value) -> Vec<(String, String, i64)> {
    p.pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|c| {
            c.get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .filter_map(|port| {
            let hp = port
                .get("hostPort")
                .and_then(Value::as_i64)
                .filter(|p| *p > 0)?;
            let proto = port
                .get("protocol")
                .and_then(Value::as_str)
                .unwrap_or("TCP");
            let ip = port
                .get("hostIP")
                .and_then(Value::as_str)
                .unwrap_or("0.0.0.0");
            Some((proto.to_owned(), ip.to_owned(), hp))
        })
        .collect()
}

#[derive(Debug)]
struct Term {
    selector: LabelSelector,
    namespaces: HashSet<String>,
    topology_key: String,
    anti: bool,
}

fn parse_term(t: &Value, own_ns: &str, anti: bool) -> Option<Term> {
    let selector = t
        .get("labelSelector")
        .and_then(|s| LabelSelector::from_json(s).ok())?;
    let mut namespaces: HashSet<String> = t
        .get("namespaces")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if namespaces.is_empty() {
        namespaces.insert(own_ns.to_owned());
    }
    Some(Term {
        selector,
        namespaces,
        topology_key: t
            .get("topologyKey")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        anti,
    })
}

fn terms(pod: &Value) -> Vec<Term> {
    let own_ns = meta::namespace(pod).unwrap_or("default");
    let mut out = Vec::new();
    for (kind, anti) in [("podAffinity", false), ("podAntiAffinity", true)] {
        let list = pod
            .pointer(&format!(
                "/spec/affinity/{kind}/requiredDuringSchedulingIgnoredDuringExecution"
            ))
            .and_then(Value::as_array);
        out.extend(
            list.into_iter()
                .flatten()
                .filter_map(|t| parse_term(t, own_ns, anti)),
        );
    }
    out
}

/// The preferred terms: (weight, term); anti-affinity terms count
/// against a node.
fn preferred_terms(pod: &Value) -> Vec<(i64, Term)> {
    let own_ns = meta::namespace(pod).unwrap_or("default");
    let mut out = Vec::new();
    for (kind, anti) in [("podAffinity", false), ("podAntiAffinity", true)] {
        let list = pod
            .pointer(&format!(
                "/spec/affinity/{kind}/preferredDuringSchedulingIgnoredDuringExecution"
            ))
            .and_then(Value::as_array);
        for w in list.into_iter().flatten() {
            let Some(weight) = w.get("weight").and_then(Value::as_i64) else {
                continue;
            };
            if let Some(t) = w
                .get("podAffinityTerm")
                .and_then(|t| parse_term(t, own_ns, anti))
            {
                out.push((if anti { -weight } else { weight }, t));
            }
        }
    }
    out
}

/// Whether the pod has any pod affinity or anti-affinity, required or
/// preferred (placed pods with one weigh on other pods' scores).
pub fn has_any_affinity(pod: &Value) -> bool {
    pod.pointer("/spec/affinity/podAffinity").is_some()
        || pod.pointer("/spec/affinity/podAntiAffinity").is_some()
}

/// Upstream's weight of a placed pod's required affinity when scoring the
/// pods it selects (hardPodAffinityWeight).
const HARD_AFFINITY_WEIGHT: i64 = 1;

/// InterPodAffinity scoring: per topology domain, the weights of the
/// pod's preferred terms times the matching pods there, plus the terms of
/// placed pods that select this pod (symmetry).
#[derive(Debug, Default)]
pub struct Preferences {
    /// topologyKey → value → summed weight.
    domains: HashMap<String, HashMap<String, i64>>,
}

impl Preferences {
    /// `affine`: the placed pods that have pod affinity of their own, by
    /// node.
    pub fn new(
        pod: &Value,
        placed: &HashMap<String, Vec<Arc<Value>>>,
        affine: &[(String, Arc<Value>)],
        node_labels: &HashMap<String, std::collections::BTreeMap<String, String>>,
    ) -> Self {
        let mut out = Self::default();
        let mut add = |node: &str, key: &str, w: i64| {
            if let Some(v) = node_labels.get(node).and_then(|l| l.get(key)) {
                *out.domains
                    .entry(key.to_owned())
                    .or_default()
                    .entry(v.clone())
                    .or_default() += w;
            }
        };
        for (w, t) in preferred_terms(pod) {
            for (node, ps) in placed {
                let n = ps
                    .iter()
                    .filter(|p| {
                        meta::namespace(p).is_some_and(|ns| t.namespaces.contains(ns))
                            && t.selector.matches(&meta::labels(p))
                    })
                    .count() as i64;
                if n > 0 {
                    add(node, &t.topology_key, w * n);
                }
            }
        }
        let own_labels = meta::labels(pod);
        let own_ns = meta::namespace(pod).unwrap_or("default");
        for (node, other) in affine {
            let mut weighted = preferred_terms(other);
            weighted.extend(
                terms(other)
                    .into_iter()
                    .filter(|t| !t.anti)
                    .map(|t| (HARD_AFFINITY_WEIGHT, t)),
            );
            for (w, t) in weighted {
                if t.namespaces.contains(own_ns) && t.selector.matches(&own_labels) {
                    add(node, &t.topology_key, w);
                }
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// The raw score of a node with these labels (normalized by the
    /// scheduler over the feasible nodes).
    pub fn score(&self, labels: &std::collections::BTreeMap<String, String>) -> i64 {
        self.domains
            .iter()
            .filter_map(|(k, values)| labels.get(k).and_then(|v| values.get(v)))
            .sum()
    }
}

pub fn has_anti_affinity(pod: &Value) -> bool {
    terms(pod).iter().any(|t| t.anti)
}

/// Whether the pod needs [`Neighbours`] at all.
pub fn needed(pod: &Value) -> bool {
    !host_ports(pod).is_empty() || !terms(pod).is_empty()
}

/// Why a node fails these filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misfit {
    HostPorts,
    PodAffinity,
    PodAntiAffinity,
}

/// The placed pods by node, and per affinity term the topology values
/// (node label values) of the nodes hosting matching pods.
#[derive(Debug)]
pub struct Neighbours {
    ports: Vec<(String, String, i64)>,
    used_ports: HashMap<String, Vec<(String, String, i64)>>,
    terms: Vec<(Term, HashSet<String>, bool)>,
    /// The pod matches its own affinity terms (the first of a group may
    /// then go anywhere, as upstream allows).
    self_match: Vec<bool>,
    /// (topologyKey, value) domains that placed pods' anti-affinity
    /// closes to this pod.
    forbidden: HashSet<(String, String)>,
}

impl Neighbours {
    /// `placed`: node name → pods on it; `node_labels`: node → labels.
    pub fn new(
        pod: &Value,
        placed: &HashMap<String, Vec<Arc<Value>>>,
        node_labels: &HashMap<String, std::collections::BTreeMap<String, String>>,
    ) -> Self {
        let ports = host_ports(pod);
        let used_ports = if ports.is_empty() {
            HashMap::new()
        } else {
            placed
                .iter()
                .map(|(n, ps)| (n.clone(), ps.iter().flat_map(|p| host_ports(p)).collect()))
                .collect()
        };
        let own_labels = meta::labels(pod);
        let own_ns = meta::namespace(pod).unwrap_or("default");
        let mut out_terms = Vec::new();
        let mut self_match = Vec::new();
        for t in terms(pod) {
            let mut values = HashSet::new();
            let mut any = false;
            for (node, ps) in placed {
                let hit = ps.iter().any(|p| {
                    meta::namespace(p).is_some_and(|ns| t.namespaces.contains(ns))
                        && t.selector.matches(&meta::labels(p))
                });
                if hit {
                    any = true;
                    if let Some(v) = node_labels.get(node).and_then(|l| l.get(&t.topology_key)) {
                        values.insert(v.clone());
                    }
                }
            }
            self_match.push(t.namespaces.contains(own_ns) && t.selector.matches(&own_labels));
            out_terms.push((t, values, any));
        }
        // Symmetry: a placed pod whose anti-affinity selects this pod
        // keeps it out of its topology domain.
        let mut forbidden = HashSet::new();
        for (node, ps) in placed {
            for p in ps {
                for t in terms(p).into_iter().filter(|t| t.anti) {
                    if t.namespaces.contains(own_ns)
                        && t.selector.matches(&own_labels)
                        && let Some(v) = node_labels.get(node).and_then(|l| l.get(&t.topology_key))
                    {
                        forbidden.insert((t.topology_key.clone(), v.clone()));
                    }
                }
            }
        }
        Self {
            ports,
            used_ports,
            terms: out_terms,
            self_match,
            forbidden,
        }
    }

    pub fn check(
        &self,
        node: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Option<Misfit> {
        if let Some(used) = self.used_ports.get(node) {
            let clash = self.ports.iter().any(|(proto, ip, port)| {
                used.iter().any(|(p2, ip2, port2)| {
                    proto == p2
                        && port == port2
                        && (ip == ip2 || ip == "0.0.0.0" || ip2 == "0.0.0.0")
                })
            });
            if clash {
                return Some(Misfit::HostPorts);
            }
        }
        if self.forbidden.iter().any(|(k, v)| labels.get(k) == Some(v)) {
            return Some(Misfit::PodAntiAffinity);
        }
        for ((t, values, any), self_match) in self.terms.iter().zip(&self.self_match) {
            let here = labels.get(&t.topology_key);
            if t.anti {
                if here.is_some_and(|v| values.contains(v)) {
                    return Some(Misfit::PodAntiAffinity);
                }
            } else {
                let ok = here.is_some_and(|v| values.contains(v)) || (!any && *self_match);
                if !ok {
                    return Some(Misfit::PodAffinity);
                }
            }
        }
        None
    }
}
