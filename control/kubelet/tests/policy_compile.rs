//! The NetworkPolicy compiler against the spec: cluster views with pods
//! over two nodes (namespaces x, y, z labelled ns=x|y|z; pods a, b, c
//! labelled pod=a|b|c), compiled for each node, judged with
//! `PolicyState::evaluate` (the decision the kernel hooks make) and
//! compared with the expected 9×9 matrix of each scenario.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use skep_dataplane::policy::{
    ID_ANY, ID_CIDR_FIRST, ID_HOST, ID_POD_FIRST, ID_REMOTE_NODE, ID_WORLD, POLICY_ID_HOST,
    POLICY_ID_NONE, PolicyDirection, PolicyState, Verdict,
};
use skep_kubelet::policy::{
    ClusterView, Compiled, Compiler,
    cluster::Kind,
    view::{ExplainError, explain},
};
use std::{collections::BTreeMap, net::Ipv4Addr};

const TCP: u8 = 6;
const UDP: u8 = 17;
const NSS: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const NODES: [(&str, Ipv4Addr); 2] = [
    ("n1", Ipv4Addr::new(192, 168, 0, 1)),
    ("n2", Ipv4Addr::new(192, 168, 0, 2)),
];
const WORLD: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);

/// Pod `ns/name`'s node index and address: spread over both nodes, n1's
/// pods in 10.42.0.0/24 and n2's in 10.42.1.0/24.
fn placement(ns: usize, pod: usize) -> (usize, Ipv4Addr) {
    let node = (ns + pod) % 2;
    let host = u8::try_from(10 + ns * 3 + pod).unwrap();
    (
        node,
        Ipv4Addr::new(10, 42, u8::try_from(node).unwrap(), host),
    )
}

fn pod_json(ns: &str, name: &str, node: &str, ip: Ipv4Addr, labels: Value) -> Value {
    // Every pod serves 80 and 81 on TCP and UDP (named as in the upstream
    // e2e suite); pod c gives "http" a different number than a and b.
    let http = if name == "c" { 8080 } else { 80 };
    json!({
        "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{ns}-{name}"), "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "serve", "ports": [
            {"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"},
            {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"},
            {"name": "serve-81-tcp", "containerPort": 81},
            {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"},
            {"name": "http", "containerPort": http}]}]},
        "status": {"phase": "Running", "podIP": ip.to_string()}
    })
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"namespace": ns, "name": name}, "spec": spec})
}

struct Cluster {
    view: ClusterView,
    compilers: BTreeMap<&'static str, Compiler>,
    states: BTreeMap<&'static str, Compiled>,
}

