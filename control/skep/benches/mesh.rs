//! `cargo xtask bench mesh`: the cost of the mTLS hop between two meshed
//! pods, skep's sidecars against a pair of stunnel (OpenSSL) proxies doing
//! the same hop, and against no proxy at all, in one run.
//!
//! Topology (everything inside two network namespaces the benchmark makes,
//! joined by a veth; nothing reaches the host's network):
//!
//! ```text
//!  client pod 10.96.252.1                      server pod 10.96.252.2
//!  oha ─────────── direct ───────────────────▶ app :8081
//!  oha → :8080 ─connect4→ skep sidecar :15001 ═mTLS═▶ skep sidecar :15006 → app :8080
//!  oha → 127.0.0.1:9001  stunnel (client) ═════mTLS═▶ stunnel (server) :9443 → app :8080
//! ```
//!
//! * The app is a small HTTP/1.1 keep-alive server run by this process
//!   inside the server pod (one response = one write, TCP_NODELAY), on two
//!   ports, for all three paths.
//! * skep: two real `skep sidecar` processes. Their identities come from a
//!   mesh CA (the crate's `MeshCa` behind the real gRPC `Certify` service,
//!   run in this process inside the server pod); the client's connections
//!   are captured as in a meshed pod: skep's eBPF object is loaded under
//!   a pin root of its own, `mesh_connect4` is attached to a cgroup v2
//!   directory, and oha joins that cgroup for the skep runs only (the
//!   direct and stunnel runs start outside it, as an unmeshed client
//!   would). The client sidecar reads the original destination from the
//!   capture's pinned map (`--capture-maps`), as injected sidecars do. The
//!   server sidecar runs strict and allows only the client's SPIFFE ID.
//! * stunnel: client mode in the client pod, server mode in the server
//!   pod, TLS 1.3 only, mutual verification of the chain (certificates
//!   issued by the same mesh CA, ECDSA P-256). stunnel cannot check a
//!   SPIFFE ID; skep does, so skep does slightly more work per handshake.
//! * Load: oha, HTTP/1.1 keep-alive over 32 connections at a constant 1,000
//!   and 5,000 requests/s (latency corrected for coordinated omission) and
//!   at the maximum rate; then a new connection per request at the
//!   maximum rate (mTLS handshakes/s). Every run is bounded in time.
//! * CPU of each proxy from /proc/PID/stat (utime+stime deltas over each
//!   run), memory from /proc/PID/status (VmRSS after each run, VmHWM;
//!   anon/file RSS of the sidecars once ready, before any load, and of
//!   every proxy at the end; PSS).
//!
//! Writes target/bench/mesh.json. SKEP_MESH_BENCH_SECS (default 10) sets
//! the length of each run.

// Benchmark harness: a failed expect aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Map, Value, json};
use skep_dataplane::lb::{KernelDatapath, LbSettings};
use skep_mesh_sidecar::{
    MeshCa,
    ca_server::{self, Account, Authenticator, IdentityService},
};
use std::{
    collections::HashMap,
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};
use support::{Proc, ip, spawn_in};

const CLIENT_IP: &str = "10.96.252.1";
const SERVER_IP: &str = "10.96.252.2";
/// The app port the meshed paths reach (captured to the sidecar, or
/// behind the server stunnel).
const APP_PORT: u16 = 8080;
/// The same app on a second port, reached directly (no capture rule).
const APP_DIRECT_PORT: u16 = 8081;
const STUNNEL_CLIENT_PORT: u16 = 9001;
const STUNNEL_SERVER_PORT: u16 = 9443;
const CA_PORT: u16 = 6445;
const CA_NAME: &str = "mesh-ca.bench.skep";
const TRUST_DOMAIN: &str = "cluster.local";
const NAMESPACE: &str = "bench";
const OUTBOUND_PORT: u16 = 15001;
const ADMIN_PORT: u16 = 15020;
const CONNECTIONS: usize = 32;
/// The namespaces' name prefix (a leftover of a killed run is removed).
const NS_PREFIX: &str = "skmesh";

// ---------------------------------------------------------------- plumbing

/// The two pods' namespaces; removed when dropped (after the processes
/// in them, which are declared later and so dropped first).
struct Pods {
    client: String,
    server: String,
}

