//! Requests that are answered rather than stored: access and token reviews,
//! pod bindings and evictions.

use crate::{
    api::{Api, Query},
    objects,
    rbac::Authorizer,
    resources::ResourceInfo,
    routes::ResourceRoute,
    server::User,
    status::{ApiError, Cause},
    tokens::Signer,
};
use serde_json::{Value, json};

fn attributes_of(spec: &Value) -> crate::rbac::Attributes {
    let s = |v: Option<&Value>, k: &str| {
        v.and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    if let Some(nr) = spec.get("nonResourceAttributes") {
        return crate::rbac::Attributes {
            verb: s(Some(nr), "verb"),
            path: Some(s(Some(nr), "path")),
            ..Default::default()
        };
    }
    let ra = spec.get("resourceAttributes");
    crate::rbac::Attributes {
        verb: s(ra, "verb"),
        group: s(ra, "group"),
        resource: s(ra, "resource"),
        subresource: s(ra, "subresource"),
        namespace: s(ra, "namespace"),
        name: s(ra, "name"),
        path: None,
    }
}

/// Answers access, rules and identity reviews with the real authorizer.
pub fn review(
    authorizer: &Authorizer,
    info: &ResourceInfo,
    mut obj: Value,
    user: &User,
) -> Result<Value, ApiError> {
    let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
    match info.kind.as_str() {
        "SelfSubjectAccessReview" => {
            let (allowed, reason) = authorizer.authorize(user, &attributes_of(&spec));
            obj["status"] = json!({"allowed": allowed, "reason": reason});
        }
        "SubjectAccessReview" => {
            let subject = User {
                name: spec
                    .get("user")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                groups: spec
                    .get("groups")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|g| g.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            let (allowed, reason) = authorizer.authorize(&subject, &attributes_of(&spec));
            obj["status"] = json!({"allowed": allowed, "reason": reason});
        }
        "SelfSubjectRulesReview" => {
            let masters = user.groups.iter().any(|g| g == "system:masters");
            obj["status"] = if masters {
                json!({"resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
                       "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}], "incomplete": false})
            } else {
                json!({"resourceRules": [], "nonResourceRules": [], "incomplete": true,
                       "evaluationError": "rule listing is not implemented for RBAC subjects; use SelfSubjectAccessReview"})
            };
        }
        "SelfSubjectReview" => {
            obj["status"] = json!({"userInfo": {"username": user.name, "groups": user.groups}});
        }
        "TokenReview" => {
            obj["status"] =
                json!({"authenticated": false, "error": "TokenReview is not served yet"});
        }
        other => return Err(ApiError::bad_request(format!("{other} cannot be created"))),
    }
    let m = obj
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("body must be an object"))?;
    m.insert("apiVersion".into(), json!(info.api_version()));
    m.insert("kind".into(), json!(info.kind));
    Ok(obj)
}

/// `serviceaccounts/<name>/token`: a signed, expiring token for the account.
pub async fn token_request(
    api: &Api,
    signer: &Signer,
    r: &ResourceRoute,
    mut request: Value,
) -> Result<Value, ApiError> {
    let name = r.name.clone().unwrap_or_default();
    let ns = r.namespace.clone().unwrap_or_default();
    let accounts = ResourceRoute {
        subresource: None,
        ..r.clone()
    };
    let sa = api.get(&accounts).await?;
    let lifetime = request
        .pointer("/spec/expirationSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(3600);
    if lifetime < 600 {
        return Err(ApiError::invalid(
            "TokenRequest",
            &name,
            vec![Cause::invalid(
                "spec.expirationSeconds",
                "may not specify a duration less than 10 minutes",
            )],
        ));
    }
    let audiences: Vec<String> = request
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .filter(|a: &Vec<String>| !a.is_empty())
        .unwrap_or_else(|| vec!["https://kubernetes.default.svc.cluster.local".into()]);
    let claims = crate::tokens::Claims {
        namespace: ns,
        name,
        uid: objects::meta_str(&sa, "uid").unwrap_or("").to_owned(),
        audiences: audiences.clone(),
    };
    let (token, exp) = signer
        .issue(&claims, lifetime)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    request["apiVersion"] = json!("authentication.k8s.io/v1");
    request["kind"] = json!("TokenRequest");
    request["spec"]["audiences"] = json!(audiences);
    request["spec"]["expirationSeconds"] = json!(lifetime);
    request["status"] = json!({
        "token": token,
        "expirationTimestamp": exp.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    });
    Ok(request)
}

/// `pods/binding`: assigns a pod to a node (what the scheduler does).
pub async fn bind(api: &Api, r: &ResourceRoute, binding: Value) -> Result<Value, ApiError> {
    let name = r.name.clone().unwrap_or_default();
    let node = binding
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::invalid("Binding", &name, vec![Cause::required("target.name")]))?
        .to_owned();
    let pods = ResourceRoute {
        subresource: None,
        ..r.clone()
    };
    // One read-modify-write: the check and the assignment see the same
    // version (a concurrent binding makes this one retry and fail).
    api.update_with(&pods, |current| {
        if current
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty())
        {
            return Err(ApiError::Conflict {
                resource: "pods".into(),
                name: name.clone(),
                detail: "pod is already assigned to a node".into(),
            });
        }
        let mut next = current.clone();
        next["spec"]["nodeName"] = json!(node);
        Ok(next)
    })
    .await?;
    Ok(
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    )
}

/// `pods/eviction`: deletes the pod unless that would break its
/// PodDisruptionBudget (upstream's rules, see [`reserve_disruption`]).
pub async fn evict(api: &Api, r: &ResourceRoute, eviction: Value) -> Result<Value, ApiError> {
    let pods = ResourceRoute {
        subresource: None,
        ..r.clone()
    };
    let pod = api.get(&pods).await?;
    let phase = pod.pointer("/status/phase").and_then(Value::as_str);
    // A finished pod disrupts nothing.
    if !matches!(phase, Some("Succeeded" | "Failed")) {
        reserve_disruption(api, &pod).await?;
    }
    let options = eviction
        .get("deleteOptions")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let deleted = api.delete(&pods, &options, &Query::new()).await?;
    Ok(
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201,
              "details": {"name": objects::name(&deleted), "kind": "pods"}}),
    )
}

