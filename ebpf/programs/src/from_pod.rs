//! `from_pod`: TC ingress on a pod's host-side veth, i.e. every packet the
//! pod sends. Packets to a service frontend are DNATed to a backend (an
//! existing conntrack entry wins; a new connection picks by affinity or
//! Maglev and records both directions); connections to a frontend without
//! backends are refused. Replies to the hairpin address get their
//! destination restored to the pod itself. Then NetworkPolicy judges the
//! pod's egress on the post-DNAT destination (see `policy`).
//!
//! The same program runs at TC ingress of the node's external interface,
//! where it also source-NATs external connections to remote backends and
//! translates their replies (see `snat`), for the packets `xdp_node` left
//! to it.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::{bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use skep_ebpf_common::{
    BackendValue, CFG_F_FLOWS, CFG_F_POLICY, CT_F_HAIRPIN, CT_F_SNAT, IPPROTO_SCTP, LbConfig,
    LbCounter,
};

use crate::{
    conntrack, lb,
    maps::{CONFIG, count},
    nat,
    packet::{self, ETH_HLEN, Packet, Skip},
    policy, reject, snat,
};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        return TC_ACT_OK as i32;
    };
    if cfg.ready == 0 {
        return TC_ACT_OK as i32;
    }
    let p = match packet::parse(&ctx) {
        Ok(p) => p,
        Err(Skip::Fragment) => {
            count(LbCounter::Fragment);
            return TC_ACT_OK as i32;
        }
        Err(Skip::NotOurs) => return TC_ACT_OK as i32,
    };
    count(LbCounter::FromPodPackets);
    match handle(&ctx, &p, cfg) {
        Ok(verdict) => verdict,
        Err(_) => {
            count(LbCounter::RewriteFailed);
            TC_ACT_SHOT as i32
        }
    }
}

