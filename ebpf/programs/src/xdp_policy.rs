//! The policy half of `xdp_node` (XDP on a node's external interface):
//! dropping traffic that the destination pod's ingress policy would drop
//! anyway, before the kernel builds a socket buffer for it (a flood from
//! outside then costs the node as little as possible).
//!
//! Only a clear denial is dropped here: an IPv4 TCP/UDP packet to a local
//! endpoint that is ingress-isolated, that belongs to no connection the
//! policy conntrack knows (neither a reply nor an admitted connection),
//! and for which no rule admits the source (its identity, its CIDR
//! identity, any peer). Everything else passes, and the pod hooks make the
//! full decision (host sources, service DNAT, flow events, conntrack
//! bookkeeping): this program never writes a map other than its counter.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_ktime_get_ns, maps::lpm_trie::Key,
    programs::XdpContext,
};
use skep_ebpf_common::{
    CFG_F_FLOWS, CFG_F_POLICY, CtKey, DIR_INGRESS, DROP_POLICY_INGRESS, EP_F_INGRESS_ISOLATED,
    EndpointValue, FlowEvent, ID_ANY, ID_HOST, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    IpcacheValue, LbConfig, LbCounter, OBS_XDP, PCT_F_INGRESS_OK, POLICY_ID_NONE,
    POLICY_PREFIX_EXACT, PolicyKey, VERDICT_DROPPED,
};

use crate::{
    maps::{CONFIG, ENDPOINTS, FLOWS, POLICY, POLICY_CT, XDP_EVENT_BUDGET, count},
    packet::ETH_HLEN,
    policy,
};

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();

/// The fields of a packet the decision needs (addresses and ports in
/// network order, as the maps hold them).
struct Tuple {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
}

/// Drop events each CPU may send per second: enough to see who is being
/// refused, without a ring-buffer write per packet of a flood.
const EVENTS_PER_CPU_SECOND: u64 = 128;

/// XDP_DROP for a clear denial, else XDP_PASS.
#[inline(always)]
pub fn early_drop(ctx: &XdpContext) -> u32 {
    match denied(ctx) {
        Some((cfg, t, ep, src)) => {
            count(LbCounter::XdpPolicyDrop);
            if cfg.flags & CFG_F_FLOWS != 0 {
                report(ctx, &t, &ep, &src);
            }
            xdp_action::XDP_DROP
        }
        None => xdp_action::XDP_PASS,
    }
}

/// A DROPPED flow event for `t`, within this CPU's budget.
#[inline(always)]
fn report(ctx: &XdpContext, t: &Tuple, ep: &EndpointValue, src: &IpcacheValue) {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(budget) = XDP_EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    let second = now / 1_000_000_000;
    // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it
    // while this program runs.
    unsafe {
        if (*budget)[0] != second {
            (*budget)[0] = second;
            (*budget)[1] = 0;
        }
        if (*budget)[1] >= EVENTS_PER_CPU_SECOND {
            return;
        }
        (*budget)[1] += 1;
    }
    let ev = FlowEvent {
        time_ns: now,
        saddr: t.saddr,
        daddr: t.daddr,
        orig_daddr: 0,
        sport: t.sport,
        dport: t.dport,
        orig_dport: 0,
        proto: t.proto,
        tcp_flags: t.tcp_flags,
        verdict: VERDICT_DROPPED,
        drop_reason: DROP_POLICY_INGRESS,
        observation: OBS_XDP,
        _pad: 0,
        src_identity: src.identity,
        dst_identity: ep.identity,
        policy_id: POLICY_ID_NONE,
        // SAFETY: reading a field of this invocation's xdp_md.
        ifindex: unsafe { (*ctx.ctx).ingress_ifindex },
    };
    if FLOWS.output::<FlowEvent>(&ev, 0).is_err() {
        count(LbCounter::FlowsLost);
    }
}

