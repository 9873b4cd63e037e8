//! A real etcd process on loopback, for tests, benchmarks and HA tests.
//!
//! Each [`LocalEtcd`] runs the system's etcd (Debian's `etcd-server`, 3.4)
//! from `SKEP_ETCD_BIN` or `/usr/bin/etcd`, on free ports of 127.0.0.1 only,
//! with its data and its log in a temporary directory that goes away with
//! it. Dropping it kills the process.

use std::{
    fmt,
    fs::File,
    io::{Read, Seek, SeekFrom, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use tempfile::TempDir;

/// Environment variable naming the etcd binary to run.
pub const ETCD_BIN_ENV: &str = "SKEP_ETCD_BIN";
/// The etcd binary used when [`ETCD_BIN_ENV`] is not set.
pub const DEFAULT_ETCD_BIN: &str = "/usr/bin/etcd";

/// How long etcd may take to answer after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes of the log quoted in errors.
const LOG_TAIL_BYTES: u64 = 4096;
/// Starts retried when the ports we picked were taken in the meantime.
const PORT_CLASH_RETRIES: usize = 3;

/// Why a local etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LocalEtcdError {
    #[error(
        "the etcd binary {path} does not exist: install the Debian package etcd-server \
         (`cargo xtask setup` does it), or point {ETCD_BIN_ENV} at an etcd 3.4+ binary"
    )]
    MissingBinary { path: PathBuf },
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd ({name}) exited during startup ({status}); its log {log}, ends with:\n{tail}")]
    Exited {
        name: String,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "etcd ({name}) did not answer on {endpoint} within {waited_s:.1}s; it was killed. \
         Its log {log}, ends with:\n{tail}"
    )]
    NotReady {
        name: String,
        endpoint: String,
        waited_s: f64,
        log: PathBuf,
        tail: String,
    },
    #[error("an etcd cluster needs at least one member")]
    NoMembers,
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LocalEtcdError {
    let what = what.into();
    move |source| LocalEtcdError::Io { what, source }
}

/// One etcd member running on loopback. Killed when dropped.
pub struct LocalEtcd {
    bin: PathBuf,
    name: String,
    client_port: u16,
    peer_port: u16,
    /// `name=peer-url,...` of every member.
    initial_cluster: String,
    cluster_token: String,
    /// Faster elections for a single member (nobody to disagree with).
    single: bool,
    dir: TempDir,
    child: Option<Child>,
}

