//! Scheduling and rollout figures, in process (no HTTP): an `Api` over a
//! SQLite store in a temporary directory, the controller manager, N Node
//! objects kept Ready, and a simulated kubelet that reports bound pods
//! Running and Ready. Prints JSON with `pods_per_s_<N>_nodes` (bare pods
//! bound, as observed by watch) and `deploy_<R>_replicas_s` (a Deployment
//! from create to every replica Running and Ready).
//!
//! `cargo run --release -p skep-controllers --example schedule_bench -- [nodes] [pods] [replicas]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use skep_apiserver::api::Api;
use skep_controllers::{
    Manager, ManagerOptions,
    client::{Client, DEPLOYMENTS, NAMESPACES, NODES, PODS},
    informer::{Change, Informer},
};
use skep_store::{SqliteStore, Store};
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let nodes = args.first().copied().unwrap_or(1000);
    let pods = args.get(1).copied().unwrap_or(10_000);
    let replicas = args.get(2).copied().unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("state.db")).unwrap());
    let api = Arc::new(Api::new(store.clone(), "127.0.0.1:6443".into()));
    let client = Client::new(api.clone());
    for ns in ["default", "kube-system", "bench"] {
        client
            .create(NAMESPACES, None, json!({"metadata": {"name": ns}}))
            .await
            .unwrap();
    }
    let t = Instant::now();
    futures::future::join_all((0..nodes).map(|i| {
        let client = client.clone();
        async move {
            let name = format!("node-{i}");
            client
                .create(NODES, None, json!({"metadata": {"name": name}}))
                .await
                .unwrap();
            client
                .patch(
                    NODES,
                    None,
                    &name,
                    Some("status"),
                    json!({"status": {
                        "conditions": [{"type": "Ready", "status": "True"}],
                        "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"},
                    }}),
                )
                .await
                .unwrap();
        }
    }))
    .await;
    eprintln!("{nodes} nodes in {:.2}s", t.elapsed().as_secs_f64());

    // The simulated kubelet and the bound/running counters, fed by watch.
    let bound = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let pods_inf = Informer::new(client.info(PODS).unwrap());
    {
        let (bound, running) = (bound.clone(), running.clone());
        pods_inf.on_change(Arc::new(move |c: &Change| {
            let (Some(new), old) = (&c.new, &c.old) else {
                return;
            };
            let node = |p: &Value| {
                p.pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            let phase = |p: &Value| {
                p.pointer("/status/phase")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            if !node(new).is_empty() && old.as_ref().is_none_or(|o| node(o).is_empty()) {
                bound.fetch_add(1, Ordering::Relaxed);
                let ns = new["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                let name = new["metadata"]["name"].as_str().unwrap_or("").to_owned();
                let _ = tx.send((ns, name));
            }
            if phase(new) == "Running" && old.as_ref().is_none_or(|o| phase(o) != "Running") {
                running.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::spawn(pods_inf.clone().run(store.clone()));
    {
        let client = client.clone();
        tokio::spawn(async move {
            let mut ip = 0u32;
            while let Some((ns, name)) = rx.recv().await {
                ip += 1;
                let client = client.clone();
                let addr = format!("10.{}.{}.{}", 42 + ip / 65536, (ip / 256) % 256, ip % 256);
                tokio::spawn(async move {
                    let _ = client
                        .patch(
                            PODS,
                            Some(&ns),
                            &name,
                            Some("status"),
                            json!({"status": {
                                "phase": "Running", "podIP": addr,
                                "conditions": [{"type": "Ready", "status": "True"}],
                            }}),
                        )
                        .await;
                });
            }
        });
    }
    let _manager = Manager::spawn(api.clone(), ManagerOptions::default());

    // Bare pods: scheduling throughput.
    let t = Instant::now();
    futures::future::join_all((0..pods).map(|i| {
        let client = client.clone();
        async move {
            client
                .create(
                    PODS,
                    Some("bench"),
                    json!({"metadata": {"name": format!("p-{i}")},
                    "spec": {"containers": [{"name": "c", "image": "x",
                        "resources": {"requests": {"cpu": "100m", "memory": "100Mi"}}}]}}),
                )
                .await
                .unwrap();
        }
    }))
    .await;
    let created = t.elapsed().as_secs_f64();
    while bound.load(Ordering::Relaxed) < pods {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sched = t.elapsed().as_secs_f64();
    eprintln!("{pods} pods created in {created:.2}s, all bound after {sched:.2}s");

    // A Deployment: create → every replica Running and Ready.
    let base = running.load(Ordering::Relaxed);
    while running.load(Ordering::Relaxed) < pods {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = base;
    let t = Instant::now();
    client
        .create(
            DEPLOYMENTS,
            Some("bench"),
            json!({"metadata": {"name": "big"}, "spec": {
            "replicas": replicas, "selector": {"matchLabels": {"app": "big"}},
            "template": {"metadata": {"labels": {"app": "big"}},
                         "spec": {"containers": [{"name": "c", "image": "x"}]}}}}),
        )
        .await
        .unwrap();
    loop {
        let d = client.get(DEPLOYMENTS, Some("bench"), "big").await.unwrap();
        if d.pointer("/status/availableReplicas")
            .and_then(Value::as_u64)
            == Some(replicas as u64)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deploy = t.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            format!("pods_per_s_{nodes}_nodes"): (pods as f64 / sched).round(),
            format!("deploy_{replicas}_replicas_s"): (deploy * 100.0).round() / 100.0,
            "nodes": nodes, "pods": pods, "replicas": replicas,
        })
    );
}
