//! `PodStreams` over the pod manager's pods: which container instance a
//! `kubectl logs/exec/attach/port-forward` means, and where its log is.

use crate::{
    runtime::{ExecSession, Runtime},
    streams::{ContainerRef, LogSource, PodStreams, StreamError},
};
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

/// One container instance as the streaming side sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceView {
    pub id: String,
    pub log_path: PathBuf,
    pub running: bool,
}

/// A container of a pod: its current and previous instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerView {
    pub current: Option<InstanceView>,
    pub previous: Option<InstanceView>,
}

/// What a pod worker publishes about its pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodView {
    pub uid: String,
    /// The pod's network namespace (None: host network, or not set up).
    pub netns: Option<PathBuf>,
    pub host_network: bool,
    /// App containers first, in spec order, then init containers.
    pub order: Vec<String>,
    /// kubectl.kubernetes.io/default-container.
    pub default_container: Option<String>,
    pub containers: BTreeMap<String, ContainerView>,
}

pub(crate) struct ManagerStreams {
    pub views: Arc<Mutex<HashMap<(String, String), PodView>>>,
    pub runtime: Arc<dyn Runtime>,
}

impl ManagerStreams {
    fn view(&self, ns: &str, pod: &str) -> Result<PodView, StreamError> {
        self.views
            .lock()
            .ok()
            .and_then(|v| v.get(&(ns.to_owned(), pod.to_owned())).cloned())
            .ok_or_else(|| {
                StreamError::NotFound(format!("pod {ns}/{pod} is not running on this node"))
            })
    }

    fn container(&self, c: &ContainerRef) -> Result<(PodView, String, ContainerView), StreamError> {
        let view = self.view(&c.namespace, &c.pod)?;
        let name = if c.container.is_empty() {
            match (&view.default_container, view.order.as_slice()) {
                (Some(d), _) => d.clone(),
                (None, [only]) => only.clone(),
                (None, [first, ..]) if view.containers.len() == 1 => first.clone(),
                (None, all) => {
                    return Err(StreamError::BadRequest(format!(
                        "a container name must be specified for pod {}, choose one of: [{}]",
                        c.pod,
                        all.join(" ")
                    )));
                }
            }
        } else {
            c.container.clone()
        };
        let cv = view.containers.get(&name).cloned().ok_or_else(|| {
            StreamError::BadRequest(format!("container {name} is not valid for pod {}", c.pod))
        })?;
        Ok((view, name, cv))
    }

    fn running_id(&self, c: &ContainerRef) -> Result<String, StreamError> {
        let (_, name, cv) = self.container(c)?;
        match cv.current {
            Some(i) if i.running => Ok(i.id),
            _ => Err(StreamError::BadRequest(format!(
                "container {name} is not running in pod {}",
                c.pod
            ))),
        }
    }
}

#[async_trait::async_trait]
impl PodStreams for ManagerStreams {
    async fn log_source(&self, c: &ContainerRef, previous: bool) -> Result<LogSource, StreamError> {
        let (_, name, cv) = self.container(c)?;
        let inst = if previous { cv.previous } else { cv.current };
        match inst {
            Some(i) => Ok(LogSource {
                path: i.log_path,
                running: i.running,
            }),
            None if previous => Err(StreamError::BadRequest(format!(
                "previous terminated container \"{name}\" in pod \"{}\" not found",
                c.pod
            ))),
            None => Err(StreamError::BadRequest(format!(
                "container \"{name}\" in pod \"{}\" is waiting to start",
                c.pod
            ))),
        }
    }

    async fn still_running(&self, c: &ContainerRef, path: &Path) -> bool {
        let Ok((_, _, cv)) = self.container(c) else {
            return false;
        };
        cv.current.is_some_and(|i| i.running && i.log_path == path)
    }

    async fn exec(
        &self,
        c: &ContainerRef,
        cmd: &[String],
        tty: bool,
        stdin: bool,
    ) -> Result<ExecSession, StreamError> {
        let id = self.running_id(c)?;
        self.runtime
            .exec(&id, cmd, tty, stdin)
            .await
            .map_err(|e| StreamError::Internal(e.to_string()))
    }

    async fn attach(&self, c: &ContainerRef, stdin: bool) -> Result<ExecSession, StreamError> {
        let id = self.running_id(c)?;
        self.runtime
            .attach(&id, stdin)
            .await
            .map_err(|e| StreamError::Internal(e.to_string()))
    }

    async fn port_forward(
        &self,
        namespace: &str,
        pod: &str,
        port: u16,
    ) -> Result<tokio::net::TcpStream, StreamError> {
        let view = self.view(namespace, pod)?;
        let target = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let Some(netns) = view.netns.filter(|_| !view.host_network) else {
            return tokio::net::TcpStream::connect(target)
                .await
                .map_err(|e| StreamError::Internal(format!("connecting to port {port}: {e}")));
        };
        // The socket is made on a short-lived thread inside the pod's
        // namespace (the namespace is per thread; the thread then ends, so
        // no pooled thread is left in the pod's namespace). The socket
        // stays bound to that namespace.
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let result = (|| -> Result<std::net::TcpStream, String> {
                let file = std::fs::File::open(&netns)
                    .map_err(|e| format!("opening {}: {e}", netns.display()))?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("entering the pod's network namespace: {e}"))?;
                std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(5))
                    .map_err(|e| format!("connecting to port {port} in the pod: {e}"))
            })();
            let _ = tx.send(result);
        });
        let stream = rx
            .await
            .map_err(|e| StreamError::Internal(e.to_string()))?
            .map_err(StreamError::Internal)?;
        stream
            .set_nonblocking(true)
            .map_err(|e| StreamError::Internal(e.to_string()))?;
        tokio::net::TcpStream::from_std(stream).map_err(|e| StreamError::Internal(e.to_string()))
    }
}
