//! Persistent volumes for real: a `skep server` with its node (process
//! runtime, in a network namespace) provisions `local-path` volumes as
//! directories on the node when a pod using the claim is scheduled, binds
//! them, mounts them into containers, keeps the data across pods, and
//! reclaims them by the class's policy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod docker;

use cluster::Cluster;
use std::{path::PathBuf, time::Duration};

const WAIT: Duration = Duration::from_secs(90);

/// The node's directory of a volume (the server's agent keeps its state
/// in DATA_DIR/agent).
fn volume_dir(c: &Cluster, pv: &str) -> PathBuf {
    c.nodes[0].agent_dir(true).join("storage").join(pv)
}

fn wait_default_class(c: &Cluster) {
    c.wait_for(
        "the default StorageClass local-path",
        Duration::from_secs(30),
        |c| {
            c.jsonpath(
                "default",
                "storageclass/local-path",
                "{.metadata.annotations.storageclass\\.kubernetes\\.io/is-default-class}",
            ) == "true"
        },
    );
}

fn wait_phase(c: &Cluster, ns: &str, what: &str, phase: &str) {
    c.wait_for(&format!("{what} {phase}"), WAIT, |c| {
        c.jsonpath(ns, what, "{.status.phase}") == phase
    });
}

fn gone(c: &Cluster, ns: &str, what: &str) -> bool {
    let out = c.kubectl(&["-n", ns, "get", what]);
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("NotFound")
}

fn pod_with_claim(name: &str, claim: &str, read_only: bool, script: &str) -> String {
    pod_with_claim_image(name, "host", claim, read_only, script)
}

fn pod_with_claim_image(
    name: &str,
    image: &str,
    claim: &str,
    read_only: bool,
    script: &str,
) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: {image}
    command: [sh, -c, {script:?}]
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes:
  - name: data
    persistentVolumeClaim: {{claimName: {claim}, readOnly: {read_only}}}
"#
    )
}

#[test]
fn a_claim_keeps_data_across_pods_and_is_deleted_with_its_directory() {
    let c = Cluster::start(0);
    wait_default_class(&c);
    // A pod whose claim does not exist stays Pending and says why.
    c.apply(&pod_with_claim("orphan", "nope", false, "sleep infinity"));
    c.wait_for("orphan unschedulable", WAIT, |c| {
        c.jsonpath(
            "default",
            "pod/orphan",
            "{.status.conditions[?(@.type==\"PodScheduled\")].message}",
        )
        .contains("persistentvolumeclaim \"nope\" not found")
    });
    c.kubectl_ok(&["delete", "pod", "orphan", "--wait=false"]);

    // No class named: the default one; no consumer yet: Pending.
    c.apply(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data, namespace: default}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 64Mi}}
