//! Pseudo-terminals for `tty: true` containers and `exec -t`.

use nix::{fcntl::OFlag, pty};
use std::os::{
    fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd},
    unix::fs::OpenOptionsExt,
};

/// A new pty pair, both ends close-on-exec: openpty(3) leaves them
/// inheritable, and a stray copy of the slave in some other child (the
/// agent spawns processes concurrently) would keep the terminal from ever
/// reporting its end.
pub(crate) fn open() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let master = pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    pty::grantpt(&master)?;
    pty::unlockpt(&master)?;
    let name = pty::ptsname_r(&master)?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(name)?;
    // SAFETY: into_raw_fd hands over sole ownership of the fd.
    let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
    Ok((master, OwnedFd::from(slave)))
}

/// Sets the terminal size (TIOCSWINSZ).
pub(crate) fn set_winsize(fd: RawFd, cols: u16, rows: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ with a valid winsize on a terminal fd.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}
