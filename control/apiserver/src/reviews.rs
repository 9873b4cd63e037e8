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
    let current = api.get(&pods).await?;
    if current
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty())
    {
        return Err(ApiError::Conflict {
            resource: "pods".into(),
            name,
            detail: "pod is already assigned to a node".into(),
        });
    }
    let patch = json!({"spec": {"nodeName": node}});
    api.patch(&pods, patch, crate::api::PatchType::Merge, &Query::new())
        .await?;
    Ok(
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    )
}

/// `pods/eviction`: deletes the pod (disruption budgets arrive with the
/// controllers).
pub async fn evict(api: &Api, r: &ResourceRoute, eviction: Value) -> Result<Value, ApiError> {
    let pods = ResourceRoute {
        subresource: None,
        ..r.clone()
    };
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
