//! `kubectl exec` for process containers.
//!
//! The runtime starts `skep __exec --pid PID [--tty] -- CMD…`, a small
//! single-threaded helper that joins the container's cgroup and
//! namespaces (mount, UTS, IPC, network, pid), forks (a pid namespace only
//! applies to children), takes the container's root, working directory,
//! credentials and environment, and execs the command; it exits with the
//! command's status.

use super::rootfs::DEFAULT_PATH;
use nix::{
    sched::{CloneFlags, setns},
    sys::wait::{WaitStatus, waitpid},
    unistd::{ForkResult, Gid, Uid, fork},
};
use std::{
    ffi::{CString, OsString},
    fs::File,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::Path,
};

/// Exit code when the helper itself fails (like `docker exec`'s 126/127).
const CANNOT_EXEC: i32 = 126;
const NOT_FOUND: i32 = 127;

/// Entry point of `skep __exec` (before any runtime or logging).
pub fn main(args: &[OsString]) -> i32 {
    let mut pid = None;
    let mut tty = false;
    let mut it = args.iter();
    let mut cmd = Vec::new();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--pid") => pid = it.next().and_then(|p| p.to_str()?.parse::<i32>().ok()),
            Some("--tty") => tty = true,
            Some("--") => {
                cmd = it.by_ref().cloned().collect();
                break;
            }
            _ => {
                eprintln!("skep __exec: unexpected argument {a:?}");
                return 2;
            }
        }
    }
    let Some(pid) = pid else {
        eprintln!("usage: skep __exec --pid PID [--tty] -- CMD...");
        return 2;
    };
    if cmd.is_empty() {
        eprintln!("skep __exec: no command");
        return 2;
    }
    match run(pid, tty, &cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("exec: {e}");
            CANNOT_EXEC
        }
    }
}

/// Credentials of the container's process, from /proc/PID/status.
struct Creds {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

fn read_creds(pid: i32) -> Result<Creds, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("container process {pid}: {e}"))?;
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| {
                rest.split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(Creds {
        uid: field("Uid:").first().copied().unwrap_or(0),
        gid: field("Gid:").first().copied().unwrap_or(0),
        groups: field("Groups:"),
    })
}

/// Joins every cgroup hierarchy the container's process is in (needs the
/// host's /sys/fs/cgroup, so before entering the mount namespace).
fn join_cgroups(pid: i32) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return;
    };
    let unified_root = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "/sys/fs/cgroup".to_owned()
    } else {
        "/sys/fs/cgroup/unified".to_owned()
    };
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        if path == "/" {
            continue;
        }
        let base = if controllers.is_empty() {
            unified_root.clone()
        } else {
            let name = controllers.trim_start_matches("name=");
            let joined = format!("/sys/fs/cgroup/{name}");
            if Path::new(&joined).exists() {
                joined
            } else {
                format!("/sys/fs/cgroup/{}", name.split(',').next().unwrap_or(name))
            }
        };
        let procs = format!("{base}{path}/cgroup.procs");
        // Best effort per hierarchy: the ones that matter (memory, cpu)
        // are ours and writable.
        let _ = std::fs::write(procs, std::process::id().to_string());
    }
}