impl Cluster {
    fn new() -> Self {
        let mut view = ClusterView::default();
        for (name, ip) in NODES {
            view.upsert(
                Kind::Node,
                &json!({"metadata": {"name": name},
                        "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()},
                                                 {"type": "Hostname", "address": name}]}}),
            );
        }
        for (i, ns) in NSS.iter().enumerate() {
            view.upsert(
                Kind::Namespace,
                &json!({"metadata": {"name": ns, "labels": {"ns": ns}}}),
            );
            for (j, p) in PODS.iter().enumerate() {
                let (node, ip) = placement(i, j);
                view.upsert(
                    Kind::Pod,
                    &pod_json(ns, p, NODES[node].0, ip, json!({"pod": p})),
                );
            }
        }
        // A hostNetwork pod is the node: it must not appear as a pod.
        view.upsert(
            Kind::Pod,
            &json!({"metadata": {"namespace": "x", "name": "hostnet", "labels": {"pod": "a"}},
                    "spec": {"nodeName": "n1", "hostNetwork": true},
                    "status": {"phase": "Running", "podIP": "192.168.0.1"}}),
        );
        let mut c = Self {
            view,
            compilers: NODES.iter().map(|(n, _)| (*n, Compiler::new())).collect(),
            states: BTreeMap::new(),
        };
        c.compile();
        c
    }

    fn add(&mut self, p: Value) -> &mut Self {
        self.view.upsert(Kind::NetworkPolicy, &p);
        self.compile();
        self
    }

    fn compile(&mut self) {
        for (node, compiler) in &mut self.compilers {
            self.states.insert(node, compiler.compile(&self.view, node));
        }
    }

    fn state(&self, node: &str) -> &PolicyState {
        &self.states[node].state
    }

    fn ip(&self, pod: &str) -> Ipv4Addr {
        self.view.pods[pod].ip.unwrap()
    }

    fn node_of(&self, pod: &str) -> &str {
        &self.view.pods[pod].node
    }

    /// Egress check on the client's node, ingress check on the server's.
    fn verdicts(&self, from: &str, to: &str, proto: u8, port: u16) -> (Verdict, Verdict) {
        let (fi, ti) = (self.ip(from), self.ip(to));
        (
            self.state(self.node_of(from))
                .evaluate(fi, PolicyDirection::Egress, ti, proto, port),
            self.state(self.node_of(to))
                .evaluate(ti, PolicyDirection::Ingress, fi, proto, port),
        )
    }

    fn allowed(&self, from: &str, to: &str, proto: u8, port: u16) -> bool {
        let (e, i) = self.verdicts(from, to, proto, port);
        e != Verdict::Denied && i != Verdict::Denied
    }

    /// Compares all 81 pairs with `expect(from, to)`.
    fn expect(&self, what: &str, proto: u8, port: u16, expect: impl Fn(Pod, Pod) -> bool) {
        let mut wrong = Vec::new();
        for from in all_pods() {
            for to in all_pods() {
                let got = self.allowed(&from.key(), &to.key(), proto, port);
                if got != expect(from, to) {
                    wrong.push(format!(
                        "{} -> {}: got {}",
                        from.key(),
                        to.key(),
                        if got { "allowed" } else { "denied" }
                    ));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "{what} ({proto}/{port}): {} wrong verdicts:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }

    fn policy_id(&self, name: &str) -> u32 {
        let names = &self.states["n1"].snapshot.policy_names;
        *names
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .unwrap_or_else(|| panic!("no policy {name} in {names:?}"))
            .0
    }

    fn identity(&self, pod: &str) -> u32 {
        self.state("n1").lookup(self.ip(pod)).identity
    }
}

#[derive(Clone, Copy, Debug)]
struct Pod {
    ns: &'static str,
    name: &'static str,
}

impl Pod {
    fn key(self) -> String {
        format!("{}/{}", self.ns, self.name)
    }
}

fn all_pods() -> impl Iterator<Item = Pod> {
    NSS.iter()
        .flat_map(|ns| PODS.iter().map(move |name| Pod { ns, name }))
}

#[test]
fn no_policy_allows_everything() {
    let c = Cluster::new();
    c.expect("no policy", TCP, 80, |_, _| true);
    let s = c.state("n1");
    assert_eq!(s.endpoints.len(), 5, "n1 runs 5 of the 9 pods");
    assert!(s.rules.is_empty());
    assert!(
        s.endpoints
            .values()
            .all(|e| !e.ingress_isolated && !e.egress_isolated && e.endpoint != 0)
    );
    // The hostNetwork pod is the node, not a pod.
    assert_eq!(s.lookup(NODES[0].1).identity, ID_HOST);
    assert_eq!(c.state("n2").lookup(NODES[0].1).identity, ID_REMOTE_NODE);
    assert_eq!(s.lookup(WORLD).identity, ID_WORLD);
    assert!(!c.states["n1"].snapshot.pods_by_ip.contains_key(&NODES[0].1));
}

#[test]
fn deny_all_ingress_and_egress() {
    let mut c = Cluster::new();
    c.add(policy("x", "deny-in", json!({"podSelector": {}})));
    c.expect("deny all ingress to x", TCP, 80, |_, t| t.ns != "x");
    c.expect("deny all ingress to x (udp)", UDP, 81, |_, t| t.ns != "x");
    // The own node is admitted regardless (probes).
    let xa = c.ip("x/a");
    assert_eq!(
        c.state("n1")
            .evaluate(xa, PolicyDirection::Ingress, NODES[0].1, TCP, 80),
        Verdict::Allowed(POLICY_ID_HOST)
    );
    assert_eq!(
        c.state("n1")
            .evaluate(xa, PolicyDirection::Ingress, NODES[1].1, TCP, 80),
        Verdict::Denied,
        "another node is not the own node"
    );
    c.add(policy(
        "y",
        "deny-out",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    ));
    c.expect("deny in x, deny out y", TCP, 80, |f, t| {
        t.ns != "x" && f.ns != "y"
    });
}

#[test]
fn allow_same_namespace() {
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "same-ns",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
    ));
    c.expect("same namespace", TCP, 80, |f, t| t.ns != "x" || f.ns == "x");
}

#[test]
fn pod_selector_limits_targets_and_peers() {
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "b-to-a",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    ));
    c.expect("x/b → x/a only", TCP, 80, |f, t| {
        t.key() != "x/a" || f.key() == "x/b"
    });
}

