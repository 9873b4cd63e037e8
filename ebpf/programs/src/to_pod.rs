//! `to_pod`: TC egress on a pod's host-side veth, i.e. every packet going to
//! the pod. Replies of load-balanced connections (backend → client) get the
//! frontend (VIP, port) back as source, from the conntrack reply entry.
//! Before that, NetworkPolicy judges the pod's ingress (see `policy`).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_ktime_get_ns,
    macros::classifier,
    programs::TcContext,
};
use skep_ebpf_common::{CFG_F_FLOWS, CFG_F_POLICY, LbCounter};

use crate::{
    conntrack,
    maps::{CONFIG, count},
    nat,
    packet::{self, Packet},
    policy,
};

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        return TC_ACT_OK as i32;
    };
    if cfg.ready == 0 {
        return TC_ACT_OK as i32;
    }
    let Ok(p) = packet::parse(&ctx) else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // [mesh] strict mode: plaintext connections to a strict pod's app
    // ports are refused (only the sidecar's mTLS port admits new ones).
    if crate::mesh_connect4::strict_refuses(&ctx, &p) {
        return TC_ACT_SHOT as i32;
    }
    // Policy judges the packet as it arrives, before the reverse NAT:
    // replies of load-balanced connections then match the post-DNAT tuple
    // the from-pod hook recorded.
    if cfg.flags & (CFG_F_POLICY | CFG_F_FLOWS) != 0 && !policy::ingress(&ctx, cfg, &p, now) {
        return TC_ACT_SHOT as i32;
    }
    match reverse_nat(&ctx, &p, now) {
        Ok(()) => TC_ACT_OK as i32,
        Err(_) => {
            count(LbCounter::RewriteFailed);
            TC_ACT_SHOT as i32
        }
    }
}

#[inline(always)]
fn reverse_nat(ctx: &TcContext, p: &Packet, now: u64) -> Result<(), i64> {
    // Never load-balanced, so never translated back (IPPROTO_SCTP).
    if p.proto == skep_ebpf_common::IPPROTO_SCTP {
        return Ok(());
    }
    let Some(entry) = conntrack::lookup(&conntrack::reply_key(p)) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup; copied at once.
    let ct = unsafe { *entry };
    conntrack::touch(entry, p, now);
    nat::snat(ctx, p, ct.nat_addr, ct.nat_port)?;
    count(LbCounter::ReverseNat);
    Ok(())
}