impl Pods {
    fn create() -> Self {
        remove_stale_namespaces();
        let pid = std::process::id();
        let pods = Pods {
            client: format!("{NS_PREFIX}-c-{pid}"),
            server: format!("{NS_PREFIX}-s-{pid}"),
        };
        ip(&["netns", "add", &pods.client]);
        ip(&["netns", "add", &pods.server]);
        ip(&[
            "-n",
            &pods.client,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pods.server,
        ]);
        for (ns, addr) in [(&pods.client, CLIENT_IP), (&pods.server, SERVER_IP)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            // The handshake runs open tens of thousands of connections in
            // seconds: room for their TIME_WAITs (these sysctls are the
            // namespace's own).
            run_checked(
                Command::new("ip").args([
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_local_port_range=1024 65000",
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.core.somaxconn=4096",
                ]),
                "sysctl in a benchmark namespace",
            );
        }
        pods
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// The outbound capture of the client pod, as the kubelet sets it up for
/// a meshed pod: skep's eBPF object loaded and pinned under a root of its
/// own, `mesh_connect4` (and `mesh_getpeername4`) attached to a cgroup v2
/// directory. Detached and unpinned when dropped.
struct Capture {
    pins: PathBuf,
    cgroup: PathBuf,
    /// Keeps the loader's handles for the run (the pins would do too).
    _datapath: KernelDatapath,
}

const CAPTURE_PREFIX: &str = "skep-bench-mesh-";

impl Capture {
    fn create() -> Self {
        let pid = std::process::id();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let cgroup2 = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
            })
            .expect(
                "no cgroup2 mount: the mesh capture is a cgroup v2 program \
                 (mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`)",
            );
        // Leftovers of killed runs.
        for parent in [Path::new("/sys/fs/bpf"), cgroup2.as_path()] {
            for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(old) = name.strip_prefix(CAPTURE_PREFIX)
                    && !Path::new(&format!("/proc/{old}")).exists()
                {
                    if parent == Path::new("/sys/fs/bpf") {
                        let _ = KernelDatapath::remove_pins(&e.path());
                    } else {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
        }
        let pins = PathBuf::from(format!("/sys/fs/bpf/{CAPTURE_PREFIX}{pid}"));
        let datapath = KernelDatapath::open(LbSettings {
            pin_root: pins.clone(),
            // Small maps: the benchmark programs no Service.
            maglev_size: 1021,
            max_frontends: 64,
            max_backends: 1024,
            ct_entries: 16384,
            affinity_entries: 1024,
            ..LbSettings::default()
        })
        .expect("load skep's eBPF object (did `cargo xtask build-ebpf` run?)");
        let cgroup = cgroup2.join(format!("{CAPTURE_PREFIX}{pid}"));
        std::fs::create_dir(&cgroup).expect("create the client pod's cgroup");
        skep_dataplane::mesh::attach(&pins, &cgroup).expect("attach mesh_connect4");
        Capture {
            pins,
            cgroup,
            _datapath: datapath,
        }
    }

    /// The directory of the pinned maps the sidecar reads.
    fn maps(&self) -> PathBuf {
        self.pins.join("maps")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = skep_dataplane::mesh::detach(&self.pins, &self.cgroup);
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = KernelDatapath::remove_pins(&self.pins);
    }
}

/// Namespaces of earlier runs whose process is gone (killed runs).
fn remove_stale_namespaces() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&format!("{NS_PREFIX}-")) else {
            continue;
        };
        let pid = rest.rsplit('-').next().unwrap_or("");
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

fn run_checked(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn enter(netns: &str) {
    let ns = File::open(format!("/run/netns/{netns}")).unwrap();
    // SAFETY: plain syscall on a descriptor we own; it moves only the
    // calling thread.
    assert_eq!(
        unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
        0,
        "setns {netns}: {}",
        std::io::Error::last_os_error()
    );
}

/// Runs `f` on a thread inside `netns`.
fn in_ns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        enter(&netns);
        f()
    })
    .join()
    .unwrap()
}

