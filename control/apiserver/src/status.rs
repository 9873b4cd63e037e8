//! API errors and the `Status` objects they become. Every failure a client
//! sees is a `meta.k8s.io/v1 Status` with the reason and code kubectl and
//! client libraries switch on.

use serde_json::{Value, json};
use skep_store::StoreError;

/// One invalid field, for 422 responses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueNotSupported`,
    /// `FieldValueDuplicate`, `FieldValueTooLong`.
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

impl Cause {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            reason: "FieldValueInvalid",
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn required(field: impl Into<String>) -> Self {
        Self {
            reason: "FieldValueRequired",
            field: field.into(),
            message: "Required value".into(),
        }
    }
}

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { message: String },
    #[error("Unauthorized")]
    Unauthorized,
    #[error("{message}")]
    Forbidden { message: String },
    #[error("{resource} \"{name}\" not found")]
    NotFound { resource: String, name: String },
    #[error("the server could not find the requested resource")]
    NoRoute,
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists { resource: String, name: String },
    #[error("Operation cannot be fulfilled on {resource} \"{name}\": {detail}")]
    Conflict {
        resource: String,
        name: String,
        detail: String,
    },
    #[error("{kind} \"{name}\" is invalid: {}", summarize(.causes))]
    Invalid {
        kind: String,
        name: String,
        causes: Vec<Cause>,
    },
    #[error("{message}")]
    Gone { message: String },
    #[error("{message}")]
    Expired { message: String },
    #[error("the request entity is too large (limit {limit} bytes)")]
    TooLarge { limit: usize },
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    #[error("{message}")]
    UnsupportedMediaType { message: String },
    #[error("{message}")]
    NotAcceptable { message: String },
    /// 429: try again later (an eviction the disruption budget refuses).
    #[error("{message}")]
    TooManyRequests { message: String, causes: Vec<Cause> },
    #[error("{message}")]
    Internal { message: String },
    #[error("{message}")]
    Unavailable { message: String },
    /// 409 of a server-side apply that would change fields other managers
    /// own; causes of type `FieldManagerConflict`.
    #[error("{message}")]
    ApplyConflict { message: String, causes: Vec<Cause> },
}

fn summarize(causes: &[Cause]) -> String {
    causes
        .iter()
        .map(|c| {
            if c.field.is_empty() {
                c.message.clone()
            } else {
                format!("{}: {}", c.field, c.message)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::Internal {
            message: message.into(),
        }
    }

    pub fn invalid(kind: &str, name: &str, causes: Vec<Cause>) -> Self {
        Self::Invalid {
            kind: kind.to_owned(),
            name: name.to_owned(),
            causes,
        }
    }

    pub fn code(&self) -> u16 {
        match self {
            Self::BadRequest { .. } => 400,
            Self::Unauthorized => 401,
            Self::Forbidden { .. } => 403,
            Self::NotFound { .. } | Self::NoRoute => 404,
            Self::MethodNotAllowed => 405,
            Self::NotAcceptable { .. } => 406,
            Self::AlreadyExists { .. } | Self::Conflict { .. } => 409,
            Self::ApplyConflict { .. } => 409,
            Self::Gone { .. } | Self::Expired { .. } => 410,
            Self::TooLarge { .. } => 413,
            Self::UnsupportedMediaType { .. } => 415,
            Self::Invalid { .. } => 422,
            Self::TooManyRequests { .. } => 429,
            Self::Internal { .. } => 500,
            Self::Unavailable { .. } => 503,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "BadRequest",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden { .. } => "Forbidden",
            Self::NotFound { .. } | Self::NoRoute => "NotFound",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::NotAcceptable { .. } => "NotAcceptable",
            Self::AlreadyExists { .. } => "AlreadyExists",
            Self::Conflict { .. } => "Conflict",
            Self::ApplyConflict { .. } => "Conflict",
            Self::Gone { .. } => "Gone",
            Self::Expired { .. } => "Expired",
            Self::TooLarge { .. } => "RequestEntityTooLarge",
            Self::UnsupportedMediaType { .. } => "UnsupportedMediaType",
            Self::Invalid { .. } => "Invalid",
            Self::TooManyRequests { .. } => "TooManyRequests",
            Self::Internal { .. } => "InternalError",
            Self::Unavailable { .. } => "ServiceUnavailable",
        }
    }

    /// The `Status` object for this error.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        let details = match self {
            Self::NotFound { resource, name } | Self::AlreadyExists { resource, name } => {
                Some(details(resource, name))
            }
            Self::Conflict { resource, name, .. } => Some(details(resource, name)),
            Self::Invalid { kind, name, causes } => {
                let (group, kind) = match kind.split_once('.') {
                    Some((k, g)) => (g.to_owned(), k.to_owned()),
                    None => (String::new(), kind.clone()),
                };
                let mut d = json!({
                    "name": name,
                    "kind": kind,
                    "causes": causes.iter().map(|c| json!({
                        "reason": c.reason,
                        "message": c.message,
                        "field": c.field,
                    })).collect::<Vec<_>>(),
                });
                if !group.is_empty() {
                    d["group"] = Value::String(group);
                }
                Some(d)
            }
            Self::ApplyConflict { causes, .. } => Some(json!({
                "causes": causes.iter().map(|c| json!({
                    "reason": c.reason,
                    "message": c.message,
                    "field": c.field,
                })).collect::<Vec<_>>(),
            })),
            Self::TooManyRequests { causes, .. } if !causes.is_empty() => Some(json!({
                "causes": causes.iter().map(|c| json!({
                    "reason": c.reason,
                    "message": c.message,
                })).collect::<Vec<_>>(),
            })),
            _ => None,
        };
        if let Some(d) = details {
            status["details"] = d;
        }
        status
    }
}

