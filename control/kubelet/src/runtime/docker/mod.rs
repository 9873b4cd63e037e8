//! The `docker` runtime: containers in a dockerd, driven through the
//! Engine API (bollard) over its unix socket.
//!
//! Each pod gets a pause container holding its network namespace (see
//! `sandbox`); app containers join it. Containers carry `io.skep.*` labels
//! so a restarted agent re-adopts them; their output is copied from
//! docker's log into the CRI log file the pod manager reads (see `logs`).

mod create;
mod labels;
mod logs;
mod sandbox;
mod session;
mod state;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use bollard::{
    API_DEFAULT_VERSION, Docker,
    exec::{CreateExecOptions, StartExecOptions, StartExecResults},
    query_parameters::{
        AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
        EventsOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
        ResizeExecOptionsBuilder, StopContainerOptionsBuilder,
    },
};
use futures::StreamExt;

pub use sandbox::{BUSYBOX, PAUSE_IMAGE};

use super::{
    ContainerInfo, ContainerLabels, ContainerSpec, ContainerState, ExecSession, ImageConfig,
    Runtime, RuntimeError,
};

/// Seconds docker gets to answer a request (pulls and stops get their own).
const API_TIMEOUT: u64 = 120;
/// No registry may be reachable: a pull must fail fast (→ ErrImagePull).
const PULL_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP status of a docker API error.
fn status(e: &bollard::errors::Error) -> Option<u16> {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn unavailable(action: &str) -> impl FnOnce(bollard::errors::Error) -> RuntimeError + '_ {
    move |e| RuntimeError::Unavailable(format!("{action}: {e}"))
}

/// A runtime backed by the dockerd listening on a unix socket.
pub struct DockerRuntime {
    docker: Docker,
    /// Log followers by container ID.
    followers: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Settled OOM verdicts of SIGKILLed containers (see `oom_event`).
    oom: Mutex<HashMap<String, bool>>,
    /// When the followers rotate the CRI log files they write.
    log_rotation: super::logrotate::LogRotation,
}

impl std::fmt::Debug for DockerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerRuntime").finish_non_exhaustive()
    }
}

impl Drop for DockerRuntime {
    /// Followers belong to this instance: a new one (an agent restart in
    /// the same process, in tests) starts its own.
    fn drop(&mut self) {
        let f = self.followers.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, h) in f.drain() {
            h.abort();
        }
    }
}

impl DockerRuntime {
    /// Connects to dockerd at `socket` and agrees on an API version (the
    /// daemon must be up).
    pub async fn connect(socket: &Path) -> Result<Self, RuntimeError> {
        let path = socket.to_string_lossy();
        let docker = Docker::connect_with_unix(&path, API_TIMEOUT, API_DEFAULT_VERSION)
            .map_err(unavailable(&format!("connecting to docker at {path}")))?
            .negotiate_version()
            .await
            .map_err(unavailable(&format!("talking to docker at {path}")))?;
        Ok(Self {
            docker,
            followers: Mutex::new(HashMap::new()),
            oom: Mutex::new(HashMap::new()),
            log_rotation: super::logrotate::LogRotation::default(),
        })
    }

    /// Sets when the CRI log files are rotated (default: 10 MiB, 5 files).
    pub fn with_log_rotation(mut self, rotation: super::logrotate::LogRotation) -> Self {
        self.log_rotation = rotation;
        self
    }

    /// Imports an image made of the host's static busybox (see
    /// [`BUSYBOX`]) with a `/bin/<applet>` link for each of `applets`, as
    /// `reference`; returns its ID. Tests use it: there is no registry.
    pub async fn import_busybox(
        &self,
        reference: &str,
        applets: &[&str],
    ) -> Result<String, RuntimeError> {
        sandbox::import_busybox(&self.docker, reference, applets).await
    }

    /// Follows the logs of `id` into `path` unless a follower is at it.
    fn ensure_follower(&self, id: &str, path: &Path, running: bool) {
        let mut f = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        let needed = match f.get(id) {
            None => true,
            // Its stream broke (dockerd restarted) while the container runs.
            Some(h) => h.is_finished() && running,
        };
        if needed {
            let h = logs::spawn(
                self.docker.clone(),
                id.to_owned(),
                path.to_owned(),
                self.log_rotation,
            );
            f.insert(id.to_owned(), h);
        }
    }

