//! Test harness: a real `skep server` process on a loopback port with its
//! own data directory, and helpers to drive it with real clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

pub const KUBECTL_DIR: &str = "/usr/lib/google-cloud-sdk/bin";

/// Path of a kubectl binary of one minor version (e.g. "1.31").
/// Fails (never skips) when the Python `kubernetes` client is missing.
pub fn require_python_kubernetes() {
    let check = std::process::Command::new("python3")
        .args(["-c", "import kubernetes"])
        .output()
        .expect("python3 is needed for this test");
    assert!(
        check.status.success(),
        "the Python `kubernetes` package is missing: run `cargo xtask setup` (pip install kubernetes)"
    );
}

pub fn kubectl_bin(version: &str) -> PathBuf {
    let p = Path::new(KUBECTL_DIR).join(format!("kubectl.{version}"));
    assert!(
        p.exists(),
        "{} is missing: these tests drive the real kubectl {version} (the Google Cloud SDK kubectl packages provide it)",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running server; killed on drop.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
}

impl Server {
    /// A control plane only (`--no-agent`).
    pub fn start() -> Self {
        Self::start_with(&["--no-agent"])
    }

    /// A server with extra command-line arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), extra)
    }

    /// A server on a data directory prepared by the caller.
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        let port = free_port();
        let mut s = Server {
            dir,
            port,
            child: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_skep"))
            .args(["server", "--data-dir"])
            .arg(self.dir.path())
            .args(&self.extra)
            .args(["--api-listen", &format!("127.0.0.1:{}", self.port)])
            .env("SKEP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start skep server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.kubeconfig().exists()
                && self
                    .curl(&[
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        &self.url("/readyz"),
                    ])
                    .stdout
                    == b"200"
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("skep server exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "server not ready in 20 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The server's process id (None once killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL, like a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server (SIGKILL, like a crash) and starts it again on the
    /// same data directory and port.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig.yaml")
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin-token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// curl with the cluster CA, without credentials.
    pub fn curl(&self, args: &[&str]) -> Output {
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(self.dir.path().join("tls/ca.crt"))
            .args(args)
            .output()
            .expect("run curl (apt package curl; `cargo xtask setup` installs it)")
    }

    /// curl as the admin.
    pub fn curl_admin(&self, args: &[&str]) -> Output {
        let auth = format!("Authorization: Bearer {}", self.token());
        let mut all = vec!["-H", auth.as_str()];
        all.extend_from_slice(args);
        self.curl(&all)
    }

    /// Runs kubectl of `version` against this server.
    pub fn kubectl(&self, version: &str, args: &[&str]) -> Output {
        self.kubectl_stdin(version, args, None)
    }

    pub fn kubectl_stdin(&self, version: &str, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let mut child = Command::new(kubectl_bin(version))
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// kubectl that must succeed; returns stdout.
    pub fn k(&self, version: &str, args: &[&str]) -> String {
        let out = self.kubectl(version, args);
        assert!(
            out.status.success(),
            "kubectl {version} {} failed: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, version: &str, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.k(version, &a)).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
