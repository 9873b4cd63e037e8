//! The built-in `process` runtime: no daemon, each container is a process
//! tree in its own pid/mount/UTS/IPC namespaces (and the pod's network
//! namespace), in its own cgroup, supervised by a `skep __shim` process.
//!
//! Every container has a directory `state_dir/<id>` holding `config.json`
//! (written here, before the shim starts) and `state.json` (written by the
//! shim: pid, then the exit). The shim runs detached, so containers keep
//! running across an agent restart; a new `ProcessRuntime` on the same
//! state directory re-adopts them just by reading those directories.

mod cgroup;
mod exec;
mod image;
mod init;
mod logfile;
mod mounts;
mod rootfs;
mod shim;
mod state;
mod stdio;
mod tty;

pub use exec::main as exec_main;
pub use rootfs::{DEFAULT_PATH, SKEP_IN_CONTAINER};
pub use shim::main as shim_main;

use super::{
    ContainerInfo, ContainerSpec, ContainerState, ExecSession, ImageConfig, Runtime, RuntimeError,
};
use image::DigestMemo;
use rootfs::find_executable;
use state::{
    CONFIG_FILE, CONTROL_FIFO, ContainerConfig, ExitRecord, ROOTFS_DIR, RootfsSource, STATE_FILE,
    STDIN_FIFO, ShimState, UPPER_DIR, WORK_DIR, read_json, same_process, write_json,
};
use std::{
    io::Read,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::ExitStatusExt,
    },
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};

/// Where the process runtime keeps things and what it runs.
#[derive(Debug, Clone)]
pub struct ProcessRuntimeConfig {
    /// One directory per container (e.g. `DATA/containers`).
    pub state_dir: PathBuf,
    /// Unpacked image tarballs (e.g. `DATA/images`).
    pub image_cache: PathBuf,
    /// The `skep` binary (runs `__shim` and `__exec`; also bind-mounted at
    /// /.skep/skep in host-image containers).
    pub shim_exe: PathBuf,
    /// Top-level cgroup name: containers go to `<parent>/<pod-uid>/<id>`.
    pub cgroup_parent: String,
    /// When the shims rotate their containers' log files.
    pub log_rotation: crate::runtime::logrotate::LogRotation,
}

impl ProcessRuntimeConfig {
    /// The defaults under an agent data directory, with this executable as
    /// the shim.
    pub fn under(data_dir: &Path) -> Result<Self, RuntimeError> {
        Ok(Self {
            state_dir: data_dir.join("containers"),
            image_cache: data_dir.join("images"),
            shim_exe: std::env::current_exe()
                .map_err(RuntimeError::io("finding the skep binary"))?,
            cgroup_parent: "skep".into(),
            log_rotation: Default::default(),
        })
    }
}

#[derive(Debug)]
struct Inner {
    cfg: ProcessRuntimeConfig,
    digests: DigestMemo,
}

/// The built-in runtime (see the module docs).
#[derive(Debug, Clone)]
pub struct ProcessRuntime {
    inner: Arc<Inner>,
}

/// How often stop/attach look at a container's state.
const POLL: Duration = Duration::from_millis(50);
/// How long after SIGKILL the shim gets to record the exit.
const KILL_WAIT: Duration = Duration::from_secs(10);

fn blocking_err(e: tokio::task::JoinError) -> RuntimeError {
    RuntimeError::Unavailable(format!("background task failed: {e}"))
}

