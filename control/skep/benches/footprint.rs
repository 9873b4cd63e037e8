//! `cargo xtask bench footprint`: what a skep cluster costs to boot and to
//! keep running. Everything runs in network namespaces the benchmark makes
//! (a bridge in the server's namespace, one namespace per extra node), so
//! nothing reaches the host's network.
//!
//! 1. boot: `skep server` (embedded SQLite, process runtime, eBPF
//!    dataplane, DNS, its own node) on an empty data directory; start →
//!    node Ready; server RSS once idle.
//! 2. demo: the same with `xtask up`'s demo in DATA_DIR/manifests before
//!    the start (the server applies it itself); start → every demo pod
//!    Ready; then 100 more pods (a Deployment) and the server's RSS.
//! 3. three nodes: the server and two `skep agent`s; each agent's RSS idle
//!    and with 100 pods spread over the nodes.
//! 4. the size of the binary (as built, and stripped).
//!
//! The peer, k3s, cannot be fetched on these machines (no registry this
//! kind reaches ships it); its figures are quoted from its documentation
//! and labelled so. Writes target/bench/footprint.json.

// Benchmark harness: a failed expect aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};
use support::{Proc, cleanup_node, enter_netns, ip, pss_mb, rss_mb, shims_rss_mb, spawn_in};

const DEMO: &str = include_str!("../../../xtask/demo/demo.yaml");
/// The nodes' LAN: a bridge in a namespace of its own (address .254,
/// where the benchmark's client sits); node i (0 = the server) has .1+i.
const SUBNET: &str = "10.96.250";
/// How long a process must have been quiet before "idle" memory is read.
const SETTLE: Duration = Duration::from_secs(10);
const LOAD_PODS: usize = 100;

fn node_ip(i: usize) -> String {
    format!("{SUBNET}.{}", i + 1)
}

fn lan(tag: &str) -> String {
    format!("skfp{tag}")
}

fn netns(tag: &str, i: usize) -> String {
    format!("skfp{tag}-{i}")
}

fn node_name(tag: &str, i: usize) -> String {
    format!("fp{tag}-{i}")
}

fn make_lan(tag: &str) {
    let lan = lan(tag);
    ip(&["netns", "add", &lan]);
    ip(&["-n", &lan, "link", "set", "lo", "up"]);
    ip(&["-n", &lan, "link", "add", "br0", "type", "bridge"]);
    ip(&[
        "-n",
        &lan,
        "addr",
        "add",
        &format!("{SUBNET}.254/24"),
        "dev",
        "br0",
    ]);
    ip(&["-n", &lan, "link", "set", "br0", "up"]);
}

