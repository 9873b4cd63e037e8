//! Server-side field validation for built-in kinds
//! (`fieldValidation=Strict`, which kubectl sends by default): fields the
//! kind does not have are reported, as kube-apiserver's strict decoding
//! does, using the schema table the protobuf decoder is generated from.

use crate::protobuf::schema::{self, Label, Special, Ty};
use serde_json::Value;

/// The paths of fields in `obj` unknown to its kind; `None` when the kind
/// has no built-in schema (custom resources have their own).
pub fn unknown_fields(api_version: &str, kind: &str, obj: &Value) -> Option<Vec<String>> {
    let index = schema::for_kind(api_version, kind)?;
    let mut out = Vec::new();
    walk(index, obj, "", true, &mut out, 0);
    Some(out)
}

/// Looks `name` up among a message's fields, including those of structs it
/// embeds inline (empty JSON name in the table).
fn find(index: u16, name: &str, depth: usize) -> Option<&'static schema::Field> {
    let msg = schema::message(index)?;
    for f in msg.fields {
        if f.json == name {
            return Some(f);
        }
        if f.json.is_empty()
            && depth < 8
            && let Ty::Message(i) = f.ty
            && let Some(found) = find(i, name, depth + 1)
        {
            return Some(found);
        }
    }
    None
}

fn plain_message(ty: Ty) -> Option<u16> {
    match ty {
        Ty::Message(i) if schema::message(i).is_some_and(|m| m.special == Special::None) => Some(i),
        _ => None,
    }
}

fn walk(index: u16, v: &Value, path: &str, top: bool, out: &mut Vec<String>, depth: usize) {
    let Some(map) = v.as_object() else { return };
    if depth > 64 {
        return;
    }
    for (k, child) in map {
        if top && (k == "apiVersion" || k == "kind") {
            continue;
        }
        let here = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        let Some(field) = find(index, k, 0) else {
            out.push(here);
            continue;
        };
        match field.label {
            Label::Single => {
                if let Some(i) = plain_message(field.ty) {
                    walk(i, child, &here, false, out, depth + 1);
                }
            }
            Label::Repeated => {
                if let (Some(i), Some(items)) = (plain_message(field.ty), child.as_array()) {
                    for (n, item) in items.iter().enumerate() {
                        walk(i, item, &format!("{here}[{n}]"), false, out, depth + 1);
                    }
                }
            }
            Label::Map(value_ty) => {
                if let (Some(i), Some(entries)) = (plain_message(value_ty), child.as_object()) {
                    for (key, item) in entries {
                        walk(i, item, &format!("{here}[{key}]"), false, out, depth + 1);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_are_found_at_any_depth() {
        if !schema::available() {
            panic!(
                "the protobuf schema table was not generated (build.rs could not read k8s-pb/k8s-openapi)"
            );
        }
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "x", "labels": {"a": "b"}, "bogusMeta": 1},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"a": "b"}},
                     "template": {"spec": {"containers": [{"name": "c", "image": "i", "imagePullPolicy": "Always",
                        "livenessProbe": {"httpGet": {"port": 80}, "periodSeconds": 3},
                        "resources": {"limits": {"cpu": "1"}}, "typo": true}],
                        "volumes": [{"name": "v", "emptyDir": {}}]}},
                     "strategy": {"type": "Recreate"}, "extra": 1}});
        let mut unknown = unknown_fields("apps/v1", "Deployment", &d).unwrap();
        unknown.sort();
        assert_eq!(
            unknown,
            [
                "metadata.bogusMeta",
                "spec.extra",
                "spec.template.spec.containers[0].typo"
            ]
        );
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"k": "v"}});
        assert_eq!(
            unknown_fields("v1", "ConfigMap", &cm).unwrap(),
            Vec::<String>::new()
        );
        assert!(unknown_fields("example.com/v1", "Widget", &cm).is_none());
    }
}