"#,
    );
    c.wait_for("the claim defaulted to local-path", WAIT, |c| {
        c.jsonpath("default", "pvc/data", "{.spec.storageClassName}") == "local-path"
            && c.jsonpath("default", "pvc/data", "{.metadata.finalizers}")
                .contains("kubernetes.io/pvc-protection")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        c.jsonpath("default", "pvc/data", "{.status.phase}"),
        "Pending",
        "WaitForFirstConsumer: nothing is provisioned before a pod uses the claim"
    );
    assert!(
        c.kubectl_ok(&["get", "pv", "-o", "name"]).trim().is_empty(),
        "no volume yet"
    );

    c.apply(&pod_with_claim(
        "writer",
        "data",
        false,
        "echo hello > /data/f && sleep infinity",
    ));
    wait_phase(&c, "default", "pod/writer", "Running");
    wait_phase(&c, "default", "pvc/data", "Bound");
    let uid = c.jsonpath("default", "pvc/data", "{.metadata.uid}");
    let pv = c.jsonpath("default", "pvc/data", "{.spec.volumeName}");
    assert_eq!(pv, format!("pvc-{uid}"));
    assert_eq!(
        c.jsonpath(
            "default",
            "pvc/data",
            "{.metadata.annotations.volume\\.kubernetes\\.io/selected-node}"
        ),
        c.nodes[0].name
    );
    wait_phase(&c, "default", &format!("pv/{pv}"), "Bound");
    assert_eq!(
        c.jsonpath(
            "default",
            &format!("pv/{pv}"),
            "{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}"
        ),
        c.nodes[0].name
    );
    assert_eq!(
        c.jsonpath("default", "pvc/data", "{.status.capacity.storage}"),
        "64Mi"
    );
    let dir = volume_dir(&c, &pv);
    c.wait_for("the pod's file in the volume's directory", WAIT, |_| {
        std::fs::read_to_string(dir.join("f")).is_ok_and(|t| t == "hello\n")
    });
    let listing = c.kubectl_ok(&["get", "pvc,pv"]);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("persistentvolumeclaim/data") && l.contains("Bound"))
            && listing.contains(&format!("persistentvolume/{pv}")),
        "kubectl get pvc,pv lists the claim Bound and its volume:\n{listing}"
    );

    // A new pod (read-only mount) sees the data.
    c.kubectl_ok(&["delete", "pod", "writer", "--wait=true", "--timeout=60s"]);
    c.apply(&pod_with_claim(
        "reader",
        "data",
        true,
        "cat /data/f; if touch /data/g 2>/dev/null; then echo writable; else echo readonly; fi; sleep infinity",
    ));
    wait_phase(&c, "default", "pod/reader", "Running");
    c.wait_for("reader read the data", WAIT, |c| {
        let logs = c.kubectl(&["logs", "reader"]);
        let text = String::from_utf8_lossy(&logs.stdout);
        text.contains("hello") && text.contains("readonly")
    });

    // In use: deleting the claim waits for the pod (pvc-protection).
    c.kubectl_ok(&["delete", "pvc", "data", "--wait=false"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !c.jsonpath("default", "pvc/data", "{.metadata.deletionTimestamp}")
            .is_empty(),
        "the claim is Terminating while the pod runs"
    );
    assert!(
        dir.join("f").exists(),
        "the data stays while the claim is in use"
    );
    c.kubectl_ok(&["delete", "pod", "reader", "--wait=true", "--timeout=60s"]);
    c.wait_for("claim gone", WAIT, |c| gone(c, "default", "pvc/data"));
    // Delete: the node removes the directory, then the volume.
    c.wait_for("volume gone", WAIT, |c| {
        gone(c, "default", &format!("pv/{pv}"))
    });
    assert!(!dir.exists(), "{} was removed", dir.display());
}

#[test]
fn a_retain_class_keeps_the_released_volume_and_its_data() {
    let c = Cluster::start(0);
    wait_default_class(&c);
    c.apply(
        r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: keep}
provisioner: skep.io/local-path
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Retain
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: kept, namespace: default}
spec:
  storageClassName: keep
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 16Mi}}
"#,
    );
    c.apply(&pod_with_claim(
        "keeper",
        "kept",
        false,
        "echo precious > /data/f && sleep infinity",
    ));
    wait_phase(&c, "default", "pvc/kept", "Bound");
    let pv = c.jsonpath("default", "pvc/kept", "{.spec.volumeName}");
    assert_eq!(
        c.jsonpath(
            "default",
            &format!("pv/{pv}"),
            "{.spec.persistentVolumeReclaimPolicy}"
        ),
        "Retain"
    );
    let dir = volume_dir(&c, &pv);
    c.wait_for("the data on the node", WAIT, |_| dir.join("f").exists());
    c.kubectl_ok(&["delete", "pod", "keeper", "--wait=true", "--timeout=60s"]);
    c.kubectl_ok(&["delete", "pvc", "kept", "--wait=true", "--timeout=60s"]);
    wait_phase(&c, "default", &format!("pv/{pv}"), "Released");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        c.jsonpath("default", &format!("pv/{pv}"), "{.status.phase}"),
        "Released",
        "Retain: the volume stays"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("f")).unwrap(),
        "precious\n",
        "Retain: the directory and its data stay"
    );
}

#[test]
fn statefulset_claims_bind_and_keep_data_across_pod_deletion() {
    let c = Cluster::start(0);
    wait_default_class(&c);
    c.apply(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: default}
spec:
  replicas: 2
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: db
        image: host
        command: [sh, -c, "[ -f /data/id ] || hostname > /data/id; date >> /data/starts; sleep infinity"]
        volumeMounts: [{name: data, mountPath: /data}]
        readinessProbe: {exec: {command: [cat, /data/id]}, periodSeconds: 1}
  volumeClaimTemplates:
  - metadata: {name: data}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {requests: {storage: 32Mi}}
"#,
    );
    c.wait_for("2 db replicas ready", Duration::from_secs(120), |c| {
        c.jsonpath("default", "statefulset/db", "{.status.readyReplicas}") == "2"
    });
    for claim in ["data-db-0", "data-db-1"] {
        wait_phase(&c, "default", &format!("pvc/{claim}"), "Bound");
        assert_eq!(
            c.jsonpath(
                "default",
                &format!("pvc/{claim}"),
                "{.spec.storageClassName}"
            ),
            "local-path"
        );
    }
    let exec =
        |pod: &str, file: &str| c.kubectl_ok(&["exec", pod, "--", "cat", &format!("/data/{file}")]);
    assert_eq!(exec("db-0", "id").trim(), "db-0");
    assert_eq!(exec("db-1", "id").trim(), "db-1");
    let uid = c.jsonpath("default", "pod/db-0", "{.metadata.uid}");
    c.kubectl_ok(&["delete", "pod", "db-0", "--wait=true", "--timeout=60s"]);
    c.wait_for("db-0 recreated and ready", Duration::from_secs(120), |c| {
        let new_uid = c.jsonpath("default", "pod/db-0", "{.metadata.uid}");
        !new_uid.is_empty()
            && new_uid != uid
            && c.jsonpath(
                "default",
                "pod/db-0",
                "{.status.conditions[?(@.type==\"Ready\")].status}",
            ) == "True"
    });
    assert_eq!(
        exec("db-0", "id").trim(),
        "db-0",
        "the same volume came back"
    );
    assert_eq!(
        exec("db-0", "starts").lines().count(),
        2,
        "the data of the first pod is still there"
    );
}

