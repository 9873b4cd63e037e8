//! Socket options the standard library does not wrap: the socket cookie
//! (the key the eBPF capture uses), the mark on the sidecar's own
//! connections (so the capture lets them through) and netfilter's
//! original destination.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, RawFd},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};
use tokio::net::{TcpSocket, TcpStream};

/// The mark on every connection the sidecar opens itself (SO_MARK). The
/// connect4 capture program exempts sockets carrying it, so the sidecar's
/// upstream connections are not redirected back to itself. Setting a mark
/// needs CAP_NET_ADMIN in the pod's network namespace.
pub const SIDECAR_MARK: u32 = 0x5ce9;

/// SO_COOKIE: the kernel's 64-bit id of a socket (what
/// `bpf_get_socket_cookie` returns for it).
pub fn socket_cookie(fd: RawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given,
    // and the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Netfilter's original destination (iptables REDIRECT/DNAT), IPv4.
pub fn netfilter_original_dst(fd: RawFd) -> io::Result<SocketAddrV4> {
    // SAFETY: an all-zero sockaddr_in is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SO_ORIGINAL_DST (linux/netfilter_ipv4.h) is 80 on SOL_IP.
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: `addr` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

fn set_mark(fd: RawFd, mark: u32) -> io::Result<()> {
    // SAFETY: `mark` is a valid u32 for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

static MARK_WARNED: AtomicBool = AtomicBool::new(false);

/// Connects with the sidecar's mark. Without the permission to mark, the
/// connection is still made (and a warning logged once): outside a
/// captured pod that is harmless, inside one the capture must exempt the
/// sidecar by another means.
pub async fn connect_marked(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Err(e) = set_mark(socket.as_raw_fd(), SIDECAR_MARK)
        && !MARK_WARNED.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(error = %e, "cannot mark the sidecar's connections (SO_MARK needs CAP_NET_ADMIN); traffic capture cannot exempt them by mark");
    }
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {addr}")))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The mark a socket carries (tests check the sidecar's own).
pub fn socket_mark(fd: RawFd) -> io::Result<u32> {
    let mut mark: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: `mark` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mut mark as *mut u32).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(mark)
}
