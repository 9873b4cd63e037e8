//! Cumulative CPU time and memory working set of the process runtime's
//! containers, read from their cgroups (`<parent>/<pod-uid>/<id>`, see
//! `runtime::process::cgroup`).
//!
//! CPU comes from the first that exists: cgroup v2 `cpu.stat`
//! (`usage_usec`), v1 `cpuacct.usage` under the `cpu` or `cpuacct`
//! hierarchy, or, when the container has no cpuacct cgroup (the runtime
//! creates only memory, cpu and pids on v1, and on hybrid machines cpuacct
//! is a hierarchy of its own), the CPU time of the processes in its memory
//! cgroup from /proc (their own time plus that of their reaped children).
//! The last one drops when a process exits; rates computed from it are
//! clamped at zero by the caller.

use std::{
    fs,
    path::{Path, PathBuf},
};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// One reading of a container's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// Cumulative CPU time in nanoseconds.
    pub cpu_ns: u64,
    /// Memory working set in bytes (usage minus inactive file pages, what
    /// the kubelet and cAdvisor report).
    pub working_set: u64,
}

/// Whether /sys/fs/cgroup is the unified hierarchy with cpu and memory
/// (the same test the runtime makes when it creates the cgroups).
fn unified() -> bool {
    let is_cgroup2 = nix::sys::statfs::statfs(CGROUP_ROOT)
        .map(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    if !is_cgroup2 {
        return false;
    }
    let controllers =
        fs::read_to_string(Path::new(CGROUP_ROOT).join("cgroup.controllers")).unwrap_or_default();
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    has("cpu") && has("memory")
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A `key value` line of a stat file (memory.stat, cpu.stat).
fn stat_field(path: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Reads the counters of the container `id` of pod `pod_uid` under the
/// cgroup `parent`; `None` when its cgroup is gone.
pub fn read(parent: &str, pod_uid: &str, id: &str) -> Option<Reading> {
    let rel = Path::new(parent).join(pod_uid).join(id);
    let root = Path::new(CGROUP_ROOT);
    if unified() {
        let dir = root.join(&rel);
        let cpu_ns = stat_field(&dir.join("cpu.stat"), "usage_usec")? * 1000;
        let usage = read_u64(&dir.join("memory.current"))?;
        let inactive = stat_field(&dir.join("memory.stat"), "inactive_file").unwrap_or(0);
        return Some(Reading {
            cpu_ns,
            working_set: usage.saturating_sub(inactive),
        });
    }
    let mem = root.join("memory").join(&rel);
    let usage = read_u64(&mem.join("memory.usage_in_bytes"))?;
    let inactive = stat_field(&mem.join("memory.stat"), "total_inactive_file").unwrap_or(0);
    let cpu_ns = ["cpu", "cpuacct", "cpu,cpuacct"]
        .iter()
        .find_map(|h| read_u64(&root.join(h).join(&rel).join("cpuacct.usage")))
        .unwrap_or_else(|| processes_cpu_ns(&mem));
    Some(Reading {
        cpu_ns,
        working_set: usage.saturating_sub(inactive),
    })
}

/// Clock ticks per second of /proc's CPU times.
pub(crate) fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// utime + stime + cutime + cstime of one process, in ticks.
fn process_ticks(pid: &str) -> Option<u64> {
    let stat = fs::read_to_string(PathBuf::from("/proc").join(pid).join("stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start
    // after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of stat(5), utime 14 … cstime 17.
    let f = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(f(14)? + f(15)? + f(16)? + f(17)?)
}

/// CPU time of the processes of a v1 cgroup (see the module comment).
fn processes_cpu_ns(dir: &Path) -> u64 {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    let ticks: u64 = procs.split_whitespace().filter_map(process_ticks).sum();
    ticks.saturating_mul(1_000_000_000) / clock_ticks()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A container-like cgroup with a spinning process, removed on drop.
    struct Spinner {
        child: std::process::Child,
        dirs: Vec<PathBuf>,
    }

    impl Drop for Spinner {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            for d in &self.dirs {
                for _ in 0..40 {
                    if fs::remove_dir(d).is_ok() || !d.exists() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
            }
        }
    }

    #[test]
    fn reads_cpu_and_memory_of_a_real_cgroup() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test creates cgroups: run it as root"
        );
        let parent = format!("skep-stats-test-{}", std::process::id());
        let root = Path::new(CGROUP_ROOT);
        let base = if unified() {
            let _ = fs::write(root.join("cgroup.subtree_control"), "+cpu +memory");
            root.to_path_buf()
        } else {
            root.join("memory")
        };
        let levels = [
            base.join(&parent),
            base.join(&parent).join("pod"),
            base.join(&parent).join("pod").join("ctr"),
        ];
        let child = std::process::Command::new("sh")
            // Allocates only once moved (pages are charged where they are
            // first touched), then spins.
            .args([
                "-c",
                r#"read go; x=$(head -c 4000000 /dev/zero | tr "\0" a); while :; do :; done"#,
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run sh");
        let mut spinner = Spinner {
            child,
            dirs: levels.iter().rev().cloned().collect(),
        };
        for (i, d) in levels.iter().enumerate() {
            fs::create_dir_all(d).unwrap();
            if unified() && i < 2 {
                let _ = fs::write(d.join("cgroup.subtree_control"), "+cpu +memory");
            }
        }
        fs::write(
            levels[2].join("cgroup.procs"),
            spinner.child.id().to_string(),
        )
        .unwrap();
        {
            use std::io::Write;
            let mut stdin = spinner.child.stdin.take().unwrap();
            stdin.write_all(b"go\n").unwrap();
        }
        // Poll: on a busy machine the shell may get little CPU at first.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        let r = loop {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let r = read(&parent, "pod", "ctr").expect("the cgroup is readable");
            if (r.cpu_ns >= 100_000_000 && r.working_set >= 1_000_000)
                || std::time::Instant::now() > deadline
            {
                break r;
            }
        };
        assert!(
            r.cpu_ns >= 100_000_000,
            "a spinning shell used ≥ 100 ms in 15 s: {r:?} (processes: {:?}, exited: {:?})",
            fs::read_to_string(levels[2].join("cgroup.procs")),
            spinner.child.try_wait()
        );
        assert!(r.working_set >= 1_000_000, "it holds ~4 MB: {r:?}");
        assert!(read(&parent, "pod", "gone").is_none());
        let _ = spinner.child.kill();
    }
}