impl fmt::Debug for LocalEtcd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalEtcd")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint())
            .field("pid", &self.pid())
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl LocalEtcd {
    /// Starts a single-member etcd and waits until it answers.
    pub fn start() -> Result<LocalEtcd, LocalEtcdError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start_cluster(1) {
                Err(e) if attempt < PORT_CLASH_RETRIES && is_port_clash(&e) => continue,
                Err(e) => return Err(e),
                Ok(mut members) => match members.pop() {
                    Some(member) => return Ok(member),
                    None => return Err(LocalEtcdError::NoMembers),
                },
            }
        }
    }

    /// Starts an `n`-member cluster on loopback and waits until every
    /// member answers (which needs a quorum and a leader).
    pub fn start_cluster(n: usize) -> Result<Vec<LocalEtcd>, LocalEtcdError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start_cluster(n) {
                Err(e) if attempt < PORT_CLASH_RETRIES && is_port_clash(&e) => continue,
                other => return other,
            }
        }
    }

    fn try_start_cluster(n: usize) -> Result<Vec<LocalEtcd>, LocalEtcdError> {
        if n == 0 {
            return Err(LocalEtcdError::NoMembers);
        }
        let bin = etcd_binary()?;
        let ports = free_ports(2 * n)?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let cluster_token = format!("skep-test-{}-{nanos}", std::process::id());
        let names: Vec<String> = (0..n).map(|i| format!("skep-etcd-{i}")).collect();
        let initial_cluster = names
            .iter()
            .enumerate()
            .map(|(i, name)| format!("{name}=http://127.0.0.1:{}", ports[2 * i + 1]))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::with_capacity(n);
        for (i, name) in names.into_iter().enumerate() {
            let dir = tempfile::Builder::new()
                .prefix("skep-etcd-")
                .tempdir()
                .map_err(io_error("create a temporary directory for etcd"))?;
            members.push(LocalEtcd {
                bin: bin.clone(),
                name,
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                initial_cluster: initial_cluster.clone(),
                cluster_token: cluster_token.clone(),
                single: n == 1,
                dir,
                child: None,
            });
        }
        // Start every member before waiting: none answers without a quorum.
        for member in &mut members {
            member.spawn()?;
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for member in &mut members {
            // On failure, dropping the members kills them all.
            member.wait_ready(deadline)?;
        }
        Ok(members)
    }

    /// Starts the member again after [`LocalEtcd::kill`], with the same
    /// ports and data, and waits until it answers. A no-op when it runs.
    pub fn restart(&mut self) -> Result<(), LocalEtcdError> {
        if self.child.is_some() {
            return Ok(());
        }
        self.spawn()?;
        self.wait_ready(Instant::now() + READY_TIMEOUT)
    }

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The peer URL, `http://127.0.0.1:PORT`.
    pub fn peer_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// The member's name in the cluster.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The member's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The member's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// SIGKILLs the process and reaps it. The data stays, for
    /// [`LocalEtcd::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spawn(&mut self) -> Result<(), LocalEtcdError> {
        let log_path = self.log_path();
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_error(format!("create {}", log_path.display())))?;
        let _ = writeln!(log, "--- skep: starting {} ---", self.bin.display());
        let stdout = log
            .try_clone()
            .map_err(io_error(format!("open {}", log_path.display())))?;
        let client_url = self.endpoint();
        let peer_url = self.peer_endpoint();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&self.cluster_token)
            .arg("--initial-cluster-state")
            .arg("new")
            // The conformance suite writes 1.5 MiB values.
            .arg("--max-request-bytes")
            .arg("10485760")
            .arg("--quota-backend-bytes")
            .arg("8589934592")
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .arg("--log-level")
            .arg("warn");
        if self.single {
            // A lone member elects itself after one election timeout.
            cmd.arg("--heartbeat-interval")
                .arg("50")
                .arg("--election-timeout")
                .arg("300");
        }
        // ETCD_* variables would conflict with the flags.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(name);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .map_err(io_error(format!("run {}", self.bin.display())))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the member answers `/health` on its client port (which
    /// etcd only does with a leader), or kills it and fails.
    fn wait_ready(&mut self, deadline: Instant) -> Result<(), LocalEtcdError> {
        let started = Instant::now();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(LocalEtcdError::Exited {
                    name: self.name.clone(),
                    status,
                    log: self.log_path(),
                    tail: log_tail(&self.log_path()),
                });
            }
            if healthy(addr) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(LocalEtcdError::NotReady {
                    name: self.name.clone(),
                    endpoint: self.endpoint(),
                    waited_s: started.elapsed().as_secs_f64(),
                    log: self.log_path(),
                    tail: log_tail(&self.log_path()),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn etcd_binary() -> Result<PathBuf, LocalEtcdError> {
    let path = std::env::var_os(ETCD_BIN_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ETCD_BIN));
    if path.is_file() {
        Ok(path)
    } else {
        Err(LocalEtcdError::MissingBinary { path })
    }
}

/// `n` distinct ports that were free on 127.0.0.1 a moment ago.
fn free_ports(n: usize) -> Result<Vec<u16>, LocalEtcdError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_error("find a free port on 127.0.0.1"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_error("find a free port on 127.0.0.1"))
}

fn is_port_clash(e: &LocalEtcdError) -> bool {
    match e {
        LocalEtcdError::Exited { tail, .. } | LocalEtcdError::NotReady { tail, .. } => {
            tail.contains("address already in use")
        }
        _ => false,
    }
}

/// True when etcd's `/health` on `addr` reports healthy.
fn healthy(addr: SocketAddr) -> bool {
    let timeout = Duration::from_millis(500);
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let request =
        format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    response.starts_with("HTTP/1.1 200") && response.contains("\"health\":\"true\"")
}

/// The end of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) if text.trim().is_empty() => "(empty)".to_owned(),
        Ok(text) => text,
        Err(e) => format!("(cannot read it: {e})"),
    }
}
