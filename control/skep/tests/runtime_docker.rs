//! The `docker` runtime against a real, private dockerd (root): pause
//! sandboxes holding real network namespaces, CRI logs, exit codes, OOM
//! kills, stop grace periods, exec, start errors and re-adoption by a new
//! runtime instance.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod docker;

use skep_kubelet::runtime::{
    ContainerInfo, ContainerLabels, ContainerSpec, ContainerState, Mount, Resources, Runtime,
    RuntimeError, docker::DockerRuntime,
};
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IMAGE: &str = "skep-test/busybox:1";
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "ls", "hostname", "wget", "dd", "grep", "pwd", "true", "false",
    "id", "env", "head", "tty",
];

/// The pod's network namespace mount point; unmounted and deleted on drop.
struct NetnsPath(String);

impl Drop for NetnsPath {
    fn drop(&mut self) {
        let _ = skep_dataplane::NetNs::remove_named(&self.0);
    }
}

fn labels(uid: &str, container: &str) -> ContainerLabels {
    ContainerLabels {
        pod_uid: uid.into(),
        pod_namespace: "default".into(),
        pod_name: "dpod".into(),
        container_name: container.into(),
        attempt: 0,
        init: false,
    }
}

struct Pod {
    uid: String,
    netns: PathBuf,
    logs: PathBuf,
}

impl Pod {
    fn spec(&self, name: &str, cmd: &[&str]) -> ContainerSpec {
        ContainerSpec {
            labels: labels(&self.uid, name),
            image: IMAGE.into(),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            args: vec![],
            env: vec![],
            working_dir: None,
            mounts: vec![],
            netns: Some(self.netns.clone()),
            hostname: "dpod".into(),
            run_as_user: None,
            run_as_group: None,
            supplemental_groups: vec![],
            resources: Resources::default(),
            stdin: false,
            stdin_once: false,
            tty: false,
            log_path: self.logs.join(format!("{name}.log")),
        }
    }
}

async fn find(rt: &DockerRuntime, id: &str) -> Option<ContainerInfo> {
    rt.list().await.unwrap().into_iter().find(|c| c.id == id)
}

