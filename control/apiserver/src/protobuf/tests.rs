#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::{ProtobufError, decode, decode::go_duration, decode_message};
use k8s_pb::{
    api::{apps::v1 as apps, core::v1 as core},
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1 as meta,
        runtime::{TypeMeta, Unknown},
        util::intstr::IntOrString,
    },
};
use prost::Message;
use serde_json::json;
use std::collections::BTreeMap;

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What client-go sends: magic + runtime.Unknown wrapping the object.
fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
    let unknown = Unknown {
        type_meta: Some(TypeMeta {
            api_version: s(api_version),
            kind: s(kind),
        }),
        raw: Some(raw),
        content_encoding: s(""),
        content_type: s(""),
    };
    let mut body = b"k8s\0".to_vec();
    body.extend(unknown.encode_to_vec());
    body
}

fn int_or_string_int(i: i32) -> IntOrString {
    IntOrString {
        r#type: Some(0),
        int_val: Some(i),
        str_val: s(""),
    }
}

fn int_or_string_str(v: &str) -> IntOrString {
    IntOrString {
        r#type: Some(1),
        int_val: Some(0),
        str_val: s(v),
    }
}

#[test]
fn deployment_with_pod_template_decodes_to_the_json_form() {
    let deployment = apps::Deployment {
        metadata: Some(meta::ObjectMeta {
            name: s("web"),
            // Go writes every non-pointer field, zero or not.
            generate_name: s(""),
            namespace: s(""),
            uid: s(""),
            generation: Some(0),
            creation_timestamp: Some(meta::Time::default()),
            labels: labels(&[("app", "web")]),
            annotations: labels(&[("note", "a b")]),
            owner_references: vec![meta::OwnerReference {
                api_version: s("v1"),
                kind: s("ConfigMap"),
                name: s("owner"),
                uid: s("1234"),
                controller: Some(false),
                block_owner_deletion: None,
            }],
            managed_fields: vec![meta::ManagedFieldsEntry {
                manager: s("kubectl"),
                operation: s("Update"),
                api_version: s("apps/v1"),
                time: Some(meta::Time {
                    seconds: Some(1_700_000_000),
                    nanos: Some(0),
                }),
                fields_type: s("FieldsV1"),
                fields_v1: Some(meta::FieldsV1 {
                    raw: Some(br#"{"f:spec":{}}"#.to_vec()),
                }),
                subresource: s(""),
            }],
            ..Default::default()
        }),
        spec: Some(apps::DeploymentSpec {
            replicas: Some(0),
            min_ready_seconds: Some(0),
            selector: Some(meta::LabelSelector {
                match_labels: labels(&[("app", "web")]),
                match_expressions: vec![meta::LabelSelectorRequirement {
                    key: s("tier"),
                    operator: s("In"),
                    values: vec!["a".into(), "b".into()],
                }],
            }),
            strategy: Some(apps::DeploymentStrategy {
                r#type: s("RollingUpdate"),
                rolling_update: Some(apps::RollingUpdateDeployment {
                    max_unavailable: Some(int_or_string_int(1)),
                    max_surge: Some(int_or_string_str("25%")),
                }),
            }),
            template: Some(core::PodTemplateSpec {
                metadata: Some(meta::ObjectMeta {
                    labels: labels(&[("app", "web")]),
                    creation_timestamp: Some(meta::Time::default()),
                    ..Default::default()
                }),
                spec: Some(core::PodSpec {
                    host_ipc: Some(false),
                    host_network: Some(true),
                    termination_grace_period_seconds: Some(0),
                    containers: vec![core::Container {
                        name: s("nginx"),
                        image: s("nginx:1.27"),
                        args: vec!["-g".into(), "daemon off;".into()],
                        ports: vec![core::ContainerPort {
                            container_port: Some(80),
                            protocol: s("TCP"),
                            host_ip: s(""),
                            ..Default::default()
                        }],
                        env: vec![core::EnvVar {
                            name: s("MODE"),
                            value: s("prod"),
                            value_from: None,
                        }],
                        resources: Some(core::ResourceRequirements {
                            limits: [("cpu".to_owned(), Quantity { string: s("500m") })]
                                .into_iter()
                                .collect(),
                            requests: [("memory".to_owned(), Quantity { string: s("128Mi") })]
                                .into_iter()
                                .collect(),
                            ..Default::default()
                        }),
                        readiness_probe: Some(core::Probe {
                            handler: Some(core::ProbeHandler {
                                http_get: Some(core::HttpGetAction {
                                    path: s("/healthz"),
                                    port: Some(int_or_string_str("http")),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }),
                            period_seconds: Some(5),
                            ..Default::default()
                        }),
                        stdin: Some(false),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
        status: Some(apps::DeploymentStatus::default()),
    };
    let body = envelope("apps/v1", "Deployment", deployment.encode_to_vec());
    let got = decode(&body).unwrap();
    let want = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web",
            "creationTimestamp": null,
            "labels": {"app": "web"},
            "annotations": {"note": "a b"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": "1234", "controller": false}],
            "managedFields": [{
                "manager": "kubectl", "operation": "Update", "apiVersion": "apps/v1",
                "time": "2023-11-14T22:13:20Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}},
            }],
        },
        "spec": {
            "replicas": 0,
            "selector": {
                "matchLabels": {"app": "web"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}],
            },
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": "25%"}},
            "template": {
                "metadata": {"labels": {"app": "web"}, "creationTimestamp": null},
                "spec": {
                    "hostNetwork": true,
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{
                        "name": "nginx",
                        "image": "nginx:1.27",
                        "args": ["-g", "daemon off;"],
                        "ports": [{"containerPort": 80, "protocol": "TCP"}],
                        "env": [{"name": "MODE", "value": "prod"}],
                        "resources": {"limits": {"cpu": "500m"}, "requests": {"memory": "128Mi"}},
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
                    }],
                },
            },
        },
        "status": {},
    });
    assert_eq!(
        got,
        want,
        "got {}",
        serde_json::to_string_pretty(&got).unwrap()
    );
}

#[test]
fn json_names_follow_kubernetes_not_snake_case() {
    let svc = core::Service {
        metadata: Some(meta::ObjectMeta {
            name: s("svc"),
            ..Default::default()
        }),
        spec: Some(core::ServiceSpec {
            r#type: s("ClusterIP"),
            cluster_ip: s("10.43.0.10"),
            cluster_ips: vec!["10.43.0.10".into()],
            ports: vec![core::ServicePort {
                name: s("80-8080"),
                port: Some(80),
                target_port: Some(int_or_string_int(8080)),
                protocol: s("TCP"),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    };
    let got = decode(&envelope("v1", "Service", svc.encode_to_vec())).unwrap();
    assert_eq!(got["spec"]["clusterIPs"], json!(["10.43.0.10"]));
    assert_eq!(got["spec"]["clusterIP"], "10.43.0.10");
    assert_eq!(got["spec"]["ports"][0]["targetPort"], 8080);

    let pod_status = core::PodStatus {
        pod_ip: s("10.42.0.5"),
        host_ip: s("192.168.1.2"),
        start_time: Some(meta::Time {
            seconds: Some(0),
            nanos: Some(0),
        }),
        ..Default::default()
    };
    let got = decode_message("api.core.v1.PodStatus", &pod_status.encode_to_vec()).unwrap();
    assert_eq!(
        got,
        json!({"podIP": "10.42.0.5", "hostIP": "192.168.1.2", "startTime": "1970-01-01T00:00:00Z"})
    );

    let ebs = core::AwsElasticBlockStoreVolumeSource {
        volume_id: s("vol-1"),
        fs_type: s("ext4"),
        partition: Some(0),
        read_only: Some(false),
    };
    let got = decode_message(
        "api.core.v1.AwsElasticBlockStoreVolumeSource",
        &ebs.encode_to_vec(),
    )
    .unwrap();
    assert_eq!(got, json!({"volumeID": "vol-1", "fsType": "ext4"}));
}

#[test]
fn secrets_configmaps_and_namespaces() {
    let secret = core::Secret {
        metadata: Some(meta::ObjectMeta {
            name: s("creds"),
            namespace: s("default"),
            ..Default::default()
        }),
        data: [("password".to_owned(), b"s3cr3t".to_vec())]
            .into_iter()
            .collect(),
        r#type: s("Opaque"),
        immutable: Some(false),
        ..Default::default()
    };
    let got = decode(&envelope("v1", "Secret", secret.encode_to_vec())).unwrap();
    assert_eq!(
        got,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": "default"},
               "data": {"password": "czNjcjN0"}, "type": "Opaque", "immutable": false})
    );

    let cm = core::ConfigMap {
        metadata: Some(meta::ObjectMeta {
            name: s("cfg"),
            ..Default::default()
        }),
        data: labels(&[("a", "1"), ("empty", "")]),
        ..Default::default()
    };
    let got = decode(&envelope("v1", "ConfigMap", cm.encode_to_vec())).unwrap();
    assert_eq!(got["data"], json!({"a": "1", "empty": ""}));

    let ns = core::Namespace {
        metadata: Some(meta::ObjectMeta {
            name: s("team-a"),
            creation_timestamp: Some(meta::Time::default()),
            ..Default::default()
        }),
        spec: Some(core::NamespaceSpec::default()),
        status: Some(core::NamespaceStatus {
            phase: s(""),
            conditions: vec![],
        }),
    };
    let got = decode(&envelope("v1", "Namespace", ns.encode_to_vec())).unwrap();
    assert_eq!(
        got,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a", "creationTimestamp": null}, "spec": {}, "status": {}})
    );
}

#[test]
fn bad_bodies_are_errors_not_panics() {
    assert_eq!(decode(b"{\"kind\":\"Pod\"}"), Err(ProtobufError::Magic));
    let ns = core::Namespace::default().encode_to_vec();
    assert!(matches!(
        decode(&envelope("example.com/v1", "Widget", ns.clone())),
        Err(ProtobufError::UnknownKind { .. })
    ));
    // Truncated envelope.
    let body = envelope("v1", "Namespace", ns);
    let err = decode(&body[..body.len() - 1]).unwrap_err().to_string();
    assert!(!err.is_empty());
    // A string field holding invalid UTF-8, deep inside.
    let bad = core::ConfigMap {
        metadata: Some(meta::ObjectMeta {
            name: s("x"),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let mut raw = bad.clone();
    let pos = raw.iter().position(|b| *b == b'x').unwrap();
    raw[pos] = 0xff;
    let err = decode(&envelope("v1", "ConfigMap", raw))
        .unwrap_err()
        .to_string();
    assert!(err.contains("metadata.name"), "{err}");
    // Wrong wire type for a field: metadata (1) as a varint.
    let err = decode(&envelope("v1", "ConfigMap", vec![0x08, 0x01]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("metadata"), "{err}");
    // Garbage of every length never panics.
    for len in 0..64 {
        let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
        let _ = decode(&envelope("apps/v1", "Deployment", junk.clone()));
        let mut b = b"k8s\0".to_vec();
        b.extend(junk);
        let _ = decode(&b);
    }
    // Content encodings are refused.
    let unknown = Unknown {
        type_meta: Some(TypeMeta {
            api_version: s("v1"),
            kind: s("Namespace"),
        }),
        raw: Some(vec![]),
        content_encoding: s("gzip"),
        content_type: None,
    };
    let mut b = b"k8s\0".to_vec();
    b.extend(unknown.encode_to_vec());
    assert_eq!(
        decode(&b),
        Err(ProtobufError::ContentEncoding("gzip".into()))
    );
}

#[test]
fn durations_print_like_go() {
    assert_eq!(go_duration(0), "0s");
    assert_eq!(go_duration(1_500), "1.5µs");
    assert_eq!(go_duration(100_000_000), "100ms");
    assert_eq!(go_duration(1_500_000_000), "1.5s");
    assert_eq!(go_duration(90_000_000_000), "1m30s");
    assert_eq!(go_duration(3_600_000_000_000), "1h0m0s");
    assert_eq!(go_duration(-5_000_000_000), "-5s");
}

#[test]
fn eviction_and_delete_options_under_any_group_version() {
    use k8s_pb::api::policy::v1 as policy;
    let options = meta::DeleteOptions {
        grace_period_seconds: Some(0),
        propagation_policy: s("Foreground"),
        dry_run: vec!["All".into()],
        ..Default::default()
    };
    let eviction = policy::Eviction {
        metadata: Some(meta::ObjectMeta {
            name: s("p1"),
            namespace: s("default"),
            ..Default::default()
        }),
        delete_options: Some(options.clone()),
    };
    let got = decode(&envelope("policy/v1", "Eviction", eviction.encode_to_vec())).unwrap();
    assert_eq!(
        got,
        json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "p1", "namespace": "default"},
               "deleteOptions": {"gracePeriodSeconds": 0, "propagationPolicy": "Foreground", "dryRun": ["All"]}})
    );
    // client-go sends DeleteOptions under the client's group version.
    let got = decode(&envelope(
        "apps/v1",
        "DeleteOptions",
        options.encode_to_vec(),
    ))
    .unwrap();
    assert_eq!(got["gracePeriodSeconds"], 0);
    assert_eq!(got["kind"], "DeleteOptions");
}

#[test]
fn crd_schemas_decode_their_special_forms() {
    use k8s_pb::apiextensions_apiserver::pkg::apis::apiextensions::v1 as ext;
    let int_schema = ext::JsonSchemaProps {
        r#type: s("integer"),
        minimum: Some(1.0),
        default: Some(ext::Json {
            raw: Some(b"1".to_vec()),
        }),
        ..Default::default()
    };
    let root = ext::JsonSchemaProps {
        r#type: s("object"),
        properties: [
            ("replicas".to_owned(), int_schema.clone()),
            (
                "spec".to_owned(),
                ext::JsonSchemaProps {
                    r#type: s("object"),
                    x_kubernetes_preserve_unknown_fields: Some(true),
                    ..Default::default()
                },
            ),
            (
                "tags".to_owned(),
                ext::JsonSchemaProps {
                    r#type: s("array"),
                    items: Some(Box::new(ext::JsonSchemaPropsOrArray {
                        schema: Some(Box::new(ext::JsonSchemaProps {
                            r#type: s("string"),
                            ..Default::default()
                        })),
                        j_son_schemas: vec![],
                    })),
                    ..Default::default()
                },
            ),
        ]
        .into_iter()
        .collect(),
        additional_properties: Some(Box::new(ext::JsonSchemaPropsOrBool {
            allows: Some(false),
            schema: None,
        })),
        r#ref: s("#/definitions/x"),
        ..Default::default()
    };
    let got = decode_message(
        "apiextensions_apiserver.pkg.apis.apiextensions.v1.JsonSchemaProps",
        &root.encode_to_vec(),
    )
    .unwrap();
    assert_eq!(
        got,
        json!({
            "type": "object",
            "$ref": "#/definitions/x",
            "additionalProperties": false,
            "properties": {
                "replicas": {"type": "integer", "minimum": 1.0, "default": 1},
                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
        })
    );
    let sub = ext::CustomResourceSubresources {
        status: Some(ext::CustomResourceSubresourceStatus {}),
        scale: None,
    };
    let got = decode_message(
        "apiextensions_apiserver.pkg.apis.apiextensions.v1.CustomResourceSubresources",
        &sub.encode_to_vec(),
    )
    .unwrap();
    assert_eq!(got, json!({"status": {}}));
}

/// Every truncation and single-byte corruption of a real body (and random
/// bytes) decodes or fails cleanly: no panic, no runaway recursion.
#[test]
fn corrupted_bodies_never_panic() {
    let deployment = apps::Deployment {
        metadata: Some(meta::ObjectMeta {
            name: s("web"),
            labels: labels(&[("app", "web")]),
            ..Default::default()
        }),
        spec: Some(apps::DeploymentSpec {
            replicas: Some(3),
            template: Some(core::PodTemplateSpec {
                metadata: None,
                spec: Some(core::PodSpec {
                    containers: vec![core::Container {
                        name: s("c"),
                        image: s("nginx"),
                        ports: vec![core::ContainerPort {
                            container_port: Some(80),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
        status: None,
    };
    let body = envelope("apps/v1", "Deployment", deployment.encode_to_vec());
    assert!(decode(&body).is_ok());
    for len in 0..body.len() {
        let _ = decode(&body[..len]);
    }
    for pos in 4..body.len() {
        for v in [0x00u8, 0x01, 0x02, 0x07, 0x0a, 0x12, 0x7f, 0x80, 0xff] {
            let mut b = body.clone();
            b[pos] = v;
            let _ = decode(&b);
        }
    }
    // xorshift noise after a valid envelope header.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for round in 0..2_000 {
        let n = round % 97;
        let junk: Vec<u8> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = decode(&envelope("apps/v1", "Deployment", junk.clone()));
        let _ = decode(&envelope("v1", "Pod", junk));
    }
    // Deep nesting through recursive schemas is bounded.
    let mut props = ext_deep();
    for _ in 0..200 {
        props = ext_deep_wrap(props);
    }
    let err = decode_message(
        "apiextensions_apiserver.pkg.apis.apiextensions.v1.JsonSchemaProps",
        &props,
    );
    assert!(matches!(err, Err(ProtobufError::TooDeep(_))), "{err:?}");
}

/// An encoded JSONSchemaProps with just a type.
fn ext_deep() -> Vec<u8> {
    use k8s_pb::apiextensions_apiserver::pkg::apis::apiextensions::v1 as ext;
    ext::JsonSchemaProps {
        r#type: s("object"),
        ..Default::default()
    }
    .encode_to_vec()
}

/// JSONSchemaProps{not: <inner>} (field 28), built by hand to nest deeply.
fn ext_deep_wrap(inner: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(28, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(inner.len() as u64, &mut out);
    out.extend(inner);
    out
}