#[test]
fn namespace_selector() {
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "from-y",
        json!({"podSelector": {}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
    ));
    c.expect("x admits y", UDP, 80, |f, t| t.ns != "x" || f.ns == "y");
    // By the name label kube-apiserver puts on every namespace.
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "from-z",
        json!({"podSelector": {}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "z"}}}]}]}),
    ));
    c.expect("x admits z by name", TCP, 80, |f, t| {
        t.ns != "x" || f.ns == "z"
    });
}

#[test]
fn and_versus_or_peers() {
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "and",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    ));
    c.expect("AND: only y/b", TCP, 80, |f, t| {
        t.key() != "x/a" || f.key() == "y/b"
    });
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "or",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
            {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    ));
    c.expect("OR: all of y, and x/b", TCP, 80, |f, t| {
        t.key() != "x/a" || f.ns == "y" || f.key() == "x/b"
    });
}

#[test]
fn match_expressions() {
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "exprs",
        json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]},
               "ingress": [{"from": [{
                   "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["y"]}]},
                   "podSelector": {"matchExpressions": [{"key": "pod", "operator": "Exists"},
                                                        {"key": "tier", "operator": "DoesNotExist"},
                                                        {"key": "pod", "operator": "NotIn", "values": ["c"]}]}}]}]}),
    ));
    c.expect("expressions", TCP, 81, |f, t| {
        !(t.ns == "x" && t.name != "c") || (f.ns != "y" && f.name != "c")
    });
}

#[test]
fn ports_protocols_and_end_port() {
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "tcp-80",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}),
    ));
    c.expect("x: 80/TCP open", TCP, 80, |_, _| true);
    c.expect("x: 81/TCP closed", TCP, 81, |_, t| t.ns != "x");
    c.expect("x: 80/UDP closed", UDP, 80, |_, t| t.ns != "x");
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "udp-all",
        json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}]}]}),
    ));
    c.expect("x: every UDP port", UDP, 4242, |_, _| true);
    c.expect("x: no TCP", TCP, 80, |_, t| t.ns != "x");
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "range",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}],
               "ports": [{"protocol": "TCP", "port": 80, "endPort": 81}]}]}),
    ));
    c.expect("endPort: 80", TCP, 80, |_, _| true);
    c.expect("endPort: 81", TCP, 81, |_, _| true);
    c.expect("endPort: 82", TCP, 82, |_, t| t.ns != "x");
    c.expect("endPort: 79", TCP, 79, |_, t| t.ns != "x");
    // SCTP is its own protocol.
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "sctp",
        json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "SCTP", "port": 80}]}]}),
    ));
    c.expect("sctp 80", 132, 80, |_, _| true);
    c.expect("tcp 80 under sctp policy", TCP, 80, |_, t| t.ns != "x");
}

#[test]
fn named_ports_ingress_resolve_on_the_local_pod() {
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "named",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http"}, {"port": "serve-81-udp", "protocol": "UDP"},
                                                       {"port": "no-such-port"}]}]}),
    ));
    // x/a and x/b name 80 "http", x/c 8080.
    c.expect("http on 80", TCP, 80, |_, t| t.ns != "x" || t.name != "c");
    c.expect("http on 8080", TCP, 8080, |_, t| {
        t.ns != "x" || t.name == "c"
    });
    c.expect("serve-81-udp", UDP, 81, |_, _| true);
    c.expect("81/TCP not named", TCP, 81, |_, t| t.ns != "x");
}

