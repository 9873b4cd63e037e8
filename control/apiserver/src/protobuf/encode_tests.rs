#![allow(clippy::unwrap_used, clippy::expect_used)]

//! The response encoder: JSON → protobuf → JSON (with decode.rs) gives the
//! object back, and an independent decoder (prost's k8s-pb types, the same
//! wire format Go reads) sees the same values.

use super::{
    decode, decode_message, encode, encode_message, parse_go_duration, preferred, watch_frame,
};
use k8s_pb::{
    api::{apps::v1 as apps, core::v1 as core},
    apimachinery::pkg::{apis::meta::v1 as meta, runtime::Unknown},
};
use prost::Message;
use serde_json::{Value, json};

fn schema_present() {
    assert!(
        super::schema::available(),
        "the protobuf schema table was not generated (build.rs could not read k8s-pb/k8s-openapi)"
    );
}

/// Encodes, checks the envelope, decodes back and compares.
fn round_trip(obj: &Value) -> Vec<u8> {
    schema_present();
    let body = encode(obj).unwrap_or_else(|e| panic!("encoding {obj} failed: {e}"));
    assert_eq!(&body[..4], b"k8s\0", "the magic number leads the body");
    let unknown = Unknown::decode(&body[4..]).expect("the envelope is a runtime.Unknown");
    let tm = unknown.type_meta.expect("the envelope names the type");
    assert_eq!(tm.api_version.as_deref(), obj["apiVersion"].as_str());
    assert_eq!(tm.kind.as_deref(), obj["kind"].as_str());
    assert_eq!(unknown.content_encoding.as_deref(), Some(""));
    assert_eq!(unknown.content_type.as_deref(), Some(""));
    let back = decode(&body).unwrap_or_else(|e| panic!("decoding the encoding failed: {e}"));
    assert_eq!(
        &back,
        obj,
        "round trip changed the object:\n{}",
        serde_json::to_string_pretty(&back).unwrap()
    );
    unknown.raw.unwrap_or_default()
}

fn pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "web-0", "namespace": "default", "uid": "6f1c1f0e-0000-4000-8000-000000000001",
            "resourceVersion": "42", "generation": 1,
            "creationTimestamp": "2026-01-02T03:04:05Z",
            "labels": {"app": "web"}, "annotations": {"a": "b c"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1",
                                 "uid": "u1", "controller": true, "blockOwnerDeletion": true}],
            "finalizers": ["example.com/f"],
            "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1",
                               "time": "2026-01-02T03:04:05Z", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:metadata": {"f:labels": {"f:app": {}}}}}],
        },
        "spec": {
            "containers": [{
                "name": "nginx", "image": "nginx:1.27",
                "command": ["nginx"], "args": ["-g", "daemon off;"],
                "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}],
                "env": [{"name": "A", "value": "1"},
                        {"name": "NODE", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}}],
                "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}, "requests": {"cpu": "100m"}},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
                                  "initialDelaySeconds": 3, "periodSeconds": 10,
                                  "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 5},
                "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": true}],
                "securityContext": {"runAsUser": 0, "runAsNonRoot": false, "privileged": false,
                                    "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent",
            }],
            "volumes": [
                {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}},
                {"name": "cfg", "configMap": {"name": "cfg", "defaultMode": 420,
                                               "items": [{"key": "k", "path": "p", "mode": 256}]}},
                {"name": "tok", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}},
            ],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst", "serviceAccountName": "default",
            "nodeName": "node-1", "priority": 0, "enableServiceLinks": true,
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "k", "operator": "In", "values": ["a"]}]}]}}},
        },
        "status": {
            "phase": "Running", "podIP": "10.42.0.5", "podIPs": [{"ip": "10.42.0.5"}],
            "hostIP": "192.168.1.2", "startTime": "2026-01-02T03:04:06Z", "qosClass": "Burstable",
            "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": null,
                            "lastTransitionTime": "2026-01-02T03:04:09Z"}],
            "containerStatuses": [{"name": "nginx", "ready": true, "restartCount": 2, "started": true,
                                   "image": "nginx:1.27", "imageID": "sha256:abc",
                                   "containerID": "containerd://1",
                                   "state": {"running": {"startedAt": "2026-01-02T03:04:07Z"}},
                                   "lastState": {"terminated": {"exitCode": -1, "reason": "Error",
                                       "startedAt": "2026-01-02T03:00:00Z", "finishedAt": "2026-01-02T03:01:00Z"}}}],
        },
    })
}