#[test]
fn a_static_volume_binds_by_class_size_and_selector() {
    let c = Cluster::start(0);
    wait_default_class(&c);
    let dir = c.dir.path().join("static-volume");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("seed"), "from the admin\n").unwrap();
    // Two candidates: the claim's selector and size pick "right".
    c.apply(&format!(
        r#"
apiVersion: v1
kind: PersistentVolume
metadata: {{name: wrong, labels: {{tier: cold}}}}
spec:
  storageClassName: ""
  capacity: {{storage: 1Gi}}
  accessModes: [ReadWriteOnce]
  hostPath: {{path: /nonexistent-skep-test}}
---
apiVersion: v1
kind: PersistentVolume
metadata: {{name: right, labels: {{tier: hot}}}}
spec:
  storageClassName: ""
  capacity: {{storage: 1Gi}}
  accessModes: [ReadWriteOnce, ReadOnlyMany]
  hostPath: {{path: {dir:?}}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: picky, namespace: default}}
spec:
  storageClassName: ""
  selector: {{matchLabels: {{tier: hot}}}}
  accessModes: [ReadWriteOnce]
  resources: {{requests: {{storage: 100Mi}}}}
"#,
        dir = dir.display().to_string()
    ));
    // Immediate binding (no class): bound before any pod exists.
    wait_phase(&c, "default", "pvc/picky", "Bound");
    assert_eq!(
        c.jsonpath("default", "pvc/picky", "{.spec.volumeName}"),
        "right"
    );
    assert_eq!(
        c.jsonpath("default", "pvc/picky", "{.status.capacity.storage}"),
        "1Gi"
    );
    wait_phase(&c, "default", "pv/right", "Bound");
    assert_eq!(
        c.jsonpath("default", "pv/wrong", "{.status.phase}"),
        "Available"
    );
    c.apply(&pod_with_claim(
        "user",
        "picky",
        false,
        "cat /data/seed; sleep infinity",
    ));
    c.wait_for("the pod read the volume", WAIT, |c| {
        String::from_utf8_lossy(&c.kubectl(&["logs", "user"]).stdout).contains("from the admin")
    });
    c.kubectl_ok(&["delete", "pod", "user", "--wait=true", "--timeout=60s"]);
    c.kubectl_ok(&["delete", "pvc", "picky", "--wait=true", "--timeout=60s"]);
    // A static volume without a policy is Retain: Released, data kept.
    wait_phase(&c, "default", "pv/right", "Released");
    assert!(dir.join("seed").exists());

    // A claim nobody provisions: the pod is placed, but waits for the
    // volume in ContainerCreating with a FailedMount event.
    c.apply(
        r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: elsewhere}
provisioner: example.com/nobody
volumeBindingMode: WaitForFirstConsumer
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: never, namespace: default}
spec:
  storageClassName: elsewhere
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Mi}}
"#,
    );
    c.apply(&pod_with_claim("waiting", "never", false, "sleep infinity"));
    c.wait_for("waiting pod reports FailedMount", WAIT, |c| {
        let events = c.kubectl_ok(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=waiting,reason=FailedMount",
            "-o",
            "jsonpath={.items[*].message}",
        ]);
        events.contains("persistentvolumeclaim \"never\" is not bound yet")
            && c.jsonpath(
                "default",
                "pod/waiting",
                "{.status.containerStatuses[0].state.waiting.reason}",
            ) == "ContainerCreating"
    });
    assert_eq!(
        c.jsonpath(
            "default",
            "pvc/never",
            "{.metadata.annotations.volume\\.kubernetes\\.io/storage-provisioner}"
        ),
        "example.com/nobody"
    );
}

