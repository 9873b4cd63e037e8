//! `kubectl logs / exec / attach / port-forward / cp` through a real
//! `skep server` to a real kubelet streaming endpoint
//! (`skep_kubelet::server::serve`) whose "pod" is made of host processes:
//! exec runs `sh`/`tar` on the host with pipes, logs are CRI-format files
//! the test writes, port-forward reaches a TCP echo server on 127.0.0.1.
//! Driven by kubectl 1.27 (SPDY/3.1) and kubectl 1.33 (WebSocket v5 for
//! exec/attach/cp, SPDY tunnelled in a WebSocket for port-forward).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Server, kubectl_bin};
use serde_json::json;
use skep_kubelet::{
    runtime::ExecSession,
    server::{KubeletServer, async_trait},
    streams::{ContainerRef, LogSource, PodStreams, StreamError},
};
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

const NS: &str = "default";
const POD: &str = "web";
const NODE: &str = "stream-node";

/// Log lines of the `app` container (current instance) in CRI format.
const APP_LOG: &str = "\
2024-05-01T10:00:00.000000001Z stdout F line one
2024-05-01T10:00:01.5Z stderr F line two (stderr)
2024-05-01T10:00:02Z stdout P part
2024-05-01T10:00:02.1Z stdout F ial joined
2024-05-01T10:00:03Z stdout F line four
";
const APP_TEXT: &str = "line one\nline two (stderr)\npartial joined\nline four\n";

/// A pod of host processes and files.
struct HostPod {
    dir: PathBuf,
    /// Running flag per container; `follow` ends when it turns false.
    running: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// `still_running` calls: a follower that is still polling.
    polls: std::sync::atomic::AtomicUsize,
}

impl HostPod {
    fn log_path(&self, container: &str, attempt: u32) -> PathBuf {
        self.dir.join(format!("{container}-{attempt}.log"))
    }

    fn flag(&self, container: &str) -> Arc<AtomicBool> {
        self.running
            .lock()
            .unwrap()
            .entry(container.to_owned())
            .or_insert_with(|| Arc::new(AtomicBool::new(true)))
            .clone()
    }

    fn check(&self, c: &ContainerRef) -> Result<(), StreamError> {
        if c.namespace != NS || c.pod != POD {
            return Err(StreamError::NotFound(format!(
                "pod {}/{} is not on this node",
                c.namespace, c.pod
            )));
        }
        if !["app", "side", "follower"].contains(&c.container.as_str()) {
            return Err(StreamError::NotFound(format!(
                "container {:?} not found in pod {}",
                c.container, c.pod
            )));
        }
        Ok(())
    }

    fn spawn(&self, cmd: &[String], stdin: bool) -> Result<ExecSession, StreamError> {
        let mut child = tokio::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .current_dir(&self.dir)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| StreamError::Internal(format!("starting {cmd:?}: {e}")))?;
        let (tx, exit) = tokio::sync::oneshot::channel();
        let stdin_pipe = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        tokio::spawn(async move {
            let code = match child.wait().await {
                Ok(s) => s.code().unwrap_or(128),
                Err(_) => 128,
            };
            let _ = tx.send(code);
        });
        Ok(ExecSession {
            stdin: stdin_pipe.map(|p| Box::new(p) as _),
            stdout: stdout.map(|p| Box::new(p) as _),
            stderr: stderr.map(|p| Box::new(p) as _),
            resize: None,
            exit,
        })
    }
}

#[async_trait]
impl PodStreams for HostPod {
    async fn log_source(&self, c: &ContainerRef, previous: bool) -> Result<LogSource, StreamError> {
        self.check(c)?;
        let current = if c.container == "app" { 1 } else { 0 };
        if previous {
            if current == 0 {
                return Err(StreamError::BadRequest(format!(
                    "previous terminated container {:?} in pod {:?} not found",
                    c.container, c.pod
                )));
            }
            return Ok(LogSource {
                path: self.log_path(&c.container, current - 1),
                running: false,
            });
        }
        Ok(LogSource {
            path: self.log_path(&c.container, current),
            running: self.flag(&c.container).load(Ordering::SeqCst),
        })
    }

    async fn still_running(&self, c: &ContainerRef, _path: &Path) -> bool {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.flag(&c.container).load(Ordering::SeqCst)
    }

    async fn exec(
        &self,
        c: &ContainerRef,
        cmd: &[String],
        tty: bool,
        stdin: bool,
    ) -> Result<ExecSession, StreamError> {
        self.check(c)?;
        if tty {
            return spawn_tty(cmd, &self.dir);
        }
        self.spawn(cmd, stdin)
    }

