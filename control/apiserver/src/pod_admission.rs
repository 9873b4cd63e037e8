//! Admission of new pods, as upstream's default plugins do it:
//! * Priority: `spec.priorityClassName` resolves to `spec.priority` and
//!   `spec.preemptionPolicy` (the global default class, or 0, when the
//!   pod names none); an unknown class is refused.
//! * DefaultTolerationSeconds: a pod that does not tolerate the
//!   not-ready / unreachable NoExecute taints gets a 300 s toleration of
//!   each, so a failed node's pods are evicted after five minutes rather
//!   than at once.
//!
//! The system classes exist in every cluster (created at bootstrap, and
//! known here even before that) with upstream's values.

use crate::{
    api::{Api, Query},
    routes::ResourceRoute,
    status::ApiError,
};
use serde_json::{Map, Value, json};

/// Upstream's system classes and their values.
pub const SYSTEM_CLASSES: [(&str, i64, &str); 2] = [
    (
        "system-node-critical",
        2_000_001_000,
        "Used for system critical pods that must not be moved from their current node.",
    ),
    (
        "system-cluster-critical",
        2_000_000_000,
        "Used for system critical pods that must run in the cluster, but can be moved to another node if necessary.",
    ),
];

/// The largest value a user-defined class may have; larger ones are
/// reserved for the system classes.
pub const HIGHEST_USER_PRIORITY: i64 = 1_000_000_000;

const DEFAULT_TOLERATION_SECONDS: i64 = 300;
const NOT_READY: &str = "node.kubernetes.io/not-ready";
const UNREACHABLE: &str = "node.kubernetes.io/unreachable";

/// The system classes as objects, for bootstrap.
pub fn system_class_objects() -> Vec<Value> {
    SYSTEM_CLASSES
        .iter()
        .map(|(name, value, description)| {
            json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                   "metadata": {"name": name}, "value": value,
                   "description": description, "preemptionPolicy": "PreemptLowerPriority"})
        })
        .collect()
}

/// Fills in priority and default tolerations of a pod being created.
pub async fn admit(api: &Api, pod: &mut Value) -> Result<(), ApiError> {
    let name = pod
        .pointer("/metadata/name")
        .or_else(|| pod.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return Ok(());
    };
    resolve_priority(api, &name, spec).await?;
    default_tolerations(spec);
    Ok(())
}

async fn resolve_priority(
    api: &Api,
    pod_name: &str,
    spec: &mut Map<String, Value>,
) -> Result<(), ApiError> {
    let class_name = spec
        .get("priorityClassName")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let (class, value, policy) = match &class_name {
        Some(c) => match find_class(api, c).await? {
            Some((value, policy)) => (Some(c.clone()), value, policy),
            None => {
                return Err(ApiError::Forbidden {
                    message: format!(
                        "pods \"{pod_name}\" is forbidden: no PriorityClass with name {c} was found"
                    ),
                });
            }
        },
        None => match global_default(api).await? {
            Some((c, value, policy)) => (Some(c), value, policy),
            None => (None, 0, "PreemptLowerPriority".to_owned()),
        },
    };
    if let Some(given) = spec.get("priority").and_then(Value::as_i64)
        && given != value
    {
        return Err(ApiError::Forbidden {
            message: format!(
                "pods \"{pod_name}\" is forbidden: the integer value of priority ({given}) must not be provided in pod spec; priority admission controller computed {value} from the given PriorityClass name"
            ),
        });
    }
    if let Some(c) = class {
        spec.insert("priorityClassName".into(), json!(c));
    }
    spec.insert("priority".into(), json!(value));
    if spec.get("preemptionPolicy").is_none_or(Value::is_null) {
        spec.insert("preemptionPolicy".into(), json!(policy));
    }
    Ok(())
}

fn class_fields(obj: &Value) -> (i64, String) {
    (
        obj.get("value").and_then(Value::as_i64).unwrap_or(0),
        obj.get("preemptionPolicy")
            .and_then(Value::as_str)
            .unwrap_or("PreemptLowerPriority")
            .to_owned(),
    )
}

fn class_route(api: &Api) -> Option<ResourceRoute> {
    let info = api
        .registry
        .lookup("scheduling.k8s.io", "v1", "priorityclasses")?;
    Some(ResourceRoute {
        info,
        namespace: None,
        name: None,
        subresource: None,
    })
}

