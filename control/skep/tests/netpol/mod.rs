//! The NetworkPolicy test world, as upstream's e2e suite builds it:
//! namespaces x, y, z (labelled ns=x|y|z), pods a, b, c in each (labelled
//! pod=a|b|c) serving TCP and UDP on ports 80 and 81 (named
//! serve-80-tcp, serve-81-udp, …), spread over the cluster's nodes; a
//! reference model of the spec; and probes of every pair with real
//! connections from inside the pods' network namespaces.
#![allow(dead_code)]

pub mod model;
pub mod probe;

use crate::cluster::Cluster;
use model::{Model, ModelPod};
use probe::Proto;
use serde_json::{Value, json};
use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];

pub struct World {
    pub pods: Vec<ModelPod>,
    /// Pod id (`ns/name`) → its network namespace.
    pub netns: BTreeMap<String, String>,
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
}

fn pod_manifest(ns: &str, name: &str, node: &str) -> Value {
    let ports: Vec<Value> = [80u16, 81]
        .iter()
        .flat_map(|p| {
            [
                json!({"name": format!("serve-{p}-tcp"), "containerPort": p, "protocol": "TCP"}),
                json!({"name": format!("serve-{p}-udp"), "containerPort": p, "protocol": "UDP"}),
            ]
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "serve", "image": "host",
                "command": ["skep", "tools", "serve", "--tcp", "80,81", "--udp", "80,81"],
                "ports": ports,
                "readinessProbe": {"tcpSocket": {"port": 80}, "periodSeconds": 1}
            }]
        }
    })
}

