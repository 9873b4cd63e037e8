//! `cargo xtask bench schedule`: the scheduler and controllers of a real
//! `skep server --no-agent` (release build, embedded SQLite), over HTTPS
//! on loopback, against 1,000 simulated nodes:
//! * scheduling throughput: 10,000 pods created by 32 clients, bound as
//!   observed by a watch (pods/s from the first create to the last bind,
//!   and over the binding window alone);
//! * a Deployment of 1,000 replicas from its creation to 1,000 Ready
//!   replicas, the pods reported Running and Ready by simulated kubelets
//!   (16 connections patching pod status as bindings arrive).
//!
//! Nodes are Node objects with capacity and a Ready condition. The
//! server's node-monitor grace period is 1 h for the run, so the harness
//! need not heartbeat 1,000 nodes (upstream's scheduler_perf likewise runs
//! without a node lifecycle controller). The upstream figure printed next
//! to ours is its documented floor, not a run: no kube-scheduler is
//! installable here. Writes target/bench/schedule.json; every loop is
//! bounded in count and time; all traffic stays on 127.0.0.1.

// Benchmark harness: a failed expect aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod apiclient;

use apiclient::{Conn, Server, connect, rss_mb, start_server_with};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

const NODES: usize = 1_000;
const PODS: usize = 10_000;
const REPLICAS: usize = 1_000;
const CLIENTS: usize = 32;
const KUBELETS: usize = 16;
/// Upper bound on each phase.
const PHASE_LIMIT: Duration = Duration::from_secs(300);
/// kube-scheduler's scheduler_perf floor (5,000 nodes, 10,000 pods).
const UPSTREAM_FLOOR_PODS_PER_S: f64 = 680.0;

/// A simulated node. Its pod CIDR is set by the harness (upstream's
/// `--allocate-node-cidrs=false` way): 1,000 nodes do not fit the /24s of
/// 10.42.0.0/16 (256, as with kube-controller-manager's defaults), and no
/// packet ever uses these addresses (shared address space, 100.64/10).
fn node(i: usize) -> Value {
    let cidr = format!("100.{}.{}.0/24", 64 + i / 256, i % 256);
    json!({"apiVersion": "v1", "kind": "Node",
           "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
           "metadata": {"name": format!("sim-{i:04}"),
                        "labels": {"kubernetes.io/hostname": format!("sim-{i:04}"),
                                   "topology.kubernetes.io/zone": format!("zone-{}", i % 3)}}})
}

fn node_status() -> Value {
    let now = skep_controllers::meta::now_rfc3339();
    json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "capacity": {"cpu": "32", "memory": "128Gi", "pods": "110"},
        "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"},
    }})
}

fn pod(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": format!("p-{i:05}"), "labels": {"app": "sched-bench"}},
           "spec": {"containers": [{"name": "c", "image": "registry.example/app:1",
                                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]}})
}

