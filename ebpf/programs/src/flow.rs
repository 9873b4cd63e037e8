//! Flow events: one [`FlowEvent`] per new connection a hook admits and per
//! packet it drops, written to the `SKEP_FLOWS` ring buffer for the agent
//! (which serves them to `skep ctl flows`/Hubble-like clients). Emitting is
//! off unless userspace set `CFG_F_FLOWS`; a full ring buffer loses the
//! event and counts it, it never holds up the packet.

use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, programs::TcContext};
use skep_ebpf_common::{
    CFG_F_FLOWS, DROP_NONE, FlowEvent, LbConfig, LbCounter, VERDICT_DROPPED, VERDICT_FORWARDED,
};

use crate::{
    maps::{FLOWS, count},
    packet::Packet,
};

/// What the hook decided about the flow, and why.
#[derive(Clone, Copy)]
pub struct Outcome {
    /// Destination after DNAT (the packet's own for to-pod events).
    pub daddr: u32,
    pub dport: u16,
    /// The service frontend before DNAT (0 when there was none).
    pub orig_daddr: u32,
    pub orig_dport: u16,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub policy_id: u32,
    /// `DROP_*`; `DROP_NONE` means forwarded.
    pub drop_reason: u8,
    /// `OBS_*`.
    pub observation: u8,
}

#[inline(always)]
pub fn emit(ctx: &TcContext, cfg: &LbConfig, p: &Packet, o: &Outcome) {
    if cfg.flags & CFG_F_FLOWS == 0 {
        return;
    }
    let ev = FlowEvent {
        // SAFETY: plain helper call.
        time_ns: unsafe { bpf_ktime_get_ns() },
        saddr: p.saddr,
        daddr: o.daddr,
        orig_daddr: o.orig_daddr,
        sport: p.sport,
        dport: o.dport,
        orig_dport: o.orig_dport,
        proto: p.proto,
        tcp_flags: p.tcp_flags,
        verdict: if o.drop_reason == DROP_NONE {
            VERDICT_FORWARDED
        } else {
            VERDICT_DROPPED
        },
        drop_reason: o.drop_reason,
        observation: o.observation,
        _pad: 0,
        src_identity: o.src_identity,
        dst_identity: o.dst_identity,
        policy_id: o.policy_id,
        // SAFETY: reading a field of this invocation's skb.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
    };
    if FLOWS.output::<FlowEvent>(&ev, 0).is_err() {
        count(LbCounter::FlowsLost);
    }
}
