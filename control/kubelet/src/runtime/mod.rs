//! Container runtimes: the seam between the pod manager (which decides what
//! should run) and the thing that runs it. Two implementations: `process`
//! (built in, no daemon: each container is a process in its own namespaces
//! and cgroup, supervised by a small shim) and `docker` (containers in a
//! real dockerd through bollard).
//!
//! The pod manager owns pod networking (netns, veth, IP) for both: a
//! runtime is handed the pod's network namespace path and only has to put
//! its containers in it.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

pub mod docker;
pub mod logrotate;
pub mod process;

/// Labels every container carries so a restarted agent can find and
/// re-adopt what it started before.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerLabels {
    pub pod_uid: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub container_name: String,
    /// 0 for the first start, +1 for each restart.
    pub attempt: u32,
    /// Init containers run to completion before app containers start.
    pub init: bool,
}

/// A bind mount into the container.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mount {
    /// File or directory on the node.
    pub host_path: PathBuf,
    /// Absolute path inside the container.
    pub container_path: String,
    pub read_only: bool,
}

/// Resource limits enforced by the container's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resources {
    /// CPU limit in millicores (CFS quota); None = unlimited.
    pub cpu_limit_millis: Option<u64>,
    /// CPU request in millicores (cpu.shares / cpu.weight).
    pub cpu_request_millis: Option<u64>,
    /// Memory limit in bytes; exceeding it OOM-kills the container.
    pub memory_limit_bytes: Option<u64>,
}

/// Everything needed to start one container.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ContainerSpec {
    pub labels: ContainerLabels,
    /// The image reference as written in the pod (`host`, a directory, a
    /// tarball path, or for docker an image name).
    pub image: String,
    /// The command line after Kubernetes' command/args rules have been
    /// applied against the image's entrypoint (empty = use the image's
    /// default, which `process` images do not have).
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub mounts: Vec<Mount>,
    /// The pod's network namespace (`/run/netns/NAME`), or None for a
    /// hostNetwork pod.
    pub netns: Option<PathBuf>,
    /// UTS hostname (the pod name, or the node's for hostNetwork).
    pub hostname: String,
    pub run_as_user: Option<u32>,
    pub run_as_group: Option<u32>,
    pub supplemental_groups: Vec<u32>,
    pub resources: Resources,
    /// Keep stdin open (kubectl attach -i); tty allocates a pseudo-terminal.
    pub stdin: bool,
    pub stdin_once: bool,
    pub tty: bool,
    /// Where the container's stdout/stderr go, in the CRI log format
    /// (`<RFC3339Nano> <stdout|stderr> <P|F> <text>` per line).
    pub log_path: PathBuf,
}

/// An image's defaults (Docker/OCI config); all empty for `host`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
}

/// What a container is doing now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ContainerState {
    /// Created but its process is not running yet.
    Created,
    Running {
        started_at: chrono::DateTime<chrono::Utc>,
    },
    Exited {
        started_at: Option<chrono::DateTime<chrono::Utc>>,
        finished_at: chrono::DateTime<chrono::Utc>,
        exit_code: i32,
        /// `Completed`, `Error`, `OOMKilled`, `StartError`, `ContainerCannotRun`.
        reason: String,
        /// Why it could not start, e.g. the executable was not found.
        message: Option<String>,
    },
}

/// A container the runtime knows about.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ContainerInfo {
    pub id: String,
    pub labels: ContainerLabels,
    pub image: String,
    /// `process://sha256:…` / `docker-pullable://…`.
    pub image_id: String,
    pub state: ContainerState,
    pub log_path: PathBuf,
}

/// A process started inside a running container (kubectl exec) or the
/// container's own stdio (kubectl attach).
pub struct ExecSession {
    pub stdin: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
    pub stdout: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>,
    /// None with a tty (stderr is merged into the terminal).
    pub stderr: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>,
    /// Terminal size changes (columns, rows), with a tty.
    pub resize: Option<tokio::sync::mpsc::Sender<(u16, u16)>>,
    /// Resolves to the exit code when the process ends.
    pub exit: tokio::sync::oneshot::Receiver<i32>,
}

