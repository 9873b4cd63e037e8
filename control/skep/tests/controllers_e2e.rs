//! The scheduler and controllers in a real `skep server --no-agent`, driven
//! with real kubectl. There is no kubelet yet, so `SimKubelet` plays its
//! part over the API: Node objects kept Ready, bound pods reported Running
//! and Ready with an IP, and pods being deleted on a node finished off
//! (grace period 0) — what a kubelet does, nothing the controllers see as
//! special.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Server;
use serde_json::{Value, json};
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

const V: &str = "1.31";

fn api(s: &Server, method: &str, path: &str, ct: &str, body: Option<&str>) -> Value {
    let url = s.url(path);
    let ct_header = format!("Content-Type: {ct}");
    let mut args = vec!["-X", method, "-H", &ct_header];
    if let Some(b) = body {
        args.extend_from_slice(&["-d", b]);
    }
    args.push(&url);
    let out = s.curl_admin(&args);
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn add_node(s: &Server, name: &str, labels: Value, pods: u32) {
    let node = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels}});
    api(
        s,
        "POST",
        "/api/v1/nodes",
        "application/json",
        Some(&node.to_string()),
    );
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "capacity": {"cpu": "4", "memory": "8Gi", "pods": pods.to_string()},
        "allocatable": {"cpu": "4", "memory": "8Gi", "pods": pods.to_string()},
    }});
    let out = api(
        s,
        "PATCH",
        &format!("/api/v1/nodes/{name}/status"),
        "application/merge-patch+json",
        Some(&status.to_string()),
    );
    assert!(
        out.pointer("/status/allocatable/pods").is_some(),
        "node status: {out}"
    );
}

