//! Test harness for clusters that run pods: every node is its own network
//! namespace on a shared bridge (in a "switch" namespace), the server with
//! its built-in agent in the first, `skep agent`s in the others. Pods and
//! their traffic never leave these namespaces.
//!
//! Teardown (also on panic): agents and the server are killed, then every
//! container process left in the nodes' cgroups, the pods' namespaces
//! (from each node's IPAM file), the node namespaces, the bpffs pins.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub const KUBECTL: &str = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33";

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces, cgroups and BPF programs: run them as root"
    );
}

/// A short tag unique to this test process and cluster (names of
/// namespaces and links are limited to 15 characters).
fn tag() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{:x}{}",
        std::process::id() % 0xfffff,
        N.fetch_add(1, Ordering::SeqCst)
    )
}

pub struct Node {
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub data_dir: PathBuf,
    pub bpf_root: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    args: Vec<String>,
}

impl Node {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The node process's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The agent's own state directory (containers, pods, IPAM).
    pub fn agent_dir(&self, server: bool) -> PathBuf {
        if server {
            self.data_dir.join("agent")
        } else {
            self.data_dir.clone()
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // Not `ip netns exec`: it remounts /sys, which would hide the
        // cgroup hierarchies the runtime needs. Only the network
        // namespace changes.
        let netns = std::fs::File::open(format!("/run/netns/{}", self.netns)).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_skep"));
        unsafe {
            // SAFETY: setns is async-signal-safe; `netns` outlives spawn.
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = netns.as_raw_fd();
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .args(&self.args)
            .env("SKEP_LOG", "info,skep_kubelet=debug,hickory_server=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start skep");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub tag: String,
    pub switch: String,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// A server (with its node) and `agents` more nodes.
    pub fn start(agents: usize) -> Self {
        Self::start_with(agents, &[])
    }

    pub fn start_with(agents: usize, server_args: &[&str]) -> Self {
        require_root();
        let tag = tag();
        let dir = tempfile::tempdir().unwrap();
        let switch = format!("sw{tag}");
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        let mut c = Cluster {
            dir,
            tag: tag.clone(),
            switch: switch.clone(),
            nodes: Vec::new(),
        };
        for i in 0..=agents {
            let netns = format!("n{i}{tag}");
            let node_ip = format!("192.168.77.{}", i + 1);
            ip(&["netns", "add", &netns]);
            ip(&["-n", &netns, "link", "set", "lo", "up"]);
            let (inside, outside) = ("eth0".to_string(), format!("p{i}{tag}"));
            ip(&[
                "-n", &netns, "link", "add", &inside, "type", "veth", "peer", "name", &outside,
                "netns", &switch,
            ]);
            ip(&[
                "-n", &switch, "link", "set", &outside, "master", "br0", "up",
            ]);
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{node_ip}/24"),
                "dev",
                &inside,
            ]);
            ip(&["-n", &netns, "link", "set", &inside, "up"]);
            let name = format!("node{i}-{tag}");
            let data_dir = c.dir.path().join(&name);
            std::fs::create_dir_all(&data_dir).unwrap();
            let bpf_root = bpffs().join(format!("{tag}-{i}"));
            let mut args: Vec<String> = if i == 0 {
                let mut a: Vec<String> = vec![
                    "server".into(),
                    "--data-dir".into(),
                    data_dir.display().to_string(),
                    "--api-listen".into(),
                    format!("{node_ip}:6443"),
                ];
                a.extend(server_args.iter().map(|s| s.to_string()));
                a
            } else {
                let server_dir = c.nodes[0].data_dir.clone();
                std::fs::copy(server_dir.join("tls/ca.crt"), data_dir.join("ca.crt")).unwrap();
                let token = std::fs::read_to_string(server_dir.join("node-token")).unwrap();
                vec![
                    "agent".into(),
                    "--server".into(),
                    "https://192.168.77.1:6443".into(),
                    "--token".into(),
                    token.trim().to_owned(),
                    "--data-dir".into(),
                    data_dir.display().to_string(),
                ]
            };
            args.extend([
                "--node-name".into(),
                name.clone(),
                "--node-ip".into(),
                node_ip.clone(),
                "--bpf-root".into(),
                bpf_root.display().to_string(),
            ]);
            let mut node = Node {
                name,
                netns,
                ip: node_ip,
                data_dir: data_dir.clone(),
                bpf_root,
                child: None,
                log: c.dir.path().join(format!("node{i}.log")),
                args,
            };
            node.spawn();
            c.nodes.push(node);
            if i == 0 {
                c.wait_server();
            }
        }
        for i in 0..=agents {
            let name = c.nodes[i].name.clone();
            c.wait_for(
                &format!("node {name} Ready"),
                Duration::from_secs(60),
                |c| {
                    c.kubectl(&[
                        "get",
                        "node",
                        &name,
                        "-o",
                        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                    ])
                    .stdout
                        == b"True"
                },
            );
        }
        c
    }

    fn wait_server(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.kubeconfig().exists()
            || !self.kubectl(&["get", "--raw", "/readyz"]).status.success()
        {
            if let Some(st) = self.nodes[0].child.as_mut().unwrap().try_wait().unwrap() {
                panic!("skep server exited with {st}:\n{}", self.nodes[0].log());
            }
            assert!(
                Instant::now() < deadline,
                "server not ready in 30 s:\n{}",
                self.nodes[0].log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.nodes[0].data_dir.join("kubeconfig.yaml")
    }

    /// Runs a command inside a node's namespace.
    pub fn in_node(&self, i: usize, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.nodes[i].netns])
            .args(cmd)
            .output()
            .unwrap()
    }

    /// `skep ctl ARGS` against the cluster, from the server's namespace.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.nodes[0].netns,
                env!("CARGO_BIN_EXE_skep"),
                "ctl",
            ])
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .output()
            .expect("run skep ctl")
    }

    /// kubectl 1.33, run inside the server's namespace.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_stdin(args, None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.nodes[0].netns,
                KUBECTL,
                "--kubeconfig",
            ])
            .arg(self.kubeconfig())
            .args(["--request-timeout", "30s"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl 1.33");
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }

    /// kubectl that must succeed; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn apply(&self, yaml: &str) {
        let out = self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml));
        assert!(
            out.status.success(),
            "apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A pod field via jsonpath.
    pub fn jsonpath(&self, ns: &str, what: &str, path: &str) -> String {
        let out = self.kubectl(&["-n", ns, "get", what, "-o", &format!("jsonpath={path}")]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until `cond` holds; on timeout fails with the cluster's logs.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut cond: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return;
            }
            if Instant::now() > deadline {
                let pods = self.kubectl(&["get", "pods", "-A", "-o", "wide"]);
                let events = self.kubectl(&["get", "events", "-A"]);
                panic!(
                    "timed out after {timeout:?} waiting for {what}\npods:\n{}\nevents:\n{}\nnode logs:\n{}",
                    String::from_utf8_lossy(&pods.stdout),
                    String::from_utf8_lossy(&events.stdout),
                    self.nodes
                        .iter()
                        .map(|n| format!("--- {}\n{}", n.name, tail(&n.log(), 60)))
                        .collect::<String>()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for a pod's Ready condition.
    pub fn wait_ready(&self, ns: &str, pod: &str) {
        self.wait_for(
            &format!("pod {ns}/{pod} Ready"),
            Duration::from_secs(60),
            |c| {
                c.jsonpath(
                    ns,
                    &format!("pod/{pod}"),
                    "{.status.conditions[?(@.type==\"Ready\")].status}",
                ) == "True"
            },
        );
    }

    /// Kills a node's skep process (SIGKILL) and leaves it down: a failed
    /// node (its pods' processes keep running, as when a kubelet dies).
    pub fn stop_node(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Kills a node's skep process (SIGKILL) and starts it again.
    pub fn restart_node(&mut self, i: usize) {
        self.nodes[i].kill();
        self.nodes[i].spawn();
        if i == 0 {
            self.wait_server();
        }
    }
}

/// A bpffs instance of the test clusters' own (not /sys/fs/bpf, so no
/// test touches the host's pins).
fn bpffs() -> PathBuf {
    let dir = PathBuf::from("/run/skep-test-bpf");
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/run/skep-test-bpf"));
    if !mounted {
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/run/skep-test-bpf"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting bpffs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Kills every process in the cgroups below `skep-<node>` (every
/// controller hierarchy), then removes those cgroups bottom-up.
fn kill_cgroups(node: &str) {
    for root in [
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/cpuacct",
        // Hybrid hosts: the pods' cgroup v2 dirs (the mesh capture's).
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ] {
        let top = Path::new(root).join(format!("skep-{node}"));
        if !top.exists() {
            continue;
        }
        let mut dirs = Vec::new();
        collect_dirs(&top, &mut dirs);
        for d in &dirs {
            for pid in std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
            {
                if let Ok(p) = pid.trim().parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&e.path(), out);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (i, n) in self.nodes.iter_mut().enumerate().rev() {
            n.kill();
            kill_cgroups(&n.name);
            let ipam = n.agent_dir(i == 0).join("ipam.json");
            let text = std::fs::read_to_string(ipam).unwrap_or_default();
            // Pod namespaces: named from pod UIDs, which the IPAM file lists.
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                let mut uids = Vec::new();
                collect_uids(&v, &mut uids);
                for uid in uids {
                    let name = skep_dataplane::podnet::netns_name(&uid);
                    let _ = Command::new("ip").args(["netns", "del", &name]).output();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &n.netns]).output();
            let _ = skep_dataplane::lb::KernelDatapath::remove_pins(&n.bpf_root);
            let _ = std::fs::remove_dir_all(&n.bpf_root);
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .output();
        if std::thread::panicking() {
            // Keep what explains the failure.
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            eprintln!("cluster state kept in {}", dir.keep().display());
        }
    }
}

/// Every string that looks like a UID anywhere in the IPAM file.
fn collect_uids(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) if s.len() == 36 && s.matches('-').count() == 4 => {
            out.push(s.clone())
        }
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if k.len() == 36 && k.matches('-').count() == 4 {
                    out.push(k.clone());
                }
                collect_uids(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_uids(x, out)),
        _ => {}
    }
}