    async fn attach(&self, c: &ContainerRef, stdin: bool) -> Result<ExecSession, StreamError> {
        self.check(c)?;
        // The "container's main process": answers one line.
        self.spawn(
            &["sh".into(), "-c".into(), "read x; echo got:$x".into()],
            stdin,
        )
    }

    async fn port_forward(
        &self,
        namespace: &str,
        pod: &str,
        port: u16,
    ) -> Result<tokio::net::TcpStream, StreamError> {
        if namespace != NS || pod != POD {
            return Err(StreamError::NotFound(format!(
                "pod {namespace}/{pod} is not on this node"
            )));
        }
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| StreamError::Internal(format!("connecting to port {port}: {e}")))
    }
}

/// Runs `cmd` on a new pseudo-terminal (its controlling terminal), as a
/// runtime does for `tty: true`; resizes go to the terminal.
fn spawn_tty(cmd: &[String], dir: &Path) -> Result<ExecSession, StreamError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (mut m, mut sl) = (-1, -1);
    // SAFETY: openpty writes two descriptors; the other pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut m,
            &mut sl,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(StreamError::Internal(format!(
            "openpty: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: both descriptors are new and owned here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(sl)) };
    let mut command = std::process::Command::new(&cmd[0]);
    command
        .args(&cmd[1..])
        .current_dir(dir)
        .env("TERM", "xterm")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| StreamError::Internal(format!("starting {cmd:?}: {e}")))?;
    drop(slave);
    // The resizer keeps its own descriptor of the terminal.
    let resize_fd = master.try_clone().unwrap();
    let reader = std::fs::File::from(master.try_clone().unwrap());
    let writer = std::fs::File::from(master);
    let (tx, exit) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let code = match child.wait().await {
            Ok(s) => s.code().unwrap_or(128),
            Err(_) => 128,
        };
        let _ = tx.send(code);
    });
    let (resize, mut sizes) = tokio::sync::mpsc::channel::<(u16, u16)>(4);
    tokio::spawn(async move {
        while let Some((cols, rows)) = sizes.recv().await {
            let ws = libc::winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
            unsafe { libc::ioctl(resize_fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        }
    });
    Ok(ExecSession {
        stdin: Some(Box::new(tokio::fs::File::from_std(writer))),
        stdout: Some(Box::new(tokio::fs::File::from_std(reader))),
        stderr: None,
        resize: Some(resize),
        exit,
    })
}

/// A TCP echo server on 127.0.0.1 (the pod's "remote port").
fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    port
}

