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
    logfile::{LogWriter, Stream},
    state::{
        CONFIG_FILE, CONTROL_FIFO, ContainerConfig, ExitRecord, SHIM_LOG, STATE_FILE, STDIN_FIFO,
        ShimState, process_start_time, read_json, write_json,
    },
    tty,
};
use nix::{
    fcntl::OFlag,
    sys::wait::{WaitPidFlag, WaitStatus, waitpid},
    unistd::{ForkResult, Pid, fork, pipe2},
};
use std::{
    ffi::OsString,
    fs::File,
    io::{Read, Write},
    os::fd::{AsRawFd, OwnedFd, RawFd},
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

/// The container's stdio as the shim sees it.
struct Stdio {
    /// What the container gets as fds 0, 1, 2.
    child: [OwnedFd; 3],
    /// Output to copy into the log: (fd, stream). With a tty only the
    /// master, as stdout.
    outputs: Vec<(OwnedFd, Stream)>,
    /// With a tty: the master (to forward stdin and apply resizes).
    master: Option<RawFd>,
    /// With a tty and stdin: the FIFO whose data goes to the master.
    stdin_fifo: Option<OwnedFd>,
    /// With a tty: `COLS ROWS` lines for resizes.
    control: Option<OwnedFd>,
}

fn open_fifo(path: &Path) -> Result<OwnedFd, String> {
    // O_RDWR: never blocks and never sees EOF when a writer goes away.
    File::options()
        .read(true)
        .write(true)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|e| format!("opening {}: {e}", path.display()))
}

fn make_stdio(cfg: &ContainerConfig, dir: &Path) -> Result<Stdio, String> {
    let devnull = || {
        File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|e| format!("/dev/null: {e}"))
    };
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("dup: {e}"));
    if cfg.spec.tty {
        let (master, slave) = tty::open().map_err(|e| format!("allocating a pty: {e}"))?;
        let stdin_fifo = if cfg.spec.stdin {
            Some(open_fifo(&dir.join(STDIN_FIFO))?)
        } else {
            None
        };
        let control = open_fifo(&dir.join(CONTROL_FIFO)).ok();
        let raw = master.as_raw_fd();
        Ok(Stdio {
            child: [dup(&slave)?, dup(&slave)?, slave],
            outputs: vec![(master, Stream::Stdout)],
            master: Some(raw),
            stdin_fifo,
            control,
        })
    } else {
        let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let stdin = if cfg.spec.stdin {
            open_fifo(&dir.join(STDIN_FIFO))?
        } else {
            devnull()?
        };
        Ok(Stdio {
            child: [stdin, out_w, err_w],
            outputs: vec![(out_r, Stream::Stdout), (err_r, Stream::Stderr)],
            master: None,
            stdin_fifo: None,
            control: None,
        })
    }
}

fn supervise(dir: &Path, report: &mut File) -> Result<(), String> {
    let cfg: ContainerConfig = read_json(dir, CONFIG_FILE)
        .map_err(|e| format!("reading {}: {e}", dir.join(CONFIG_FILE).display()))?
        .ok_or_else(|| format!("{} is missing", dir.join(CONFIG_FILE).display()))?;
    let mut log = LogWriter::open(&cfg.spec.log_path)
        .map_err(|e| format!("opening the log {}: {e}", cfg.spec.log_path.display()))?;
    let stdio = make_stdio(&cfg, dir)?;
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
    let Stdio {
        child: child_fds,
        outputs,
        master,
        stdin_fifo,
        control,
    } = stdio;
    drop(child_fds);
    drop(err_wr);
    let started_at = chrono::Utc::now();

    // The init writes why it failed, or nothing when its exec succeeded
    // (the pipe is close-on-exec).
    let mut failure = String::new();
    let _ = File::from(err_rd).read_to_string(&mut failure);
    if !failure.is_empty() {
        let _ = waitpid(child, None);
        for (fd, stream) in &outputs {
            drain(fd.as_raw_fd(), *stream, &mut log);
        }
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

    let status = pump(child, outputs, master, stdin_fifo, control, &mut log);
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

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// Reads what is available from `fd` into the log; false at EOF (or EIO
/// from a pty whose other side is gone).
fn drain(fd: RawFd, stream: Stream, log: &mut LogWriter) -> bool {
    let mut buf = [0u8; 32 * 1024];
    loop {
        // SAFETY: reading into a buffer of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            if let Err(e) = log.write(stream, &buf[..n as usize]) {
                eprintln!("shim: writing the log: {e}");
            }
            continue;
        }
        if n == 0 {
            return false;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) => return true,
            Some(libc::EINTR) => continue,
            _ => return false,
        }
    }
}