impl ProcessRuntime {
    pub fn new(cfg: ProcessRuntimeConfig) -> Result<Self, RuntimeError> {
        for dir in [&cfg.state_dir, &cfg.image_cache] {
            std::fs::create_dir_all(dir)
                .map_err(RuntimeError::io(format!("creating {}", dir.display())))?;
        }
        if !cfg.shim_exe.is_file() {
            return Err(RuntimeError::Unavailable(format!(
                "the shim executable {} does not exist",
                cfg.shim_exe.display()
            )));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                digests: DigestMemo::default(),
            }),
        })
    }

    /// The container's directory; refuses IDs that are not ours.
    fn dir(&self, id: &str) -> Result<PathBuf, RuntimeError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RuntimeError::NotFound(id.to_owned()));
        }
        let dir = self.inner.cfg.state_dir.join(id);
        if !dir.join(CONFIG_FILE).exists() {
            return Err(RuntimeError::NotFound(id.to_owned()));
        }
        Ok(dir)
    }

    fn load(&self, id: &str) -> Result<(PathBuf, ContainerConfig, ShimState), RuntimeError> {
        let dir = self.dir(id)?;
        let cfg: ContainerConfig = read_json(&dir, CONFIG_FILE)
            .map_err(RuntimeError::io(format!("reading {id}'s config")))?
            .ok_or_else(|| RuntimeError::NotFound(id.to_owned()))?;
        let st = read_json(&dir, STATE_FILE)
            .map_err(RuntimeError::io(format!("reading {id}'s state")))?
            .unwrap_or_default();
        Ok((dir, cfg, st))
    }

    /// The container's running PID 1, or why there is none.
    fn running_pid(&self, id: &str) -> Result<(PathBuf, ContainerConfig, i32), RuntimeError> {
        let (dir, cfg, st) = self.load(id)?;
        match (observe(&dir, &st), st.pid) {
            (ContainerState::Running { .. }, Some(pid)) => Ok((dir, cfg, pid)),
            _ => Err(RuntimeError::Start(format!(
                "container {id} is not running"
            ))),
        }
    }
}

/// What a container is doing, from its state file and /proc.
fn observe(dir: &Path, st: &ShimState) -> ContainerState {
    if let Some(exit) = &st.exit {
        return exited(st, exit);
    }
    let Some(started_at) = st.started_at else {
        return ContainerState::Created;
    };
    if same_process(st.pid, st.pid_start_time) {
        return ContainerState::Running { started_at };
    }
    // Gone: the shim may be writing the exit right now.
    if let Ok(Some(fresh)) = read_json::<ShimState>(dir, STATE_FILE)
        && let Some(exit) = &fresh.exit
    {
        return exited(&fresh, exit);
    }
    if same_process(st.shim_pid, st.shim_start_time) {
        return ContainerState::Running { started_at };
    }
    exited(st, &lost_exit())
}

fn exited(st: &ShimState, exit: &ExitRecord) -> ContainerState {
    ContainerState::Exited {
        started_at: st.started_at,
        finished_at: exit.finished_at,
        exit_code: exit.exit_code,
        reason: exit.reason.clone(),
        message: exit.message.clone(),
    }
}

/// The record for a container whose shim died before it could see the
/// exit (e.g. the shim was killed).
fn lost_exit() -> ExitRecord {
    ExitRecord {
        exit_code: 255,
        finished_at: chrono::Utc::now(),
        reason: "Error".into(),
        message: Some("the container's supervisor (shim) disappeared; exit status unknown".into()),
        signal: None,
    }
}

