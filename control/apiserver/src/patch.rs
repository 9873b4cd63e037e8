//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and
//! Kubernetes strategic merge patch.
//!
//! Strategic merge differs from a merge patch for lists: lists of objects
//! with a patch merge key (containers by `name`, container ports by
//! `containerPort`, …) are merged element by element, some lists of
//! primitives (finalizers) are unions, and `$patch`, `$retainKeys` and
//! `$deleteFromPrimitiveList` directives are honoured. The merge keys are
//! those of the built-in types, keyed by field name and context.

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    #[error("the patch is not valid JSON: {0}")]
    Parse(String),
    #[error("the JSON patch could not be applied: {0}")]
    JsonPatch(String),
    #[error("the strategic merge patch is invalid: {0}")]
    Strategic(String),
}

pub fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let ops: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|e| PatchError::Parse(e.to_string()))?;
    json_patch::patch(target, &ops).map_err(|e| PatchError::JsonPatch(e.to_string()))
}

/// How a list field is merged.
pub(crate) enum ListStrategy {
    /// Replace the whole list (the default for lists).
    Replace,
    /// Merge objects by this key.
    MergeKey(&'static str),
    /// Union of primitive values.
    PrimitiveMerge,
}

/// The strategy of list `field` below `parents` (the fields above it).
pub(crate) fn strategy(field: &str, parents: &[String]) -> ListStrategy {
    let in_container = parents.iter().any(|p| {
        matches!(
            p.as_str(),
            "containers" | "initContainers" | "ephemeralContainers"
        )
    });
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims" => ListStrategy::MergeKey("name"),
        "volumeMounts" => ListStrategy::MergeKey("mountPath"),
        "volumeDevices" => ListStrategy::MergeKey("devicePath"),
        "ports" if in_container => ListStrategy::MergeKey("containerPort"),
        "ports" => ListStrategy::MergeKey("port"),
        "hostAliases" => ListStrategy::MergeKey("ip"),
        "conditions" => ListStrategy::MergeKey("type"),
        "addresses" if parents.last().is_some_and(|p| p == "status") => {
            ListStrategy::MergeKey("type")
        }
        "ownerReferences" => ListStrategy::MergeKey("uid"),
        "topologySpreadConstraints" => ListStrategy::MergeKey("topologyKey"),
        "taints" => ListStrategy::MergeKey("key"),
        "finalizers" => ListStrategy::PrimitiveMerge,
        _ => ListStrategy::Replace,
    }
}

/// Applies a strategic merge patch to `target`.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let mut parents = Vec::new();
    merge_value(target, patch, &mut parents)
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn merge_value(
    target: &mut Value,
    patch: &Value,
    parents: &mut Vec<String>,
) -> Result<(), PatchError> {
    let Value::Object(p) = patch else {
        *target = strip_directives(patch);
        return Ok(());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *target = strip_directives(patch);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        Some(other) if other != "merge" => {
            return Err(PatchError::Strategic(format!(
                "unknown $patch directive {other:?}"
            )));
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(t) = target.as_object_mut() else {
        return Ok(());
    };
    for (k, v) in p {
        if k == "$patch" || k.starts_with("$setElementOrder/") || k == "$retainKeys" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let remove: Vec<&Value> = v.as_array().map(|a| a.iter().collect()).unwrap_or_default();
            if let Some(Value::Array(list)) = t.get_mut(field) {
                list.retain(|x| !remove.contains(&x));
            }
            continue;
        }
        if k.starts_with('$') {
            return Err(PatchError::Strategic(format!("unknown directive {k:?}")));
        }
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(_) => {
                if v.get("$patch").and_then(Value::as_str) == Some("delete") {
                    t.remove(k);
                    continue;
                }
                parents.push(k.clone());
                let entry = t.entry(k.clone()).or_insert(Value::Null);
                let r = merge_value(entry, v, parents);
                parents.pop();
                r?;
            }
            Value::Array(items) => {
                let merged = merge_list(t.get(k), items, k, parents)?;
                t.insert(k.clone(), merged);
            }
            other => {
                t.insert(k.clone(), other.clone());
            }
        }
    }
    if let Some(Value::Array(keep)) = p.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(())
}

