//! A skep cluster whose nodes are Docker containers (as kind does): node 0
//! runs `skep server`, nodes 1..N-1 `skep agent` joining it with the node
//! token. Used by `cargo xtask up --docker` (xtask/src/up_docker.rs) and by
//! control/skep/tests/docker_nodes.rs, which includes this file with
//! `#[path]`, so it depends on nothing but std, anyhow and libc.
//!
//! - The node image is made with `docker import` from a rootfs built here
//!   (no registry): the skep binary, the shared libraries `ldd` lists for
//!   it, busybox-static (sh, mount, ip, sleep, …) and `/skep-node-init`.
//! - A private dockerd (own data root, exec root and socket; no default
//!   bridge, no iptables rules, no change to the host's ip_forward, so the
//!   host's firewall and routing are left alone)
//!   unless an existing daemon's socket is given.
//! - The nodes share a `docker network create --internal` bridge. With
//!   iptables off, Docker still gives the containers a default route via
//!   the bridge, so `/skep-node-init` deletes it: a node (and its pods)
//!   reaches the other nodes' subnet and nothing else. The containers'
//!   /etc/resolv.conf names no outside resolver either, so the cluster DNS
//!   forwards nothing beyond the node.
//! - Not `--privileged`: it asks for every capability the kernel knows,
//!   and where the caller's bounding set lacks one (CAP_SYS_RESOURCE on
//!   these machines) runc fails with "unable to apply caps". The node gets
//!   all capabilities the caller has, no seccomp/AppArmor profile, unmasked
//!   /proc, every device in its device cgroup and a cgroup namespace of its
//!   own; `/skep-node-init` remounts /sys and the cgroup hierarchies
//!   read-write (fresh mounts inside the cgroup namespace, so their root is
//!   the container's cgroup and the kubelet's `skep-<node>/…` cgroups nest
//!   under it), mounts a bpffs of the node's own at /sys/fs/bpf (the pins
//!   go away with the container) and the cgroup2 hierarchy at
//!   /sys/fs/cgroup/unified on v1/hybrid hosts.
//! - Each node's data directory is a host directory bind-mounted at
//!   /var/lib/skep, so the host reads the kubeconfig, CA and token directly.
#![allow(dead_code)]

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Label on every container of a cluster (value: the cluster name).
pub const LABEL: &str = "io.skep.docker-cluster";
/// Where a node's data directory is mounted inside its container.
const NODE_DATA: &str = "/var/lib/skep";
const API_PORT: u16 = 6443;

/// What to build and run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Names the network, the bridge, the image tag and the containers
    /// (`<name>-<i>`, which are also the node names).
    pub name: String,
    /// Server plus agents.
    pub nodes: u32,
    /// The skep binary copied into the image.
    pub binary: PathBuf,
    /// Host directory for the rootfs, the nodes' data and the dockerd.
    pub state_dir: PathBuf,
    /// First three octets of the nodes' /24 (the host's bridge is .1,
    /// node i is .2+i).
    pub subnet: [u8; 3],
    /// An existing daemon's socket; `None` starts a private dockerd.
    pub docker_socket: Option<PathBuf>,
}

impl Spec {
    pub fn image(&self) -> String {
        format!("skep-node:{}", self.name)
    }

    pub fn node_name(&self, i: u32) -> String {
        format!("{}-{i}", self.name)
    }

    pub fn node_ip(&self, i: u32) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 2 + i as u8)
    }

    fn gateway(&self) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// The host-side bridge of the nodes' network (at most 15 bytes).
    pub fn bridge(&self) -> String {
        let mut n = format!("{}-br", self.name);
        if n.len() > 15 {
            n = format!("skbr{}", &self.name[self.name.len().saturating_sub(11)..]);
        }
        n
    }

    /// The cgroup (in every hierarchy) the node containers' cgroups are in.
    pub fn cgroup_parent(&self) -> String {
        format!("/skep-docker-{}", self.name)
    }

    pub fn node_dir(&self, i: u32) -> PathBuf {
        self.state_dir.join(format!("node-{i}"))
    }

    /// The admin kubeconfig (server address reachable from the host).
    pub fn kubeconfig(&self) -> PathBuf {
        self.node_dir(0).join("kubeconfig.yaml")
    }

    pub fn api_url(&self) -> String {
        format!("https://{}:{API_PORT}", self.node_ip(0))
    }

    fn dockerd_dir(&self) -> PathBuf {
        self.state_dir.join("dockerd")
    }

    /// Short paths: unix sockets are limited to 108 bytes, and containerd
    /// puts its own sockets below the exec root.
    fn private_socket(&self) -> PathBuf {
        PathBuf::from(format!("/run/skep-docker-{}.sock", self.name))
    }

    fn exec_root(&self) -> PathBuf {
        PathBuf::from(format!("/run/skep-docker-{}", self.name))
    }

    pub fn docker(&self) -> Docker {
        Docker {
            socket: self
                .docker_socket
                .clone()
                .unwrap_or_else(|| self.private_socket()),
        }
    }
}

