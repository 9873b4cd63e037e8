//! The built-in `process` runtime, for real (root): containers from the
//! host image, a directory and a docker-save tarball, each in a fresh
//! network namespace, with real cgroups, shims and `skep __exec`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use skep_dataplane::NetNs;
use skep_kubelet::runtime::{
    ContainerLabels, ContainerSpec, ContainerState, Mount, Resources, Runtime,
    process::{ProcessRuntime, ProcessRuntimeConfig},
};
use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SKEP: &str = env!("CARGO_BIN_EXE_skep");
const BUSYBOX: &str = "/bin/busybox";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// One runtime on a temporary state directory, a fresh network namespace
/// and a private cgroup parent; everything goes on drop (even on panic).
struct Env {
    rt: ProcessRuntime,
    cfg: ProcessRuntimeConfig,
    netns: NetNs,
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        assert!(
            nix_is_root(),
            "these tests need root (namespaces, mounts, cgroups)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let cfg = ProcessRuntimeConfig {
            state_dir: tmp.path().join("containers"),
            image_cache: tmp.path().join("images"),
            shim_exe: PathBuf::from(SKEP),
            cgroup_parent: unique("skep-test-"),
            log_rotation: Default::default(),
        };
        let rt = ProcessRuntime::new(cfg.clone()).unwrap();
        let netns = NetNs::create(&unique("skrt")).unwrap();
        Self {
            rt,
            cfg,
            netns,
            tmp,
        }
    }

    fn spec(&self, command: &[&str]) -> ContainerSpec {
        let name = unique("c");
        ContainerSpec {
            labels: ContainerLabels {
                pod_uid: unique("pod-uid-"),
                pod_namespace: "default".into(),
                pod_name: "test-pod".into(),
                container_name: name.clone(),
                attempt: 0,
                init: false,
            },
            image: "host".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: vec![],
            env: vec![(
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            )],
            working_dir: None,
            mounts: vec![],
            netns: Some(self.netns.path().to_path_buf()),
            hostname: "test-pod".into(),
            run_as_user: None,
            run_as_group: None,
            supplemental_groups: vec![],
            resources: Resources::default(),
            stdin: false,
            stdin_once: false,
            tty: false,
            log_path: self.tmp.path().join("logs").join(format!("{name}.log")),
        }
    }

    async fn state(&self, id: &str) -> ContainerState {
        self.rt
            .list()
            .await
            .unwrap()
            .into_iter()
            .find(|c| c.id == id)
            .unwrap_or_else(|| panic!("container {id} not listed"))
            .state
    }

    /// Waits for the container to exit; returns (exit code, reason, message).
    async fn wait_exit(&self, id: &str, timeout: Duration) -> (i32, String, Option<String>) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.state(id).await {
                ContainerState::Exited {
                    exit_code,
                    reason,
                    message,
                    ..
                } => return (exit_code, reason, message),
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "container {id} still {other:?} after {timeout:?}; shim log: {}",
                        self.shim_log(id)
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn shim_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.cfg.state_dir.join(id).join("shim.log")).unwrap_or_default()
    }

    /// Runs a container to completion and returns (exit code, reason, stdout text).
    async fn run(&self, spec: &ContainerSpec) -> (i32, String, String) {
        let id = self.rt.start(spec).await.unwrap();
        let (code, reason, message) = self.wait_exit(&id, Duration::from_secs(30)).await;
        let out = stdout_text(&spec.log_path);
        assert!(
            message.is_none() || reason == "StartError",
            "unexpected message {message:?}"
        );
        (code, reason, out)
    }

    /// Waits for a log line containing `needle`.
    async fn wait_log(&self, spec: &ContainerSpec, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !stdout_text(&spec.log_path).contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log: {:?}",
                std::fs::read_to_string(&spec.log_path).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Kill whatever still runs, then drop the cgroups.
        if let Ok(dirs) = std::fs::read_dir(&self.cfg.state_dir) {
            for d in dirs.flatten() {
                let Ok(state) = std::fs::read(d.path().join("state.json")) else {
                    continue;
                };
                let state: serde_json::Value = serde_json::from_slice(&state).unwrap_or_default();
                if state["exit"].is_null()
                    && let Some(pid) = state["pid"].as_i64()
                {
                    // SAFETY: plain kill(2).
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
        for controller in ["memory", "cpu", "pids", "cpuacct"] {
            let root = Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(&self.cfg.cgroup_parent);
            remove_cgroup_tree(&root);
        }
        let unified = Path::new("/sys/fs/cgroup").join(&self.cfg.cgroup_parent);
        remove_cgroup_tree(&unified);
        // Hybrid hosts: the containers' cgroup v2 dirs (for the mesh capture).
        remove_cgroup_tree(&Path::new("/sys/fs/cgroup/unified").join(&self.cfg.cgroup_parent));
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// (stream, tag, text) of every record of a CRI log file.
fn log_records(path: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let mut parts = l.splitn(4, ' ');
            let time = parts.next().unwrap();
            // RFC 3339 in UTC with nanoseconds: 2026-01-02T03:04:05.123456789Z
            assert!(
                time.len() == 30
                    && time.as_bytes()[10] == b'T'
                    && time.as_bytes()[19] == b'.'
                    && time.ends_with('Z'),
                "bad timestamp in {l:?}"
            );
            (
                parts.next().unwrap().to_owned(),
                parts.next().unwrap().to_owned(),
                parts.next().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn stdout_text(path: &Path) -> String {
    log_records(path)
        .into_iter()
        .filter(|(s, _, _)| s == "stdout")
        .map(|(_, _, t)| t + "\n")
        .collect()
}

async fn read_all(r: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>) -> String {
    let mut out = String::new();
    if let Some(mut r) = r {
        r.read_to_string(&mut out).await.unwrap();
    }
    out
}

#[tokio::test]
async fn exit_code_and_cri_logs() {
    let env = Env::new();
    let spec = env.spec(&["sh", "-c", "echo hi; echo err >&2; exit 3"]);
    let (code, reason, _) = env.run(&spec).await;
    assert_eq!((code, reason.as_str()), (3, "Error"));
    let records = log_records(&spec.log_path);
    assert!(
        records.contains(&("stdout".into(), "F".into(), "hi".into())),
        "{records:?}"
    );
    assert!(
        records.contains(&("stderr".into(), "F".into(), "err".into())),
        "{records:?}"
    );

    let spec = env.spec(&["true"]);
    let (code, reason, _) = env.run(&spec).await;
    assert_eq!((code, reason.as_str()), (0, "Completed"));
}

#[tokio::test]
async fn namespaces_hostname_and_filesystem() {
    let env = Env::new();
    let spec = env.spec(&[
        "sh",
        "-c",
        "echo pid=$$; echo host=$(hostname); cat /proc/net/dev; \
         touch /etc/skep-test 2>/dev/null && echo etc=writable || echo etc=ro; \
         touch /tmp/x && echo tmp=ok; ls /run | wc -l | sed 's/^/run=/'; \
         test -x /.skep/skep && echo skep=yes",
    ]);
    let (code, reason, out) = env.run(&spec).await;
    assert_eq!((code, reason.as_str()), (0, "Completed"), "{out}");
    assert!(out.contains("pid=1\n"), "{out}");
    assert!(out.contains("host=test-pod\n"), "{out}");
    assert!(out.contains("etc=ro\n"), "{out}");
    assert!(out.contains("tmp=ok\n"), "{out}");
    assert!(out.contains("run=0\n"), "{out}");
    assert!(out.contains("skep=yes\n"), "{out}");
    // /proc/net/dev: two header lines, then only lo.
    let devices: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(':') && !l.contains('|') && !l.contains('='))
        .map(|l| l.split(':').next().unwrap().trim())
        .collect();
    assert_eq!(devices, vec!["lo"], "{out}");
    assert!(!Path::new("/etc/skep-test").exists());
}

#[tokio::test]
async fn missing_command_is_a_start_error() {
    let env = Env::new();
    let spec = env.spec(&["no-such-command-skep"]);
    let id = env.rt.start(&spec).await.unwrap();
    let (code, reason, message) = env.wait_exit(&id, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (128, "StartError"));
    assert_eq!(
        message.as_deref(),
        Some(r#"exec: "no-such-command-skep": executable file not found in $PATH"#)
    );

    let spec = env.spec(&[]);
    let id = env.rt.start(&spec).await.unwrap();
    let (_, reason, message) = env.wait_exit(&id, Duration::from_secs(5)).await;
    assert_eq!(reason, "StartError");
    assert_eq!(message.as_deref(), Some("no command specified"));
    env.rt.remove(&id).await.unwrap();
    assert!(env.rt.list().await.unwrap().iter().all(|c| c.id != id));
}

#[tokio::test]
async fn missing_image_is_an_image_error() {
    let env = Env::new();
    let mut spec = env.spec(&["true"]);
    spec.image = "/no/such/image.tar".into();
    let err = env.rt.start(&spec).await.unwrap_err();
    assert!(
        matches!(err, skep_kubelet::runtime::RuntimeError::Image { .. }),
        "{err}"
    );
    assert!(env.rt.ensure_image("/no/such/image.tar").await.is_err());
    assert!(env.rt.image_config("/no/such/image.tar").await.is_err());
    let host = env.rt.image_config("host").await.unwrap();
    assert!(host.entrypoint.is_empty() && host.cmd.is_empty());
    assert_eq!(host.env.len(), 1);
    assert_eq!(host.env[0].0, "PATH");
    assert!(
        env.rt
            .ensure_image("host")
            .await
            .unwrap()
            .starts_with("sha256:")
    );
}

#[tokio::test]
async fn memory_limit_oom_kills() {
    let env = Env::new();
    let mut spec = env.spec(&[
        "sh",
        "-c",
        "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived",
    ]);
    spec.resources.memory_limit_bytes = Some(32 << 20);
    let (code, reason, out) = env.run(&spec).await;
    assert_eq!((code, reason.as_str()), (137, "OOMKilled"), "{out}");
}

#[tokio::test]
async fn cpu_and_memory_limits_are_written() {
    let env = Env::new();
    let mut spec = env.spec(&["sleep", "1000"]);
    spec.resources = Resources {
        cpu_limit_millis: Some(250),
        cpu_request_millis: Some(100),
        memory_limit_bytes: Some(64 << 20),
    };
    let id = env.rt.start(&spec).await.unwrap();
    let rel = Path::new(&env.cfg.cgroup_parent)
        .join(&spec.labels.pod_uid)
        .join(&id);
    let cpu = Path::new("/sys/fs/cgroup/cpu").join(&rel);
    let mem = Path::new("/sys/fs/cgroup/memory").join(&rel);
    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap().trim().to_owned();
    assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "25000");
    assert_eq!(read(cpu.join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(cpu.join("cpu.shares")), "102");
    assert_eq!(
        read(mem.join("memory.limit_in_bytes")),
        (64u64 << 20).to_string()
    );
    // The container's PID 1 is in it.
    let procs = read(mem.join("cgroup.procs"));
    assert!(!procs.is_empty(), "no process in {}", mem.display());
    env.rt.stop(&id, Duration::from_secs(1)).await.unwrap();
    env.rt.remove(&id).await.unwrap();
    assert!(!cpu.exists() && !mem.exists(), "cgroup left behind");
}

#[tokio::test]
async fn stop_honours_grace() {
    let env = Env::new();
    // Handles TERM: exits at once, with its own status.
    let spec = env.spec(&[
        "sh",
        "-c",
        "trap 'echo bye; exit 0' TERM; echo ready; while true; do sleep 0.1; done",
    ]);
    let id = env.rt.start(&spec).await.unwrap();
    env.wait_log(&spec, "ready").await;
    let t = Instant::now();
    env.rt.stop(&id, Duration::from_secs(20)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let (code, reason, _) = env.wait_exit(&id, Duration::from_secs(1)).await;
    assert_eq!((code, reason.as_str()), (0, "Completed"));
    assert!(stdout_text(&spec.log_path).contains("bye"));

    // PID 1 without a TERM handler ignores it: killed after the grace.
    let spec = env.spec(&["sleep", "1000"]);
    let id = env.rt.start(&spec).await.unwrap();
    let t = Instant::now();
    env.rt.stop(&id, Duration::from_secs(1)).await.unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(6),
        "{took:?}"
    );
    let (code, reason, _) = env.wait_exit(&id, Duration::from_secs(1)).await;
    assert_eq!((code, reason.as_str()), (137, "Error"));
    // Stopping an exited container is a no-op.
    env.rt.stop(&id, Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn env_working_dir_and_mounts() {
    let env = Env::new();
    let data = env.tmp.path().join("data");
    let ro = env.tmp.path().join("ro");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("in"), "from-host\n").unwrap();
    let mut spec = env.spec(&[
        "sh",
        "-c",
        "echo foo=$FOO; pwd; echo hello > out; \
         touch /ro/x 2>/dev/null && echo ro=writable || echo ro=ro; cat /ro/in",
    ]);
    spec.env.push(("FOO".into(), "bar baz".into()));
    spec.working_dir = Some("/data".into());
    spec.mounts = vec![
        Mount {
            host_path: data.clone(),
            container_path: "/data".into(),
            read_only: false,
        },
        Mount {
            host_path: ro.clone(),
            container_path: "/ro".into(),
            read_only: true,
        },
    ];
    let (code, reason, out) = env.run(&spec).await;
    assert_eq!((code, reason.as_str()), (0, "Completed"), "{out}");
    assert!(out.contains("foo=bar baz\n"), "{out}");
    assert!(out.contains("/data\n"), "{out}");
    assert!(out.contains("ro=ro\n"), "{out}");
    assert!(out.contains("from-host\n"), "{out}");
    assert_eq!(
        std::fs::read_to_string(data.join("out")).unwrap(),
        "hello\n"
    );
    assert!(!ro.join("x").exists());

    // What the pod manager mounts in every pod: files over existing ones
    // in the read-only /etc, the token below the /var/run -> /run symlink.
    let pod_dir = env.tmp.path().join("pod");
    let token_dir = pod_dir.join("token");
    std::fs::create_dir_all(&token_dir).unwrap();
    std::fs::write(token_dir.join("token"), "secret-token").unwrap();
    std::fs::write(pod_dir.join("hosts"), "10.42.0.9 test-pod\n").unwrap();
    let mut spec = env.spec(&[
        "sh",
        "-c",
        "cat /var/run/secrets/kubernetes.io/serviceaccount/token; echo; cat /etc/hosts",
    ]);
    spec.mounts = vec![
        Mount {
            host_path: token_dir,
            container_path: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
            read_only: true,
        },
        Mount {
            host_path: pod_dir.join("hosts"),
            container_path: "/etc/hosts".into(),
            read_only: false,
        },
    ];
    let (code, reason, out) = env.run(&spec).await;
    assert_eq!((code, reason.as_str()), (0, "Completed"), "{out}");
    assert_eq!(out, "secret-token\n10.42.0.9 test-pod\n");

    // A mount point that cannot be created in the read-only host image.
    let mut spec = env.spec(&["true"]);
    spec.mounts = vec![Mount {
        host_path: data.clone(),
        container_path: "/etc/skep-no-such-dir".into(),
        read_only: false,
    }];
    let id = env.rt.start(&spec).await.unwrap();
    let (code, reason, message) = env.wait_exit(&id, Duration::from_secs(10)).await;
    assert_eq!((code, reason.as_str()), (128, "StartError"));
    let message = message.unwrap();
    assert!(
        message.contains("/etc/skep-no-such-dir") && message.contains("read-only"),
        "{message}"
    );
}

#[tokio::test]
async fn readopted_after_runtime_restart() {
    let env = Env::new();
    let spec = env.spec(&["sleep", "1000"]);
    let id = env.rt.start(&spec).await.unwrap();
    assert!(matches!(
        env.state(&id).await,
        ContainerState::Running { .. }
    ));
    // A new runtime (an agent restart) on the same state directory.
    let rt2 = ProcessRuntime::new(env.cfg.clone()).unwrap();
    let listed = rt2.list().await.unwrap();
    let c = listed.iter().find(|c| c.id == id).expect("re-adopted");
    assert!(matches!(c.state, ContainerState::Running { .. }), "{c:?}");
    assert_eq!(c.labels, spec.labels);
    assert!(
        c.image_id.starts_with("process://sha256:"),
        "{}",
        c.image_id
    );
    rt2.stop(&id, Duration::from_millis(200)).await.unwrap();
    let (code, _, _) = env.wait_exit(&id, Duration::from_secs(1)).await;
    assert_eq!(code, 137);
}

#[tokio::test]
async fn exec_in_a_running_container() {
    let env = Env::new();
    let mut spec = env.spec(&["sleep", "1000"]);
    spec.env.push(("GREETING".into(), "hello".into()));
    spec.working_dir = Some("/tmp".into());
    let id = env.rt.start(&spec).await.unwrap();

    let cmd: Vec<String> = ["sh", "-c", "echo pid=$$ host=$(hostname) g=$GREETING cwd=$(pwd); cat /proc/net/dev | grep -c :; echo oops >&2; exit 7"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let s = env.rt.exec(&id, &cmd, false, false).await.unwrap();
    let (out, err) = tokio::join!(read_all(s.stdout), read_all(s.stderr));
    let code = s.exit.await.unwrap();
    assert_eq!(code, 7, "stdout {out:?} stderr {err:?}");
    let first = out.lines().next().unwrap();
    assert!(!first.starts_with("pid=1 "), "{out}");
    assert!(first.contains("host=test-pod g=hello cwd=/tmp"), "{out}");
    // Only lo (plus the header line with ':'? no: headers have '|').
    assert_eq!(out.lines().nth(1), Some("1"), "{out}");
    assert_eq!(err, "oops\n");

    // stdin
    let cmd = vec!["cat".to_string()];
    let mut s = env.rt.exec(&id, &cmd, false, true).await.unwrap();
    let mut stdin = s.stdin.take().unwrap();
    stdin.write_all(b"through stdin\n").await.unwrap();
    stdin.shutdown().await.unwrap();
    drop(stdin);
    assert_eq!(read_all(s.stdout.take()).await, "through stdin\n");
    assert_eq!(s.exit.await.unwrap(), 0);

    // A command that does not exist.
    let cmd = vec!["no-such-command-skep".to_string()];
    let s = env.rt.exec(&id, &cmd, false, false).await.unwrap();
    let err = read_all(s.stderr).await;
    assert_eq!(s.exit.await.unwrap(), 127, "{err}");
    assert!(err.contains("executable file not found"), "{err}");

    // tty: one terminal for both streams.
    let cmd: Vec<String> = ["sh", "-c", "test -t 0 && test -t 1 && echo is-a-tty"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let s = env.rt.exec(&id, &cmd, true, false).await.unwrap();
    assert!(s.stderr.is_none() && s.resize.is_some());
    let out = read_all(s.stdout).await;
    assert_eq!(s.exit.await.unwrap(), 0, "{out}");
    assert!(out.contains("is-a-tty"), "{out:?}");

    env.rt.stop(&id, Duration::ZERO).await.unwrap();
    assert!(env.rt.exec(&id, &cmd, false, false).await.is_err());
}

/// A docker-save tarball with one layer: busybox and its applet symlinks.
fn busybox_tarball(dir: &Path) -> PathBuf {
    assert!(
        Path::new(BUSYBOX).is_file(),
        "{BUSYBOX} is missing: install Debian's busybox-static (cargo xtask setup)"
    );
    let layer_root = dir.join("layer-root");
    std::fs::create_dir_all(layer_root.join("bin")).unwrap();
    std::fs::create_dir_all(layer_root.join("tmp")).unwrap();
    std::fs::copy(BUSYBOX, layer_root.join("bin/busybox")).unwrap();
    for applet in ["sh", "ls", "echo", "cat", "touch", "hostname", "sleep"] {
        std::os::unix::fs::symlink("busybox", layer_root.join("bin").join(applet)).unwrap();
    }
    let image = dir.join("image");
    std::fs::create_dir_all(image.join("layer1")).unwrap();
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&layer_root)
        .arg("-cf")
        .arg(image.join("layer1/layer.tar"))
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(
        image.join("config.json"),
        r#"{"config":{"Env":["PATH=/bin"],"Cmd":["sh","-c","echo default-cmd"],"WorkingDir":"/tmp"}}"#,
    )
    .unwrap();
    std::fs::write(
        image.join("manifest.json"),
        r#"[{"Config":"config.json","RepoTags":["busybox:test"],"Layers":["layer1/layer.tar"]}]"#,
    )
    .unwrap();
    let tarball = dir.join("busybox.tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&image)
        .arg("-cf")
        .arg(&tarball)
        .arg("manifest.json")
        .arg("config.json")
        .arg("layer1")
        .status()
        .unwrap();
    assert!(status.success());
    tarball
}

#[tokio::test]
async fn tarball_and_directory_images() {
    let env = Env::new();
    let tarball = busybox_tarball(env.tmp.path());
    let image = tarball.to_str().unwrap().to_owned();
    let id = env.rt.ensure_image(&image).await.unwrap();
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
    let config = env.rt.image_config(&image).await.unwrap();
    assert_eq!(config.cmd, vec!["sh", "-c", "echo default-cmd"]);
    assert_eq!(config.working_dir.as_deref(), Some("/tmp"));

    let mut spec = env.spec(&[
        "sh",
        "-c",
        "ls /; echo written > /newfile; cat /newfile; pwd; echo ok",
    ]);
    spec.image = image.clone();
    spec.env = vec![("PATH".into(), "/bin".into())];
    let (code, reason, out) = env.run(&spec).await;
    assert_eq!((code, reason.as_str()), (0, "Completed"), "{out}");
    assert!(out.starts_with("bin\n"), "{out}");
    assert!(out.ends_with("written\n/tmp\nok\n"), "{out}");
    let rootfs = env
        .cfg
        .image_cache
        .join(id.trim_start_matches("sha256:"))
        .join("rootfs");
    assert!(rootfs.join("bin/busybox").is_file());
    assert!(!rootfs.join("newfile").exists(), "the cache was modified");

    // No command: the image's Cmd.
    let mut spec = env.spec(&[]);
    spec.image = image.clone();
    spec.env = vec![("PATH".into(), "/bin".into())];
    let (code, _, out) = env.run(&spec).await;
    assert_eq!(code, 0);
    assert_eq!(out, "default-cmd\n");

    // The unpacked rootfs as a directory image.
    let mut spec = env.spec(&["sh", "-c", "echo dir > /f; cat /f"]);
    spec.image = rootfs.to_str().unwrap().to_owned();
    spec.env = vec![("PATH".into(), "/bin".into())];
    let (code, _, out) = env.run(&spec).await;
    assert_eq!((code, out.as_str()), (0, "dir\n"));
    assert!(
        !rootfs.join("f").exists(),
        "the directory image was modified"
    );
}

#[tokio::test]
async fn skep_tools_serve_with_the_host_image() {
    let env = Env::new();
    let spec = env.spec(&["skep", "tools", "serve", "--http", "8080"]);
    let id = env.rt.start(&spec).await.unwrap();
    // Probe from inside the container (the exec'd skep is the same binary).
    let cmd: Vec<String> = ["/.skep/skep", "tools", "probe", "http", "127.0.0.1:8080"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = env.rt.exec(&id, &cmd, false, false).await.unwrap();
        let (out, err) = tokio::join!(read_all(s.stdout), read_all(s.stderr));
        let code = s.exit.await.unwrap();
        if code == 0 {
            assert!(out.contains("test-pod"), "{out}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "probe failed: {out} {err}; container {:?}; log {:?}",
            env.state(&id).await,
            std::fs::read_to_string(&spec.log_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And from the namespace, without the container's help.
    let answer = env
        .netns
        .run(|| {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect("127.0.0.1:8080").unwrap();
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .unwrap();
    assert!(answer.contains("test-pod"), "{answer}");
    env.rt.stop(&id, Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn attach_follows_output_and_feeds_stdin() {
    let env = Env::new();
    let mut spec = env.spec(&[
        "sh",
        "-c",
        "echo ready; read line; echo got=$line; echo e >&2",
    ]);
    spec.stdin = true;
    let id = env.rt.start(&spec).await.unwrap();
    env.wait_log(&spec, "ready").await;
    let mut s = env.rt.attach(&id, true).await.unwrap();
    let mut stdin = s.stdin.take().unwrap();
    stdin.write_all(b"value\n").await.unwrap();
    let (out, err) = tokio::join!(read_all(s.stdout.take()), read_all(s.stderr.take()));
    assert_eq!(out, "got=value\n");
    assert_eq!(err, "e\n");
    assert_eq!(s.exit.await.unwrap(), 0);
}

fn sha256_file(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// Writes `path` into `blobs/sha256/` of an OCI layout; returns its digest.
fn add_blob(layout: &Path, path: &Path) -> String {
    let hex = sha256_file(path);
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::copy(path, blobs.join(&hex)).unwrap();
    format!("sha256:{hex}")
}

fn tar_dir(dir: &Path, out: &Path, gzip: bool) {
    let status = std::process::Command::new("tar")
        .arg(if gzip { "-czf" } else { "-cf" })
        .arg(out)
        .arg("-C")
        .arg(dir)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn oci_layout_with_gzip_layers_and_whiteouts() {
    let env = Env::new();
    assert!(
        Path::new(BUSYBOX).is_file(),
        "{BUSYBOX} is missing: install busybox-static"
    );
    let work = env.tmp.path().join("oci-build");
    // Layer 1 (gzip): busybox, /etc/old, /etc/keep, /dir/a.
    let l1 = work.join("l1");
    for d in ["bin", "etc", "dir"] {
        std::fs::create_dir_all(l1.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, l1.join("bin/busybox")).unwrap();
    for applet in ["sh", "ls"] {
        std::os::unix::fs::symlink("busybox", l1.join("bin").join(applet)).unwrap();
    }
    std::fs::write(l1.join("etc/old"), "old").unwrap();
    std::fs::write(l1.join("etc/keep"), "keep").unwrap();
    std::fs::write(l1.join("dir/a"), "a").unwrap();
    // Layer 2 (plain): whiteout of /etc/old, /dir made opaque, /dir/b.
    let l2 = work.join("l2");
    for d in ["etc", "dir"] {
        std::fs::create_dir_all(l2.join(d)).unwrap();
    }
    std::fs::write(l2.join("etc/.wh.old"), "").unwrap();
    std::fs::write(l2.join("dir/.wh..wh..opq"), "").unwrap();
    std::fs::write(l2.join("dir/b"), "b").unwrap();
    let layout = work.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    tar_dir(&l1, &work.join("l1.tar.gz"), true);
    tar_dir(&l2, &work.join("l2.tar"), false);
    let d1 = add_blob(&layout, &work.join("l1.tar.gz"));
    let d2 = add_blob(&layout, &work.join("l2.tar"));
    std::fs::write(
        work.join("config.json"),
        r#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/sh","-c"],"Cmd":["ls /etc /dir"],"Env":["PATH=/bin"]}}"#,
    )
    .unwrap();
    let dc = add_blob(&layout, &work.join("config.json"));
    std::fs::write(
        work.join("manifest.json"),
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{dc}","size":1}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d1}","size":1}},{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d2}","size":1}}]}}"#
        ),
    )
    .unwrap();
    let dm = add_blob(&layout, &work.join("manifest.json"));
    std::fs::write(
        layout.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{dm}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        ),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let tarball = env.tmp.path().join("oci.tar");
    tar_dir(&layout, &tarball, false);

    let image = tarball.to_str().unwrap().to_owned();
    let id = env.rt.ensure_image(&image).await.unwrap();
    let config = env.rt.image_config(&image).await.unwrap();
    assert_eq!(config.entrypoint, vec!["/bin/sh", "-c"]);
    assert_eq!(config.env, vec![("PATH".to_string(), "/bin".to_string())]);
    let rootfs = env
        .cfg
        .image_cache
        .join(id.trim_start_matches("sha256:"))
        .join("rootfs");
    assert!(rootfs.join("etc/keep").is_file());
    assert!(!rootfs.join("etc/old").exists(), "whiteout not applied");
    assert!(
        !rootfs.join("dir/a").exists(),
        "opaque directory not applied"
    );
    assert!(rootfs.join("dir/b").is_file());
    // No temporary directories left in the cache.
    let leftovers: Vec<_> = std::fs::read_dir(&env.cfg.image_cache)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let mut spec = env.spec(&[]);
    spec.image = image;
    spec.command = config.entrypoint.clone();
    spec.args = config.cmd.clone();
    spec.env = vec![("PATH".into(), "/bin".into())];
    let (code, _, out) = env.run(&spec).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "/dir:\nb\n\n/etc:\nkeep\n");
}

#[tokio::test]
async fn tty_container_attach() {
    let env = Env::new();
    let mut spec = env.spec(&[
        "sh",
        "-c",
        "test -t 0 && test -t 1 && echo tty-ok; read x; echo got=$x",
    ]);
    spec.tty = true;
    spec.stdin = true;
    let id = env.rt.start(&spec).await.unwrap();
    env.wait_log(&spec, "tty-ok").await;
    let mut s = env.rt.attach(&id, true).await.unwrap();
    assert!(s.stderr.is_none());
    s.resize.as_ref().unwrap().send((100, 40)).await.unwrap();
    let mut stdin = s.stdin.take().unwrap();
    stdin.write_all(b"value\n").await.unwrap();
    let out = read_all(s.stdout.take()).await;
    assert!(out.contains("got=value"), "{out:?}");
    assert_eq!(s.exit.await.unwrap(), 0);
    assert!(stdout_text(&spec.log_path).contains("got=value"));
}

#[tokio::test]
async fn host_network_and_executables_from_mounts() {
    let env = Env::new();
    // hostNetwork: the node's interfaces are visible.
    let mut spec = env.spec(&["sh", "-c", "grep -c : /proc/net/dev"]);
    spec.netns = None;
    let (code, _, out) = env.run(&spec).await;
    assert_eq!(code, 0);
    let count: u32 = out.trim().parse().unwrap();
    assert!(
        count >= 2,
        "only {count} interfaces on the host network: {out}"
    );

    // An executable that only exists in a mounted volume.
    let bin = env.tmp.path().join("vol-bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("hello-tool"), "#!/bin/sh\necho from-volume\n").unwrap();
    let status = std::process::Command::new("chmod")
        .arg("755")
        .arg(bin.join("hello-tool"))
        .status()
        .unwrap();
    assert!(status.success());
    let mut spec = env.spec(&["hello-tool"]);
    // A new top-level directory: the host image's root can take it.
    spec.env = vec![("PATH".into(), "/tools:/bin".into())];
    spec.mounts = vec![Mount {
        host_path: bin,
        container_path: "/tools".into(),
        read_only: true,
    }];
    let (code, reason, out) = env.run(&spec).await;
    assert_eq!(
        (code, reason.as_str(), out.as_str()),
        (0, "Completed", "from-volume\n")
    );
}

#[tokio::test]
async fn stdin_once_ends_input_when_the_attach_closes() {
    let env = Env::new();
    let mut spec = env.spec(&["sh", "-c", "echo ready; cat; echo stdin-closed"]);
    spec.stdin = true;
    spec.stdin_once = true;
    let id = env.rt.start(&spec).await.unwrap();
    env.wait_log(&spec, "ready").await;
    let mut s = env.rt.attach(&id, true).await.unwrap();
    let mut stdin = s.stdin.take().unwrap();
    stdin.write_all(b"line one\nline two\n").await.unwrap();
    drop(stdin);
    let (out, err) = tokio::join!(read_all(s.stdout.take()), read_all(s.stderr.take()));
    assert_eq!(out, "line one\nline two\nstdin-closed\n");
    assert_eq!(err, "");
    assert_eq!(s.exit.await.unwrap(), 0);

    // Without stdinOnce a closed attach leaves stdin open for the next.
    let mut spec = env.spec(&["sh", "-c", "echo ready; read a; read b; echo $a-$b"]);
    spec.stdin = true;
    let id = env.rt.start(&spec).await.unwrap();
    env.wait_log(&spec, "ready").await;
    for word in ["first", "second"] {
        let mut s = env.rt.attach(&id, true).await.unwrap();
        let mut stdin = s.stdin.take().unwrap();
        stdin
            .write_all(format!("{word}\n").as_bytes())
            .await
            .unwrap();
        drop(stdin);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, _, _) = env.wait_exit(&id, Duration::from_secs(10)).await;
    assert_eq!(code, 0);
    assert!(stdout_text(&spec.log_path).contains("first-second\n"));
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn shim_stays_idle_after_attaches() {
    let env = Env::new();
    for tty in [false, true] {
        let mut spec = env.spec(&["sleep", "1000"]);
        spec.stdin = true;
        spec.tty = tty;
        let id = env.rt.start(&spec).await.unwrap();
        let mut s = env.rt.attach(&id, true).await.unwrap();
        if let Some(resize) = s.resize.take() {
            resize.send((80, 25)).await.unwrap();
        }
        s.stdin.take().unwrap().write_all(b"x\n").await.unwrap();
        drop(s);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(env.cfg.state_dir.join(&id).join("state.json")).unwrap(),
        )
        .unwrap();
        let shim = state["shim_pid"].as_i64().unwrap();
        let before = cpu_ticks(shim);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let used = cpu_ticks(shim) - before;
        assert!(
            used <= 10,
            "tty={tty}: the shim used {used} ticks while idle"
        );
        env.rt.stop(&id, Duration::ZERO).await.unwrap();
    }
}

#[tokio::test]
async fn runs_as_the_given_user_and_groups() {
    let env = Env::new();
    let mut spec = env.spec(&[
        "sh",
        "-c",
        "echo u=$(id -u) g=$(id -g) G=$(id -G); exec sleep 1000",
    ]);
    spec.run_as_user = Some(65534);
    spec.run_as_group = Some(65533);
    spec.supplemental_groups = vec![1234];
    let id = env.rt.start(&spec).await.unwrap();
    env.wait_log(&spec, "u=").await;
    let out = stdout_text(&spec.log_path);
    assert!(out.contains("u=65534 g=65533 G=65533 1234\n"), "{out}");
    // exec runs with the container's credentials.
    let cmd: Vec<String> = ["id", "-u"].iter().map(|s| s.to_string()).collect();
    let s = env.rt.exec(&id, &cmd, false, false).await.unwrap();
    assert_eq!(read_all(s.stdout).await, "65534\n");
    assert_eq!(s.exit.await.unwrap(), 0);
    env.rt.stop(&id, Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn mount_point_behind_a_dangling_symlink() {
    let env = Env::new();
    assert!(
        Path::new(BUSYBOX).is_file(),
        "{BUSYBOX} is missing: install busybox-static"
    );
    // A directory image whose /etc/resolv.conf points into /run (as on
    // systemd-resolved hosts), where nothing exists yet.
    let image = env.tmp.path().join("dir-image");
    for d in ["bin", "etc", "run"] {
        std::fs::create_dir_all(image.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, image.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "readlink"] {
        std::os::unix::fs::symlink("busybox", image.join("bin").join(applet)).unwrap();
    }
    std::os::unix::fs::symlink("../run/resolve/stub.conf", image.join("etc/resolv.conf")).unwrap();
    let resolv = env.tmp.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 10.43.0.10\n").unwrap();
    let mut spec = env.spec(&["sh", "-c", "cat /etc/resolv.conf"]);
    spec.image = image.to_str().unwrap().to_owned();
    spec.env = vec![("PATH".into(), "/bin".into())];
    spec.mounts = vec![Mount {
        host_path: resolv,
        container_path: "/etc/resolv.conf".into(),
        read_only: true,
    }];
    let (code, reason, out) = env.run(&spec).await;
    assert_eq!((code, reason.as_str()), (0, "Completed"), "{out}");
    assert_eq!(out, "nameserver 10.43.0.10\n");
    // The image directory itself is untouched (the overlay took the change).
    assert!(!image.join("run/resolve").exists());
}
