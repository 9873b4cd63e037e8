//! The container's stdio on the shim's side: output pipes (or a pty
//! master) copied into the CRI log, stdin fed from `stdin.fifo` (where
//! attach writes), resizes from `control.fifo`.
//!
//! stdin is a pipe the shim writes, not the FIFO itself, so the shim
//! decides when the container sees EOF: with `stdinOnce`, when the first
//! attached writer goes away (as `kubectl run -i --rm` expects); else never
//! (later attaches write again).

use super::{
    logfile::{LogWriter, Stream},
    state::{CONTROL_FIFO, ContainerConfig, STDIN_FIFO},
    tty,
};
use nix::{
    fcntl::OFlag,
    sys::wait::{WaitPidFlag, WaitStatus, waitpid},
    unistd::{Pid, pipe2},
};
use std::{
    fs::File,
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::fs::OpenOptionsExt,
    },
    path::{Path, PathBuf},
};

/// ASCII EOT: end of input on a terminal in canonical mode.
const EOT: u8 = 0x04;

pub(crate) struct Stdio {
    /// What the container gets as fds 0, 1, 2.
    pub child: [OwnedFd; 3],
    /// Output to copy into the log. With a tty only the master, as stdout.
    outputs: Vec<(OwnedFd, Stream)>,
    /// With a tty: the master (for resizes).
    master: Option<RawFd>,
    stdin: Option<StdinFeed>,
    /// With a tty: `COLS ROWS` lines for resizes.
    control: Option<OwnedFd>,
    control_path: Option<PathBuf>,
}

/// Moves what attach writes into the FIFO to the container's stdin.
struct StdinFeed {
    fifo_path: PathBuf,
    /// The FIFO, read side, non-blocking.
    fifo: Option<OwnedFd>,
    /// The container's stdin: a pipe's write end, or (tty) the master.
    target: Option<OwnedFd>,
    /// Read from the FIFO, not yet taken by the container.
    pending: Vec<u8>,
    once: bool,
    tty: bool,
}

fn open_fifo_reader(path: &Path) -> Result<OwnedFd, String> {
    // Non-blocking: opening for reading must not wait for a writer.
    File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|e| format!("opening {}: {e}", path.display()))
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

fn devnull() -> Result<OwnedFd, String> {
    File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| format!("/dev/null: {e}"))
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd, String> {
    fd.try_clone().map_err(|e| format!("dup: {e}"))
}