/// The eviction's check against the pod's PodDisruptionBudget. None → go;
/// more than one → refused (500, as upstream: which one would decide?);
/// one whose status is not current or allows no disruption → 429, which
/// `kubectl drain` retries every 5 s. A pod that is not Ready may go when
/// the budget is already met without it (upstream's default
/// `IfHealthyBudget`). Otherwise the disruption is taken from the budget
/// — `disruptionsAllowed` − 1 and the pod in `disruptedPods` — by a status
/// update on the version read, so two concurrent evictions can never both
/// spend the last allowed disruption.
async fn reserve_disruption(api: &Api, pod: &Value) -> Result<(), ApiError> {
    let Some(info) = api.registry.lookup("policy", "v1", "poddisruptionbudgets") else {
        return Ok(());
    };
    let ns = objects::namespace(pod).unwrap_or("default").to_owned();
    let labels = crate::selectors::labels_of(pod);
    let pod_name = objects::name(pod).to_owned();
    let ready = pod
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Ready")
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        });
    let list_route = ResourceRoute {
        info: info.clone(),
        namespace: Some(ns.clone()),
        name: None,
        subresource: None,
    };
    for _ in 0..5 {
        let budgets = api.list(&list_route, &Query::new()).await?.items;
        let matching: Vec<&Value> = budgets
            .iter()
            .filter(|b| {
                b.pointer("/spec/selector")
                    .filter(|s| !s.is_null())
                    .and_then(|s| crate::selectors::LabelSelector::from_json(s).ok())
                    .is_some_and(|sel| sel.matches(&labels))
            })
            .collect();
        let pdb = match matching.as_slice() {
            [] => return Ok(()),
            [one] => *one,
            _ => {
                return Err(ApiError::internal(
                    "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
                ));
            }
        };
        let int = |p: &str| pdb.pointer(p).and_then(Value::as_i64).unwrap_or(0);
        let pdb_name = objects::name(pdb).to_owned();
        let generation = int("/metadata/generation");
        if int("/status/observedGeneration") < generation {
            return Err(ApiError::TooManyRequests {
                message: format!(
                    "Cannot evict pod as it would violate the pod's disruption budget. The disruption budget {pdb_name} is still being processed by the server."
                ),
                causes: Vec::new(),
            });
        }
        let (current, desired) = (int("/status/currentHealthy"), int("/status/desiredHealthy"));
        if !ready && current >= desired {
            return Ok(());
        }
        let allowed = int("/status/disruptionsAllowed");
        if allowed <= 0 {
            return Err(ApiError::TooManyRequests {
                message: "Cannot evict pod as it would violate the pod's disruption budget.".into(),
                causes: vec![Cause {
                    reason: "DisruptionBudget",
                    message: format!(
                        "The disruption budget {pdb_name} needs {desired} healthy pods and has {current} currently"
                    ),
                    field: String::new(),
                }],
            });
        }
        let mut updated = pdb.clone();
        updated["status"]["disruptionsAllowed"] = json!(allowed - 1);
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        if !updated["status"]["disruptedPods"].is_object() {
            updated["status"]["disruptedPods"] = json!({});
        }
        updated["status"]["disruptedPods"][&pod_name] = json!(now);
        let status_route = ResourceRoute {
            info: info.clone(),
            namespace: Some(ns.clone()),
            name: Some(pdb_name),
            subresource: Some("status".into()),
        };
        match api.update(&status_route, updated, &Query::new()).await {
            Ok(_) => return Ok(()),
            Err(ApiError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::TooManyRequests {
        message: "too many concurrent evictions against one disruption budget; try again".into(),
        causes: Vec::new(),
    })
}