fn run(pid: i32, tty: bool, cmd: &[OsString]) -> Result<i32, String> {
    let open = |what: &str| {
        File::open(format!("/proc/{pid}/{what}"))
            .map_err(|e| format!("container process {pid}: {what}: {e}"))
    };
    // Everything of the container's is opened before entering any of its
    // namespaces.
    let namespaces = [
        ("ns/ipc", CloneFlags::CLONE_NEWIPC),
        ("ns/uts", CloneFlags::CLONE_NEWUTS),
        ("ns/net", CloneFlags::CLONE_NEWNET),
        ("ns/pid", CloneFlags::CLONE_NEWPID),
        ("ns/mnt", CloneFlags::CLONE_NEWNS),
    ]
    .into_iter()
    .map(|(p, f)| open(p).map(|file| (p, file, f)))
    .collect::<Result<Vec<_>, _>>()?;
    let root = open("root")?;
    let cwd = open("cwd")?;
    let environ = std::fs::read(format!("/proc/{pid}/environ"))
        .map_err(|e| format!("container process {pid}: environ: {e}"))?;
    let creds = read_creds(pid)?;
    join_cgroups(pid);
    for (name, file, flag) in &namespaces {
        setns(file, *flag).map_err(|e| format!("entering {name}: {e}"))?;
    }
    let env: Vec<CString> = environ
        .split(|&b| b == 0)
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| CString::new(kv).ok())
        .collect();
    // SAFETY: single-threaded process.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            let err = child(&root, &cwd, tty, &creds, &env, cmd);
            eprintln!("exec: {}", err.1);
            // SAFETY: leave without running the parent's exit handlers.
            unsafe { libc::_exit(err.0) }
        }
        ForkResult::Parent { child } => {
            drop(root);
            drop(cwd);
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(format!("waitpid: {e}")),
                }
            }
        }
    }
}

/// In the container's pid namespace: root, cwd, tty, credentials, exec.
/// Returns only on failure: (exit code, message).
fn child(
    root: &File,
    cwd: &File,
    tty: bool,
    creds: &Creds,
    env: &[CString],
    cmd: &[OsString],
) -> (i32, String) {
    let step = || -> Result<(), String> {
        nix::unistd::fchdir(root.as_raw_fd()).map_err(|e| format!("entering the root: {e}"))?;
        nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
        nix::unistd::fchdir(cwd.as_raw_fd())
            .map_err(|e| format!("entering the working directory: {e}"))?;
        if tty {
            nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
            // SAFETY: TIOCSCTTY on stdin (the pty slave) as session leader.
            if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
                return Err(format!(
                    "setting the controlling terminal: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        let groups: Vec<Gid> = creds.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        nix::unistd::setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
        nix::unistd::setgid(Gid::from_raw(creds.gid)).map_err(|e| format!("setgid: {e}"))?;
        nix::unistd::setuid(Uid::from_raw(creds.uid)).map_err(|e| format!("setuid: {e}"))?;
        Ok(())
    };
    if let Err(e) = step() {
        return (CANNOT_EXEC, e);
    }
    // SIGPIPE is ignored in this (Rust) process; the command must not
    // inherit that.
    // SAFETY: restoring the default disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let name = cmd[0].as_bytes();
    let path_env = env
        .iter()
        .find_map(|kv| kv.to_bytes().strip_prefix(b"PATH="))
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_else(|| DEFAULT_PATH.to_owned());
    let mut candidates: Vec<Vec<u8>> = if name.contains(&b'/') {
        vec![name.to_vec()]
    } else {
        path_env
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| [d.as_bytes(), b"/", name].concat())
            .collect()
    };
    // As for a container's command: in a host-image container `skep` is
    // the built-in one when the PATH has none.
    if name == b"skep" {
        candidates.push(super::rootfs::SKEP_IN_CONTAINER.as_bytes().to_vec());
    }
    let argv: Vec<CString> = cmd
        .iter()
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    let display = String::from_utf8_lossy(name).into_owned();
    let mut last = None;
    for c in candidates {
        let Ok(path) = CString::new(c) else { continue };
        let e = match nix::unistd::execve(&path, &argv, env) {
            Ok(never) => match never {},
            Err(e) => e,
        };
        // Keep the most telling error: anything beats "not found".
        if last.is_none() || e != nix::errno::Errno::ENOENT {
            last = Some(e);
        }
    }
    match last {
        Some(nix::errno::Errno::ENOENT) | None => (
            NOT_FOUND,
            format!("{display:?}: executable file not found in $PATH"),
        ),
        Some(e) => (CANNOT_EXEC, format!("{display:?}: {}", e.desc())),
    }
}