/// A class's value and preemption policy; system classes are known even
/// if their objects were deleted.
async fn find_class(api: &Api, name: &str) -> Result<Option<(i64, String)>, ApiError> {
    if let Some(route) = class_route(api) {
        match api.read(&route.info, None, name).await {
            Ok((obj, _)) => return Ok(Some(class_fields(&obj))),
            Err(ApiError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(SYSTEM_CLASSES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, v, _)| (*v, "PreemptLowerPriority".to_owned())))
}

/// The global-default class (name, value, policy) as last looked up.
type DefaultClass = Option<(String, i64, String)>;

/// How long a global-default lookup is reused. Upstream's admission reads
/// classes from an informer, so it too may lag a new class briefly; this
/// keeps a list query off every pod creation.
const DEFAULT_CLASS_TTL: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct DefaultClassCache(std::sync::Mutex<Option<(std::time::Instant, DefaultClass)>>);

/// The class marked `globalDefault` (the lowest-valued one if several
/// are, as upstream picks).
async fn global_default(api: &Api) -> Result<DefaultClass, ApiError> {
    if let Ok(cached) = api.default_priority.0.lock()
        && let Some((at, class)) = cached.as_ref()
        && at.elapsed() < DEFAULT_CLASS_TTL
    {
        return Ok(class.clone());
    }
    let class = lookup_global_default(api).await?;
    if let Ok(mut cached) = api.default_priority.0.lock() {
        *cached = Some((std::time::Instant::now(), class.clone()));
    }
    Ok(class)
}

async fn lookup_global_default(api: &Api) -> Result<DefaultClass, ApiError> {
    let Some(route) = class_route(api) else {
        return Ok(None);
    };
    let classes = api.list(&route, &Query::new()).await?;
    Ok(classes
        .items
        .iter()
        .filter(|c| c.get("globalDefault").and_then(Value::as_bool) == Some(true))
        .map(|c| {
            let (v, p) = class_fields(c);
            let name = c
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            (name, v, p)
        })
        .min_by_key(|(_, v, _)| *v))
}

fn default_tolerations(spec: &mut Map<String, Value>) {
    let tolerations = spec.entry("tolerations").or_insert_with(|| json!([]));
    if tolerations.is_null() {
        *tolerations = json!([]);
    }
    let Some(list) = tolerations.as_array_mut() else {
        return;
    };
    for key in [NOT_READY, UNREACHABLE] {
        // Any toleration that already covers the NoExecute taint (by
        // key, or every key) stays the pod's own choice.
        let covered = list.iter().any(|t| {
            let k = t.get("key").and_then(Value::as_str).unwrap_or("");
            let op = t.get("operator").and_then(Value::as_str).unwrap_or("Equal");
            let effect = t.get("effect").and_then(Value::as_str).unwrap_or("");
            (k == key || (k.is_empty() && op == "Exists"))
                && (effect.is_empty() || effect == "NoExecute")
        });
        if !covered {
            list.push(
                json!({"key": key, "operator": "Exists", "effect": "NoExecute",
                             "tolerationSeconds": DEFAULT_TOLERATION_SECONDS}),
            );
        }
    }
}

/// Checks of a PriorityClass being created: user classes stay below the
/// system range, and `system-` names are reserved.
pub fn validate_class(obj: &Value, causes: &mut Vec<crate::status::Cause>) {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let value = obj.get("value").and_then(Value::as_i64);
    let system = SYSTEM_CLASSES.iter().find(|(n, _, _)| *n == name);
    match (value, system) {
        (None, _) => causes.push(crate::status::Cause::required("value")),
        (Some(v), Some((_, sv, _))) if v != *sv => causes.push(crate::status::Cause::invalid(
            "value",
            format!("{name} is a system class and must have value {sv}"),
        )),
        (Some(_), Some(_)) => {}
        (Some(v), None) => {
            if name.starts_with("system-") {
                causes.push(crate::status::Cause::invalid(
                    "metadata.name",
                    "priority class names with 'system-' prefix are reserved",
                ));
            }
            if v > HIGHEST_USER_PRIORITY {
                causes.push(crate::status::Cause::invalid(
                    "value",
                    format!("must be no greater than {HIGHEST_USER_PRIORITY}"),
                ));
            }
        }
    }
    if let Some(p) = obj.get("preemptionPolicy").and_then(Value::as_str)
        && !matches!(p, "PreemptLowerPriority" | "Never")
    {
        causes.push(crate::status::Cause {
            reason: "FieldValueNotSupported",
            field: "preemptionPolicy".into(),
            message: format!(
                "Unsupported value: {p:?}: supported values: \"Never\", \"PreemptLowerPriority\""
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerations_added_only_where_missing() {
        let mut spec = json!({"tolerations": [{"key": NOT_READY, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 10}]});
        let m = spec.as_object_mut().unwrap();
        default_tolerations(m);
        let list = m["tolerations"].as_array().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0]["tolerationSeconds"], 10);
        assert_eq!(list[1]["key"], UNREACHABLE);
        assert_eq!(list[1]["tolerationSeconds"], 300);

        let mut all = json!({"tolerations": [{"operator": "Exists"}]});
        default_tolerations(all.as_object_mut().unwrap());
        assert_eq!(all["tolerations"].as_array().unwrap().len(), 1);

        let mut none = json!({});
        default_tolerations(none.as_object_mut().unwrap());
        assert_eq!(none["tolerations"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn class_validation() {
        let mut causes = Vec::new();
        validate_class(
            &json!({"metadata": {"name": "high"}, "value": 2_000_000_000i64}),
            &mut causes,
        );
        assert_eq!(causes.len(), 1, "{causes:?}");
        causes.clear();
        validate_class(
            &json!({"metadata": {"name": "system-mine"}, "value": 5}),
            &mut causes,
        );
        assert_eq!(causes.len(), 1, "{causes:?}");
        causes.clear();
        validate_class(
            &json!({"metadata": {"name": "high"}, "value": 1000}),
            &mut causes,
        );
        assert!(causes.is_empty(), "{causes:?}");
    }
}