    /// Whether docker sent an `oom` event for a container that died of
    /// SIGKILL. Docker 20.10 sets State.OOMKilled only when containerd's
    /// OOM event arrives before the exit event; when it comes second, only
    /// the event (kept in the daemon's recent-events buffer) tells.
    async fn oom_event(
        &self,
        id: &str,
        started_at: Option<chrono::DateTime<chrono::Utc>>,
        finished_at: chrono::DateTime<chrono::Utc>,
    ) -> bool {
        if let Some(&v) = self.oom.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return v;
        }
        let stamp = |t: chrono::DateTime<chrono::Utc>| {
            format!("{}.{:09}", t.timestamp(), t.timestamp_subsec_nanos())
        };
        let now = chrono::Utc::now();
        let since = started_at.unwrap_or(finished_at) - chrono::Duration::seconds(1);
        let filters = HashMap::from([
            ("container".to_owned(), vec![id.to_owned()]),
            ("event".to_owned(), vec!["oom".to_owned()]),
        ]);
        let opts = EventsOptionsBuilder::new()
            .since(&stamp(since))
            .until(&stamp(now))
            .filters(&filters)
            .build();
        let found = tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = self.docker.events(Some(opts));
            matches!(s.next().await, Some(Ok(_)))
        })
        .await
        .unwrap_or(false);
        // The event may trail the exit by a moment: a "no" is final only
        // once the exit is not that recent.
        if found || now - finished_at > chrono::Duration::seconds(3) {
            self.oom
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.to_owned(), found);
        }
        found
    }

    /// Creates the container; returns its ID and whether it already runs.
    async fn create(&self, spec: &ContainerSpec) -> Result<(String, bool), RuntimeError> {
        let pause = match &spec.netns {
            None => None,
            Some(ns) => Some(
                sandbox::pause_of(&self.docker, &spec.labels.pod_uid)
                    .await?
                    .ok_or_else(|| {
                        RuntimeError::Start(format!(
                            "pod {} has no sandbox (pause container) for {}: create_sandbox must run before start",
                            spec.labels.pod_uid,
                            ns.display()
                        ))
                    })?,
            ),
        };
        let image_user = match (spec.run_as_user, spec.run_as_group) {
            (None, Some(_)) => self
                .docker
                .inspect_image(&spec.image)
                .await
                .ok()
                .and_then(|i| i.config)
                .and_then(|c| c.user),
            _ => None,
        };
        let body = create::body(spec, pause.as_deref(), image_user.as_deref());
        let name = labels::container_name(&spec.labels);
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        match self
            .docker
            .create_container(Some(opts.clone()), body.clone())
            .await
        {
            Ok(c) => Ok((c.id, false)),
            // The name (pod, container, attempt) is taken: this attempt
            // was started before. Still running, it is the container asked
            // for (a start repeated across an agent restart must not kill
            // it); otherwise it is a leftover to replace.
            Err(e) if status(&e) == Some(409) => {
                let existing = self.docker.inspect_container(&name, None).await.ok();
                let running = existing
                    .as_ref()
                    .and_then(|i| i.state.as_ref())
                    .and_then(|s| s.running)
                    == Some(true);
                if let (true, Some(id)) = (running, existing.and_then(|i| i.id)) {
                    tracing::info!(container = %id, %name, "this attempt already runs; adopting it");
                    return Ok((id, true));
                }
                tracing::info!(container = %name, "replacing a leftover container of the same name");
                self.remove(&name).await?;
                self.docker
                    .create_container(Some(opts), body)
                    .await
                    .map(|c| (c.id, false))
                    .map_err(|e| RuntimeError::Start(format!("creating the container: {e}")))
            }
            Err(e) => Err(RuntimeError::Start(format!("creating the container: {e}"))),
        }
    }
}

/// `name[:tag]` without a tag or digest pulls every tag: say `latest`.
fn pull_tag(image: &str) -> Option<&'static str> {
    let last = image.rsplit('/').next().unwrap_or(image);
    (!last.contains(':') && !image.contains('@')).then_some("latest")
}

fn split_env(env: Vec<String>) -> Vec<(String, String)> {
    env.into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv, String::new()),
        })
        .collect()
}

