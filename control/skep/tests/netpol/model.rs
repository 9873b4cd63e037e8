//! A reference model of networking.k8s.io/v1 NetworkPolicy, written from
//! the API documentation and independent of skep's compiler: given the
//! pods, the namespaces' labels and the policies (as the JSON applied),
//! whether a new connection from one pod to another on a port is allowed.

use serde_json::Value;
use std::{collections::BTreeMap, net::Ipv4Addr};

#[derive(Clone, Debug)]
pub struct ModelPod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ip: Ipv4Addr,
    /// Container ports: (name, number, protocol "TCP"/"UDP").
    pub ports: Vec<(String, u16, String)>,
}

impl ModelPod {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

pub struct Model<'a> {
    pub pods: &'a [ModelPod],
    pub namespace_labels: &'a BTreeMap<String, BTreeMap<String, String>>,
    pub policies: &'a [Value],
}

fn labels_of(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// A LabelSelector (matchLabels AND every matchExpression); `{}` matches
/// everything.
pub fn selector_matches(sel: &Value, labels: &BTreeMap<String, String>) -> bool {
    for (k, v) in labels_of(&sel["matchLabels"]) {
        if labels.get(&k) != Some(&v) {
            return false;
        }
    }
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let key = e["key"].as_str().unwrap_or_default();
        let values: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let have = labels.get(key).map(String::as_str);
        let ok = match e["operator"].as_str().unwrap_or_default() {
            "In" => have.is_some_and(|h| values.contains(&h)),
            "NotIn" => have.is_none_or(|h| !values.contains(&h)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            other => panic!("model: unknown selector operator {other}"),
        };
        if !ok {
            return false;
        }
    }
    true
}

fn cidr_contains(cidr: &str, ip: Ipv4Addr) -> bool {
    let (addr, len) = cidr.split_once('/').expect("cidr with a prefix length");
    let addr: Ipv4Addr = addr.parse().expect("cidr address");
    let len: u32 = len.parse().expect("cidr length");
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(addr) & mask
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Ingress,
    Egress,
}

impl Model<'_> {
    fn ns_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.namespace_labels.get(ns).cloned().unwrap_or_default()
    }

    /// Upstream's defaulting of policyTypes.
    fn types(policy: &Value) -> Vec<String> {
        let given: Vec<String> = policy["spec"]["policyTypes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect();
        if !given.is_empty() {
            return given;
        }
        let mut t = vec!["Ingress".to_owned()];
        if policy["spec"]["egress"]
            .as_array()
            .is_some_and(|e| !e.is_empty())
        {
            t.push("Egress".to_owned());
        }
        t
    }

    /// Policies that select `pod` for `dir`.
    fn selecting(&self, pod: &ModelPod, dir: Dir) -> Vec<&Value> {
        let want = if dir == Dir::Ingress {
            "Ingress"
        } else {
            "Egress"
        };
        self.policies
            .iter()
            .filter(|p| p["metadata"]["namespace"].as_str() == Some(pod.namespace.as_str()))
            .filter(|p| selector_matches(&p["spec"]["podSelector"], &pod.labels))
            .filter(|p| Self::types(p).iter().any(|t| t == want))
            .collect()
    }

    fn peer_matches(&self, policy_ns: &str, peer: &Value, other: &ModelPod) -> bool {
        if let Some(block) = peer.get("ipBlock") {
            let cidr = block["cidr"].as_str().expect("ipBlock.cidr");
            let excepted = block["except"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .any(|e| cidr_contains(e, other.ip));
            return cidr_contains(cidr, other.ip) && !excepted;
        }
        let pod_sel = peer.get("podSelector");
        let ns_sel = peer.get("namespaceSelector");
        let ns_ok = match ns_sel {
            Some(sel) => selector_matches(sel, &self.ns_labels(&other.namespace)),
            None => other.namespace == policy_ns,
        };
        let pod_ok = pod_sel.is_none_or(|sel| selector_matches(sel, &other.labels));
        ns_ok && pod_ok
    }

    fn port_matches(rule: &Value, dst: &ModelPod, port: u16, proto: &str) -> bool {
        let Some(ports) = rule["ports"].as_array().filter(|p| !p.is_empty()) else {
            return true;
        };
        ports.iter().any(|p| {
            let p_proto = p["protocol"].as_str().unwrap_or("TCP");
            if p_proto != proto {
                return false;
            }
            match &p["port"] {
                Value::Null => true,
                Value::Number(n) => {
                    let first = n.as_u64().expect("port number") as u16;
                    let last = p["endPort"].as_u64().map_or(first, |e| e as u16);
                    (first..=last).contains(&port)
                }
                Value::String(name) => dst
                    .ports
                    .iter()
                    .any(|(n, num, pr)| n == name && *num == port && pr == proto),
                other => panic!("model: bad port {other}"),
            }
        })
    }

    /// Whether `pod`'s policies in `dir` admit `peer` (the other end) for
    /// a connection to `dst` on `port`/`proto`.
    fn admits(
        &self,
        pod: &ModelPod,
        dir: Dir,
        peer: &ModelPod,
        dst: &ModelPod,
        port: u16,
        proto: &str,
    ) -> bool {
        let policies = self.selecting(pod, dir);
        if policies.is_empty() {
            return true;
        }
        let (rules_key, peers_key) = match dir {
            Dir::Ingress => ("ingress", "from"),
            Dir::Egress => ("egress", "to"),
        };
        policies.iter().any(|p| {
            let ns = p["metadata"]["namespace"].as_str().unwrap_or_default();
            p["spec"][rules_key]
                .as_array()
                .into_iter()
                .flatten()
                .any(|rule| {
                    let peers_ok = match rule[peers_key].as_array().filter(|a| !a.is_empty()) {
                        None => true,
                        Some(peers) => peers.iter().any(|pe| self.peer_matches(ns, pe, peer)),
                    };
                    peers_ok && Self::port_matches(rule, dst, port, proto)
                })
        })
    }

    /// Whether a new connection from `src` to `dst` on `port`/`proto`
    /// ("TCP"/"UDP") is allowed. A pod always reaches itself.
    pub fn allowed(&self, src: &ModelPod, dst: &ModelPod, port: u16, proto: &str) -> bool {
        if src.ip == dst.ip {
            return true;
        }
        self.admits(src, Dir::Egress, dst, dst, port, proto)
            && self.admits(dst, Dir::Ingress, src, dst, port, proto)
    }
}