/// `pods` → kind "pods"; `deployments.apps` → group "apps", kind
/// "deployments" (what kube-apiserver puts in details).
fn details(resource: &str, name: &str) -> Value {
    match resource.split_once('.') {
        Some((kind, group)) => json!({"name": name, "group": group, "kind": kind}),
        None => json!({"name": name, "kind": resource}),
    }
}

/// The `Status` of a successful delete (kubectl accepts it or the object).
pub fn success_status(details: Value) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    })
}

/// Maps store errors that reach the API unhandled.
pub fn from_store(e: StoreError, resource: &str, name: &str) -> ApiError {
    match e {
        StoreError::AlreadyExists { .. } => ApiError::AlreadyExists {
            resource: resource.to_owned(),
            name: name.to_owned(),
        },
        StoreError::NotFound { .. } => ApiError::NotFound {
            resource: resource.to_owned(),
            name: name.to_owned(),
        },
        StoreError::Conflict { .. } => ApiError::Conflict {
            resource: resource.to_owned(),
            name: name.to_owned(),
            detail: "the object has been modified; please apply your changes to the latest version and try again".into(),
        },
        StoreError::Compacted { requested, .. } => ApiError::Expired {
            message: format!("too old resource version: {requested}"),
        },
        StoreError::FutureRevision { requested, current } => ApiError::Unavailable {
            message: format!(
                "Too large resource version: {requested}, current: {current}"
            ),
        },
        StoreError::InvalidRequest(m) => ApiError::bad_request(m),
        other => ApiError::Internal {
            message: format!("storage error: {other}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_status_matches_kube_apiserver() {
        let e = ApiError::NotFound {
            resource: "deployments.apps".into(),
            name: "web".into(),
        };
        let s = e.to_status();
        assert_eq!(s["code"], 404);
        assert_eq!(s["reason"], "NotFound");
        assert_eq!(s["message"], "deployments.apps \"web\" not found");
        assert_eq!(s["details"]["group"], "apps");
        assert_eq!(s["details"]["kind"], "deployments");
    }

    #[test]
    fn invalid_lists_causes() {
        let e = ApiError::invalid(
            "Pod",
            "Bad_Name",
            vec![Cause::invalid("metadata.name", "must be lowercase")],
        );
        let s = e.to_status();
        assert_eq!(s["code"], 422);
        assert_eq!(s["details"]["causes"][0]["field"], "metadata.name");
        assert!(
            s["message"]
                .as_str()
                .unwrap()
                .contains("metadata.name: must be lowercase")
        );
    }
}
