//! Security identities shared across nodes, on a real 2-node cluster: the
//! server's allocator gives each label set one SecurityIdentity, and both
//! agents program exactly that number, whatever the history each agent has
//! seen (pods created in different orders on the two nodes, a label set
//! that came and went, an agent restarted in between: with per-node
//! numbering these histories would give different numbers). A label change
//! moves the pod to another identity on both nodes and new connections are
//! judged by it; the last pod of a label set gone, its SecurityIdentity is
//! deleted after the (shortened) grace period.
//!
//! What each node programmed is read from the flows each node's kernel
//! reports for a cross-node connection: the source node's `from-pod`
//! observation and the destination node's `to-pod` (or drop) observation
//! both carry the identities that node's ipcache gave the two addresses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod netpol;

use cluster::Cluster;
use netpol::probe::{self, Proto};
use serde_json::{Value, json};
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

const NS: &str = "idt";
/// The allocator's grace period in this test (60 s by default).
const GRACE: Duration = Duration::from_secs(10);

fn pod(name: &str, app: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": app}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "serve", "image": "host",
                "command": ["skep", "tools", "serve", "--tcp", "80"],
                "readinessProbe": {"tcpSocket": {"port": 80}, "periodSeconds": 1}
            }]
        }
    })
}

fn start_pod(c: &Cluster, name: &str, app: &str, node: usize) {
    c.apply(&pod(name, app, &c.nodes[node].name).to_string());
    c.wait_ready(NS, name);
}

/// The SecurityIdentities of this test's namespace: `app` label → numbers.
fn identities(c: &Cluster) -> BTreeMap<String, Vec<u32>> {
    let list: Value =
        serde_json::from_str(&c.kubectl_ok(&["get", "securityidentities", "-o", "json"])).unwrap();
    let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for item in list["items"].as_array().unwrap() {
        let labels = &item["securityLabels"];
        if labels["k8s:io.kubernetes.pod.namespace"] != NS {
            continue;
        }
        let id: u32 = item["metadata"]["name"].as_str().unwrap().parse().unwrap();
        let app = labels["pod:app"].as_str().unwrap_or_default().to_owned();
        assert_eq!(
            labels["namespace:team"], "blue",
            "namespace labels are part of the identity: {item}"
        );
        out.entry(app).or_default().push(id);
    }
    out
}

/// The one identity of label set `app=<app>`, waiting for it.
fn identity_of(c: &Cluster, app: &str) -> u32 {
    let mut found = None;
    c.wait_for(
        &format!("the SecurityIdentity of app={app}"),
        Duration::from_secs(20),
        |c| {
            found = identities(c).get(app).cloned();
            found.is_some()
        },
    );
    let ids = found.unwrap();
    assert_eq!(
        ids.len(),
        1,
        "one identity per label set: app={app} {ids:?}"
    );
    let id = ids[0];
    assert!(
        (256..1 << 23).contains(&id),
        "a shared number of the cluster range: {id}"
    );
    id
}

struct PodAt {
    ip: Ipv4Addr,
    netns: String,
}

fn pod_at(c: &Cluster, name: &str) -> PodAt {
    let p: Value =
        serde_json::from_str(&c.kubectl_ok(&["-n", NS, "get", "pod", name, "-o", "json"])).unwrap();
    PodAt {
        ip: p["status"]["podIP"].as_str().unwrap().parse().unwrap(),
        netns: skep_dataplane::podnet::netns_name(p["metadata"]["uid"].as_str().unwrap()),
    }
}

fn connect(from: &PodAt, to: &PodAt) -> bool {
    let (netns, ip) = (from.netns.clone(), to.ip);
    std::thread::spawn(move || probe::probe(&netns, Proto::Tcp, ip, 80))
        .join()
        .unwrap()
        .is_some()
}