struct Fixture {
    server: Server,
    pod: Arc<HostPod>,
    kubelet: Option<KubeletServer>,
    _pod_dir: tempfile::TempDir,
    _kubelet_dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

impl Fixture {
    fn new() -> Self {
        let server = Server::start();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let pod_dir = tempfile::tempdir().unwrap();
        let kubelet_dir = tempfile::tempdir().unwrap();
        std::fs::write(pod_dir.path().join("app-1.log"), APP_LOG).unwrap();
        std::fs::write(
            pod_dir.path().join("app-0.log"),
            "2024-05-01T09:00:00Z stdout F previous run\n",
        )
        .unwrap();
        std::fs::write(
            pod_dir.path().join("side-0.log"),
            "2024-05-01T10:00:00Z stdout F from the sidecar\n",
        )
        .unwrap();
        std::fs::write(pod_dir.path().join("follower-0.log"), "").unwrap();
        let pod = Arc::new(HostPod {
            dir: pod_dir.path().to_owned(),
            running: Mutex::new(HashMap::new()),
            polls: Default::default(),
        });
        let ca = std::fs::read(server.dir.path().join("tls/ca.crt")).unwrap();
        let kubelet = rt
            .block_on(skep_kubelet::server::serve(
                "127.0.0.1:0".parse().unwrap(),
                &ca,
                kubelet_dir.path(),
                pod.clone(),
            ))
            .unwrap();
        let port = kubelet.local_addr().port();
        let f = Fixture {
            server,
            pod,
            kubelet: Some(kubelet),
            _pod_dir: pod_dir,
            _kubelet_dir: kubelet_dir,
            rt,
        };
        f.create(
            "/api/v1/nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}),
        );
        let status = json!({"status": {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": NODE}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test"}],
        }});
        let out = f.server.curl_admin(&[
            "-X",
            "PATCH",
            "-H",
            "Content-Type: application/merge-patch+json",
            "--data",
            &status.to_string(),
            &f.server.url(&format!("/api/v1/nodes/{NODE}/status")),
        ]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("daemonEndpoints"),
            "patching the node status failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let container = |name: &str| json!({"name": name, "image": "host"});
        f.create(
            &format!("/api/v1/namespaces/{NS}/pods"),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": POD},
                   "spec": {"nodeName": NODE,
                            // The node has no heartbeat: keep the pod there.
                            "tolerations": [{"operator": "Exists"}],
                            "containers": [container("app"), container("side"), container("follower")]}}),
        );
        // What the node's kubelet would report: the pod runs.
        let running = |name: &str| {
            json!({"name": name, "ready": true, "restartCount": 0, "image": "host", "imageID": "",
                                           "state": {"running": {"startedAt": "2024-05-01T10:00:00Z"}}})
        };
        let status = json!({"status": {"phase": "Running", "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [running("app"), running("side"), running("follower")]}});
        let out = f.server.curl_admin(&[
            "-X",
            "PATCH",
            "-H",
            "Content-Type: application/merge-patch+json",
            "--data",
            &status.to_string(),
            &f.server
                .url(&format!("/api/v1/namespaces/{NS}/pods/{POD}/status")),
        ]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("\"Running\""),
            "patching the pod status failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        f
    }

    fn create(&self, path: &str, obj: serde_json::Value) {
        let out = self.server.curl_admin(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data",
            &obj.to_string(),
            "-w",
            "\n%{http_code}",
            &self.server.url(path),
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.ends_with("201"), "creating {path} failed: {text}");
    }

    fn kubelet_port(&self) -> u16 {
        self.kubelet.as_ref().unwrap().local_addr().port()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _guard = self.rt.enter();
        self.kubelet.take();
    }
}

/// Runs kubectl with a deadline (a hung stream must fail the test, not
/// hang it).
fn kubectl(s: &Server, version: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(kubectl_bin(version))
        .arg("--kubeconfig")
        .arg(s.kubeconfig())
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
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).unwrap();
        // Dropping the pipe is stdin's EOF.
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "kubectl {version} {} did not finish within 60 s\nstdout: {}\nstderr: {}\nserver log:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                s.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// kubectl that must succeed; returns stdout.
fn ok(s: &Server, version: &str, args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(s, version, args, stdin);
    assert!(
        out.status.success(),
        "kubectl {version} {} failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn logs(f: &Fixture, v: &str) {
    let s = &f.server;
    assert_eq!(ok(s, v, &["logs", POD, "-c", "app"], None), APP_TEXT);
    // Without -c kubectl picks the first container itself.
    assert_eq!(ok(s, v, &["logs", POD], None), APP_TEXT);
    assert_eq!(
        ok(s, v, &["logs", POD, "-c", "app", "--tail=2"], None),
        "partial joined\nline four\n"
    );
    assert_eq!(
        ok(
            s,
            v,
            &["logs", POD, "-c", "app", "--timestamps", "--tail=1"],
            None
        ),
        "2024-05-01T10:00:03Z line four\n"
    );
    let ts = ok(s, v, &["logs", POD, "-c", "app", "--timestamps"], None);
    assert!(
        ts.starts_with("2024-05-01T10:00:00.000000001Z line one\n2024-05-01T10:00:01.5Z line two"),
        "{ts}"
    );
    assert_eq!(
        ok(
            s,
            v,
            &[
                "logs",
                POD,
                "-c",
                "app",
                "--since-time=2024-05-01T10:00:02Z"
            ],
            None
        ),
        "partial joined\nline four\n"
    );
    assert_eq!(
        ok(s, v, &["logs", POD, "-c", "app", "--limit-bytes=7"], None),
        "line on"
    );
    assert_eq!(
        ok(s, v, &["logs", POD, "-c", "side"], None),
        "from the sidecar\n"
    );
    assert_eq!(
        ok(s, v, &["logs", POD, "-c", "app", "--previous"], None),
        "previous run\n"
    );
    let out = kubectl(s, v, &["logs", POD, "-c", "side", "--previous"], None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("previous terminated container"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kubectl(s, v, &["logs", POD, "-c", "nope"], None);
    assert!(!out.status.success());
}

/// `kubectl logs -f` sees lines appended while it runs and ends by itself
/// when the container stops.
fn follow(f: &Fixture, v: &str) {
    let path = f.pod.log_path("follower", 0);
    std::fs::write(&path, "2024-05-01T10:00:00Z stdout F first\n").unwrap();
    let running = f.pod.flag("follower");
    running.store(true, Ordering::SeqCst);
    let mut child = Command::new(kubectl_bin(v))
        .arg("--kubeconfig")
        .arg(f.server.kubeconfig())
        .args(["logs", "-f", POD, "-c", "follower"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 1024];
        let mut seen_first = None;
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    if seen_first.is_none() && all.starts_with(b"first\n") {
                        seen_first = Some(Instant::now());
                    }
                }
            }
        }
        (all, seen_first)
    });
    std::thread::sleep(Duration::from_millis(800));
    {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(b"2024-05-01T10:00:01Z stdout P sec\n")
            .unwrap();
        file.flush().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        file.write_all(b"2024-05-01T10:00:01Z stdout F ond\n")
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(800));
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"2024-05-01T10:00:02Z stdout F last words\n")
        .unwrap();
    running.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("kubectl {v} logs -f did not end after the container stopped");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (all, seen_first) = reader.join().unwrap();
    assert!(status.success(), "kubectl {v} logs -f: {status}");
    assert_eq!(String::from_utf8_lossy(&all), "first\nsecond\nlast words\n");
    assert!(
        seen_first.is_some(),
        "the first line was not streamed early"
    );
}