#[test]
fn pod_round_trips_and_reads_as_go_would() {
    let raw = round_trip(&pod());
    // prost's k8s-pb Pod reads the same bytes: the wire format is Go's.
    let p = core::Pod::decode(raw.as_slice()).expect("k8s-pb decodes the Pod");
    let m = p.metadata.unwrap();
    assert_eq!(m.name.as_deref(), Some("web-0"));
    assert_eq!(m.generation, Some(1));
    assert_eq!(m.creation_timestamp.unwrap().seconds, Some(1_767_323_045));
    let spec = p.spec.unwrap();
    let c = &spec.containers[0];
    assert_eq!(
        c.resources.as_ref().unwrap().limits["cpu"]
            .string
            .as_deref(),
        Some("500m")
    );
    let port = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .handler
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap()
        .port
        .as_ref()
        .unwrap();
    assert_eq!((port.r#type, port.int_val), (Some(0), Some(8080)));
    assert_eq!(
        c.security_context.as_ref().unwrap().run_as_user,
        Some(0),
        "a meaningful zero is on the wire"
    );
    assert_eq!(
        spec.volumes[1]
            .volume_source
            .as_ref()
            .unwrap()
            .config_map
            .as_ref()
            .unwrap()
            .default_mode,
        Some(420)
    );
    let st = p.status.unwrap();
    assert_eq!(
        st.container_statuses[0]
            .last_state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .exit_code,
        Some(-1),
        "negative int32 survives"
    );
}

#[test]
fn service_deployment_configmap_round_trip() {
    round_trip(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "NodePort", "selector": {"app": "web"}, "clusterIP": "10.43.0.10",
                 "clusterIPs": ["10.43.0.10"], "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                 "sessionAffinity": "None", "externalTrafficPolicy": "Cluster",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http", "nodePort": 30080},
                           {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]},
        "status": {"loadBalancer": {}},
    }));
    let raw = round_trip(&json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default", "generation": 3},
        "spec": {"replicas": 0, "revisionHistoryLimit": 10, "progressDeadlineSeconds": 600,
                 "selector": {"matchLabels": {"app": "web"}},
                 "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": 1}},
                 "template": {"metadata": {"labels": {"app": "web"}, "creationTimestamp": null},
                              "spec": {"containers": [{"name": "c", "image": "nginx"}]}}},
        "status": {"observedGeneration": 3, "replicas": 2, "readyReplicas": 2,
                   "conditions": [{"type": "Available", "status": "True",
                                   "lastUpdateTime": "2026-01-01T00:00:00Z",
                                   "lastTransitionTime": "2026-01-01T00:00:00Z",
                                   "reason": "MinimumReplicasAvailable", "message": "ok"}]},
    }));
    let d = apps::Deployment::decode(raw.as_slice()).unwrap();
    assert_eq!(
        d.spec.unwrap().replicas,
        Some(0),
        "replicas 0 is written, not dropped"
    );
    let raw = round_trip(&json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cfg", "namespace": "default"},
        "data": {"a.txt": "hello\n", "empty": ""},
        "binaryData": {"blob": "AAEC/w=="},
        "immutable": false,
    }));
    let cm = core::ConfigMap::decode(raw.as_slice()).unwrap();
    assert_eq!(cm.binary_data["blob"], vec![0, 1, 2, 255]);
    assert_eq!(cm.data["empty"], "");
}