fn merge_list(
    current: Option<&Value>,
    patch: &[Value],
    field: &str,
    parents: &mut Vec<String>,
) -> Result<Value, PatchError> {
    let current: Vec<Value> = current
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // A `{"$patch": "replace"}` element replaces the list with the others.
    if patch
        .iter()
        .any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Ok(Value::Array(
            patch
                .iter()
                .filter(|e| e.get("$patch").is_none())
                .map(strip_directives)
                .collect(),
        ));
    }
    match strategy(field, parents) {
        ListStrategy::Replace => Ok(strip_directives(&Value::Array(patch.to_vec()))),
        ListStrategy::PrimitiveMerge => {
            let mut out = current;
            for item in patch {
                if !out.contains(item) {
                    out.push(item.clone());
                }
            }
            Ok(Value::Array(out))
        }
        ListStrategy::MergeKey(key) => {
            let mut out = current;
            parents.push(field.to_owned());
            for item in patch {
                let Some(id) = item.get(key) else {
                    parents.pop();
                    return Err(PatchError::Strategic(format!(
                        "an element of {field} has no merge key {key:?}"
                    )));
                };
                let pos = out.iter().position(|e| e.get(key) == Some(id));
                let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(i), true) => {
                        out.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => {
                        if let Err(e) = merge_value(&mut out[i], item, parents) {
                            parents.pop();
                            return Err(e);
                        }
                    }
                    (None, false) => out.push(strip_directives(item)),
                }
            }
            parents.pop();
            Ok(Value::Array(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn containers_merge_by_name_and_ports_by_container_port() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "ports": [{"containerPort": 80, "name": "http"}]},
            {"name": "b", "image": "b:1"}
        ]}});
        let patch = json!({"spec": {"containers": [
            {"name": "a", "image": "a:2", "ports": [{"containerPort": 81}]},
            {"name": "c", "image": "c:1"}
        ]}});
        strategic_merge(&mut pod, &patch).unwrap();
        let cs = pod["spec"]["containers"].as_array().unwrap();
        assert_eq!(cs.len(), 3);
        assert_eq!(cs[0]["image"], "a:2");
        assert_eq!(cs[0]["ports"].as_array().unwrap().len(), 2);
        assert_eq!(cs[1]["image"], "b:1");
        assert_eq!(cs[2]["name"], "c");
    }

    #[test]
    fn directives() {
        let mut obj = json!({"metadata": {"finalizers": ["a", "b"], "labels": {"x": "1", "y": "2"}},
            "spec": {"containers": [{"name": "a", "image": "i"}, {"name": "b", "image": "j"}], "tolerations": [{"key": "k"}]}});
        let patch = json!({
            "metadata": {"finalizers": ["c"], "$deleteFromPrimitiveList/finalizers": ["a"], "labels": {"x": null}},
            "spec": {"containers": [{"name": "b", "$patch": "delete"}], "tolerations": [{"key": "z"}]}
        });
        strategic_merge(&mut obj, &patch).unwrap();
        assert_eq!(obj["metadata"]["finalizers"], json!(["b", "c"]));
        assert_eq!(obj["metadata"]["labels"], json!({"y": "2"}));
        assert_eq!(
            obj["spec"]["containers"],
            json!([{"name": "a", "image": "i"}])
        );
        assert_eq!(obj["spec"]["tolerations"], json!([{"key": "z"}]));
    }

    #[test]
    fn retain_keys_and_replace() {
        let mut obj = json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        let patch = json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate", "rollingUpdate": null}}});
        strategic_merge(&mut obj, &patch).unwrap();
        assert_eq!(obj["spec"]["strategy"], json!({"type": "Recreate"}));
        let patch = json!({"spec": {"$patch": "replace", "replicas": 2}});
        strategic_merge(&mut obj, &patch).unwrap();
        assert_eq!(obj["spec"], json!({"replicas": 2}));
    }

    #[test]
    fn json_patch_and_merge_patch() {
        let mut v = json!({"a": {"b": 1}, "l": [1, 2]});
        json_patch(&mut v, &json!([{"op": "replace", "path": "/a/b", "value": 2}, {"op": "add", "path": "/l/-", "value": 3}])).unwrap();
        assert_eq!(v, json!({"a": {"b": 2}, "l": [1, 2, 3]}));
        assert!(json_patch(&mut v, &json!([{"op": "test", "path": "/a/b", "value": 9}])).is_err());
        merge_patch(&mut v, &json!({"a": null, "l": [9]}));
        assert_eq!(v, json!({"l": [9]}));
    }
}