fn exec(f: &Fixture, v: &str) {
    let s = &f.server;
    if !matches!(v, "1.27" | "1.28" | "1.29") {
        // kubectl 1.30+ speaks WebSocket v5 (it would fall back to SPDY
        // if the upgrade were refused: make sure it was not).
        let out = kubectl(s, v, &["-v=4", "exec", POD, "--", "true"], None);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && log.contains("The subprotocol is v5.channel.k8s.io"),
            "{log}"
        );
    }
    let out = kubectl(
        s,
        v,
        &[
            "exec",
            POD,
            "-c",
            "app",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
        None,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("err"), "{stderr}");
    assert_eq!(out.status.code(), Some(3), "exit code: {stderr}");
    assert_eq!(
        ok(
            s,
            v,
            &["exec", POD, "-c", "app", "--", "echo", "hello", "world"],
            None
        ),
        "hello world\n"
    );
    // stdin, until EOF.
    let input: String = (0..2000).map(|i| format!("line {i}\n")).collect();
    let upper = ok(
        s,
        v,
        &["exec", "-i", POD, "-c", "app", "--", "tr", "a-z", "A-Z"],
        Some(&input),
    );
    assert_eq!(upper, input.to_uppercase());
    // Default container (kubectl picks the first itself).
    assert_eq!(ok(s, v, &["exec", POD, "--", "true"], None), "");
    let out = kubectl(
        s,
        v,
        &["exec", POD, "-c", "app", "--", "/nonexistent/cmd"],
        None,
    );
    assert!(!out.status.success());
}

fn attach(f: &Fixture, v: &str) {
    let out = ok(
        &f.server,
        v,
        &["attach", "-i", POD, "-c", "app"],
        Some("hello\n"),
    );
    assert!(out.contains("got:hello"), "{out}");
}

