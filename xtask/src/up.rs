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
    /// Number of nodes (only 1 until the node agent lands).
    #[arg(long, default_value_t = 1)]
    pub nodes: u32,
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
    util::require_root("the cluster gets its own network namespace and veth pair")?;
    if args.nodes != 1 {
        bail!(
            "--nodes {} is not available yet: multi-node clusters need the node agent ([node] issue); run with --nodes 1",
            args.nodes
        );
    }
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

    // The server, detached (own session) so it outlives this command.
    let log = fs::File::create(state.join("server.log")).context("creating the server log")?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &sb.name])
        .arg(&binary)
        .args(["server", "--no-agent", "--data-dir"])
        .arg(state.join("server"))
        .args([
            "--api-listen",
            &format!("{inner}:{API_PORT}"),
            "--tls-san",
            &inner,
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log file")?)
        .stderr(log);
    // SAFETY: setsid() is async-signal-safe and touches no memory of the
    // parent; it only detaches the child from our session.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    println!(
        "$ ip netns exec {} {} server --no-agent …",
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
    kubectl(&kc, &["get", "namespaces"])?;
    kubectl(&kc, &["get", "nodes"])?;
    if !args.no_demo {
        demo(&kc)?;
    }
    print_footer(sb);
    Ok(())
}

const DEMO: &str = include_str!("../demo/demo.yaml");

fn demo(kubeconfig: &Path) -> Result<()> {
    println!(
        "\n[up] applying the demo (Deployment of 3 `skep tools serve`, Service, client pod, NetworkPolicy)"
    );
    let file = kubeconfig
        .parent()
        .map(|d| d.join("demo.yaml"))
        .context("kubeconfig has no directory")?;
    fs::write(&file, DEMO).context("writing the demo manifest")?;
    kubectl(kubeconfig, &["apply", "-f", &file.to_string_lossy()])?;
    kubectl(
        kubeconfig,
        &["get", "all,networkpolicy", "-n", "demo", "-o", "wide"],
    )?;
    println!(
        "[up] the demo's objects are stored and served; its pods stay Pending until the node agent \
         (kubelet, [node] issue) and the controllers run them, so the DNS request, the policy \
         denial and `skep ctl flows` are not shown yet"
    );
    Ok(())
}

fn print_footer(sb: &Sandbox) {
    let kc = fs::canonicalize(sb.kubeconfig()).unwrap_or_else(|_| sb.kubeconfig());
    println!("\nexport KUBECONFIG={}", kc.display());
    println!("# stop and remove everything: cargo xtask down");
}

pub fn down(sb: &Sandbox) -> Result<()> {
    util::require_root("removing the cluster's network namespace needs root")?;
    let mut pids: Vec<i32> = read_pid(&sb.pid_file()).into_iter().collect();
    // Anything else still running inside the namespace goes too.
    if netns_exists(&sb.name)
        && let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &sb.name])
            .output()
    {
        pids.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok()),
        );
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
    let state = sb.state_dir();
    if state.exists() {
        fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;
    }
    let leftovers: Vec<String> = [
        netns_exists(&sb.name).then(|| format!("network namespace {}", sb.name)),
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
