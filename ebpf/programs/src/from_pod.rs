//! `from_pod`: TC ingress on a pod's host-side veth, i.e. every packet the
//! pod sends. Packets to a service frontend are DNATed to a backend (an
//! existing conntrack entry wins; a new connection picks by affinity or
//! Maglev and records both directions); connections to a frontend without
//! backends are refused. Replies to the hairpin address get their
//! destination restored to the pod itself. Then NetworkPolicy judges the
//! pod's egress on the post-DNAT destination (see `policy`).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_ktime_get_ns,
    macros::classifier,
    programs::TcContext,
};
use skep_ebpf_common::{
    CFG_F_FLOWS, CFG_F_POLICY, CT_DIR_REPLY, CT_F_HAIRPIN, CtKey, CtValue, IPPROTO_SCTP, LbConfig,
    LbCounter,
};

use crate::{
    conntrack, lb,
    maps::{CONFIG, count},
    nat,
    packet::{self, Packet, Skip},
    policy, reject,
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
    // First the load balancer decides where the packet goes (the DNAT
    // target, if any), then policy judges that destination, then the
    // decision is carried out: a denied connection leaves no LB state.
    let mut target: Option<Target> = None;
    let mut new_conn: Option<(CtValue, CtKey, CtValue)> = None;
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
        let forward = CtValue {
            nat_addr: backend.addr,
            nat_port: backend.port,
            flags: if hairpin { CT_F_HAIRPIN } else { 0 },
            _pad: 0,
            backend_id,
            service_id: svc.id,
            last_seen_ns: now,
            packets: 1,
        };
        let reply_key = CtKey {
            saddr: backend.addr,
            daddr: p.saddr,
            sport: backend.port,
            dport: p.sport,
            proto: p.proto,
            dir: CT_DIR_REPLY,
            _pad: 0,
        };
        let reply = CtValue {
            nat_addr: p.daddr,
            nat_port: p.dport,
            flags: forward.flags,
            _pad: 0,
            backend_id,
            service_id: svc.id,
            last_seen_ns: now,
            packets: 0,
        };
        new_conn = Some((forward, reply_key, reply));
        target = Some(Target {
            addr: backend.addr,
            port: backend.port,
            hairpin,
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
    if let Some((forward, reply_key, reply)) = new_conn {
        if conntrack::create(p, &forward, &reply_key, &reply).is_err() {
            // Still forward this packet; the next one retries the insert.
            count(LbCounter::CtInsertFailed);
        }
        count(LbCounter::NewConnection);
    }
    if let Some(t) = target {
        rewrite(ctx, p, t.addr, t.port, t.hairpin, cfg)?;
    }
    Ok(TC_ACT_OK as i32)
}

/// Where the load balancer sends a packet (network byte order).
#[derive(Clone, Copy)]
struct Target {
    addr: u32,
    port: u16,
    hairpin: bool,
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
