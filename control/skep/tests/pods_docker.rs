//! Pods on the `docker` runtime end to end: a `skep server --runtime
//! docker` (its node in a network namespace) against a private dockerd
//! runs a busybox pod that gets Ready, serves on its pod IP, logs and
//! takes `kubectl exec`.
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
    let c = Cluster::start_with(0, &["--runtime", "docker", "--docker-socket", &socket]);
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
    c.kubectl_ok(&["delete", "pod", "dweb", "--wait=true", "--timeout=60s"]);
    c.wait_for("containers removed", Duration::from_secs(30), |_| {
        d.cli(&["ps", "-aq", "--filter", "label=io.skep.pod-uid"])
            .trim()
            .is_empty()
    });
}