#[test]
fn named_ports_egress_resolve_per_destination() {
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "egress-named",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "http"}]}]}),
    ));
    c.expect("x/a → http on 80", TCP, 80, |f, t| {
        f.key() != "x/a" || t.name != "c"
    });
    c.expect("x/a → http on 8080", TCP, 8080, |f, t| {
        f.key() != "x/a" || t.name == "c"
    });
    // With no peer (any destination) the name still resolves per pod, and
    // to non-pods it resolves to nothing.
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "egress-any",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "egress": [{"ports": [{"port": "http"}]}]}),
    ));
    // (The policy has "egress" but no policyTypes: it isolates ingress
    // too, with no ingress rule.)
    c.expect("any → http on 8080", TCP, 8080, |f, t| {
        t.key() != "x/a" && (f.key() != "x/a" || t.name == "c")
    });
    let s = c.state(c.node_of("x/a"));
    assert_eq!(
        s.evaluate(c.ip("x/a"), PolicyDirection::Egress, WORLD, TCP, 80),
        Verdict::Denied
    );
    c.expect("defaulted Ingress isolates x/a", UDP, 80, |f, t| {
        t.key() != "x/a" && f.key() != "x/a"
    });
}

#[test]
fn ip_block_with_except_covering_pod_ips() {
    let mut c = Cluster::new();
    // n1's pods are in 10.42.0.0/24, n2's in 10.42.1.0/24.
    c.add(policy(
        "x",
        "from-n1-pods",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
            {"ipBlock": {"cidr": "10.42.0.0/16", "except": ["10.42.1.0/24"]}}]}]}),
    ));
    let on_n1 = |p: Pod| {
        let i = NSS.iter().position(|n| *n == p.ns).unwrap();
        let j = PODS.iter().position(|n| *n == p.name).unwrap();
        placement(i, j).0 == 0
    };
    c.expect("ipBlock except", TCP, 80, |f, t| {
        t.key() != "x/a" || on_n1(f)
    });
    let xa = c.ip("x/a");
    let st = c.state(c.node_of("x/a"));
    assert_eq!(
        st.evaluate(xa, PolicyDirection::Ingress, WORLD, TCP, 80),
        Verdict::Denied
    );
    // A nested block inside the exception, from another policy: addresses
    // in it are still excepted for the first policy...
    let y_a = c.ip("y/a");
    assert!(!on_n1(Pod { ns: "y", name: "a" }));
    c.add(policy(
        "z",
        "nested",
        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": format!("{y_a}/32")}}]}]}),
    ));
    c.expect("nested prefix inside except", TCP, 80, |f, t| {
        (t.key() != "x/a" || on_n1(f)) && (t.ns != "z" || f.key() == "y/a")
    });
    let st = c.state("n1");
    let e = st.lookup(y_a);
    assert!(e.identity >= ID_POD_FIRST && e.identity < ID_CIDR_FIRST);
    assert!(
        e.cidr_identity >= ID_CIDR_FIRST,
        "pod /32 carries its block"
    );
    let block = st
        .ipcache
        .iter()
        .find(|(c, _)| c.len == 16)
        .map(|(_, e)| *e)
        .unwrap();
    assert_eq!(block.identity, block.cidr_identity);
    // Egress to the world but not to pods.
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "world-only",
        json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [
            {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.42.0.0/16"]}}]}]}),
    ));
    c.expect("egress world only", TCP, 80, |f, _| f.ns != "x");
    let xa = c.ip("x/a");
    assert!(matches!(
        c.state(c.node_of("x/a"))
            .evaluate(xa, PolicyDirection::Egress, WORLD, UDP, 53),
        Verdict::Allowed(_)
    ));
}

