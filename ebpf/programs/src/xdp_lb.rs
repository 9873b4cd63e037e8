//! The load-balancing half of `xdp_node`: external frontends (NodePort,
//! ExternalIPs, LoadBalancer IPs) handled before the kernel builds a
//! socket buffer.
//!
//! * A connection to a local backend is DNATed here and passed up; the
//!   stack routes it to the pod, whose hooks judge policy. Its replies
//!   are reverse-NATed by `to_pod` on the way out of this interface.
//! * A connection to a remote backend (externalTrafficPolicy Cluster) is
//!   DNATed and source-NATed to the node (see `snat`), and its packets and
//!   the backend's replies are sent on from here (XDP_TX, or a redirect to
//!   the interface the FIB names).
//!
//! Whatever cannot be finished here is passed up untouched, and
//! `from_pod` on the same interface (TC ingress) does the same work with
//! the same conntrack entries: frontends without backends (TC answers
//! with a RST or ICMP error), stale backends, no neighbour entry yet, no
//! SNAT port, fragments, IP options beyond the header the checksums cover.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_ktime_get_ns, bpf_redirect},
    programs::XdpContext,
};
use skep_ebpf_common::{
    CFG_F_XDP_LB, CT_F_SNAT, IPPROTO_TCP, IPPROTO_UDP, LbCounter, SVC_F_EXTERNAL,
};

use crate::{
    conntrack, lb,
    maps::{CONFIG, count},
    packet::{ETH_HLEN, IP_CSUM, IP_DADDR, IP_SADDR, Packet},
    snat,
    xdp_policy::{at, read},
};

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();

/// New addresses and ports of a packet (network order).
struct Rewrite {
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport: u16,
}

/// The action for a packet this half handled; `None`: not handled here
/// (the policy half and then the stack take it).
#[inline(always)]
pub fn handle(ctx: &XdpContext) -> Option<u32> {
    let cfg = CONFIG.get(0)?;
    if cfg.ready == 0 || cfg.flags & CFG_F_XDP_LB == 0 {
        return None;
    }
    let p = parse(ctx)?;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(ct) = snat::reply(&p, cfg, now) {
        // A remote backend's reply: back to the client, from the frontend.
        let rw = Rewrite {
            saddr: ct.nat_addr,
            sport: ct.nat_port,
            daddr: ct.snat_addr,
            dport: ct.snat_port,
        };
        return Some(send(ctx, &p, &rw));
    }
    if let Some(entry) = conntrack::lookup(&conntrack::forward_key(&p)) {
        // SAFETY: pointer from a successful lookup; copied at once.
        let ct = unsafe { *entry };
        let current = lb::backend(ct.backend_id).is_some_and(|b| {
            b.service_id == ct.service_id && b.addr == ct.nat_addr && b.port == ct.nat_port
        });
        if !current {
            // TC re-balances the flow.
            return None;
        }
        conntrack::touch(entry, &p, now);
        count(LbCounter::CtHit);
        if ct.flags & CT_F_SNAT != 0 {
            let rw = Rewrite {
                saddr: ct.snat_addr,
                sport: ct.snat_port,
                daddr: ct.nat_addr,
                dport: ct.nat_port,
            };
            return Some(send(ctx, &p, &rw));
        }
        return Some(pass_to_local(ctx, &p, ct.nat_addr, ct.nat_port));
    }
    let svc = lb::lookup_service(&p)?;
    // ClusterIPs are not reachable from outside; a frontend without
    // backends is refused by TC, which can answer.
    if svc.flags & SVC_F_EXTERNAL == 0 || svc.backend_count == 0 {
        return None;
    }
    let (backend_id, backend) = lb::select(&p, &svc, cfg, now)?;
    if snat::needed(cfg, svc.flags, &backend) {
        let fwd = snat::create(&p, cfg, backend_id, &backend, svc.id, now)?;
        count(LbCounter::NewConnection);
        let rw = Rewrite {
            saddr: fwd.snat_addr,
            sport: fwd.snat_port,
            daddr: backend.addr,
            dport: backend.port,
        };
        return Some(send(ctx, &p, &rw));
    }
    conntrack::create(&p, backend_id, &backend, svc.id, 0, now);
    Some(pass_to_local(ctx, &p, backend.addr, backend.port))
}

/// DNAT to a backend on this node, then up the stack to its pod.
#[inline(always)]
fn pass_to_local(ctx: &XdpContext, p: &Packet, addr: u32, port: u16) -> u32 {
    let rw = Rewrite {
        saddr: p.saddr,
        sport: p.sport,
        daddr: addr,
        dport: port,
    };
    if rewrite(ctx, p, &rw).is_none() {
        // The packet is as it came: TC does the same DNAT.
        count(LbCounter::XdpLbFallback);
        return xdp_action::XDP_PASS;
    }
    count(LbCounter::XdpLbPass);
    xdp_action::XDP_PASS
}

