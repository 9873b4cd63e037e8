//! Pods for real: a `skep server` with its node in a network namespace runs
//! pods with the built-in process runtime; they get their own namespaces
//! and IPs, reach a Service by its DNS name through the eBPF load balancer,
//! restart with back-off, and go away on delete.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use cluster::Cluster;
use std::time::Duration;

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: demo, labels: {app: web}}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: web
    image: host
    command: [skep, tools, serve, --http, "8080"]
    ports: [{name: http, containerPort: 8080}]
    env:
    - {name: MY_POD, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: GREETING, value: "hello $(MY_POD)"}
    readinessProbe:
      httpGet: {port: http, path: /}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: host
    command: [sleep, infinity]
"#;

#[test]
fn pods_run_and_reach_a_service_by_name() {
    let c = Cluster::start(0);
    c.apply(APP);
    c.wait_ready("demo", "web");
    c.wait_for("client Running", Duration::from_secs(60), |c| {
        c.jsonpath("demo", "pod/client", "{.status.phase}") == "Running"
    });
    let ip = c.jsonpath("demo", "pod/web", "{.status.podIP}");
    assert!(
        ip.starts_with("10.42."),
        "pod IP {ip:?} is from the node's pod CIDR"
    );
    assert_eq!(
        c.jsonpath("demo", "pod/web", "{.status.hostIP}"),
        c.nodes[0].ip
    );
    assert_eq!(
        c.jsonpath("demo", "pod/web", "{.status.qosClass}"),
        "BestEffort"
    );
    // The node reaches the pod by its IP.
    let direct = c.in_node(
        0,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://{ip}:8080/"),
        ],
    );
    assert!(
        direct.status.success(),
        "node → pod: {}",
        String::from_utf8_lossy(&direct.stderr)
    );
    assert!(
        String::from_utf8_lossy(&direct.stdout).contains("web"),
        "the echo server answers with the pod's hostname"
    );
    // From the client pod: the Service by DNS name (resolv.conf → 10.43.0.10 → skep's DNS).
    let resolv = c.kubectl_ok(&[
        "-n",
        "demo",
        "exec",
        "client",
        "--",
        "cat",
        "/etc/resolv.conf",
    ]);
    assert!(
        resolv.contains("nameserver 10.43.0.10")
            && resolv.contains("search demo.svc.cluster.local svc.cluster.local cluster.local"),
        "{resolv}"
    );
    // The EndpointSlice and the dataplane follow the pod's readiness
    // within moments; poll briefly.
    let mut last = String::new();
    let reached = (0..50).any(|_| {
        let probe = c.kubectl(&[
            "-n",
            "demo",
            "exec",
            "client",
            "--",
            "/.skep/skep",
            "tools",
            "probe",
            "http",
            "web.demo.svc.cluster.local:80",
            "--timeout",
            "5s",
        ]);
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&probe.stdout),
            String::from_utf8_lossy(&probe.stderr)
        );
        probe.status.success() || {
            std::thread::sleep(Duration::from_millis(200));
            false
        }
    });
    assert!(
        reached,
        "client → web.demo.svc.cluster.local:80 failed: {last}\nslices:\n{}\nnode log:\n{}",
        c.kubectl_ok(&["get", "endpointslices", "-A", "-o", "yaml"]),
        c.nodes[0].log()
    );
    // Short names through the search path, as workloads write them.
    for short in ["web:80", "web.demo:80", "web.demo.svc:80"] {
        let probe = c.kubectl(&[
            "-n",
            "demo",
            "exec",
            "client",
            "--",
            "/.skep/skep",
            "tools",
            "probe",
            "http",
            short,
            "--timeout",
            "5s",
        ]);
        assert!(
            probe.status.success(),
            "client → {short} (search path) failed: {}{}",
            String::from_utf8_lossy(&probe.stdout),
            String::from_utf8_lossy(&probe.stderr)
        );
    }
    // Namespaces of its own: PID 1, its hostname, the env expanded.
    let env = c.kubectl_ok(&[
        "-n",
        "demo",
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "echo $GREETING; hostname; cat /proc/1/cmdline | tr '\\0' ' '",
    ]);
    assert!(env.contains("hello web"), "{env}");
    assert!(
        env.lines().any(|l| l == "web"),
        "hostname is the pod name: {env}"
    );
    assert!(
        env.contains("tools serve"),
        "PID 1 is the container's command: {env}"
    );
    // Logs of the real container, and a port-forward to it (kubectl and
    // the forwarded port both inside the node's namespace).
    c.wait_for("web logs", Duration::from_secs(10), |c| {
        !c.kubectl_ok(&["-n", "demo", "logs", "web"]).is_empty()
    });
    let mut pf = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.nodes[0].netns,
            cluster::KUBECTL,
            "--kubeconfig",
        ])
        .arg(c.kubeconfig())
        .args(["-n", "demo", "port-forward", "pod/web", "18080:8080"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut forwarded = String::new();
    for _ in 0..50 {
        let out = c.in_node(
            0,
            &["curl", "-sS", "--max-time", "3", "http://127.0.0.1:18080/"],
        );
        if out.status.success() {
            forwarded = String::from_utf8_lossy(&out.stdout).into_owned();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = pf.kill();
    let _ = pf.wait();
    assert!(
        forwarded.contains("web"),
        "port-forward reached the pod: {forwarded:?}"
    );
    // Delete: gone within the grace period, with its namespace.
    c.kubectl_ok(&[
        "-n",
        "demo",
        "delete",
        "pod",
        "web",
        "--wait=true",
        "--timeout=30s",
    ]);
    let left = c.in_node(0, &["ip", "route"]);
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains(&format!("{ip} ")),
        "route to the deleted pod is gone"
    );
}

#[test]
fn crashing_containers_restart_with_backoff() {
    let c = Cluster::start(0);
    c.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: crash, namespace: default}
spec:
  containers:
  - name: c
    image: host
    command: [sh, -c, "echo attempt; exit 3"]
---
apiVersion: v1
kind: Pod
metadata: {name: once, namespace: default}
spec:
  restartPolicy: Never
  containers:
  - name: c
    image: host
    command: [sh, -c, "echo done"]
---
apiVersion: v1
kind: Pod
metadata: {name: missing, namespace: default}
spec:
  restartPolicy: Never
  containers:
  - name: c
    image: host
    command: [no-such-command-here]
"#,
    );
    c.wait_for(
        "crash restarted and backing off",
        Duration::from_secs(60),
        |c| {
            let reason = c.jsonpath(
                "default",
                "pod/crash",
                "{.status.containerStatuses[0].state.waiting.reason}",
            );
            let count: u32 = c
                .jsonpath(
                    "default",
                    "pod/crash",
                    "{.status.containerStatuses[0].restartCount}",
                )
                .parse()
                .unwrap_or(0);
            reason == "CrashLoopBackOff" && count >= 1
        },
    );
    assert_eq!(
        c.jsonpath(
            "default",
            "pod/crash",
            "{.status.containerStatuses[0].lastState.terminated.exitCode}"
        ),
        "3"
    );
    let prev = c.kubectl_ok(&["logs", "crash", "--previous"]);
    assert_eq!(prev.trim(), "attempt");
    c.wait_for("once Succeeded", Duration::from_secs(30), |c| {
        c.jsonpath("default", "pod/once", "{.status.phase}") == "Succeeded"
    });
    assert_eq!(c.kubectl_ok(&["logs", "once"]).trim(), "done");
    c.wait_for("missing Failed", Duration::from_secs(30), |c| {
        c.jsonpath("default", "pod/missing", "{.status.phase}") == "Failed"
    });
    let msg = c.jsonpath(
        "default",
        "pod/missing",
        "{.status.containerStatuses[0].state.terminated.message}",
    );
    assert!(
        msg.contains("no-such-command-here"),
        "the status says what was wrong: {msg:?}"
    );
}
