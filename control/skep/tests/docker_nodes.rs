//! The Docker-based multi-node mode (`cargo xtask up --docker`), end to
//! end: the node image is built with `docker import` (no registry), a
//! private dockerd runs a server and two agents as containers on an
//! internal docker network, and the cluster works across those nodes: pod
//! to pod by IP, Services by ClusterIP and DNS name, `skep ctl
//! connectivity-test`, NetworkPolicy denying a client on another node.
//! Teardown must leave no container, network, image, bridge, cgroup,
//! mount or dockerd behind. The engine is the one `cargo xtask up --docker`
//! uses (xtask/src/docker_cluster.rs), included here by path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../xtask/src/docker_cluster.rs"]
mod docker_cluster;

use docker_cluster::Spec;
use std::{
    collections::BTreeSet,
    io::Write,
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

const WORKLOAD: &str = r#"
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

/// Two clients on `node`, one the policy admits and one it does not.
fn clients(node: &str) -> String {
    let pod = |name: &str, labels: &str| {
        format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {labels}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: host
    command: [sleep, "3600"]
"#
        )
    };
    format!(
        "{}---{}",
        pod("allowed", "{role: client}"),
        pod("intruder", "{role: other}")
    )
}

/// Ingress to the echo pods only from pods labelled role=client.
const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: echo-from-clients, namespace: default}
spec:
  podSelector: {matchLabels: {app: echo}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
"#;

/// Tears the cluster down on drop (also on panic), after printing the
/// nodes' logs when the test failed.
struct Cluster {
    spec: Spec,
    destroyed: bool,
}

impl Cluster {
    fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.spec.kubeconfig())
            .args(["--request-timeout", "30s"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_stdin(args, None)
    }

    fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn apply(&self, yaml: &str) {
        let out = self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml));
        assert!(
            out.status.success(),
            "apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn jsonpath(&self, what: &str, path: &str) -> String {
        let out = self.kubectl(&["get", what, "-o", &format!("jsonpath={path}")]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut cond: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond(self) {
            if Instant::now() > deadline {
                let pods = self.kubectl(&["get", "pods", "-A", "-o", "wide"]);
                let events = self.kubectl(&["get", "events", "-A"]);
                panic!(
                    "timed out after {timeout:?} waiting for {what}\npods:\n{}\nevents:\n{}",
                    String::from_utf8_lossy(&pods.stdout),
                    String::from_utf8_lossy(&events.stdout),
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `skep tools probe` inside a pod; (success, output).
    fn probe(&self, pod: &str, args: &[&str]) -> (bool, String) {
        let mut a = vec!["exec", pod, "--", "/.skep/skep", "tools", "probe"];
        a.extend(args);
        a.extend(["--timeout", "3s"]);
        let out = self.kubectl(&a);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.destroyed {
            return;
        }
        if std::thread::panicking() {
            let docker = self.spec.docker();
            for i in 0..self.spec.nodes {
                eprintln!("{}", docker_cluster::node_report(&self.spec, &docker, i));
            }
        }
        if let Err(e) = docker_cluster::destroy(&self.spec) {
            eprintln!("tearing the docker cluster down: {e:#}");
        }
    }
}

#[test]
fn three_docker_nodes_run_pods_that_talk_across_nodes_under_policy() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test starts a dockerd and containers that load BPF programs: run it as root"
    );
    let pid = std::process::id();
    let spec = Spec {
        name: format!("skd{:x}", pid % 0xfffff),
        nodes: 3,
        binary: PathBuf::from(env!("CARGO_BIN_EXE_skep")),
        state_dir: std::env::temp_dir().join(format!("skep-docker-nodes-{pid}")),
        // Not 10.98.0 (`cargo xtask up --docker`), so both can run at once.
        subnet: [10, 97, (pid % 256) as u8],
        docker_socket: None,
    };
    std::fs::create_dir_all(&spec.state_dir).unwrap();
    let mut c = Cluster {
        spec,
        destroyed: false,
    };
    let started = Instant::now();
    let docker = docker_cluster::start_dockerd(&c.spec)
        .unwrap_or_else(|e| panic!("dockerd cannot start, so there are no docker nodes: {e:#}"));
    let size = docker_cluster::build_image(&c.spec, &docker).expect("building the node image");
    eprintln!(
        "node image {}: rootfs tarball {:.1} MiB",
        c.spec.image(),
        size as f64 / 1048576.0
    );
    docker_cluster::start_nodes(&c.spec, &docker).expect("starting the docker nodes");
    eprintln!("3 docker nodes Ready after {:?}", started.elapsed());

    // Every node Ready, each with a pod CIDR, at its address on the
    // internal network.
    let nodes = c.kubectl_ok(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.addresses[0].address} {.spec.podCIDR} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
    ]);
    for i in 0..3 {
        let want = format!("{} {} ", c.spec.node_name(i), c.spec.node_ip(i));
        let line = nodes
            .lines()
            .find(|l| l.starts_with(&want))
            .unwrap_or_else(|| panic!("node {want} is missing: {nodes}"));
        assert!(
            line.contains("10.42.") && line.ends_with(" True"),
            "node with a pod CIDR, Ready: {line}"
        );
    }
    // The nodes have no default route: nothing leaves the docker network.
    for i in 0..3 {
        let routes = docker
            .run(&["exec", &c.spec.node_name(i), "ip", "route"])
            .unwrap();
        assert!(
            !routes.contains("default"),
            "node {i} must not have a default route: {routes}"
        );
    }

    // Pods spread over the three nodes.
    c.apply(WORKLOAD);
    c.wait_for("3 echo pods Ready", Duration::from_secs(90), |c| {
        c.jsonpath("deployment/echo", "{.status.readyReplicas}") == "3"
    });
    let listing = c.kubectl_ok(&[
        "get",
        "pods",
        "-l",
        "app=echo",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.podIP}{\"\\n\"}{end}",
    ]);
    let pods: Vec<(String, String, String)> = listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3).then(|| (f[0].to_owned(), f[1].to_owned(), f[2].to_owned()))
        })
        .collect();
    let spread: BTreeSet<&str> = pods.iter().map(|p| p.1.as_str()).collect();
    assert_eq!(spread.len(), 3, "one echo pod per node: {pods:?}");

    // Pod to pod across nodes, by IP.
    for (i, (name, node, _)) in pods.iter().enumerate() {
        let (peer, peer_node, peer_ip) = &pods[(i + 1) % pods.len()];
        let (ok, out) = c.probe(name, &["tcp", &format!("{peer_ip}:7000")]);
        assert!(ok, "{name} on {node} → {peer} on {peer_node}: {out}");
    }
    // Through the Service, by ClusterIP and by DNS name: every backend
    // (two of them on other nodes) answers.
    let cluster_ip = c.jsonpath("service/echo", "{.spec.clusterIP}");
    for target in [
        format!("{cluster_ip}:80"),
        "echo.default.svc.cluster.local:80".to_owned(),
    ] {
        let mut seen = BTreeSet::new();
        for _ in 0..30 {
            let (_, out) = c.probe(&pods[0].0, &["http", &target]);
            for (name, _, _) in &pods {
                if out.contains(name.as_str()) {
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
            "every backend answers via {target}: {seen:?}"
        );
    }

    // The user-facing check, from the host.
    let out = Command::new(env!("CARGO_BIN_EXE_skep"))
        .args(["ctl", "connectivity-test", "--timeout", "90s"])
        .env("KUBECONFIG", c.spec.kubeconfig())
        .output()
        .expect("run skep ctl connectivity-test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains(" 0 failed"),
        "skep ctl connectivity-test:\n{text}"
    );

    // NetworkPolicy across nodes: clients on node 2, the server on node 1.
    let (server, _, server_ip) = pods
        .iter()
        .find(|p| p.1 == c.spec.node_name(1))
        .unwrap()
        .clone();
    c.apply(&clients(&c.spec.node_name(2)));
    for pod in ["allowed", "intruder"] {
        c.wait_for(&format!("pod {pod} Ready"), Duration::from_secs(60), |c| {
            c.jsonpath(
                &format!("pod/{pod}"),
                "{.status.conditions[?(@.type==\"Ready\")].status}",
            ) == "True"
        });
    }
    let target = format!("{server_ip}:8080");
    let (ok, out) = c.probe("intruder", &["http", &target]);
    assert!(ok, "before the policy the intruder reaches {server}: {out}");
    c.apply(POLICY);
    // The policy reaches every node's kernel within moments: a few tries.
    let mut denied = false;
    for _ in 0..10 {
        if !c.probe("intruder", &["http", &target]).0 {
            denied = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        denied,
        "the intruder on {} must be denied by the policy on {server} ({})",
        c.spec.node_name(2),
        c.spec.node_name(1)
    );
    let (ok, out) = c.probe("allowed", &["http", &target]);
    assert!(
        ok && out.contains(server.as_str()),
        "the allowed client reaches {server} across nodes: {out}"
    );

    // Teardown leaves nothing: containers, network and image are checked
    // in the daemon before it stops; then the host side.
    c.destroyed = true;
    docker_cluster::destroy(&c.spec).expect("tearing the docker cluster down");
    let left = docker_cluster::leftovers(&c.spec, None);
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(
        !c.spec.state_dir.exists(),
        "{} was removed",
        c.spec.state_dir.display()
    );
    eprintln!("whole test took {:?}", started.elapsed());
}
