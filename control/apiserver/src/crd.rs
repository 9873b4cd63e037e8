//! CustomResourceDefinitions: serving the resources they define, and
//! validating, pruning and defaulting custom objects against the
//! definition's structural `openAPIV3Schema`.
//!
//! The registry follows the stored CRDs through a watch, so a CRD created on
//! any server (HA on etcd) is served by all of them within moments.

use crate::{
    api::Api,
    objects,
    resources::ResourceInfo,
    status::{ApiError, Cause},
};
use serde_json::{Map, Value, json};
use skep_store::{Event, ListRequest};
use std::{sync::Arc, time::Duration};

const GROUP: &str = "apiextensions.k8s.io";

/// Whether `info` is the CRD resource itself.
pub fn is_crd(info: &ResourceInfo) -> bool {
    info.group == GROUP && info.plural == "customresourcedefinitions"
}

/// The served resources a CRD defines (one per served version).
pub fn resources_of(crd: &Value) -> Vec<ResourceInfo> {
    let spec = crd.get("spec").unwrap_or(&Value::Null);
    let group = spec
        .get("group")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let names = spec.get("names").unwrap_or(&Value::Null);
    let kind = names
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let plural = names
        .get("plural")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let singular = names
        .get("singular")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| kind.to_lowercase());
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let namespaced = spec.get("scope").and_then(Value::as_str) != Some("Cluster");
    let mut out = Vec::new();
    for v in spec
        .get("versions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if v.get("served").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let mut subresources = Vec::new();
        if v.pointer("/subresources/status").is_some() {
            subresources.push("status".to_owned());
        }
        if v.pointer("/subresources/scale").is_some() {
            subresources.push("scale".to_owned());
        }
        out.push(ResourceInfo {
            group: group.clone(),
            version: v
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            kind: kind.clone(),
            plural: plural.clone(),
            singular: singular.clone(),
            namespaced,
            short_names: strings(names.get("shortNames")),
            categories: strings(names.get("categories")),
            subresources,
            verbs: [
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            schema: v.pointer("/schema/openAPIV3Schema").cloned(),
        });
    }
    out
}

/// Validates a CRD's own fields (names, group, versions).
pub fn validate_definition(crd: &Value, causes: &mut Vec<Cause>) {
    let spec = crd.get("spec").unwrap_or(&Value::Null);
    let group = spec.get("group").and_then(Value::as_str).unwrap_or("");
    let plural = spec
        .pointer("/names/plural")
        .and_then(Value::as_str)
        .unwrap_or("");
    if group.is_empty() || !group.contains('.') {
        causes.push(Cause::invalid(
            "spec.group",
            "should be a domain with at least one dot",
        ));
    }
    if plural.is_empty() {
        causes.push(Cause::required("spec.names.plural"));
    }
    if spec
        .pointer("/names/kind")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        causes.push(Cause::required("spec.names.kind"));
    }
    let name = objects::name(crd);
    if !name.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause::invalid(
            "metadata.name",
            format!("must be spec.names.plural+\".\"+spec.group ({plural}.{group})"),
        ));
    }
    let versions = spec.get("versions").and_then(Value::as_array);
    match versions {
        None => causes.push(Cause::required("spec.versions")),
        Some(vs) => {
            let storage = vs
                .iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .count();
            if storage != 1 {
                causes.push(Cause::invalid(
                    "spec.versions",
                    "must have exactly one version marked as storage version",
                ));
            }
            for (i, v) in vs.iter().enumerate() {
                if v.pointer("/schema/openAPIV3Schema").is_none() {
                    causes.push(Cause::required(format!(
                        "spec.versions[{i}].schema.openAPIV3Schema"
                    )));
                }
            }
        }
    }
}

/// Fills in the status a real API server reports for an accepted CRD.
pub fn set_status(crd: &mut Value) {
    let names = crd
        .pointer("/spec/names")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .filter_map(|v| v.get("name").cloned())
        .collect();
    let now = objects::now_rfc3339();
    crd["status"] = json!({
        "acceptedNames": names,
        "storedVersions": stored,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now},
        ],
    });
}

/// What to do with fields the schema does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unknown {
    /// Drop them silently (kube's pruning).
    Prune,
    /// Reject the object.
    Strict,
}

