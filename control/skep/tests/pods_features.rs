//! What a pod spec asks of a node, checked from inside real containers:
//! volumes (emptyDir, configMap, secret, downwardAPI, projected token),
//! env from ConfigMaps/Secrets/resources, init and sidecar containers,
//! liveness restarts, readiness, limits in the cgroup, preStop + grace, and
//! bad input reported in the status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use cluster::Cluster;
use std::time::{Duration, Instant};

const SPEC: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: conf, namespace: default}
data: {greeting: hello, "app.properties": "a=1\n"}
---
apiVersion: v1
kind: Secret
metadata: {name: creds, namespace: default}
stringData: {password: s3cret}
---
apiVersion: v1
kind: Pod
metadata: {name: full, namespace: default, labels: {tier: web}}
spec:
  terminationGracePeriodSeconds: 5
  initContainers:
  - name: init
    image: host
    command: [sh, -c, "echo from-init > /work/init.txt"]
    volumeMounts: [{name: scratch, mountPath: /work}]
  - name: sidecar
    image: host
    restartPolicy: Always
    command: [sh, -c, "while true; do date > /work/sidecar.txt; sleep 1; done"]
    volumeMounts: [{name: scratch, mountPath: /work}]
  containers:
  - name: main
    image: host
    command: [sh, -c, "trap 'echo stopping >> /work/stop.txt; exit 0' TERM; while true; do sleep 0.2; done"]
    env:
    - {name: GREETING, valueFrom: {configMapKeyRef: {name: conf, key: greeting}}}
    - {name: PASSWORD, valueFrom: {secretKeyRef: {name: creds, key: password}}}
    - {name: MEM_MI, valueFrom: {resourceFieldRef: {resource: limits.memory, divisor: 1Mi}}}
    envFrom: [{prefix: CONF_, configMapRef: {name: conf}}]
    resources:
      limits: {memory: 64Mi, cpu: 500m}
      requests: {memory: 64Mi, cpu: 500m}
    volumeMounts:
    - {name: scratch, mountPath: /work}
    - {name: conf, mountPath: /conf}
    - {name: creds, mountPath: /creds}
    - {name: info, mountPath: /info}
    - {name: mem, mountPath: /fast}
    lifecycle:
      preStop: {exec: {command: [sh, -c, "echo prestop >> /work/stop.txt"]}}
  volumes:
  - {name: scratch, emptyDir: {}}
  - {name: mem, emptyDir: {medium: Memory, sizeLimit: 8Mi}}
  - {name: conf, configMap: {name: conf}}
  - {name: creds, secret: {secretName: creds}}
  - name: info
    downwardAPI:
      items:
      - {path: labels, fieldRef: {fieldPath: metadata.labels}}
      - {path: name, fieldRef: {fieldPath: metadata.name}}
"#;

fn exec(c: &Cluster, pod: &str, container: &str, script: &str) -> String {
    c.kubectl_ok(&["exec", pod, "-c", container, "--", "sh", "-c", script])
}