impl World {
    /// Creates the namespaces and pods, pods placed round-robin over the
    /// nodes (so every namespace has pods on more than one node), and
    /// waits for all of them to be Ready.
    pub fn create(c: &Cluster) -> World {
        let mut docs = Vec::new();
        for ns in NAMESPACES {
            docs.push(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"ns": ns}}}));
        }
        let mut i = 0;
        for ns in NAMESPACES {
            for pod in PODS {
                let node = &c.nodes[i % c.nodes.len()].name;
                docs.push(pod_manifest(ns, pod, node));
                i += 1;
            }
        }
        let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
        c.apply(&list.to_string());
        for ns in NAMESPACES {
            for pod in PODS {
                c.wait_ready(ns, pod);
            }
        }
        let mut w = World {
            pods: Vec::new(),
            netns: BTreeMap::new(),
            namespace_labels: BTreeMap::new(),
        };
        w.refresh(c);
        w
    }

    /// Re-reads pods (labels, IPs) and namespace labels from the API.
    pub fn refresh(&mut self, c: &Cluster) {
        let pods: Value =
            serde_json::from_str(&c.kubectl_ok(&["get", "pods", "-A", "-o", "json"])).unwrap();
        self.pods.clear();
        for p in pods["items"].as_array().unwrap() {
            let ns = p["metadata"]["namespace"].as_str().unwrap();
            if !NAMESPACES.contains(&ns) {
                continue;
            }
            let name = p["metadata"]["name"].as_str().unwrap();
            let labels = p["metadata"]["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            let ip: Ipv4Addr = p["status"]["podIP"]
                .as_str()
                .unwrap_or_else(|| panic!("pod {ns}/{name} has no IP: {p}"))
                .parse()
                .unwrap();
            let ports = p["spec"]["containers"][0]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|cp| {
                    (
                        cp["name"].as_str().unwrap().to_owned(),
                        cp["containerPort"].as_u64().unwrap() as u16,
                        cp["protocol"].as_str().unwrap_or("TCP").to_owned(),
                    )
                })
                .collect();
            let uid = p["metadata"]["uid"].as_str().unwrap();
            self.netns.insert(
                format!("{ns}/{name}"),
                skep_dataplane::podnet::netns_name(uid),
            );
            self.pods.push(ModelPod {
                namespace: ns.to_owned(),
                name: name.to_owned(),
                labels,
                ip,
                ports,
            });
        }
        self.pods.sort_by_key(ModelPod::id);
        assert_eq!(self.pods.len(), 9, "nine test pods");
        let nss: Value =
            serde_json::from_str(&c.kubectl_ok(&["get", "namespaces", "-o", "json"])).unwrap();
        self.namespace_labels = nss["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                let labels = n["metadata"]["labels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                (n["metadata"]["name"].as_str().unwrap().to_owned(), labels)
            })
            .collect();
    }

    pub fn pod(&self, id: &str) -> &ModelPod {
        self.pods
            .iter()
            .find(|p| p.id() == id)
            .unwrap_or_else(|| panic!("no pod {id}"))
    }

    /// The model's and the cluster's answer for every pair, on each
    /// (port, protocol); the rendered mismatch (empty when they agree).
    pub fn check(&self, policies: &[Value], cases: &[(u16, Proto)]) -> String {
        let model = Model {
            pods: &self.pods,
            namespace_labels: &self.namespace_labels,
            policies,
        };
        let mut jobs = Vec::new();
        let mut expected = Vec::new();
        for &(port, proto) in cases {
            for src in &self.pods {
                for dst in &self.pods {
                    jobs.push((self.netns[&src.id()].clone(), proto, dst.ip, port));
                    expected.push(model.allowed(src, dst, port, proto.name()));
                }
            }
        }
        let got = probe::probe_all(&jobs);
        let mut report = String::new();
        let n = self.pods.len();
        for (ci, &(port, proto)) in cases.iter().enumerate() {
            let base = ci * n * n;
            let mut wrong = Vec::new();
            for (si, src) in self.pods.iter().enumerate() {
                for (di, dst) in self.pods.iter().enumerate() {
                    let k = base + si * n + di;
                    let answered = got[k].as_deref();
                    if let Some(a) = answered {
                        assert_eq!(
                            a,
                            dst.name,
                            "{} → {} {}:{port}/{} answered by the wrong server",
                            src.id(),
                            dst.id(),
                            dst.ip,
                            proto.name()
                        );
                    }
                    if answered.is_some() != expected[k] {
                        wrong.push(format!(
                            "{}→{} expected {} got {}",
                            src.id(),
                            dst.id(),
                            if expected[k] { "allow" } else { "deny" },
                            if answered.is_some() { "allow" } else { "deny" }
                        ));
                    }
                }
            }
            if !wrong.is_empty() {
                report.push_str(&format!(
                    "port {port}/{}:\n{}\n{}\n",
                    proto.name(),
                    render(
                        &self.pods,
                        &expected[base..base + n * n],
                        &got[base..base + n * n]
                    ),
                    wrong.join("\n")
                ));
            }
        }
        report
    }

    /// Checks until the cluster agrees with the model (policy changes take
    /// effect within about a second), failing with the matrices after a
    /// few rounds.
    pub fn expect(&self, c: &Cluster, scenario: &str, policies: &[Value], cases: &[(u16, Proto)]) {
        let mut last = String::new();
        for round in 0..4 {
            if round > 0 {
                std::thread::sleep(Duration::from_millis(700));
            }
            last = self.check(policies, cases);
            if last.is_empty() {
                return;
            }
        }
        let logs: String = c
            .nodes
            .iter()
            .map(|n| {
                let log = n.log();
                let lines: Vec<&str> = log.lines().collect();
                format!(
                    "--- {}\n{}\n",
                    n.name,
                    lines[lines.len().saturating_sub(30)..].join("\n")
                )
            })
            .collect();
        panic!("scenario `{scenario}`: the cluster disagrees with the model\n{last}\n{logs}");
    }
}

/// A matrix: rows sources, columns destinations; `.` agree-allow,
/// `X` agree-deny, `!` allowed but expected denied, `?` denied but
/// expected allowed.
fn render(pods: &[ModelPod], expected: &[bool], got: &[Option<String>]) -> String {
    let n = pods.len();
    let mut s = String::from("      ");
    for p in pods {
        s.push_str(&format!("{:>4}", p.id()));
    }
    s.push('\n');
    for (si, src) in pods.iter().enumerate() {
        s.push_str(&format!("{:>6}", src.id()));
        for di in 0..n {
            let k = si * n + di;
            let cell = match (expected[k], got[k].is_some()) {
                (true, true) => '.',
                (false, false) => 'X',
                (false, true) => '!',
                (true, false) => '?',
            };
            s.push_str(&format!("{cell:>4}"));
        }
        s.push('\n');
    }
    s
}

/// A NetworkPolicy document.
pub fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec
    })
}