/// Validates `obj` (a custom object) against its version's schema, pruning
/// unknown fields and applying defaults. Returns the paths of pruned
/// fields (for warnings).
pub fn validate_object(
    schema: &Value,
    obj: &mut Value,
    unknown: Unknown,
    causes: &mut Vec<Cause>,
) -> Vec<String> {
    let mut pruned = Vec::new();
    // apiVersion, kind and metadata are the server's business.
    let Some(map) = obj.as_object_mut() else {
        causes.push(Cause::invalid("", "must be an object"));
        return pruned;
    };
    let props = schema.get("properties").and_then(Value::as_object);
    for (k, v) in map.iter_mut() {
        if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match props.and_then(|p| p.get(k)) {
            Some(sub) => check(sub, v, k, unknown, causes, &mut pruned),
            None if preserves_unknown(schema) => {}
            None => pruned.push(k.clone()),
        }
    }
    apply_top_level(schema, map, unknown, causes, &pruned);
    pruned
}

fn apply_top_level(
    schema: &Value,
    map: &mut Map<String, Value>,
    unknown: Unknown,
    causes: &mut Vec<Cause>,
    pruned: &[String],
) {
    let top: Vec<&String> = pruned.iter().filter(|p| !p.contains('.')).collect();
    if unknown == Unknown::Strict {
        for p in pruned {
            causes.push(Cause::invalid(p.clone(), "unknown field"));
        }
    } else {
        for p in top {
            map.remove(p.as_str());
        }
    }
    defaults_and_required(schema, map, "", causes);
}

fn preserves_unknown(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
}

fn defaults_and_required(
    schema: &Value,
    map: &mut Map<String, Value>,
    path: &str,
    causes: &mut Vec<Cause>,
) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, sub) in props {
            if !map.contains_key(k)
                && let Some(d) = sub.get("default")
            {
                map.insert(k.clone(), d.clone());
            }
        }
    }
    for r in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(r) = r.as_str()
            && !map.contains_key(r)
        {
            causes.push(Cause::required(join(path, r)));
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks `v` at `path` against `schema`, recursing; unknown object fields
/// are pruned in place (or reported under Strict).
fn check(
    schema: &Value,
    v: &mut Value,
    path: &str,
    unknown: Unknown,
    causes: &mut Vec<Cause>,
    pruned: &mut Vec<String>,
) {
    if v.is_null() && schema.get("nullable").and_then(Value::as_bool) == Some(true) {
        return;
    }
    let int_or_string = schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true);
    if let Some(want) = schema.get("type").and_then(Value::as_str) {
        let have = type_name(v);
        let ok = have == want
            || (want == "number" && have == "integer")
            || (int_or_string && matches!(have, "integer" | "string"));
        if !ok {
            causes.push(Cause::invalid(
                path,
                format!(
                    "Invalid value: \"{have}\": {path} in body must be of type {want}: \"{have}\""
                ),
            ));
            return;
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(v)
    {
        let list: Vec<String> = options.iter().map(Value::to_string).collect();
        causes.push(Cause {
            reason: "FieldValueNotSupported",
            field: path.to_owned(),
            message: format!(
                "Unsupported value: {v}: supported values: {}",
                list.join(", ")
            ),
        });
    }
    match v {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && x < min
            {
                causes.push(Cause::invalid(path, format!("Invalid value: {n}: {path} in body should be greater than or equal to {min}")));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && x > max
            {
                causes.push(Cause::invalid(
                    path,
                    format!(
                        "Invalid value: {n}: {path} in body should be less than or equal to {max}"
                    ),
                ));
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && len < min
            {
                causes.push(Cause::invalid(
                    path,
                    format!(
                        "Invalid value: {s:?}: {path} in body should be at least {min} chars long"
                    ),
                ));
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && len > max
            {
                causes.push(Cause {
                    reason: "FieldValueTooLong",
                    field: path.to_owned(),
                    message: format!("Too long: may not be more than {max} bytes"),
                });
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                causes.push(Cause::invalid(
                    path,
                    format!("Too many: {}: must have at most {max} items", items.len()),
                ));
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                causes.push(Cause::invalid(
                    path,
                    format!("Invalid value: {path} in body should have at least {min} items"),
                ));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    check(
                        item_schema,
                        item,
                        &format!("{path}[{i}]"),
                        unknown,
                        causes,
                        pruned,
                    );
                }
            }
        }
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let mut drop = Vec::new();
            for (k, child) in map.iter_mut() {
                let child_path = join(path, k);
                match (props.and_then(|p| p.get(k)), additional) {
                    (Some(sub), _) => check(sub, child, &child_path, unknown, causes, pruned),
                    (None, Some(Value::Object(_))) => {
                        if let Some(sub) = additional {
                            check(sub, child, &child_path, unknown, causes, pruned);
                        }
                    }
                    (None, Some(Value::Bool(true))) => {}
                    _ if preserves_unknown(schema) => {}
                    _ => {
                        pruned.push(child_path);
                        drop.push(k.clone());
                    }
                }
            }
            if unknown == Unknown::Prune {
                for k in drop {
                    map.remove(&k);
                }
            }
            defaults_and_required(schema, map, path, causes);
        }
        _ => {}
    }
}

/// Keeps the registry in step with the stored CRDs, and removes the
/// objects of a deleted CRD.
pub fn spawn_registry_sync(api: Arc<Api>) {
    tokio::spawn(async move {
        let Some(crd_info) = api
            .registry
            .lookup(GROUP, "v1", "customresourcedefinitions")
        else {
            return;
        };
        let prefix = crd_info.storage_prefix();
        loop {
            let page = match api.store.list(ListRequest::prefix(&prefix)).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "listing CRDs failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            for kv in &page.items {
                if let Ok(crd) = objects::from_kv(kv) {
                    install(&api, &crd);
                }
            }
            let mut watch = match api.store.watch(&prefix, page.revision).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "watching CRDs failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(event) = watch.next().await {
                match event {
                    Ok(Event::Put { kv, prev }) => {
                        if let Some(prev) = prev.and_then(|p| objects::from_kv(&p).ok()) {
                            uninstall(&api, &prev, false).await;
                        }
                        if let Ok(crd) = objects::from_kv(&kv) {
                            install(&api, &crd);
                        }
                    }
                    Ok(Event::Delete {
                        prev: Some(prev), ..
                    }) => {
                        if let Ok(crd) = objects::from_kv(&prev) {
                            uninstall(&api, &crd, true).await;
                        }
                    }
                    Ok(Event::Delete { prev: None, .. }) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "CRD watch ended; resyncing");
                        break;
                    }
                }
            }
        }
    });
}