/// Copies output to the log (and, with a tty, stdin and resizes to the
/// master) until the container's PID 1 has exited; returns its status.
fn pump(
    child: Pid,
    outputs: Vec<(OwnedFd, Stream)>,
    master: Option<RawFd>,
    stdin_fifo: Option<OwnedFd>,
    control: Option<OwnedFd>,
    log: &mut LogWriter,
) -> WaitStatus {
    let mut open: Vec<(RawFd, Stream)> =
        outputs.iter().map(|(fd, s)| (fd.as_raw_fd(), *s)).collect();
    for (fd, _) in &open {
        set_nonblocking(*fd);
    }
    let mut control_buf = Vec::new();
    let mut fast_polls = 0;
    loop {
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|(fd, _)| libc::pollfd {
                fd: *fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let extra: Vec<RawFd> = stdin_fifo
            .iter()
            .chain(control.iter())
            .map(AsRawFd::as_raw_fd)
            .collect();
        for fd in &extra {
            fds.push(libc::pollfd {
                fd: *fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // Once the output has ended, PID 1 is usually about to be reaped:
        // look more often for a second (a PID 1 that merely closed its
        // stdout then gets the slow pace again).
        let timeout = if open.is_empty() && fast_polls < 50 {
            fast_polls += 1;
            20
        } else {
            500
        };
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n > 0 {
            let base = open.len();
            let mut closed = Vec::new();
            for (i, (fd, stream)) in open.iter().enumerate() {
                if fds[i].revents != 0 && !drain(*fd, *stream, log) {
                    closed.push(*fd);
                }
            }
            open.retain(|(fd, _)| !closed.contains(fd));
            for (i, fd) in extra.iter().enumerate() {
                if fds[base + i].revents == 0 {
                    continue;
                }
                let mut buf = [0u8; 4096];
                // SAFETY: reading into a buffer of the given length.
                let got = unsafe { libc::read(*fd, buf.as_mut_ptr().cast(), buf.len()) };
                if got <= 0 {
                    continue;
                }
                let data = &buf[..got as usize];
                if Some(*fd) == stdin_fifo.as_ref().map(AsRawFd::as_raw_fd) {
                    if let Some(m) = master {
                        write_all(m, data);
                    }
                } else if let Some(m) = master {
                    control_buf.extend_from_slice(data);
                    apply_resizes(m, &mut control_buf);
                }
            }
        }
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {}
            Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                // Everything in the pid namespace is gone now; take what
                // is left in the pipes.
                for (fd, stream) in &open {
                    drain(*fd, *stream, log);
                }
                return status;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("shim: waitpid: {e}");
                return WaitStatus::Exited(child, 255);
            }
        }
    }
}

fn write_all(fd: RawFd, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: writing from a valid buffer.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n <= 0 {
            return;
        }
        data = &data[n as usize..];
    }
}

/// Applies complete `COLS ROWS` lines to the terminal.
fn apply_resizes(master: RawFd, buf: &mut Vec<u8>) {
    while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = buf.drain(..=pos).collect();
        let text = String::from_utf8_lossy(&line);
        let mut it = text.split_whitespace().map(|v| v.parse::<u16>());
        if let (Some(Ok(cols)), Some(Ok(rows))) = (it.next(), it.next()) {
            tty::set_winsize(master, cols, rows);
        }
    }
}
