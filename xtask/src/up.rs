//! `cargo xtask up` / `cargo xtask down`: a skep cluster on this machine,
//! inside its own network namespace so nothing it does reaches the host's
//! network. The host reaches the API over a host-only veth pair (a
//! link-local /30 that no route leaves), so plain `kubectl` from the host's
//! shell works once KUBECONFIG is exported.
//!
//! State lives in one directory (default target/up): the server's data dir,
//! its log and its pid. `down` removes the processes, the namespace (and with
//! it the veth pair) and that directory.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    build, setup,
    util::{self, Cmd},
};

/// Options shared by `up` and `down`.
#[derive(Debug, Clone, clap::Args)]
pub struct Sandbox {
    /// Name of the cluster's network namespace (also names the host-side veth).
    #[arg(long, default_value = "skep-up")]
    pub name: String,
    /// Directory for the cluster's state (data dir, log, pid).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Host side of the host-only link (a /30; the sandbox gets the next address).
    #[arg(long, default_value = "169.254.100.1")]
    pub host_ip: Ipv4Addr,
}

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub sandbox: Sandbox,
    /// Use this skep binary instead of building the release one.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Boot the cluster only; do not apply the demo.
    #[arg(long)]
    pub no_demo: bool,
    /// Number of nodes: the server's and N-1 agents, each in its own
    /// network namespace on a bridge inside the server's.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub nodes: u32,
    /// Run the nodes as Docker containers on an internal docker network (as
    /// kind does) instead of network namespaces (xtask/src/up_docker.rs).
    #[arg(long)]
    pub docker: bool,
    /// With --docker: use this Docker daemon's socket instead of starting a
    /// private dockerd.
    #[arg(long, requires = "docker")]
    pub docker_socket: Option<PathBuf>,
}

const API_PORT: u16 = 6443;

impl Sandbox {
    fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| util::target_dir().join("up"))
    }

    fn sandbox_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.host_ip) + 1)
    }

    fn host_link(&self) -> String {
        // Interface names are at most 15 bytes.
        let mut n = format!("{}0", self.name);
        n.truncate(15);
        n
    }

    fn kubeconfig(&self) -> PathBuf {
        self.state_dir().join("server/kubeconfig.yaml")
    }

    fn pid_file(&self) -> PathBuf {
        self.state_dir().join("server.pid")
    }
}