#[test]
fn multiple_policies_union_and_policy_ids() {
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "from-y",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
    ));
    c.add(policy(
        "x",
        "from-z",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}),
    ));
    c.expect("union", TCP, 80, |f, t| t.key() != "x/a" || f.ns != "x");
    let (id_y, id_z) = (c.policy_id("x/from-y"), c.policy_id("x/from-z"));
    assert!(id_y < id_z && id_y >= 1, "ids follow names at first sight");
    let (_, v) = c.verdicts("z/b", "x/a", TCP, 80);
    assert_eq!(v, Verdict::Allowed(id_z), "the allowing policy is reported");
    let (_, v) = c.verdicts("y/b", "x/a", TCP, 80);
    assert_eq!(v, Verdict::Allowed(id_y));
    // Same rule from two policies: the lower id is kept.
    c.add(policy(
        "x",
        "a-also-from-z",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}),
    ));
    let id_also = c.policy_id("x/a-also-from-z");
    assert!(id_also > id_z, "new policies get new numbers");
    let (_, v) = c.verdicts("z/b", "x/a", TCP, 80);
    assert_eq!(v, Verdict::Allowed(id_z));
    // Deleting a policy renumbers nobody; the duplicate now answers.
    c.view.remove(
        Kind::NetworkPolicy,
        &json!({"metadata": {"namespace": "x", "name": "from-z"}}),
    );
    c.compile();
    assert_eq!(c.policy_id("x/from-y"), id_y);
    assert_eq!(c.policy_id("x/a-also-from-z"), id_also);
    let (_, v) = c.verdicts("z/b", "x/a", TCP, 80);
    assert_eq!(v, Verdict::Allowed(id_also));
    // Unisolated directions report no policy.
    let (e, _) = c.verdicts("z/b", "x/a", TCP, 80);
    assert_eq!(e, Verdict::Allowed(POLICY_ID_NONE));
    // Updating a policy: same id, new rules.
    c.add(policy(
        "x",
        "from-y",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {}}]}]}),
    ));
    assert_eq!(c.policy_id("x/from-y"), id_y);
    c.expect("after update", TCP, 80, |f, t| {
        t.key() != "x/a" || f.ns != "y"
    });
}

#[test]
fn identities_are_stable_and_follow_labels() {
    let mut c = Cluster::new();
    let before: BTreeMap<String, u32> = all_pods()
        .map(|p| (p.key(), c.identity(&p.key())))
        .collect();
    // One per label set: 9 pods, 9 sets; numbers from ID_POD_FIRST.
    let mut ids: Vec<u32> = before.values().copied().collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 9);
    assert!(
        ids.iter()
            .all(|i| (ID_POD_FIRST..ID_CIDR_FIRST).contains(i))
    );
    // Both nodes number the same cluster alike.
    for p in all_pods() {
        assert_eq!(
            c.state("n2").lookup(c.ip(&p.key())).identity,
            before[&p.key()]
        );
    }
    // A second pod with x/a's labels shares its identity.
    c.view.upsert(
        Kind::Pod,
        &pod_json(
            "x",
            "a2",
            "n2",
            Ipv4Addr::new(10, 42, 1, 99),
            json!({"pod": "a"}),
        ),
    );
    c.add(policy(
        "x",
        "from-b",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    ));
    c.compile();
    for p in all_pods() {
        assert_eq!(c.identity(&p.key()), before[&p.key()], "{} moved", p.key());
    }
    assert_eq!(c.identity("x/a2"), before["x/a"]);
    // x/a's labels change: it moves to a new identity, x/a2 keeps the old.
    let (node, ip) = placement(0, 0);
    c.view.upsert(
        Kind::Pod,
        &pod_json("x", "a", NODES[node].0, ip, json!({"pod": "b"})),
    );
    c.compile();
    assert_eq!(c.identity("x/a"), before["x/b"], "same set as x/b now");
    assert_eq!(c.identity("x/a2"), before["x/a"]);
    c.expect("relabelled x/a is a b", TCP, 80, |f, t| {
        t.ns != "x" || (f.ns == "x" && (f.name == "b" || f.name == "a"))
    });
    c.view.upsert(
        Kind::Pod,
        &pod_json("x", "a", NODES[node].0, ip, json!({"pod": "a", "v": "2"})),
    );
    c.compile();
    let fresh = c.identity("x/a");
    assert!(
        !before.values().any(|i| *i == fresh),
        "a new label set gets a new number"
    );
    // Endpoint numbers stay with their pods.
    let eps: Vec<u32> = c
        .state("n1")
        .endpoints
        .values()
        .map(|e| e.endpoint)
        .collect();
    c.compile();
    let again: Vec<u32> = c
        .state("n1")
        .endpoints
        .values()
        .map(|e| e.endpoint)
        .collect();
    assert_eq!(eps, again);
    // Namespace labels are part of the identity.
    c.view.upsert(
        Kind::Namespace,
        &json!({"metadata": {"name": "y", "labels": {"ns": "y", "team": "blue"}}}),
    );
    c.compile();
    assert_ne!(c.identity("y/a"), before["y/a"]);
    assert_eq!(c.identity("z/a"), before["z/a"]);
    let snap = &c.states["n1"].snapshot;
    assert_eq!(
        snap.identities[&before["z/a"]],
        vec![
            "k8s:io.kubernetes.pod.namespace=z".to_string(),
            "pod=a".to_string()
        ]
    );
    assert_eq!(snap.identities[&ID_HOST], vec!["reserved:host".to_string()]);
    assert_eq!(snap.pods_by_ip[&c.ip("y/c")].name, "c");
}