/// Node namespaces 0..=extra, each with a veth into the LAN's bridge and
/// a default route to the LAN namespace (a dead end: nothing leaves).
/// `tag` is the cluster's (unique per boot: a node namespace that lingers
/// while its last processes exit must not collide with the next boot's).
fn make_nodes(lan: &str, tag: &str, extra: usize) {
    for i in 0..=extra {
        let ns = netns(tag, i);
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let port = format!("v{tag}-{i}");
        ip(&[
            "-n", lan, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["-n", lan, "link", "set", &port, "master", "br0"]);
        ip(&["-n", lan, "link", "set", &port, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", node_ip(i)),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &format!("{SUBNET}.254"),
        ]);
    }
}

fn remove_nodes(tag: &str, extra: usize) {
    for i in (0..=extra).rev() {
        let _ = Command::new("ip")
            .args(["netns", "del", &netns(tag, i)])
            .output();
    }
}

struct Cluster {
    tag: String,
    dir: tempfile::TempDir,
    server: Option<Proc>,
    agents: Vec<Proc>,
    extra: usize,
    started: Instant,
}

impl Cluster {
    fn server_dir(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    fn agent_dir(&self, i: usize) -> PathBuf {
        if i == 0 {
            self.server_dir().join("agent")
        } else {
            self.dir.path().join(format!("agent-{i}"))
        }
    }

    /// Boots the server (with its own node); `manifests` go into its
    /// manifests directory before the start.
    fn boot(lan_tag: &str, extra: usize, manifests: Option<&str>) -> Self {
        static BOOTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = BOOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = &format!("{lan_tag}b{n}");
        make_nodes(&lan(lan_tag), tag, extra);
        let dir = tempfile::tempdir().unwrap();
        let server_dir = dir.path().join("server");
        if let Some(m) = manifests {
            std::fs::create_dir_all(server_dir.join("manifests")).unwrap();
            std::fs::write(server_dir.join("manifests/demo.yaml"), m).unwrap();
        }
        let started = Instant::now();
        let server = spawn_in(
            &netns(tag, 0),
            &[
                "server",
                "--data-dir",
                &server_dir.display().to_string(),
                "--api-listen",
                &format!("{}:6443", node_ip(0)),
                "--node-name",
                &node_name(tag, 0),
                "--node-ip",
                &node_ip(0),
                "--bpf-root",
                &format!("/sys/fs/bpf/skfp{tag}-0"),
            ]
            .map(String::from),
            &dir.path().join("server.log"),
        );
        Cluster {
            tag: tag.to_owned(),
            dir,
            server: Some(server),
            agents: Vec::new(),
            extra,
            started,
        }
    }

    fn node(&self, i: usize) -> String {
        node_name(&self.tag, i)
    }

    fn server_pid(&self) -> u32 {
        self.server.as_ref().unwrap().0.id()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Waits for the kubeconfig and returns a client (this thread must be
    /// in the server's namespace).
    fn client(&self) -> skep_client::Client {
        let kc = self.server_dir().join("kubeconfig.yaml");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !kc.exists() {
            assert!(
                Instant::now() < deadline,
                "no kubeconfig after 30 s: {}",
                self.log("server.log")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Written atomically? Give the writer a moment if it is empty.
        while std::fs::metadata(&kc).map_or(0, |m| m.len()) == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        skep_client::Client::from_kubeconfig(&kc).unwrap()
    }

    fn start_agents(&mut self) {
        let server_dir = self.server_dir();
        let token = std::fs::read_to_string(server_dir.join("node-token")).unwrap();
        for i in 1..=self.extra {
            let dir = self.agent_dir(i);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(server_dir.join("tls/ca.crt"), dir.join("ca.crt")).unwrap();
            let agent = spawn_in(
                &netns(&self.tag, i),
                &[
                    "agent",
                    "--server",
                    &format!("https://{}:6443", node_ip(0)),
                    "--token",
                    token.trim(),
                    "--data-dir",
                    &dir.display().to_string(),
                    "--node-name",
                    &node_name(&self.tag, i),
                    "--node-ip",
                    &node_ip(i),
                    "--bpf-root",
                    &format!("/sys/fs/bpf/skfp{}-{i}", self.tag),
                ]
                .map(String::from),
                &self.dir.path().join(format!("agent-{i}.log")),
            );
            self.agents.push(agent);
        }
    }

    fn stop(self) {
        drop(self);
    }
}

/// Stops the processes and removes what the cluster made, also when a
/// phase panics.
impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.clear();
        self.server = None;
        for i in 0..=self.extra {
            cleanup_node(
                &node_name(&self.tag, i),
                &self.agent_dir(i).join("ipam.json"),
            );
            let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/skfp{}-{i}", self.tag));
        }
        remove_nodes(&self.tag, self.extra);
    }
}

async fn node_ready(client: &skep_client::Client, node: &str) -> bool {
    client
        .get(&format!("/api/v1/nodes/{node}"))
        .await
        .ok()
        .is_some_and(|n| condition_true(&n, "Ready"))
}

fn condition_true(obj: &Value, kind: &str) -> bool {
    obj["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == kind && c["status"] == "True")
}

/// (pods, Ready pods) under a list path.
async fn ready_pods(client: &skep_client::Client, path: &str) -> (usize, usize) {
    let Ok(list) = client.get(path).await else {
        return (0, 0);
    };
    let items = list["items"].as_array().cloned().unwrap_or_default();
    let ready = items.iter().filter(|p| condition_true(p, "Ready")).count();
    (items.len(), ready)
}

/// Polls every 20 ms until `cond`; the time since the cluster's start.
async fn until<F, Fut>(c: &Cluster, what: &str, timeout: Duration, mut cond: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return c.started.elapsed().as_secs_f64();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}; server log:\n{}",
            c.log("server.log")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn load_deployment(client: &skep_client::Client, replicas: usize) {
    let d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "load", "namespace": "default"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "load"}},
            "template": {"metadata": {"labels": {"app": "load"}},
                "spec": {"terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "c", "image": "host", "command": ["sleep", "infinity"]}]}}}});
    client
        .create("/apis/apps/v1/namespaces/default/deployments", &d)
        .await
        .unwrap();
}

struct Figures(serde_json::Map<String, Value>);
impl Figures {
    fn put(&mut self, key: &str, v: f64, what: &str) {
        println!("{what:<58} {v:>10.2}   ({key})");
        self.0
            .insert(key.into(), json!((v * 1000.0).round() / 1000.0));
    }
}

async fn run(tag: &str, f: &mut Figures) {
    // 1. Boot on an empty data directory.
    let c = Cluster::boot(tag, 0, None);
    let client = c.client();
    let node = c.node(0);
    let t = until(&c, "node Ready", Duration::from_secs(60), || {
        node_ready(&client, &node)
    })
    .await;
    f.put(
        "boot_to_node_ready_s",
        t,
        "skep server start → node Ready (s)",
    );
    tokio::time::sleep(SETTLE).await;
    f.put(
        "server_rss_mb_idle",
        rss_mb(c.server_pid()),
        "server RSS idle, its node included (MB)",
    );
    f.put(
        "server_pss_mb_idle",
        pss_mb(c.server_pid()),
        "server PSS idle (MB)",
    );
    c.stop();

    // 2. Boot with the demo in the manifests directory; then 100 pods.
    let c = Cluster::boot(tag, 0, Some(DEMO));
    let client = c.client();
    let node = c.node(0);
    let t = until(&c, "node Ready (demo run)", Duration::from_secs(60), || {
        node_ready(&client, &node)
    })
    .await;
    f.put(
        "demo_run_boot_to_node_ready_s",
        t,
        "(demo run) start → node Ready (s)",
    );
    let t = until(
        &c,
        "the demo's 5 pods Ready",
        Duration::from_secs(120),
        || async { ready_pods(&client, "/api/v1/namespaces/demo/pods").await == (5, 5) },
    )
    .await;
    f.put(
        "boot_to_demo_ready_s",
        t,
        "start → every demo pod Ready (s)",
    );
    tokio::time::sleep(SETTLE).await;
    f.put(
        "server_rss_mb_demo",
        rss_mb(c.server_pid()),
        "server RSS with the demo (5 pods) (MB)",
    );
    load_deployment(&client, LOAD_PODS).await;
    let t0 = c.started.elapsed().as_secs_f64();
    let t = until(&c, "100 pods Ready", Duration::from_secs(300), || async {
        ready_pods(&client, "/api/v1/namespaces/default/pods").await == (LOAD_PODS, LOAD_PODS)
    })
    .await;
    f.put(
        "pods_100_ready_s",
        t - t0,
        "100-replica Deployment created → all Ready (s)",
    );
    tokio::time::sleep(SETTLE).await;
    f.put(
        "server_rss_mb_100_pods",
        rss_mb(c.server_pid()),
        "server RSS with 105 pods (MB)",
    );
    let (n, rss, pss) = shims_rss_mb(&c.agent_dir(0));
    f.put("shims", n as f64, "container shims running");
    f.put("shims_pss_mb", pss, "their PSS in all (MB)");
    f.put(
        "shims_rss_mb",
        rss,
        "their RSS in all (MB, shared pages counted each time)",
    );
    c.stop();

    // 3. Three nodes.
    let mut c = Cluster::boot(tag, 2, None);
    let client = c.client();
    let node = c.node(0);
    until(
        &c,
        "server node Ready (3 nodes)",
        Duration::from_secs(60),
        || node_ready(&client, &node),
    )
    .await;
    let t_agents = Instant::now();
    c.start_agents();
    for i in 1..=2 {
        let name = c.node(i);
        until(
            &c,
            &format!("node {name} Ready"),
            Duration::from_secs(60),
            || node_ready(&client, &name),
        )
        .await;
    }
    f.put(
        "agent_join_to_ready_s",
        t_agents.elapsed().as_secs_f64(),
        "two `skep agent`s started → both nodes Ready (s)",
    );
    tokio::time::sleep(SETTLE).await;
    let idle: Vec<f64> = c.agents.iter().map(|a| rss_mb(a.0.id())).collect();
    f.put(
        "agent_rss_mb_idle",
        max(&idle),
        "agent RSS idle, the larger of two (MB)",
    );
    f.put(
        "agent_pss_mb_idle",
        c.agents
            .iter()
            .map(|a| pss_mb(a.0.id()))
            .fold(0.0, f64::max),
        "agent PSS idle (MB)",
    );
    load_deployment(&client, LOAD_PODS).await;
    until(
        &c,
        "100 pods Ready on 3 nodes",
        Duration::from_secs(300),
        || async {
            ready_pods(&client, "/api/v1/namespaces/default/pods").await == (LOAD_PODS, LOAD_PODS)
        },
    )
    .await;
    tokio::time::sleep(SETTLE).await;
    let loaded: Vec<f64> = c.agents.iter().map(|a| rss_mb(a.0.id())).collect();
    f.put(
        "agent_rss_mb_loaded",
        max(&loaded),
        "agent RSS with ~33 of 100 pods, the larger of two (MB)",
    );
    f.put(
        "server_rss_mb_3_nodes_loaded",
        rss_mb(c.server_pid()),
        "server RSS, 3 nodes, 100 pods (MB)",
    );
    c.stop();
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn binary_sizes(f: &mut Figures) {
    let bin = Path::new(env!("CARGO_BIN_EXE_skep"));
    let size = std::fs::metadata(bin).unwrap().len() as f64 / 1e6;
    f.put("binary_mb", size, "skep binary as built (MB)");
    let stripped = std::env::temp_dir().join(format!("skep-stripped-{}", std::process::id()));
    let ok = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(bin)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "strip failed (binutils is part of setup's packages)");
    let s = std::fs::metadata(&stripped).unwrap().len() as f64 / 1e6;
    let _ = std::fs::remove_file(&stripped);
    f.put("binary_stripped_mb", s, "skep binary stripped (MB)");
}

fn main() {
    // SAFETY: plain syscall.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the footprint benchmark makes network namespaces, cgroups and BPF maps: run it as root"
    );
    let tag = format!("{}", std::process::id() % 10_000);
    let mut f = Figures(serde_json::Map::new());
    binary_sizes(&mut f);
    // The benchmark's client talks to the API from the LAN namespace: the
    // driving thread and every runtime thread enter it.
    make_lan(&tag);
    let t = tag.clone();
    let result = std::thread::spawn(move || {
        enter_netns(&lan(&t));
        let holder = lan(&t);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || enter_netns(&holder))
            .build()
            .unwrap();
        let mut f = f;
        rt.block_on(run(&t, &mut f));
        f
    })
    .join();
    let _ = Command::new("ip")
        .args(["netns", "del", &lan(&tag)])
        .output();
    let f = match result {
        Ok(f) => f,
        Err(e) => std::panic::resume_unwind(e),
    };
    println!(
        "k3s, from its documentation (not runnable here): default pods Ready ≈ 50 s after start; server 768 MB–1.6 GB with a workload; agent ≈ 275 MB"
    );
    println!("targets: node Ready ≤ 3 s; demo Ready ≤ 10 s; server idle ≤ 150 MB; agent ≤ 50 MB");
    let out = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let path = out.join("bench/footprint.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&Value::Object(f.0)).unwrap(),
    )
    .unwrap();
    println!("wrote {}", path.display());
}
