//! Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`,
//! which kubectl ≥ 1.32 sends on typed commands such as `create namespace`).
//!
//! A body is the magic `k8s\0` followed by a `runtime.Unknown` whose `raw`
//! is the object's protobuf encoding. [`decode`] turns it into the JSON
//! object the JSON path would have produced, walking the schema table that
//! build.rs generates (see [`schema`]).

mod decode;
pub mod schema;
mod wire;

pub use decode::{decode, decode_message};

/// The prefix of every Kubernetes protobuf body.
pub const MAGIC: &[u8] = b"k8s\0";

/// The content type of Kubernetes protobuf bodies.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

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
mod tests;
