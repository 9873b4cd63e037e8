//! Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`,
//! which kubectl ≥ 1.32 sends on typed commands such as `create namespace`).
//!
//! A body is the magic `k8s\0` followed by a `runtime.Unknown` whose `raw`
//! is the object's protobuf encoding. [`decode`] turns it into the JSON
//! object the JSON path would have produced, walking the schema table that
//! build.rs generates (see [`schema`]). [`encode`] is its mirror, for
//! responses to clients that prefer protobuf (objects, lists, Status) and
//! [`watch_frame`] frames watch events.

mod ctx;
mod decode;
mod encode;
pub mod schema;
mod wire;

pub use decode::{decode, decode_message};
pub use encode::{can_encode, encode, encode_message, parse_go_duration, watch_frame};

/// The prefix of every Kubernetes protobuf body.
pub const MAGIC: &[u8] = b"k8s\0";

/// The content type of Kubernetes protobuf bodies.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// The content type of protobuf watch streams (length-prefixed
/// `WatchEvent` frames).
pub const STREAM_CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf;stream=watch";

/// Whether an `Accept` header prefers Kubernetes protobuf: the acceptable
/// media type with the highest `q` (the first among equals) is protobuf, as
/// in client-go's `application/vnd.kubernetes.protobuf,application/json`.
pub fn preferred(accept: &str) -> bool {
    let mut best: Option<(f32, bool)> = None;
    for part in accept.split(',') {
        let mut params = part.split(';');
        let base = params.next().unwrap_or("").trim();
        if base.is_empty() {
            continue;
        }
        let mut q = 1.0f32;
        for p in params {
            if let Some(v) = p.trim().strip_prefix("q=") {
                q = v.trim().parse().unwrap_or(0.0);
            }
        }
        if q <= 0.0 {
            continue;
        }
        if best.is_none_or(|(bq, _)| q > bq) {
            best = Some((q, base.eq_ignore_ascii_case(CONTENT_TYPE)));
        }
    }
    best.is_some_and(|(_, proto)| proto)
}

/// Why a protobuf body could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtobufError {
    #[error("the body does not start with the Kubernetes protobuf magic number \"k8s\\x00\"")]
    Magic,
    #[error("this server was built without the Kubernetes protobuf schema; send application/json")]
    NoSchema,
    #[error("the runtime.Unknown envelope has no apiVersion/kind")]
    NoType,
    #[error("no protobuf schema is known for apiVersion {api_version:?} kind {kind:?}")]
    UnknownKind { api_version: String, kind: String },
    #[error("the content encoding {0:?} is not supported (only unencoded raw objects are)")]
    ContentEncoding(String),
    #[error("{message} at {path}")]
    Malformed { path: String, message: String },
    #[error("the object nests deeper than {0} levels")]
    TooDeep(usize),
}

#[cfg(test)]
mod encode_tests;
#[cfg(test)]
mod tests;