async fn ok(c: &mut Conn, method: &str, path: &str, body: &Value, ct: &str) -> Value {
    let (status, bytes) = c.call_with(method, path, Some(body), ct).await;
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

/// Runs `n` jobs over `clients` connections: job `i` gets a connection.
async fn fan_out<F, Fut>(s: &Server, clients: usize, n: usize, job: F)
where
    F: Fn(Conn, Vec<usize>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut handles = Vec::new();
    for c in 0..clients {
        let mine: Vec<usize> = (c..n).step_by(clients).collect();
        handles.push(tokio::spawn(job(connect(s).await, mine)));
    }
    for h in handles {
        h.await.unwrap();
    }
}

/// Reads a watch body line by line, calling `f` with each event until it
/// returns false or `limit` passes.
async fn follow(mut body: hyper::body::Incoming, limit: Instant, mut f: impl FnMut(Value) -> bool) {
    let mut buf = Vec::new();
    while Instant::now() < limit {
        let frame = match tokio::time::timeout_at(limit.into(), body.frame()).await {
            Ok(Some(Ok(f))) => f,
            _ => return,
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.extend_from_slice(data);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if !f(ev) {
                return;
            }
        }
    }
}

async fn list_rv(c: &mut Conn, path: &str) -> String {
    let (status, body) = c.call("GET", path, None, "application/json").await;
    assert_eq!(status, 200, "{path}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn create_nodes(s: &Server) -> f64 {
    let t = Instant::now();
    fan_out(s, CLIENTS, NODES, |mut c, mine| async move {
        for i in mine {
            ok(
                &mut c,
                "POST",
                "/api/v1/nodes",
                &node(i),
                "application/json",
            )
            .await;
            ok(
                &mut c,
                "PATCH",
                &format!("/api/v1/nodes/sim-{i:04}/status"),
                &node_status(),
                "application/merge-patch+json",
            )
            .await;
        }
    })
    .await;
    t.elapsed().as_secs_f64()
}

/// 10,000 pods; returns (create seconds, first-create → last-bind
/// seconds, first-bind → last-bind seconds).
async fn schedule_pods(s: &Server) -> (f64, f64, f64) {
    let mut c = connect(s).await;
    ok(
        &mut c,
        "POST",
        "/api/v1/namespaces",
        &json!({"metadata": {"name": "sched"}}),
        "application/json",
    )
    .await;
    let rv = list_rv(&mut c, "/api/v1/namespaces/sched/pods?limit=1").await;
    let body = c
        .stream(&format!(
            "/api/v1/namespaces/sched/pods?watch=1&resourceVersion={rv}&timeoutSeconds=600"
        ))
        .await;
    let limit = Instant::now() + PHASE_LIMIT;
    let start = Instant::now();
    let watcher = tokio::spawn(async move {
        let mut bound = HashSet::new();
        let (mut first, mut last) = (None, None);
        follow(body, limit, |ev| {
            let o = &ev["object"];
            if o["spec"]["nodeName"]
                .as_str()
                .is_some_and(|n| !n.is_empty())
                && bound.insert(o["metadata"]["name"].as_str().unwrap_or("").to_owned())
            {
                let now = start.elapsed().as_secs_f64();
                first.get_or_insert(now);
                last = Some(now);
            }
            bound.len() < PODS
        })
        .await;
        (bound.len(), first.unwrap_or(0.0), last.unwrap_or(0.0))
    });
    fan_out(s, CLIENTS, PODS, |mut c, mine| async move {
        for i in mine {
            ok(
                &mut c,
                "POST",
                "/api/v1/namespaces/sched/pods",
                &pod(i),
                "application/json",
            )
            .await;
        }
    })
    .await;
    let created = start.elapsed().as_secs_f64();
    let (bound, first, last) = watcher.await.unwrap();
    assert_eq!(bound, PODS, "pods bound within {PHASE_LIMIT:?}");
    (created, last, last - first)
}

/// The Deployment of 1,000 replicas with simulated kubelets; returns the
/// seconds from its creation to 1,000 Ready replicas.
async fn deploy(s: &Server) -> f64 {
    let mut c = connect(s).await;
    ok(
        &mut c,
        "POST",
        "/api/v1/namespaces",
        &json!({"metadata": {"name": "deploy"}}),
        "application/json",
    )
    .await;
    let rv = list_rv(&mut c, "/api/v1/namespaces/deploy/pods?limit=1").await;
    // The watch holds its own connection (HTTP/1.1: one request at a time).
    let body = connect(s)
        .await
        .stream(&format!(
            "/api/v1/namespaces/deploy/pods?watch=1&resourceVersion={rv}&timeoutSeconds=600"
        ))
        .await;
    let limit = Instant::now() + PHASE_LIMIT;
    // Bound pods go to the kubelets' queue once.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let started = Arc::new(AtomicUsize::new(0));
    let watcher = tokio::spawn(async move {
        let mut seen = HashSet::new();
        follow(body, limit, |ev| {
            let o = &ev["object"];
            let name = o["metadata"]["name"].as_str().unwrap_or("").to_owned();
            if let Some(node) = o["spec"]["nodeName"].as_str().filter(|n| !n.is_empty())
                && o["status"]["phase"] != "Running"
                && ev["type"] != "DELETED"
                && seen.insert(name.clone())
            {
                let _ = tx.send((name, node.to_owned()));
            }
            seen.len() < REPLICAS
        })
        .await;
    });
    let mut kubelets = Vec::new();
    for k in 0..KUBELETS {
        let mut conn = connect(s).await;
        let (rx, started) = (rx.clone(), started.clone());
        kubelets.push(tokio::spawn(async move {
            loop {
                let next = { rx.lock().await.recv().await };
                let Some((name, _node)) = next else { return };
                let n = started.fetch_add(1, Ordering::Relaxed);
                let now = skep_controllers::meta::now_rfc3339();
                let status = json!({"status": {
                    "phase": "Running",
                    "podIP": format!("10.42.{}.{}", 1 + n / 250, 1 + n % 250),
                    "startTime": now,
                    "conditions": [
                        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                        {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                        {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                        {"type": "Ready", "status": "True", "lastTransitionTime": now},
                    ],
                    "containerStatuses": [{"name": "c", "ready": true, "restartCount": 0,
                        "image": "registry.example/app:1", "imageID": "", "started": true,
                        "state": {"running": {"startedAt": now}}}],
                }});
                let (code, body) = conn
                    .call_with(
                        "PATCH",
                        &format!("/api/v1/namespaces/deploy/pods/{name}/status"),
                        Some(&status),
                        "application/merge-patch+json",
                    )
                    .await;
                // A pod deleted meanwhile (scale-down) is not an error.
                assert!(
                    code < 300 || code == 404,
                    "kubelet {k}: {code} {}",
                    String::from_utf8_lossy(&body)
                );
            }
        }));
    }
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "deploy"},
        "spec": {"replicas": REPLICAS, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "c", "image": "registry.example/app:1",
                                  "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]}}}});
    let start = Instant::now();
    ok(
        &mut c,
        "POST",
        "/apis/apps/v1/namespaces/deploy/deployments",
        &deployment,
        "application/json",
    )
    .await;
    let ready = loop {
        let (_, body) = c
            .call(
                "GET",
                "/apis/apps/v1/namespaces/deploy/deployments/web",
                None,
                "application/json",
            )
            .await;
        let d: Value = serde_json::from_slice(&body).unwrap();
        if d["status"]["readyReplicas"].as_u64() == Some(REPLICAS as u64) {
            break start.elapsed().as_secs_f64();
        }
        assert!(
            Instant::now() < limit,
            "the Deployment did not get {REPLICAS} Ready replicas within {PHASE_LIMIT:?}: {}",
            d["status"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    watcher.abort();
    for k in kubelets {
        k.abort();
    }
    ready
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let s = start_server_with(&[("SKEP_NODE_MONITOR_GRACE_PERIOD", "1h")]);
    let pid = s.child.id();
    let nodes_s = create_nodes(&s).await;
    println!("{NODES} nodes registered in {nodes_s:.1} s");
    let (created_s, all_bound_s, bind_window_s) = schedule_pods(&s).await;
    let pods_per_s = PODS as f64 / all_bound_s;
    let bind_rate = PODS as f64 / bind_window_s.max(1e-3);
    println!(
        "{PODS} pods: created in {created_s:.1} s, all bound {all_bound_s:.1} s after the first create"
    );
    let deploy_s = deploy(&s).await;
    let rss = rss_mb(pid);
    let rows = [
        (
            "scheduling throughput, first create → last bind",
            format!("{pods_per_s:.0} pods/s"),
        ),
        (
            "binding rate over the binding window",
            format!("{bind_rate:.0} pods/s"),
        ),
        (
            "pod creation (32 clients)",
            format!("{:.0} pods/s", PODS as f64 / created_s),
        ),
        (
            "vs kube-scheduler's documented floor (680 pods/s, 5,000 nodes; not run here)",
            format!("{:.2}×", pods_per_s / UPSTREAM_FLOOR_PODS_PER_S),
        ),
        (
            "Deployment of 1,000 replicas → all Ready",
            format!("{deploy_s:.2} s"),
        ),
        (
            "server RSS with 1,000 nodes and 11,000 pods",
            format!("{rss:.1} MB"),
        ),
    ];
    println!("\nscheduler, {NODES} simulated nodes:");
    for (what, v) in rows {
        println!("  {what:<78} {v}");
    }
    println!("targets: ≥ 1,000 pods/s; 1,000 replicas Ready ≤ 15 s");
    let report = json!({
        "nodes": NODES,
        "pods": PODS,
        "pods_per_s_1000_nodes": pods_per_s,
        "bind_window_pods_per_s": bind_rate,
        "create_pods_per_s": PODS as f64 / created_s,
        "upstream_floor_pods_per_s": UPSTREAM_FLOOR_PODS_PER_S,
        "ratio_vs_upstream_floor": pods_per_s / UPSTREAM_FLOOR_PODS_PER_S,
        "deploy_1000_replicas_s": deploy_s,
        "server_rss_mb": rss,
        "nodes_register_s": nodes_s,
    });
    let out = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let path = out.join("bench/schedule.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("wrote {}", path.display());
}