#[test]
fn egress_only_policy_does_not_isolate_ingress() {
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "egress-to-y",
        json!({"podSelector": {}, "policyTypes": ["Egress"],
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "nobody"}}}]}],
               "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
    ));
    c.expect("egress only", TCP, 80, |f, t| f.ns != "x" || t.ns == "y");
    for e in c.state("n1").endpoints.values() {
        assert!(!e.ingress_isolated);
    }
    // An empty ingress rule list with policyTypes Ingress isolates; a
    // rule `{}` admits everything.
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "allow-all",
        json!({"podSelector": {}, "ingress": [{}]}),
    ));
    c.expect("allow all", TCP, 80, |_, _| true);
    let st = c.state("n1");
    assert!(st.endpoints.values().any(|e| e.ingress_isolated));
    assert!(st.rules.keys().all(|r| r.identity == ID_ANY));
}

#[test]
fn explain_reports_rules_and_sources() {
    let mut c = Cluster::new();
    c.add(policy(
        "x",
        "from-y",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]}),
    ));
    c.add(policy(
        "x",
        "also-from-y",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]}),
    ));
    let p = explain(&c.view, "x", "a").unwrap();
    assert!(p.ingress_isolated && !p.egress_isolated);
    assert_eq!(p.identity, c.identity("x/a"));
    assert_eq!(p.rules.len(), 1);
    assert_eq!(p.rules[0].identity, c.identity("y/b"));
    assert_eq!(p.rules[0].peer, "y {pod=b}");
    assert_eq!(p.rules[0].ports, "TCP/80");
    assert_eq!(p.rules[0].policies, vec!["x/also-from-y", "x/from-y"]);
    let text = p.to_string();
    println!("{text}");
    assert!(text.contains("Ingress: isolated"), "{text}");
    assert!(text.contains("Egress: not isolated"), "{text}");
    assert_eq!(
        explain(&c.view, "x", "nope"),
        Err(ExplainError::NotFound {
            namespace: "x".into(),
            name: "nope".into()
        })
    );
    assert!(matches!(
        explain(&c.view, "x", "hostnet"),
        Err(ExplainError::HostNetwork { .. })
    ));
}

/// 1,000 policies over 1,000 identities; prints the compile time.
#[test]
fn compile_1000_policies_over_1000_identities() {
    let mut view = ClusterView::default();
    for (name, ip) in NODES {
        view.upsert(
            Kind::Node,
            &json!({"metadata": {"name": name}, "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]}}),
        );
    }
    for n in 0..10 {
        view.upsert(
            Kind::Namespace,
            &json!({"metadata": {"name": format!("ns{n}"), "labels": {"team": format!("t{}", n % 3)}}}),
        );
    }
    for i in 0..1000u32 {
        let node = NODES[(i % 2) as usize].0;
        let ip = Ipv4Addr::new(10, 42, (i % 2) as u8, 0) | Ipv4Addr::from((i / 2) + 2);
        view.upsert(
            Kind::Pod,
            &pod_json(
                &format!("ns{}", i % 10),
                &format!("p{i}"),
                node,
                ip,
                json!({"app": format!("app{i}"), "tier": format!("t{}", i % 4)}),
            ),
        );
    }
    for i in 0..1000u32 {
        view.upsert(
            Kind::NetworkPolicy,
            &policy(
                &format!("ns{}", i % 10),
                &format!("pol{i}"),
                json!({"podSelector": {"matchLabels": {"app": format!("app{i}")}},
                       "policyTypes": ["Ingress", "Egress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": format!("t{}", i % 4)}}},
                                             {"namespaceSelector": {"matchLabels": {"team": "t1"}},
                                              "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": [format!("app{i}")]}]}}],
                                   "ports": [{"port": 80}, {"port": "http"}]}],
                       "egress": [{"to": [{"ipBlock": {"cidr": format!("172.{}.0.0/16", i % 200), "except": [format!("172.{}.1.0/24", i % 200)]}}]},
                                  {"to": [{"namespaceSelector": {"matchLabels": {"team": "t2"}}}], "ports": [{"port": "http"}, {"protocol": "UDP", "port": 53}]}]}),
            ),
        );
    }
    let mut compiler = Compiler::new();
    let started = std::time::Instant::now();
    let first = compiler.compile(&view, "n1");
    let cold = started.elapsed();
    let started = std::time::Instant::now();
    let second = compiler.compile(&view, "n1");
    let warm = started.elapsed();
    println!(
        "compile 1000 policies / {} identities / {} local endpoints: first {:?}, again {:?}; {} rules, {} ipcache entries",
        second.snapshot.identities.len(),
        second.state.endpoints.len(),
        cold,
        warm,
        second.state.rules.len(),
        second.state.ipcache.len()
    );
    assert_eq!(first.state, second.state, "a recompile changes nothing");
    assert!(second.state.identities().len() > 1000);
    assert_eq!(second.state.endpoints.len(), 500);
    assert!(second.state.endpoints.values().all(|e| e.ingress_isolated));
}