/// Stands in for the kubelets of every node.
struct SimKubelet {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl SimKubelet {
    fn start(s: &Server) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let port = s.port;
        let dir = s.dir.path().to_owned();
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let token = std::fs::read_to_string(dir.join("admin-token"))
                .unwrap()
                .trim()
                .to_owned();
            let curl = |args: &[&str]| {
                std::process::Command::new("curl")
                    .args(["-sS", "--max-time", "20", "--cacert"])
                    .arg(dir.join("tls/ca.crt"))
                    .args(["-H", &format!("Authorization: Bearer {token}")])
                    .args(args)
                    .output()
                    .unwrap()
            };
            let base = format!("https://127.0.0.1:{port}");
            let mut next_ip = 10u32;
            let mut last_beat = Instant::now() - Duration::from_secs(60);
            let mut beat = 0u32;
            while !flag.load(Ordering::Relaxed) {
                // Node heartbeats, so the node lifecycle controller keeps
                // the nodes Ready however slow the machine is.
                if last_beat.elapsed() > Duration::from_secs(2) {
                    last_beat = Instant::now();
                    beat += 1;
                    let out = curl(&[&format!("{base}/api/v1/nodes")]);
                    let nodes: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                    for n in nodes["items"].as_array().into_iter().flatten() {
                        let name = n["metadata"]["name"].as_str().unwrap_or("");
                        let status = json!({"status": {"conditions": [{
                            "type": "Ready", "status": "True", "reason": "KubeletReady",
                            "lastHeartbeatTime": format!("2026-01-01T00:{:02}:{:02}Z", (beat / 60) % 60, beat % 60),
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
                        curl(&[
                            "-X",
                            "PATCH",
                            "-H",
                            "Content-Type: application/merge-patch+json",
                            "-d",
                            &status.to_string(),
                            &format!("{base}/api/v1/nodes/{name}/status"),
                        ]);
                    }
                }
                let out = curl(&[&format!("{base}/api/v1/pods")]);
                let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                for p in list["items"].as_array().into_iter().flatten() {
                    let node = p["spec"]["nodeName"].as_str().unwrap_or("");
                    if node.is_empty() {
                        continue;
                    }
                    let ns = p["metadata"]["namespace"].as_str().unwrap();
                    let name = p["metadata"]["name"].as_str().unwrap();
                    let path = format!("{base}/api/v1/namespaces/{ns}/pods/{name}");
                    if !p["metadata"]["deletionTimestamp"].is_null() {
                        curl(&[
                            "-X",
                            "DELETE",
                            "-H",
                            "Content-Type: application/json",
                            "-d",
                            r#"{"gracePeriodSeconds":0}"#,
                            &path,
                        ]);
                        continue;
                    }
                    // Containers of image `…exit0` / `…exit1` end at once
                    // (succeeded / failed); others keep running.
                    let image = p["spec"]["containers"][0]["image"].as_str().unwrap_or("");
                    let (phase, ready) = if image.ends_with("exit0") {
                        ("Succeeded", "False")
                    } else if image.ends_with("exit1") {
                        ("Failed", "False")
                    } else {
                        ("Running", "True")
                    };
                    if p["status"]["phase"] == phase {
                        continue;
                    }
                    next_ip += 1;
                    let ip = format!("10.42.{}.{}", next_ip / 250, next_ip % 250 + 2);
                    let now = "2026-01-01T00:00:00Z";
                    let status = json!({"status": {
                        "phase": phase, "podIP": ip, "podIPs": [{"ip": ip}],
                        "hostIP": "192.168.50.1", "startTime": now,
                        "conditions": [
                            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                            {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
                            {"type": "Ready", "status": ready, "lastTransitionTime": now}],
                    }});
                    curl(&[
                        "-X",
                        "PATCH",
                        "-H",
                        "Content-Type: application/merge-patch+json",
                        "-d",
                        &status.to_string(),
                        &format!("{path}/status"),
                    ]);
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SimKubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls `f` until it returns Some, or fails after `secs` with `what`.
fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(200));
    }
}

fn items(s: &Server, args: &[&str]) -> Vec<Value> {
    s.json(V, args)["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn running_pods(s: &Server, ns: &str, selector: &str) -> Vec<Value> {
    items(s, &["-n", ns, "get", "pods", "-l", selector])
        .into_iter()
        .filter(|p| {
            p["metadata"]["deletionTimestamp"].is_null() && p["status"]["phase"] == "Running"
        })
        .collect()
}

/// Samples, until stopped, how many pods of `selector` are Ready and not
/// being deleted; returns the smallest count seen.
fn sample_available(
    s: &Server,
    ns: &str,
    selector: &str,
) -> (Arc<AtomicBool>, thread::JoinHandle<usize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let dir = s.dir.path().to_owned();
    let url = s.url(&format!(
        "/api/v1/namespaces/{ns}/pods?labelSelector={selector}"
    ));
    let handle = thread::spawn(move || {
        let token = std::fs::read_to_string(dir.join("admin-token")).unwrap();
        let mut min = usize::MAX;
        while !flag.load(Ordering::Relaxed) {
            let out = std::process::Command::new("curl")
                .args(["-sS", "--max-time", "20", "--cacert"])
                .arg(dir.join("tls/ca.crt"))
                .args([
                    "-H",
                    &format!("Authorization: Bearer {}", token.trim()),
                    &url,
                ])
                .output()
                .unwrap();
            let list: Value = serde_json::from_slice(&out.stdout).unwrap();
            let ready = list["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| {
                    p["metadata"]["deletionTimestamp"].is_null()
                        && p["status"]["conditions"].as_array().is_some_and(|cs| {
                            cs.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                })
                .count();
            min = min.min(ready);
            thread::sleep(Duration::from_millis(20));
        }
        min
    });
    (stop, handle)
}

const DEPLOY: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: roll
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  strategy:
    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: registry.example/web:v1
        ports:
        - {containerPort: 8080, name: http}
        resources:
          requests: {cpu: 100m, memory: 64Mi}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: roll
spec:
  selector: {app: web}
  ports:
  - {name: web, port: 80, targetPort: http}
";

fn images(pods: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = pods
        .iter()
        .map(|p| {
            p["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn deployment_schedules_scales_heals_rolls_and_rolls_back() {
    let s = Server::start();
    add_node(&s, "n1", json!({"zone": "a"}), 110);
    add_node(&s, "n2", json!({"zone": "b"}), 110);
    let _kubelet = SimKubelet::start(&s);
    s.k(V, &["create", "namespace", "roll"]);
    s.kubectl_stdin(V, &["apply", "-f", "-"], Some(DEPLOY));

    // 3 pods, bound to the nodes, named after their ReplicaSet.
    s.k(
        V,
        &[
            "-n",
            "roll",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ],
    );
    let pods = running_pods(&s, "roll", "app=web");
    assert_eq!(pods.len(), 3);
    let rs = items(&s, &["-n", "roll", "get", "rs"]);
    assert_eq!(rs.len(), 1);
    let rs1 = rs[0]["metadata"]["name"].as_str().unwrap().to_owned();
    let hash = rs[0]["metadata"]["labels"]["pod-template-hash"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(rs1, format!("web-{hash}"));
    assert_eq!(
        rs[0]["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "1"
    );
    for p in &pods {
        assert!(
            ["n1", "n2"].contains(&p["spec"]["nodeName"].as_str().unwrap()),
            "{p}"
        );
        assert!(
            p["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{rs1}-"))
        );
        assert_eq!(p["metadata"]["ownerReferences"][0]["name"], rs1.as_str());
        assert_eq!(p["metadata"]["labels"]["pod-template-hash"], hash.as_str());
    }
    // Least allocated spreads them over both nodes.
    let on_n1 = pods
        .iter()
        .filter(|p| p["spec"]["nodeName"] == "n1")
        .count();
    assert!((1..=2).contains(&on_n1), "spread: {on_n1} of 3 on n1");
    let d = s.json(V, &["-n", "roll", "get", "deploy", "web"]);
    assert_eq!(d["status"]["availableReplicas"], 3, "{d}");
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "1"
    );
    let conds = d["status"]["conditions"].as_array().unwrap();
    assert!(
        conds
            .iter()
            .any(|c| c["type"] == "Available" && c["status"] == "True")
    );
    assert!(
        conds
            .iter()
            .any(|c| c["type"] == "Progressing" && c["reason"] == "NewReplicaSetAvailable")
    );

    // EndpointSlices list the ready pod IPs with the named port resolved.
    let ips: Vec<String> = pods
        .iter()
        .map(|p| p["status"]["podIP"].as_str().unwrap().to_owned())
        .collect();
    eventually(20, "an EndpointSlice with 3 ready endpoints", || {
        let slices = items(
            &s,
            &[
                "-n",
                "roll",
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=web",
            ],
        );
        let sl = slices.first()?;
        let eps = sl["endpoints"].as_array()?;
        let ready: Vec<&str> = eps
            .iter()
            .filter(|e| e["conditions"]["ready"] == true)
            .map(|e| e["addresses"][0].as_str().unwrap())
            .collect();
        (ready.len() == 3
            && ips.iter().all(|ip| ready.contains(&ip.as_str()))
            && sl["ports"][0]["port"] == 8080
            && sl["ports"][0]["name"] == "web")
            .then_some(())
    });
    let ep = s.json(V, &["-n", "roll", "get", "endpoints", "web"]);
    assert_eq!(
        ep["subsets"][0]["addresses"].as_array().unwrap().len(),
        3,
        "{ep}"
    );
    assert_eq!(ep["subsets"][0]["ports"][0]["port"], 8080);

    // Scaling up and down.
    s.k(V, &["-n", "roll", "scale", "deploy/web", "--replicas=5"]);
    eventually(30, "5 running pods", || {
        (running_pods(&s, "roll", "app=web").len() == 5).then_some(())
    });
    s.k(V, &["-n", "roll", "scale", "deploy/web", "--replicas=2"]);
    eventually(30, "2 pods", || {
        (items(&s, &["-n", "roll", "get", "pods", "-l", "app=web"]).len() == 2).then_some(())
    });

    // A deleted pod is replaced.
    let victim = running_pods(&s, "roll", "app=web")[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    s.k(
        V,
        &[
            "-n",
            "roll",
            "delete",
            "pod",
            &victim,
            "--wait=true",
            "--timeout=30s",
        ],
    );
    eventually(30, "a replacement pod", || {
        let pods = running_pods(&s, "roll", "app=web");
        (pods.len() == 2
            && pods
                .iter()
                .all(|p| p["metadata"]["name"] != victim.as_str()))
        .then_some(())
    });

    // Rolling update v1 → v2, sampled: with maxUnavailable 0 both
    // replicas stay available throughout.
    let (stop, sampler) = sample_available(&s, "roll", "app=web");
    s.k(
        V,
        &[
            "-n",
            "roll",
            "set",
            "image",
            "deploy/web",
            "web=registry.example/web:v2",
        ],
    );
    s.k(
        V,
        &[
            "-n",
            "roll",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ],
    );
    eventually(30, "only v2 pods", || {
        let pods = items(&s, &["-n", "roll", "get", "pods", "-l", "app=web"]);
        (images(&pods) == vec!["registry.example/web:v2"; 2]).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    assert_eq!(
        sampler.join().unwrap(),
        2,
        "availability dropped during the rollout"
    );
    let rs = items(&s, &["-n", "roll", "get", "rs"]);
    assert_eq!(rs.len(), 2);
    let by_rev = |r: &str| {
        rs.iter()
            .find(|x| x["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == r)
            .unwrap_or_else(|| panic!("no ReplicaSet of revision {r}: {rs:?}"))
            .clone()
    };
    assert_eq!(by_rev("1")["metadata"]["name"], rs1.as_str());
    assert_eq!(by_rev("1")["spec"]["replicas"], 0);
    assert_eq!(by_rev("2")["spec"]["replicas"], 2);
    let d = s.json(V, &["-n", "roll", "get", "deploy", "web"]);
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "2"
    );
    let history = s.k(V, &["-n", "roll", "rollout", "history", "deploy/web"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");

    // Undo: back to v1, which becomes revision 3.
    s.k(V, &["-n", "roll", "rollout", "undo", "deploy/web"]);
    s.k(
        V,
        &[
            "-n",
            "roll",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ],
    );
    eventually(30, "only v1 pods again", || {
        let pods = items(&s, &["-n", "roll", "get", "pods", "-l", "app=web"]);
        (images(&pods) == vec!["registry.example/web:v1"; 2]).then_some(())
    });
    let rs = items(&s, &["-n", "roll", "get", "rs"]);
    let v1 = rs
        .iter()
        .find(|x| x["metadata"]["name"] == rs1.as_str())
        .unwrap();
    assert_eq!(
        v1["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );
    assert_eq!(v1["spec"]["replicas"], 2);
    let d = s.json(V, &["-n", "roll", "get", "deploy", "web"]);
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );
    // What the controllers did, in `kubectl describe`'s Events.
    let described = s.k(V, &["-n", "roll", "describe", "deploy", "web"]);
    assert!(
        described.contains("ScalingReplicaSet")
            && described.contains(&format!("Scaled up replica set {rs1} to")),
        "{described}"
    );
    let described = s.k(V, &["-n", "roll", "describe", "rs", rs1.as_str()]);
    assert!(
        described.contains("SuccessfulCreate") && described.contains("Created pod: "),
        "{described}"
    );
}

const RS: &str = "apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: NAME
  namespace: gc
spec:
  replicas: 2
  selector:
    matchLabels: {app: NAME}
  template:
    metadata:
      labels: {app: NAME}
    spec:
      containers:
      - {name: c, image: registry.example/c:v1}
";

#[test]
fn garbage_collection_background_foreground_and_orphan() {
    let s = Server::start();
    add_node(&s, "n1", json!({}), 110);
    let _kubelet = SimKubelet::start(&s);
    s.k(V, &["create", "namespace", "gc"]);
    for name in ["bg", "fg", "orph"] {
        s.kubectl_stdin(V, &["apply", "-f", "-"], Some(&RS.replace("NAME", name)));
    }
    for name in ["bg", "fg", "orph"] {
        eventually(30, "2 running pods per ReplicaSet", || {
            (running_pods(&s, "gc", &format!("app={name}")).len() == 2).then_some(())
        });
    }

    // Orphan: the ReplicaSet goes, its pods stay without the reference.
    s.k(
        V,
        &[
            "-n",
            "gc",
            "delete",
            "rs",
            "orph",
            "--cascade=orphan",
            "--timeout=30s",
        ],
    );
    let out = s.kubectl(V, &["-n", "gc", "get", "rs", "orph"]);
    assert!(!out.status.success());
    let pods = items(&s, &["-n", "gc", "get", "pods", "-l", "app=orph"]);
    assert_eq!(pods.len(), 2);
    for p in &pods {
        assert!(
            p["metadata"]["ownerReferences"].is_null(),
            "still owned: {p}"
        );
        assert!(p["metadata"]["deletionTimestamp"].is_null());
    }

    // Foreground: kubectl waits until the owner is gone, which happens
    // only after its pods are.
    s.k(
        V,
        &[
            "-n",
            "gc",
            "delete",
            "rs",
            "fg",
            "--cascade=foreground",
            "--timeout=30s",
        ],
    );
    assert!(items(&s, &["-n", "gc", "get", "pods", "-l", "app=fg"]).is_empty());
    let out = s.kubectl(V, &["-n", "gc", "get", "rs", "fg"]);
    assert!(!out.status.success());

    // Background: the owner goes at once, its pods after.
    s.k(V, &["-n", "gc", "delete", "rs", "bg", "--timeout=30s"]);
    eventually(30, "background-deleted pods gone", || {
        items(&s, &["-n", "gc", "get", "pods", "-l", "app=bg"])
            .is_empty()
            .then_some(())
    });

    // A Deployment deleted in the foreground takes its ReplicaSet and pods
    // with it before it goes.
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(&DEPLOY.replace("namespace: roll", "namespace: gc")),
    );
    s.k(
        V,
        &[
            "-n",
            "gc",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ],
    );
    s.k(
        V,
        &[
            "-n",
            "gc",
            "delete",
            "deploy",
            "web",
            "--cascade=foreground",
            "--timeout=30s",
        ],
    );
    assert!(items(&s, &["-n", "gc", "get", "rs", "-l", "app=web"]).is_empty());
    assert!(items(&s, &["-n", "gc", "get", "pods", "-l", "app=web"]).is_empty());
    // The orphans are still there.
    assert_eq!(
        items(&s, &["-n", "gc", "get", "pods", "-l", "app=orph"]).len(),
        2
    );
    // A new ReplicaSet selecting them adopts them instead of creating pods.
    let orphans: Vec<String> = items(&s, &["-n", "gc", "get", "pods", "-l", "app=orph"])
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    s.kubectl_stdin(V, &["apply", "-f", "-"], Some(&RS.replace("NAME", "orph")));
    let uid = s.json(V, &["-n", "gc", "get", "rs", "orph"])["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually(20, "the orphans adopted", || {
        let pods = items(&s, &["-n", "gc", "get", "pods", "-l", "app=orph"]);
        (pods.len() == 2
            && pods.iter().all(|p| {
                orphans.contains(&p["metadata"]["name"].as_str().unwrap().to_owned())
                    && p["metadata"]["ownerReferences"][0]["uid"] == uid.as_str()
            }))
        .then_some(())
    });
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        items(&s, &["-n", "gc", "get", "pods", "-l", "app=orph"]).len(),
        2,
        "pods were created besides the adopted ones"
    );

    // A Deployment deleted with --cascade=orphan leaves its ReplicaSet and
    // pods; applied again, it adopts them instead of starting over.
    let dep = DEPLOY
        .replace("namespace: roll", "namespace: gc")
        .replace("app: web", "app: kept");
    s.kubectl_stdin(V, &["apply", "-f", "-"], Some(&dep));
    s.k(
        V,
        &[
            "-n",
            "gc",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ],
    );
    let rs_before = items(&s, &["-n", "gc", "get", "rs", "-l", "app=kept"]);
    assert_eq!(rs_before.len(), 1);
    s.k(
        V,
        &[
            "-n",
            "gc",
            "delete",
            "deploy",
            "web",
            "--cascade=orphan",
            "--timeout=30s",
        ],
    );
    let rs = items(&s, &["-n", "gc", "get", "rs", "-l", "app=kept"]);
    assert_eq!(rs.len(), 1);
    assert!(rs[0]["metadata"]["ownerReferences"].is_null(), "{}", rs[0]);
    s.kubectl_stdin(V, &["apply", "-f", "-"], Some(&dep));
    let uid = s.json(V, &["-n", "gc", "get", "deploy", "web"])["metadata"]["uid"].clone();
    eventually(20, "the ReplicaSet adopted", || {
        let rs = items(&s, &["-n", "gc", "get", "rs", "-l", "app=kept"]);
        (rs.len() == 1
            && rs[0]["metadata"]["name"] == rs_before[0]["metadata"]["name"]
            && rs[0]["metadata"]["ownerReferences"][0]["uid"] == uid)
            .then_some(())
    });
    s.k(
        V,
        &[
            "-n",
            "gc",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ],
    );
    assert_eq!(running_pods(&s, "gc", "app=kept").len(), 3);
}

#[test]
fn scheduler_explains_unschedulable_pods_and_retries_on_node_changes() {
    let s = Server::start();
    add_node(&s, "small", json!({"disk": "hdd"}), 1);
    s.k(V, &["create", "namespace", "sched"]);
    let pod = |name: &str, selector: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: sched}}\nspec:\n  nodeSelector: {selector}\n  containers:\n  - {{name: c, image: x}}\n"
        )
    };
    s.kubectl_stdin(V, &["apply", "-f", "-"], Some(&pod("ssd", "{disk: ssd}")));
    let cond = eventually(20, "PodScheduled=False", || {
        let p = s.json(V, &["-n", "sched", "get", "pod", "ssd"]);
        p["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")
            .cloned()
    });
    assert_eq!(cond["reason"], "Unschedulable");
    assert_eq!(
        cond["message"],
        "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
    );
    // One pod fits on `small`; a second one does not (pod count).
    s.kubectl_stdin(V, &["apply", "-f", "-"], Some(&pod("a", "{disk: hdd}")));
    eventually(20, "pod a bound", || {
        (s.json(V, &["-n", "sched", "get", "pod", "a"])["spec"]["nodeName"] == "small")
            .then_some(())
    });
    s.kubectl_stdin(V, &["apply", "-f", "-"], Some(&pod("b", "{disk: hdd}")));
    eventually(20, "pod b rejected for pod count", || {
        let p = s.json(V, &["-n", "sched", "get", "pod", "b"]);
        let c = p["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "PodScheduled")?
            .clone();
        (c["message"] == "0/1 nodes are available: 1 Too many pods.").then_some(())
    });
    // A cordoned node and a tainted node are named too; a matching node
    // makes the first pod schedule.
    add_node(&s, "fast", json!({"disk": "ssd"}), 110);
    eventually(20, "pod ssd bound to fast", || {
        (s.json(V, &["-n", "sched", "get", "pod", "ssd"])["spec"]["nodeName"] == "fast")
            .then_some(())
    });
    s.k(V, &["cordon", "fast"]);
    s.kubectl_stdin(V, &["apply", "-f", "-"], Some(&pod("c", "{disk: ssd}")));
    eventually(20, "pod c rejected by the cordon", || {
        let p = s.json(V, &["-n", "sched", "get", "pod", "c"]);
        let c = p["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "PodScheduled")?
            .clone();
        let m = c["message"].as_str()?.to_owned();
        (m.contains("1 node(s) were unschedulable")
            && m.contains("1 node(s) didn't match Pod's node affinity/selector"))
        .then_some(())
    });
    s.k(V, &["uncordon", "fast"]);
    eventually(20, "pod c bound after uncordon", || {
        (s.json(V, &["-n", "sched", "get", "pod", "c"])["spec"]["nodeName"] == "fast").then_some(())
    });
    // The scheduler's story, as `kubectl describe pod` tells it: why it
    // waited (once per distinct reason), then where it went.
    let described = eventually(
        20,
        "FailedScheduling and Scheduled events on pod ssd",
        || {
            let d = s.k(V, &["-n", "sched", "describe", "pod", "ssd"]);
            (d.contains("FailedScheduling")
                && d.contains(
                    "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.",
                )
                && d.contains("Successfully assigned sched/ssd to fast"))
            .then_some(d)
        },
    );
    assert!(described.contains("default-scheduler"), "{described}");
    let events = items(
        &s,
        &[
            "-n",
            "sched",
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=c",
        ],
    );
    let failed: Vec<&Value> = events
        .iter()
        .filter(|e| e["reason"] == "FailedScheduling")
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "one FailedScheduling event for pod c: {events:#?}"
    );
    assert_eq!(failed[0]["type"], "Warning");
    assert_eq!(failed[0]["involvedObject"]["kind"], "Pod");
}

#[test]
fn namespaces_get_a_default_service_account_and_kubernetes_has_endpoints() {
    let s = Server::start();
    s.k(V, &["create", "namespace", "fresh"]);
    for ns in [
        "default",
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "fresh",
    ] {
        eventually(20, "a default ServiceAccount", || {
            s.kubectl(V, &["-n", ns, "get", "serviceaccount", "default"])
                .status
                .success()
                .then_some(())
        });
    }
    // Deleted, it comes back.
    s.k(V, &["-n", "fresh", "delete", "serviceaccount", "default"]);
    eventually(20, "the default ServiceAccount recreated", || {
        s.kubectl(V, &["-n", "fresh", "get", "serviceaccount", "default"])
            .status
            .success()
            .then_some(())
    });
    let ep = eventually(20, "default/kubernetes endpoints", || {
        let out = s.kubectl(
            V,
            &[
                "-n",
                "default",
                "get",
                "endpoints",
                "kubernetes",
                "-o",
                "json",
            ],
        );
        out.status
            .success()
            .then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap())
    });
    assert_eq!(ep["subsets"][0]["addresses"][0]["ip"], "127.0.0.1", "{ep}");
    assert_eq!(ep["subsets"][0]["ports"][0]["port"], s.port);
    let slice = s.json(V, &["-n", "default", "get", "endpointslice", "kubernetes"]);
    assert_eq!(slice["endpoints"][0]["addresses"][0], "127.0.0.1");
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "kubernetes"
    );
    // The controller manager holds its Lease.
    let lease = s.json(
        V,
        &[
            "-n",
            "kube-system",
            "get",
            "lease",
            "skep-controller-manager",
        ],
    );
    assert!(!lease["spec"]["holderIdentity"].as_str().unwrap().is_empty());
}

#[test]
fn recreate_history_limit_pause_resume_and_restart() {
    let s = Server::start();
    add_node(&s, "n1", json!({}), 110);
    let _kubelet = SimKubelet::start(&s);
    s.k(V, &["create", "namespace", "rec"]);
    let manifest = DEPLOY.replace("namespace: roll", "namespace: rec").replace(
        "  strategy:\n    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}\n",
        "  strategy: {type: Recreate}\n  revisionHistoryLimit: 1\n",
    );
    s.kubectl_stdin(V, &["apply", "-f", "-"], Some(&manifest));
    s.k(
        V,
        &[
            "-n",
            "rec",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ],
    );

    // Recreate: no v2 pod exists while any v1 pod does.
    let (stop, sampler) = {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let dir = s.dir.path().to_owned();
        let url = s.url("/api/v1/namespaces/rec/pods");
        let h = thread::spawn(move || {
            let token = std::fs::read_to_string(dir.join("admin-token")).unwrap();
            let mut mixed = 0;
            while !flag.load(Ordering::Relaxed) {
                let out = std::process::Command::new("curl")
                    .args(["-sS", "--max-time", "20", "--cacert"])
                    .arg(dir.join("tls/ca.crt"))
                    .args([
                        "-H",
                        &format!("Authorization: Bearer {}", token.trim()),
                        &url,
                    ])
                    .output()
                    .unwrap();
                let list: Value = serde_json::from_slice(&out.stdout).unwrap();
                let imgs: Vec<&str> = list["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["spec"]["containers"][0]["image"].as_str().unwrap())
                    .collect();
                if imgs.iter().any(|i| i.ends_with(":v1"))
                    && imgs.iter().any(|i| i.ends_with(":v2"))
                {
                    mixed += 1;
                }
                thread::sleep(Duration::from_millis(20));
            }
            mixed
        });
        (stop, h)
    };
    s.k(
        V,
        &[
            "-n",
            "rec",
            "set",
            "image",
            "deploy/web",
            "web=registry.example/web:v2",
        ],
    );
    s.k(
        V,
        &[
            "-n",
            "rec",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ],
    );
    eventually(30, "3 v2 pods", || {
        let pods = items(&s, &["-n", "rec", "get", "pods"]);
        (images(&pods) == vec!["registry.example/web:v2"; 3]).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    assert_eq!(
        sampler.join().unwrap(),
        0,
        "v1 and v2 pods coexisted under Recreate"
    );

    // A third template: with revisionHistoryLimit 1 only one old
    // ReplicaSet is kept.
    s.k(
        V,
        &[
            "-n",
            "rec",
            "set",
            "image",
            "deploy/web",
            "web=registry.example/web:v3",
        ],
    );
    s.k(
        V,
        &[
            "-n",
            "rec",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ],
    );
    eventually(30, "history trimmed to one old ReplicaSet", || {
        let rs = items(&s, &["-n", "rec", "get", "rs"]);
        let mut revs: Vec<String> = rs
            .iter()
            .map(|r| {
                r["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        revs.sort();
        (revs == ["2", "3"]).then_some(())
    });

    // Paused: template changes wait; resumed: they roll out.
    s.k(V, &["-n", "rec", "rollout", "pause", "deploy/web"]);
    s.k(
        V,
        &[
            "-n",
            "rec",
            "set",
            "image",
            "deploy/web",
            "web=registry.example/web:v4",
        ],
    );
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        items(&s, &["-n", "rec", "get", "rs"]).len(),
        2,
        "a paused Deployment rolled"
    );
    s.k(V, &["-n", "rec", "rollout", "resume", "deploy/web"]);
    s.k(
        V,
        &[
            "-n",
            "rec",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ],
    );
    eventually(30, "v4 pods", || {
        let pods = items(&s, &["-n", "rec", "get", "pods"]);
        (images(&pods) == vec!["registry.example/web:v4"; 3]).then_some(())
    });

    // rollout restart: same image, new pods, a new revision.
    let before: Vec<String> = items(&s, &["-n", "rec", "get", "pods"])
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    s.k(V, &["-n", "rec", "rollout", "restart", "deploy/web"]);
    s.k(
        V,
        &[
            "-n",
            "rec",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ],
    );
    eventually(30, "restarted pods", || {
        let pods = running_pods(&s, "rec", "app=web");
        (pods.len() == 3
            && items(&s, &["-n", "rec", "get", "pods"]).len() == 3
            && pods
                .iter()
                .all(|p| !before.contains(&p["metadata"]["name"].as_str().unwrap().to_owned())))
        .then_some(())
    });
    let d = s.json(V, &["-n", "rec", "get", "deploy", "web"]);
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "5"
    );
}

fn job(name: &str, image: &str, extra: &str) -> String {
    format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata: {{name: {name}, namespace: jobs}}\nspec:\n{extra}  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - {{name: c, image: {image}}}\n"
    )
}

#[test]
fn jobs_complete_fail_index_and_expire() {
    let s = Server::start();
    add_node(&s, "n1", json!({}), 110);
    let _kubelet = SimKubelet::start(&s);
    s.k(V, &["create", "namespace", "jobs"]);

    // completions 3, parallelism 2.
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(&job(
            "ok",
            "x/exit0",
            "  completions: 3\n  parallelism: 2\n",
        )),
    );
    s.k(
        V,
        &[
            "-n",
            "jobs",
            "wait",
            "--for=condition=complete",
            "job/ok",
            "--timeout=30s",
        ],
    );
    let j = s.json(V, &["-n", "jobs", "get", "job", "ok"]);
    assert_eq!(j["status"]["succeeded"], 3, "{j}");
    assert_eq!(j["status"]["active"], 0);
    assert!(j["status"]["completionTime"].is_string());
    let pods = items(&s, &["-n", "jobs", "get", "pods", "-l", "job-name=ok"]);
    assert_eq!(pods.len(), 3);

    // backoffLimit 1: the second failure fails the Job.
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(&job("bad", "x/exit1", "  backoffLimit: 1\n")),
    );
    s.k(
        V,
        &[
            "-n",
            "jobs",
            "wait",
            "--for=condition=failed",
            "job/bad",
            "--timeout=30s",
        ],
    );
    let j = s.json(V, &["-n", "jobs", "get", "job", "bad"]);
    assert_eq!(j["status"]["failed"], 2, "{j}");
    let failed = j["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Failed")
        .unwrap()
        .clone();
    assert_eq!(failed["reason"], "BackoffLimitExceeded");

    // Indexed: one pod per index.
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(&job(
            "idx",
            "x/exit0",
            "  completions: 3\n  parallelism: 3\n  completionMode: Indexed\n",
        )),
    );
    s.k(
        V,
        &[
            "-n",
            "jobs",
            "wait",
            "--for=condition=complete",
            "job/idx",
            "--timeout=30s",
        ],
    );
    let j = s.json(V, &["-n", "jobs", "get", "job", "idx"]);
    assert_eq!(j["status"]["completedIndexes"], "0-2", "{j}");
    let mut hosts: Vec<String> = items(&s, &["-n", "jobs", "get", "pods", "-l", "job-name=idx"])
        .iter()
        .map(|p| p["spec"]["hostname"].as_str().unwrap().to_owned())
        .collect();
    hosts.sort();
    assert_eq!(hosts, ["idx-0", "idx-1", "idx-2"]);

    // ttlSecondsAfterFinished: the finished Job and its pods go.
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(&job("brief", "x/exit0", "  ttlSecondsAfterFinished: 1\n")),
    );
    eventually(30, "the expired Job deleted with its pods", || {
        let gone = !s
            .kubectl(V, &["-n", "jobs", "get", "job", "brief"])
            .status
            .success();
        (gone && items(&s, &["-n", "jobs", "get", "pods", "-l", "job-name=brief"]).is_empty())
            .then_some(())
    });
}

#[test]
fn daemonset_follows_nodes_and_rolls() {
    let s = Server::start();
    add_node(&s, "a", json!({"disk": "ssd"}), 110);
    add_node(&s, "b", json!({"disk": "ssd"}), 110);
    add_node(&s, "c", json!({}), 110);
    add_node(&s, "d", json!({"disk": "ssd"}), 110);
    s.k(V, &["taint", "node", "d", "dedicated=db:NoSchedule"]);
    let _kubelet = SimKubelet::start(&s);
    s.k(V, &["create", "namespace", "ds"]);
    let manifest = "apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: ds}
spec:
  selector:
    matchLabels: {app: agent}
  template:
    metadata:
      labels: {app: agent}
    spec:
      nodeSelector: {disk: ssd}
      containers:
      - {name: c, image: registry.example/agent:v1}
";
    s.kubectl_stdin(V, &["apply", "-f", "-"], Some(manifest));
    s.k(
        V,
        &["-n", "ds", "rollout", "status", "ds/agent", "--timeout=60s"],
    );
    let nodes_of = || {
        let mut n: Vec<String> = running_pods(&s, "ds", "app=agent")
            .iter()
            .map(|p| p["spec"]["nodeName"].as_str().unwrap().to_owned())
            .collect();
        n.sort();
        n
    };
    // Not on c (selector) nor d (untolerated taint).
    assert_eq!(nodes_of(), ["a", "b"]);
    let d = s.json(V, &["-n", "ds", "get", "ds", "agent"]);
    assert_eq!(d["status"]["desiredNumberScheduled"], 2, "{d}");

    // A node that starts matching gets a pod.
    s.k(V, &["label", "node", "c", "disk=ssd"]);
    eventually(30, "a pod on c", || {
        (nodes_of() == ["a", "b", "c"]).then_some(())
    });

    // Rolling update to v2.
    s.k(
        V,
        &[
            "-n",
            "ds",
            "set",
            "image",
            "ds/agent",
            "c=registry.example/agent:v2",
        ],
    );
    s.k(
        V,
        &["-n", "ds", "rollout", "status", "ds/agent", "--timeout=60s"],
    );
    eventually(30, "v2 on every node", || {
        let pods = items(&s, &["-n", "ds", "get", "pods", "-l", "app=agent"]);
        (images(&pods) == vec!["registry.example/agent:v2"; 3]).then_some(())
    });
    assert_eq!(nodes_of(), ["a", "b", "c"]);

    // History and undo through ControllerRevisions.
    let history = s.k(V, &["-n", "ds", "rollout", "history", "ds/agent"]);
    assert!(
        history.contains("\n1 ") && history.contains("\n2 "),
        "{history}"
    );
    let out = s.k(V, &["-n", "ds", "rollout", "undo", "ds/agent"]);
    assert!(out.contains("rolled back"), "{out}");
    eventually(60, "v1 back on every node", || {
        let pods = items(&s, &["-n", "ds", "get", "pods", "-l", "app=agent"]);
        (images(&pods) == vec!["registry.example/agent:v1"; 3]).then_some(())
    });
    // The restored template is the newest revision again.
    let history = s.k(V, &["-n", "ds", "rollout", "history", "ds/agent"]);
    assert!(
        history.contains("\n2 ") && history.contains("\n3 ") && !history.contains("\n1 "),
        "{history}"
    );
}

#[test]
fn statefulset_stable_names_claims_order_and_partitioned_update() {
    let s = Server::start();
    add_node(&s, "n1", json!({}), 110);
    let _kubelet = SimKubelet::start(&s);
    s.k(V, &["create", "namespace", "sts"]);
    let manifest = "apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: sts}
spec:
  serviceName: db
  replicas: 3
  selector:
    matchLabels: {app: db}
  template:
    metadata:
      labels: {app: db}
    spec:
      containers:
      - {name: c, image: registry.example/db:v1}
  volumeClaimTemplates:
  - metadata: {name: data}
    spec:
      accessModes: [ReadWriteOnce]
      resources:
        requests: {storage: 1Gi}
";
    s.kubectl_stdin(V, &["apply", "-f", "-"], Some(manifest));
    s.k(
        V,
        &["-n", "sts", "rollout", "status", "sts/db", "--timeout=60s"],
    );
    let names = |s: &Server| {
        let mut n: Vec<String> = running_pods(s, "sts", "app=db")
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&s), ["db-0", "db-1", "db-2"]);
    // Stable identity: hostname, subdomain and a claim per ordinal.
    let pods = items(&s, &["-n", "sts", "get", "pods", "-l", "app=db"]);
    for p in &pods {
        let n = p["metadata"]["name"].as_str().unwrap();
        assert_eq!(p["spec"]["hostname"], n);
        assert_eq!(p["spec"]["subdomain"], "db");
        let claim = format!("data-{n}");
        assert_eq!(
            p["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            claim.as_str()
        );
    }
    let claims = items(&s, &["-n", "sts", "get", "pvc"]);
    assert_eq!(claims.len(), 3);

    // Deleting a pod brings it back under the same name.
    let uid0 = s.json(V, &["-n", "sts", "get", "pod", "db-1"])["metadata"]["uid"].clone();
    s.k(
        V,
        &[
            "-n",
            "sts",
            "delete",
            "pod",
            "db-1",
            "--wait=true",
            "--timeout=30s",
        ],
    );
    eventually(30, "db-1 recreated", || {
        let out = s.kubectl(V, &["-n", "sts", "get", "pod", "db-1", "-o", "json"]);
        let p: Value = serde_json::from_slice(&out.stdout).ok()?;
        (p["metadata"]["uid"] != uid0 && p["status"]["phase"] == "Running").then_some(())
    });

    // Partitioned update: only ordinals ≥ 2 move.
    s.k(V, &["-n", "sts", "patch", "sts", "db", "--type=merge", "-p",
             r#"{"spec":{"updateStrategy":{"type":"RollingUpdate","rollingUpdate":{"partition":2}}}}"#]);
    s.k(
        V,
        &[
            "-n",
            "sts",
            "set",
            "image",
            "sts/db",
            "c=registry.example/db:v2",
        ],
    );
    let out = s.k(
        V,
        &["-n", "sts", "rollout", "status", "sts/db", "--timeout=60s"],
    );
    assert!(out.contains("partitioned roll out complete"), "{out}");
    let image_of = |n: &str| {
        s.json(V, &["-n", "sts", "get", "pod", n])["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(image_of("db-2"), "registry.example/db:v2");
    assert_eq!(image_of("db-1"), "registry.example/db:v1");
    assert_eq!(image_of("db-0"), "registry.example/db:v1");
    // A pod below the partition that is deleted comes back at the current
    // revision (its template kept in a ControllerRevision), not the new one.
    let revisions = items(&s, &["-n", "sts", "get", "controllerrevisions"]);
    assert_eq!(revisions.len(), 2, "{revisions:?}");
    let uid1 = s.json(V, &["-n", "sts", "get", "pod", "db-1"])["metadata"]["uid"].clone();
    s.k(V, &["-n", "sts", "delete", "pod", "db-1"]);
    eventually(30, "db-1 recreated below the partition", || {
        let out = s.kubectl(V, &["-n", "sts", "get", "pod", "db-1", "-o", "json"]);
        let p: Value = serde_json::from_slice(&out.stdout).ok()?;
        (p["metadata"]["uid"] != uid1 && p["status"]["phase"] == "Running").then_some(())
    });
    assert_eq!(image_of("db-1"), "registry.example/db:v1");
    let st = s.json(V, &["-n", "sts", "get", "sts", "db"]);
    assert_eq!(
        s.json(V, &["-n", "sts", "get", "pod", "db-1"])["metadata"]["labels"]["controller-revision-hash"],
        st["status"]["currentRevision"],
        "{st}"
    );

    // Partition 0: the rest follow, highest first.
    s.k(
        V,
        &[
            "-n",
            "sts",
            "patch",
            "sts",
            "db",
            "--type=merge",
            "-p",
            r#"{"spec":{"updateStrategy":{"rollingUpdate":{"partition":0}}}}"#,
        ],
    );
    s.k(
        V,
        &["-n", "sts", "rollout", "status", "sts/db", "--timeout=60s"],
    );
    let st = s.json(V, &["-n", "sts", "get", "sts", "db"]);
    assert_eq!(
        st["status"]["currentRevision"], st["status"]["updateRevision"],
        "{st}"
    );
    for n in ["db-0", "db-1", "db-2"] {
        assert_eq!(image_of(n), "registry.example/db:v2");
    }

    // Scale down removes the highest ordinals; claims stay.
    s.k(V, &["-n", "sts", "scale", "sts/db", "--replicas=1"]);
    eventually(30, "only db-0", || {
        (items(&s, &["-n", "sts", "get", "pods", "-l", "app=db"]).len() == 1
            && names(&s) == ["db-0"])
        .then_some(())
    });
    assert_eq!(items(&s, &["-n", "sts", "get", "pvc"]).len(), 3);
}

#[test]
fn cronjob_starts_jobs_on_schedule() {
    let s = Server::start();
    add_node(&s, "n1", json!({}), 110);
    let _kubelet = SimKubelet::start(&s);
    s.k(V, &["create", "namespace", "cron"]);
    let manifest = "apiVersion: batch/v1
kind: CronJob
metadata: {name: tick, namespace: cron}
spec:
  schedule: '* * * * *'
  timeZone: Europe/Berlin
  concurrencyPolicy: Forbid
  successfulJobsHistoryLimit: 1
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers:
          - {name: c, image: x/exit0}
";
    s.kubectl_stdin(V, &["apply", "-f", "-"], Some(manifest));
    // The next minute boundary starts a Job, which completes.
    let job = eventually(75, "a Job from the CronJob", || {
        items(&s, &["-n", "cron", "get", "jobs"]).into_iter().next()
    });
    let name = job["metadata"]["name"].as_str().unwrap().to_owned();
    assert!(name.starts_with("tick-"), "{name}");
    assert_eq!(job["metadata"]["ownerReferences"][0]["kind"], "CronJob");
    s.k(
        V,
        &[
            "-n",
            "cron",
            "wait",
            "--for=condition=complete",
            &format!("job/{name}"),
            "--timeout=30s",
        ],
    );
    eventually(20, "lastScheduleTime and lastSuccessfulTime", || {
        let cj = s.json(V, &["-n", "cron", "get", "cronjob", "tick"]);
        (cj["status"]["lastScheduleTime"].is_string()
            && cj["status"]["lastSuccessfulTime"].is_string())
        .then_some(())
    });
}

#[test]
fn scheduler_honours_pod_anti_affinity_affinity_and_host_ports() {
    let s = Server::start();
    add_node(
        &s,
        "h1",
        json!({"kubernetes.io/hostname": "h1", "zone": "a"}),
        110,
    );
    add_node(
        &s,
        "h2",
        json!({"kubernetes.io/hostname": "h2", "zone": "b"}),
        110,
    );
    s.k(V, &["create", "namespace", "aff"]);
    let pod = |name: &str, labels: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: aff, labels: {labels}}}\nspec:\n{extra}  containers:\n  - name: c\n    image: x\n"
        )
    };
    let anti = "  affinity:\n    podAntiAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n      - labelSelector: {matchLabels: {app: one}}\n        topologyKey: kubernetes.io/hostname\n";
    for n in ["one-a", "one-b", "one-c"] {
        s.kubectl_stdin(V, &["apply", "-f", "-"], Some(&pod(n, "{app: one}", anti)));
        thread::sleep(Duration::from_millis(300));
    }
    let node_of = |n: &str| {
        s.json(V, &["-n", "aff", "get", "pod", n])["spec"]["nodeName"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    eventually(20, "two pods spread, one unschedulable", || {
        let mut bound: Vec<String> = ["one-a", "one-b", "one-c"]
            .iter()
            .map(|n| node_of(n))
            .filter(|n| !n.is_empty())
            .collect();
        bound.sort();
        (bound == ["h1", "h2"]).then_some(())
    });
    let pending = ["one-a", "one-b", "one-c"]
        .into_iter()
        .find(|n| node_of(n).is_empty())
        .unwrap();
    eventually(20, "the anti-affinity message", || {
        let p = s.json(V, &["-n", "aff", "get", "pod", pending]);
        let c = p["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "PodScheduled")?
            .clone();
        (c["message"] == "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules.")
            .then_some(())
    });

    // Symmetry: a pod without affinity of its own but matching theirs is
    // kept off their nodes too.
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(&pod("plain-one", "{app: one}", "")),
    );
    eventually(20, "the symmetric anti-affinity message", || {
        let p = s.json(V, &["-n", "aff", "get", "pod", "plain-one"]);
        let c = p["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "PodScheduled")?
            .clone();
        (c["message"] == "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules.")
            .then_some(())
    });

    // Affinity: must share a zone with an `app: one` pod.
    let follow = "  affinity:\n    podAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n      - labelSelector: {matchLabels: {app: one}}\n        topologyKey: zone\n";
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(&pod("friend", "{app: friend}", follow)),
    );
    let anywhere_ok = eventually(20, "friend bound", || {
        let n = node_of("friend");
        (!n.is_empty()).then_some(n)
    });
    // Both zones host an `app: one` pod, so either node satisfies it; a
    // selector nobody matches leaves the pod pending.
    assert!(["h1", "h2"].contains(&anywhere_ok.as_str()));
    let lonely = "  affinity:\n    podAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n      - labelSelector: {matchLabels: {app: nobody}}\n        topologyKey: zone\n";
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(&pod("lonely", "{app: lonely}", lonely)),
    );
    eventually(20, "the affinity message", || {
        let p = s.json(V, &["-n", "aff", "get", "pod", "lonely"]);
        let c = p["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "PodScheduled")?
            .clone();
        (c["message"] == "0/2 nodes are available: 2 node(s) didn't match pod affinity rules.")
            .then_some(())
    });

    // Host ports: two pods asking for the same one go to different nodes,
    // a third finds none.
    let hp = |n: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {n}, namespace: aff}}\nspec:\n  containers:\n  - name: c\n    image: x\n    ports:\n    - {{containerPort: 80, hostPort: 8080}}\n"
        )
    };
    for n in ["hp-1", "hp-2", "hp-3"] {
        s.kubectl_stdin(V, &["apply", "-f", "-"], Some(&hp(n)));
        thread::sleep(Duration::from_millis(300));
    }
    eventually(20, "host ports on distinct nodes", || {
        let mut nodes: Vec<String> = ["hp-1", "hp-2", "hp-3"]
            .iter()
            .map(|n| node_of(n))
            .collect();
        nodes.sort();
        (nodes == ["", "h1", "h2"]).then_some(())
    });
}

const PDB_DEPLOY: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: pdb
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      terminationGracePeriodSeconds: 0
      containers:
      - {name: web, image: registry.example/web:v1}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: web
  namespace: pdb
spec:
  minAvailable: MIN
  selector:
    matchLabels: {app: web}
";

/// PodDisruptionBudgets: the status follows the pods; an eviction that
/// would break the budget is refused with 429 (kubectl drain reports the
/// budget and retries); with room for one disruption `kubectl drain` moves
/// the Deployment to another node one pod at a time, never below
/// minAvailable Ready pods.
#[test]
fn disruption_budgets_guard_evictions_and_drain() {
    let s = Server::start();
    add_node(&s, "n1", json!({}), 110);
    add_node(&s, "n2", json!({}), 110);
    let _kubelet = SimKubelet::start(&s);
    s.k(V, &["create", "namespace", "pdb"]);
    s.k(V, &["cordon", "n2"]);
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(&PDB_DEPLOY.replace("MIN", "3")),
    );
    eventually(30, "3 web pods Running on n1", || {
        let pods = running_pods(&s, "pdb", "app=web");
        (pods.len() == 3 && pods.iter().all(|p| p["spec"]["nodeName"] == "n1")).then_some(())
    });
    let status = |s: &Server| s.json(V, &["-n", "pdb", "get", "pdb", "web"])["status"].clone();
    let st = eventually(30, "the budget's status: 3 healthy, 3 desired", || {
        let st = status(&s);
        (st["currentHealthy"] == 3 && st["desiredHealthy"] == 3).then_some(st)
    });
    assert_eq!(st["expectedPods"], 3, "{st}");
    assert_eq!(st["disruptionsAllowed"], 0, "{st}");
    assert_eq!(st["conditions"][0]["type"], "DisruptionAllowed", "{st}");
    assert_eq!(st["conditions"][0]["status"], "False", "{st}");

    // No disruption allowed: the eviction API says 429, drain gives up.
    let pod = running_pods(&s, "pdb", "app=web")[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused = api(
        &s,
        "POST",
        &format!("/api/v1/namespaces/pdb/pods/{pod}/eviction"),
        "application/json",
        Some(&format!(
            r#"{{"apiVersion":"policy/v1","kind":"Eviction","metadata":{{"name":"{pod}","namespace":"pdb"}}}}"#
        )),
    );
    assert_eq!(refused["code"], 429, "{refused}");
    assert_eq!(refused["reason"], "TooManyRequests", "{refused}");
    assert_eq!(
        refused["details"]["causes"][0]["message"],
        "The disruption budget web needs 3 healthy pods and has 3 currently",
        "{refused}"
    );
    let out = s.kubectl(
        V,
        &["drain", "n1", "--pod-selector=app=web", "--timeout=7s"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "drain cannot finish: {stderr}");
    assert!(
        stderr.contains("Cannot evict pod as it would violate the pod's disruption budget"),
        "{stderr}"
    );
    assert_eq!(
        running_pods(&s, "pdb", "app=web").len(),
        3,
        "nothing evicted"
    );

    // One disruption allowed: drain n1 moves the pods to n2, one by one.
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(&PDB_DEPLOY.replace("MIN", "2")),
    );
    eventually(30, "one disruption allowed", || {
        (status(&s)["disruptionsAllowed"] == 1).then_some(())
    });
    s.k(V, &["uncordon", "n2"]);
    let (stop, sampler) = sample_available(&s, "pdb", "app=web");
    let drained = s.k(
        V,
        &["drain", "n1", "--pod-selector=app=web", "--timeout=120s"],
    );
    assert!(drained.contains("drained"), "{drained}");
    eventually(60, "3 web pods Running on n2", || {
        let pods = running_pods(&s, "pdb", "app=web");
        (pods.len() == 3 && pods.iter().all(|p| p["spec"]["nodeName"] == "n2")).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let min = sampler.join().unwrap();
    assert!(
        min >= 2,
        "the drain went below the budget: {min} Ready pods at one point"
    );
}

/// Topology spread: a Deployment spread over zones with maxSkew 1
/// (DoNotSchedule) lands evenly on the zones, never on a node without
/// the zone label; the replica that would break the skew stays Pending
/// with upstream's reason.
#[test]
fn topology_spread_keeps_zones_even() {
    let s = Server::start();
    add_node(&s, "a1", json!({"zone": "a"}), 110);
    add_node(&s, "b1", json!({"zone": "b"}), 110);
    add_node(&s, "nolabel", json!({}), 110);
    let _kubelet = SimKubelet::start(&s);
    s.k(V, &["create", "namespace", "spread"]);
    let deploy = |replicas: u32| {
        format!(
            "apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: spread}}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      topologySpreadConstraints:
      - maxSkew: 1
        topologyKey: zone
        whenUnsatisfiable: DoNotSchedule
        labelSelector:
          matchLabels: {{app: web}}
      containers:
      - {{name: web, image: registry.example/web:v1}}
"
        )
    };
    s.kubectl_stdin(V, &["apply", "-f", "-"], Some(&deploy(4)));
    let per_node = |s: &Server| {
        let mut m = std::collections::BTreeMap::new();
        for p in running_pods(s, "spread", "app=web") {
            *m.entry(p["spec"]["nodeName"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
        m
    };
    let placed = eventually(30, "4 web pods Running", || {
        let m = per_node(&s);
        (m.values().sum::<i32>() == 4).then_some(m)
    });
    assert_eq!(placed.get("a1"), Some(&2), "{placed:?}");
    assert_eq!(placed.get("b1"), Some(&2), "{placed:?}");
    assert_eq!(placed.get("nolabel"), None, "{placed:?}");

    // Zone b closed: a fifth replica may go to a (skew 1), a sixth not.
    s.k(V, &["cordon", "b1"]);
    s.kubectl_stdin(V, &["apply", "-f", "-"], Some(&deploy(6)));
    let message = eventually(30, "a web pod Unschedulable for the spread", || {
        items(&s, &["-n", "spread", "get", "pods", "-l", "app=web"])
            .iter()
            .filter_map(|p| {
                let c = p["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")?
                    .clone();
                c["message"].as_str().map(str::to_owned)
            })
            .find(|m| m.contains("didn't match pod topology spread constraints"))
    });
    assert!(
        message.contains(
            "1 node(s) didn't match pod topology spread constraints (missing required label)"
        ) && message.contains("1 node(s) were unschedulable"),
        "{message}"
    );
    let placed = eventually(30, "5 web pods Running", || {
        let m = per_node(&s);
        (m.values().sum::<i32>() == 5).then_some(m)
    });
    assert_eq!(placed.get("a1"), Some(&3), "{placed:?}");
}

/// Pods per node for a selector, counting Running pods only.
fn per_node(s: &Server, ns: &str, selector: &str) -> std::collections::BTreeMap<String, i32> {
    let mut m = std::collections::BTreeMap::new();
    for p in running_pods(s, ns, selector) {
        *m.entry(p["spec"]["nodeName"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    m
}

#[test]
fn priority_classes_admission_and_preemption() {
    let s = Server::start();
    add_node(&s, "n1", json!({"kubernetes.io/hostname": "n1"}), 110);
    let _kubelet = SimKubelet::start(&s);
    s.k(V, &["create", "namespace", "prio"]);

    // The system classes exist; user classes stay below them.
    let classes = s.k(V, &["get", "priorityclasses"]);
    assert!(
        classes.contains("system-cluster-critical") && classes.contains("2000000000"),
        "{classes}"
    );
    assert!(classes.contains("system-node-critical"), "{classes}");
    let out = s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some("apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: too-high}\nvalue: 2000000000\n"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("must be no greater than 1000000000"),
        "{err}"
    );
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(
            "apiVersion: scheduling.k8s.io/v1
kind: PriorityClass
metadata: {name: low}
value: 10
---
apiVersion: scheduling.k8s.io/v1
kind: PriorityClass
metadata: {name: high}
value: 1000
description: for the important pod
",
        ),
    );
    let pc = s.k(V, &["get", "pc", "high"]);
    assert!(
        pc.contains("1000") && pc.contains("PreemptLowerPriority"),
        "{pc}"
    );

    // An unknown class is refused, naming it.
    let out = s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Pod\nmetadata: {name: lost, namespace: prio}\nspec:\n  priorityClassName: nope\n  containers: [{name: c, image: registry.example/app:v1}]\n"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no PriorityClass with name nope was found"),
        "{err}"
    );

    // Three low-priority pods fill the node's 4 cpus.
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(
            "apiVersion: apps/v1
kind: Deployment
metadata: {name: filler, namespace: prio}
spec:
  replicas: 3
  selector: {matchLabels: {app: filler}}
  template:
    metadata: {labels: {app: filler}}
    spec:
      priorityClassName: low
      containers:
      - {name: c, image: registry.example/app:v1, resources: {requests: {cpu: 1300m}}}
",
        ),
    );
    eventually(30, "3 filler pods Running", || {
        (running_pods(&s, "prio", "app=filler").len() == 3).then_some(())
    });
    let filler = &running_pods(&s, "prio", "app=filler")[0];
    assert_eq!(filler["spec"]["priority"], 10, "{filler}");
    // DefaultTolerationSeconds: five minutes on a failed node.
    let tolerations = filler["spec"]["tolerations"].as_array().unwrap();
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        assert!(
            tolerations
                .iter()
                .any(|t| t["key"] == key && t["tolerationSeconds"] == 300),
            "{tolerations:?}"
        );
    }

    // The important pod does not fit: it preempts one filler pod.
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1
kind: Pod
metadata: {name: vip, namespace: prio}
spec:
  priorityClassName: high
  containers:
  - {name: c, image: registry.example/app:v1, resources: {requests: {cpu: 1300m}}}
",
        ),
    );
    let vip = eventually(60, "vip Running on n1", || {
        let p = s.json(V, &["-n", "prio", "get", "pod", "vip"]);
        (p["status"]["phase"] == "Running").then_some(p)
    });
    assert_eq!(vip["spec"]["nodeName"], "n1");
    assert_eq!(vip["spec"]["priority"], 1000);
    assert_eq!(vip["spec"]["preemptionPolicy"], "PreemptLowerPriority");
    assert_eq!(vip["status"]["nominatedNodeName"], "n1", "{vip}");
    let events = s.k(
        V,
        &[
            "-n",
            "prio",
            "get",
            "events",
            "--field-selector",
            "reason=Preempted",
        ],
    );
    assert!(
        events.contains(&format!(
            "Preempted by pod {} on node n1",
            vip["metadata"]["uid"].as_str().unwrap()
        )),
        "{events}"
    );
    // The filler's replacement cannot take the room back, nor preempt a
    // pod of its own priority.
    let pending = eventually(30, "a filler replacement Pending", || {
        items(&s, &["-n", "prio", "get", "pods", "-l", "app=filler"])
            .into_iter()
            .find(|p| {
                p["spec"]["nodeName"].is_null()
                    && p["status"]["conditions"]
                        .as_array()
                        .is_some_and(|c| c.iter().any(|c| c["reason"] == "Unschedulable"))
            })
    });
    assert!(
        pending["status"]["conditions"]
            .to_string()
            .contains("Insufficient cpu"),
        "{pending}"
    );
    thread::sleep(Duration::from_secs(2));
    assert_eq!(running_pods(&s, "prio", "app=filler").len(), 2);
    assert_eq!(
        s.json(V, &["-n", "prio", "get", "pod", "vip"])["status"]["phase"],
        "Running"
    );
}

#[test]
fn preferred_affinities_and_soft_taints_steer_placement() {
    let s = Server::start();
    for (name, disk) in [("s1", "ssd"), ("h1", "hdd"), ("t1", "hdd")] {
        add_node(
            &s,
            name,
            json!({"disk": disk, "kubernetes.io/hostname": name}),
            110,
        );
    }
    s.k(
        V,
        &["taint", "nodes", "t1", "dedicated=batch:PreferNoSchedule"],
    );
    let _kubelet = SimKubelet::start(&s);
    s.k(V, &["create", "namespace", "pref"]);
    let deploy = |name: &str, replicas: u32, affinity: &str| {
        format!(
            "apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: pref}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      affinity:
{affinity}
      containers:
      - {{name: c, image: registry.example/app:v1}}
"
        )
    };
    // Preferred node affinity: every replica on the ssd node.
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(&deploy(
            "fast",
            3,
            "        nodeAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 80
            preference:
              matchExpressions: [{key: disk, operator: In, values: [ssd]}]",
        )),
    );
    let fast = eventually(30, "3 fast pods Running", || {
        let m = per_node(&s, "pref", "app=fast");
        (m.values().sum::<i32>() == 3).then_some(m)
    });
    assert_eq!(fast.get("s1"), Some(&3), "{fast:?}");
    // Preferred pod affinity: next to the fast pods.
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(&deploy(
            "near",
            2,
            "        podAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            podAffinityTerm:
              topologyKey: kubernetes.io/hostname
              labelSelector: {matchLabels: {app: fast}}",
        )),
    );
    let near = eventually(30, "2 near pods Running", || {
        let m = per_node(&s, "pref", "app=near");
        (m.values().sum::<i32>() == 2).then_some(m)
    });
    assert_eq!(near.get("s1"), Some(&2), "{near:?}");
    // Preferred anti-affinity away from them, and the soft taint keeps
    // them off t1: both on h1.
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(&deploy(
            "apart",
            2,
            "        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            podAffinityTerm:
              topologyKey: kubernetes.io/hostname
              labelSelector: {matchLabels: {app: fast}}",
        )),
    );
    let apart = eventually(30, "2 apart pods Running", || {
        let m = per_node(&s, "pref", "app=apart");
        (m.values().sum::<i32>() == 2).then_some(m)
    });
    assert_eq!(apart.get("h1"), Some(&2), "{apart:?}");
}

#[test]
fn scaling_mid_rollout_is_proportional_and_finished_pods_are_collected() {
    let s = Server::start_with(&["--no-agent", "--terminated-pod-gc-threshold", "3"]);
    add_node(&s, "n1", json!({"kubernetes.io/hostname": "n1"}), 110);
    let _kubelet = SimKubelet::start(&s);
    s.k(V, &["create", "namespace", "prop"]);
    s.kubectl_stdin(
        V,
        &["apply", "-f", "-"],
        Some(
            "apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: prop}
spec:
  replicas: 10
  strategy: {rollingUpdate: {maxSurge: 3, maxUnavailable: 0}}
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: c, image: registry.example/web:v1}]
",
        ),
    );
    eventually(30, "10 web pods Running", || {
        (running_pods(&s, "prop", "app=web").len() == 10).then_some(())
    });
    // v2's pods can never be placed, so the rollout stops at old 10 +
    // new 3 (maxSurge 3, maxUnavailable 0).
    s.k(
        V,
        &[
            "-n",
            "prop",
            "patch",
            "deployment",
            "web",
            "--type=merge",
            "-p",
            r#"{"spec":{"template":{"spec":{"nodeSelector":{"disk":"none"}}}}}"#,
        ],
    );
    let sizes = |s: &Server| {
        let mut v: Vec<(String, i64)> = items(s, &["-n", "prop", "get", "rs"])
            .iter()
            .map(|r| {
                (
                    r["spec"]["template"]["spec"]["nodeSelector"]["disk"]
                        .as_str()
                        .unwrap_or("old")
                        .to_owned(),
                    r["spec"]["replicas"].as_i64().unwrap_or(0),
                )
            })
            .collect();
        v.sort();
        v
    };
    eventually(30, "the rollout stuck at 10 old + 3 new", || {
        (sizes(&s) == vec![("none".to_owned(), 3), ("old".to_owned(), 10)]).then_some(())
    });
    thread::sleep(Duration::from_secs(1));
    assert_eq!(
        sizes(&s),
        vec![("none".to_owned(), 3), ("old".to_owned(), 10)]
    );
    // Scaled to 20 (allowed 23): the 10 more are shared 10:3, not all
    // given to the new set.
    s.k(
        V,
        &["-n", "prop", "scale", "deployment", "web", "--replicas=20"],
    );
    eventually(30, "old 18 + new 5", || {
        (sizes(&s) == vec![("none".to_owned(), 5), ("old".to_owned(), 18)]).then_some(())
    });

    // Pod GC: with a threshold of 3, the oldest finished pods go.
    for i in 0..6 {
        s.kubectl_stdin(
            V,
            &["apply", "-f", "-"],
            Some(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: done-{i}, namespace: prop, labels: {{app: done}}}}\nspec:\n  restartPolicy: Never\n  containers: [{{name: c, image: registry.example/task:exit0}}]\n"
            )),
        );
    }
    let left = eventually(60, "3 finished pods left", || {
        let names: Vec<String> = items(&s, &["-n", "prop", "get", "pods", "-l", "app=done"])
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        (names.len() == 3).then_some(names)
    });
    assert_eq!(left, vec!["done-3", "done-4", "done-5"]);
}