#[async_trait::async_trait]
impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn version(&self) -> Result<String, RuntimeError> {
        let v = self
            .docker
            .version()
            .await
            .map_err(unavailable("asking docker its version"))?;
        Ok(format!("docker://{}", v.version.unwrap_or_default()))
    }

    async fn health(&self) -> Result<(), RuntimeError> {
        self.docker
            .ping()
            .await
            .map(|_| ())
            .map_err(unavailable("pinging docker"))
    }

    async fn ensure_image(&self, image: &str) -> Result<String, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(i) => return Ok(i.id.unwrap_or_default()),
            Err(e) if status(&e) == Some(404) => {}
            Err(e) => return Err(unavailable("inspecting an image")(e)),
        }
        let image_err = |reason: String| RuntimeError::Image {
            image: image.to_owned(),
            reason,
        };
        let mut opts = CreateImageOptionsBuilder::new().from_image(image);
        if let Some(t) = pull_tag(image) {
            opts = opts.tag(t);
        }
        let pull = async {
            let mut s = self.docker.create_image(Some(opts.build()), None, None);
            while let Some(r) = s.next().await {
                r?;
            }
            Ok::<(), bollard::errors::Error>(())
        };
        match tokio::time::timeout(PULL_TIMEOUT, pull).await {
            Err(_) => return Err(image_err(format!("pull timed out after {PULL_TIMEOUT:?}"))),
            Ok(Err(e)) => return Err(image_err(format!("pull failed: {e}"))),
            Ok(Ok(())) => {}
        }
        let i = self
            .docker
            .inspect_image(image)
            .await
            .map_err(|e| image_err(format!("not present after the pull: {e}")))?;
        Ok(i.id.unwrap_or_default())
    }

    async fn image_config(&self, image: &str) -> Result<ImageConfig, RuntimeError> {
        let i = self
            .docker
            .inspect_image(image)
            .await
            .map_err(|e| RuntimeError::Image {
                image: image.to_owned(),
                reason: e.to_string(),
            })?;
        let c = i.config.unwrap_or_default();
        Ok(ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: split_env(c.env.unwrap_or_default()),
            working_dir: c.working_dir.filter(|w| !w.is_empty()),
        })
    }

    async fn start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let (id, running) = self.create(spec).await?;
        if running {
            self.ensure_follower(&id, &spec.log_path, true);
            return Ok(id);
        }
        if let Err(e) = self.docker.start_container(&id, None).await {
            // Docker records failures that are the container's (no such
            // executable…) in State.Error: keep the container so `list`
            // reports it (StartError), as the trait asks.
            let recorded = self
                .docker
                .inspect_container(&id, None)
                .await
                .ok()
                .and_then(|i| i.state)
                .and_then(|s| s.error)
                .is_some_and(|m| !m.is_empty());
            if recorded {
                tracing::debug!(container = %id, error = %e, "container failed to start");
                return Ok(id);
            }
            let _ = self.remove(&id).await;
            return Err(RuntimeError::Start(format!("starting the container: {e}")));
        }
        self.ensure_follower(&id, &spec.log_path, true);
        tracing::debug!(container = %id, name = %labels::container_name(&spec.labels), "container started");
        Ok(id)
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let opts = StopContainerOptionsBuilder::new()
            .t(i32::try_from(secs).unwrap_or(i32::MAX))
            .build();
        // The request lasts as long as the grace period.
        let docker = self
            .docker
            .clone()
            .with_timeout(Duration::from_secs(secs + API_TIMEOUT));
        match docker.stop_container(id, Some(opts)).await {
            Ok(()) => {}
            Err(e) if status(&e) == Some(404) => return Err(RuntimeError::NotFound(id.into())),
            Err(e) => return Err(unavailable("stopping a container")(e)),
        }
        // Docker answers once it has sent SIGKILL; wait for the exit.
        for _ in 0..200 {
            match self.docker.inspect_container(id, None).await {
                Ok(i) if i.state.as_ref().and_then(|s| s.running) == Some(true) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => return Ok(()),
            }
        }
        Err(RuntimeError::Unavailable(format!(
            "container {id} still runs after docker stopped it"
        )))
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let opts = RemoveContainerOptionsBuilder::new().force(true).build();
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) => {}
            Err(e) if status(&e) == Some(404) => {}
            Err(e) => return Err(unavailable("removing a container")(e)),
        }
        self.followers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.oom
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&labels::filter(labels::POD_UID))
            .build();
        let summaries = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(unavailable("listing containers"))?;
        let mut out = Vec::new();
        for c in summaries {
            let (Some(id), Some(l)) = (c.id, c.labels) else {
                continue;
            };
            let Some(labels) = labels::from_docker(&l) else {
                continue;
            };
            let log_path = PathBuf::from(l.get(labels::LOG_PATH).cloned().unwrap_or_default());
            let i = match self.docker.inspect_container(&id, None).await {
                Ok(i) => i,
                // Removed since it was listed.
                Err(e) if status(&e) == Some(404) => continue,
                Err(e) => return Err(unavailable("inspecting a container")(e)),
            };
            let mut state = i
                .state
                .as_ref()
                .map_or(ContainerState::Created, state::from_docker);
            if let ContainerState::Exited {
                started_at,
                finished_at,
                exit_code: 137,
                reason,
                ..
            } = &mut state
                && reason == "Error"
                && self.oom_event(&id, *started_at, *finished_at).await
            {
                *reason = "OOMKilled".into();
            }
            let running = matches!(state, ContainerState::Running { .. });
            let started = !matches!(
                state,
                ContainerState::Created
                    | ContainerState::Exited {
                        started_at: None,
                        ..
                    }
            );
            if started && !log_path.as_os_str().is_empty() {
                self.ensure_follower(&id, &log_path, running);
            }
            out.push(ContainerInfo {
                id,
                labels,
                image: i
                    .config
                    .and_then(|c| c.image)
                    .or(c.image)
                    .unwrap_or_default(),
                image_id: format!("docker-pullable://{}", i.image.unwrap_or_default()),
                state,
                log_path,
            });
        }
        Ok(out)
    }

    async fn exec(
        &self,
        id: &str,
        cmd: &[String],
        tty: bool,
        stdin: bool,
    ) -> Result<ExecSession, RuntimeError> {
        let created = self
            .docker
            .create_exec(
                id,
                CreateExecOptions {
                    attach_stdin: Some(stdin),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(tty),
                    cmd: Some(cmd.to_vec()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| match status(&e) {
                Some(404) => RuntimeError::NotFound(id.into()),
                _ => RuntimeError::Start(format!("exec in {id}: {e}")),
            })?;
        let started = self
            .docker
            .start_exec(
                &created.id,
                Some(StartExecOptions {
                    detach: false,
                    tty,
                    output_capacity: None,
                }),
            )
            .await
            .map_err(|e| RuntimeError::Start(format!("exec in {id}: {e}")))?;
        let StartExecResults::Attached { output, input } = started else {
            return Err(RuntimeError::Start(format!("exec in {id}: not attached")));
        };
        let resize = tty.then(|| {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(u16, u16)>(4);
            let docker = self.docker.clone();
            let exec_id = created.id.clone();
            tokio::spawn(async move {
                while let Some((cols, rows)) = rx.recv().await {
                    let opts = ResizeExecOptionsBuilder::new()
                        .w(i32::from(cols))
                        .h(i32::from(rows))
                        .build();
                    let _ = docker.resize_exec(&exec_id, opts).await;
                }
            });
            tx
        });
        Ok(session::session(
            output,
            input,
            stdin,
            tty,
            resize,
            session::Exit::Exec {
                docker: self.docker.clone(),
                id: created.id,
            },
        ))
    }

    async fn attach(&self, id: &str, stdin: bool) -> Result<ExecSession, RuntimeError> {
        let tty = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| match status(&e) {
                Some(404) => RuntimeError::NotFound(id.into()),
                _ => unavailable("inspecting a container")(e),
            })?
            .config
            .and_then(|c| c.tty)
            .unwrap_or(false);
        let opts = AttachContainerOptionsBuilder::new()
            .stream(true)
            .stdin(stdin)
            .stdout(true)
            .stderr(true)
            .build();
        let a = self
            .docker
            .attach_container(id, Some(opts))
            .await
            .map_err(|e| RuntimeError::Start(format!("attaching to {id}: {e}")))?;
        let resize = tty.then(|| {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(u16, u16)>(4);
            let docker = self.docker.clone();
            let cid = id.to_owned();
            tokio::spawn(async move {
                while let Some((cols, rows)) = rx.recv().await {
                    let opts = bollard::query_parameters::ResizeContainerTTYOptionsBuilder::new()
                        .w(i32::from(cols))
                        .h(i32::from(rows))
                        .build();
                    let _ = docker.resize_container_tty(&cid, opts).await;
                }
            });
            tx
        });
        Ok(session::session(
            a.output,
            a.input,
            stdin,
            tty,
            resize,
            session::Exit::Container {
                docker: self.docker.clone(),
                id: id.to_owned(),
            },
        ))
    }

    async fn create_sandbox(
        &self,
        pod_uid: &str,
        labels: &ContainerLabels,
        netns_path: &Path,
    ) -> Result<(), RuntimeError> {
        sandbox::create(&self.docker, pod_uid, labels, netns_path).await
    }

    async fn remove_sandbox(&self, pod_uid: &str) -> Result<(), RuntimeError> {
        sandbox::remove(&self.docker, pod_uid).await
    }

    async fn list_sandboxes(&self) -> Result<Vec<String>, RuntimeError> {
        sandbox::list(&self.docker).await
    }
}
