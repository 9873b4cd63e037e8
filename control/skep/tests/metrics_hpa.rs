//! Resource metrics and autoscaling for real: a one-node cluster (server
//! with its agent in a network namespace, process runtime) runs a pod that
//! burns CPU; `kubectl top` (1.33) shows it through metrics.k8s.io, the
//! API server's /metrics counts requests, and a HorizontalPodAutoscaler
//! scales a CPU-burning Deployment out one pod per 15 s (its scale-up
//! policy) and back in once the load stops (short scale-down window).
//!
//! The HPA syncs every 3 s here through the annotation
//! `autoscaling.skep.io/sync-period-seconds` (the default is 15 s); the
//! kubelet samples usage every 5 s, so the first CPU figure of a pod comes
//! 5–10 s after it starts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use cluster::Cluster;
use std::time::{Duration, Instant};

/// `kubectl top` CPU column (`123m`) in millicores.
fn millicores(s: &str) -> u64 {
    s.strip_suffix('m')
        .map(|n| n.parse().unwrap())
        .unwrap_or_else(|| s.parse::<u64>().unwrap() * 1000)
}

/// `kubectl top` memory column (`12Mi`) in MiB.
fn mebibytes(s: &str) -> u64 {
    s.strip_suffix("Mi").unwrap().parse().unwrap()
}

/// The row of `name` in kubectl's table output, split on whitespace.
fn row(out: &str, name: &str) -> Option<Vec<String>> {
    out.lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cols| cols.iter().any(|c| c == name))
}

fn total_requests(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

const BURN: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: top}
---
apiVersion: v1
kind: Pod
metadata: {name: burn, namespace: top, labels: {app: burn}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: burn
    image: host
    # Holds ~16 MiB in a shell variable, then spins.
    command: [sh, -c, 'x=$(head -c 16000000 /dev/zero | tr "\0" a); while :; do :; done']
    resources:
      requests: {cpu: 100m}
      limits: {cpu: 300m}
"#;

fn burner(load_dir: &str) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: burner, namespace: top}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: burner}}}}
  template:
    metadata: {{labels: {{app: burner}}}}
    spec:
      terminationGracePeriodSeconds: 1
      volumes: [{{name: load, hostPath: {{path: {load_dir}, type: Directory}}}}]
      containers:
      - name: burn
        image: host
        # Spins while /load/on exists, idles otherwise.
        command: [sh, -c, 'while :; do if [ -e /load/on ]; then :; else sleep 1; fi; done']
        volumeMounts: [{{name: load, mountPath: /load}}]
        resources:
          requests: {{cpu: 100m}}
          limits: {{cpu: 200m}}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: burner
  namespace: top
  annotations: {{autoscaling.skep.io/sync-period-seconds: "3"}}
spec:
  scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: burner}}
  minReplicas: 1
  maxReplicas: 3
  metrics:
  - type: Resource
    resource: {{name: cpu, target: {{type: Utilization, averageUtilization: 50}}}}
  behavior:
    scaleUp:
      stabilizationWindowSeconds: 0
      policies: [{{type: Pods, value: 1, periodSeconds: 15}}]
    scaleDown:
      stabilizationWindowSeconds: 5
      policies: [{{type: Percent, value: 100, periodSeconds: 5}}]
"#
    )
}

