//! `skep __shim DIR`: the supervisor of one container.
//!
//! The runtime starts it and waits for its first process, which forks the
//! real shim (a new session, stdio away from the agent, so it outlives an
//! agent restart) and exits once that one reports the container started or
//! failed to start. The shim then unshares a pid namespace and forks the
//! container's PID 1, copies its output into the CRI log, records its exit
//! in `state.json` and exits too.
//!
//! Single-threaded on purpose: it forks, and a forked child of a
//! multi-threaded process may only call async-signal-safe functions.

use super::{
    init,
    logfile::LogWriter,
    state::{
        CONFIG_FILE, ContainerConfig, ExitRecord, SHIM_LOG, STATE_FILE, ShimState,
        process_start_time, read_json, write_json,
    },
    stdio::Stdio,
};
use nix::{
    fcntl::OFlag,
    sys::wait::{WaitStatus, waitpid},
    unistd::{ForkResult, fork, pipe2},
};
use std::{
    ffi::OsString,
    fs::File,
    io::{Read, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

/// Exit code and reason for a container that could not start.
pub(crate) const START_ERROR_CODE: i32 = 128;

/// Entry point of `skep __shim DIR` (before any runtime or logging).
pub fn main(args: &[OsString]) -> i32 {
    let Some(dir) = args.first().map(PathBuf::from) else {
        eprintln!("usage: skep __shim CONTAINER_DIR");
        return 2;
    };
    let (report_rd, report_wr) = match pipe2(OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("shim: pipe: {e}");
            return 1;
        }
    };
    // SAFETY: this process is single-threaded (no runtime started yet).
    match unsafe { fork() } {
        Err(e) => {
            eprintln!("shim: fork: {e}");
            1
        }
        Ok(ForkResult::Parent { .. }) => {
            drop(report_wr);
            let mut verdict = String::new();
            let _ = File::from(report_rd).read_to_string(&mut verdict);
            match verdict.trim() {
                "ok" => 0,
                "" => {
                    eprintln!(
                        "shim: exited before reporting; see {}",
                        dir.join(SHIM_LOG).display()
                    );
                    1
                }
                other => {
                    eprintln!("{other}");
                    1
                }
            }
        }
        Ok(ForkResult::Child) => {
            drop(report_rd);
            let mut report = File::from(report_wr);
            if let Err(e) = detach(&dir) {
                let _ = write!(report, "shim: detaching: {e}");
                return 1;
            }
            match supervise(&dir, &mut report) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("shim: {e}");
                    let _ = write!(report, "shim: {e}");
                    1
                }
            }
        }
    }
}

/// New session; stdin/stdout to /dev/null, stderr to `shim.log`.
fn detach(dir: &Path) -> std::io::Result<()> {
    nix::unistd::setsid().map_err(std::io::Error::from)?;
    // Hold no directory of the agent's busy.
    std::env::set_current_dir("/")?;
    let null = File::options().read(true).write(true).open("/dev/null")?;
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.join(SHIM_LOG))?;
    for (from, to) in [
        (null.as_raw_fd(), 0),
        (null.as_raw_fd(), 1),
        (log.as_raw_fd(), 2),
    ] {
        nix::unistd::dup2(from, to).map_err(std::io::Error::from)?;
    }
    Ok(())
}

fn supervise(dir: &Path, report: &mut File) -> Result<(), String> {
    let cfg: ContainerConfig = read_json(dir, CONFIG_FILE)
        .map_err(|e| format!("reading {}: {e}", dir.join(CONFIG_FILE).display()))?
        .ok_or_else(|| format!("{} is missing", dir.join(CONFIG_FILE).display()))?;
    let mut log = LogWriter::open(&cfg.spec.log_path, cfg.log_rotation)
        .map_err(|e| format!("opening the log {}: {e}", cfg.spec.log_path.display()))?;
    let stdio = Stdio::new(&cfg, dir)?;
    let (err_rd, err_wr) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let shim_pid = std::process::id() as i32;
    let mut state = ShimState {
        shim_pid: Some(shim_pid),
        shim_start_time: process_start_time(shim_pid),
        ..ShimState::default()
    };

    // Our next child becomes PID 1 of a new pid namespace.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
        .map_err(|e| format!("unshare(CLONE_NEWPID): {e}"))?;
    // SAFETY: single-threaded process.
    let child = match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            let Stdio { child, .. } = stdio;
            init::run(&cfg, dir, child, err_wr, report.as_raw_fd())
        }
        ForkResult::Parent { child } => child,
    };
    drop(err_wr);
    let started_at = chrono::Utc::now();

    // The init writes why it failed, or nothing when its exec succeeded
    // (the pipe is close-on-exec).
    let mut failure = String::new();
    let _ = File::from(err_rd).read_to_string(&mut failure);
    if !failure.is_empty() {
        let _ = waitpid(child, None);
        stdio.drain_all(&mut log);
        let _ = log.finish();
        state.exit = Some(ExitRecord {
            exit_code: START_ERROR_CODE,
            finished_at: chrono::Utc::now(),
            reason: "StartError".into(),
            message: Some(failure),
            signal: None,
        });
        write_json(dir, STATE_FILE, &state).map_err(|e| format!("writing state: {e}"))?;
        let _ = report.write_all(b"ok");
        return Ok(());
    }
    state.pid = Some(child.as_raw());
    state.pid_start_time = process_start_time(child.as_raw());
    state.started_at = Some(started_at);
    write_json(dir, STATE_FILE, &state).map_err(|e| format!("writing state: {e}"))?;
    let _ = report.write_all(b"ok");
    // The runtime's wait ends when the last copy of the pipe closes:
    // replace ours by a copy of /dev/null (fd 0).
    let _ = nix::unistd::dup2(0, report.as_raw_fd());

    let status = stdio.pump(child, &mut log);
    let _ = log.finish();
    let oom = cfg.cgroup.oom_kills() > 0;
    let (exit_code, signal) = match status {
        WaitStatus::Exited(_, code) => (code, None),
        WaitStatus::Signaled(_, sig, _) => (128 + sig as i32, Some(sig as i32)),
        _ => (255, None),
    };
    let reason = if oom {
        "OOMKilled"
    } else if exit_code == 0 {
        "Completed"
    } else {
        "Error"
    };
    state.exit = Some(ExitRecord {
        exit_code,
        finished_at: chrono::Utc::now(),
        reason: reason.into(),
        message: None,
        signal,
    });
    write_json(dir, STATE_FILE, &state).map_err(|e| format!("writing state: {e}"))
}