/// A pointer to a `T` at `offset` in the packet, if the packet holds it.
#[inline(always)]
pub(crate) fn at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Reads a `T` at `offset` (unaligned: the IP header follows a 14-byte
/// Ethernet header).
#[inline(always)]
pub(crate) fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: `at` checked that the bytes lie inside the packet.
    at::<T>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Option<Tuple> {
    if read::<u16>(ctx, 12)? != ETH_P_IP_BE {
        return None;
    }
    let ver_ihl: u8 = read(ctx, ETH_HLEN)?;
    if ver_ihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    let proto: u8 = read(ctx, ETH_HLEN + 9)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP {
        return None;
    }
    // Non-first fragments carry no ports: the pod hook decides.
    let frag: u16 = read(ctx, ETH_HLEN + 6)?;
    if u16::from_be(frag) & 0x1fff != 0 {
        return None;
    }
    let l4 = ETH_HLEN + ihl;
    let tcp_flags = if proto == IPPROTO_TCP {
        read(ctx, l4 + 13).unwrap_or(0)
    } else {
        0
    };
    Some(Tuple {
        saddr: read(ctx, ETH_HLEN + 12)?,
        daddr: read(ctx, ETH_HLEN + 16)?,
        sport: read(ctx, l4)?,
        dport: read(ctx, l4 + 2)?,
        proto,
        tcp_flags,
    })
}

/// The packet and what was looked up, when the destination's ingress
/// policy certainly refuses it.
#[inline(always)]
fn denied(ctx: &XdpContext) -> Option<(LbConfig, Tuple, EndpointValue, IpcacheValue)> {
    let cfg = *CONFIG.get(0)?;
    if cfg.ready == 0 || cfg.flags & CFG_F_POLICY == 0 {
        return None;
    }
    let t = parse(ctx)?;
    // SAFETY: userspace writes whole values; copied at once.
    let ep = unsafe { ENDPOINTS.get(&t.daddr).copied() }?;
    if ep.flags & EP_F_INGRESS_ISOLATED == 0 {
        return None;
    }
    if known_connection(&t) {
        return None;
    }
    let src = policy::ipcache(t.saddr);
    // The pod hook admits the host identity without rules; so must this.
    if src.identity == ID_HOST {
        return None;
    }
    if admitted(ep.endpoint, &src, t.proto, t.dport) {
        return None;
    }
    Some((cfg, t, ep, src))
}

/// A reply of a connection some side admitted, or a connection the
/// destination's ingress already admitted. Lookups only: the pod hooks
/// refresh the entries.
#[inline(always)]
fn known_connection(t: &Tuple) -> bool {
    let forward = CtKey {
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        dir: 0,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    if let Some(e) = unsafe { POLICY_CT.get(&forward) }
        && e.flags & PCT_F_INGRESS_OK != 0
    {
        return true;
    }
    let reply = CtKey {
        saddr: t.daddr,
        daddr: t.saddr,
        sport: t.dport,
        dport: t.sport,
        ..forward
    };
    // SAFETY: as above.
    unsafe { POLICY_CT.get(&reply) }.is_some()
}

/// Whether an ingress rule of endpoint `ep` admits `src` to `port`: the
/// source's identity, then its CIDR identity, then any peer (the order the
/// pod hook uses; here only the yes/no matters, so an identity equal to
/// one already looked up is skipped: a flood from an unknown address has
/// WORLD for both).
#[inline(always)]
fn admitted(ep: u32, src: &IpcacheValue, proto: u8, port: u16) -> bool {
    let mut key = PolicyKey {
        prefix_len: POLICY_PREFIX_EXACT,
        endpoint: ep.to_be(),
        identity: 0,
        direction: DIR_INGRESS,
        proto,
        port,
    };
    if rule_exists(&mut key, src.identity) {
        return true;
    }
    if src.cidr_identity != src.identity && rule_exists(&mut key, src.cidr_identity) {
        return true;
    }
    src.identity != ID_ANY && src.cidr_identity != ID_ANY && rule_exists(&mut key, ID_ANY)
}

#[inline(always)]
fn rule_exists(key: &mut PolicyKey, identity: u32) -> bool {
    key.identity = identity.to_be();
    // SAFETY: aya's LPM key is `#[repr(C, packed)] {prefix_len: u32,
    // data: [u8; 12]}`: the same 16 bytes as PolicyKey (repr(C), no
    // padding), with alignment 1.
    let k: &Key<[u8; 12]> = unsafe { &*(key as *const PolicyKey).cast() };
    POLICY.get(k).is_some()
}
