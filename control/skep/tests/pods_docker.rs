//! Pods on the `docker` runtime end to end: a `skep server --runtime
//! docker` (its node in a network namespace) against a private dockerd
//! runs a busybox pod that gets Ready, serves on its pod IP, logs, takes
//! `kubectl exec` and survives an agent restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod docker;

use cluster::Cluster;
use skep_kubelet::runtime::docker::DockerRuntime;
use std::time::Duration;

const IMAGE: &str = "skep-test/busybox:1";

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: dweb, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: skep-test/busybox:1
    command: [sh, -c, "mkdir -p /www && echo hello-docker > /www/index.html && echo serving && exec httpd -f -p 8080 -h /www"]
    readinessProbe:
      tcpSocket: {port: 8080}
      periodSeconds: 1
"#;

#[test]
fn docker_pod_runs_and_gets_ready() {
    let d = docker::Dockerd::start();
    let socket = d.socket().display().to_string();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let rt = DockerRuntime::connect(d.socket()).await.unwrap();
        rt.import_busybox(
            IMAGE,
            &[
                "sh", "mkdir", "echo", "httpd", "cat", "sleep", "hostname", "wget",
            ],
        )
        .await
        .unwrap();
    });
    let mut c = Cluster::start_with(0, &["--runtime", "docker", "--docker-socket", &socket]);
    c.apply(POD);
    c.wait_ready("default", "dweb");
    let ip = c.jsonpath("default", "pod/dweb", "{.status.podIP}");
    assert!(ip.starts_with("10.42."), "pod IP {ip}");
    let out = c.in_node(
        0,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://{ip}:8080/"),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello-docker",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait_for("kubectl logs", Duration::from_secs(20), |c| {
        c.kubectl(&["logs", "dweb"]).stdout == b"serving\n"
    });
    let host = c.kubectl_ok(&["exec", "dweb", "--", "cat", "/etc/hostname"]);
    assert_eq!(host.trim(), "dweb");
    // An agent restart re-adopts the container and its sandbox: same
    // container, same IP, still serving.
    let cid = c.jsonpath(
        "default",
        "pod/dweb",
        "{.status.containerStatuses[0].containerID}",
    );
    assert!(cid.starts_with("docker://"), "{cid}");
    c.restart_node(0);
    std::thread::sleep(Duration::from_secs(3));
    c.wait_for(
        "serving again after the restart",
        Duration::from_secs(60),
        |c| {
            let out = c.in_node(
                0,
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "2",
                    &format!("http://{ip}:8080/"),
                ],
            );
            String::from_utf8_lossy(&out.stdout).trim() == "hello-docker"
        },
    );
    c.wait_for("pod Ready, same container", Duration::from_secs(60), |c| {
        c.jsonpath(
            "default",
            "pod/dweb",
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        ) == "True"
            && c.jsonpath(
                "default",
                "pod/dweb",
                "{.status.containerStatuses[0].containerID}",
            ) == cid
            && c.jsonpath(
                "default",
                "pod/dweb",
                "{.status.containerStatuses[0].restartCount}",
            ) == "0"
    });
    assert_eq!(c.jsonpath("default", "pod/dweb", "{.status.podIP}"), ip);
    assert_eq!(
        d.cli(&["ps", "-q", "--filter", "label=io.skep.sandbox-netns"])
            .lines()
            .count(),
        1,
        "one pause container"
    );
    c.kubectl_ok(&["delete", "pod", "dweb", "--wait=true", "--timeout=60s"]);
    c.wait_for("containers removed", Duration::from_secs(30), |_| {
        d.cli(&["ps", "-aq", "--filter", "label=io.skep.pod-uid"])
            .trim()
            .is_empty()
    });
}
