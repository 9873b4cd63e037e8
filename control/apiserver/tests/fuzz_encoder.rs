//! Property-based fuzzing of the protobuf response encoder: on arbitrary
//! JSON shaped like a few built-in kinds it never panics, and whatever it
//! encodes decodes, and re-encoding the decoded form is a fixed point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use serde_json::{Value, json};
use skep_apiserver::protobuf;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<i32>().prop_map(|n| Value::Number(n.into())),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        "[a-z0-9%/=]{0,10}".prop_map(Value::String),
        Just(json!("2026-01-01T00:00:00Z")),
        Just(json!("2026-01-01T00:00:00.123456Z")),
        Just(json!("500m")),
        Just(json!("AAEC")),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    "[a-z]{1,6}",
                    Just("metadata".to_string()),
                    Just("name".to_string()),
                    Just("labels".to_string()),
                    Just("creationTimestamp".to_string()),
                    Just("spec".to_string()),
                    Just("status".to_string()),
                    Just("containers".to_string()),
                    Just("image".to_string()),
                    Just("ports".to_string()),
                    Just("containerPort".to_string()),
                    Just("targetPort".to_string()),
                    Just("port".to_string()),
                    Just("resources".to_string()),
                    Just("limits".to_string()),
                    Just("replicas".to_string()),
                    Just("template".to_string()),
                    Just("data".to_string()),
                    Just("binaryData".to_string()),
                    Just("capacity".to_string()),
                    Just("eventTime".to_string()),
                    Just("items".to_string()),
                    Just("conditions".to_string()),
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn kind() -> impl Strategy<Value = (&'static str, &'static str)> {
    prop_oneof![
        Just(("v1", "Pod")),
        Just(("v1", "Service")),
        Just(("v1", "ConfigMap")),
        Just(("v1", "Node")),
        Just(("v1", "Event")),
        Just(("v1", "PodList")),
        Just(("v1", "Status")),
        Just(("apps/v1", "Deployment")),
        Just(("apiextensions.k8s.io/v1", "CustomResourceDefinition")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn encode_never_panics_and_round_trips((av, k) in kind(), body in json_value()) {
        assert!(protobuf::schema::available(), "the protobuf schema table was not generated");
        let mut obj = match body {
            Value::Object(m) => Value::Object(m),
            other => json!({"spec": other}),
        };
        obj["apiVersion"] = json!(av);
        obj["kind"] = json!(k);
        if let Ok(bytes) = protobuf::encode(&obj) {
            let once = protobuf::decode(&bytes).expect("what the encoder writes decodes");
            let again = protobuf::encode(&once).expect("the decoded form encodes");
            let twice = protobuf::decode(&again).expect("and decodes");
            prop_assert_eq!(once, twice);
        }
        let _ = protobuf::watch_frame("ADDED", &obj);
    }
}