#[test]
fn volumes_env_init_sidecars_limits_and_graceful_stop() {
    let c = Cluster::start(0);
    c.apply(SPEC);
    c.wait_ready("default", "full");
    // The init containers have no resources: Burstable, not Guaranteed.
    assert_eq!(
        c.jsonpath("default", "pod/full", "{.status.qosClass}"),
        "Burstable"
    );
    assert_eq!(
        exec(&c, "full", "main", "cat /work/init.txt").trim(),
        "from-init",
        "init ran first, into the shared emptyDir"
    );
    assert!(
        !exec(&c, "full", "main", "cat /work/sidecar.txt")
            .trim()
            .is_empty(),
        "the sidecar runs beside main"
    );
    let env = exec(
        &c,
        "full",
        "main",
        "echo $GREETING $PASSWORD $MEM_MI $CONF_greeting",
    );
    assert_eq!(env.trim(), "hello s3cret 64 hello");
    assert_eq!(
        exec(
            &c,
            "full",
            "main",
            "cat /conf/greeting; cat /creds/password"
        ),
        "hellos3cret"
    );
    assert!(exec(&c, "full", "main", "cat /info/labels").contains("tier=\"web\""));
    assert_eq!(exec(&c, "full", "main", "cat /info/name"), "full");
    let token = exec(
        &c,
        "full",
        "main",
        "cat /var/run/secrets/kubernetes.io/serviceaccount/token; echo; cat /var/run/secrets/kubernetes.io/serviceaccount/namespace",
    );
    assert!(
        token.starts_with("ey") && token.trim_end().ends_with("default"),
        "service-account token mounted: {token}"
    );
    assert!(
        exec(&c, "full", "main", "grep ' /fast ' /proc/mounts").contains("tmpfs"),
        "medium Memory is a tmpfs"
    );
    assert!(
        c.kubectl(&[
            "exec",
            "full",
            "-c",
            "main",
            "--",
            "sh",
            "-c",
            "echo x > /conf/new"
        ])
        .status
        .code()
            != Some(0),
        "configMap volumes are read-only"
    );
    // The memory limit is in the container's cgroup.
    // (No cgroup namespace: /proc/1/cgroup names the host path.)
    let cgroups = exec(&c, "full", "main", "cat /proc/1/cgroup");
    let limit = match cgroups
        .lines()
        .find_map(|l| l.strip_suffix("").and_then(|l| l.split_once(":memory:")))
    {
        Some((_, path)) => {
            std::fs::read_to_string(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
                .unwrap()
        }
        None => {
            let path = cgroups
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .expect("a cgroup v2 line");
            std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.max")).unwrap()
        }
    };
    assert_eq!(
        limit.trim(),
        (64u64 << 20).to_string(),
        "memory limit enforced by the container's cgroup: {cgroups}"
    );
    // A ConfigMap change reaches the mounted file.
    c.kubectl_ok(&[
        "patch",
        "configmap",
        "conf",
        "-p",
        r#"{"data":{"greeting":"changed"}}"#,
    ]);
    c.wait_for("configMap volume updated", Duration::from_secs(30), |c| {
        exec(c, "full", "main", "cat /conf/greeting") == "changed"
    });
    // Delete: preStop, then TERM (trapped → exits early), pod gone.
    let scratch = c.nodes[0].agent_dir(true).join("pods");
    let t = Instant::now();
    c.kubectl_ok(&["delete", "pod", "full", "--wait=true", "--timeout=30s"]);
    assert!(
        t.elapsed() < Duration::from_secs(5) + Duration::from_secs(3),
        "the trapped TERM ended it before the grace period"
    );
    assert_eq!(
        std::fs::read_dir(scratch).map(|d| d.count()).unwrap_or(0),
        0,
        "the pod's volumes are gone from the node"
    );
}

#[test]
fn probes_restart_unhealthy_containers_and_gate_readiness() {
    let c = Cluster::start(0);
    c.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: live, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: host
    command: [sh, -c, "touch /tmp/healthy; sleep 3; rm /tmp/healthy; sleep 600"]
    livenessProbe:
      exec: {command: [test, -e, /tmp/healthy]}
      periodSeconds: 1
      failureThreshold: 2
---
apiVersion: v1
kind: Pod
metadata: {name: notready, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: host
    command: [sleep, "600"]
    readinessProbe: {tcpSocket: {port: 9999}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: badimage, namespace: default}
spec:
  containers: [{name: c, image: /no/such/image.tar, command: [sh]}]
---
apiVersion: v1
kind: Pod
metadata: {name: badvolume, namespace: default}
spec:
  containers: [{name: c, image: host, command: [sleep, "600"]}]
  volumes: [{name: v, hostPath: {path: /no/such/file/here, type: File}}]
---
apiVersion: v1
kind: Pod
metadata: {name: badconf, namespace: default}
spec:
  containers:
  - name: c
    image: host
    command: [sleep, "600"]
    env: [{name: X, valueFrom: {configMapKeyRef: {name: missing, key: k}}}]
"#,
    );
    c.wait_for(
        "live restarted by its liveness probe",
        Duration::from_secs(60),
        |c| {
            c.jsonpath(
                "default",
                "pod/live",
                "{.status.containerStatuses[0].restartCount}",
            )
            .parse::<u32>()
            .unwrap_or(0)
                >= 1
        },
    );
    let events = c.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=live",
    ]);
    assert!(
        events.contains("Unhealthy") && events.contains("failed liveness probe"),
        "{events}"
    );
    c.wait_for("notready Running", Duration::from_secs(30), |c| {
        c.jsonpath("default", "pod/notready", "{.status.phase}") == "Running"
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        c.jsonpath(
            "default",
            "pod/notready",
            "{.status.conditions[?(@.type==\"Ready\")].status}"
        ),
        "False"
    );
    c.wait_for(
        "badimage ErrImagePull/ImagePullBackOff",
        Duration::from_secs(30),
        |c| {
            let r = c.jsonpath(
                "default",
                "pod/badimage",
                "{.status.containerStatuses[0].state.waiting.reason}",
            );
            r == "ErrImagePull" || r == "ImagePullBackOff"
        },
    );
    assert!(
        c.jsonpath(
            "default",
            "pod/badimage",
            "{.status.containerStatuses[0].state.waiting.message}"
        )
        .contains("/no/such/image.tar")
    );
    c.wait_for(
        "badconf CreateContainerConfigError",
        Duration::from_secs(30),
        |c| {
            c.jsonpath(
                "default",
                "pod/badconf",
                "{.status.containerStatuses[0].state.waiting.reason}",
            ) == "CreateContainerConfigError"
        },
    );
    assert!(
        c.jsonpath(
            "default",
            "pod/badconf",
            "{.status.containerStatuses[0].state.waiting.message}"
        )
        .contains("missing")
    );
}