const IDLE: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: idle, namespace: top}
spec:
  replicas: 1
  selector: {matchLabels: {app: idle}}
  template:
    metadata: {labels: {app: idle}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: idle
        image: host
        command: [sleep, infinity]
        resources:
          requests: {cpu: 100m}
"#;

#[test]
fn kubectl_top_prometheus_metrics_and_hpa_scaling() {
    let c = Cluster::start(0);
    c.apply(BURN);
    c.wait_for("pod burn Running", Duration::from_secs(60), |c| {
        c.jsonpath("top", "pod/burn", "{.status.phase}") == "Running"
    });

    // kubectl top pods: the burner at > 100m CPU and some memory.
    let mut top = String::new();
    c.wait_for(
        "kubectl top pods to show burn",
        Duration::from_secs(60),
        |c| {
            let out = c.kubectl(&["top", "pods", "-n", "top"]);
            top = String::from_utf8_lossy(&out.stdout).into_owned();
            out.status.success() && row(&top, "burn").is_some()
        },
    );
    let cols = row(&top, "burn").unwrap();
    assert!(
        millicores(&cols[1]) > 100,
        "a spinning pod (limit 300m) uses > 100m CPU:\n{top}"
    );
    assert!(
        millicores(&cols[1]) <= 400,
        "the CPU limit (300m) holds:\n{top}"
    );
    assert!(mebibytes(&cols[2]) >= 10, "the pod holds ~16 MiB:\n{top}");
    // --containers and -A.
    let out = c.kubectl_ok(&["top", "pods", "-n", "top", "--containers"]);
    let cols = row(&out, "burn").unwrap();
    assert_eq!(cols.len(), 4, "POD NAME CPU MEMORY:\n{out}");
    assert!(millicores(&cols[2]) > 100, "{out}");
    let out = c.kubectl_ok(&["top", "pods", "-A"]);
    let cols = row(&out, "burn").unwrap();
    assert_eq!(cols[0], "top", "{out}");
    // The API itself: a PodMetrics with a window and labels.
    let raw = c.kubectl_ok(&[
        "get",
        "--raw",
        "/apis/metrics.k8s.io/v1beta1/namespaces/top/pods/burn",
    ]);
    let pm: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(pm["kind"], "PodMetrics");
    assert_eq!(pm["metadata"]["labels"]["app"], "burn");
    assert!(pm["window"].as_str().unwrap().ends_with('s'), "{pm}");
    assert_eq!(pm["containers"][0]["name"], "burn");
    // A pod that does not exist is a 404.
    let out = c.kubectl(&[
        "get",
        "--raw",
        "/apis/metrics.k8s.io/v1beta1/namespaces/top/pods/nope",
    ]);
    assert!(!out.status.success());

    // kubectl top nodes: the node, with non-zero CPU and memory.
    let out = c.kubectl_ok(&["top", "nodes"]);
    let cols = row(&out, &c.nodes[0].name).unwrap_or_else(|| panic!("no node row:\n{out}"));
    assert!(millicores(&cols[1]) > 0, "{out}");
    assert!(mebibytes(&cols[3]) > 0, "{out}");
    assert!(cols[2].ends_with('%') && cols[4].ends_with('%'), "{out}");

    // Older kubectl (v2beta1 aggregated discovery) finds the API too.
    for v in ["1.27", "1.30"] {
        for what in [&["top", "pods", "-n", "top"][..], &["top", "nodes"][..]] {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &c.nodes[0].netns])
                .arg(format!("/usr/lib/google-cloud-sdk/bin/kubectl.{v}"))
                .arg("--kubeconfig")
                .arg(c.kubeconfig())
                .args(what)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("CPU(cores)"),
                "kubectl {v} {what:?}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    // Prometheus: counters move, the histogram and process metrics exist.
    let first = c.kubectl_ok(&["get", "--raw", "/metrics"]);
    c.kubectl_ok(&["get", "pods", "-n", "top"]);
    let second = c.kubectl_ok(&["get", "--raw", "/metrics"]);
    assert!(
        total_requests(&second) > total_requests(&first),
        "apiserver_request_total grows"
    );
    for family in [
        "apiserver_request_duration_seconds_bucket{",
        "apiserver_current_inflight_requests{request_kind=\"readOnly\"}",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
    ] {
        assert!(second.contains(family), "{family} in /metrics:\n{second}");
    }
    assert!(
        second.contains("apiserver_request_total{verb=\"list\",resource=\"pods\",code=\"200\"}")
    );

    // The spinning pod is not needed any more; free the CPU.
    c.kubectl_ok(&["delete", "pod", "burn", "-n", "top", "--wait=false"]);

    // kubectl autoscale makes an autoscaling/v2 HPA that reports metrics.
    c.apply(IDLE);
    c.kubectl_ok(&[
        "autoscale",
        "deployment",
        "idle",
        "-n",
        "top",
        "--cpu-percent=50",
        "--min=1",
        "--max=2",
    ]);
    c.kubectl_ok(&[
        "annotate",
        "hpa",
        "idle",
        "-n",
        "top",
        "autoscaling.skep.io/sync-period-seconds=3",
    ]);

    // HPA on a burning Deployment: scales out one pod per 15 s.
    let load = c.dir.path().join("load");
    std::fs::create_dir_all(&load).unwrap();
    std::fs::write(load.join("on"), "").unwrap();
    c.apply(&burner(&load.display().to_string()));
    let replicas = |c: &Cluster| -> i64 {
        c.jsonpath("top", "deployment/burner", "{.spec.replicas}")
            .parse()
            .unwrap_or(0)
    };
    let mut steps: Vec<(Instant, i64)> = vec![(Instant::now(), 1)];
    c.wait_for(
        "the HPA to scale burner to 3",
        Duration::from_secs(150),
        |c| {
            let n = replicas(c);
            if n != steps.last().unwrap().1 {
                steps.push((Instant::now(), n));
            }
            n == 3
        },
    );
    let counts: Vec<i64> = steps.iter().map(|s| s.1).collect();
    assert_eq!(counts, [1, 2, 3], "one pod at a time: {counts:?}");
    let gap = steps[2].0 - steps[1].0;
    assert!(
        gap >= Duration::from_secs(12),
        "the scale-up policy (1 pod per 15 s) spaces the steps: {gap:?}"
    );
    let utilization: i64 = c
        .jsonpath(
            "top",
            "hpa/burner",
            "{.status.currentMetrics[0].resource.current.averageUtilization}",
        )
        .parse()
        .unwrap();
    assert!(utilization > 50, "the HPA sees the load: {utilization}%");
    assert_eq!(
        c.jsonpath(
            "top",
            "hpa/burner",
            "{.status.conditions[?(@.type==\"ScalingActive\")].status}"
        ),
        "True"
    );
    assert!(
        !c.jsonpath("top", "hpa/burner", "{.status.lastScaleTime}")
            .is_empty()
    );
    let described = c.kubectl_ok(&["describe", "hpa", "burner", "-n", "top"]);
    assert!(
        described.contains("resource cpu on pods  (as a percentage of request):")
            && described.contains("/ 50%"),
        "kubectl describe shows current/target:\n{described}"
    );
    let listed = c.kubectl_ok(&["get", "hpa", "-n", "top"]);
    assert!(
        listed.contains("burner") && listed.contains("idle"),
        "{listed}"
    );

    // The idle HPA made by kubectl autoscale reports a low utilization
    // and keeps one replica.
    c.wait_for(
        "the idle HPA to report metrics",
        Duration::from_secs(60),
        |c| {
            !c.jsonpath(
                "top",
                "hpa/idle",
                "{.status.currentMetrics[0].resource.current.averageUtilization}",
            )
            .is_empty()
        },
    );
    let idle: i64 = c
        .jsonpath(
            "top",
            "hpa/idle",
            "{.status.currentMetrics[0].resource.current.averageUtilization}",
        )
        .parse()
        .unwrap();
    assert!(idle < 50, "sleep uses no CPU: {idle}%");
    assert_eq!(
        c.jsonpath("top", "deployment/idle", "{.spec.replicas}"),
        "1"
    );

    // Load off: back to the minimum once the 5 s window has passed.
    std::fs::remove_file(load.join("on")).unwrap();
    c.wait_for(
        "the HPA to scale burner back to 1",
        Duration::from_secs(90),
        |c| replicas(c) == 1,
    );
    assert_eq!(
        c.jsonpath("top", "hpa/burner", "{.status.desiredReplicas}"),
        "1"
    );
}
