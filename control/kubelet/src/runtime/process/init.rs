//! The container's PID 1 between fork and exec: cgroup, namespaces, root
//! filesystem, credentials, then the container's program. Any failure is
//! written to the error pipe (which the shim records as `StartError`).

use super::{rootfs, shim::START_ERROR_CODE, state::ContainerConfig};
use nix::{
    sched::{CloneFlags, setns, unshare},
    unistd::{Gid, Uid},
};
use std::{
    ffi::CString,
    io::Write,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::Path,
};

/// Never returns: execs the container's program or exits with the error.
pub(crate) fn run(
    cfg: &ContainerConfig,
    dir: &Path,
    stdio: [OwnedFd; 3],
    err_wr: OwnedFd,
    report_fd: RawFd,
) -> ! {
    // SAFETY: closing the shim's report pipe, which this process must not
    // hold (the runtime waits for its last copy to close).
    unsafe { libc::close(report_fd) };
    let err = match setup(cfg, dir, stdio) {
        Ok(()) => exec(cfg),
        Err(e) => e,
    };
    let mut pipe = std::fs::File::from(err_wr);
    let _ = pipe.write_all(err.as_bytes());
    drop(pipe);
    // SAFETY: _exit skips atexit handlers that belong to the shim.
    unsafe { libc::_exit(START_ERROR_CODE) }
}

fn reset_signals() {
    // The shim (a Rust binary) ignores SIGPIPE; an ignored signal stays
    // ignored across exec, which the container must not inherit.
    for sig in 1..32 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: restoring the default disposition.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    // SAFETY: an empty mask unblocks everything.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

fn setup(cfg: &ContainerConfig, dir: &Path, stdio: [OwnedFd; 3]) -> Result<(), String> {
    reset_signals();
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    for (target, fd) in stdio.iter().enumerate() {
        nix::unistd::dup2(fd.as_raw_fd(), target as RawFd)
            .map_err(|e| format!("setting up stdio: {e}"))?;
    }
    drop(stdio);
    if cfg.spec.tty {
        // SAFETY: TIOCSCTTY on our stdin, the pty slave, as session leader.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(format!(
                "setting the controlling terminal: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    // Join the cgroup first, while still privileged.
    cfg.cgroup
        .join_self()
        .map_err(|e| format!("joining the cgroup: {e}"))?;
    if let Some(netns) = &cfg.spec.netns {
        let ns = std::fs::File::open(netns)
            .map_err(|e| format!("opening network namespace {}: {e}", netns.display()))?;
        setns(&ns, CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering network namespace {}: {e}", netns.display()))?;
    }
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC)
        .map_err(|e| format!("unshare(mount, uts, ipc): {e}"))?;
    if !cfg.spec.hostname.is_empty() {
        nix::unistd::sethostname(&cfg.spec.hostname)
            .map_err(|e| format!("setting the hostname {:?}: {e}", cfg.spec.hostname))?;
    }
    rootfs::build_and_enter(cfg, dir)?;
    let groups: Vec<Gid> = cfg
        .spec
        .supplemental_groups
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
    let gid = Gid::from_raw(cfg.spec.run_as_group.unwrap_or(0));
    nix::unistd::setgid(gid).map_err(|e| format!("setgid({gid}): {e}"))?;
    let uid = Uid::from_raw(cfg.spec.run_as_user.unwrap_or(0));
    nix::unistd::setuid(uid).map_err(|e| format!("setuid({uid}): {e}"))?;
    if let Err(e) = std::env::set_current_dir(&cfg.cwd) {
        // Like runc: a missing working directory is created when it can be.
        std::fs::create_dir_all(&cfg.cwd)
            .and_then(|()| std::env::set_current_dir(&cfg.cwd))
            .map_err(|_| format!("chdir to {:?}: {e}", cfg.cwd))?;
    }
    Ok(())
}

fn cstring(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

/// execve with exactly the container's environment; returns the error.
fn exec(cfg: &ContainerConfig) -> String {
    let argv0 = cfg.argv.first().cloned().unwrap_or_default();
    let build = || -> Result<(CString, Vec<CString>, Vec<CString>), String> {
        let exe = cstring(&cfg.exe)?;
        let argv = cfg
            .argv
            .iter()
            .map(|a| cstring(a))
            .collect::<Result<Vec<_>, _>>()?;
        let env = cfg
            .spec
            .env
            .iter()
            .map(|(k, v)| cstring(&format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((exe, argv, env))
    };
    match build() {
        Ok((exe, argv, env)) => match nix::unistd::execve(&exe, &argv, &env) {
            Ok(never) => match never {},
            Err(e) => format!("exec: {argv0:?}: {}", e.desc().to_lowercase()),
        },
        Err(e) => e,
    }
}