/// `kubectl set image` on a bare pod: the container is replaced by one of
/// the new image (a directory rootfs with a marker file the host image
/// does not have), its restart count goes up, the pod keeps its IP, and a
/// `restartPolicy: Never` pod is no exception (a changed definition is
/// restarted whatever the policy).
#[test]
fn changing_a_containers_image_replaces_the_container() {
    let c = Cluster::start(0);
    // The new image: a rootfs directory with busybox and a marker.
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("/bin/busybox: install Debian's busybox-static (cargo xtask setup)");
    for applet in ["sh", "sleep", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("marker"), "new image\n").unwrap();
    c.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: swap, namespace: default}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: host
    command: [sleep, "600"]
"#,
    );
    c.wait_ready("default", "swap");
    let ip = c.jsonpath("default", "pod/swap", "{.status.podIP}");
    let first = c.jsonpath(
        "default",
        "pod/swap",
        "{.status.containerStatuses[0].containerID}",
    );
    let out = c.kubectl(&["exec", "swap", "--", "cat", "/marker"]);
    assert!(!out.status.success(), "the host image has no /marker");

    let image = rootfs.display().to_string();
    c.kubectl_ok(&["set", "image", "pod/swap", &format!("app={image}")]);
    c.wait_for(
        "the container replaced by one of the new image",
        Duration::from_secs(60),
        |c| {
            c.jsonpath(
                "default",
                "pod/swap",
                "{.status.containerStatuses[0].containerID}",
            ) != first
                && c.jsonpath(
                    "default",
                    "pod/swap",
                    "{.status.containerStatuses[0].ready}",
                ) == "true"
        },
    );
    let marker = c.kubectl_ok(&["exec", "swap", "--", "cat", "/marker"]);
    assert_eq!(marker.trim(), "new image");
    assert_eq!(
        c.jsonpath(
            "default",
            "pod/swap",
            "{.status.containerStatuses[0].restartCount}"
        ),
        "1"
    );
    assert_eq!(
        c.jsonpath(
            "default",
            "pod/swap",
            "{.status.containerStatuses[0].image}"
        ),
        image
    );
    assert_eq!(c.jsonpath("default", "pod/swap", "{.status.podIP}"), ip);
    assert_eq!(
        c.jsonpath("default", "pod/swap", "{.status.phase}"),
        "Running"
    );
    let events = c.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=swap",
    ]);
    assert!(events.contains("definition changed"), "{events}");
}

/// Container logs rotate at `--container-log-max-size` and keep
/// `--container-log-max-files` files, and `kubectl logs -f` started before
/// the rotations reads every line once, in order, across them.
#[test]
fn container_logs_rotate_and_follow_reads_across_rotations() {
    use std::io::{BufRead, BufReader};
    let c = Cluster::start_with(
        0,
        &[
            "--container-log-max-size",
            "4Ki",
            "--container-log-max-files",
            "3",
        ],
    );
    c.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: chatty, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: host
    command: [sh, -c, 'sleep 2; i=0; while [ $i -lt 400 ]; do echo "line $i"; i=$((i+1)); sleep 0.01; done; sleep 600']
"#,
    );
    c.wait_ready("default", "chatty");
    let mut follower = std::process::Command::new("ip")
        .args(["netns", "exec", &c.nodes[0].netns, cluster::KUBECTL])
        .arg("--kubeconfig")
        .arg(c.kubeconfig())
        .args(["logs", "-f", "chatty"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("line 399") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = follower.kill();
                panic!(
                    "kubectl logs -f stopped or stalled after {} lines; last: {:?}",
                    seen.len(),
                    seen.last()
                );
            }
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    let want: Vec<String> = (0..400).map(|i| format!("line {i}")).collect();
    assert_eq!(
        seen, want,
        "every line once, in order, across the rotations"
    );

    // On disk: the current file and at most two rotated ones, each near
    // the size limit.
    let mut logs = Vec::new();
    let mut stack = vec![c.nodes[0].agent_dir(true)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read_to_string(&p).is_ok_and(|t| t.contains(" stdout F line ")) {
                logs.push(p);
            }
        }
    }
    assert!(
        (2..=3).contains(&logs.len()),
        "the container's log files: {logs:?}"
    );
    for p in &logs {
        let len = std::fs::metadata(p).unwrap().len();
        assert!(len < 4096 + 100, "{} is {len} bytes", p.display());
    }
    // `kubectl logs` without -f reads the current file: the newest lines
    // (none if the last line happened to fill it up and rotate it).
    let current = c.kubectl_ok(&["logs", "chatty"]);
    let all: String = want.iter().map(|l| format!("{l}\n")).collect();
    assert!(all.ends_with(&current), "{current}");
    let current_file_empty = logs.iter().all(|p| {
        p.extension().is_none_or(|e| e != "log") || std::fs::metadata(p).unwrap().len() == 0
    });
    assert!(
        current_file_empty || current.ends_with("line 399\n"),
        "{current}"
    );
    assert!(!current.starts_with("line 0\n"), "{current}");
}
