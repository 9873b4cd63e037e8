//! Seams between the proxy and the traffic capture: where a redirected
//! connection was going, and whether a destination runs a sidecar.
//!
//! The eBPF capture (cgroup connect4 on the pod's cgroup) rewrites the
//! app's `connect()` to the sidecar's outbound port and records the
//! original destination in a map. [`CookieMapDst`] reads such a map
//! through a [`CookieLookup`]: it is given the accepted socket's cookie
//! (SO_COOKIE) and the app socket's address (the accepted socket's peer),
//! so the program may key its map either way (e.g. connect4 keyed by the
//! app socket's cookie, then sockops re-keying the entry by the app's
//! local port once it is established).

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    sync::Mutex,
};
use tokio::net::TcpStream;

/// Where a captured connection was originally going.
pub trait OriginalDst: Send + Sync + std::fmt::Debug {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddrV4>;
}

/// Whether a destination is meshed (runs a sidecar that accepts mTLS on
/// its inbound port). Later fed from pod annotations through the API.
pub trait MeshedPeers: Send + Sync + std::fmt::Debug {
    fn is_meshed(&self, ip: Ipv4Addr) -> bool;
}

fn v4(addr: SocketAddr) -> io::Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, a.port()))
            .ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "IPv6 is not meshed")),
    }
}

/// Reads an original-destination map.
pub trait CookieLookup: Send + Sync {
    fn lookup(&self, cookie: u64, peer: SocketAddrV4) -> Option<SocketAddrV4>;
}

impl<F> CookieLookup for F
where
    F: Fn(u64, SocketAddrV4) -> Option<SocketAddrV4> + Send + Sync,
{
    fn lookup(&self, cookie: u64, peer: SocketAddrV4) -> Option<SocketAddrV4> {
        self(cookie, peer)
    }
}

/// The eBPF capture's answer: a map lookup by socket cookie / app address.
pub struct CookieMapDst<L: CookieLookup>(pub L);

impl<L: CookieLookup> std::fmt::Debug for CookieMapDst<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieMapDst")
    }
}

impl<L: CookieLookup> OriginalDst for CookieMapDst<L> {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddrV4> {
        let cookie = crate::net::socket_cookie(stream.as_raw_fd())?;
        let peer = v4(stream.peer_addr()?)?;
        self.0.lookup(cookie, peer).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no original destination recorded for {peer} (cookie {cookie})"),
            )
        })
    }
}

/// Netfilter REDIRECT/DNAT (SO_ORIGINAL_DST), for hosts capturing with
/// iptables until the eBPF capture lands.
#[derive(Debug, Default)]
pub struct NetfilterDst;

impl OriginalDst for NetfilterDst {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddrV4> {
        crate::net::netfilter_original_dst(stream.as_raw_fd())
    }
}

/// No redirection: the address the client connected to.
#[derive(Debug, Default)]
pub struct LocalAddrDst;

impl OriginalDst for LocalAddrDst {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddrV4> {
        v4(stream.local_addr()?)
    }
}

/// A table by the app socket's address, filled in by whoever redirected
/// (tests; a userspace capture).
#[derive(Debug, Default)]
pub struct PeerTable(Mutex<HashMap<SocketAddrV4, SocketAddrV4>>);

impl PeerTable {
    pub fn insert(&self, app: SocketAddrV4, original: SocketAddrV4) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(app, original);
    }
}

impl OriginalDst for PeerTable {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddrV4> {
        let peer = v4(stream.peer_addr()?)?;
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer)
            .copied()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no original destination for {peer}"),
                )
            })
    }
}

/// Meshed destinations by address range.
#[derive(Debug, Default, Clone)]
pub struct StaticMeshedPeers {
    hosts: HashSet<Ipv4Addr>,
    nets: Vec<(Ipv4Addr, u8)>,
}

impl StaticMeshedPeers {
    /// From `a.b.c.d` and `a.b.c.d/len` entries.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut out = Self::default();
        for e in entries {
            match e.split_once('/') {
                Some((ip, len)) => {
                    let ip: Ipv4Addr =
                        ip.parse().map_err(|_| format!("{e:?}: not an IPv4 CIDR"))?;
                    let len: u8 = len
                        .parse()
                        .ok()
                        .filter(|l| *l <= 32)
                        .ok_or_else(|| format!("{e:?}: bad prefix length"))?;
                    out.nets.push((ip, len));
                }
                None => {
                    out.hosts.insert(
                        e.parse()
                            .map_err(|_| format!("{e:?}: not an IPv4 address"))?,
                    );
                }
            }
        }
        Ok(out)
    }

    pub fn hosts(hosts: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        Self {
            hosts: hosts.into_iter().collect(),
            nets: Vec::new(),
        }
    }
}

