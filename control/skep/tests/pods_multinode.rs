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

    // NodePort from outside the cluster: a host on the nodes' LAN reaches
    // node 0's NodePort, and the backends on the other two nodes answer
    // through node 0 (externalTrafficPolicy Cluster: SNAT there).
    c.kubectl_ok(&[
        "patch",
        "service",
        "echo",
        "-p",
        r#"{"spec":{"type":"NodePort","ports":[{"name":"http","port":80,"targetPort":8080,"nodePort":30080}]}}"#,
    ]);
    let outside = Outside::attach(&c);
    let mut via_node_port = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let out = outside.run(&[
            "curl",
            "-sS",
            "--max-time",
            "3",
            &format!("http://{}:30080/", c.nodes[0].ip),
        ]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        for (name, _, _) in &pods {
            if text.trim() == name.as_str() {
                via_node_port.insert(name.clone());
            }
        }
        if via_node_port.len() == 3 {
            break;
        }
        if !out.status.success() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert_eq!(
        via_node_port.len(),
        3,
        "node 0's NodePort reached the pods on every node from outside: {via_node_port:?}"
    );
    drop(outside);

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

/// Node failure with real agents: an agent that stops is marked
/// unreachable after the grace period, its node tainted NoExecute, and its
/// pods (tolerating that for 2 s) are evicted and replaced on the live
/// node, where the Service reaches them.
#[test]
fn a_stopped_agent_is_marked_unreachable_and_its_pods_come_back_elsewhere() {
    let mut c = Cluster::start_with(1, &["--node-monitor-grace-period", "6s"]);
    c.apply(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      tolerations:
      - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
      - {key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
      affinity:
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            podAffinityTerm:
              topologyKey: kubernetes.io/hostname
              labelSelector: {matchLabels: {app: web}}
      containers:
      - name: web
        image: host
        command: [skep, tools, serve, --http, "8080"]
        readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
"#,
    );
    c.wait_for("2 web pods ready", Duration::from_secs(90), |c| {
        c.jsonpath("default", "deployment/web", "{.status.readyReplicas}") == "2"
    });
    let failed = c.nodes[1].name.clone();
    let live = c.nodes[0].name.clone();
    let on = |c: &Cluster, node: &str| -> Vec<String> {
        c.kubectl_ok(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
        ])
        .lines()
        .map(str::to_owned)
        .collect()
    };
    assert_eq!(on(&c, &failed).len(), 1, "one pod on each node");

    c.stop_node(1);
    c.wait_for(
        "the stopped node unreachable and tainted",
        Duration::from_secs(60),
        |c| {
            let ready = c.jsonpath(
                "default",
                &format!("node/{failed}"),
                "{.status.conditions[?(@.type==\"Ready\")].status}",
            );
            let taints = c.jsonpath(
                "default",
                &format!("node/{failed}"),
                "{.spec.taints[*].key}",
            );
            ready == "Unknown" && taints.contains("node.kubernetes.io/unreachable")
        },
    );
    // Its pod is evicted (Terminating: no kubelet confirms) and replaced
    // on the live node.
    c.wait_for(
        "2 ready web pods on the live node",
        Duration::from_secs(90),
        |c| {
            let here = on(c, &live);
            here.iter()
                .filter(|l| l.trim().split(' ').count() == 1)
                .count()
                == 2
                && c.jsonpath("default", "deployment/web", "{.status.readyReplicas}") == "2"
        },
    );
    for l in on(&c, &failed) {
        assert!(
            l.trim().split(' ').count() == 2,
            "the failed node's pod is being deleted: {l}"
        );
    }
    assert!(
        c.jsonpath("default", &format!("node/{live}"), "{.spec.taints}")
            .is_empty(),
        "the live node is untainted"
    );
}

/// A host outside the cluster on the nodes' LAN (192.168.77.250), with no
/// route to pod or service addresses. Removed on drop.
struct Outside {
    netns: String,
}

impl Outside {
    fn attach(c: &Cluster) -> Self {
        let netns = format!("x{}", c.tag);
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &netns]);
        let outside = Self { netns };
        let port = format!("q{}", c.tag);
        ip(&[
            "-n",
            &outside.netns,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &c.switch,
        ]);
        ip(&["-n", &c.switch, "link", "set", &port, "master", "br0", "up"]);
        ip(&[
            "-n",
            &outside.netns,
            "addr",
            "add",
            "192.168.77.250/24",
            "dev",
            "eth0",
        ]);
        ip(&["-n", &outside.netns, "link", "set", "eth0", "up"]);
        outside
    }

    fn run(&self, cmd: &[&str]) -> std::process::Output {
        std::process::Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(cmd)
            .output()
            .unwrap()
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth and the bridge's peer.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}