/// A command started inside `netns` (only the network namespace).
fn command_in(netns: &str, program: &Path) -> Command {
    let ns = File::open(format!("/run/netns/{netns}")).unwrap();
    let mut cmd = Command::new(program);
    // SAFETY: setns is async-signal-safe; the descriptor stays open until
    // the command is dropped (it is moved into the closure).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// A program on PATH or in cargo's bin directory (`cargo install`).
fn find_program(name: &str, hint: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed: {hint}"))
}

/// One HTTP/1.1 GET (connection: close); the status line.
fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write {addr}: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .map_err(|e| format!("read {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&out);
    let status = text.lines().next().unwrap_or("").to_owned();
    if status.starts_with("HTTP/1.1 200") {
        Ok(text.into_owned())
    } else {
        Err(format!("{addr}{path}: answer {status:?}"))
    }
}

/// Polls `http_get` from inside `netns` until it answers 200.
fn wait_http(netns: &str, addr: SocketAddr, path: &'static str, what: &str, log: &Path) -> String {
    let r = in_ns(netns, move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match http_get(addr, path) {
                Ok(body) => return Ok(body),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    r.unwrap_or_else(|e| {
        panic!(
            "{what} not answering after 20 s ({e}); its log ({}):\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })
}

// -------------------------------------------------------------------- app

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n";

/// The app: an HTTP/1.1 keep-alive server on both app ports, a thread per
/// connection, every response one write with TCP_NODELAY (a response in
/// several small writes would meet Nagle and the peer's delayed ACK and
/// measure 40 ms timers, not proxies). It runs in this process, inside the
/// server pod, until the benchmark exits.
fn start_app(server_ns: &str) {
    for port in [APP_PORT, APP_DIRECT_PORT] {
        let ns = server_ns.to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            enter(&ns);
            let listener = std::net::TcpListener::bind(("0.0.0.0", port));
            let listener = match listener {
                Ok(l) => {
                    tx.send(Ok(())).unwrap();
                    l
                }
                Err(e) => {
                    tx.send(Err(e)).unwrap();
                    return;
                }
            };
            for conn in listener.incoming() {
                let Ok(s) = conn else { continue };
                std::thread::spawn(move || serve_http(s));
            }
        });
        rx.recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("bind the app on port {port}: {e}"));
    }
}

fn serve_http(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    // A client gone silent (a killed run) does not keep the thread.
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buf = vec![0u8; 16 * 1024];
    let mut have = 0;
    loop {
        match s.read(&mut buf[have..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
        let mut answers = 0;
        let mut close = false;
        let mut start = 0;
        while let Some(end) = buf[start..have].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[start..start + end]).to_ascii_lowercase();
            close |= head.contains("connection: close");
            answers += 1;
            start += end + 4;
        }
        buf.copy_within(start..have, 0);
        have -= start;
        if have == buf.len() {
            return;
        }
        if answers > 0 {
            let out = RESPONSE.repeat(answers);
            if s.write_all(&out).is_err() || close {
                return;
            }
        }
    }
}

// ------------------------------------------------------------ certificates

/// The "cluster CA" and the mesh CA's serving certificate (what the API
/// server's certificate is in a cluster): (cluster CA PEM, TLS config).
fn ca_serving_tls() -> (String, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "skep mesh bench cluster CA");
    let ca = p.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![CA_NAME.to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone(), ca.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    (ca.pem(), Arc::new(config))
}

/// Service-account tokens of the benchmark's two workloads.
struct Tokens(HashMap<String, Account>);

#[ca_server::async_trait]
impl Authenticator for Tokens {
    async fn authenticate(&self, token: &str) -> Option<Account> {
        self.0.get(token).cloned()
    }
}

/// The mesh CA (gRPC Certify) served from this process inside the server
/// pod; the runtime's threads live in that namespace.
struct CaService {
    _rt: tokio::runtime::Runtime,
}

fn start_ca(server_ns: &str, ca: Arc<MeshCa>, tokens: Tokens) -> (CaService, String) {
    let (cluster_ca, tls) = ca_serving_tls();
    let ns = server_ns.to_owned();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(move || enter(&ns))
        .build()
        .unwrap();
    // Spawned, not block_on'd: the listener must be bound by a runtime
    // thread (in the server pod), not by this one.
    let bound = rt.spawn(async move {
        let listener = tokio::net::TcpListener::bind((SERVER_IP, CA_PORT))
            .await
            .expect("bind the mesh CA in the server pod");
        ca_server::serve(listener, tls, IdentityService::new(ca, tokens));
    });
    rt.block_on(bound).unwrap();
    (CaService { _rt: rt }, cluster_ca)
}

/// A key and a certificate chain from the mesh CA for stunnel:
/// (chain PEM, key PEM).
fn stunnel_identity(ca: &MeshCa, account: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    let issued = ca.issue(csr.der(), NAMESPACE, account).unwrap();
    (issued.cert_chain_pem, key.serialize_pem())
}

// ---------------------------------------------------------------- proxies

fn spiffe(account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{account}")
}

fn sidecar_args(dir: &Path, cluster_ca: &Path, account: &str) -> Vec<String> {
    let token = dir.join(format!("{account}.token"));
    std::fs::write(&token, format!("token-of-{account}\n")).unwrap();
    [
        "sidecar",
        "--ca-address",
        &format!("{SERVER_IP}:{CA_PORT}"),
        "--ca-server-name",
        CA_NAME,
        "--cluster-ca",
        &cluster_ca.display().to_string(),
        "--token",
        &token.display().to_string(),
        "--trust-domain",
        TRUST_DOMAIN,
        "--inbound-listen",
        "0.0.0.0:15006",
        "--outbound-listen",
        &format!("127.0.0.1:{OUTBOUND_PORT}"),
        "--admin-listen",
        &format!("127.0.0.1:{ADMIN_PORT}"),
    ]
    .map(String::from)
    .to_vec()
}

fn stunnel_conf(
    dir: &Path,
    name: &str,
    service: &str,
    chain: &str,
    key: &str,
    root: &Path,
) -> PathBuf {
    let cert = dir.join(format!("{name}.crt"));
    let keyf = dir.join(format!("{name}.key"));
    std::fs::write(&cert, chain).unwrap();
    std::fs::write(&keyf, key).unwrap();
    let conf = dir.join(format!("{name}.conf"));
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\nsyslog = no\npid =\ndebug = 3\n\n[mesh]\n{service}\
             cert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nrequireCert = yes\n\
             sslVersionMin = TLSv1.3\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
            cert.display(),
            keyf.display(),
            root.display()
        ),
    )
    .unwrap();
    conf
}

fn spawn_stunnel(stunnel: &Path, netns: &str, conf: &Path, log: &Path) -> Proc {
    let child = command_in(netns, stunnel)
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .expect("start stunnel4");
    Proc(child)
}

// ------------------------------------------------------------- measuring

fn clock_ticks() -> f64 {
    // SAFETY: plain libc call without pointers.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime+stime of a process (all its threads), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("process {pid} is gone ({e}): a proxy died during the run"));
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / clock_ticks()
}

fn status_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Load {
    Rate(u32),
    Max,
    Handshakes,
}

impl Load {
    fn key(self) -> String {
        match self {
            Load::Rate(r) => format!("rate_{r}"),
            Load::Max => "max".into(),
            Load::Handshakes => "handshakes".into(),
        }
    }

    fn label(self) -> String {
        match self {
            Load::Rate(r) => format!("{r} req/s"),
            Load::Max => "max rate".into(),
            Load::Handshakes => "new conn/req".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Route {
    Direct,
    Skep,
    Stunnel,
}

impl Route {
    const ALL: [Route; 3] = [Route::Direct, Route::Skep, Route::Stunnel];

    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Skep => "skep",
            Route::Stunnel => "stunnel",
        }
    }

    fn url(self) -> String {
        match self {
            Route::Direct => format!("http://{SERVER_IP}:{APP_DIRECT_PORT}/"),
            // The app's own address: the capture sends it to the sidecar.
            Route::Skep => format!("http://{SERVER_IP}:{APP_PORT}/"),
            Route::Stunnel => format!("http://127.0.0.1:{STUNNEL_CLIENT_PORT}/"),
        }
    }
}

/// One proxy's use during a run.
#[derive(Debug, Clone)]
struct ProxyUse {
    cpu_s: f64,
    rss_mb: f64,
}

#[derive(Debug, Clone)]
struct RunResult {
    ok: u64,
    errors: u64,
    secs: f64,
    p50: f64,
    p99: f64,
    max: f64,
    /// (client side, server side); empty for direct.
    proxies: Vec<ProxyUse>,
}

impl RunResult {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.secs
    }

    fn cpu_s(&self) -> f64 {
        self.proxies.iter().map(|p| p.cpu_s).sum()
    }

    /// CPU time of both proxies per successful request, µs.
    fn cpu_us_per_req(&self) -> f64 {
        if self.ok == 0 {
            return f64::NAN;
        }
        self.cpu_s() / self.ok as f64 * 1e6
    }

    fn json(&self) -> Value {
        let proxies: Vec<Value> = self
            .proxies
            .iter()
            .zip(["client", "server"])
            .map(|(p, side)| {
                json!({
                    "side": side,
                    "cpu_pct": round(p.cpu_s / self.secs * 100.0),
                    "rss_mb": round(p.rss_mb),
                })
            })
            .collect();
        json!({
            "ok_requests": self.ok,
            "errors": self.errors,
            "seconds": round(self.secs),
            "ok_rps": round(self.rps()),
            "p50_ms": self.p50,
            "p99_ms": self.p99,
            "max_ms": self.max,
            "proxy_cpu_us_per_request": if self.proxies.is_empty() { Value::Null } else { json!(round(self.cpu_us_per_req())) },
            "proxies": proxies,
        })
    }
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

struct Bench {
    oha: PathBuf,
    client_ns: String,
    /// `cgroup.procs` of the captured cgroup: oha joins it for skep runs.
    capture_procs: PathBuf,
    secs: u64,
    /// Pids of the (client, server) proxies of each proxied path.
    pids: HashMap<&'static str, (u32, u32)>,
}

impl Bench {
    fn run(&self, path: Route, load: Load, secs: u64) -> RunResult {
        let mut cmd = command_in(&self.client_ns, &self.oha);
        if path == Route::Skep {
            // The meshed client: oha joins the captured cgroup before it
            // runs, so its very first connect() is captured.
            let procs = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.capture_procs)
                .expect("open the captured cgroup's cgroup.procs");
            // SAFETY: write(2) is async-signal-safe; the descriptor was
            // opened before the fork and is moved into the closure. "0"
            // moves the writing process (the child) itself.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.args(["--no-tui", "--output-format", "json", "-z"])
            .arg(format!("{secs}s"))
            .args(["-c", &CONNECTIONS.to_string()])
            // Requests that never get an answer must not stall the run.
            .args(["-t", "5s"])
            // Explicit: oha would otherwise read TOKIO_WORKER_THREADS,
            // which may be set for the sidecars.
            .arg("--worker-threads")
            .arg(
                std::thread::available_parallelism()
                    .map_or(2, |n| n.get())
                    .to_string(),
            );
        match load {
            Load::Rate(r) => {
                cmd.args(["-q", &r.to_string(), "--latency-correction"]);
            }
            Load::Max => {}
            Load::Handshakes => {
                cmd.arg("--disable-keepalive");
            }
        }
        cmd.arg(path.url());
        let pids = self.pids.get(path.name()).copied();
        let before = pids.map(|(c, s)| (cpu_seconds(c), cpu_seconds(s)));
        let out = run_bounded(cmd, Duration::from_secs(secs + 30));
        let after = pids.map(|(c, s)| (cpu_seconds(c), cpu_seconds(s)));
        let v: Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "oha printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out)
            )
        });
        let ok = v["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
        let mut errors = 0;
        let mut other = Vec::new();
        for (k, n) in v["errorDistribution"].as_object().into_iter().flatten() {
            // Requests cut by the end of the run are not failures.
            if !k.contains("deadline") {
                errors += n.as_u64().unwrap_or(0);
                other.push(format!("{k}: {n}"));
            }
        }
        for (k, n) in v["statusCodeDistribution"]
            .as_object()
            .into_iter()
            .flatten()
        {
            if k != "200" {
                errors += n.as_u64().unwrap_or(0);
                other.push(format!("status {k}: {n}"));
            }
        }
        if !other.is_empty() {
            eprintln!(
                "  {} {}: errors: {}",
                path.name(),
                load.label(),
                other.join(", ")
            );
        }
        let lat = &v["metrics"]["latency_ms"];
        let ms = |k: &str| lat[k].as_f64().unwrap_or(f64::NAN);
        let proxies = match (pids, before, after) {
            (Some((c, s)), Some((c0, s0)), Some((c1, s1))) => vec![
                ProxyUse {
                    cpu_s: c1 - c0,
                    rss_mb: status_mb(c, "VmRSS:"),
                },
                ProxyUse {
                    cpu_s: s1 - s0,
                    rss_mb: status_mb(s, "VmRSS:"),
                },
            ],
            _ => Vec::new(),
        };
        RunResult {
            ok,
            errors,
            secs: v["summary"]["total"].as_f64().unwrap_or(secs as f64),
            p50: ms("p50"),
            p99: ms("p99"),
            max: ms("max"),
            proxies,
        }
    }
}

/// Runs `cmd` to completion (killed after `limit`); its stdout.
fn run_bounded(mut cmd: Command, limit: Duration) -> Vec<u8> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start oha");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = reader.join().unwrap();
            if !status.success() {
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("oha failed ({status}): {err}");
            }
            return out;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("oha ran past {limit:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------------- main

fn main() {
    // SAFETY: plain syscall.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the mesh benchmark makes network namespaces, a cgroup and BPF programs: run it as root"
    );
    let setup_hint = "run `cargo xtask setup` (it installs oha and stunnel4)";
    let oha = find_program("oha", setup_hint);
    let stunnel = find_program("stunnel4", setup_hint);
    let secs: u64 = std::env::var("SKEP_MESH_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s| *s > 0)
        .unwrap_or(10);
    let handshake_secs = secs.min(5);

    let pods = Pods::create();
    let capture = Capture::create();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // The mesh CA: one root for the sidecars and the stunnel pair.
    let (root_pem, root_key) = skep_mesh_sidecar::ca::generate_root(TRUST_DOMAIN).unwrap();
    let ca = Arc::new(MeshCa::from_pem(&root_pem, &root_key, TRUST_DOMAIN).unwrap());
    let root_file = d.join("mesh-root.pem");
    std::fs::write(&root_file, ca.trust_bundle_pem()).unwrap();
    let tokens = Tokens(
        ["client", "server"]
            .into_iter()
            .map(|a| {
                (
                    format!("token-of-{a}"),
                    Account {
                        namespace: NAMESPACE.into(),
                        service_account: a.into(),
                    },
                )
            })
            .collect(),
    );
    let (_ca_service, cluster_ca) = start_ca(&pods.server, ca.clone(), tokens);
    let cluster_ca_file = d.join("cluster-ca.pem");
    std::fs::write(&cluster_ca_file, cluster_ca).unwrap();

    // The app, on both ports.
    start_app(&pods.server);
    let direct_addr: SocketAddr = format!("{SERVER_IP}:{APP_DIRECT_PORT}").parse().unwrap();
    wait_http(
        &pods.client,
        direct_addr,
        "/",
        "the app",
        Path::new("/dev/null"),
    );

    // skep: the server sidecar (strict, only the client's identity), the
    // client sidecar with its capture.
    let server_log = d.join("sidecar-server.log");
    let mut args = sidecar_args(d, &cluster_ca_file, "server");
    args.extend(["--mode", "strict", "--allow"].map(String::from));
    args.push(spiffe("client"));
    let sidecar_server = spawn_in(&pods.server, &args, &server_log);
    let client_log = d.join("sidecar-client.log");
    let mut args = sidecar_args(d, &cluster_ca_file, "client");
    args.extend(["--meshed-peers".to_owned(), SERVER_IP.to_owned()]);
    args.push("--capture-maps".to_owned());
    args.push(capture.maps().display().to_string());
    let sidecar_client = spawn_in(&pods.client, &args, &client_log);
    let admin: SocketAddr = format!("127.0.0.1:{ADMIN_PORT}").parse().unwrap();
    wait_http(
        &pods.server,
        admin,
        "/ready",
        "the server sidecar",
        &server_log,
    );
    wait_http(
        &pods.client,
        admin,
        "/ready",
        "the client sidecar",
        &client_log,
    );
    // stunnel: the same hop.
    let (chain, key) = stunnel_identity(&ca, "stunnel-server");
    let conf = stunnel_conf(
        d,
        "stunnel-server",
        &format!("accept = {SERVER_IP}:{STUNNEL_SERVER_PORT}\nconnect = 127.0.0.1:{APP_PORT}\n"),
        &chain,
        &key,
        &root_file,
    );
    let st_server_log = d.join("stunnel-server.log");
    let stunnel_server = spawn_stunnel(&stunnel, &pods.server, &conf, &st_server_log);
    let (chain, key) = stunnel_identity(&ca, "stunnel-client");
    let conf = stunnel_conf(
        d,
        "stunnel-client",
        &format!(
            "client = yes\naccept = 127.0.0.1:{STUNNEL_CLIENT_PORT}\nconnect = {SERVER_IP}:{STUNNEL_SERVER_PORT}\n"
        ),
        &chain,
        &key,
        &root_file,
    );
    let st_client_log = d.join("stunnel-client.log");
    let stunnel_client = spawn_stunnel(&stunnel, &pods.client, &conf, &st_client_log);
    let via_stunnel: SocketAddr = format!("127.0.0.1:{STUNNEL_CLIENT_PORT}").parse().unwrap();
    wait_http(
        &pods.client,
        via_stunnel,
        "/",
        "the app through stunnel",
        &st_client_log,
    );

    let bench = Bench {
        oha,
        client_ns: pods.client.clone(),
        secs,
        capture_procs: capture.cgroup.join("cgroup.procs"),
        pids: HashMap::from([
            ("skep", (sidecar_client.0.id(), sidecar_server.0.id())),
            ("stunnel", (stunnel_client.0.id(), stunnel_server.0.id())),
        ]),
    };

    println!(
        "mesh benchmark: {CONNECTIONS} connections, {secs} s per run ({handshake_secs} s for handshakes); capture: eBPF connect4 on the client's cgroup"
    );
    // Before any load: what starting up left resident (anon + file).
    let idle_mem: Vec<(f64, f64)> = [sidecar_client.0.id(), sidecar_server.0.id()]
        .map(|pid| (status_mb(pid, "RssAnon:"), status_mb(pid, "RssFile:")))
        .to_vec();
    println!(
        "skep sidecars ready, before load: anon+file {:.1}+{:.1} / {:.1}+{:.1} MB (client / server); VmHWM {:.1} / {:.1} MB",
        idle_mem[0].0,
        idle_mem[0].1,
        idle_mem[1].0,
        idle_mem[1].1,
        status_mb(sidecar_client.0.id(), "VmHWM:"),
        status_mb(sidecar_server.0.id(), "VmHWM:"),
    );
    // Warm-up (not recorded): code paths, allocators, session caches.
    for p in Route::ALL {
        bench.run(p, Load::Max, 2);
    }
    // The skep route went through both sidecars over mTLS (captured by
    // connect4 from the cgroup oha joined): the server sidecar saw the
    // client's identity.
    let metrics = wait_http(
        &pods.server,
        admin,
        "/metrics",
        "server sidecar metrics",
        &server_log,
    );
    assert!(
        metrics.contains(&spiffe("client")),
        "the server sidecar's metrics do not name the client's identity: the skep runs did not take the captured mTLS path\n{metrics}"
    );
    let loads = [
        (Load::Rate(1000), secs),
        (Load::Rate(5000), secs),
        (Load::Max, secs),
        (Load::Handshakes, handshake_secs),
    ];
    let mut results: Vec<(Load, Route, RunResult)> = Vec::new();
    for (load, s) in loads {
        // Paths interleaved per load: drift of the machine hits all three.
        for p in Route::ALL {
            let r = bench.run(p, load, s);
            println!(
                "  {:<13} {:<8} {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>8.3} ms",
                load.label(),
                p.name(),
                r.rps(),
                r.p50,
                r.p99,
                r.max
            );
            results.push((load, p, r));
        }
    }
    let hwm = |pid: u32| status_mb(pid, "VmHWM:");
    let mut mem = json!({
        "skep_client_hwm_mb": round(hwm(sidecar_client.0.id())),
        "skep_server_hwm_mb": round(hwm(sidecar_server.0.id())),
        "stunnel_client_hwm_mb": round(hwm(stunnel_client.0.id())),
        "stunnel_server_hwm_mb": round(hwm(stunnel_server.0.id())),
    });
    for (i, side) in ["client", "server"].into_iter().enumerate() {
        mem[format!("skep_{side}_ready_rss_anon_mb")] = json!(round(idle_mem[i].0));
        mem[format!("skep_{side}_ready_rss_file_mb")] = json!(round(idle_mem[i].1));
    }
    // What the resident memory is made of at the end: the binary's pages
    // (file) and heap, stacks and buffers (anon).
    for (name, pid) in [
        ("skep_client", sidecar_client.0.id()),
        ("skep_server", sidecar_server.0.id()),
        ("stunnel_client", stunnel_client.0.id()),
        ("stunnel_server", stunnel_server.0.id()),
    ] {
        mem[format!("{name}_rss_anon_mb")] = json!(round(status_mb(pid, "RssAnon:")));
        mem[format!("{name}_rss_file_mb")] = json!(round(status_mb(pid, "RssFile:")));
        // Shared pages (the binary, libraries) split among their users.
        mem[format!("{name}_pss_mb")] = json!(round(support::pss_mb(pid)));
    }
    println!(
        "resident memory at the end (anon + file MB): skep {:.1}+{:.1} / {:.1}+{:.1}, stunnel {:.1}+{:.1} / {:.1}+{:.1} (client / server)",
        mem["skep_client_rss_anon_mb"].as_f64().unwrap(),
        mem["skep_client_rss_file_mb"].as_f64().unwrap(),
        mem["skep_server_rss_anon_mb"].as_f64().unwrap(),
        mem["skep_server_rss_file_mb"].as_f64().unwrap(),
        mem["stunnel_client_rss_anon_mb"].as_f64().unwrap(),
        mem["stunnel_client_rss_file_mb"].as_f64().unwrap(),
        mem["stunnel_server_rss_anon_mb"].as_f64().unwrap(),
        mem["stunnel_server_rss_file_mb"].as_f64().unwrap(),
    );
    println!(
        "PSS at the end (MB): skep {:.1} / {:.1}, stunnel {:.1} / {:.1} (client / server)",
        mem["skep_client_pss_mb"].as_f64().unwrap(),
        mem["skep_server_pss_mb"].as_f64().unwrap(),
        mem["stunnel_client_pss_mb"].as_f64().unwrap(),
        mem["stunnel_server_pss_mb"].as_f64().unwrap(),
    );
    let report = report(&bench, &results, mem);
    let out = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("mesh.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    println!("report: {}", out.join("mesh.json").display());
    drop(stunnel_client);
    drop(stunnel_server);
    drop(sidecar_client);
    drop(sidecar_server);
    drop(pods);
}

fn report(bench: &Bench, results: &[(Load, Route, RunResult)], mem: Value) -> Value {
    let get = |load: Load, p: Route| {
        results
            .iter()
            .find(|(l, q, _)| *l == load && *q == p)
            .map(|(_, _, r)| r)
            .unwrap()
    };
    let mut phases = Map::new();
    for (load, p, r) in results {
        phases
            .entry(load.key())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .unwrap()
            .insert(p.name().into(), r.json());
    }
    let added = |load: Load, p: Route| round(get(load, p).p99 - get(load, Route::Direct).p99);
    let ratio = |a: f64, b: f64| round(a / b);
    let max = |p: Route| get(Load::Max, p).rps();
    let hs = |p: Route| get(Load::Handshakes, p).rps();
    let sidecar_rss = mem["skep_client_hwm_mb"]
        .as_f64()
        .unwrap()
        .max(mem["skep_server_hwm_mb"].as_f64().unwrap());
    let stunnel_rss = mem["stunnel_client_hwm_mb"]
        .as_f64()
        .unwrap()
        .max(mem["stunnel_server_hwm_mb"].as_f64().unwrap());
    let cpu = |load: Load, p: Route| round(get(load, p).cpu_us_per_req());

    // The table: every run, then the ratios against stunnel.
    println!();
    println!(
        "{:<13} {:<8} {:>10} {:>8} {:>8} {:>9} {:>9} {:>10} {:>11} {:>13}",
        "load",
        "path",
        "ok req/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "+p99 ms",
        "cpu µs/req",
        "cpu % c/s",
        "RSS MB c/s"
    );
    for (load, p, r) in results {
        let (cpu_pct, rss) = if r.proxies.is_empty() {
            ("-".to_owned(), "-".to_owned())
        } else {
            (
                format!(
                    "{:.0}/{:.0}",
                    r.proxies[0].cpu_s / r.secs * 100.0,
                    r.proxies[1].cpu_s / r.secs * 100.0
                ),
                format!("{:.1}/{:.1}", r.proxies[0].rss_mb, r.proxies[1].rss_mb),
            )
        };
        println!(
            "{:<13} {:<8} {:>10.0} {:>8.3} {:>8.3} {:>9.3} {:>9} {:>10} {:>11} {:>13}",
            load.label(),
            p.name(),
            r.rps(),
            r.p50,
            r.p99,
            r.max,
            if *p == Route::Direct {
                "-".to_owned()
            } else {
                format!("{:+.3}", r.p99 - get(*load, Route::Direct).p99)
            },
            if r.proxies.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.1}", r.cpu_us_per_req())
            },
            cpu_pct,
            rss
        );
    }
    println!();
    println!(
        "peak RSS (VmHWM): skep sidecars {:.1} / {:.1} MB, stunnel {:.1} / {:.1} MB (client / server)",
        mem["skep_client_hwm_mb"].as_f64().unwrap(),
        mem["skep_server_hwm_mb"].as_f64().unwrap(),
        mem["stunnel_client_hwm_mb"].as_f64().unwrap(),
        mem["stunnel_server_hwm_mb"].as_f64().unwrap()
    );
    println!("ratios skep / stunnel (same run):");
    println!(
        "  max rate           {:.3}  ({:.0} vs {:.0} req/s; direct {:.0})",
        max(Route::Skep) / max(Route::Stunnel),
        max(Route::Skep),
        max(Route::Stunnel),
        max(Route::Direct)
    );
    println!(
        "  handshakes/s       {:.3}  ({:.0} vs {:.0}; direct TCP connections/s {:.0})",
        hs(Route::Skep) / hs(Route::Stunnel),
        hs(Route::Skep),
        hs(Route::Stunnel),
        hs(Route::Direct)
    );
    for load in [
        Load::Rate(1000),
        Load::Rate(5000),
        Load::Max,
        Load::Handshakes,
    ] {
        println!(
            "  cpu/req {:<13} {:.3}  ({:.1} vs {:.1} µs)",
            load.label(),
            cpu(load, Route::Skep) / cpu(load, Route::Stunnel),
            cpu(load, Route::Skep),
            cpu(load, Route::Stunnel)
        );
    }
    println!(
        "  peak RSS           {:.3}  ({sidecar_rss:.1} vs {stunnel_rss:.1} MB, the larger of each pair)",
        sidecar_rss / stunnel_rss
    );
    for load in [Load::Rate(1000), Load::Rate(5000)] {
        println!(
            "  added p99 at {:<10} skep {:+.3} ms, stunnel {:+.3} ms",
            load.label(),
            added(load, Route::Skep),
            added(load, Route::Stunnel)
        );
    }
    let added_1000 = added(Load::Rate(1000), Route::Skep);
    let max_ratio = ratio(max(Route::Skep), max(Route::Stunnel));
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("targets:");
    println!(
        "  added p99 at 1,000 req/s ≤ 0.5 ms: {added_1000:+.3} ms — {}",
        verdict(added_1000 <= 0.5)
    );
    println!(
        "  max rate ≥ stunnel pair: ratio {max_ratio:.3} — {}",
        verdict(max_ratio >= 1.0)
    );
    println!(
        "  RSS ≤ 15 MB per sidecar under load: {sidecar_rss:.1} MB — {}",
        verdict(sidecar_rss <= 15.0)
    );

    json!({
        "topology": "two network namespaces (client pod, server pod) joined by a veth; an HTTP/1.1 keep-alive app (the benchmark's, one write per response, TCP_NODELAY) in the server pod; oha in the client pod",
        "capture": "eBPF cgroup connect4 (mesh_connect4) on the client pod's cgroup v2 directory; original destination from its pinned map",
        "load_generator": "oha, HTTP/1.1, -c 32; constant rates with --latency-correction",
        "connections": CONNECTIONS,
        "seconds_per_run": bench.secs,
        "added_p99_ms_1000rps": added_1000,
        "added_p99_ms_5000rps": added(Load::Rate(5000), Route::Skep),
        "stunnel_added_p99_ms_1000rps": added(Load::Rate(1000), Route::Stunnel),
        "stunnel_added_p99_ms_5000rps": added(Load::Rate(5000), Route::Stunnel),
        "max_rps": {
            "direct": round(max(Route::Direct)),
            "skep": round(max(Route::Skep)),
            "stunnel": round(max(Route::Stunnel)),
        },
        "max_rps_ratio_vs_stunnel": max_ratio,
        "handshakes_per_s": {
            "direct_tcp": round(hs(Route::Direct)),
            "skep": round(hs(Route::Skep)),
            "stunnel": round(hs(Route::Stunnel)),
        },
        "handshakes_ratio_vs_stunnel": ratio(hs(Route::Skep), hs(Route::Stunnel)),
        "cpu_us_per_request": {
            "skep": {
                "rate_1000": cpu(Load::Rate(1000), Route::Skep),
                "rate_5000": cpu(Load::Rate(5000), Route::Skep),
                "max": cpu(Load::Max, Route::Skep),
                "handshakes": cpu(Load::Handshakes, Route::Skep),
            },
            "stunnel": {
                "rate_1000": cpu(Load::Rate(1000), Route::Stunnel),
                "rate_5000": cpu(Load::Rate(5000), Route::Stunnel),
                "max": cpu(Load::Max, Route::Stunnel),
                "handshakes": cpu(Load::Handshakes, Route::Stunnel),
            },
        },
        "sidecar_rss_mb": round(sidecar_rss),
        "stunnel_rss_mb": round(stunnel_rss),
        "memory_peak": mem,
        "targets": {
            "added_p99_ms_1000rps_max": 0.5,
            "added_p99_met": added_1000 <= 0.5,
            "max_rps_ratio_vs_stunnel_min": 1.0,
            "max_rps_met": max_ratio >= 1.0,
            "sidecar_rss_mb_max": 15.0,
            "sidecar_rss_met": sidecar_rss <= 15.0,
        },
        "runs": phases,
    })
}
