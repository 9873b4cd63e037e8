//! Small accessors for object metadata and the pod facts several
//! controllers share.

use serde_json::{Value, json};
use skep_apiserver::selectors::LabelSelector;
use std::collections::BTreeMap;

pub fn name(o: &Value) -> &str {
    skep_apiserver::objects::name(o)
}

pub fn namespace(o: &Value) -> Option<&str> {
    skep_apiserver::objects::namespace(o)
}

pub fn uid(o: &Value) -> &str {
    o.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Cache key: `namespace/name`, or `name` for cluster-scoped objects.
pub fn key(o: &Value) -> String {
    match namespace(o) {
        Some(ns) if !ns.is_empty() => format!("{ns}/{}", name(o)),
        _ => name(o).to_owned(),
    }
}

/// Splits a cache key into namespace and name.
pub fn split_key(key: &str) -> (Option<&str>, &str) {
    match key.split_once('/') {
        Some((ns, n)) => (Some(ns), n),
        None => (None, key),
    }
}

pub fn is_deleting(o: &Value) -> bool {
    o.pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

pub fn resource_version(o: &Value) -> i64 {
    skep_apiserver::objects::resource_version(o).unwrap_or(0)
}

pub fn generation(o: &Value) -> i64 {
    o.pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

pub fn labels(o: &Value) -> BTreeMap<String, String> {
    skep_apiserver::selectors::labels_of(o)
}

pub fn annotation<'a>(o: &'a Value, k: &str) -> Option<&'a str> {
    o.pointer("/metadata/annotations")
        .and_then(|a| a.get(k))
        .and_then(Value::as_str)
}

pub fn owner_refs(o: &Value) -> Vec<Value> {
    o.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// `namespace/name` of the object's managing controller when it is of
/// `kind` (how a pod change is routed to the workload that owns it).
pub fn controller_key(o: &Value, kind: &str) -> Option<String> {
    let ns = namespace(o)?;
    owner_refs(o).iter().find_map(|r| {
        (r.get("kind").and_then(Value::as_str) == Some(kind)
            && r.get("controller").and_then(Value::as_bool) == Some(true))
        .then(|| {
            r.get("name")
                .and_then(Value::as_str)
                .map(|n| format!("{ns}/{n}"))
        })
        .flatten()
    })
}

/// The uid of the managing controller (`ownerReferences[controller=true]`).
pub fn controller_uid(o: &Value) -> Option<&str> {
    o.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)?
        .iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
        .and_then(|r| r.get("uid"))
        .and_then(Value::as_str)
}

/// The controller ownerReference of `owner`, as its dependents carry it.
pub fn controller_ref(owner: &Value, api_version: &str, kind: &str) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "name": name(owner),
        "uid": uid(owner),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// A workload's `spec.selector`; `None` when absent or invalid, which
/// selects nothing (never everything).
pub fn selector(o: &Value) -> Option<LabelSelector> {
    let s = o.pointer("/spec/selector")?;
    if s.as_object().is_none_or(|m| m.is_empty()) {
        return None;
    }
    LabelSelector::from_json(s).ok()
}

pub fn condition<'a>(o: &'a Value, kind: &str) -> Option<&'a Value> {
    o.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

/// `o`'s status conditions with `new` in place of any of its type, last
/// (a status patch replaces the whole list).
pub fn with_condition(o: &Value, new: Value) -> Vec<Value> {
    let kind = new.get("type").and_then(Value::as_str).unwrap_or("");
    let mut conditions: Vec<Value> = o
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.get("type").and_then(Value::as_str) != Some(kind))
        .collect();
    conditions.push(new);
    conditions
}

pub fn condition_true(o: &Value, kind: &str) -> bool {
    condition(o, kind)
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        == Some("True")
}

pub fn pod_phase(p: &Value) -> &str {
    p.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending")
}

/// Succeeded or Failed: the pod will never run again.
pub fn pod_terminal(p: &Value) -> bool {
    matches!(pod_phase(p), "Succeeded" | "Failed")
}

/// Counts towards a controller's replicas: neither terminal nor deleting.
pub fn pod_active(p: &Value) -> bool {
    !pod_terminal(p) && !is_deleting(p)
}

pub fn pod_ready(p: &Value) -> bool {
    condition_true(p, "Ready")
}

pub fn node_name(p: &Value) -> &str {
    p.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Ready for at least `min_ready` seconds at `now`; the second value is
/// how long until it becomes available when it is ready but not yet.
pub fn pod_available(
    p: &Value,
    min_ready: i64,
    now: chrono::DateTime<chrono::Utc>,
) -> (bool, Option<i64>) {
    if !pod_ready(p) {
        return (false, None);
    }
    if min_ready <= 0 {
        return (true, None);
    }
    let since = condition(p, "Ready")
        .and_then(|c| c.get("lastTransitionTime"))
        .and_then(Value::as_str)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
    match since {
        Some(t) => {
            let ready_for = (now - t.with_timezone(&chrono::Utc)).num_seconds();
            if ready_for >= min_ready {
                (true, None)
            } else {
                (false, Some(min_ready - ready_for))
            }
        }
        None => (true, None),
    }
}

pub fn now_rfc3339() -> String {
    skep_apiserver::objects::now_rfc3339()
}
