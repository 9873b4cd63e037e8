//! `cargo xtask bench pods`: 100 pods created at once on one node; how long
//! until each is Running and Ready (seen through a watch, as a user sees
//! it), and what the node agent costs in memory, idle and with the pods.
//!
//! The server (`--no-agent`) and a separate `skep agent` run in a network
//! namespace the benchmark makes; pods live in their own namespaces below
//! it. The same run is repeated with the Docker runtime against a private
//! dockerd the benchmark starts (no bridge, no iptables), with a busybox
//! image imported from the host's busybox-static. Writes
//! target/bench/pods.json.

// Benchmark harness: a failed expect aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/docker/mod.rs"]
mod docker;
mod support;

use support::{cleanup_node, ip, pct, rss_mb, shims_rss_mb, spawn_in};

use futures::StreamExt;
use serde_json::{Value, json};
use std::{
    collections::HashMap,
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

const PODS: usize = 100;
const NODE_IP: &str = "192.168.78.1";

struct Run {
    running: Vec<f64>,
    ready: Vec<f64>,
    agent_idle: f64,
    agent_loaded: f64,
    shims: (usize, f64, f64),
    delete_all_s: f64,
}

fn make_netns(netns: &str) {
    ip(&["netns", "add", netns]);
    ip(&["-n", netns, "link", "set", "lo", "up"]);
    // (No dummy driver on every kernel: a veth pair inside the namespace.)
    ip(&[
        "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ]);
    ip(&["-n", netns, "link", "set", "eth1", "up"]);
    ip(&[
        "-n",
        netns,
        "addr",
        "add",
        &format!("{NODE_IP}/24"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", netns, "link", "set", "eth0", "up"]);
}

async fn run(runtime: &str, docker_socket: Option<&str>, tag: &str, netns: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let bpf = PathBuf::from("/run/skep-bench-bpf");
    support::ensure_bpffs(&bpf);
    let server_dir = dir.path().join("server");
    let agent_dir = dir.path().join("agent");
    let (netns, tag) = (netns.to_owned(), tag.to_owned());
    std::fs::create_dir_all(&agent_dir).unwrap();
    let server = spawn_in(
        &netns,
        &[
            "server",
            "--no-agent",
            "--data-dir",
            &server_dir.display().to_string(),
            "--api-listen",
            &format!("{NODE_IP}:6443"),
        ]
        .map(String::from),
        &dir.path().join("server.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server_dir.join("node-token").exists() || !server_dir.join("kubeconfig.yaml").exists() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    std::fs::copy(server_dir.join("tls/ca.crt"), agent_dir.join("ca.crt")).unwrap();
    let node = format!("bench-{tag}");
    let mut agent_args: Vec<String> = [
        "agent",
        "--server",
        &format!("https://{NODE_IP}:6443"),
        "--token",
        std::fs::read_to_string(server_dir.join("node-token"))
            .unwrap()
            .trim(),
        "--data-dir",
        &agent_dir.display().to_string(),
        "--node-name",
        &node,
        "--node-ip",
        NODE_IP,
        "--bpf-root",
        &bpf.join(&tag).display().to_string(),
        "--runtime",
        runtime,
    ]
    .map(String::from)
    .to_vec();
    if let Some(sock) = docker_socket {
        agent_args.extend(["--docker-socket".to_string(), sock.to_string()]);
    }
    let agent = spawn_in(&netns, &agent_args, &dir.path().join("agent.log"));
    // The client talks to the API from inside the namespace: a thread
    // that entered it runs the benchmark's runtime.
    let kubeconfig = server_dir.join("kubeconfig.yaml");
    let client = skep_client::Client::from_kubeconfig(&kubeconfig).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client
            .get(&format!("/api/v1/nodes/{node}"))
            .await
            .ok()
            .is_some_and(|n| {
                n["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node not Ready: {}",
            std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let agent_idle = rss_mb(agent.0.id());
    let image = if runtime == "docker" {
        "skep-bench/busybox:1"
    } else {
        "host"
    };
    let list = client.get("/api/v1/namespaces/default/pods").await.unwrap();
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut watch = client
        .watch(&format!(
            "/api/v1/namespaces/default/pods?resourceVersion={rv}"
        ))
        .await
        .unwrap();
    let mut created: HashMap<String, Instant> = HashMap::new();
    let mut tasks = Vec::new();
    for i in 0..PODS {
        let name = format!("p{i}");
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": image, "command": ["sleep", "3600"]}]}});
        let c = client.clone();
        created.insert(name, Instant::now());
        tasks.push(tokio::spawn(async move {
            c.create("/api/v1/namespaces/default/pods", &pod)
                .await
                .map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mut running: HashMap<String, f64> = HashMap::new();
    let mut ready: HashMap<String, f64> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while ready.len() < PODS {
        let ev = tokio::time::timeout_at(deadline, watch.next())
            .await
            .expect("pods not ready in 120 s")
            .unwrap()
            .unwrap();
        let name = ev.object["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let Some(t0) = created.get(&name) else {
            continue;
        };
        if ev.object["status"]["phase"] == "Running" {
            running
                .entry(name.clone())
                .or_insert_with(|| t0.elapsed().as_secs_f64());
        }
        let is_ready = ev.object["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        if is_ready {
            ready
                .entry(name)
                .or_insert_with(|| t0.elapsed().as_secs_f64());
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let agent_loaded = rss_mb(agent.0.id());
    let shims = shims_rss_mb(&agent_dir);
    // Delete them all and wait until they are gone.
    let t = Instant::now();
    let del: Vec<_> = (0..PODS)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                c.delete(&format!("/api/v1/namespaces/default/pods/p{i}"))
                    .await
                    .map(|_| ())
            })
        })
        .collect();
    for d in del {
        let _ = d.await;
    }
    loop {
        let left = client.get("/api/v1/namespaces/default/pods").await.unwrap()["items"]
            .as_array()
            .map_or(0, Vec::len);
        if left == 0 || t.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delete_all_s = t.elapsed().as_secs_f64();
    drop(agent);
    drop(server);
    if std::env::var_os("SKEP_BENCH_KEEP").is_some() {
        let kept = dir.keep();
        println!("kept {}", kept.display());
    }
    cleanup_node(&node, &agent_dir.join("ipam.json"));
    let _ = Command::new("ip").args(["netns", "del", &netns]).output();
    let _ = std::fs::remove_dir_all(bpf.join(&tag));
    Run {
        running: running.into_values().collect(),
        ready: ready.into_values().collect(),
        agent_idle,
        agent_loaded,
        shims,
        delete_all_s,
    }
}

fn main() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the pods benchmark makes network namespaces and cgroups: run it as root"
    );
    // The benchmark's own threads talk to the API inside the namespace:
    // run the whole tokio runtime on threads that enter it first.
    let dockerd = docker::Dockerd::start();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let rt = skep_kubelet::runtime::docker::DockerRuntime::connect(dockerd.socket())
            .await
            .unwrap();
        rt.import_busybox("skep-bench/busybox:1", &["sh", "sleep"])
            .await
            .unwrap();
    });
    let docker = Some(dockerd.socket().display().to_string());
    let mut report = serde_json::Map::new();
    // SKEP_BENCH_RUNTIMES=process (or docker) runs one of them only, for
    // profiling; the report then has that runtime's keys only.
    let only = std::env::var("SKEP_BENCH_RUNTIMES").ok();
    let runtimes: Vec<&str> = ["process", "docker"]
        .into_iter()
        .filter(|r| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|x| x == *r))
        })
        .collect();
    println!(
        "{:<8} {:>14} {:>14} {:>14} {:>14} {:>10} {:>12} {:>16} {:>12}",
        "runtime",
        "running p50 s",
        "running p99 s",
        "ready p50 s",
        "ready p99 s",
        "agent MB",
        "agent MB/100",
        "shims n, RSS, PSS MB",
        "delete all s"
    );
    for rt in runtimes {
        let tag = format!("{}{}", std::process::id() % 100_000, &rt[..1]);
        let netns = format!("skbp{tag}");
        make_netns(&netns);
        let netns_holder = netns.clone();
        let sock = docker.clone();
        let rt_name = rt.to_string();
        let r = std::thread::spawn(move || {
            // This thread (which drives the benchmark) and every runtime
            // thread enter the node's network namespace.
            let f = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .on_thread_start(move || {
                    // Client sockets must be made inside the node's namespace.
                    if let Ok(f) = std::fs::File::open(format!("/run/netns/{netns_holder}")) {
                        unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
                    }
                })
                .build()
                .unwrap();
            runtime.block_on(run(&rt_name, sock.as_deref(), &tag, &netns))
        })
        .join()
        .unwrap();
        let (mut running, mut ready) = (r.running.clone(), r.ready.clone());
        let (r50, r99, d50, d99) = (
            pct(&mut running, 0.5),
            pct(&mut running, 0.99),
            pct(&mut ready, 0.5),
            pct(&mut ready, 0.99),
        );
        println!(
            "{rt:<8} {r50:>14.3} {r99:>14.3} {d50:>14.3} {d99:>14.3} {:>10.1} {:>12.1} {:>16} {:>12.2}",
            r.agent_idle,
            r.agent_loaded,
            format!("{}, {:.0}, {:.0}", r.shims.0, r.shims.1, r.shims.2),
            r.delete_all_s
        );
        report.insert(format!("{rt}_running_p50_s"), json!(r50));
        report.insert(format!("{rt}_running_p99_s"), json!(r99));
        report.insert(format!("{rt}_ready_p50_s"), json!(d50));
        report.insert(format!("{rt}_ready_p99_s"), json!(d99));
        report.insert(format!("{rt}_delete_100_s"), json!(r.delete_all_s));
        report.insert(format!("{rt}_shims"), json!(r.shims.0));
        report.insert(format!("{rt}_shims_rss_mb"), json!(r.shims.1));
        report.insert(format!("{rt}_shims_pss_mb"), json!(r.shims.2));
        if rt == "process" {
            report.insert("agent_rss_mb_idle".into(), json!(r.agent_idle));
            report.insert("agent_rss_mb_100_pods".into(), json!(r.agent_loaded));
        } else {
            report.insert("docker_agent_rss_mb_idle".into(), json!(r.agent_idle));
            report.insert("docker_agent_rss_mb_100_pods".into(), json!(r.agent_loaded));
        }
    }
    println!(
        "targets: process ready p99 ≤ 1 s (upstream SLO 5 s); agent RSS idle ≤ 50 MB (k3s agent ≈ 275 MB, not measured here)"
    );
    let out = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let path = out.join("bench/pods.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&Value::Object(report)).unwrap(),
    )
    .unwrap();
    println!("wrote {}", path.display());
}