/// A datapath that hands every applied state to the test.
struct Recorder(tokio::sync::mpsc::UnboundedSender<PolicyState>);

impl skep_dataplane::policy::PolicyDatapath for Recorder {
    fn apply(
        &mut self,
        state: &PolicyState,
    ) -> Result<skep_dataplane::policy::ApplyStats, skep_dataplane::DataplaneError> {
        let _ = self.0.send(state.clone());
        Ok(skep_dataplane::policy::ApplyStats::default())
    }
}

/// Waits for the first applied state satisfying `ok`; returns it and the
/// time it took.
async fn applied(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<PolicyState>,
    what: &str,
    ok: impl Fn(&PolicyState) -> bool,
) -> (PolicyState, std::time::Duration) {
    let started = std::time::Instant::now();
    loop {
        let state = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no applied state where {what} within 10 s"))
            .expect("the policy task stopped");
        if ok(&state) {
            return (state, started.elapsed());
        }
    }
}

/// The agent's task against a real API server: it applies only after the
/// initial lists, and changes in policies and labels reach the datapath
/// within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_task_follows_the_api_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        std::sync::Arc::new(skep_store::SqliteStore::open(dir.path().join("state.db")).unwrap());
    let server = skep_apiserver::serve(
        skep_apiserver::ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_owned(),
            extra_sans: Vec::new(),
        },
        store,
    )
    .await
    .unwrap();
    let client = skep_client::Client::new(
        &format!("https://127.0.0.1:{}", server.local_addr.port()),
        server.credentials.ca_cert_pem.as_bytes(),
        skep_client::Auth::Token(server.credentials.admin_token.clone()),
    )
    .unwrap();
    client
        .create(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x", "labels": {"ns": "x"}}}),
        )
        .await
        .unwrap();
    for (name, ip) in NODES {
        client
            .create(
                "/api/v1/nodes",
                &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}),
            )
            .await
            .unwrap();
        client
            .merge_patch(
                &format!("/api/v1/nodes/{name}/status"),
                &json!({"status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]}}),
            )
            .await
            .unwrap();
    }
    for (i, p) in ["a", "b"].iter().enumerate() {
        let mut pod = pod_json(
            "x",
            p,
            "n1",
            Ipv4Addr::new(10, 42, 0, 10 + u8::try_from(i).unwrap()),
            json!({"pod": p}),
        );
        let status = pod["status"].take();
        pod["apiVersion"] = json!("v1");
        pod["kind"] = json!("Pod");
        pod["metadata"].as_object_mut().unwrap().remove("uid");
        pod["spec"]["containers"][0]["image"] = json!("busybox");
        client
            .create("/api/v1/namespaces/x/pods", &pod)
            .await
            .unwrap();
        client
            .merge_patch(
                &format!("/api/v1/namespaces/x/pods/{p}/status"),
                &json!({"status": status}),
            )
            .await
            .unwrap();
    }

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut snapshots =
        skep_kubelet::policy::spawn(client.clone(), "n1".into(), Box::new(Recorder(tx)));
    let (first, _) = applied(&mut rx, "the first state", |_| true).await;
    // The first state is built from all four lists.
    assert_eq!(first.endpoints.len(), 2, "{first:?}");
    assert_eq!(first.lookup(NODES[0].1).identity, ID_HOST);
    assert_eq!(first.lookup(NODES[1].1).identity, ID_REMOTE_NODE);
    assert!(first.endpoints.values().all(|e| !e.ingress_isolated));
    snapshots.changed().await.unwrap();
    assert_eq!(snapshots.borrow().pods_by_ip.len(), 2);
    let a = Ipv4Addr::new(10, 42, 0, 10);
    let b = Ipv4Addr::new(10, 42, 0, 11);

    client
        .create(
            "/apis/networking.k8s.io/v1/namespaces/x/networkpolicies",
            &policy(
                "x",
                "a-from-b",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            ),
        )
        .await
        .unwrap();
    let (state, took) = applied(&mut rx, "x/a is isolated", |s| {
        s.endpoints.get(&a).is_some_and(|e| e.ingress_isolated)
    })
    .await;
    println!("policy create → applied in {took:?}");
    assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
    assert!(matches!(
        state.evaluate(a, PolicyDirection::Ingress, b, TCP, 80),
        Verdict::Allowed(id) if id != POLICY_ID_NONE
    ));
    // The snapshot follows the applied state.
    let names = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        snapshots.wait_for(|s| !s.policy_names.is_empty()),
    )
    .await
    .expect("no snapshot with the policy")
    .unwrap()
    .policy_names
    .clone();
    assert_eq!(names.values().collect::<Vec<_>>(), vec!["x/a-from-b"]);

    // x/b's labels change: it leaves the peer set.
    client
        .merge_patch(
            "/api/v1/namespaces/x/pods/b",
            &json!({"metadata": {"labels": {"pod": "c"}}}),
        )
        .await
        .unwrap();
    let (_, took) = applied(&mut rx, "x/b is no longer admitted", |s| {
        s.evaluate(a, PolicyDirection::Ingress, b, TCP, 80) == Verdict::Denied
    })
    .await;
    println!("label change → applied in {took:?}");
    assert!(took < std::time::Duration::from_secs(1), "took {took:?}");

    // Deleting the policy lifts the isolation.
    client
        .delete("/apis/networking.k8s.io/v1/namespaces/x/networkpolicies/a-from-b")
        .await
        .unwrap();
    let (_, took) = applied(&mut rx, "x/a is open again", |s| {
        s.endpoints.get(&a).is_some_and(|e| !e.ingress_isolated) && s.rules.is_empty()
    })
    .await;
    assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
}