impl MeshedPeers for StaticMeshedPeers {
    fn is_meshed(&self, ip: Ipv4Addr) -> bool {
        self.hosts.contains(&ip)
            || self.nets.iter().any(|(net, len)| {
                let mask = if *len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(*len))
                };
                u32::from(ip) & mask == u32::from(*net) & mask
            })
    }
}

/// File names of the eBPF capture's pinned maps (in the directory the
/// kubelet mounts into the sidecar container, `--capture-maps`).
pub const MESH_ORIG_MAP: &str = "SKEP_MESH_ORIG";
pub const MESH_PODS_MAP: &str = "SKEP_MESH_PODS";
/// `MESH_POD_F_MESHED` of the capture's pod table.
const MESH_POD_F_MESHED: u32 = 1;

mod bpf {
    //! The three bpf(2) calls the sidecar needs (open a pin read-only,
    //! look an element up), without pulling a BPF library into the proxy.
    use std::{
        io,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
        path::Path,
    };

    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_F_RDONLY: u32 = 1 << 3;

    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }

    #[repr(C)]
    struct LookupAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a live, correctly laid out member of union
        // bpf_attr for `cmd`, and its size is passed along.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T as *mut libc::c_void,
                std::mem::size_of::<T>(),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    pub fn open_map(path: &Path) -> io::Result<OwnedFd> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::other("map path contains NUL"))?;
        let mut attr = ObjGetAttr {
            pathname: c.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: BPF_F_RDONLY,
        };
        let fd = bpf(BPF_OBJ_GET, &mut attr)?;
        let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf returned a bad fd"))?;
        // SAFETY: a fresh fd the kernel just returned, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// `Ok(false)` when the key is absent.
    pub fn lookup<K, V>(map: &OwnedFd, key: &K, value: &mut V) -> io::Result<bool> {
        let mut attr = LookupAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: key as *const K as u64,
            value: value as *mut V as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The cookie of the socket at the other end of a local TCP connection
/// (`local` → `remote` as the wanted socket sees it), through sock_diag in
/// the caller's network namespace: an exact lookup by 4-tuple whose answer
/// carries the socket's cookie (the same `bpf_get_socket_cookie` value).
pub fn tcp_socket_cookie(local: SocketAddrV4, remote: SocketAddrV4) -> io::Result<u64> {
    use std::mem::size_of;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    #[repr(C)]
    struct NlMsgHdr {
        len: u32,
        kind: u16,
        flags: u16,
        seq: u32,
        pid: u32,
    }
    #[repr(C)]
    struct SockId {
        sport: u16,
        dport: u16,
        src: [u32; 4],
        dst: [u32; 4],
        ifindex: u32,
        cookie: [u32; 2],
    }
    #[repr(C)]
    struct ReqV2 {
        family: u8,
        protocol: u8,
        ext: u8,
        pad: u8,
        states: u32,
        id: SockId,
    }
    #[repr(C)]
    struct Request {
        hdr: NlMsgHdr,
        req: ReqV2,
    }
    let ip = |a: &SocketAddrV4| [u32::from_ne_bytes(a.ip().octets()), 0, 0, 0];
    let request = Request {
        hdr: NlMsgHdr {
            len: size_of::<Request>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags: libc::NLM_F_REQUEST as u16,
            seq: 1,
            pid: 0,
        },
        req: ReqV2 {
            family: libc::AF_INET as u8,
            protocol: libc::IPPROTO_TCP as u8,
            ext: 0,
            pad: 0,
            states: u32::MAX,
            id: SockId {
                sport: local.port().to_be(),
                dport: remote.port().to_be(),
                src: ip(&local),
                dst: ip(&remote),
                ifindex: 0,
                // INET_DIAG_NOCOOKIE: match by tuple alone.
                cookie: [u32::MAX, u32::MAX],
            },
        },
    };
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd owned by nobody else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: the request is a live repr(C) value of the length passed.
    let sent = unsafe {
        libc::send(
            fd.as_raw_fd(),
            &request as *const Request as *const libc::c_void,
            size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 512];
    // SAFETY: the buffer is writable for its length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let hdr = size_of::<NlMsgHdr>();
    if n < hdr + 4 {
        return Err(io::Error::other("short sock_diag answer"));
    }
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if kind == NLMSG_ERROR {
        let code = i32::from_ne_bytes([buf[hdr], buf[hdr + 1], buf[hdr + 2], buf[hdr + 3]]);
        return Err(io::Error::from_raw_os_error(-code));
    }
    // inet_diag_msg: family, state, timer, retrans (4 bytes), then the
    // socket id whose cookie sits after ports (4), src (16), dst (16) and
    // ifindex (4).
    let at = hdr + 4 + 4 + 16 + 16 + 4;
    if kind != SOCK_DIAG_BY_FAMILY || n < at + 8 {
        return Err(io::Error::other("unexpected sock_diag answer"));
    }
    let lo = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    let hi = u32::from_ne_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]);
    Ok(u64::from(lo) | (u64::from(hi) << 32))
}

