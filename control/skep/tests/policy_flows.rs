//! On a real 3-node cluster: `skep ctl connectivity-test` passes, and flows
//! reported by the kernel reach `skep ctl flows` through the server's relay
//! with the right verdict, drop reason and policy name; `skep ctl policy`
//! shows a pod's effective rules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod netpol;

use cluster::Cluster;
use netpol::{World, policy, probe};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ctl_ok(c: &Cluster, args: &[&str]) -> String {
    let out = c.ctl(args);
    assert!(
        out.status.success(),
        "skep ctl {} failed:\n{}{}",
        args.join(" "),
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

/// `skep ctl flows -o json` lines matching `pred`, waiting for them a little
/// (events travel kernel → agent → relay).
fn flows_until(
    c: &Cluster,
    args: &[&str],
    what: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut full = vec!["flows", "-o", "json"];
        full.extend_from_slice(args);
        let text = ctl_ok(c, &full);
        let flows: Vec<Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("flow line {l:?}: {e}")))
            .collect();
        if pred(&flows) {
            return flows;
        }
        assert!(
            Instant::now() < deadline,
            "no flows for {what} in 10 s; got:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn connectivity_test_flows_and_effective_policy_on_three_nodes() {
    let c = Cluster::start(2);

    // The built-in connectivity test: every check passes, the namespace
    // is gone afterwards.
    let out = c.ctl(&["connectivity-test", "--timeout", "150s"]);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "connectivity test failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("across nodes"),
        "cross-node checks ran:\n{text}"
    );
    assert!(text.contains("policy denies an unlabelled pod"), "{text}");
    assert!(!text.contains("FAIL "), "{text}");
    // Per node: pod → each of the 3 servers, ClusterIP, DNS over TCP and
    // UDP; then the 2 policy checks.
    assert!(
        text.contains("20 passed, 0 failed"),
        "every check ran and passed:\n{text}"
    );
    c.wait_for(
        "the test namespace to be deleted",
        Duration::from_secs(60),
        |c| {
            !c.kubectl_ok(&["get", "namespaces", "-o", "name"])
                .contains("skep-connectivity-")
        },
    );

    let w = World::create(&c);
    let pol = policy(
        "x",
        "a-from-y",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                            "ports": [{"port": 80, "protocol": "TCP"}]}]}),
    );
    c.apply(&pol.to_string());
    w.expect(
        &c,
        "x/a admits y on TCP 80",
        &[pol],
        &[(80, probe::Proto::Tcp)],
    );

    // One more allowed and one denied connection, now that the policy is
    // certainly in place: y/b → x/a and z/c → x/a.
    let xa = w.pod("x/a").ip;
    let (yb, zc) = (w.netns["y/b"].clone(), w.netns["z/c"].clone());
    let allowed = std::thread::spawn(move || probe::probe(&yb, probe::Proto::Tcp, xa, 80))
        .join()
        .unwrap();
    assert!(allowed.is_some(), "y/b reaches x/a");
    let denied = std::thread::spawn(move || probe::probe(&zc, probe::Proto::Tcp, xa, 80))
        .join()
        .unwrap();
    assert!(denied.is_none(), "z/c is denied");
    let xa_s = xa.to_string();
    let (yb_ip, zc_ip) = (w.pod("y/b").ip.to_string(), w.pod("z/c").ip.to_string());

    let flows = flows_until(
        &c,
        &["--to", "x/a", "--since", "5m"],
        "y/b and z/c → x/a",
        |f| {
            f.iter().any(|v| {
                v["verdict"] == "FORWARDED"
                    && v["observation"] == "to-pod"
                    && v["source"]["ip"] == yb_ip.as_str()
                    && v["policy"].is_string()
            }) && f
                .iter()
                .any(|v| v["verdict"] == "DROPPED" && v["source"]["ip"] == zc_ip.as_str())
        },
    );
    // Two observations of the allowed connection: leaving y/b (y/b is not
    // isolated for egress: no policy) and arriving at x/a (admitted by the
    // ingress policy, which the event names). Connections made while the
    // policy was being programmed may show no policy; the last one must.
    let fwd = flows
        .iter()
        .rev()
        .find(|v| {
            v["verdict"] == "FORWARDED"
                && v["observation"] == "to-pod"
                && v["source"]["ip"] == yb_ip.as_str()
        })
        .unwrap();
    let egress = flows
        .iter()
        .rev()
        .find(|v| {
            v["verdict"] == "FORWARDED"
                && v["observation"] == "from-pod"
                && v["source"]["ip"] == yb_ip.as_str()
        })
        .expect("the egress observation of y/b's connection");
    assert!(egress["policy"].is_null(), "y/b is not isolated: {egress}");
    assert_eq!(fwd["destination"]["ip"], xa_s.as_str(), "{fwd}");
    assert_eq!(fwd["destination"]["namespace"], "x", "{fwd}");
    assert_eq!(fwd["destination"]["pod"], "a", "{fwd}");
    assert_eq!(fwd["source"]["pod"], "b", "{fwd}");
    assert_eq!(fwd["destination_port"], 80, "{fwd}");
    assert_eq!(fwd["protocol"], "TCP", "{fwd}");
    assert!(
        fwd["policy"]
            .as_str()
            .unwrap_or_default()
            .contains("x/a-from-y"),
        "the allowing policy is named: {fwd}"
    );
    let drop = flows
        .iter()
        .find(|v| v["verdict"] == "DROPPED" && v["source"]["ip"] == zc_ip.as_str())
        .unwrap();
    assert_eq!(drop["drop_reason"], "policy-denied-ingress", "{drop}");
    // z/c runs on another node than x/a: its SYN was dropped by XDP on
    // x/a's node's interface, before the pod hook.
    assert_eq!(drop["observation"], "xdp", "{drop}");
    assert_eq!(drop["source"]["namespace"], "z", "{drop}");

    // Filters: only drops; the table output names both pods.
    let drops = flows_until(
        &c,
        &["--verdict", "DROPPED", "--namespace", "x", "--since", "5m"],
        "drops",
        |f| !f.is_empty(),
    );
    assert!(drops.iter().all(|v| v["verdict"] == "DROPPED"), "{drops:?}");
    let table = ctl_ok(&c, &["flows", "--to", "x/a", "--since", "5m"]);
    assert!(
        table.contains("DROPPED") && table.contains("FORWARDED"),
        "{table}"
    );
    assert!(table.contains("z/c") && table.contains("x/a"), "{table}");
    let bad = c.ctl(&["flows", "--verdict", "MAYBE"]);
    assert!(!bad.status.success(), "a bad --verdict is refused");

    // The effective policy of x/a and of an unselected pod.
    let eff = ctl_ok(&c, &["policy", "a", "-n", "x"]);
    assert!(eff.contains("a-from-y"), "{eff}");
    assert!(eff.to_lowercase().contains("ingress"), "{eff}");
    let none = ctl_ok(&c, &["policy", "b", "-n", "y"]);
    assert!(!none.contains("a-from-y"), "{none}");
    let missing = c.ctl(&["policy", "nope", "-n", "x"]);
    assert!(!missing.status.success(), "an unknown pod is an error");

    // `skep ctl status`: the control plane's checks (DNS among them) and
    // every node's dataplane as its agent published it (every 30 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(75);
    let status = loop {
        let out = c.ctl(&["status"]);
        let text = stdout(&out);
        let reported = text.matches("dataplane: ").count() == 3
            && text.matches("policy on, flows on").count() == 3;
        if out.status.success() && reported {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ctl status never reported three healthy dataplanes: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_secs(3));
    };
    assert!(status.contains("[+]store ok"), "{status}");
    assert!(status.contains("[+]dns ok"), "{status}");
    assert!(status.contains("nodes  3/3 ready"), "{status}");
    assert!(status.contains("controllers: active on"), "{status}");
    assert!(status.contains("fullest map SKEP_"), "{status}");
    assert!(status.trim_end().ends_with("healthy"), "{status}");
    println!("{status}");
}