fn ip(args: &[&str]) -> Result<()> {
    Cmd::new("ip")
        .args(args)
        .hint("iproute2 is needed (`cargo xtask setup` installs it)")
        .run()
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<()> {
    Cmd::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .hint("kubectl talks to the cluster's API; see the server log in the state directory")
        .run()
}

pub fn up(args: &UpArgs) -> Result<()> {
    if args.docker {
        return crate::up_docker::up(args);
    }
    util::require_root("the cluster gets its own network namespace and veth pair")?;
    let sb = &args.sandbox;
    let state = sb.state_dir();
    if let Some(pid) = read_pid(&sb.pid_file())
        && alive(pid)
    {
        println!("[up] already running (pid {pid}); `cargo xtask down` stops it");
        print_footer(sb);
        return Ok(());
    }
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => {
            setup::run().context("setup (before up)")?;
            build::run().context("building skep (before up)")?;
            util::target_dir().join("release/skep")
        }
    };
    if !binary.is_file() {
        bail!(
            "{} does not exist; build it first (`cargo xtask build`)",
            binary.display()
        );
    }
    // Leftovers of a crashed run would collide with the new one.
    if netns_exists(&sb.name) || link_exists(&sb.host_link()) {
        println!("[up] removing leftovers of an earlier run");
        down(sb)?;
    }
    fs::create_dir_all(state.join("server"))
        .with_context(|| format!("creating {}", state.display()))?;

    // The namespace and the host-only link.
    let (host, inner) = (sb.host_ip.to_string(), sb.sandbox_ip().to_string());
    let link = sb.host_link();
    ip(&["netns", "add", &sb.name])?;
    ip(&[
        "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &sb.name,
    ])?;
    ip(&["addr", "add", &format!("{host}/30"), "dev", &link])?;
    ip(&["link", "set", &link, "up"])?;
    ip(&[
        "-n",
        &sb.name,
        "addr",
        "add",
        &format!("{inner}/30"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &sb.name, "link", "set", "eth0", "up"])?;
    ip(&["-n", &sb.name, "link", "set", "lo", "up"])?;
    // The nodes' own network: a bridge inside the server's namespace that
    // every node (the server's included) has its node address on. Agents'
    // namespaces route everything else to the server's namespace, which
    // has no route beyond the host-only /30: nothing leaves the sandbox.
    let node_ip = node_address(0).to_string();
    ip(&["-n", &sb.name, "link", "add", "br0", "type", "bridge"])?;
    ip(&[
        "-n",
        &sb.name,
        "addr",
        "add",
        &format!("{node_ip}/24"),
        "dev",
        "br0",
    ])?;
    ip(&["-n", &sb.name, "link", "set", "br0", "up"])?;

    // The server with its node, detached (own session) so it outlives
    // this command. It enters only the network namespace (not `ip netns
    // exec`, which remounts /sys and would hide the cgroups pods need).
    let log = fs::File::create(state.join("server.log")).context("creating the server log")?;
    let netns = fs::File::open(format!("/run/netns/{}", sb.name))
        .with_context(|| format!("opening network namespace {}", sb.name))?;
    let mut cmd = Command::new(&binary);
    cmd.args(["server", "--data-dir"])
        .arg(state.join("server"))
        .args([
            "--api-listen",
            &format!("{inner}:{API_PORT}"),
            "--tls-san",
            &inner,
            "--node-name",
            &sb.name,
            "--node-ip",
            &node_ip,
            "--bpf-root",
            &format!("/sys/fs/bpf/{}", sb.name),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log file")?)
        .stderr(log);
    enter_on_spawn(&mut cmd, &netns);
    println!(
        "$ (in network namespace {}) {} server --node-ip {node_ip} …",
        sb.name,
        binary.display()
    );
    let child = cmd.spawn().context("starting skep server")?;
    fs::write(sb.pid_file(), child.id().to_string()).context("writing the pid file")?;

    let deadline = Instant::now() + Duration::from_secs(30);
    let ca = state.join("server/tls/ca.crt");
    loop {
        let ready = ca.exists()
            && Command::new("curl")
                .args(["-sf", "--max-time", "2", "--cacert"])
                .arg(&ca)
                .arg(format!("https://{inner}:{API_PORT}/readyz"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if ready {
            break;
        }
        if !alive(child.id() as i32) {
            let tail = fs::read_to_string(state.join("server.log")).unwrap_or_default();
            bail!("skep server exited during start; its log:\n{tail}");
        }
        if Instant::now() > deadline {
            bail!(
                "skep server did not become ready in 30 s; see {}",
                state.join("server.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "[up] API server ready on https://{inner}:{API_PORT} (inside network namespace {})",
        sb.name
    );
    let kc = sb.kubeconfig();
    wait(
        &kc,
        "the node to be Ready",
        Duration::from_secs(60),
        &[
            "wait",
            "--for=condition=Ready",
            &format!("node/{}", sb.name),
            "--timeout=5s",
        ],
    )?;
    for i in 1..args.nodes {
        start_agent(sb, &binary, i, &inner)?;
    }
    for i in 1..args.nodes {
        wait(
            &kc,
            &format!("node {} to be Ready", agent_name(sb, i)),
            Duration::from_secs(60),
            &[
                "wait",
                "--for=condition=Ready",
                &format!("node/{}", agent_name(sb, i)),
                "--timeout=5s",
            ],
        )?;
    }
    kubectl(&kc, &["get", "nodes", "-o", "wide"])?;
    if !args.no_demo {
        demo(&kc, &binary)?;
    }
    print_footer(sb);
    Ok(())
}

const DEMO: &str = include_str!("../demo/demo.yaml");

/// Node `i`'s address on the nodes' bridge (the server's node is 0).
fn node_address(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 1 + i as u8)
}

fn agent_name(sb: &Sandbox, i: u32) -> String {
    format!("{}-{i}", sb.name)
}

/// Makes `cmd` enter `netns` (only the network namespace: not `ip netns
/// exec`, which remounts /sys and would hide the cgroups pods need) in a
/// session of its own, so it outlives this command.
fn enter_on_spawn(cmd: &mut Command, netns: &fs::File) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(netns);
    // SAFETY: setsid() and setns() are async-signal-safe and touch no
    // memory of the parent; `netns` stays open until spawn returns.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 || libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Agent `i`: its namespace on the bridge, then `skep agent` joining the
/// server with the node token.
fn start_agent(sb: &Sandbox, binary: &Path, i: u32, api_ip: &str) -> Result<()> {
    let name = agent_name(sb, i);
    let state = sb.state_dir();
    let dir = state.join(format!("agent-{i}"));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::copy(state.join("server/tls/ca.crt"), dir.join("ca.crt")).context("copying the CA")?;
    let token = fs::read_to_string(state.join("server/node-token"))
        .context("reading the server's node token")?;
    let outside = format!("{}-v{i}", sb.name);
    let addr = node_address(i);
    ip(&["netns", "add", &name])?;
    ip(&["-n", &name, "link", "set", "lo", "up"])?;
    ip(&[
        "-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", &outside, "netns",
        &sb.name,
    ])?;
    ip(&[
        "-n", &sb.name, "link", "set", &outside, "master", "br0", "up",
    ])?;
    ip(&[
        "-n",
        &name,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &name, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        &name,
        "route",
        "add",
        "default",
        "via",
        &node_address(0).to_string(),
    ])?;
    let log =
        fs::File::create(state.join(format!("agent-{i}.log"))).context("creating the agent log")?;
    let netns = fs::File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("opening network namespace {name}"))?;
    let mut cmd = Command::new(binary);
    cmd.args([
        "agent",
        "--server",
        &format!("https://{api_ip}:{API_PORT}"),
        "--token",
        token.trim(),
        "--data-dir",
    ])
    .arg(&dir)
    .args([
        "--node-name",
        &name,
        "--node-ip",
        &addr.to_string(),
        "--bpf-root",
        &format!("/sys/fs/bpf/{name}"),
    ])
    .stdin(Stdio::null())
    .stdout(log.try_clone().context("log file")?)
    .stderr(log);
    enter_on_spawn(&mut cmd, &netns);
    println!(
        "$ (in network namespace {name}) {} agent --server https://{api_ip}:{API_PORT} --node-ip {addr} …",
        binary.display()
    );
    let child = cmd.spawn().context("starting skep agent")?;
    fs::write(state.join(format!("agent-{i}.pid")), child.id().to_string())
        .context("writing the agent's pid file")?;
    Ok(())
}

/// Agents of an earlier `up`: namespaces named `<name>-<digits>`.
fn agent_namespaces(sb: &Sandbox) -> Vec<String> {
    let prefix = format!("{}-", sb.name);
    fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            n.strip_prefix(&prefix)
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect()
}

/// Retries a kubectl command until it succeeds or `timeout` passes.
fn wait(kubeconfig: &Path, what: &str, timeout: Duration, args: &[&str]) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// kubectl whose output is returned (and printed), success or not.
fn kubectl_output(kubeconfig: &Path, args: &[&str]) -> Result<(bool, String)> {
    println!("$ kubectl {}", args.join(" "));
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .context("running kubectl")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{text}");
    Ok((out.status.success(), text))
}

fn demo(kubeconfig: &Path, skep: &Path) -> Result<()> {
    println!(
        "\n[up] applying the demo (Deployment of 3 `skep tools serve`, Service, client pod, NetworkPolicy)"
    );
    let file = kubeconfig
        .parent()
        .map(|d| d.join("demo.yaml"))
        .context("kubeconfig has no directory")?;
    fs::write(&file, DEMO).context("writing the demo manifest")?;
    kubectl(kubeconfig, &["apply", "-f", &file.to_string_lossy()])?;
    wait(
        kubeconfig,
        "the echo Deployment to be available",
        Duration::from_secs(90),
        &[
            "-n",
            "demo",
            "wait",
            "--for=condition=Available",
            "deployment/echo",
            "--timeout=5s",
        ],
    )?;
    for pod in ["client", "intruder"] {
        wait(
            kubeconfig,
            &format!("pod {pod} to be Ready"),
            Duration::from_secs(60),
            &[
                "-n",
                "demo",
                "wait",
                "--for=condition=Ready",
                &format!("pod/{pod}"),
                "--timeout=5s",
            ],
        )?;
    }
    kubectl(
        kubeconfig,
        &["get", "all,networkpolicy", "-n", "demo", "-o", "wide"],
    )?;
    println!("\n[up] the client pod reaches the echo Service by its DNS name:");
    let probe = [
        "-n",
        "demo",
        "exec",
        "client",
        "--",
        "skep",
        "tools",
        "probe",
        "http",
        "echo.demo.svc.cluster.local:80",
        "--timeout",
        "3s",
    ];
    // The EndpointSlice follows readiness within moments: a few tries.
    let mut reached = false;
    for _ in 0..10 {
        if kubectl_output(kubeconfig, &probe)?.0 {
            reached = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if !reached {
        bail!("the client pod could not reach echo.demo.svc.cluster.local:80");
    }
    // Each probe is a new connection, balanced over the replicas.
    let mut replicas = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let (ok, text) = kubectl_output(kubeconfig, &probe)?;
        if ok && let Some(who) = text.split("answered by ").nth(1) {
            replicas.insert(who.trim().to_owned());
        }
    }
    println!(
        "[up] answered by {} different replicas: {}",
        replicas.len(),
        replicas.into_iter().collect::<Vec<_>>().join(", ")
    );
    println!("\n[up] the intruder pod, which the NetworkPolicy does not allow in:");
    let mut intruder = probe;
    intruder[3] = "intruder";
    let (ok, _) = kubectl_output(kubeconfig, &intruder)?;
    if ok {
        bail!("the intruder pod reached the echo Service although the NetworkPolicy denies it");
    }
    println!("[up] denied, as the policy says");
    println!("\n[up] the flows of the demo namespace, as the kernel reported them:");
    let args = ["ctl", "flows", "--namespace", "demo", "--last", "12"];
    println!("$ skep {}", args.join(" "));
    let out = Command::new(skep)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .context("running skep ctl flows")?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() || !text.contains("FORWARDED") || !text.contains("DROPPED") {
        bail!(
            "`skep ctl flows` should show the client's FORWARDED and the intruder's DROPPED flows"
        );
    }
    println!("\n[up] the cluster's health (control plane checks, nodes and their dataplanes):");
    println!("$ skep ctl status");
    let out = Command::new(skep)
        .args(["ctl", "status"])
        .env("KUBECONFIG", kubeconfig)
        .output()
        .context("running skep ctl status")?;
    print!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("`skep ctl status` reports the cluster unhealthy (see above)");
    }
    Ok(())
}

fn print_footer(sb: &Sandbox) {
    let kc = fs::canonicalize(sb.kubeconfig()).unwrap_or_else(|_| sb.kubeconfig());
    let token = sb.state_dir().join("server/admin-token");
    println!(
        "\n# web console: https://{}:{API_PORT}/ui (sign in with the token in {}; the certificate is the cluster CA's)",
        sb.sandbox_ip(),
        fs::canonicalize(&token).unwrap_or(token).display()
    );
    println!("export KUBECONFIG={}", kc.display());
    println!("# stop and remove everything: cargo xtask down");
}

pub fn down(sb: &Sandbox) -> Result<()> {
    // The docker mode's cluster (if any) goes first.
    crate::up_docker::down(sb)?;
    util::require_root("removing the cluster's network namespace needs root")?;
    let mut pids: Vec<i32> = read_pid(&sb.pid_file()).into_iter().collect();
    let agents = agent_namespaces(sb);
    for e in fs::read_dir(sb.state_dir()).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("agent-") && n.ends_with(".pid") {
            pids.extend(read_pid(&e.path()));
        }
    }
    // Anything else still running inside the namespaces goes too.
    for ns in std::iter::once(&sb.name).chain(&agents) {
        if netns_exists(ns)
            && let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output()
        {
            pids.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok()),
            );
        }
    }
    for &pid in &pids {
        if alive(pid) {
            println!("[down] stopping pid {pid}");
            // SAFETY: kill(2) with a pid we started (or found in our namespace).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in &pids {
        if alive(pid) {
            // SAFETY: as above; the process ignored SIGTERM.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    // Containers run under their shims in the node's cgroups and in pod
    // namespaces of their own: stop them and remove those namespaces.
    // (The node is named after the namespace; its cgroups `skep-<node>`.)
    kill_cgroups(&format!("skep-{}", sb.name));
    let mut ipam_files = vec![sb.state_dir().join("server/agent/ipam.json")];
    for agent in &agents {
        kill_cgroups(&format!("skep-{agent}"));
        if let Some(i) = agent.rsplit('-').next() {
            ipam_files.push(sb.state_dir().join(format!("agent-{i}/ipam.json")));
        }
    }
    for ns in ipam_files.iter().flat_map(|f| pod_namespaces(f)) {
        if netns_exists(&ns) {
            let _ = ip(&["netns", "del", &ns]);
        }
    }
    for agent in &agents {
        ip(&["netns", "del", agent])?;
        let pins = PathBuf::from(format!("/sys/fs/bpf/{agent}"));
        if pins.exists() {
            fs::remove_dir_all(&pins).with_context(|| format!("removing {}", pins.display()))?;
        }
    }
    if netns_exists(&sb.name) {
        ip(&["netns", "del", &sb.name])?;
    }
    // Deleting the namespace deletes the veth pair (the kernel finishes
    // that asynchronously); a half-made run may have left only the host side.
    let deadline = Instant::now() + Duration::from_secs(2);
    while link_exists(&sb.host_link()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if link_exists(&sb.host_link()) {
        ip(&["link", "del", &sb.host_link()])?;
    }
    // The dataplane's pins (maps and links) of this cluster's node.
    let pins = PathBuf::from(format!("/sys/fs/bpf/{}", sb.name));
    if pins.exists() {
        fs::remove_dir_all(&pins).with_context(|| format!("removing {}", pins.display()))?;
    }
    let state = sb.state_dir();
    if state.exists() {
        fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;
    }
    let leftovers: Vec<String> = [
        netns_exists(&sb.name).then(|| format!("network namespace {}", sb.name)),
        (!agent_namespaces(sb).is_empty()).then(|| "agent network namespaces".to_string()),
        link_exists(&sb.host_link()).then(|| format!("link {}", sb.host_link())),
        pids.iter()
            .any(|&p| alive(p))
            .then(|| "processes".to_string()),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !leftovers.is_empty() {
        bail!("could not remove: {}", leftovers.join(", "));
    }
    println!(
        "[down] removed the cluster ({}): processes, namespace, veth pair, {}",
        sb.name,
        state.display()
    );
    Ok(())
}

/// Kills every process in the cgroup trees named `name` (each hierarchy)
/// and removes the cgroups, deepest first.
fn kill_cgroups(name: &str) {
    fn dirs(d: &Path, out: &mut Vec<PathBuf>) {
        out.push(d.to_path_buf());
        for e in fs::read_dir(d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs(&e.path(), out);
            }
        }
    }
    for root in [
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/cpuacct",
        "/sys/fs/cgroup",
    ] {
        let top = Path::new(root).join(name);
        if !top.is_dir() {
            continue;
        }
        let mut all = Vec::new();
        dirs(&top, &mut all);
        for d in &all {
            for pid in fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
            {
                if let Ok(p) = pid.trim().parse::<i32>() {
                    // SAFETY: kill(2) of a container process of this cluster.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for d in all.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
}

/// The pods' network namespaces, from the node's IPAM file (each pod's
/// namespace is `skep-` + the first 12 hex digits of its UID).
fn pod_namespaces(ipam: &Path) -> Vec<String> {
    let text = fs::read_to_string(ipam).unwrap_or_default();
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    v.get("allocations")
        .and_then(|a| a.as_object())
        .into_iter()
        .flatten()
        .filter_map(|(_, uid)| uid.as_str())
        .map(|uid| {
            let hex: String = uid
                .chars()
                .filter(char::is_ascii_hexdigit)
                .map(|c| c.to_ascii_lowercase())
                .take(12)
                .collect();
            format!("skep-{hex}")
        })
        .collect()
}

/// The demo, for the docker mode (xtask/src/up_docker.rs).
pub(crate) fn run_demo(kubeconfig: &Path, skep: &Path) -> Result<()> {
    demo(kubeconfig, skep)
}
