//! A private dockerd for tests: its own data root, exec root, pidfile and
//! socket, no bridge and no iptables rules (the host's network is left
//! alone). Stopped, with every container it ran, on drop.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct Dockerd {
    child: Child,
    pub socket: PathBuf,
    dir: PathBuf,
}

impl Dockerd {
    pub fn start() -> Self {
        assert!(
            Command::new("dockerd")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            "dockerd is missing: install the Debian package docker.io (`cargo xtask setup` does)"
        );
        let pid = std::process::id();
        let dir = PathBuf::from(format!("/tmp/skep-test-docker-{pid}"));
        let socket = PathBuf::from(format!("/run/skep-test-docker-{pid}.sock"));
        let _ = std::fs::remove_file(&socket);
        std::fs::create_dir_all(&dir).unwrap();
        // An empty config: /etc/docker/daemon.json (if any) is the host's.
        std::fs::write(dir.join("daemon.json"), "{}").unwrap();
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-masq=false",
                // The host's forwarding stays as it was (dockerd turns it
                // on by default): nothing of the tests is routed through.
                "--ip-forward=false",
                "--userland-proxy=false",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting dockerd");
        let mut d = Self { child, socket, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d.ping() {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("dockerd exited ({st}):\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer within 60s:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        d
    }

    pub fn log(&self) -> String {
        let s = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let start = s.len().saturating_sub(4000);
        s.get(start..).unwrap_or(&s).to_owned()
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = UnixStream::connect(&self.socket) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200")
    }

    /// Runs the docker CLI against this daemon; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .output()
            .expect("running the docker CLI");
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Force-removes every container with `label` (e.g. `io.skep.pod-uid`).
    pub fn remove_labelled(&self, label: &str) {
        let Ok(out) = Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["ps", "-aq", "--filter", &format!("label={label}")])
            .output()
        else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if ids.is_empty() {
            return;
        }
        let _ = Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["rm", "-f"])
            .args(&ids)
            .output();
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.remove_labelled("io.skep.pod-uid");
        // SIGTERM: dockerd stops its containerd and unmounts its layers.
        let _ = nix_kill(self.child.id(), libc_sigterm());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn libc_sigterm() -> &'static str {
    "TERM"
}

fn nix_kill(pid: u32, sig: &str) -> std::io::Result<()> {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map(|_| ())
}
