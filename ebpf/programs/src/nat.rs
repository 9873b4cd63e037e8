//! Address and port rewrites with incremental checksum updates. The kernel's
//! csum helpers do the right thing for CHECKSUM_PARTIAL skbs (packets from a
//! local socket on a veth: only the pseudo-header part is patched) and, with
//! BPF_F_MARK_MANGLED_0, leave a zero (absent) UDP checksum alone.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use skep_ebpf_common::IPPROTO_UDP;

use crate::packet::{IP_CSUM, IP_DADDR, IP_SADDR, Packet};

#[inline(always)]
fn l4_flags(p: &Packet) -> u64 {
    if p.proto == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

#[inline(always)]
fn rewrite_addr(ctx: &TcContext, p: &Packet, off: usize, old: u32, new: u32) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    // The address is part of the L4 pseudo-header, hence BPF_F_PSEUDO_HDR.
    ctx.l4_csum_replace(
        p.l4_csum(),
        u64::from(old),
        u64::from(new),
        u64::from(BPF_F_PSEUDO_HDR) | 4 | l4_flags(p),
    )?;
    ctx.l3_csum_replace(IP_CSUM, u64::from(old), u64::from(new), 4)?;
    ctx.store(off, &new, 0)
}

#[inline(always)]
fn rewrite_port(ctx: &TcContext, p: &Packet, off: usize, old: u16, new: u16) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(p.l4_csum(), u64::from(old), u64::from(new), 2 | l4_flags(p))?;
    ctx.store(off, &new, 0)
}

/// Rewrites the destination (DNAT to a backend).
#[inline(always)]
pub fn dnat(ctx: &TcContext, p: &Packet, addr: u32, port: u16) -> Result<(), i64> {
    rewrite_addr(ctx, p, IP_DADDR, p.daddr, addr)?;
    rewrite_port(ctx, p, p.l4 + 2, p.dport, port)
}

/// Rewrites the source (reverse NAT: backend → frontend).
#[inline(always)]
pub fn snat(ctx: &TcContext, p: &Packet, addr: u32, port: u16) -> Result<(), i64> {
    rewrite_addr(ctx, p, IP_SADDR, p.saddr, addr)?;
    rewrite_port(ctx, p, p.l4, p.sport, port)
}

/// Rewrites only the source address (hairpin SNAT).
#[inline(always)]
pub fn set_saddr(ctx: &TcContext, p: &Packet, addr: u32) -> Result<(), i64> {
    rewrite_addr(ctx, p, IP_SADDR, p.saddr, addr)
}

/// Rewrites only the destination address (hairpin reply).
#[inline(always)]
pub fn set_daddr(ctx: &TcContext, p: &Packet, addr: u32) -> Result<(), i64> {
    rewrite_addr(ctx, p, IP_DADDR, p.daddr, addr)
}