#[test]
fn node_quantities_and_event_microtime_round_trip() {
    round_trip(&json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-1", "labels": {"kubernetes.io/hostname": "node-1"}},
        "spec": {"podCIDR": "10.42.0.0/24", "podCIDRs": ["10.42.0.0/24"],
                 "taints": [{"key": "k", "value": "v", "effect": "NoSchedule"}]},
        "status": {
            "capacity": {"cpu": "2", "memory": "4027452Ki", "pods": "110", "ephemeral-storage": "61202244Ki"},
            "allocatable": {"cpu": "1950m", "memory": "3.5Gi", "pods": "110"},
            "addresses": [{"type": "InternalIP", "address": "192.168.1.2"}, {"type": "Hostname", "address": "node-1"}],
            "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                            "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "KubeletReady", "message": "ready"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": "m", "systemUUID": "s", "bootID": "b", "kernelVersion": "6.1",
                         "osImage": "Debian", "containerRuntimeVersion": "containerd://1.7", "kubeletVersion": "v1.31.0",
                         "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
            "images": [{"names": ["nginx:1.27"], "sizeBytes": 70_000_000_i64}],
        },
    }));
    let raw = round_trip(&json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": "web.1", "namespace": "default"},
        "involvedObject": {"kind": "Pod", "namespace": "default", "name": "web", "uid": "u", "apiVersion": "v1",
                           "resourceVersion": "3", "fieldPath": "spec.containers{c}"},
        "reason": "Pulled", "message": "pulled", "type": "Normal", "count": 3,
        "source": {"component": "kubelet", "host": "node-1"},
        "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:09Z",
        "eventTime": "2026-01-01T00:00:00.123456Z",
        "reportingComponent": "kubelet", "reportingInstance": "node-1", "action": "Pull",
    }));
    let e = core::Event::decode(raw.as_slice()).unwrap();
    let t = e.event_time.unwrap();
    assert_eq!(
        (t.seconds, t.nanos),
        (Some(1_767_225_600), Some(123_456_000))
    );
    round_trip(&json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": "e", "namespace": "default"},
        "eventTime": "2026-01-01T00:00:00.000001Z", "reportingController": "c", "reportingInstance": "i",
        "action": "A", "reason": "R", "regarding": {"kind": "Pod", "name": "p"}, "type": "Warning",
        "series": {"count": 2, "lastObservedTime": "2026-01-01T00:00:05.500000Z"},
    }));
}

#[test]
fn lists_status_and_special_forms_round_trip() {
    let mut item = pod();
    let list = json!({
        "apiVersion": "v1", "kind": "PodList",
        "metadata": {"resourceVersion": "77", "continue": "abc", "remainingItemCount": 3},
        "items": [item.clone(), item.clone()],
    });
    schema_present();
    let body = encode(&list).unwrap();
    let back = decode(&body).unwrap();
    // Items carry no apiVersion/kind in protobuf (Go leaves them empty).
    let obj = item.as_object_mut().unwrap();
    obj.remove("apiVersion");
    obj.remove("kind");
    assert_eq!(
        back,
        json!({"apiVersion": "v1", "kind": "PodList",
               "metadata": {"resourceVersion": "77", "continue": "abc", "remainingItemCount": 3},
               "items": [item.clone(), item]})
    );
    let unknown = Unknown::decode(&body[4..]).unwrap();
    let pl = core::PodList::decode(unknown.raw.unwrap().as_slice()).unwrap();
    assert_eq!(pl.items.len(), 2);
    assert_eq!(pl.metadata.unwrap().resource_version.as_deref(), Some("77"));

    let raw = round_trip(&json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {},
        "status": "Failure", "message": "pods \"x\" not found", "reason": "NotFound",
        "details": {"name": "x", "kind": "pods",
                    "causes": [{"reason": "FieldValueInvalid", "message": "bad", "field": "spec.x"}]},
        "code": 404,
    }));
    let st = meta::Status::decode(raw.as_slice()).unwrap();
    assert_eq!(st.code, Some(404));
    assert_eq!(st.reason.as_deref(), Some("NotFound"));

    // Durations, raw JSON, string lists and schema-or-bool forms.
    round_trip(&json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object",
                        "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                            "properties": {"size": {"type": "integer", "default": 3, "enum": [1, 3, 5]},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
                            "additionalProperties": false}}}}}]},
    }));
    round_trip(&json!({
        "apiVersion": "apps/v1", "kind": "ControllerRevision",
        "metadata": {"name": "r", "namespace": "default"},
        "data": {"spec": {"template": {"x": 1}}}, "revision": 2,
    }));
    let ns = encode_message(
        "api.flowcontrol.v1.LimitResponse",
        &json!({"type": "Queue", "queuing": {"queues": 64, "handSize": 6, "queueLengthLimit": 50}}),
    );
    assert!(ns.is_ok(), "{ns:?}");
}

