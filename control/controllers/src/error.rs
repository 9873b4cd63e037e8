//! Errors of the controllers.

use skep_apiserver::status::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed; reconciles are retried with backoff.
    #[error("API call failed: {0}")]
    Api(#[from] ApiError),
    /// The resource is not served by this API server.
    #[error("resource {0} is not registered in the API server")]
    UnknownResource(String),
    #[error("store error: {0}")]
    Store(#[from] skep_store::StoreError),
    /// An object in the store does not have the shape we need.
    #[error("malformed object {key}: {message}")]
    Malformed { key: String, message: String },
}

impl Error {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Api(ApiError::NotFound { .. }))
    }
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Api(ApiError::Conflict { .. }))
    }
    pub fn is_already_exists(&self) -> bool {
        matches!(self, Error::Api(ApiError::AlreadyExists { .. }))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