fn flows(c: &Cluster, from: Ipv4Addr) -> Vec<Value> {
    let from = from.to_string();
    let out = c.ctl(&[
        "flows", "-o", "json", "--from", &from, "--port", "80", "--since", "5m",
    ]);
    assert!(
        out.status.success(),
        "skep ctl flows: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("flow line {l:?}: {e}")))
        .collect()
}

/// Waits until node `src_node` reported `from` leaving with identity
/// `src_id` towards `dst_id`, and node `dst_node` reported it arriving (or
/// dropped) with the same two numbers: both nodes' ipcaches agree.
#[allow(clippy::too_many_arguments)]
fn both_nodes_saw(
    c: &Cluster,
    what: &str,
    from: &PodAt,
    to: &PodAt,
    (src_node, dst_node): (usize, usize),
    (src_id, dst_id): (u32, u32),
    verdict: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let (src_name, dst_name) = (&c.nodes[src_node].name, &c.nodes[dst_node].name);
    let matches = |f: &Value, node: &str, observations: &[&str]| {
        f["node"] == node
            && f["destination"]["ip"] == to.ip.to_string().as_str()
            && f["source"]["identity"] == src_id
            && f["destination"]["identity"] == dst_id
            && observations.contains(&f["observation"].as_str().unwrap_or_default())
    };
    loop {
        let fl = flows(c, from.ip);
        let at_src = fl.iter().any(|f| matches(f, src_name, &["from-pod"]));
        let at_dst = fl
            .iter()
            .any(|f| f["verdict"] == verdict && matches(f, dst_name, &["to-pod", "xdp"]));
        if at_src && at_dst {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: expected {src_id} → {dst_id} ({verdict}) reported by {src_name} \
             (found: {at_src}) and {dst_name} (found: {at_dst}); flows:\n{}",
            fl.iter().map(|f| format!("{f}\n")).collect::<String>()
        );
        // One more connection: flows of earlier ones may predate the state.
        connect(from, to);
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn identities_are_shared_by_both_nodes() {
    let mut c = Cluster::start_with(
        1,
        &["--identity-gc-grace", &format!("{}s", GRACE.as_secs())],
    );
    c.apply(
        &json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": NS, "labels": {"team": "blue"}}})
        .to_string(),
    );

    // Different histories: node 0 runs a short-lived label set first and
    // then a, b; node 1 runs b, then a. The short-lived set is gone and
    // node 1's agent restarts (forgetting everything it numbered) before
    // the numbers are compared.
    start_pod(&c, "z0", "z", 0);
    let z = identity_of(&c, "z");
    start_pod(&c, "b1", "b", 1);
    start_pod(&c, "a0", "a", 0);
    start_pod(&c, "a1", "a", 1);
    start_pod(&c, "b0", "b", 0);
    let (a, b) = (identity_of(&c, "a"), identity_of(&c, "b"));
    assert!(a != b && a != z && b != z, "z={z} a={a} b={b}");
    c.kubectl_ok(&["-n", NS, "delete", "pod", "z0", "--wait=true"]);
    c.restart_node(1);
    c.wait_for("node 1 Ready again", Duration::from_secs(60), |c| {
        c.kubectl(&[
            "get",
            "node",
            &c.nodes[1].name,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
        .stdout
            == b"True"
    });

    // `kubectl get securityidentities` (and its short name) shows them.
    let table = c.kubectl_ok(&["get", "sid"]);
    println!("kubectl get sid:\n{table}");
    let header = table.lines().next().unwrap_or_default();
    for col in ["ID", "NAMESPACE", "LABELS", "AGE"] {
        assert!(header.contains(col), "column {col}: {table}");
    }
    let row_a = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(a.to_string().as_str()))
        .unwrap_or_else(|| panic!("a row for {a}: {table}"));
    assert!(
        row_a.contains(NS) && row_a.contains("pod:app=a") && row_a.contains("namespace:team=blue"),
        "{row_a}"
    );

    // Both directions across the nodes: each node's ipcache gives both
    // ends the shared numbers.
    let (a0, a1, b0, b1) = (
        pod_at(&c, "a0"),
        pod_at(&c, "a1"),
        pod_at(&c, "b0"),
        pod_at(&c, "b1"),
    );
    assert!(connect(&a0, &b1), "a0 → b1 before any policy");
    both_nodes_saw(&c, "a0 → b1", &a0, &b1, (0, 1), (a, b), "FORWARDED");
    assert!(connect(&a1, &b0), "a1 → b0 before any policy");
    both_nodes_saw(&c, "a1 → b0", &a1, &b0, (1, 0), (a, b), "FORWARDED");

    // b admits only a; a0 then changes label set.
    c.apply(
        &json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "b-from-a", "namespace": NS},
                "spec": {"podSelector": {"matchLabels": {"app": "b"}},
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                                      "ports": [{"port": 80, "protocol": "TCP"}]}]}})
        .to_string(),
    );
    c.wait_for(
        "a0 → b1 admitted by the policy",
        Duration::from_secs(15),
        |_| connect(&a0, &b1),
    );
    // `skep ctl policy` shows the shared numbers: b1's own, and a's as the
    // peer of its ingress rule (a fresh node-local numbering would have
    // given the first number, z's, to another set).
    let out = c.ctl(&["policy", &format!("{NS}/b1")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "skep ctl policy: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("Identity:") && l.contains(&b.to_string())),
        "b1's identity is {b}: {text}"
    );
    assert!(
        text.lines().any(|l| {
            l.split_whitespace().next() == Some(a.to_string().as_str()) && l.contains("app=a")
        }),
        "the ingress rule's peer is a's identity {a}: {text}"
    );
    let relabelled = Instant::now();
    c.kubectl_ok(&["-n", NS, "label", "pod", "a0", "app=x", "--overwrite"]);
    let x = identity_of(&c, "x");
    assert!(![a, b, z].contains(&x), "a new number for app=x: {x}");
    // New connections are judged by the new identity: denied.
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect(&a0, &b1) {
        assert!(
            Instant::now() < deadline,
            "a0 (now app=x) still reaches b1 10 s after the label change"
        );
    }
    both_nodes_saw(&c, "a0 (app=x) → b1", &a0, &b1, (0, 1), (x, b), "DROPPED");
    println!(
        "label change → both nodes on identity {x}: {:?}",
        relabelled.elapsed()
    );
    assert!(connect(&a1, &b0), "a1 (still app=a) → b0 admitted");

    // The last app=x pod goes: its identity stays for the grace period,
    // then is deleted; app=a keeps its number (a1 still uses it).
    c.kubectl_ok(&["-n", NS, "delete", "pod", "a0", "--wait=true"]);
    let gone_at = Instant::now();
    assert_eq!(
        identities(&c).get("x"),
        Some(&vec![x]),
        "kept during the grace period"
    );
    c.wait_for(
        "the unused identity of app=x to be deleted",
        GRACE + Duration::from_secs(40),
        |c| !identities(c).contains_key("x"),
    );
    let waited = gone_at.elapsed();
    println!("app=x identity deleted {waited:?} after its last pod");
    assert!(
        waited >= GRACE - Duration::from_secs(1),
        "deleted only after the grace period: {waited:?}"
    );
    let ids = identities(&c);
    assert_eq!(ids.get("a"), Some(&vec![a]), "{ids:?}");
    assert_eq!(ids.get("b"), Some(&vec![b]), "{ids:?}");
    // z0 went long before: its identity too.
    c.wait_for("the identity of app=z to be deleted", GRACE, |c| {
        !identities(c).contains_key("z")
    });
}
