//! Node agents: the server's own node and a second agent joining with the
//! node token register, get a /24 each, renew their Leases, and report
//! Ready once their runtime works.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Server;
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

fn wait_for(s: &Server, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "not within 20 s: {what}\nserver log:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The nodes of these tests run in the host namespace and route each
/// other's pod CIDRs over loopback (routes of protocol 83, skep's): remove
/// them when the test ends, also on panic.
struct NodeRoutes;

impl Drop for NodeRoutes {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["route", "flush", "proto", "83"])
            .output();
    }
}

#[test]
fn server_and_joined_agents_register_their_nodes() {
    let _routes = NodeRoutes;
    // Random ports: several servers with nodes run side by side here.
    let s = Server::start_with(&[
        "--node-name",
        "server-node",
        "--no-dataplane",
        "--kubelet-port",
        "0",
        "--dns-listen",
        "127.0.0.1:0",
        "--node-ip",
        "127.0.0.1",
    ]);
    let v = "1.31";
    wait_for(&s, "the server's node registers", || {
        s.kubectl(v, &["get", "node", "server-node"])
            .status
            .success()
    });
    // The node registers before its endpoints are up; the status update
    // that follows advertises the kubelet port actually bound.
    wait_for(&s, "the server's node advertises its kubelet port", || {
        s.json(v, &["get", "node", "server-node"])["status"]["daemonEndpoints"]["kubeletEndpoint"]
            ["Port"]
            .as_u64()
            .is_some_and(|p| p != 0)
    });
    let node = s.json(v, &["get", "node", "server-node"]);
    assert_eq!(node["spec"]["podCIDR"], "10.42.0.0/24");
    assert_eq!(
        node["metadata"]["labels"]["node-role.kubernetes.io/control-plane"],
        "true"
    );
    let ready = node["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(
        ready["status"], "True",
        "the process runtime works: {ready}"
    );
    assert!(
        node["status"]["nodeInfo"]["containerRuntimeVersion"]
            .as_str()
            .unwrap()
            .starts_with("skep-process://")
    );
    assert_ne!(
        node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"], 0,
        "the kubelet endpoint's bound port is advertised"
    );
    assert!(
        node["status"]["capacity"]["cpu"]
            .as_str()
            .unwrap()
            .parse::<u32>()
            .unwrap()
            >= 1
    );

    // A second node joins with the join token and the cluster CA.
    let token = std::fs::read_to_string(s.dir.path().join("node-token")).unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_skep"))
        .args([
            "agent",
            "--no-dataplane",
            "--server",
            &s.url(""),
            "--token",
            token.trim(),
            "--node-name",
            "worker-1",
            "--node-ip",
            "127.0.0.2",
            "--kubelet-port",
            "0",
            "--ca-file",
        ])
        .arg(s.dir.path().join("tls/ca.crt"))
        .args(["--data-dir"])
        .arg(s.dir.path().join("agent"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&s, "the agent's node registers", || {
        s.kubectl(v, &["get", "node", "worker-1"]).status.success()
    });
    // The addresses come with the agent's first status update, which can
    // follow the registration by a moment.
    wait_for(&s, "the agent's node reports its address", || {
        s.json(v, &["get", "node", "worker-1"])["status"]["addresses"][0]["address"] == "127.0.0.2"
    });
    let worker = s.json(v, &["get", "node", "worker-1"]);
    assert_eq!(
        worker["spec"]["podCIDR"], "10.42.1.0/24",
        "each node gets its own /24"
    );
    // Leases exist and are renewed.
    wait_for(&s, "the agent's lease exists", || {
        s.kubectl(v, &["-n", "kube-node-lease", "get", "lease", "worker-1"])
            .status
            .success()
    });
    let first =
        s.json(v, &["-n", "kube-node-lease", "get", "lease", "worker-1"])["spec"]["renewTime"]
            .as_str()
            .unwrap()
            .to_owned();
    wait_for(&s, "the lease is renewed", || {
        s.json(v, &["-n", "kube-node-lease", "get", "lease", "worker-1"])["spec"]["renewTime"]
            .as_str()
            .unwrap()
            != first
    });
    // A bad token is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_skep"))
        .args([
            "agent",
            "--no-dataplane",
            "--server",
            &s.url(""),
            "--token",
            "wrong",
            "--node-name",
            "intruder",
            "--ca-file",
        ])
        .arg(s.dir.path().join("tls/ca.crt"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.kill().unwrap();
    agent.wait().unwrap();
}

struct Pins(std::path::PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        // This test's node runs in the host namespace (no pods are made):
        // take back the pod-egress masquerade chain its agent installed.
        for args in [
            &["-t", "nat", "-D", "POSTROUTING", "-j", "SKEP-MASQ"][..],
            &["-t", "nat", "-F", "SKEP-MASQ"][..],
            &["-t", "nat", "-X", "SKEP-MASQ"][..],
        ] {
            let _ = Command::new("iptables").args(args).output();
        }
    }
}

fn ctl_svc(pins: &Pins) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_skep"))
        .args(["ctl", "svc", "--pin-root"])
        .arg(&pins.0)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The agent programs the eBPF load balancer from Services and
/// EndpointSlices, and follows their changes.
#[test]
fn the_agent_programs_services_into_the_dataplane() {
    let pins = Pins(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/skep-agent-test-{}",
        std::process::id()
    )));
    let s = Server::start_with(&[
        "--node-name",
        "lb-node",
        "--bpf-root",
        pins.0.to_str().unwrap(),
        "--kubelet-port",
        "0",
        "--dns-listen",
        "127.0.0.1:0",
        "--node-ip",
        "127.0.0.1",
    ]);
    let v = "1.31";
    let manifest = |ips: &[&str]| {
        let endpoints: Vec<String> = ips
            .iter()
            .map(|ip| {
                format!(
                    "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  nodeName: lb-node\n"
                )
            })
            .collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: manual, namespace: default}}\nspec:\n  clusterIP: 10.43.7.7\n  ports: [{{name: http, port: 80, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: manual-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: manual}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{}",
            endpoints.concat()
        )
    };
    let out = s.kubectl_stdin(
        v,
        &["apply", "-f", "-"],
        Some(&manifest(&["10.42.0.11", "10.42.0.12"])),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(&s, "the service is programmed with both backends", || {
        let t = ctl_svc(&pins);
        t.lines().any(|l| {
            l.starts_with("10.43.7.7:80")
                && l.contains("10.42.0.11:8080")
                && l.contains("10.42.0.12:8080")
        })
    });
    let out = s.kubectl_stdin(v, &["apply", "-f", "-"], Some(&manifest(&["10.42.0.12"])));
    assert!(out.status.success());
    wait_for(&s, "a removed endpoint leaves the dataplane", || {
        let t = ctl_svc(&pins);
        t.lines().any(|l| {
            l.starts_with("10.43.7.7:80")
                && !l.contains("10.42.0.11")
                && l.contains("10.42.0.12:8080")
        })
    });
    s.k(v, &["delete", "service", "manual"]);
    wait_for(&s, "a deleted service leaves the dataplane", || {
        let t = ctl_svc(&pins);
        !t.is_empty() && !t.contains("10.43.7.7")
    });
}
