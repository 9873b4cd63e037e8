//! NetworkPolicy truth tables on a real 2-node cluster: for every scenario
//! of upstream's e2e network-policy suite (and a few more), the policies
//! are applied, all 81 pod pairs are probed with real TCP and UDP
//! connections, and the result must equal the reference model's matrix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod netpol;

use cluster::Cluster;
use netpol::{World, policy, probe::Proto};
use serde_json::{Value, json};

const TCP80: (u16, Proto) = (80, Proto::Tcp);
const TCP81: (u16, Proto) = (81, Proto::Tcp);
const UDP80: (u16, Proto) = (80, Proto::Udp);
const UDP81: (u16, Proto) = (81, Proto::Udp);
const BOTH80: &[(u16, Proto)] = &[TCP80, UDP80];
const ALL: &[(u16, Proto)] = &[TCP80, TCP81, UDP80, UDP81];

struct Run<'a> {
    c: &'a Cluster,
    w: World,
    /// The policies currently applied.
    applied: Vec<Value>,
}

impl Run<'_> {
    fn key(p: &Value) -> (String, String) {
        (
            p["metadata"]["namespace"].as_str().unwrap().to_owned(),
            p["metadata"]["name"].as_str().unwrap().to_owned(),
        )
    }

    /// Makes the cluster's policies exactly `policies` (deleting the
    /// others), then checks the matrices.
    fn scenario(&mut self, name: &str, policies: Vec<Value>, cases: &[(u16, Proto)]) {
        eprintln!("scenario: {name}");
        for old in &self.applied {
            let k = Self::key(old);
            if !policies.iter().any(|p| Self::key(p) == k) {
                self.c
                    .kubectl_ok(&["-n", &k.0, "delete", "networkpolicy", &k.1, "--wait=false"]);
            }
        }
        if !policies.is_empty() {
            let list = json!({"apiVersion": "v1", "kind": "List", "items": policies});
            self.c.apply(&list.to_string());
        }
        self.applied = policies;
        self.w.expect(self.c, name, &self.applied, cases);
    }
}

fn sel(labels: Value) -> Value {
    json!({"matchLabels": labels})
}

