//! Property-based fuzzing of everything that parses client input: request
//! bodies (JSON, YAML, patch documents), selectors, continue tokens and the
//! patch engines. The property is "never panics": bad input must come back
//! as an error value.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use serde_json::Value;
use skep_apiserver::{api, patch, selectors};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        "[a-z$/]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    "[a-z]{1,8}".prop_map(|s| s),
                    Just("$patch".to_string()),
                    Just("$retainKeys".to_string()),
                    Just("$deleteFromPrimitiveList/finalizers".to_string()),
                    Just("containers".to_string()),
                    Just("name".to_string()),
                    Just("ports".to_string()),
                    Just("containerPort".to_string()),
                    Just("finalizers".to_string()),
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn bodies_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512),
                          ct in prop_oneof![Just("application/json"), Just("application/yaml"),
                                            Just("application/apply-patch+yaml"), Just("application/vnd.kubernetes.protobuf"),
                                            Just("text/plain")]) {
        let _ = api::decode_body(&bytes, ct);
    }

    #[test]
    fn label_selectors_never_panic(s in "[a-z=!,() in notin]{0,40}") {
        if let Ok(sel) = selectors::LabelSelector::parse(&s) {
            let _ = sel.matches_object(&serde_json::json!({"metadata": {"labels": {"a": "b"}}}));
        }
    }

    #[test]
    fn field_selectors_never_panic(s in "[a-zA-Z.=!,]{0,40}") {
        if let Ok(sel) = selectors::FieldSelector::parse(&s, selectors::supported_fields("", "pods")) {
            let _ = sel.matches(&serde_json::json!({"metadata": {"name": "x"}, "spec": {"nodeName": "n"}}));
        }
    }

    #[test]
    fn strategic_merge_never_panics(mut target in json_value(), p in json_value()) {
        let _ = patch::strategic_merge(&mut target, &p);
    }

    #[test]
    fn json_patch_never_panics(mut target in json_value(), p in json_value()) {
        let _ = patch::json_patch(&mut target, &p);
        patch::merge_patch(&mut target, &p);
    }

    #[test]
    fn label_selector_objects_never_panic(v in json_value()) {
        let _ = selectors::LabelSelector::from_json(&v);
    }
}
