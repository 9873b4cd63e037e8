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
//! bookkeeping): this program writes no map the hooks read, only its
//! counters and its own denial cache.
//!
//! The denial cache: a flood repeats the same denial, and the lookups
//! behind it (ENDPOINTS, then the IPCACHE and POLICY tries) were most of
//! its cost. A denial is remembered per (source, destination, destination
//! port, protocol) in a small direct-mapped table per CPU, tagged with the
//! policy generation read *before* the decision; userspace bumps the
//! generation after every change of the ipcache, endpoint or rule maps, so
//! an entry is only believed while nothing it stands for changed. The
//! policy conntrack (written by the pod hooks, not covered by the
//! generation) is still checked before a cached denial is applied, so a
//! reply of the pod's own connection, or a connection admitted under an
//! older policy, is never refused by it. Only denials are cached: what
//! passes goes on to the pod hooks, which decide exactly.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_ktime_get_ns, maps::lpm_trie::Key,
    programs::XdpContext,
};
use skep_ebpf_common::{
    CFG_F_FLOWS, CFG_F_POLICY, CtKey, DIR_INGRESS, DROP_POLICY_INGRESS, DenyEntry, DenyKey,
    EP_F_INGRESS_ISOLATED, FlowEvent, ID_ANY, ID_HOST, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    IpcacheValue, LbCounter, OBS_XDP, PCT_F_INGRESS_OK, POLICY_ID_NONE, POLICY_PREFIX_EXACT,
    PolicyKey, VERDICT_DROPPED, XDP_DENY_SLOTS_LOG2,
};

use crate::{
    maps::{
        CONFIG, ENDPOINTS, FLOWS, POLICY, POLICY_CT, POLICY_CT_GEN, POLICY_GEN, XDP_DENY,
        XDP_EVENT_BUDGET, count,
    },
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
/// Past the budget, drops between two reads of the clock (a power of two:
/// the remainder is a mask). At 64 a spent budget is renewed at most
/// ~64 drops late; at flood rates that is microseconds.
const CLOCK_EVERY: u64 = 64;

/// XDP_DROP for a clear denial, else XDP_PASS.
#[inline(always)]
pub fn early_drop(ctx: &XdpContext) -> u32 {
    match denied(ctx) {
        Some(d) => {
            count(LbCounter::XdpPolicyDrop);
            if d.flows {
                report(ctx, &d);
            }
            xdp_action::XDP_DROP
        }
        None => xdp_action::XDP_PASS,
    }
}

/// A DROPPED flow event for `t`, within this CPU's budget.
#[inline(always)]
fn report(ctx: &XdpContext, d: &Denial) {
    let t = &d.t;
    let Some(budget) = XDP_EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it
    // while this program runs.
    unsafe {
        if (*budget)[1] >= EVENTS_PER_CPU_SECOND {
            // This second's budget is spent: once a flood has used it up,
            // reading the clock was the costliest step of each drop, so
            // it is read only every CLOCK_EVERY drops to notice the next
            // second.
            (*budget)[2] += 1;
            if (*budget)[2] % CLOCK_EVERY != 0 {
                return;
            }
        }
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let second = now / 1_000_000_000;
    // SAFETY: as above.
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
        src_identity: d.src_identity,
        dst_identity: d.dst_identity,
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

/// A packet the destination's ingress policy certainly refuses.
struct Denial {
    /// Flow events are wanted.
    flows: bool,
    t: Tuple,
    src_identity: u32,
    dst_identity: u32,
}

/// The denial of this packet, if its destination's ingress policy
/// certainly refuses it.
#[inline(always)]
fn denied(ctx: &XdpContext) -> Option<Denial> {
    let cfg = CONFIG.get(0)?;
    if cfg.ready == 0 || cfg.flags & CFG_F_POLICY == 0 {
        return None;
    }
    let flows = cfg.flags & CFG_F_FLOWS != 0;
    // Read before the maps the decision depends on: a change after this
    // read bumps the generation past the one a new entry records.
    let generation = *POLICY_GEN.get(0)?;
    // Likewise before the conntrack lookups: an admission after this read
    // bumps it past the value an entry records.
    let ct_generation = *POLICY_CT_GEN.get(0)?;
    let t = parse(ctx)?;
    let key = DenyKey {
        saddr: t.saddr,
        daddr: t.daddr,
        dport: t.dport,
        proto: t.proto,
        _pad: 0,
    };
    let slot = XDP_DENY.get_ptr_mut(deny_slot(&key))?;
    // SAFETY: this CPU's slot of a per-CPU array: only this program on
    // this CPU writes it, and never while this invocation reads it.
    let cached = unsafe { *slot };
    if cached.key == key && cached.generation == generation {
        // The entry stands for the ENDPOINTS, IPCACHE and POLICY lookups
        // (their maps are unchanged since: same generation), and for the
        // conntrack lookups of one full tuple while nothing was admitted
        // since (same source port, same conntrack generation): a flood
        // from one port skips them, one from random ports does not.
        if cached.ct_generation != ct_generation || cached.ct_sport != t.sport {
            if known_connection(&t) {
                return None;
            }
            // SAFETY: this CPU's slot, as above.
            unsafe {
                (*slot).ct_generation = ct_generation;
                (*slot).ct_sport = t.sport;
            }
        }
        count(LbCounter::XdpDenyCacheHit);
        return Some(Denial {
            flows,
            t,
            src_identity: cached.src_identity,
            dst_identity: cached.dst_identity,
        });
    }
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
    // SAFETY: as above; a whole-slot store (the previous denial in this
    // slot, if any, is forgotten).
    unsafe {
        *slot = DenyEntry {
            key,
            src_identity: src.identity,
            dst_identity: ep.identity,
            ct_sport: t.sport,
            _pad: 0,
            generation,
            ct_generation,
        };
    }
    Some(Denial {
        flows,
        t,
        src_identity: src.identity,
        dst_identity: ep.identity,
    })
}

/// The cache slot of `key`: a multiplicative hash of its 12 bytes.
#[inline(always)]
fn deny_slot(key: &DenyKey) -> u32 {
    let mixed =
        key.saddr ^ key.daddr.rotate_left(16) ^ (u32::from(key.dport) << 8 | u32::from(key.proto));
    // Fibonacci hashing: the top bits of the product depend on all input
    // bits.
    mixed.wrapping_mul(0x9e37_79b1) >> (32 - XDP_DENY_SLOTS_LOG2)
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