/// A datapath that refuses its first `failures` applies.
struct Flaky {
    failures: usize,
    tx: tokio::sync::mpsc::UnboundedSender<PolicyState>,
}

impl skep_dataplane::policy::PolicyDatapath for Flaky {
    fn apply(
        &mut self,
        state: &PolicyState,
    ) -> Result<skep_dataplane::policy::ApplyStats, skep_dataplane::DataplaneError> {
        if self.failures > 0 {
            self.failures -= 1;
            return Err(skep_dataplane::DataplaneError::Load(
                "refused by the test".into(),
            ));
        }
        let _ = self.tx.send(state.clone());
        Ok(skep_dataplane::policy::ApplyStats::default())
    }
}

/// A refused apply is retried without waiting for a change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_apply_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        std::sync::Arc::new(skep_store::SqliteStore::open(dir.path().join("state.db")).unwrap());
    let server = skep_apiserver::serve(
        skep_apiserver::ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_owned(),
            extra_sans: Vec::new(),
        },
        store,
    )
    .await
    .unwrap();
    let client = skep_client::Client::new(
        &format!("https://127.0.0.1:{}", server.local_addr.port()),
        server.credentials.ca_cert_pem.as_bytes(),
        skep_client::Auth::Token(server.credentials.admin_token.clone()),
    )
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _snapshots =
        skep_kubelet::policy::spawn(client, "n1".into(), Box::new(Flaky { failures: 1, tx }));
    let (_, took) = applied(&mut rx, "the retried state", |_| true).await;
    assert!(
        took < std::time::Duration::from_secs(3),
        "retried after {took:?}"
    );
}
