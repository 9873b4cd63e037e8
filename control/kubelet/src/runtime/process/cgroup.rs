//! Per-container cgroups: `<parent>/<pod-uid>/<container-id>` in the
//! unified hierarchy when /sys/fs/cgroup is cgroup2 with the cpu and memory
//! controllers, else in each v1 hierarchy we use (memory, cpu, pids, cpuacct).

use crate::runtime::Resources;
use serde::{Deserialize, Serialize};
use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// v1 hierarchies a container joins; pids and cpuacct are optional (where
/// cpuacct is co-mounted with cpu the second join is a no-op). cpuacct
/// gives the exact CPU time `kubectl top` reports.
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "pids", "cpuacct"];
/// CFS period: 100 ms, as the kubelet uses.
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Version {
    V1,
    V2,
}

/// A container's cgroup: one directory (v2) or one per controller (v1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Cgroup {
    pub version: Version,
    /// v1: `(controller, dir)`; v2: `("", dir)`.
    pub dirs: Vec<(String, PathBuf)>,
}

/// Which cgroup layout this machine has.
pub(crate) fn detect() -> Version {
    let unified = nix::sys::statfs::statfs(CGROUP_ROOT)
        .map(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    if unified {
        let controllers = fs::read_to_string(Path::new(CGROUP_ROOT).join("cgroup.controllers"))
            .unwrap_or_default();
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if has("cpu") && has("memory") {
            return Version::V2;
        }
    }
    Version::V1
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
}

/// cpu.shares from a request in millicores (the kubelet's formula).
fn cpu_shares(millis: u64) -> u64 {
    (millis * 1024 / 1000).max(2)
}

impl Cgroup {
    /// Creates the cgroup and applies the limits.
    pub(crate) fn create(
        parent: &str,
        pod_uid: &str,
        id: &str,
        resources: &Resources,
    ) -> Result<Self, String> {
        let rel = Path::new(parent).join(pod_uid).join(id);
        match detect() {
            Version::V2 => {
                let root = Path::new(CGROUP_ROOT);
                // Controllers must be enabled on every level above the leaf.
                let mut level = root.to_path_buf();
                for part in [parent, pod_uid] {
                    // Best effort: the root may already delegate them.
                    let _ = write(&level.join("cgroup.subtree_control"), "+cpu +memory +pids");
                    level = level.join(part);
                    fs::create_dir_all(&level)
                        .map_err(|e| format!("creating {}: {e}", level.display()))?;
                }
                let _ = write(&level.join("cgroup.subtree_control"), "+cpu +memory +pids");
                let dir = root.join(&rel);
                fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
                if let Some(mem) = resources.memory_limit_bytes {
                    write(&dir.join("memory.max"), &mem.to_string())?;
                    let _ = write(&dir.join("memory.swap.max"), "0");
                }
                if let Some(cpu) = resources.cpu_limit_millis {
                    let quota = (cpu * CPU_PERIOD_US / 1000).max(1000);
                    write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                }
                if let Some(req) = resources.cpu_request_millis {
                    let weight = 1 + (cpu_shares(req).saturating_sub(2) * 9999) / 262_142;
                    write(&dir.join("cpu.weight"), &weight.to_string())?;
                }
                Ok(Self {
                    version: Version::V2,
                    dirs: vec![(String::new(), dir)],
                })
            }
            Version::V1 => {
                let mut dirs = Vec::new();
                for controller in V1_CONTROLLERS {
                    let base = Path::new(CGROUP_ROOT).join(controller);
                    if !base.join("cgroup.procs").exists() {
                        if controller == "pids" || controller == "cpuacct" {
                            continue;
                        }
                        return Err(format!(
                            "the {controller} cgroup controller is not mounted at {}",
                            base.display()
                        ));
                    }
                    let dir = base.join(&rel);
                    fs::create_dir_all(&dir)
                        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                    dirs.push((controller.to_owned(), dir));
                }
                // [mesh] On hybrid hosts the processes also get a cgroup v2
                // directory (no controllers there): cgroup BPF programs such
                // as the mesh capture attach to `<unified>/<parent>/<pod-uid>`.
                let unified = Path::new(CGROUP_ROOT).join("unified");
                let is_v2 = nix::sys::statfs::statfs(&unified)
                    .map(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
                    .unwrap_or(false);
                if is_v2 {
                    let dir = unified.join(&rel);
                    fs::create_dir_all(&dir)
                        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                    dirs.push(("unified".to_owned(), dir));
                }
                let cg = Self {
                    version: Version::V1,
                    dirs,
                };
                if let (Some(mem), Some(dir)) = (resources.memory_limit_bytes, cg.dir("memory")) {
                    write(&dir.join("memory.limit_in_bytes"), &mem.to_string())?;
                    // No swap either: memsw counts memory + swap.
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, &mem.to_string())?;
                    }
                }
                if let Some(dir) = cg.dir("cpu") {
                    if let Some(cpu) = resources.cpu_limit_millis {
                        let quota = (cpu * CPU_PERIOD_US / 1000).max(1000);
                        write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                        write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                    }
                    if let Some(req) = resources.cpu_request_millis {
                        write(&dir.join("cpu.shares"), &cpu_shares(req).to_string())?;
                    }
                }
                Ok(cg)
            }
        }
    }

    /// The directory of a v1 controller (or the v2 directory).
    pub(crate) fn dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _)| c == controller || c.is_empty())
            .map(|(_, d)| d.as_path())
    }

    /// Moves the calling process into the cgroup (must run before it
    /// drops privileges).
    pub(crate) fn join_self(&self) -> Result<(), String> {
        for (_, dir) in &self.dirs {
            write(&dir.join("cgroup.procs"), "0")?;
        }
        Ok(())
    }

    /// How many times the kernel OOM-killed a process of this cgroup.
    pub(crate) fn oom_kills(&self) -> u64 {
        let (file, key) = match self.version {
            Version::V1 => ("memory.oom_control", "oom_kill"),
            Version::V2 => ("memory.events", "oom_kill"),
        };
        let Some(dir) = self.dir("memory") else {
            return 0;
        };
        fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines().find_map(|l| {
                    let mut it = l.split_whitespace();
                    (it.next() == Some(key))
                        .then(|| it.next().and_then(|v| v.parse().ok()))
                        .flatten()
                })
            })
            .unwrap_or(0)
    }

    /// Removes the container's cgroup (and the pod's when it is empty).
    /// Processes that just exited may linger a moment, so retry briefly.
    pub(crate) fn remove(&self) -> Result<(), String> {
        for (_, dir) in &self.dirs {
            let mut attempt = 0;
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if attempt < 40 => {
                        let _ = e;
                        attempt += 1;
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    Err(e) => return Err(format!("removing cgroup {}: {e}", dir.display())),
                }
            }
            // The pod's level goes with its last container; a busy or
            // non-empty directory simply stays.
            if let Some(pod) = dir.parent() {
                let _ = fs::remove_dir(pod);
            }
        }
        Ok(())
    }
}
