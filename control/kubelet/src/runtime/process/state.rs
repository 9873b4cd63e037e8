//! What a container directory holds: `config.json` (written once by the
//! runtime before the shim starts) and `state.json` (written by the shim:
//! first the pid, then the exit). Both are replaced atomically (write to a
//! temporary file, rename) so a reader never sees half a file, whoever
//! crashes when.

use super::cgroup::Cgroup;
use crate::runtime::ContainerSpec;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::{
    io::Write,
    path::{Path, PathBuf},
};

pub(crate) const CONFIG_FILE: &str = "config.json";
pub(crate) const STATE_FILE: &str = "state.json";
pub(crate) const STDIN_FIFO: &str = "stdin.fifo";
pub(crate) const CONTROL_FIFO: &str = "control.fifo";
pub(crate) const SHIM_LOG: &str = "shim.log";
pub(crate) const ROOTFS_DIR: &str = "rootfs";
pub(crate) const UPPER_DIR: &str = "upper";
pub(crate) const WORK_DIR: &str = "work";

/// Where the container's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RootfsSource {
    /// The host's filesystem, read-only, with private /tmp and /run.
    Host,
    /// An overlay with this directory as the (read-only) lower layer and a
    /// per-container upper layer in the container directory.
    Overlay { lower: PathBuf },
}

/// Everything the shim needs, fixed at creation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ContainerConfig {
    pub id: String,
    pub spec: ContainerSpec,
    pub image_id: String,
    pub rootfs: RootfsSource,
    /// The final argv (command ++ args, or the image's default).
    pub argv: Vec<String>,
    /// argv[0] resolved to an absolute path inside the container.
    pub exe: String,
    pub cwd: String,
    /// Bind-mounted at /.skep/skep for host-image containers.
    pub shim_exe: PathBuf,
    pub cgroup: Cgroup,
    pub created_at: DateTime<Utc>,
    /// Absent in the configs of containers made before rotation existed.
    #[serde(default)]
    pub log_rotation: crate::runtime::logrotate::LogRotation,
}

/// How the container ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ExitRecord {
    pub exit_code: i32,
    pub finished_at: DateTime<Utc>,
    pub reason: String,
    pub message: Option<String>,
    pub signal: Option<i32>,
}

/// What the shim reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ShimState {
    pub shim_pid: Option<i32>,
    pub shim_start_time: Option<u64>,
    /// The container's PID 1, as seen from the host.
    pub pid: Option<i32>,
    pub pid_start_time: Option<u64>,
    pub started_at: Option<DateTime<Utc>>,
    pub exit: Option<ExitRecord>,
}

/// Writes `value` as JSON to `dir/name` atomically.
pub(crate) fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> std::io::Result<()> {
    let data = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))
}

/// Reads `dir/name`; `Ok(None)` when it does not exist.
pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(
    dir: &Path,
    name: &str,
) -> std::io::Result<Option<T>> {
    match std::fs::read(dir.join(name)) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The start time (clock ticks since boot, field 22 of /proc/PID/stat) of
/// a process: with the pid it identifies a process even after pid reuse.
pub(crate) fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after it start behind the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); starttime is field 22.
    let field = rest.split_whitespace().nth(22 - 3)?;
    // A zombie has exited already; it is only waiting to be reaped.
    if rest.split_whitespace().next() == Some("Z") {
        return None;
    }
    field.parse().ok()
}

/// Whether `pid` is still the process that had `start_time`.
pub(crate) fn same_process(pid: Option<i32>, start_time: Option<u64>) -> bool {
    match (pid, start_time) {
        (Some(pid), Some(start)) => process_start_time(pid) == Some(start),
        _ => false,
    }
}
