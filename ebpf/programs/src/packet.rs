//! Parsing of the IPv4 TCP/UDP packets the load balancer rewrites. Reads go
//! through `bpf_skb_load_bytes` (`TcContext::load`), which bounds-checks for
//! us and keeps the verifier happy with the variable IP header length.

use aya_ebpf::programs::TcContext;
use skep_ebpf_common::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// Offsets inside the IPv4 header.
pub const IP_CSUM: usize = ETH_HLEN + 10;
pub const IP_SADDR: usize = ETH_HLEN + 12;
pub const IP_DADDR: usize = ETH_HLEN + 16;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the hooks need to know about a packet.
#[derive(Clone, Copy)]
pub struct Packet {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Offset of the L4 header.
    pub l4: usize,
}

impl Packet {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum(&self) -> usize {
        if self.proto == IPPROTO_TCP {
            self.l4 + 16
        } else {
            self.l4 + 6
        }
    }
}

/// Why a packet is not for the load balancer.
pub enum Skip {
    /// Not IPv4 TCP/UDP, or too short: pass it untouched.
    NotOurs,
    /// A non-first fragment: no ports to look at.
    Fragment,
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, Skip> {
    let eth_proto: u16 = ctx.load(12).map_err(|_| Skip::NotOurs)?;
    if eth_proto != ETH_P_IP_BE {
        return Err(Skip::NotOurs);
    }
    let ver_ihl: u8 = ctx.load(ETH_HLEN).map_err(|_| Skip::NotOurs)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 {
        return Err(Skip::NotOurs);
    }
    let proto: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| Skip::NotOurs)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP {
        return Err(Skip::NotOurs);
    }
    let frag: u16 = ctx.load(ETH_HLEN + 6).map_err(|_| Skip::NotOurs)?;
    if u16::from_be(frag) & 0x1fff != 0 {
        return Err(Skip::Fragment);
    }
    let saddr: u32 = ctx.load(IP_SADDR).map_err(|_| Skip::NotOurs)?;
    let daddr: u32 = ctx.load(IP_DADDR).map_err(|_| Skip::NotOurs)?;
    let l4 = ETH_HLEN + ihl;
    let sport: u16 = ctx.load(l4).map_err(|_| Skip::NotOurs)?;
    let dport: u16 = ctx.load(l4 + 2).map_err(|_| Skip::NotOurs)?;
    let tcp_flags = if proto == IPPROTO_TCP {
        ctx.load::<u8>(l4 + 13).map_err(|_| Skip::NotOurs)?
    } else {
        0
    };
    Ok(Packet {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        tcp_flags,
        l4,
    })
}

/// A well-mixed 32-bit hash of a flow (murmur3's finalizer over the tuple),
/// used to pick a Maglev slot. Userspace never needs to reproduce it.
#[inline(always)]
pub fn flow_hash(p: &Packet) -> u32 {
    let ports = (u32::from(p.sport) << 16) | u32::from(p.dport);
    let mut h = fmix(p.saddr ^ 0x9e37_79b9);
    h = fmix(h ^ p.daddr);
    h = fmix(h ^ ports);
    fmix(h ^ u32::from(p.proto))
}

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}