#[inline(always)]
fn handle(ctx: &TcContext, p: &Packet, cfg: &LbConfig) -> Result<i32, i64> {
    if p.proto == IPPROTO_SCTP {
        // Policy only: SCTP is never load-balanced (IPPROTO_SCTP).
        if cfg.flags & (CFG_F_POLICY | CFG_F_FLOWS) != 0 {
            let now = unsafe { bpf_ktime_get_ns() };
            if !policy::egress(ctx, cfg, p, p.daddr, p.dport, (0, 0), now) {
                return Ok(TC_ACT_SHOT as i32);
            }
        }
        return Ok(TC_ACT_OK as i32);
    }
    if p.daddr == cfg.hairpin_addr && cfg.hairpin_addr != 0 {
        // A pod answering a hairpin connection: the client is the pod
        // itself. Restore the destination; the to-pod hook then restores the
        // frontend as source from the reply entry.
        nat::set_daddr(ctx, p, p.saddr)?;
        count(LbCounter::HairpinReply);
        return Ok(TC_ACT_OK as i32);
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: reading the ifindex of this invocation's skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let external = cfg.ext_ifindex != 0 && ifindex == cfg.ext_ifindex;
    if external && let Some(ct) = snat::reply(p, cfg, now) {
        // A remote backend answering a SNATed connection: back to the
        // client, from the frontend.
        nat::snat(ctx, p, ct.nat_addr, ct.nat_port)?;
        nat::dnat(ctx, p, ct.snat_addr, ct.snat_port)?;
        return Ok(forward(ctx, p, ifindex, ct.nat_addr, ct.snat_addr));
    }
    // First the load balancer decides where the packet goes (the DNAT
    // target, if any), then policy judges that destination, then the
    // decision is carried out: a denied connection leaves no LB state.
    let mut target: Option<Target> = None;
    let mut new_conn: Option<NewConn> = None;
    if let Some(entry) = conntrack::lookup(&conntrack::forward_key(p)) {
        // SAFETY: pointer from a successful lookup; copied at once.
        let ct = unsafe { *entry };
        // The id must still name the same backend (ids are reused).
        if lb::backend(ct.backend_id).is_some_and(|b| {
            b.service_id == ct.service_id && b.addr == ct.nat_addr && b.port == ct.nat_port
        }) {
            conntrack::touch(entry, p, now);
            count(LbCounter::CtHit);
            target = Some(Target {
                addr: ct.nat_addr,
                port: ct.nat_port,
                hairpin: ct.flags & CT_F_HAIRPIN != 0,
                snat: if ct.flags & CT_F_SNAT != 0 {
                    Some((ct.snat_addr, ct.snat_port))
                } else {
                    None
                },
            });
        } else {
            // The backend is gone: re-balance this flow (its connection to
            // the old backend is lost anyway).
            count(LbCounter::CtStaleBackend);
        }
    }
    if target.is_none()
        && let Some(svc) = lb::lookup_service(p)
    {
        let selected = if svc.backend_count == 0 {
            None
        } else {
            lb::select(p, &svc, cfg, now)
        };
        let Some((backend_id, backend)) = selected else {
            policy::no_backend(ctx, cfg, p);
            return Ok(reject::refuse(ctx, p));
        };
        let hairpin = backend.addr == p.saddr;
        let snat_needed = external && snat::needed(cfg, svc.flags, &backend);
        new_conn = Some(NewConn {
            backend_id,
            backend,
            service_id: svc.id,
            hairpin,
            snat: snat_needed,
        });
        target = Some(Target {
            addr: backend.addr,
            port: backend.port,
            hairpin,
            snat: None,
        });
    }
    // A pod reaching itself through a service is always allowed.
    let hairpin = target.is_some_and(|t| t.hairpin);
    if cfg.flags & (CFG_F_POLICY | CFG_F_FLOWS) != 0 && !hairpin {
        let (daddr, dport, orig) = match target {
            Some(t) => (t.addr, t.port, (p.daddr, p.dport)),
            None => (p.daddr, p.dport, (0, 0)),
        };
        if !policy::egress(ctx, cfg, p, daddr, dport, orig, now) {
            return Ok(TC_ACT_SHOT as i32);
        }
    }
    if let Some(n) = new_conn {
        if n.snat {
            match snat::create(p, cfg, n.backend_id, &n.backend, n.service_id, now) {
                Some(fwd) => {
                    if let Some(t) = target.as_mut() {
                        t.snat = Some((fwd.snat_addr, fwd.snat_port));
                    }
                }
                None => return Ok(reject::refuse(ctx, p)),
            }
        } else {
            let flags = if n.hairpin { CT_F_HAIRPIN } else { 0 };
            conntrack::create(p, n.backend_id, &n.backend, n.service_id, flags, now);
        }
        count(LbCounter::NewConnection);
    }
    if let Some(t) = target {
        rewrite(ctx, p, t.addr, t.port, t.hairpin, cfg)?;
        if let Some((addr, port)) = t.snat {
            nat::snat(ctx, p, addr, port)?;
            return Ok(forward(ctx, p, ifindex, addr, t.addr));
        }
    }
    Ok(TC_ACT_OK as i32)
}

/// A new connection, recorded once policy has admitted it.
struct NewConn {
    backend_id: u32,
    backend: BackendValue,
    service_id: u32,
    hairpin: bool,
    /// Source-NAT it (external connection to a remote backend).
    snat: bool,
}

/// Where the load balancer sends a packet (network byte order).
#[derive(Clone, Copy)]
struct Target {
    addr: u32,
    port: u16,
    hairpin: bool,
    /// New source (node address, SNAT port) of a SNATed connection.
    snat: Option<(u32, u16)>,
}

/// Sends a translated packet `src → dst` on towards `dst`: it now has
/// this node's address as source, so the stack would drop it as martian.
/// The FIB says where; without a neighbour entry yet, the kernel resolves
/// it (bpf_redirect_neigh, Linux ≥ 5.10).
#[inline(always)]
fn forward(ctx: &TcContext, p: &Packet, ifindex: u32, src: u32, dst: u32) -> i32 {
    let tot_len = ctx.load::<u16>(ETH_HLEN + 2).map(u16::from_be).unwrap_or(0);
    let Some((rc, f)) = snat::fib(ctx.skb.skb.cast(), ifindex, p, src, dst, tot_len) else {
        count(LbCounter::RewriteFailed);
        return TC_ACT_SHOT as i32;
    };
    count(LbCounter::SnatRedirectTc);
    // SAFETY: `f` is this CPU's scratch slot, filled by the lookup.
    let (out, dmac, smac) = unsafe { ((*f).p.ifindex, (*f).p.dmac, (*f).p.smac) };
    if rc == snat::FIB_SUCCESS {
        if ctx.store(0, &dmac, 0).is_err() || ctx.store(6, &smac, 0).is_err() {
            count(LbCounter::RewriteFailed);
            return TC_ACT_SHOT as i32;
        }
        // SAFETY: plain helper call.
        return unsafe { bpf_redirect(out, 0) as i32 };
    }
    if rc == snat::FIB_NO_NEIGH {
        // SAFETY: plain helper call; no next-hop parameters (the FIB's).
        return unsafe { bpf_redirect_neigh(out, core::ptr::null_mut(), 0, 0) as i32 };
    }
    count(LbCounter::RewriteFailed);
    TC_ACT_SHOT as i32
}

#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    p: &Packet,
    addr: u32,
    port: u16,
    hairpin: bool,
    cfg: &LbConfig,
) -> Result<(), i64> {
    nat::dnat(ctx, p, addr, port)?;
    if hairpin {
        // The pod would drop a packet from its own address; make the
        // connection come from the hairpin address instead.
        nat::set_saddr(ctx, p, cfg.hairpin_addr)?;
        count(LbCounter::Hairpin);
    }
    Ok(())
}
