use crate::Revision;
use std::path::PathBuf;

/// Store failures. The first group are the semantic outcomes the API maps to
/// HTTP statuses (409, 404, 410); the rest are operational.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {key} already exists")]
    AlreadyExists { key: String },
    #[error("key {key} not found")]
    NotFound { key: String },
    #[error("key {key} was modified: expected revision {expected}, found {actual}")]
    Conflict {
        key: String,
        expected: Revision,
        actual: Revision,
    },
    #[error("revision {requested} has been compacted (history starts after {compacted})")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("revision {requested} is newer than the store's current revision {current}")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error(
        "the store file {path} is not a usable SQLite database ({detail}); \
         restore it from a backup, or move it away to start an empty cluster"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot open the store at {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error("SQLite error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "etcd at {endpoints} is unreachable after {attempts} attempts over {waited_s:.1}s: {last_error}; \
         check that etcd is running and the endpoints are right (--etcd-endpoints)"
    )]
    Unavailable {
        endpoints: String,
        attempts: u32,
        waited_s: f64,
        last_error: String,
    },
    #[error("etcd error: {0}")]
    Etcd(String),
    #[error("the store is shut down")]
    Closed,
    #[error("internal store error: {0}")]
    Internal(String),
}

impl StoreError {
    /// True for the outcomes a caller is expected to handle (not failures of
    /// the store itself).
    pub fn is_semantic(&self) -> bool {
        matches!(
            self,
            Self::AlreadyExists { .. }
                | Self::NotFound { .. }
                | Self::Conflict { .. }
                | Self::Compacted { .. }
                | Self::FutureRevision { .. }
                | Self::InvalidRequest(_)
        )
    }
}
