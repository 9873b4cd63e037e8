//! Node failure with the real controller manager: a node whose heartbeats
//! stop is marked unreachable (Ready=Unknown, NoExecute taint), its pods
//! are evicted and their ReplicaSet replaces them on the healthy node.
//! Its own test binary because the server takes the short grace period
//! from the environment (SKEP_NODE_MONITOR_GRACE_PERIOD), which every
//! server started by this process inherits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Server;
use serde_json::{Value, json};
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

const V: &str = "1.31";

fn curl_json(s: &Server, method: &str, path: &str, ct: &str, body: &str) -> Value {
    let url = s.url(path);
    let h = format!("Content-Type: {ct}");
    let out = s.curl_admin(&["-X", method, "-H", &h, "-d", body, &url]);
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn heartbeat(s: &Server, node: &str) {
    let now = chrono_like_now();
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "lastHeartbeatTime": now, "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
    }});
    curl_json(
        s,
        "PATCH",
        &format!("/api/v1/nodes/{node}/status"),
        "application/merge-patch+json",
        &status.to_string(),
    );
}

/// RFC 3339 with sub-second digits, so each heartbeat differs.
fn chrono_like_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!(
        "2026-01-01T00:00:00.{:09}Z",
        d.subsec_nanos() ^ (d.as_secs() as u32 % 1000)
    )
}

fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn silent_node_is_tainted_and_its_pods_come_back_elsewhere() {
    // SAFETY: set before any thread of this test binary reads the
    // environment; the only test here.
    unsafe { std::env::set_var("SKEP_NODE_MONITOR_GRACE_PERIOD", "3s") };
    let s = Server::start();
    for n in ["alive", "doomed"] {
        curl_json(
            &s,
            "POST",
            "/api/v1/nodes",
            "application/json",
            &json!({"metadata": {"name": n}}).to_string(),
        );
        heartbeat(&s, n);
    }
    // The kubelet of `alive` keeps beating; `doomed`'s stops after the
    // pods are placed.
    let stop = Arc::new(AtomicBool::new(false));
    let doomed_beats = Arc::new(AtomicBool::new(true));
    let beater = {
        let (stop, doomed_beats) = (stop.clone(), doomed_beats.clone());
        let port = s.port;
        let dir = s.dir.path().to_owned();
        thread::spawn(move || {
            let token = std::fs::read_to_string(dir.join("admin-token")).unwrap();
            let curl = |args: &[&str]| {
                std::process::Command::new("curl")
                    .args(["-sS", "--max-time", "20", "--cacert"])
                    .arg(dir.join("tls/ca.crt"))
                    .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
                    .args(args)
                    .output()
                    .unwrap()
            };
            let base = format!("https://127.0.0.1:{port}");
            let mut ip = 10;
            while !stop.load(Ordering::Relaxed) {
                let mut nodes = vec!["alive"];
                if doomed_beats.load(Ordering::Relaxed) {
                    nodes.push("doomed");
                }
                for n in &nodes {
                    let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True",
                        "lastHeartbeatTime": chrono_like_now(), "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
                    curl(&[
                        "-X",
                        "PATCH",
                        "-H",
                        "Content-Type: application/merge-patch+json",
                        "-d",
                        &status.to_string(),
                        &format!("{base}/api/v1/nodes/{n}/status"),
                    ]);
                }
                // Pods on beating nodes run; deleted ones there finish.
                let out = curl(&[&format!("{base}/api/v1/pods")]);
                let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                for p in list["items"].as_array().into_iter().flatten() {
                    let node = p["spec"]["nodeName"].as_str().unwrap_or("");
                    if !nodes.contains(&node) {
                        continue;
                    }
                    let path = format!(
                        "{base}/api/v1/namespaces/{}/pods/{}",
                        p["metadata"]["namespace"].as_str().unwrap(),
                        p["metadata"]["name"].as_str().unwrap()
                    );
                    if !p["metadata"]["deletionTimestamp"].is_null() {
                        curl(&[
                            "-X",
                            "DELETE",
                            "-H",
                            "Content-Type: application/json",
                            "-d",
                            r#"{"gracePeriodSeconds":0}"#,
                            &path,
                        ]);
                    } else if p["status"]["phase"] != "Running" {
                        ip += 1;
                        let st = json!({"status": {"phase": "Running", "podIP": format!("10.42.9.{ip}"),
                            "conditions": [{"type": "Ready", "status": "True"}]}});
                        curl(&[
                            "-X",
                            "PATCH",
                            "-H",
                            "Content-Type: application/merge-patch+json",
                            "-d",
                            &st.to_string(),
                            &format!("{path}/status"),
                        ]);
                    }
                }
                thread::sleep(Duration::from_millis(300));
            }
        })
    };
    s.k(V, &["create", "namespace", "nf"]);
    // Pods get 300 s tolerations of an unreachable node by default
    // (DefaultTolerationSeconds); these ask for 2 s, as a workload that
    // wants a fast failover does.
    let out = s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(
            "apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: nf}
spec:
  replicas: 4
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      tolerations:
      - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
      - {key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
      containers: [{name: x, image: x}]
",
        ),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.k(
        V,
        &[
            "-n",
            "nf",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ],
    );
    let pods = s.json(V, &["-n", "nf", "get", "pods"]);
    let on_doomed = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["spec"]["nodeName"] == "doomed")
        .count();
    assert!(
        on_doomed > 0,
        "least-allocated put no pod on the second node"
    );

    doomed_beats.store(false, Ordering::Relaxed);
    let node = eventually(30, "doomed marked unreachable", || {
        let n = s.json(V, &["get", "node", "doomed"]);
        let tainted = n["spec"]["taints"].as_array().is_some_and(|ts| {
            ts.iter()
                .any(|t| t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == "NoExecute")
        });
        tainted.then_some(n)
    });
    let ready = node["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready["status"], "Unknown");
    assert!(s.json(V, &["get", "node", "alive"])["spec"]["taints"].is_null());

    // Evicted pods stay Terminating (no kubelet answers for them, as
    // upstream); replacements run on the healthy node.
    eventually(30, "4 running replicas on alive", || {
        let pods = s.json(V, &["-n", "nf", "get", "pods"]);
        let live_on_alive = pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| {
                p["spec"]["nodeName"] == "alive"
                    && p["metadata"]["deletionTimestamp"].is_null()
                    && p["status"]["phase"] == "Running"
            })
            .count();
        (live_on_alive == 4).then_some(())
    });
    let pods = s.json(V, &["-n", "nf", "get", "pods"]);
    for p in pods["items"].as_array().unwrap() {
        if p["spec"]["nodeName"] == "doomed" {
            assert!(
                !p["metadata"]["deletionTimestamp"].is_null(),
                "not evicted: {p}"
            );
        }
    }

    // Deleting the dead node garbage-collects its pods.
    s.k(V, &["delete", "node", "doomed"]);
    eventually(30, "the dead node's pods gone", || {
        let pods = s.json(V, &["-n", "nf", "get", "pods"]);
        pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["spec"]["nodeName"] != "doomed")
            .then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    beater.join().unwrap();
}