async fn wait_state(
    rt: &DockerRuntime,
    id: &str,
    what: &str,
    cond: impl Fn(&ContainerState) -> bool,
) -> ContainerState {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = find(rt, id).await.expect("container listed");
        if cond(&c.state) {
            return c.state;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: last state {:?}",
            c.state
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn exited(s: &ContainerState) -> bool {
    matches!(s, ContainerState::Exited { .. })
}

async fn wait_log(path: &Path, what: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = std::fs::read_to_string(path).unwrap_or_default();
        if what.iter().all(|w| s.contains(w)) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "log {} lacks {what:?}:\n{s}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ns_inode(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).unwrap();
    (m.dev(), m.ino())
}

fn pause_pid(d: &docker::Dockerd, uid: &str) -> u32 {
    let id = d.cli(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=io.skep.pod-uid={uid}"),
        "--filter",
        "label=io.skep.sandbox-netns",
    ]);
    let id = id.trim();
    assert!(!id.is_empty(), "no running pause container");
    d.cli(&["inspect", "-f", "{{.State.Pid}}", id])
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_runtime() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (dockerd, namespaces, mounts)"
    );
    let d = docker::Dockerd::start();
    let rt = DockerRuntime::connect(d.socket()).await.unwrap();
    assert!(rt.version().await.unwrap().starts_with("docker://"));
    rt.health().await.unwrap();
    rt.import_busybox(IMAGE, APPLETS).await.unwrap();
    let image_id = rt.ensure_image(IMAGE).await.unwrap();
    assert!(image_id.starts_with("sha256:"), "{image_id}");

    let tmp = tempfile::tempdir().unwrap();
    let name = format!("skdk{}", std::process::id());
    let guard = NetnsPath(name.clone());
    let pod = Pod {
        uid: format!("d0c4e{}0000000000", std::process::id()),
        netns: PathBuf::from(format!("/run/netns/{name}")),
        logs: tmp.path().join("logs"),
    };

    // The sandbox: the pause container's namespace, mounted at the path.
    rt.create_sandbox(&pod.uid, &labels(&pod.uid, ""), &pod.netns)
        .await
        .unwrap();
    let pid = pause_pid(&d, &pod.uid);
    let pause_ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    assert_eq!(ns_inode(&pod.netns), ns_inode(&pause_ns));
    assert!(
        skep_dataplane::NetNs::exists(&name),
        "podnet would not adopt it"
    );
    let links = Command::new("ip")
        .args(["netns", "exec", &name, "ip", "-o", "link"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    assert_eq!(links.lines().count(), 1, "only lo: {links}");
    assert!(links.contains("lo:"), "{links}");
    // A second call (an agent restart) keeps the same sandbox.
    rt.create_sandbox(&pod.uid, &labels(&pod.uid, ""), &pod.netns)
        .await
        .unwrap();
    assert_eq!(pause_pid(&d, &pod.uid), pid);
    assert_eq!(ns_inode(&pod.netns), ns_inode(&pause_ns));
    // Something put into the namespace by path is what containers see.
    let st = Command::new("ip")
        .args([
            "netns", "exec", &name, "ip", "link", "add", "skdummy0", "type", "veth", "peer",
            "name", "skdummy1",
        ])
        .status()
        .unwrap();
    assert!(st.success());

    // Output, exit code, hostname, network namespace.
    let spec = pod.spec(
        "basic",
        &[
            "sh",
            "-c",
            "echo hi; echo err >&2; hostname; grep -q skdummy0 /proc/net/dev && echo net-shared; exit 3",
        ],
    );
    let id = rt.start(&spec).await.unwrap();
    let st = wait_state(&rt, &id, "basic exits", exited).await;
    match st {
        ContainerState::Exited {
            exit_code, reason, ..
        } => {
            assert_eq!(exit_code, 3);
            assert_eq!(reason, "Error");
        }
        _ => unreachable!(),
    }
    let log = wait_log(&spec.log_path, &["net-shared"]).await;
    let lines: Vec<&str> = log.lines().collect();
    let text = |l: &str| l.splitn(4, ' ').skip(1).collect::<Vec<_>>().join(" ");
    let rest: Vec<String> = lines.iter().map(|l| text(l)).collect();
    assert!(rest.contains(&"stdout F hi".to_owned()), "{log}");
    assert!(rest.contains(&"stderr F err".to_owned()), "{log}");
    assert!(rest.contains(&"stdout F dpod".to_owned()), "{log}");
    for l in &lines {
        let ts = l.split(' ').next().unwrap();
        assert!(
            ts.len() == "2026-01-01T00:00:00.000000000Z".len() && ts.ends_with('Z'),
            "{l}"
        );
    }
    let info = find(&rt, &id).await.unwrap();
    assert_eq!(info.labels, spec.labels);
    assert_eq!(info.log_path, spec.log_path);
    assert!(
        info.image_id.starts_with("docker-pullable://sha256:"),
        "{}",
        info.image_id
    );
    rt.remove(&id).await.unwrap();
    assert!(find(&rt, &id).await.is_none());

    // Env, working dir, bind mounts (read-only honoured).
    let rw = tmp.path().join("rw");
    let ro = tmp.path().join("ro");
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    let mut spec = pod.spec(
        "env",
        &[
            "sh",
            "-c",
            "echo foo=$FOO; pwd; echo x > /data/f; (echo y > /ro/f) 2>/dev/null || echo ro-refused",
        ],
    );
    spec.env = vec![("FOO".into(), "bar".into())];
    spec.working_dir = Some("/work".into());
    spec.mounts = vec![
        Mount {
            host_path: rw.clone(),
            container_path: "/data".into(),
            read_only: false,
        },
        Mount {
            host_path: ro.clone(),
            container_path: "/ro".into(),
            read_only: true,
        },
    ];
    let id = rt.start(&spec).await.unwrap();
    let st = wait_state(&rt, &id, "env exits", exited).await;
    assert!(
        matches!(&st, ContainerState::Exited { exit_code: 0, reason, .. } if reason == "Completed"),
        "{st:?}"
    );
    wait_log(&spec.log_path, &["foo=bar", "stdout F /work", "ro-refused"]).await;
    assert_eq!(std::fs::read_to_string(rw.join("f")).unwrap(), "x\n");
    assert!(!ro.join("f").exists());

    // Memory limit: the OOM killer, reported as such.
    let mut spec = pod.spec(
        "oom",
        // The pause first: containerd watches for OOM kills only once the
        // task runs; one in the first milliseconds goes unnoticed by docker
        // (it then reports plain exit 137).
        &[
            "sh",
            "-c",
            "sleep 0.5; exec dd if=/dev/zero of=/dev/null bs=64M count=1",
        ],
    );
    spec.resources.memory_limit_bytes = Some(16 << 20);
    let id = rt.start(&spec).await.unwrap();
    // Docker may learn of the OOM kill a moment after the exit (its
    // events arrive in either order), so the reason can settle late.
    wait_state(&rt, &id, "oom exits as OOMKilled", |s| {
        matches!(s, ContainerState::Exited { exit_code: 137, reason, .. } if reason == "OOMKilled")
    })
    .await;

    // Stop: a TERM handler exits at once; PID 1 without one is killed
    // after the grace period.
    let spec = pod.spec(
        "trap",
        &[
            "sh",
            "-c",
            "trap 'exit 0' TERM; while true; do sleep 0.1; done",
        ],
    );
    let id = rt.start(&spec).await.unwrap();
    wait_state(&rt, &id, "trap runs", |s| {
        matches!(s, ContainerState::Running { .. })
    })
    .await;
    let t = Instant::now();
    rt.stop(&id, Duration::from_secs(20)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    let st = find(&rt, &id).await.unwrap().state;
    assert!(
        matches!(st, ContainerState::Exited { exit_code: 0, .. }),
        "{st:?}"
    );
    rt.stop(&id, Duration::from_secs(1)).await.unwrap();

    let spec = pod.spec("stubborn", &["sleep", "1000"]);
    let stubborn = rt.start(&spec).await.unwrap();
    wait_state(&rt, &stubborn, "sleep runs", |s| {
        matches!(s, ContainerState::Running { .. })
    })
    .await;

    // The same attempt started again (an agent restart racing its relist)
    // is the running container, not a replacement.
    assert_eq!(rt.start(&spec).await.unwrap(), stubborn);

    // Exec: output, exit code, stdin.
    let mut s = rt
        .exec(
            &stubborn,
            &[
                "sh".into(),
                "-c".into(),
                "echo pid=$$; cat /etc/hostname; exit 5".into(),
            ],
            false,
            false,
        )
        .await
        .unwrap();
    let mut out = String::new();
    s.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    assert_eq!(s.exit.await.unwrap(), 5);
    assert!(out.contains("pid="), "{out}");
    assert!(out.contains("dpod"), "{out}");
    let mut s = rt
        .exec(&stubborn, &["cat".into()], false, true)
        .await
        .unwrap();
    let mut stdin = s.stdin.take().unwrap();
    stdin.write_all(b"ping\n").await.unwrap();
    stdin.shutdown().await.unwrap();
    let mut out = String::new();
    s.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    assert_eq!(out, "ping\n");
    assert_eq!(s.exit.await.unwrap(), 0);

    // Exec with a terminal: stdout only, and a resize channel.
    let mut s = rt
        .exec(&stubborn, &["tty".into()], true, false)
        .await
        .unwrap();
    assert!(s.stderr.is_none());
    s.resize.as_ref().unwrap().send((100, 30)).await.unwrap();
    let mut out = String::new();
    s.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert_eq!(s.exit.await.unwrap(), 0);

    // Attach to a container's stdin/stdout: what goes in comes out, in
    // the session and in the log.
    let mut spec = pod.spec("attach", &["cat"]);
    spec.stdin = true;
    let cat = rt.start(&spec).await.unwrap();
    wait_state(&rt, &cat, "cat runs", |s| {
        matches!(s, ContainerState::Running { .. })
    })
    .await;
    let mut a = rt.attach(&cat, true).await.unwrap();
    let mut stdin = a.stdin.take().unwrap();
    stdin.write_all(b"echoed\n").await.unwrap();
    stdin.flush().await.unwrap();
    let mut buf = [0u8; 7];
    tokio::time::timeout(
        Duration::from_secs(10),
        a.stdout.as_mut().unwrap().read_exact(&mut buf),
    )
    .await
    .expect("attach output")
    .unwrap();
    assert_eq!(&buf, b"echoed\n");
    wait_log(&spec.log_path, &["stdout F echoed"]).await;
    rt.stop(&cat, Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), a.exit)
            .await
            .unwrap()
            .unwrap(),
        137
    );

    let t = Instant::now();
    rt.stop(&stubborn, Duration::from_secs(2)).await.unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(10),
        "{took:?}"
    );
    let st = find(&rt, &stubborn).await.unwrap().state;
    // SIGKILLed after the grace period, not by the OOM killer.
    assert!(
        matches!(&st, ContainerState::Exited { exit_code: 137, reason, .. } if reason == "Error"),
        "{st:?}"
    );

    // A missing image: no registry answers → an image error.
    match rt.ensure_image("skep-test/missing:1").await {
        Err(RuntimeError::Image { .. }) => {}
        other => panic!("expected an image error, got {other:?}"),
    }

    // A missing executable: the container stays, reported as StartError.
    let spec = pod.spec("nocmd", &["/no/such/binary"]);
    let id = rt.start(&spec).await.unwrap();
    let st = find(&rt, &id).await.unwrap().state;
    match st {
        ContainerState::Exited {
            exit_code,
            reason,
            message,
            ..
        } => {
            assert_eq!(exit_code, 128);
            assert_eq!(reason, "StartError");
            assert!(message.unwrap().contains("/no/such/binary"));
        }
        other => panic!("{other:?}"),
    }

    // Re-adoption: a new runtime instance (an agent restart) lists the
    // running container and carries on with its log, without duplicates.
    let spec = pod.spec(
        "ticker",
        &[
            "sh",
            "-c",
            "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done",
        ],
    );
    let ticker = rt.start(&spec).await.unwrap();
    wait_log(&spec.log_path, &["tick 3"]).await;
    drop(rt);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let rt = DockerRuntime::connect(d.socket()).await.unwrap();
    let c = find(&rt, &ticker).await.unwrap();
    assert_eq!(c.labels, spec.labels);
    assert!(matches!(c.state, ContainerState::Running { .. }));
    let log = wait_log(&spec.log_path, &["tick 15"]).await;
    let ticks: Vec<u32> = log
        .lines()
        .filter_map(|l| l.rsplit_once("tick ").map(|(_, n)| n.parse().unwrap()))
        .collect();
    let want: Vec<u32> = (0..ticks.len() as u32).collect();
    assert_eq!(ticks, want, "every line once, in order:\n{log}");
    rt.stop(&ticker, Duration::from_secs(1)).await.unwrap();

    assert_eq!(rt.list_sandboxes().await.unwrap(), vec![pod.uid.clone()]);
    // Removing the sandbox: the pause container and the mount go.
    rt.remove_sandbox(&pod.uid).await.unwrap();
    assert!(!pod.netns.exists());
    let left = d.cli(&["ps", "-aq", "--filter", "label=io.skep.sandbox-netns"]);
    assert!(left.trim().is_empty(), "pause left: {left}");
    rt.remove_sandbox(&pod.uid).await.unwrap();
    assert!(rt.list_sandboxes().await.unwrap().is_empty());
    drop(guard);
}