#[test]
fn network_policies_match_the_reference_model_on_tcp_and_udp_across_two_nodes() {
    // Cluster DNS on port 53 of the server's node, so that an egress
    // policy allowing port 53 admits it (egress is judged on the backend).
    let c = Cluster::start_with(1, &["--dns-listen", "0.0.0.0:53"]);
    let w = World::create(&c);
    let mut r = Run {
        c: &c,
        w,
        applied: Vec::new(),
    };

    r.scenario("no policies: everything reaches everything", vec![], ALL);

    // --- ingress
    r.scenario(
        "default deny ingress in x",
        vec![policy(
            "x",
            "deny-ingress",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        )],
        BOTH80,
    );
    r.scenario(
        "allow ingress within namespace x",
        vec![policy(
            "x",
            "same-ns",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
        )],
        BOTH80,
    );
    r.scenario(
        "x/a admits namespace y (namespaceSelector)",
        vec![policy(
            "x",
            "from-y",
            json!({"podSelector": sel(json!({"pod": "a"})),
                   "ingress": [{"from": [{"namespaceSelector": sel(json!({"ns": "y"}))}]}]}),
        )],
        BOTH80,
    );
    r.scenario(
        "x/a admits pod b of namespaces y or z (AND in one peer)",
        vec![policy(
            "x",
            "and",
            json!({"podSelector": sel(json!({"pod": "a"})),
                   "ingress": [{"from": [{
                       "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y", "z"]}]},
                       "podSelector": sel(json!({"pod": "b"}))}]}]}),
        )],
        BOTH80,
    );
    r.scenario(
        "x/a admits namespaces y, z or pod b of x (OR of two peers)",
        vec![policy(
            "x",
            "or",
            json!({"podSelector": sel(json!({"pod": "a"})),
                   "ingress": [{"from": [
                       {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y", "z"]}]}},
                       {"podSelector": sel(json!({"pod": "b"}))}]}]}),
        )],
        BOTH80,
    );
    r.scenario(
        "x admits every namespace but y, pods other than c (NotIn, DoesNotExist)",
        vec![policy(
            "x",
            "exprs",
            json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Exists"}]},
                   "ingress": [{"from": [{
                       "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["y"]}]},
                       "podSelector": {"matchExpressions": [
                           {"key": "pod", "operator": "NotIn", "values": ["c"]},
                           {"key": "team", "operator": "DoesNotExist"}]}}]}]}),
        )],
        BOTH80,
    );
    r.scenario(
        "x/a admits anyone on TCP 81 only",
        vec![policy(
            "x",
            "port-81",
            json!({"podSelector": sel(json!({"pod": "a"})),
                   "ingress": [{"ports": [{"port": 81, "protocol": "TCP"}]}]}),
        )],
        ALL,
    );
    r.scenario(
        "x admits namespace y on the named port serve-81-udp",
        vec![policy(
            "x",
            "named",
            json!({"podSelector": {},
                   "ingress": [{"from": [{"namespaceSelector": sel(json!({"ns": "y"}))}],
                                "ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]}),
        )],
        ALL,
    );
    r.scenario(
        "x/b admits z on TCP 80..81 (endPort), UDP any port",
        vec![policy(
            "x",
            "range",
            json!({"podSelector": sel(json!({"pod": "b"})),
                   "ingress": [{"from": [{"namespaceSelector": sel(json!({"ns": "z"}))}],
                                "ports": [{"port": 80, "endPort": 81, "protocol": "TCP"},
                                          {"protocol": "UDP"}]}]}),
        )],
        ALL,
    );
    r.scenario(
        "x/b admits z on TCP 81..90 only (endPort range excluding 80)",
        vec![policy(
            "x",
            "range",
            json!({"podSelector": sel(json!({"pod": "b"})),
                   "ingress": [{"from": [{"namespaceSelector": sel(json!({"ns": "z"}))}],
                                "ports": [{"port": 81, "endPort": 90, "protocol": "TCP"}]}]}),
        )],
        &[TCP80, TCP81],
    );
    r.scenario(
        "two policies on x/a are unioned (from y; from pod c anywhere)",
        vec![
            policy(
                "x",
                "from-y",
                json!({"podSelector": sel(json!({"pod": "a"})),
                       "ingress": [{"from": [{"namespaceSelector": sel(json!({"ns": "y"}))}]}]}),
            ),
            policy(
                "x",
                "from-c",
                json!({"podSelector": sel(json!({"pod": "a"})),
                       "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": sel(json!({"pod": "c"}))}]}]}),
            ),
        ],
        BOTH80,
    );
    r.scenario(
        "updating one of them (from-y becomes from-z) and keeping the other",
        vec![
            policy(
                "x",
                "from-y",
                json!({"podSelector": sel(json!({"pod": "a"})),
                       "ingress": [{"from": [{"namespaceSelector": sel(json!({"ns": "z"}))}]}]}),
            ),
            policy(
                "x",
                "from-c",
                json!({"podSelector": sel(json!({"pod": "a"})),
                       "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": sel(json!({"pod": "c"}))}]}]}),
            ),
        ],
        BOTH80,
    );
    r.scenario(
        "deleting one of them",
        vec![policy(
            "x",
            "from-c",
            json!({"podSelector": sel(json!({"pod": "a"})),
                   "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": sel(json!({"pod": "c"}))}]}]}),
        )],
        BOTH80,
    );
    r.scenario(
        "an empty egress list does not isolate egress (ingress deny-all in y)",
        vec![policy(
            "y",
            "ingress-only",
            json!({"podSelector": {}, "egress": []}),
        )],
        BOTH80,
    );

    // --- egress
    r.scenario(
        "default deny egress in x, DNS allowed",
        vec![policy(
            "x",
            "deny-egress",
            json!({"podSelector": {}, "policyTypes": ["Egress"],
                   "egress": [{"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]}),
        )],
        BOTH80,
    );
    r.scenario(
        "x egresses only to namespace y, on the named port serve-80-tcp",
        vec![policy(
            "x",
            "egress-y",
            json!({"podSelector": {}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"namespaceSelector": sel(json!({"ns": "y"}))}],
                               "ports": [{"port": "serve-80-tcp"}]}]}),
        )],
        ALL,
    );
    r.scenario(
        "default deny all (ingress and egress) in z",
        vec![policy(
            "z",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        )],
        BOTH80,
    );
    // The DNS rule above is real: a pod of x still resolves names.
    let xa_netns = r.w.netns["x/a"].clone();
    let answer = std::thread::spawn(move || {
        netpol::probe::dns_query(&xa_netns, "kubernetes.default.svc.cluster.local")
    })
    .join()
    .unwrap();
    assert_eq!(
        answer,
        Some("10.43.0.1".parse().unwrap()),
        "x/a resolves kubernetes.default through the cluster DNS under an egress policy allowing port 53"
    );
    let yb = r.w.pod("y/b").ip;
    let zc = r.w.pod("z/c").ip;
    let xb = r.w.pod("x/b").ip;
    r.scenario(
        "x/a egresses to 10.42.0.0/16 except y/b's and z/c's addresses (ipBlock except)",
        vec![policy(
            "x",
            "ipblock-egress",
            json!({"podSelector": sel(json!({"pod": "a"})), "policyTypes": ["Egress"],
                   "egress": [{"to": [{"ipBlock": {"cidr": "10.42.0.0/16",
                                                   "except": [format!("{yb}/32"), format!("{zc}/32")]}}]}]}),
        )],
        BOTH80,
    );
    let node1_cidr = c.kubectl_ok(&[
        "get",
        "node",
        &c.nodes[1].name,
        "-o",
        "jsonpath={.spec.podCIDR}",
    ]);
    r.scenario(
        "y admits the second node's pod CIDR (ipBlock) and, on UDP 80, z/c's and x/b's /32 (x/b's inside that CIDR)",
        vec![
            policy(
                "y",
                "ipblock-ingress",
                json!({"podSelector": {},
                       "ingress": [{"from": [{"ipBlock": {"cidr": node1_cidr}}]}]}),
            ),
            policy(
                "y",
                "ipblock-host",
                json!({"podSelector": {},
                       "ingress": [{"from": [{"ipBlock": {"cidr": format!("{zc}/32")}},
                                             {"ipBlock": {"cidr": format!("{xb}/32")}}],
                                    "ports": [{"port": 80, "protocol": "UDP"}]}]}),
            ),
        ],
        BOTH80,
    );
    r.scenario(
        "egress of x and ingress of y both apply (x/a → y only; y admits only x/a)",
        vec![
            policy(
                "x",
                "egress-to-y",
                json!({"podSelector": sel(json!({"pod": "a"})), "policyTypes": ["Egress"],
                       "egress": [{"to": [{"namespaceSelector": sel(json!({"ns": "y"}))}]}]}),
            ),
            policy(
                "y",
                "from-xa",
                json!({"podSelector": {},
                       "ingress": [{"from": [{"namespaceSelector": sel(json!({"ns": "x"})),
                                              "podSelector": sel(json!({"pod": "a"}))}]}]}),
            ),
        ],
        BOTH80,
    );

    // --- labels change under a policy
    let team_policy = vec![policy(
        "x",
        "from-team",
        json!({"podSelector": {},
               "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": sel(json!({"team": "blue"}))}]}]}),
    )];
    r.scenario(
        "x admits pods labelled team=blue (none yet)",
        team_policy.clone(),
        BOTH80,
    );
    c.kubectl_ok(&["-n", "z", "label", "pod", "b", "team=blue"]);
    r.w.refresh(&c);
    r.scenario(
        "… after z/b is labelled team=blue",
        team_policy.clone(),
        BOTH80,
    );
    c.kubectl_ok(&["-n", "y", "label", "namespace", "y", "ns=y2", "--overwrite"]);
    c.kubectl_ok(&["-n", "z", "label", "pod", "b", "team-"]);
    r.w.refresh(&c);
    r.scenario(
        "namespace relabelled (ns=y2) and z/b's label removed; x admits ns=y2",
        vec![policy(
            "x",
            "from-team",
            json!({"podSelector": {},
                   "ingress": [{"from": [{"namespaceSelector": sel(json!({"ns": "y2"}))}]}]}),
        )],
        BOTH80,
    );

    r.scenario(
        "all policies deleted: everything reaches everything",
        vec![],
        ALL,
    );

    // Readiness probes come from the node, which policy always admits:
    // every pod stayed Ready through the deny-all scenarios.
    for ns in netpol::NAMESPACES {
        for pod in netpol::PODS {
            assert_eq!(
                c.jsonpath(
                    ns,
                    &format!("pod/{pod}"),
                    "{.status.conditions[?(@.type==\"Ready\")].status}"
                ),
                "True",
                "{ns}/{pod} Ready"
            );
        }
    }
}