fn random_id() -> Result<String, RuntimeError> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(RuntimeError::io("reading /dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn mkfifo(path: &Path) -> Result<(), RuntimeError> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| RuntimeError::io(format!("creating {}", path.display()))(e.into()))
}

impl Inner {
    /// Creates the container directory and starts the shim (blocking).
    fn start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let image = image::resolve(&spec.image, &self.cfg.image_cache, &self.digests).map_err(
            |reason| RuntimeError::Image {
                image: spec.image.clone(),
                reason,
            },
        )?;
        let id = random_id()?;
        let dir = self.cfg.state_dir.join(&id);
        std::fs::create_dir_all(&dir)
            .map_err(RuntimeError::io(format!("creating {}", dir.display())))?;
        let result = self.prepare_and_spawn(spec, &id, &dir, image);
        if result.is_err() {
            // A runtime failure leaves nothing behind.
            if let Ok(Some(cfg)) = read_json::<ContainerConfig>(&dir, CONFIG_FILE) {
                let _ = cfg.cgroup.remove();
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        result.map(|()| id)
    }

    fn prepare_and_spawn(
        &self,
        spec: &ContainerSpec,
        id: &str,
        dir: &Path,
        image: image::ResolvedImage,
    ) -> Result<(), RuntimeError> {
        let mut argv: Vec<String> = spec.command.iter().chain(&spec.args).cloned().collect();
        if argv.is_empty() {
            argv = image
                .config
                .entrypoint
                .iter()
                .chain(&image.config.cmd)
                .cloned()
                .collect();
        }
        let path_env = spec
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or(DEFAULT_PATH);
        let lookup_root = match &image.source {
            RootfsSource::Host => PathBuf::from("/"),
            RootfsSource::Overlay { lower } => lower.clone(),
        };
        let mounts: Vec<(String, PathBuf)> = spec
            .mounts
            .iter()
            .map(|m| (m.container_path.clone(), m.host_path.clone()))
            .collect();
        // Resolve the executable before anything runs, so a missing one is
        // a clean StartError rather than a failed container.
        let (exe, start_error) = match argv.first() {
            None => (String::new(), Some("no command specified".to_owned())),
            Some(name) => match find_executable(&lookup_root, &mounts, name, path_env) {
                Some(exe) => (exe, None),
                None if name == "skep" && image.source == RootfsSource::Host => {
                    (SKEP_IN_CONTAINER.to_owned(), None)
                }
                None if name.contains('/') => (
                    String::new(),
                    Some(format!(
                        "exec: {name:?}: stat {name}: no such file or directory"
                    )),
                ),
                None => (
                    String::new(),
                    Some(format!(
                        "exec: {name:?}: executable file not found in $PATH"
                    )),
                ),
            },
        };
        let cwd = spec
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .or(image.config.working_dir.clone())
            .unwrap_or_else(|| "/".to_owned());
        let cg = if start_error.is_some() {
            cgroup::Cgroup {
                version: cgroup::detect(),
                dirs: Vec::new(),
            }
        } else {
            cgroup::Cgroup::create(
                &self.cfg.cgroup_parent,
                &spec.labels.pod_uid,
                id,
                &spec.resources,
            )
            .map_err(|e| RuntimeError::Unavailable(format!("cgroup: {e}")))?
        };
        let cfg = ContainerConfig {
            id: id.to_owned(),
            spec: spec.clone(),
            image_id: image.id,
            rootfs: image.source,
            argv,
            exe,
            cwd,
            shim_exe: self.cfg.shim_exe.clone(),
            cgroup: cg,
            created_at: chrono::Utc::now(),
            log_rotation: self.cfg.log_rotation,
        };
        write_json(dir, CONFIG_FILE, &cfg).map_err(RuntimeError::io("writing config.json"))?;
        if let Some(message) = start_error {
            tracing::info!(container = %id, %message, "container cannot start");
            // An empty log, so readers of it find the file.
            logfile::LogWriter::open(&spec.log_path, self.cfg.log_rotation).map_err(
                RuntimeError::io(format!("creating {}", spec.log_path.display())),
            )?;
            let now = chrono::Utc::now();
            let st = ShimState {
                started_at: None,
                exit: Some(ExitRecord {
                    exit_code: shim::START_ERROR_CODE,
                    finished_at: now,
                    reason: "StartError".into(),
                    message: Some(message),
                    signal: None,
                }),
                ..ShimState::default()
            };
            return write_json(dir, STATE_FILE, &st)
                .map_err(RuntimeError::io("writing state.json"));
        }
        for sub in [ROOTFS_DIR, UPPER_DIR, WORK_DIR] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(RuntimeError::io(format!("creating {sub}")))?;
        }
        if spec.stdin {
            mkfifo(&dir.join(STDIN_FIFO))?;
        }
        if spec.tty {
            mkfifo(&dir.join(CONTROL_FIFO))?;
        }
        let out = std::process::Command::new(&self.cfg.shim_exe)
            .arg("__shim")
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .map_err(RuntimeError::io(format!(
                "running the shim {}",
                self.cfg.shim_exe.display()
            )))?;
        if !out.status.success() {
            return Err(RuntimeError::Start(format!(
                "the container's shim failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        tracing::debug!(container = %id, pod = %spec.labels.pod_name, name = %spec.labels.container_name, "container started");
        Ok(())
    }
}

#[async_trait::async_trait]
impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn version(&self) -> Result<String, RuntimeError> {
        Ok(format!("skep-process://{}", env!("CARGO_PKG_VERSION")))
    }

    async fn health(&self) -> Result<(), RuntimeError> {
        let cfg = &self.inner.cfg;
        if !cfg.shim_exe.is_file() {
            return Err(RuntimeError::Unavailable(format!(
                "the shim executable {} is gone",
                cfg.shim_exe.display()
            )));
        }
        if !cfg.state_dir.is_dir() {
            return Err(RuntimeError::Unavailable(format!(
                "the state directory {} is gone",
                cfg.state_dir.display()
            )));
        }
        let probe = match cgroup::detect() {
            cgroup::Version::V2 => "/sys/fs/cgroup/cgroup.procs",
            cgroup::Version::V1 => "/sys/fs/cgroup/memory/cgroup.procs",
        };
        if !Path::new(probe).exists() {
            return Err(RuntimeError::Unavailable(format!(
                "no usable cgroup hierarchy ({probe} is missing)"
            )));
        }
        Ok(())
    }

    async fn ensure_image(&self, image: &str) -> Result<String, RuntimeError> {
        let inner = self.inner.clone();
        let name = image.to_owned();
        tokio::task::spawn_blocking(move || {
            image::resolve(&name, &inner.cfg.image_cache, &inner.digests)
                .map(|r| r.id)
                .map_err(|reason| RuntimeError::Image {
                    image: name.clone(),
                    reason,
                })
        })
        .await
        .map_err(blocking_err)?
    }

    /// `host` and directories: only the default PATH; tarballs: their
    /// config (the tarball is unpacked if `ensure_image` has not yet).
    async fn image_config(&self, image: &str) -> Result<ImageConfig, RuntimeError> {
        let inner = self.inner.clone();
        let name = image.to_owned();
        tokio::task::spawn_blocking(move || {
            image::resolve(&name, &inner.cfg.image_cache, &inner.digests)
                .map(|r| r.config)
                .map_err(|reason| RuntimeError::Image {
                    image: name.clone(),
                    reason,
                })
        })
        .await
        .map_err(blocking_err)?
    }

    async fn start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let inner = self.inner.clone();
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || inner.start(&spec))
            .await
            .map_err(blocking_err)?
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let (dir, _cfg, st) = self.load(id)?;
        let gone = |st: &ShimState| {
            st.exit.is_some()
                || (!same_process(st.pid, st.pid_start_time)
                    && !same_process(st.shim_pid, st.shim_start_time))
        };
        let current = || -> ShimState {
            read_json(&dir, STATE_FILE)
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        let Some(pid) = st.pid else {
            // Never started (StartError) or not yet recorded.
            return Ok(());
        };
        if gone(&st) {
            return self.record_lost(&dir, st);
        }
        let signal = |sig| {
            // The pid check right before the kill keeps a recycled pid safe.
            if same_process(Some(pid), st.pid_start_time) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            }
        };
        // PID 1 of a pid namespace only gets SIGTERM if it handles it.
        signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if gone(&current()) {
                return self.record_lost(&dir, current());
            }
            tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
        signal(nix::sys::signal::Signal::SIGKILL);
        let deadline = Instant::now() + KILL_WAIT;
        while Instant::now() < deadline {
            if gone(&current()) {
                return self.record_lost(&dir, current());
            }
            tokio::time::sleep(POLL).await;
        }
        Err(RuntimeError::Unavailable(format!(
            "container {id} did not exit within {KILL_WAIT:?} of SIGKILL"
        )))
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let (dir, cfg, st) = self.load(id)?;
        if !matches!(observe(&dir, &st), ContainerState::Exited { .. }) {
            self.stop(id, Duration::ZERO).await?;
        }
        let cg = cfg.cgroup.clone();
        tokio::task::spawn_blocking(move || {
            cg.remove().map_err(RuntimeError::Unavailable)?;
            std::fs::remove_dir_all(&dir)
                .map_err(RuntimeError::io(format!("removing {}", dir.display())))
        })
        .await
        .map_err(blocking_err)?
    }

    async fn list(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let state_dir = &self.inner.cfg.state_dir;
        let entries = std::fs::read_dir(state_dir)
            .map_err(RuntimeError::io(format!("reading {}", state_dir.display())))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            // A directory without config.json is being created (or was
            // abandoned by a crash mid-create): not a container yet.
            let Ok((dir, cfg, st)) = self.load(&id) else {
                continue;
            };
            out.push(ContainerInfo {
                id,
                labels: cfg.spec.labels.clone(),
                image: cfg.spec.image.clone(),
                image_id: format!("process://{}", cfg.image_id),
                state: observe(&dir, &st),
                log_path: cfg.spec.log_path.clone(),
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn exec(
        &self,
        id: &str,
        cmd: &[String],
        tty: bool,
        stdin: bool,
    ) -> Result<ExecSession, RuntimeError> {
        if cmd.is_empty() {
            return Err(RuntimeError::Start("exec: no command".into()));
        }
        let (_dir, _cfg, pid) = self.running_pid(id)?;
        let mut command = tokio::process::Command::new(&self.inner.cfg.shim_exe);
        command.arg("__exec").arg("--pid").arg(pid.to_string());
        if tty {
            command.arg("--tty");
        }
        command.arg("--").args(cmd);
        if tty {
            exec_tty(command)
        } else {
            exec_pipes(command, stdin)
        }
    }

    async fn attach(&self, id: &str, stdin: bool) -> Result<ExecSession, RuntimeError> {
        let (dir, cfg, _pid) = self.running_pid(id)?;
        let tty = cfg.spec.tty;
        let (out_w, out_r) = tokio::io::duplex(64 * 1024);
        let (err_w, err_r) = tokio::io::duplex(64 * 1024);
        let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
        // Opened and positioned now, so nothing written after attach
        // returns is missed.
        let mut log = std::fs::File::open(&cfg.spec.log_path).map_err(RuntimeError::io(
            format!("opening the log {}", cfg.spec.log_path.display()),
        ))?;
        std::io::Seek::seek(&mut log, std::io::SeekFrom::End(0))
            .map_err(RuntimeError::io("seeking the log"))?;
        tokio::spawn(follow_log(
            tokio::fs::File::from_std(log),
            cfg.spec.log_path.clone(),
            dir.clone(),
            out_w,
            (!tty).then_some(err_w),
            exit_tx,
        ));
        let stdin_writer: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>> =
            if stdin && cfg.spec.stdin {
                let sender = tokio::net::unix::pipe::OpenOptions::new()
                    .open_sender(dir.join(STDIN_FIFO))
                    .map_err(RuntimeError::io("opening the container's stdin"))?;
                Some(Box::new(sender))
            } else {
                None
            };
        let resize = if tty {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(u16, u16)>(8);
            let control = dir.join(CONTROL_FIFO);
            tokio::spawn(async move {
                let Ok(mut sender) =
                    tokio::net::unix::pipe::OpenOptions::new().open_sender(&control)
                else {
                    return;
                };
                while let Some((cols, rows)) = rx.recv().await {
                    if sender
                        .write_all(format!("{cols} {rows}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            Some(tx)
        } else {
            None
        };
        Ok(ExecSession {
            stdin: stdin_writer,
            stdout: Some(Box::new(out_r)),
            stderr: (!tty).then(|| Box::new(err_r) as Box<dyn AsyncRead + Send + Unpin>),
            resize,
            exit: exit_rx,
        })
    }
}

impl ProcessRuntime {
    /// After the container is gone: if the shim could not record the exit
    /// (it died too), record it so the container reads as exited.
    fn record_lost(&self, dir: &Path, mut st: ShimState) -> Result<(), RuntimeError> {
        if st.exit.is_none() {
            st.exit = Some(lost_exit());
            write_json(dir, STATE_FILE, &st).map_err(RuntimeError::io("writing state.json"))?;
        }
        Ok(())
    }
}

fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> i32 {
    match status {
        Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
        Err(_) => 255,
    }
}

fn exec_pipes(
    mut command: tokio::process::Command,
    stdin: bool,
) -> Result<ExecSession, RuntimeError> {
    use std::process::Stdio;
    command
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(RuntimeError::io("starting skep __exec"))?;
    let child_stdin = child.stdin.take();
    let child_stdout = child.stdout.take();
    let child_stderr = child.stderr.take();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(exit_code(child.wait().await));
    });
    Ok(ExecSession {
        stdin: child_stdin.map(|s| Box::new(s) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>),
        stdout: child_stdout.map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
        stderr: child_stderr.map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
        resize: None,
        exit: rx,
    })
}

fn exec_tty(mut command: tokio::process::Command) -> Result<ExecSession, RuntimeError> {
    let (master, slave) = tty::open().map_err(RuntimeError::io("allocating a pty"))?;
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(RuntimeError::io("dup"));
    command
        .stdin(std::process::Stdio::from(dup(&slave)?))
        .stdout(std::process::Stdio::from(dup(&slave)?))
        .stderr(std::process::Stdio::from(dup(&slave)?));
    let mut child = command
        .spawn()
        .map_err(RuntimeError::io("starting skep __exec"))?;
    // Only the child holds the slave now: reads of the master end (EIO)
    // when the command and everything it started are gone.
    drop(command);
    drop(slave);
    let reader = tokio::fs::File::from_std(std::fs::File::from(dup(&master)?));
    let writer = tokio::fs::File::from_std(std::fs::File::from(dup(&master)?));
    let (resize_tx, mut resize_rx) = tokio::sync::mpsc::channel::<(u16, u16)>(8);
    tokio::spawn(async move {
        while let Some((cols, rows)) = resize_rx.recv().await {
            tty::set_winsize(master.as_raw_fd(), cols, rows);
        }
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(exit_code(child.wait().await));
    });
    Ok(ExecSession {
        stdin: Some(Box::new(writer)),
        stdout: Some(Box::new(PtyReader(reader))),
        stderr: None,
        resize: Some(resize_tx),
        exit: rx,
    })
}

/// A pty master reader: EIO (the terminal's other side is closed) is the
/// end of the output, not an error.
struct PtyReader(tokio::fs::File);

impl AsyncRead for PtyReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.0).poll_read(cx, buf) {
            Poll::Ready(Err(e)) if e.raw_os_error() == Some(libc::EIO) => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

/// Follows the container's log from its current end, splitting records
/// into stdout and stderr, until the container exits.
async fn follow_log(
    mut file: tokio::fs::File,
    log_path: PathBuf,
    dir: PathBuf,
    mut stdout: tokio::io::DuplexStream,
    mut stderr: Option<tokio::io::DuplexStream>,
    exit: tokio::sync::oneshot::Sender<i32>,
) {
    use tokio::io::AsyncReadExt;
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut exited: Option<i32> = None;
    loop {
        let n = file.read(&mut buf).await.unwrap_or(0);
        if n > 0 {
            pending.extend_from_slice(&buf[..n]);
            while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                let Some((stream, partial, text)) = logfile::parse_record(&line) else {
                    continue;
                };
                let mut data = text.to_vec();
                if !partial {
                    data.push(b'\n');
                }
                let target = match (stream, stderr.as_mut()) {
                    (logfile::Stream::Stderr, Some(err)) => err,
                    _ => &mut stdout,
                };
                if target.write_all(&data).await.is_err() {
                    // The client went away.
                    return;
                }
            }
            continue;
        }
        // Rotated: the old file is read to its end; go on in the new one.
        if crate::runtime::logrotate::rotated_away(&file, &log_path).await
            && let Ok(f) = tokio::fs::File::open(&log_path).await
        {
            file = f;
            continue;
        }
        if let Some(code) = exited {
            let _ = exit.send(code);
            return;
        }
        let st: ShimState = read_json(&dir, STATE_FILE)
            .ok()
            .flatten()
            .unwrap_or_default();
        match observe(&dir, &st) {
            // One more read after the exit picks up the last lines.
            ContainerState::Exited { exit_code, .. } => exited = Some(exit_code),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
