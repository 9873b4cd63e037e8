//! What the kubelet's streaming endpoint (logs, exec, attach,
//! port-forward) needs from the node: a seam so the HTTP/SPDY/WebSocket
//! side does not know how pods are run.

use crate::runtime::ExecSession;
use std::path::PathBuf;

/// Identifies a container of a pod on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    pub namespace: String,
    pub pod: String,
    /// Empty = the pod's only (or default) container.
    pub container: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// 404: no such pod/container on this node.
    #[error("{0}")]
    NotFound(String),
    /// 400: e.g. a container name is needed, or --previous has no log.
    #[error("{0}")]
    BadRequest(String),
    /// 500: the runtime failed.
    #[error("{0}")]
    Internal(String),
}

/// The log files of a container, and whether it still runs.
#[derive(Debug, Clone)]
pub struct LogSource {
    /// The CRI-format log file of the requested instance (current or,
    /// with `previous`, the one before the last restart).
    pub path: PathBuf,
    /// The container instance this file belongs to is still running (so
    /// `follow` keeps reading until it is not).
    pub running: bool,
}

#[async_trait::async_trait]
pub trait PodStreams: Send + Sync + 'static {
    /// The log file of a container (current or previous instance).
    async fn log_source(&self, c: &ContainerRef, previous: bool) -> Result<LogSource, StreamError>;
    /// Whether the instance writing `path` is still running (polled by
    /// `follow`).
    async fn still_running(&self, c: &ContainerRef, path: &std::path::Path) -> bool;
    async fn exec(
        &self,
        c: &ContainerRef,
        cmd: &[String],
        tty: bool,
        stdin: bool,
    ) -> Result<ExecSession, StreamError>;
    async fn attach(&self, c: &ContainerRef, stdin: bool) -> Result<ExecSession, StreamError>;
    /// A TCP connection to `port` inside the pod's network namespace.
    async fn port_forward(
        &self,
        namespace: &str,
        pod: &str,
        port: u16,
    ) -> Result<tokio::net::TcpStream, StreamError>;
}