/// Serves the resources of `crd` now (the watch catches up later).
pub fn install(api: &Api, crd: &Value) {
    for info in resources_of(crd) {
        tracing::info!(group = %info.group, version = %info.version, plural = %info.plural, "serving custom resource");
        api.registry.upsert(info);
    }
}

async fn uninstall(api: &Api, crd: &Value, delete_objects: bool) {
    let Some(first) = resources_of(crd).into_iter().next() else {
        return;
    };
    api.registry.remove(&first.group, &first.plural);
    if !delete_objects {
        return;
    }
    let prefix = first.storage_prefix();
    match api.store.list(ListRequest::prefix(&prefix)).await {
        Ok(page) => {
            for kv in page.items {
                let _ = api.store.delete(&kv.key, None).await;
            }
            tracing::info!(group = %first.group, plural = %first.plural, "custom resources of a deleted CRD removed");
        }
        Err(e) => tracing::warn!(error = %e, "removing the objects of a deleted CRD failed"),
    }
}

/// The error for a custom object that fails its schema.
pub fn invalid(info: &ResourceInfo, name: &str, causes: Vec<Cause>) -> ApiError {
    ApiError::invalid(&format!("{}.{}", info.kind, info.group), name, causes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["size"], "properties": {
                "size": {"type": "integer", "minimum": 1, "maximum": 10},
                "mode": {"type": "string", "enum": ["fast", "slow"], "default": "fast"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
            }}
        }})
    }

    #[test]
    fn valid_objects_get_defaults_and_pruning() {
        let mut o = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "a"},
            "spec": {"size": 3, "junk": 1, "free": {"any": {"thing": 1}}}, "extra": true});
        let mut causes = Vec::new();
        let pruned = validate_object(&schema(), &mut o, Unknown::Prune, &mut causes);
        assert!(causes.is_empty(), "{causes:?}");
        assert_eq!(o["spec"]["mode"], "fast");
        assert!(o["spec"].get("junk").is_none());
        assert!(o.get("extra").is_none());
        assert_eq!(o["spec"]["free"]["any"]["thing"], 1);
        let mut pruned = pruned;
        pruned.sort();
        assert_eq!(pruned, ["extra", "spec.junk"]);
    }

    #[test]
    fn invalid_objects_report_each_field() {
        let mut o = json!({"spec": {"size": 20, "mode": "medium", "tags": ["a", "b", "c"]}});
        let mut causes = Vec::new();
        validate_object(&schema(), &mut o, Unknown::Prune, &mut causes);
        let mut fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        fields.sort();
        assert_eq!(fields, ["spec.mode", "spec.size", "spec.tags"]);
        let mut o = json!({"spec": {"mode": 5}});
        let mut causes = Vec::new();
        validate_object(&schema(), &mut o, Unknown::Strict, &mut causes);
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert!(
            fields.contains(&"spec.mode") && fields.contains(&"spec.size"),
            "{fields:?}"
        );
    }
}