#[test]
fn pods_follow_their_volume_to_its_node() {
    let c = Cluster::start(1);
    wait_default_class(&c);
    c.apply(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: pinned, namespace: default}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 8Mi}}
"#,
    );
    c.apply(&pod_with_claim(
        "first",
        "pinned",
        false,
        "echo first > /data/f && sleep infinity",
    ));
    wait_phase(&c, "default", "pod/first", "Running");
    let node = c.jsonpath("default", "pod/first", "{.spec.nodeName}");
    let pv = c.jsonpath("default", "pvc/pinned", "{.spec.volumeName}");
    let i = c.nodes.iter().position(|n| n.name == node).unwrap();
    let dir = c.nodes[i].agent_dir(i == 0).join("storage").join(&pv);
    c.wait_for("the data on the pod's node", WAIT, |_| {
        dir.join("f").exists()
    });
    c.kubectl_ok(&["delete", "pod", "first", "--wait=true", "--timeout=60s"]);

    // Asked onto the other node: the volume's node affinity forbids it.
    let other = c.nodes[1 - i].name.clone();
    let mut elsewhere = pod_with_claim("elsewhere", "pinned", false, "sleep infinity");
    elsewhere = elsewhere.replace(
        "  containers:",
        &format!("  nodeSelector: {{kubernetes.io/hostname: {other}}}\n  containers:"),
    );
    c.apply(&elsewhere);
    c.wait_for("elsewhere unschedulable", WAIT, |c| {
        c.jsonpath(
            "default",
            "pod/elsewhere",
            "{.status.conditions[?(@.type==\"PodScheduled\")].message}",
        )
        .contains("volume node affinity conflict")
    });
    c.kubectl_ok(&["delete", "pod", "elsewhere", "--wait=false"]);
    // Free to go anywhere, the pods land where the data is.
    for name in ["second", "third"] {
        c.apply(&pod_with_claim(
            name,
            "pinned",
            false,
            "cat /data/f; sleep infinity",
        ));
        wait_phase(&c, "default", &format!("pod/{name}"), "Running");
        assert_eq!(
            c.jsonpath("default", &format!("pod/{name}"), "{.spec.nodeName}"),
            node
        );
        c.wait_for("the pod read the data", WAIT, |c| {
            String::from_utf8_lossy(&c.kubectl(&["logs", name]).stdout).contains("first")
        });
    }
}

#[test]
fn docker_pods_mount_claims_too() {
    const IMAGE: &str = "skep-test/busybox:1";
    let d = docker::Dockerd::start();
    let socket = d.socket().display().to_string();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let rt = skep_kubelet::runtime::docker::DockerRuntime::connect(d.socket())
            .await
            .unwrap();
        rt.import_busybox(IMAGE, &["sh", "echo", "cat", "sleep", "touch"])
            .await
            .unwrap();
    });
    let c = Cluster::start_with(0, &["--runtime", "docker", "--docker-socket", &socket]);
    wait_default_class(&c);
    c.apply(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: ddata, namespace: default}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 8Mi}}
"#,
    );
    c.apply(&pod_with_claim_image(
        "dwriter",
        IMAGE,
        "ddata",
        false,
        "echo from-docker > /data/f && sleep 3600",
    ));
    wait_phase(&c, "default", "pvc/ddata", "Bound");
    let pv = c.jsonpath("default", "pvc/ddata", "{.spec.volumeName}");
    let dir = volume_dir(&c, &pv);
    c.wait_for(
        "the docker container wrote into the volume",
        Duration::from_secs(120),
        |_| std::fs::read_to_string(dir.join("f")).is_ok_and(|t| t == "from-docker\n"),
    );
    c.kubectl_ok(&["delete", "pod", "dwriter", "--wait=true", "--timeout=60s"]);
    c.apply(&pod_with_claim_image(
        "dreader",
        IMAGE,
        "ddata",
        true,
        "cat /data/f; if touch /data/g 2>/dev/null; then echo writable; else echo readonly; fi; sleep 3600",
    ));
    c.wait_for(
        "the reader saw the data, read-only",
        Duration::from_secs(120),
        |c| {
            let text =
                String::from_utf8_lossy(&c.kubectl(&["logs", "dreader"]).stdout).into_owned();
            text.contains("from-docker") && text.contains("readonly")
        },
    );
    c.kubectl_ok(&["delete", "pod", "dreader", "--wait=true", "--timeout=60s"]);
    drop(c);
    drop(d);
}
