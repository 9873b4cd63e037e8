//! Three nodes (the server's and two agents, each in its own network
//! namespace on a shared bridge): pods are spread over them, talk across
//! nodes by pod IP and through a Service, and a restarted agent adopts its
//! running containers without restarting them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use cluster::Cluster;
use std::time::Duration;

const SPREAD: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: default}
spec:
  replicas: 3
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints: []
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - labelSelector: {matchLabels: {app: echo}}
            topologyKey: kubernetes.io/hostname
      containers:
      - name: echo
        image: host
        command: [skep, tools, serve, --tcp, "7000", --http, "8080"]
        readinessProbe: {tcpSocket: {port: 7000}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

fn pods_by_node(c: &Cluster) -> Vec<(String, String, String)> {
    let out = c.kubectl_ok(&[
        "get",
        "pods",
        "-l",
        "app=echo",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.podIP}{\"\\n\"}{end}",
    ]);
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3).then(|| (f[0].to_owned(), f[1].to_owned(), f[2].to_owned()))
        })
        .collect()
}

#[test]
fn three_nodes_run_pods_that_talk_across_nodes_and_survive_agent_restarts() {
    let mut c = Cluster::start(2);
    let nodes = c.kubectl_ok(&["get", "nodes", "-o", "jsonpath={.items[*].spec.podCIDR}"]);
    assert_eq!(
        nodes.split_whitespace().count(),
        3,
        "three nodes with pod CIDRs: {nodes}"
    );
    c.apply(SPREAD);
    c.wait_for(
        "3 echo pods ready on 3 nodes",
        Duration::from_secs(90),
        |c| c.jsonpath("default", "deployment/echo", "{.status.readyReplicas}") == "3",
    );
    let pods = pods_by_node(&c);
    let mut node_names: Vec<&str> = pods.iter().map(|p| p.1.as_str()).collect();
    node_names.sort();
    node_names.dedup();
    assert_eq!(node_names.len(), 3, "one pod per node: {pods:?}");
    // From node 0's namespace to every pod IP (two of them on other nodes).
    for (name, node, ip) in &pods {
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
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(name.as_str()),
            "node0 → {name} on {node} ({ip}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Pod to pod across nodes: each pod reaches the next one by IP.
    for (i, (name, _, _)) in pods.iter().enumerate() {
        let (peer, peer_node, peer_ip) = &pods[(i + 1) % pods.len()];
        let out = c.kubectl(&[
            "exec",
            name,
            "--",
            "/.skep/skep",
            "tools",
            "probe",
            "tcp",
            &format!("{peer_ip}:7000"),
            "--timeout",
            "5s",
        ]);
        assert!(
            out.status.success(),
            "{name} → {peer} on {peer_node}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Through the Service by name, from a pod on every node: all three
    // backends answer sooner or later.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let out = c.kubectl(&[
            "exec",
            &pods[0].0,
            "--",
            "/.skep/skep",
            "tools",
            "probe",
            "http",
            "echo.default.svc.cluster.local:80",
            "--timeout",
            "5s",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        for (name, _, _) in &pods {
            if text.contains(name.as_str()) {
                seen.insert(name.clone());
            }
        }
        if seen.len() == 3 {
            break;
        }
    }
    assert_eq!(
        seen.len(),
        3,
        "the Service reached every backend across nodes: {seen:?}"
    );

    // Agent restart (SIGKILL): the running containers are adopted, not
    // restarted.
    let on_node1: Vec<&(String, String, String)> =
        pods.iter().filter(|p| p.1 == c.nodes[1].name).collect();
    let pod = on_node1[0].0.clone();
    let started = c.jsonpath(
        "default",
        &format!("pod/{pod}"),
        "{.status.containerStatuses[0].state.running.startedAt}",
    );
    let pid_before = c.kubectl_ok(&[
        "exec",
        &pod,
        "--",
        "sh",
        "-c",
        "cat /proc/1/stat | cut -d' ' -f22",
    ]);
    c.restart_node(1);
    std::thread::sleep(Duration::from_secs(3));
    c.wait_for("node1 Ready after restart", Duration::from_secs(60), |c| {
        let n = &c.nodes[1].name;
        c.kubectl(&[
            "get",
            "node",
            n,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
        .stdout
            == b"True"
    });
    c.wait_ready("default", &pod);
    assert_eq!(
        c.jsonpath(
            "default",
            &format!("pod/{pod}"),
            "{.status.containerStatuses[0].restartCount}"
        ),
        "0",
        "not restarted"
    );
    assert_eq!(
        c.jsonpath(
            "default",
            &format!("pod/{pod}"),
            "{.status.containerStatuses[0].state.running.startedAt}"
        ),
        started
    );
    let pid_after = c.kubectl_ok(&[
        "exec",
        &pod,
        "--",
        "sh",
        "-c",
        "cat /proc/1/stat | cut -d' ' -f22",
    ]);
    assert_eq!(pid_before, pid_after, "the same process (start time) runs");
    // And it still serves across nodes.
    let ip = &on_node1[0].2;
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
    assert!(
        out.status.success(),
        "after the agent restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