impl Stdio {
    pub(crate) fn new(cfg: &ContainerConfig, dir: &Path) -> Result<Self, String> {
        let fifo_path = dir.join(STDIN_FIFO);
        let feed = |target: OwnedFd, tty: bool| -> Result<StdinFeed, String> {
            set_nonblocking(target.as_raw_fd());
            Ok(StdinFeed {
                fifo: Some(open_fifo_reader(&fifo_path)?),
                fifo_path: fifo_path.clone(),
                target: Some(target),
                pending: Vec::new(),
                once: cfg.spec.stdin_once,
                tty,
            })
        };
        if cfg.spec.tty {
            let (master, slave) = tty::open().map_err(|e| format!("allocating a pty: {e}"))?;
            let stdin = if cfg.spec.stdin {
                Some(feed(dup(&master)?, true)?)
            } else {
                None
            };
            let control_path = dir.join(CONTROL_FIFO);
            let control = open_fifo_reader(&control_path).ok();
            let raw = master.as_raw_fd();
            Ok(Self {
                child: [dup(&slave)?, dup(&slave)?, slave],
                outputs: vec![(master, Stream::Stdout)],
                master: Some(raw),
                stdin,
                control,
                control_path: Some(control_path),
            })
        } else {
            let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
            let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
            let (child_stdin, stdin) = if cfg.spec.stdin {
                let (in_r, in_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
                (in_r, Some(feed(in_w, false)?))
            } else {
                (devnull()?, None)
            };
            Ok(Self {
                child: [child_stdin, out_w, err_w],
                outputs: vec![(out_r, Stream::Stdout), (err_r, Stream::Stderr)],
                master: None,
                stdin,
                control: None,
                control_path: None,
            })
        }
    }

    /// After a failed start: whatever the init printed goes to the log.
    pub(crate) fn drain_all(&self, log: &mut LogWriter) {
        for (fd, stream) in &self.outputs {
            set_nonblocking(fd.as_raw_fd());
            drain(fd.as_raw_fd(), *stream, log);
        }
    }

    /// Copies output to the log, stdin and resizes to the container, until
    /// the container's PID 1 (`child`) exits; returns its status.
    pub(crate) fn pump(self, child: Pid, log: &mut LogWriter) -> WaitStatus {
        let Self {
            child: child_fds,
            outputs,
            master,
            mut stdin,
            mut control,
            control_path,
        } = self;
        drop(child_fds);
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
                .map(|(fd, _)| pollfd(*fd, libc::POLLIN))
                .collect();
            // Then, in this order: the FIFO (when there is room to take
            // more), the stdin target (when data waits), the control FIFO.
            let fifo_at = stdin.as_ref().and_then(|s| {
                let fd = s.fifo.as_ref()?.as_raw_fd();
                s.pending.is_empty().then(|| {
                    fds.push(pollfd(fd, libc::POLLIN));
                    fds.len() - 1
                })
            });
            let target_at = stdin.as_ref().and_then(|s| {
                let fd = s.target.as_ref()?.as_raw_fd();
                (!s.pending.is_empty()).then(|| {
                    fds.push(pollfd(fd, libc::POLLOUT));
                    fds.len() - 1
                })
            });
            let control_at = control.as_ref().map(|c| {
                fds.push(pollfd(c.as_raw_fd(), libc::POLLIN));
                fds.len() - 1
            });
            // Once the output has ended PID 1 is usually about to be
            // reaped: look more often for a second (a PID 1 that merely
            // closed its stdout then gets the slow pace again).
            let timeout = if open.is_empty() && fast_polls < 50 {
                fast_polls += 1;
                20
            } else {
                500
            };
            // SAFETY: fds is a valid array of pollfd of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n > 0 {
                let mut closed = Vec::new();
                for (i, (fd, stream)) in open.iter().enumerate() {
                    if fds[i].revents != 0 && !drain(*fd, *stream, log) {
                        closed.push(*fd);
                    }
                }
                open.retain(|(fd, _)| !closed.contains(fd));
                if let Some(feed) = stdin.as_mut() {
                    if let Some(i) = fifo_at
                        && fds[i].revents != 0
                    {
                        feed.read_fifo(fds[i].revents);
                    }
                    if let Some(i) = target_at
                        && fds[i].revents != 0
                    {
                        feed.flush();
                    }
                    feed.flush();
                }
                if let (Some(i), Some(c), Some(m)) = (control_at, control.as_ref(), master)
                    && fds[i].revents != 0
                {
                    let mut buf = [0u8; 512];
                    // SAFETY: reading into a buffer of the given length.
                    let got =
                        unsafe { libc::read(c.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if got > 0 {
                        control_buf.extend_from_slice(&buf[..got as usize]);
                        apply_resizes(m, &mut control_buf);
                    } else if got == 0 {
                        // The writer left: reopen, or the hang-up repeats.
                        control = control_path
                            .as_deref()
                            .and_then(|p| open_fifo_reader(p).ok());
                    }
                }
            }
            match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {}
                Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    // Everything in the pid namespace is gone now; take
                    // what is left in the pipes.
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
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

impl StdinFeed {
    /// Takes what a writer put in the FIFO; notices the writer leaving.
    fn read_fifo(&mut self, revents: libc::c_short) {
        let Some(fifo) = self.fifo.as_ref() else {
            return;
        };
        let mut buf = [0u8; 16 * 1024];
        // SAFETY: reading into a buffer of the given length.
        let n = unsafe { libc::read(fifo.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            self.pending.extend_from_slice(&buf[..n as usize]);
            return;
        }
        // n == 0 (or POLLHUP alone): every writer has gone.
        if n == 0 || revents & libc::POLLHUP != 0 {
            self.writer_left();
        }
    }

    fn writer_left(&mut self) {
        if self.once {
            // stdinOnce: the container's stdin ends with the first attach.
            self.fifo = None;
            if self.tty {
                self.pending.push(EOT);
            } else {
                self.close_when_flushed();
            }
            return;
        }
        // A FIFO reports the hang-up until reopened; a new reader opened
        // before the old one closes keeps any buffered data and the FIFO
        // open for the next writer.
        match open_fifo_reader(&self.fifo_path) {
            Ok(fresh) => self.fifo = Some(fresh),
            Err(e) => {
                eprintln!("shim: {e}");
                self.fifo = None;
            }
        }
    }

    fn close_when_flushed(&mut self) {
        if self.pending.is_empty() && self.fifo.is_none() {
            self.target = None;
        }
    }

    /// Writes pending data to the container's stdin as far as it takes it.
    fn flush(&mut self) {
        let Some(target) = self.target.as_ref() else {
            self.pending.clear();
            return;
        };
        while !self.pending.is_empty() {
            // SAFETY: writing from a valid buffer.
            let n = unsafe {
                libc::write(
                    target.as_raw_fd(),
                    self.pending.as_ptr().cast(),
                    self.pending.len(),
                )
            };
            if n <= 0 {
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
                    // The container closed its stdin: nothing more goes in.
                    self.pending.clear();
                    self.target = None;
                }
                return;
            }
            self.pending.drain(..n as usize);
        }
        if !self.tty && self.once {
            self.close_when_flushed();
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