fn port_forward(f: &Fixture, v: &str) {
    let remote = echo_server();
    let local = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new(kubectl_bin(v))
        .arg("--kubeconfig")
        .arg(f.server.kubeconfig())
        .args([
            "port-forward",
            "--address",
            "127.0.0.1",
            &format!("pod/{POD}"),
            &format!("{local}:{remote}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut stdout = child.stdout.take().unwrap();
    let mut guard = Kill(child);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains("Forwarding from") {
        assert!(
            Instant::now() < deadline,
            "kubectl port-forward did not start"
        );
        let mut buf = [0u8; 256];
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            let mut err = String::new();
            guard
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("kubectl {v} port-forward exited: {err}");
        }
        seen.extend_from_slice(&buf[..n]);
    }
    for round in 0..3 {
        let mut conn = TcpStream::connect(("127.0.0.1", local)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let msg = format!("ping {round} through kubectl {v}\n").repeat(100);
        conn.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        conn.read_exact(&mut back).unwrap_or_else(|e| {
            panic!("reading the echo through port-forward ({v}, round {round}): {e}")
        });
        assert_eq!(back, msg.as_bytes());
    }
    drop(guard);
}

fn cp(f: &Fixture, v: &str) {
    let src = f.pod.dir.join("report.txt");
    std::fs::write(&src, "copied out of the pod\n").unwrap();
    let dest_dir = tempfile::tempdir().unwrap();
    let dest = dest_dir.path().join("report.txt");
    ok(
        &f.server,
        v,
        &[
            "cp",
            "-c",
            "app",
            &format!("{NS}/{POD}:{}", src.display()),
            &dest.display().to_string(),
        ],
        None,
    );
    assert_eq!(
        std::fs::read_to_string(&dest).unwrap(),
        "copied out of the pod\n"
    );
}

fn everything_with(version: &str) {
    let f = Fixture::new();
    logs(&f, version);
    follow(&f, version);
    exec(&f, version);
    port_forward(&f, version);
    attach(&f, version);
    cp(&f, version);
}

#[test]
fn kubectl_1_27_streams_over_spdy() {
    everything_with("1.27");
}

#[test]
fn kubectl_1_33_streams_over_websockets() {
    everything_with("1.33");
}

/// Only the API server's certificate opens the kubelet endpoint; pods
/// without a node or nodes without an endpoint are clear errors.
#[test]
fn kubelet_refuses_other_callers_and_errors_are_clear() {
    let f = Fixture::new();
    let url = format!(
        "https://127.0.0.1:{}/containerLogs/{NS}/{POD}/app",
        f.kubelet_port()
    );
    // No client certificate.
    let out = Command::new("curl")
        .args([
            "-sk",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
    // A certificate from the cluster CA, but not the API server's.
    let tls = f.server.dir.path().join("tls");
    let work = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(work.path())
            .output()
            .expect("the openssl command is needed (apt package openssl; `cargo xtask setup`)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "u.key",
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        "u.key",
        "-subj",
        "/CN=mallory",
        "-out",
        "u.csr",
    ]);
    std::fs::write(work.path().join("ext.cnf"), "extendedKeyUsage=clientAuth\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "u.csr",
        "-CA",
        &tls.join("ca.crt").display().to_string(),
        "-CAkey",
        &tls.join("ca.key").display().to_string(),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "u.crt",
    ]);
    let out = Command::new("curl")
        .args([
            "-sk",
            "--max-time",
            "10",
            "--cert",
            "u.crt",
            "--key",
            "u.key",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ])
        .current_dir(work.path())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    // The API server's own kubelet-client certificate works.
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "10", "--cert"])
        .arg(tls.join("kubelet-client.crt"))
        .arg("--key")
        .arg(tls.join("kubelet-client.key"))
        .arg(&url)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), APP_TEXT);

    // A pod without a node.
    f.create(
        &format!("/api/v1/namespaces/{NS}/pods"),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "floating"},
               "spec": {"containers": [{"name": "c", "image": "host"}],
                        // Not schedulable here (no ready node matches).
                        "nodeSelector": {"no-such-label": "x"}}}),
    );
    let out = kubectl(&f.server, "1.33", &["logs", "floating"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not have a host assigned"), "{err}");

    // A node whose kubelet is not reachable: an error, not a hang.
    f.create(
        "/api/v1/nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gone"}}),
    );
    let dead_port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let status = json!({"status": {
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": dead_port}},
    }});
    f.server.curl_admin(&[
        "-X",
        "PATCH",
        "-H",
        "Content-Type: application/merge-patch+json",
        "--data",
        &status.to_string(),
        &f.server.url("/api/v1/nodes/gone/status"),
    ]);
    f.create(
        &format!("/api/v1/namespaces/{NS}/pods"),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "orphan"},
               "spec": {"nodeName": "gone", "tolerations": [{"operator": "Exists"}],
                        "containers": [{"name": "c", "image": "host"}]}}),
    );
    let started = Instant::now();
    let out = kubectl(&f.server, "1.33", &["exec", "orphan", "--", "true"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kubelet of node gone"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let out = kubectl(&f.server, "1.33", &["logs", "orphan"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kubelet of node gone"), "{err}");

    // A node that reports no kubelet endpoint.
    f.create(
        "/api/v1/nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "silent"}}),
    );
    f.create(
        &format!("/api/v1/namespaces/{NS}/pods"),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hushed"},
               "spec": {"nodeName": "silent", "tolerations": [{"operator": "Exists"}],
                        "containers": [{"name": "c", "image": "host"}]}}),
    );
    let out = kubectl(&f.server, "1.33", &["logs", "hushed"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not report a kubelet endpoint"), "{err}");

    // RBAC: a user who may read pods but not exec into them.
    let sa_token = {
        f.create(
            &format!("/api/v1/namespaces/{NS}/serviceaccounts"),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}}),
        );
        f.create(
            &format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles"),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "reader"},
                   "rules": [{"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]}]}),
        );
        f.create(
            &format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings"),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "reader"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
                   "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": NS}]}),
        );
        ok(&f.server, "1.33", &["create", "token", "reader"], None)
            .trim()
            .to_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = kubectl(
            &f.server,
            "1.33",
            &["--token", &sa_token, "logs", POD, "-c", "side"],
            None,
        );
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout), "from the sidecar\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reader cannot read logs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = kubectl(
        &f.server,
        "1.33",
        &["--token", &sa_token, "exec", POD, "-c", "app", "--", "true"],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("forbidden") || err.contains("Forbidden"),
        "{err}"
    );
}