/// The docker CLI bound to one daemon.
#[derive(Debug, Clone)]
pub struct Docker {
    pub socket: PathBuf,
}

impl Docker {
    fn command(&self) -> Command {
        let mut c = Command::new("docker");
        c.arg("-H").arg(format!("unix://{}", self.socket.display()));
        c
    }

    /// Runs `docker ARGS`; stdout on success, stderr in the error.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command()
            .args(args)
            .output()
            .context("running the docker CLI (install docker.io: `cargo xtask setup`)")?;
        if !out.status.success() {
            bail!(
                "docker {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn ping(&self) -> bool {
        self.command()
            .args(["version", "--format", "{{.Server.Version}}"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Ids of the containers carrying `LABEL=<cluster>`.
    pub fn cluster_containers(&self, cluster: &str) -> Result<Vec<String>> {
        Ok(self
            .run(&[
                "ps",
                "-aq",
                "--no-trunc",
                "--filter",
                &format!("label={LABEL}={cluster}"),
            ])?
            .split_whitespace()
            .map(str::to_owned)
            .collect())
    }
}

fn pid_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Starts the private dockerd in a session of its own (it outlives the
/// caller; `destroy` stops it) and waits until it answers.
pub fn start_dockerd(spec: &Spec) -> Result<Docker> {
    let docker = spec.docker();
    if spec.docker_socket.is_some() {
        if !docker.ping() {
            bail!(
                "no Docker daemon answers on {}; start it or leave out --docker-socket to use a private one",
                docker.socket.display()
            );
        }
        return Ok(docker);
    }
    if docker.ping() {
        return Ok(docker);
    }
    let which = Command::new("dockerd").arg("--version").output();
    if !which.is_ok_and(|o| o.status.success()) {
        bail!(
            "dockerd is missing: install the Debian package docker.io (`cargo xtask setup` does)"
        );
    }
    let dir = spec.dockerd_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // An empty config: /etc/docker/daemon.json (if any) is the host's.
    fs::write(dir.join("daemon.json"), "{}").context("writing daemon.json")?;
    let log = fs::File::create(dir.join("dockerd.log")).context("creating the dockerd log")?;
    let _ = fs::remove_file(&docker.socket);
    let mut cmd = Command::new("dockerd");
    cmd.arg("--config-file")
        .arg(dir.join("daemon.json"))
        .arg("--data-root")
        .arg(dir.join("data"))
        .arg("--exec-root")
        .arg(spec.exec_root())
        .arg("--pidfile")
        .arg(dir.join("dockerd.pid"))
        .arg("-H")
        .arg(format!("unix://{}", docker.socket.display()))
        .args([
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            // The host's forwarding setting stays as it is: the nodes'
            // traffic is bridged, and the host routes none of it.
            "--ip-forward=false",
            "--userland-proxy=false",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("dockerd log")?)
        .stderr(log);
    // SAFETY: setsid() is async-signal-safe and touches no parent memory.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting dockerd")?;
    let pid = child.id() as i32;
    // Not waited for here: it runs detached; `destroy` stops it by pid.
    drop(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !docker.ping() {
        if !pid_alive(pid) {
            bail!("dockerd exited during start:\n{}", dockerd_log(spec));
        }
        if Instant::now() > deadline {
            bail!("dockerd did not answer within 60 s:\n{}", dockerd_log(spec));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(docker)
}

pub fn dockerd_log(spec: &Spec) -> String {
    let s = fs::read_to_string(spec.dockerd_dir().join("dockerd.log")).unwrap_or_default();
    let start = s.len().saturating_sub(3000);
    s.get(start..).unwrap_or(&s).to_owned()
}

/// The node's entrypoint: makes the container a node, then execs skep.
const NODE_INIT: &str = r#"#!/bin/sh
# skep node entrypoint (docker_cluster.rs): the container becomes a node,
# then skep runs with the arguments given.
set -eu
# Docker mounts /sys and the cgroup hierarchies read-only. Fresh cgroup
# mounts inside this container's cgroup namespace are rooted at the
# container's own cgroup.
mount -o remount,rw /sys
cat /proc/mounts > /tmp/mounts
v2=no
while read -r _ mp fs opts _; do
  case "$fs" in
    cgroup)
      keep=""
      for o in $(echo "$opts" | tr , ' '); do
        case "$o" in ro|rw|nosuid|nodev|noexec|relatime) ;; *) keep="${keep:+$keep,}$o" ;; esac
      done
      umount "$mp"
      mount -t cgroup -o "$keep" cgroup "$mp"
      ;;
    cgroup2)
      umount "$mp"
      mount -t cgroup2 cgroup2 "$mp"
      [ "$mp" = /sys/fs/cgroup ] && v2=yes
      ;;
  esac
done < /tmp/mounts
if [ "$v2" = yes ]; then
  # Controllers can be delegated only from a cgroup without processes:
  # this script moves to a leaf of its own first (as kind does).
  mkdir -p /sys/fs/cgroup/init
  for p in $(cat /sys/fs/cgroup/cgroup.procs); do
    echo "$p" > /sys/fs/cgroup/init/cgroup.procs 2>/dev/null || :
  done
  echo "+cpu +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control || :
elif [ ! -e /sys/fs/cgroup/unified/cgroup.procs ]; then
  # Hybrid layout: cgroup BPF programs attach in the v2 hierarchy.
  mkdir -p /sys/fs/cgroup/unified
  mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
fi
# The node's own bpffs: its pins live and die with the container.
mount -t bpf bpf /sys/fs/bpf
# Network safety: only the nodes' subnet, no way out through the host.
ip route del default 2>/dev/null || :
exec /usr/local/bin/skep "$@"
"#;

/// Copies `src` (following links) to `root` + `dest`.
fn install(root: &Path, src: &Path, dest: &str, mode: u32) -> Result<()> {
    let to = root.join(dest.trim_start_matches('/'));
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::copy(src, &to).with_context(|| format!("copying {} into the rootfs", src.display()))?;
    fs::set_permissions(&to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", to.display()))?;
    Ok(())
}

/// The absolute paths of the shared objects `ldd` lists for `binary`.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd (package libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: nothing to copy.
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        if line.contains("not found") {
            bail!("ldd {}: a library is missing: {line}", binary.display());
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x…)"; linux-vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Builds the node rootfs tarball and imports it as `spec.image()`;
/// returns the tarball's size in bytes.
pub fn build_image(spec: &Spec, docker: &Docker) -> Result<u64> {
    let root = spec.state_dir.join("rootfs");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    for d in [
        "bin",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "etc",
        "root",
        "usr/local/bin",
        "var/lib/skep",
    ] {
        fs::create_dir_all(root.join(d)).context("creating the rootfs")?;
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))
        .context("chmod /tmp")?;
    install(&root, &spec.binary, "/usr/local/bin/skep", 0o755)?;
    for lib in shared_libraries(&spec.binary)? {
        install(&root, &lib, &lib.to_string_lossy(), 0o755)?;
    }
    // busybox-static: the shell of the entrypoint and of `sh -c` probes,
    // plus mount, ip, sleep… as links to the one binary.
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        bail!("/bin/busybox is missing: install busybox-static (`cargo xtask setup` does)");
    }
    install(&root, busybox, "/bin/busybox", 0o755)?;
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .context("busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
                .with_context(|| format!("linking /bin/{applet}"))?;
        }
    }
    // As on Debian: pods of the `host` image see /var/run as /run (a
    // fresh tmpfs in each container), where the service-account token
    // volume is mounted.
    std::os::unix::fs::symlink("/run", root.join("var/run")).context("linking /var/run")?;
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .context("writing /etc/passwd")?;
    fs::write(root.join("etc/group"), "root:x:0:\n").context("writing /etc/group")?;
    let init = root.join("skep-node-init");
    fs::write(&init, NODE_INIT).context("writing /skep-node-init")?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).context("chmod init")?;
    let tarball = spec.state_dir.join("rootfs.tar");
    let out = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tarball)
        .args(["--numeric-owner", "."])
        .output()
        .context("running tar")?;
    if !out.status.success() {
        bail!("tar: {}", String::from_utf8_lossy(&out.stderr));
    }
    fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    let size = fs::metadata(&tarball).context("rootfs tarball")?.len();
    docker.run(&["import", &tarball.to_string_lossy(), &spec.image()])?;
    fs::remove_file(&tarball).context("removing the rootfs tarball")?;
    Ok(size)
}

/// `docker run` of node `i` with skep's arguments `args`.
fn run_node(spec: &Spec, docker: &Docker, i: u32, args: &[String]) -> Result<()> {
    let name = spec.node_name(i);
    let dir = spec.node_dir(i);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut run: Vec<String> = [
        "run",
        "-d",
        "--name",
        &name,
        "--hostname",
        &name,
        "--label",
        &format!("{LABEL}={}", spec.name),
        "--network",
        &spec.name,
        "--ip",
        &spec.node_ip(i).to_string(),
        "--cap-add",
        "ALL",
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
        "--security-opt",
        "systempaths=unconfined",
        "--device-cgroup-rule",
        "a *:* rwm",
        "--cgroupns",
        "private",
        // Every node's cgroup under one parent of this cluster's, which
        // `destroy` removes.
        "--cgroup-parent",
        &spec.cgroup_parent(),
        // Pod namespaces are bind-mounted under /run/netns.
        "--tmpfs",
        "/run:rw,exec",
        "-v",
        &format!("{}:{NODE_DATA}", dir.display()),
        "-v",
        &format!(
            "{}:/etc/resolv.conf:ro",
            spec.state_dir.join("resolv.conf").display()
        ),
    ]
    .map(String::from)
    .to_vec();
    for cap in missing_capabilities() {
        run.extend(["--cap-drop".to_owned(), cap]);
    }
    // A binary built without the eBPF object embedded finds it here.
    if let Some(obj) = std::env::var_os("SKEP_EBPF_OBJECT") {
        run.extend([
            "-v".to_owned(),
            format!("{}:/skep-ebpf.o:ro", PathBuf::from(obj).display()),
            "-e".to_owned(),
            "SKEP_EBPF_OBJECT=/skep-ebpf.o".to_owned(),
        ]);
    }
    if let Some(log) = std::env::var_os("SKEP_LOG") {
        run.extend([
            "-e".to_owned(),
            format!("SKEP_LOG={}", log.to_string_lossy()),
        ]);
    }
    run.extend([spec.image(), "/skep-node-init".to_owned()]);
    run.extend(args.iter().cloned());
    let refs: Vec<&str> = run.iter().map(String::as_str).collect();
    docker.run(&refs).map(drop)
}

/// Capabilities the kernel has that this process's bounding set lacks
/// (a container cannot get them: `--cap-add ALL` would fail in runc).
fn missing_capabilities() -> Vec<String> {
    const NAMES: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let bounding = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX);
    NAMES
        .iter()
        .enumerate()
        .filter(|(bit, _)| bounding & (1u64 << bit) == 0)
        .map(|(_, n)| (*n).to_owned())
        .collect()
}