/// Translates a packet of a SNATed connection and sends it towards its new
/// destination. Without a usable FIB answer (no neighbour entry yet, no
/// route) the packet goes up untouched and TC finishes it.
#[inline(always)]
fn send(ctx: &XdpContext, p: &Packet, rw: &Rewrite) -> u32 {
    // SAFETY: reading a field of this invocation's xdp_md.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let tot_len = read::<u16>(ctx, ETH_HLEN + 2).map_or(0, u16::from_be);
    let Some((rc, f)) = snat::fib(ctx.ctx.cast(), ifindex, p, rw.saddr, rw.daddr, tot_len) else {
        count(LbCounter::XdpLbFallback);
        return xdp_action::XDP_PASS;
    };
    if rc != snat::FIB_SUCCESS {
        count(LbCounter::XdpLbFallback);
        return xdp_action::XDP_PASS;
    }
    // SAFETY: `f` is this CPU's scratch slot, filled by the lookup.
    let (out, dmac, smac) = unsafe { ((*f).p.ifindex, (*f).p.dmac, (*f).p.smac) };
    if rewrite(ctx, p, rw).is_none() || set_macs(ctx, &dmac, &smac).is_none() {
        count(LbCounter::RewriteFailed);
        return xdp_action::XDP_DROP;
    }
    count(LbCounter::XdpLbTx);
    if out == ifindex {
        return xdp_action::XDP_TX;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(out, 0) as u32 }
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Option<Packet> {
    if read::<u16>(ctx, 12)? != ETH_P_IP_BE {
        return None;
    }
    let ver_ihl: u8 = read(ctx, ETH_HLEN)?;
    // Only plain 20-byte headers: options are rare and TC handles them.
    if ver_ihl != 0x45 {
        return None;
    }
    let proto: u8 = read(ctx, ETH_HLEN + 9)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let frag: u16 = read(ctx, ETH_HLEN + 6)?;
    // Fragments (first or not) go to TC: only the first has ports.
    if u16::from_be(frag) & 0x3fff != 0 {
        return None;
    }
    let l4 = ETH_HLEN + 20;
    let tcp_flags = if proto == IPPROTO_TCP {
        read(ctx, l4 + 13)?
    } else {
        0
    };
    Some(Packet {
        saddr: read(ctx, IP_SADDR)?,
        daddr: read(ctx, IP_DADDR)?,
        sport: read(ctx, l4)?,
        dport: read(ctx, l4 + 2)?,
        proto,
        tcp_flags,
        l4,
    })
}

/// A writable pointer to a `T` at `offset`, if the packet holds it.
#[inline(always)]
fn at_mut<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    at::<T>(ctx, offset).map(|p| p as *mut T)
}

/// One's-complement checksum update (RFC 1624) for 16-bit words replaced:
/// `sum` holds the complemented old checksum plus the old words
/// complemented and the new words. The words can be taken in either byte
/// order, as long as all of them are (one's-complement sums commute with
/// byte swapping).
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[inline(always)]
fn words32(old: u32, new: u32) -> u32 {
    u32::from(!(old as u16)) + u32::from(!((old >> 16) as u16)) + (new & 0xffff) + (new >> 16)
}

#[inline(always)]
fn words16(old: u16, new: u16) -> u32 {
    u32::from(!old) + u32::from(new)
}

#[inline(always)]
fn rewrite(ctx: &XdpContext, p: &Packet, rw: &Rewrite) -> Option<()> {
    let ip_csum = at_mut::<u16>(ctx, IP_CSUM)?;
    let saddr = at_mut::<u32>(ctx, IP_SADDR)?;
    let daddr = at_mut::<u32>(ctx, IP_DADDR)?;
    let sport = at_mut::<u16>(ctx, p.l4)?;
    let dport = at_mut::<u16>(ctx, p.l4 + 2)?;
    let l4_csum = at_mut::<u16>(ctx, p.l4_csum())?;
    let addrs = words32(p.saddr, rw.saddr) + words32(p.daddr, rw.daddr);
    let ports = words16(p.sport, rw.sport) + words16(p.dport, rw.dport);
    // SAFETY: every pointer was bounds-checked against the packet above;
    // unaligned accesses because the IP header follows a 14-byte header.
    unsafe {
        let ic = ip_csum.read_unaligned();
        ip_csum.write_unaligned(!fold(u32::from(!ic) + addrs));
        let lc = l4_csum.read_unaligned();
        // A zero UDP checksum means "none": leave it so.
        if !(p.proto == IPPROTO_UDP && lc == 0) {
            let mut c = !fold(u32::from(!lc) + addrs + ports);
            if p.proto == IPPROTO_UDP && c == 0 {
                c = 0xffff;
            }
            l4_csum.write_unaligned(c);
        }
        saddr.write_unaligned(rw.saddr);
        daddr.write_unaligned(rw.daddr);
        sport.write_unaligned(rw.sport);
        dport.write_unaligned(rw.dport);
    }
    Some(())
}

#[inline(always)]
fn set_macs(ctx: &XdpContext, dst: &[u8; 6], src: &[u8; 6]) -> Option<()> {
    let eth = at_mut::<[u8; 12]>(ctx, 0)?;
    let mut b = [0u8; 12];
    b[..6].copy_from_slice(dst);
    b[6..].copy_from_slice(src);
    // SAFETY: bounds-checked above.
    unsafe { eth.write_unaligned(b) };
    Some(())
}