/// The Python `kubernetes` client's `stream()` exec (WebSocket
/// `v4.channel.k8s.io`): output, stdin and the exit code; and its
/// `portforward()`.
const PYTHON_EXEC: &str = r#"
import sys
from kubernetes import client, config
from kubernetes.stream import stream
config.load_kube_config(sys.argv[1])
api = client.CoreV1Api()
out = stream(api.connect_get_namespaced_pod_exec, "web", "default", container="app",
             command=["sh", "-c", "echo py-out; echo py-err >&2"],
             stderr=True, stdin=False, stdout=True, tty=False)
print("OUT:" + repr(out))
resp = stream(api.connect_get_namespaced_pod_exec, "web", "default", container="app",
              command=["sh", "-c", "read x; echo got:$x; exit 4"],
              stderr=True, stdin=True, stdout=True, tty=False, _preload_content=False)
resp.write_stdin("hi\n")
resp.run_forever(timeout=20)
print("STDOUT:" + repr(resp.read_stdout()))
print("CODE:" + str(resp.returncode))
resp.close()
from kubernetes.stream import portforward
port = int(sys.argv[2])
pf = portforward(api.connect_get_namespaced_pod_portforward, "web", "default", ports=str(port))
sock = pf.socket(port)
sock.setblocking(True)
sock.settimeout(20)
sock.sendall(b"hello pf\n")
data = b""
while len(data) < 9:
    chunk = sock.recv(1024)
    if not chunk:
        break
    data += chunk
print("PF:" + repr(data))
sock.close()
"#;

#[test]
fn python_client_exec_and_port_forward() {
    common::require_python_kubernetes();
    let f = Fixture::new();
    let out = Command::new("timeout")
        .args(["60", "python3", "-c", PYTHON_EXEC])
        .arg(f.server.kubeconfig())
        .arg(echo_server().to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python stream() failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("py-out") && stdout.contains("py-err"),
        "{stdout}"
    );
    assert!(stdout.contains("STDOUT:'got:hi\\n'"), "{stdout}");
    assert!(stdout.contains("CODE:4"), "{stdout}");
    // portforward() (WebSocket v4.channel.k8s.io, ?ports=).
    assert!(stdout.contains("PF:b'hello pf\\n'"), "{stdout}");
}

/// `kubectl exec -it` (run under `script` so kubectl has a terminal): the
/// command gets a terminal of its own, with the client's size.
fn exec_tty(f: &Fixture, v: &str) {
    let kubectl = format!(
        "stty cols 100 rows 30; {} --kubeconfig {} exec -it {POD} -c app -- sh -c 'tty; sleep 1; stty size'",
        kubectl_bin(v).display(),
        f.server.kubeconfig().display()
    );
    let out = Command::new("timeout")
        .args(["60", "script", "-qec", &kubectl, "/dev/null"])
        .stdin(Stdio::piped())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl {v} exec -it: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("/dev/pts/"), "no terminal in the pod: {text}");
    // kubectl sent its terminal's size (resize stream / channel 4).
    assert!(
        text.contains("30 100"),
        "the terminal size did not arrive: {text}"
    );
}

#[test]
fn exec_with_a_terminal() {
    let f = Fixture::new();
    exec_tty(&f, "1.27");
    exec_tty(&f, "1.33");
}

/// The kubectl versions around the protocol changes: 1.29 (SPDY only),
/// 1.30 (WebSocket exec, SPDY port-forward), 1.31 (tunnelled
/// port-forward).
#[test]
fn kubectl_versions_around_the_protocol_switch() {
    let f = Fixture::new();
    for v in ["1.29", "1.30", "1.31"] {
        exec(&f, v);
        port_forward(&f, v);
        cp(&f, v);
    }
}