/// The eBPF capture's answer (`mesh_connect4`): the app socket's cookie
/// from the accepted connection's tuple, then `SKEP_MESH_ORIG`.
pub struct BpfOrigDst {
    map: std::os::fd::OwnedFd,
}

impl std::fmt::Debug for BpfOrigDst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BpfOrigDst")
    }
}

impl BpfOrigDst {
    /// Opens `<dir>/SKEP_MESH_ORIG` (read-only).
    pub fn open(dir: &std::path::Path) -> io::Result<Self> {
        let path = dir.join(MESH_ORIG_MAP);
        let map = bpf::open_map(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot open the capture map {}: {e} (the kubelet mounts the \
                     dataplane's pinned maps there for meshed pods)",
                    path.display()
                ),
            )
        })?;
        Ok(Self { map })
    }

    /// The original destination recorded for an app socket's cookie.
    pub fn lookup_cookie(&self, cookie: u64) -> io::Result<Option<SocketAddrV4>> {
        // MeshOrigDst: addr (network order), port (network order), pad.
        let mut value = [0u8; 8];
        if !bpf::lookup(&self.map, &cookie, &mut value)? {
            return Ok(None);
        }
        let ip = Ipv4Addr::new(value[0], value[1], value[2], value[3]);
        let port = u16::from_be_bytes([value[4], value[5]]);
        Ok(Some(SocketAddrV4::new(ip, port)))
    }
}

impl OriginalDst for BpfOrigDst {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddrV4> {
        let app = v4(stream.peer_addr()?)?;
        let local = v4(stream.local_addr()?)?;
        let cookie = tcp_socket_cookie(app, local)?;
        self.lookup_cookie(cookie)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no original destination recorded for {app} (cookie {cookie})"),
            )
        })
    }
}

/// Meshed destinations: the node's meshed pods from the capture's pod
/// table (`SKEP_MESH_PODS`, kept by the kubelet), plus static ranges.
pub struct BpfMeshedPeers {
    map: std::os::fd::OwnedFd,
    extra: StaticMeshedPeers,
}

impl std::fmt::Debug for BpfMeshedPeers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfMeshedPeers")
            .field("extra", &self.extra)
            .finish_non_exhaustive()
    }
}

impl BpfMeshedPeers {
    pub fn open(dir: &std::path::Path, extra: StaticMeshedPeers) -> io::Result<Self> {
        let path = dir.join(MESH_PODS_MAP);
        let map = bpf::open_map(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open the meshed-pod map {}: {e}", path.display()),
            )
        })?;
        Ok(Self { map, extra })
    }
}

impl MeshedPeers for BpfMeshedPeers {
    fn is_meshed(&self, ip: Ipv4Addr) -> bool {
        let key = u32::from_ne_bytes(ip.octets());
        let mut flags = 0u32;
        match bpf::lookup(&self.map, &key, &mut flags) {
            Ok(true) if flags & MESH_POD_F_MESHED != 0 => true,
            Ok(_) => self.extra.is_meshed(ip),
            Err(e) => {
                tracing::warn!(error = %e, %ip, "meshed-pod map lookup failed");
                self.extra.is_meshed(ip)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_hosts() {
        let p = StaticMeshedPeers::parse(&["10.42.0.0/16".into(), "192.168.1.7".into()]).unwrap();
        assert!(p.is_meshed("10.42.3.4".parse().unwrap()));
        assert!(!p.is_meshed("10.43.0.1".parse().unwrap()));
        assert!(p.is_meshed("192.168.1.7".parse().unwrap()));
        assert!(StaticMeshedPeers::parse(&["10.0.0.0/33".into()]).is_err());
    }

    /// sock_diag finds the peer socket of an accepted loopback connection
    /// and reports the cookie the kernel (and `bpf_get_socket_cookie`)
    /// gives it.
    #[test]
    fn sock_diag_reports_the_app_sockets_cookie() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = match listener.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound to IPv4"),
        };
        let app = std::net::TcpStream::connect(server).unwrap();
        let (accepted, peer) = listener.accept().unwrap();
        let app_cookie = crate::net::socket_cookie(app.as_raw_fd()).unwrap();
        let accepted_cookie = crate::net::socket_cookie(accepted.as_raw_fd()).unwrap();
        let peer = v4(peer).unwrap();
        let found = tcp_socket_cookie(peer, server).unwrap();
        assert_eq!(found, app_cookie, "the app socket's cookie");
        assert_ne!(found, accepted_cookie, "not the accepted socket's");
        assert!(
            tcp_socket_cookie(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1), server).is_err(),
            "no such socket"
        );
    }
}
