//! What the benchmarks that boot real nodes share: network namespaces,
//! processes started inside them, memory readings, and the cleanup of a
//! node's containers.

// Benchmark harness: a failed expect aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use serde_json::Value;
use std::{
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Resident set size of a process, from /proc/PID/status.
pub fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Proportional set size (shared pages split among their users): what a
/// process really adds to the machine's memory.
pub fn pss_mb(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Count, RSS and PSS of every process whose command line is
/// `skep __shim …` for the agent whose state is under `state_dir`.
pub fn shims_rss_mb(state_dir: &Path) -> (usize, f64, f64) {
    let needle = state_dir.display().to_string();
    let mut n = 0;
    let mut total = 0.0;
    let mut pss = 0.0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("__shim") && cmd.contains(&needle) {
            n += 1;
            total += rss_mb(pid);
            pss += pss_mb(pid);
        }
    }
    (n, total, pss)
}

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the benchmark's `skep` binary inside a network namespace (only
/// the network namespace: `ip netns exec` would remount /sys and hide the
/// cgroups pods need).
pub fn spawn_in(netns: &str, args: &[String], log: &Path) -> Proc {
    let ns = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_skep"));
    cmd.args(args)
        .env(
            "SKEP_LOG",
            std::env::var("SKEP_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    // SAFETY: setns is async-signal-safe; `ns` outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(ns);
    Proc(child)
}

/// Moves the calling thread into a network namespace (the benchmark's
/// client threads talk to an API server that listens inside it).
pub fn enter_netns(netns: &str) {
    let ns = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
    // SAFETY: plain syscall on a descriptor we own.
    assert_eq!(
        unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
        0,
        "setns {netns}: {}",
        std::io::Error::last_os_error()
    );
}

/// Kills the processes in the node's cgroups (the containers) and removes
/// the cgroups and the pods' namespaces.
pub fn cleanup_node(node: &str, ipam: &Path) {
    for root in [
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/cpuacct",
        "/sys/fs/cgroup",
    ] {
        let top = Path::new(root).join(format!("skep-{node}"));
        let mut dirs = vec![];
        let mut stack = vec![top];
        while let Some(d) = stack.pop() {
            if !d.is_dir() {
                continue;
            }
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
            dirs.push(d);
        }
        for d in &dirs {
            for p in std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
            {
                if let Ok(p) = p.trim().parse::<i32>() {
                    // SAFETY: plain syscall.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
    let text = std::fs::read_to_string(ipam).unwrap_or_default();
    if let Ok(v) = serde_json::from_str::<Value>(&text) {
        for uid in v["allocations"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, u)| u.as_str())
        {
            let _ = Command::new("ip")
                .args(["netns", "del", &skep_dataplane::podnet::netns_name(uid)])
                .output();
        }
    }
}

/// Mounts a private bpffs at `dir` (once) for the benchmark's pinned maps.
pub fn ensure_bpffs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let want = dir.display().to_string();
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()));
    if !mounted {
        assert!(
            Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(dir)
                .status()
                .unwrap()
                .success()
        );
    }
}

/// p-th percentile (0..=1) by nearest rank; sorts `v`.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}
