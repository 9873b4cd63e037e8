//! Refusing connections to a service without backends, so clients fail at
//! once instead of hanging:
//!
//! * a TCP SYN is turned into a RST|ACK in place and sent back to the pod
//!   (`connect()` → ECONNREFUSED). The reply keeps the SYN's length and
//!   options (a RST's options are ignored). Swapping addresses and ports
//!   leaves the checksums unchanged (one's-complement sums commute), so only
//!   seq, ack and the flags word need incremental updates;
//! * a UDP datagram becomes an ICMP port unreachable carrying its IP header
//!   and first 8 bytes, sent back to the pod (a connected UDP socket gets
//!   ECONNREFUSED);
//! * anything else (TCP non-SYN, IP options) is dropped and counted.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::generated::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use skep_ebpf_common::{IPPROTO_TCP, IPPROTO_UDP, LbCounter};

use crate::{
    maps::count,
    packet::{ETH_HLEN, IP_DADDR, IP_SADDR, Packet, TCP_ACK, TCP_RST, TCP_SYN},
};

#[inline(always)]
pub fn refuse(ctx: &TcContext, p: &Packet) -> i32 {
    if p.proto == IPPROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        if rst_in_place(ctx, p).is_ok() {
            count(LbCounter::NoBackendRst);
            return bounce(ctx);
        }
        count(LbCounter::RewriteFailed);
        return TC_ACT_SHOT as i32;
    }
    if p.proto == IPPROTO_UDP {
        if icmp_unreachable_in_place(ctx, p).is_ok() {
            count(LbCounter::NoBackendIcmp);
            return bounce(ctx);
        }
        count(LbCounter::NoBackendDrop);
        return TC_ACT_SHOT as i32;
    }
    count(LbCounter::NoBackendDrop);
    TC_ACT_SHOT as i32
}

/// Sends the (rewritten) packet back out of the interface it came in on,
/// i.e. to the pod.
#[inline(always)]
fn bounce(ctx: &TcContext) -> i32 {
    // SAFETY: reading the ifindex of this invocation's skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// 4-byte aligned scratch buffers (bpf_csum_diff sums 32-bit words).
#[repr(C, align(4))]
struct IpHdr([u8; 20]);
#[repr(C, align(4))]
struct IcmpMsg([u8; 36]);

/// One's-complement checksum of `len` bytes at `buf` (a multiple of 4).
#[inline(always)]
fn checksum(buf: *mut u8, len: u32) -> Result<u16, i64> {
    // SAFETY: `buf` points at `len` bytes of this program's stack.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, buf.cast(), len, 0) };
    if sum < 0 {
        return Err(sum);
    }
    let mut c = sum as u64 & 0xffff_ffff;
    c = (c & 0xffff) + (c >> 16);
    c = (c & 0xffff) + (c >> 16);
    Ok(!(c as u16))
}

/// Rewrites a UDP datagram into ICMP destination unreachable / port
/// unreachable (RFC 792) from the frontend to the client.
#[inline(always)]
fn icmp_unreachable_in_place(ctx: &TcContext, p: &Packet) -> Result<(), i64> {
    const IP_LEN: usize = 20;
    const ICMP_LEN: usize = 8 + IP_LEN + 8;
    if p.l4 != ETH_HLEN + IP_LEN {
        // IP options: the quoted header would not fit our fixed layout.
        return Err(-1);
    }
    let mut msg = IcmpMsg([0; ICMP_LEN]);
    msg.0[0] = 3; // destination unreachable
    msg.0[1] = 3; // port unreachable
    // The original IP header and the first 8 bytes of the datagram.
    let quoted: [u8; IP_LEN + 8] = ctx.load(ETH_HLEN)?;
    msg.0[8..].copy_from_slice(&quoted);
    let dst_mac: [u8; 6] = ctx.load(0)?;
    let src_mac: [u8; 6] = ctx.load(6)?;

    let mut ip = IpHdr([0; IP_LEN]);
    ip.0[0] = 0x45;
    ip.0[1] = 0xc0; // precedence "internetwork control", as Linux's ICMP
    let total = ((IP_LEN + ICMP_LEN) as u16).to_be_bytes();
    ip.0[2] = total[0];
    ip.0[3] = total[1];
    ip.0[8] = 64; // TTL
    ip.0[9] = 1; // ICMP
    ip.0[12..16].copy_from_slice(&p.daddr.to_ne_bytes());
    ip.0[16..20].copy_from_slice(&p.saddr.to_ne_bytes());
    let ip_csum = checksum(ip.0.as_mut_ptr(), IP_LEN as u32)?.to_ne_bytes();
    ip.0[10] = ip_csum[0];
    ip.0[11] = ip_csum[1];
    let icmp_csum = checksum(msg.0.as_mut_ptr(), ICMP_LEN as u32)?.to_ne_bytes();
    msg.0[2] = icmp_csum[0];
    msg.0[3] = icmp_csum[1];

    // SAFETY: plain helper call on this invocation's skb; it grows or trims
    // the packet to exactly the ICMP message.
    let r = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + IP_LEN + ICMP_LEN) as u32, 0) };
    if r != 0 {
        return Err(r);
    }
    ctx.store(0, &src_mac, 0)?;
    ctx.store(6, &dst_mac, 0)?;
    ctx.store(ETH_HLEN, &ip.0, 0)?;
    ctx.store(ETH_HLEN + IP_LEN, &msg.0, 0)
}

#[inline(always)]
fn rst_in_place(ctx: &TcContext, p: &Packet) -> Result<(), i64> {
    let dst_mac: [u8; 6] = ctx.load(0)?;
    let src_mac: [u8; 6] = ctx.load(6)?;
    ctx.store(0, &src_mac, 0)?;
    ctx.store(6, &dst_mac, 0)?;
    ctx.store(IP_SADDR, &p.daddr, 0)?;
    ctx.store(IP_DADDR, &p.saddr, 0)?;
    ctx.store(p.l4, &p.dport, 0)?;
    ctx.store(p.l4 + 2, &p.sport, 0)?;

    let seq: u32 = ctx.load(p.l4 + 4)?;
    let old_ack: u32 = ctx.load(p.l4 + 8)?;
    let new_ack = (u32::from_be(seq).wrapping_add(1)).to_be();
    let new_seq = 0u32;
    // The 16-bit word holding data offset and flags.
    let old_word: u16 = ctx.load(p.l4 + 12)?;
    let mut bytes = old_word.to_ne_bytes();
    bytes[1] = TCP_RST | TCP_ACK;
    let new_word = u16::from_ne_bytes(bytes);

    let csum = p.l4_csum();
    ctx.l4_csum_replace(csum, u64::from(seq), u64::from(new_seq), 4)?;
    ctx.l4_csum_replace(csum, u64::from(old_ack), u64::from(new_ack), 4)?;
    ctx.l4_csum_replace(csum, u64::from(old_word), u64::from(new_word), 2)?;
    ctx.store(p.l4 + 4, &new_seq, 0)?;
    ctx.store(p.l4 + 8, &new_ack, 0)?;
    ctx.store(p.l4 + 12, &new_word, 0)
}