/// Runs `kubectl --kubeconfig K ARGS` from the host; true on success.
fn kubectl_ok(kubeconfig: &Path, args: &[&str]) -> bool {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--request-timeout", "5s"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A node container's state and the tail of its log, for error messages.
pub fn node_report(spec: &Spec, docker: &Docker, i: u32) -> String {
    let name = spec.node_name(i);
    let state = docker
        .run(&[
            "inspect",
            "-f",
            "{{.State.Status}} (exit {{.State.ExitCode}})",
            &name,
        ])
        .unwrap_or_else(|e| e.to_string());
    let logs = docker
        .command()
        .args(["logs", "--tail", "40", &name])
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default();
    format!("--- node {name}: {}\n{logs}", state.trim())
}

fn wait_until(
    spec: &Spec,
    docker: &Docker,
    node: u32,
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            bail!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                node_report(spec, docker, node)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// Starts the network and the nodes, waits for the API and every node's
/// Ready. The image must exist (`build_image`).
pub fn start_nodes(spec: &Spec, docker: &Docker) -> Result<()> {
    if spec.nodes == 0 || spec.nodes > 200 {
        bail!("a docker cluster has 1 to 200 nodes, not {}", spec.nodes);
    }
    let [a, b, c] = spec.subnet;
    docker.run(&[
        "network",
        "create",
        "--internal",
        "--subnet",
        &format!("{a}.{b}.{c}.0/24"),
        "--gateway",
        &spec.gateway().to_string(),
        "-o",
        &format!("com.docker.network.bridge.name={}", spec.bridge()),
        "--label",
        &format!("{LABEL}={}", spec.name),
        &spec.name,
    ])?;
    // No outside resolver: names outside the cluster do not resolve.
    fs::write(
        spec.state_dir.join("resolv.conf"),
        "# skep docker node: no upstream resolver (the cluster is sealed)\nnameserver 127.0.0.1\n",
    )
    .context("writing resolv.conf")?;
    let server_ip = spec.node_ip(0).to_string();
    let common = |i: u32| -> Vec<String> {
        vec![
            "--data-dir".into(),
            NODE_DATA.into(),
            "--node-name".into(),
            spec.node_name(i),
            "--node-ip".into(),
            spec.node_ip(i).to_string(),
            "--bpf-root".into(),
            "/sys/fs/bpf/skep".into(),
        ]
    };
    let mut server = vec![
        "server".to_owned(),
        "--api-listen".into(),
        format!("{server_ip}:{API_PORT}"),
        "--tls-san".into(),
        server_ip.clone(),
    ];
    server.extend(common(0));
    run_node(spec, docker, 0, &server)?;
    let kc = spec.kubeconfig();
    wait_until(
        spec,
        docker,
        0,
        "the API server",
        Duration::from_secs(60),
        || kc.exists() && kubectl_ok(&kc, &["get", "--raw", "/readyz"]),
    )?;
    let token = fs::read_to_string(spec.node_dir(0).join("node-token"))
        .context("reading the server's node token")?;
    for i in 1..spec.nodes {
        let dir = spec.node_dir(i);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::copy(spec.node_dir(0).join("tls/ca.crt"), dir.join("ca.crt"))
            .context("copying the cluster CA")?;
        let mut agent = vec![
            "agent".to_owned(),
            "--server".into(),
            spec.api_url(),
            "--token".into(),
            token.trim().to_owned(),
        ];
        agent.extend(common(i));
        run_node(spec, docker, i, &agent)?;
    }
    for i in 0..spec.nodes {
        let node = format!("node/{}", spec.node_name(i));
        wait_until(
            spec,
            docker,
            i,
            &format!("{node} to be Ready"),
            Duration::from_secs(90),
            || {
                kubectl_ok(
                    &kc,
                    &["wait", "--for=condition=Ready", &node, "--timeout=2s"],
                )
            },
        )?;
    }
    Ok(())
}

/// What is left of the cluster: in the daemon (`Some`: containers,
/// network, image) or on the host (`None`: bridge, private dockerd's socket,
/// exec root, mounts). Empty when clean.
pub fn leftovers(spec: &Spec, docker: Option<&Docker>) -> Vec<String> {
    let mut left = Vec::new();
    if let Some(d) = docker {
        if let Ok(ids) = d.cluster_containers(&spec.name)
            && !ids.is_empty()
        {
            left.push(format!("containers {}", ids.join(" ")));
        }
        if d.run(&["network", "inspect", &spec.name]).is_ok() {
            left.push(format!("docker network {}", spec.name));
        }
        if d.run(&["image", "inspect", &spec.image()]).is_ok() {
            left.push(format!("image {}", spec.image()));
        }
        return left;
    }
    if Path::new("/sys/class/net").join(spec.bridge()).exists() {
        left.push(format!("bridge {}", spec.bridge()));
    }
    if spec.docker_socket.is_none() {
        if spec.private_socket().exists() {
            left.push(format!("socket {}", spec.private_socket().display()));
        }
        if spec.exec_root().exists() {
            left.push(format!("directory {}", spec.exec_root().display()));
        }
    }
    let parent = spec.cgroup_parent();
    let cgroups = Path::new("/sys/fs/cgroup");
    let has_cgroup = cgroups.join(parent.trim_start_matches('/')).exists()
        || fs::read_dir(cgroups)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join(parent.trim_start_matches('/')).exists());
    if has_cgroup {
        left.push(format!("cgroup {parent}"));
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let under = |p: &Path| {
        mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .any(|m| Path::new(m).starts_with(p))
    };
    if under(&spec.state_dir) || under(&spec.exec_root()) {
        left.push("mounts under the state directory or exec root".to_owned());
    }
    left
}

/// Removes the cluster: containers (their processes, pod namespaces,
/// bpffs and cgroups go with them), the network, the image, the private
/// dockerd with its data, and the state directory. Errors on anything left.
pub fn destroy(spec: &Spec) -> Result<()> {
    let docker = spec.docker();
    let reachable = docker.ping();
    if reachable {
        let ids = docker.cluster_containers(&spec.name).unwrap_or_default();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            docker.run(&args)?;
        }
        // The kubelet's cgroups nest in the containers' (runc removes the
        // tree); anything left under the cluster's parent goes, deepest first.
        remove_cgroups(&spec.cgroup_parent());
        if docker.run(&["network", "inspect", &spec.name]).is_ok() {
            docker.run(&["network", "rm", &spec.name])?;
        }
        if docker.run(&["image", "inspect", &spec.image()]).is_ok() {
            docker.run(&["rmi", "-f", &spec.image()])?;
        }
    }
    let mut remaining = if reachable {
        leftovers(spec, Some(&docker))
    } else {
        Vec::new()
    };
    if spec.docker_socket.is_none() {
        stop_dockerd(spec)?;
    }
    let bridge = spec.bridge();
    if Path::new("/sys/class/net").join(&bridge).exists() {
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
    }
    for l in leftovers(spec, None) {
        if !remaining.contains(&l) {
            remaining.push(l);
        }
    }
    if !remaining.is_empty() {
        bail!("could not remove: {}", remaining.join(", "));
    }
    if spec.state_dir.exists() {
        fs::remove_dir_all(&spec.state_dir)
            .with_context(|| format!("removing {}", spec.state_dir.display()))?;
    }
    Ok(())
}

/// SIGTERM (dockerd stops containerd and unmounts its layers), then
/// SIGKILL after 30 s; then its socket, exec root and data go.
fn stop_dockerd(spec: &Spec) -> Result<()> {
    let pid_file = spec.dockerd_dir().join("dockerd.pid");
    if let Some(pid) = fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        && pid_alive(pid)
    {
        // SAFETY: kill(2) of the dockerd this cluster started (pid file).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if pid_alive(pid) {
            // SAFETY: as above; it ignored SIGTERM.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // Mounts a killed daemon left behind (overlay layers, netns files).
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut stale: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| {
            Path::new(m).starts_with(spec.dockerd_dir())
                || Path::new(m).starts_with(spec.exec_root())
        })
        .collect();
    stale.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in stale {
        let _ = Command::new("umount").args(["-l", m]).output();
    }
    let _ = fs::remove_file(spec.private_socket());
    if spec.exec_root().exists() {
        fs::remove_dir_all(spec.exec_root())
            .with_context(|| format!("removing {}", spec.exec_root().display()))?;
    }
    Ok(())
}

/// Removes the cgroup `rel` and everything below it in every hierarchy.
fn remove_cgroups(rel: &str) {
    fn dirs(d: &Path, out: &mut Vec<PathBuf>) {
        out.push(d.to_path_buf());
        for e in fs::read_dir(d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs(&e.path(), out);
            }
        }
    }
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    roots.extend(
        fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path()),
    );
    for root in roots {
        let top = root.join(rel.trim_start_matches('/'));
        if !top.is_dir() {
            continue;
        }
        let mut all = Vec::new();
        dirs(&top, &mut all);
        for d in all.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
}