#[test]
fn watch_frames_are_length_prefixed_watch_events() {
    schema_present();
    let obj = json!({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": "c", "namespace": "default", "resourceVersion": "9"},
                     "data": {"k": "v"}});
    let frame = watch_frame("MODIFIED", &obj).unwrap();
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - 4, "the prefix is the event's length");
    let ev = meta::WatchEvent::decode(&frame[4..]).unwrap();
    assert_eq!(ev.r#type.as_deref(), Some("MODIFIED"));
    let inner = ev.object.unwrap().raw.unwrap();
    assert_eq!(decode(&inner).unwrap(), obj);
    assert_eq!(
        decode_message("apimachinery.pkg.apis.meta.v1.WatchEvent", &frame[4..]).unwrap(),
        json!({"type": "MODIFIED", "object": obj})
    );
}

#[test]
fn unknown_kinds_and_mismatched_values_are_errors() {
    schema_present();
    assert!(encode(&json!({"apiVersion": "example.com/v1", "kind": "Widget"})).is_err());
    assert!(encode(&json!({"metadata": {}})).is_err());
    let err = encode(&json!({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": "nope"}}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("spec.containers"), "{err}");
    let err = encode(&json!({"apiVersion": "v1", "kind": "ConfigMap", "binaryData": {"b": "%%%"}}))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("binaryData") && err.contains("base64"),
        "{err}"
    );
    assert!(super::can_encode(
        &json!({"apiVersion": "v1", "kind": "Pod"})
    ));
    assert!(!super::can_encode(
        &json!({"apiVersion": "example.com/v1", "kind": "Widget"})
    ));
}

#[test]
fn durations_parse_like_go() {
    for (s, ns) in [
        ("0s", 0),
        ("0", 0),
        ("1h0m0s", 3_600_000_000_000),
        ("1m30s", 90_000_000_000),
        ("1.5s", 1_500_000_000),
        ("300ms", 300_000_000),
        ("2µs", 2_000),
        ("-5s", -5_000_000_000),
    ] {
        assert_eq!(parse_go_duration(s), Some(ns), "{s}");
        assert_eq!(
            parse_go_duration(&super::decode::go_duration(ns)),
            Some(ns),
            "go_duration({ns}) parses back"
        );
    }
    for bad in ["", "s", "1x", "h1", "--1s"] {
        assert_eq!(parse_go_duration(bad), None, "{bad}");
    }
}

#[test]
fn accept_headers_choose_protobuf_as_kubernetes_clients_mean_it() {
    assert!(preferred(
        "application/vnd.kubernetes.protobuf,application/json"
    ));
    assert!(preferred("application/vnd.kubernetes.protobuf, */*"));
    assert!(!preferred(
        "application/json, application/vnd.kubernetes.protobuf"
    ));
    assert!(!preferred("application/json"));
    assert!(!preferred(""));
    assert!(preferred(
        "application/json;q=0.5, application/vnd.kubernetes.protobuf"
    ));
    assert!(!preferred("application/vnd.kubernetes.protobuf;q=0"));
}
