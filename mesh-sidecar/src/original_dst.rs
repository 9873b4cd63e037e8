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
}