impl std::fmt::Debug for ExecSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSession")
            .field("stdin", &self.stdin.is_some())
            .field("tty", &self.resize.is_some())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The image reference could not be resolved or pulled
    /// (→ ErrImagePull / ImagePullBackOff).
    #[error("image {image:?}: {reason}")]
    Image { image: String, reason: String },
    /// The container could not be created or started (→ a status with the
    /// reason, e.g. the executable does not exist).
    #[error("{0}")]
    Start(String),
    #[error("no container {0}")]
    NotFound(String),
    /// The runtime itself is broken (→ node NotReady).
    #[error("runtime unavailable: {0}")]
    Unavailable(String),
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
}

impl RuntimeError {
    pub fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let action = action.into();
        move |source| Self::Io { action, source }
    }
}

/// A container runtime.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// `process` or `docker`; also the scheme of container IDs in status.
    fn name(&self) -> &'static str;
    /// `skep-process://0.1.0`, `docker://28.2.2` for nodeInfo.
    async fn version(&self) -> Result<String, RuntimeError>;
    /// Ok when containers can be started (drives the node's Ready).
    async fn health(&self) -> Result<(), RuntimeError>;
    /// Makes the image available; returns its ID (a digest).
    async fn ensure_image(&self, image: &str) -> Result<String, RuntimeError>;
    /// The image's own defaults (entrypoint, cmd, env, working dir), for
    /// Kubernetes' command/args rules. Call after `ensure_image`.
    async fn image_config(&self, image: &str) -> Result<ImageConfig, RuntimeError> {
        let _ = image;
        Ok(ImageConfig::default())
    }
    /// Creates and starts a container; returns its ID. A container that
    /// fails to start is still returned (and reported `Exited` with
    /// reason `StartError` by `list`) when the failure is the
    /// container's (bad command); runtime failures are errors.
    async fn start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError>;
    /// SIGTERM, up to `grace`, then SIGKILL; returns once the process is
    /// gone. Stopping an exited container is a no-op.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError>;
    /// Forgets an exited container (its log file stays until the pod goes).
    async fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    /// Every container this runtime has, running or exited.
    async fn list(&self) -> Result<Vec<ContainerInfo>, RuntimeError>;
    /// Runs `cmd` inside a running container's namespaces (and cgroup).
    async fn exec(
        &self,
        id: &str,
        cmd: &[String],
        tty: bool,
        stdin: bool,
    ) -> Result<ExecSession, RuntimeError>;
    /// Attaches to a running container's stdio.
    async fn attach(&self, id: &str, stdin: bool) -> Result<ExecSession, RuntimeError>;
    /// Prepares a pod's sandbox before its network is set up: runtimes
    /// that cannot join a namespace by path (docker) make one that holds
    /// the pod's network namespace and mount it at `netns_path`, which the
    /// network setup then adopts. Idempotent (an agent restart keeps a
    /// sandbox that still runs). `labels` carries the pod's
    /// namespace/name; its container fields are ignored.
    async fn create_sandbox(
        &self,
        pod_uid: &str,
        labels: &ContainerLabels,
        netns_path: &Path,
    ) -> Result<(), RuntimeError> {
        let _ = (pod_uid, labels, netns_path);
        Ok(())
    }
    /// Removes what `create_sandbox` made (after the pod's network was torn
    /// down). Idempotent.
    async fn remove_sandbox(&self, pod_uid: &str) -> Result<(), RuntimeError> {
        let _ = pod_uid;
        Ok(())
    }
    /// UIDs of the pods that have a sandbox, so a restarted agent can
    /// remove those of pods deleted while it was down.
    async fn list_sandboxes(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(Vec::new())
    }
}
