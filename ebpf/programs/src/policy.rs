//! NetworkPolicy enforcement in the pod hooks, by security identity as
//! Cilium does it: the ipcache maps a peer address to its identity (and
//! the identity of the most specific ipBlock CIDR holding it), the policy
//! trie holds each local endpoint's allow rules keyed by (endpoint, peer
//! identity, direction, protocol, port prefix), and a policy conntrack
//! remembers which connections each side admitted.
//!
//! Only the first packet of a connection is judged (or, after the
//! conntrack forgot it or enforcement was just turned on, its next packet:
//! a mid-stream packet without an entry is judged like a new one). A TCP
//! SYN on the entry of a connection that has closed is judged too: the
//! entry belongs to an earlier connection from the same port (a quick
//! reconnect, TIME_WAIT reuse), admitted under the rules of its time.
//! Connections admitted once keep passing after a policy change until
//! their entry goes idle and the agent's sweep or the LRU removes it,
//! the way Cilium and iptables-based implementations behave; new
//! connections see the new rules at once.
//!
//! Only local endpoints (addresses in `SKEP_ENDPOINTS`) are tracked and
//! observed: traffic of the node's other interfaces passes untouched.

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use core::intrinsics::{AtomicOrdering, atomic_xadd};
use skep_ebpf_common::{
    CFG_F_POLICY, CtKey, DIR_EGRESS, DIR_INGRESS, DROP_NO_BACKEND, DROP_NONE, DROP_POLICY_EGRESS,
    DROP_POLICY_INGRESS, EP_F_EGRESS_ISOLATED, EP_F_INGRESS_ISOLATED, EndpointValue, ID_ANY,
    ID_HOST, ID_WORLD, IPPROTO_TCP, IpcacheValue, LbConfig, LbCounter, OBS_FROM_POD, OBS_TO_POD,
    PCT_F_CLOSING, PCT_F_EGRESS_OK, PCT_F_INGRESS_OK, POLICY_ID_HOST, POLICY_ID_NONE,
    POLICY_PREFIX_EXACT, PolicyCtValue, PolicyKey,
};

use crate::{
    flow::{self, Outcome},
    maps::{ENDPOINTS, IPCACHE, POLICY, POLICY_CT, POLICY_CT_GEN, count},
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// The ipcache's answer for `addr`: longest prefix, WORLD when unknown.
#[inline(always)]
pub fn ipcache(addr: u32) -> IpcacheValue {
    let key = Key::new(32, addr);
    match IPCACHE.get(&key) {
        Some(v) => *v,
        None => IpcacheValue {
            identity: ID_WORLD,
            cidr_identity: ID_WORLD,
        },
    }
}

#[inline(always)]
fn endpoint(addr: u32) -> Option<EndpointValue> {
    // SAFETY: userspace writes whole values; copied at once.
    unsafe { ENDPOINTS.get(addr).copied() }
}

/// The rule admitting `peer` for `ep` in `direction` to `port`, if any:
/// the peer's own identity first, then its CIDR identity, then any peer.
/// Returns the policy id of the rule.
#[inline(always)]
fn rule(ep: u32, peer: &IpcacheValue, direction: u8, proto: u8, port: u16) -> Option<u32> {
    let mut key = PolicyKey {
        prefix_len: POLICY_PREFIX_EXACT,
        endpoint: ep.to_be(),
        identity: peer.identity.to_be(),
        direction,
        proto,
        port,
    };
    for identity in [peer.identity, peer.cidr_identity, ID_ANY] {
        key.identity = identity.to_be();
        // SAFETY: aya's LPM key is `#[repr(C, packed)] {prefix_len: u32,
        // data}`: with 12 data bytes the same 16 bytes as PolicyKey
        // (repr(C), no padding), and its alignment is 1.
        let k: &Key<[u8; 12]> = unsafe { &*(&key as *const PolicyKey).cast() };
        if let Some(v) = POLICY.get(k) {
            return Some(v.policy_id);
        }
    }
    None
}

#[inline(always)]
fn reversed(k: &CtKey) -> CtKey {
    CtKey {
        saddr: k.daddr,
        daddr: k.saddr,
        sport: k.dport,
        dport: k.sport,
        proto: k.proto,
        dir: 0,
        _pad: 0,
    }
}

/// Marks an entry used by this packet (plain stores: a lost update only
/// ages a timestamp a little).
#[inline(always)]
fn touch(e: *mut PolicyCtValue, p: &Packet, now: u64) {
    // SAFETY: `e` comes from a successful lookup in POLICY_CT; LRU values
    // stay valid memory for the duration of the program (RCU).
    unsafe {
        (*e).last_seen_ns = now;
        if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            (*e).flags |= PCT_F_CLOSING;
        }
    }
}

/// An existing entry for the tuple that already has `flag` (pass), or the
/// reversed tuple (a reply: pass), unless the packet reopens a closed
/// connection. `Err` carries the tuple's entry, if any, for [`admit`] to
/// merge into.
#[inline(always)]
fn known(key: &CtKey, flag: u32, p: &Packet, now: u64) -> Result<(), Option<*mut PolicyCtValue>> {
    let existing = POLICY_CT.get_ptr_mut(key);
    let opening = opens_connection(p);
    if let Some(e) = existing {
        // SAFETY: pointer from a successful lookup.
        let flags = unsafe { (*e).flags };
        if flags & flag != 0 && !reopens(opening, flags) {
            touch(e, p, now);
            return Ok(());
        }
    }
    if let Some(e) = POLICY_CT.get_ptr_mut(reversed(key)) {
        // SAFETY: pointer from a successful lookup.
        if !reopens(opening, unsafe { (*e).flags }) {
            touch(e, p, now);
            return Ok(());
        }
    }
    Err(existing)
}

/// A TCP SYN without ACK: a connection attempt (a new one, or the
/// retransmission of one).
#[inline(always)]
fn opens_connection(p: &Packet) -> bool {
    p.proto == IPPROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// A connection attempt on the entry of a connection that has closed (FIN
/// or RST seen): a new connection on the same tuple (a quick reconnect
/// from the same port, TIME_WAIT reuse), judged by the rules of now, not
/// by the admission of the old one. A retransmitted SYN of a live attempt
/// finds its entry open and passes on it.
#[inline(always)]
fn reopens(opening: bool, entry_flags: u32) -> bool {
    opening && entry_flags & PCT_F_CLOSING != 0
}

/// Records that this side admitted the connection.
#[inline(always)]
fn admit(
    key: &CtKey,
    existing: Option<*mut PolicyCtValue>,
    p: &Packet,
    flag: u32,
    src_identity: u32,
    dst_identity: u32,
    now: u64,
) {
    match existing {
        // SAFETY: pointer from a successful lookup in this invocation.
        Some(e) => unsafe {
            if reopens(opens_connection(p), (*e).flags) {
                // The old connection's admissions and closing state are
                // not the new one's.
                (*e).flags = flag;
                (*e).src_identity = src_identity;
                (*e).dst_identity = dst_identity;
            } else {
                (*e).flags |= flag;
            }
            (*e).last_seen_ns = now;
        },
        None => {
            let v = PolicyCtValue {
                flags: flag,
                src_identity,
                dst_identity,
                _pad: 0,
                last_seen_ns: now,
            };
            // A failed insert only means the next packet is judged again.
            let _ = POLICY_CT.insert(key, v, 0);
        }
    }
    bump_ct_generation();
}

/// After an admission: denials `xdp_policy` cached before it must look at
/// the conntrack again (the admitted connection's packets would be
/// among them).
#[inline(always)]
fn bump_ct_generation() {
    if let Some(g) = POLICY_CT_GEN.get_ptr_mut(0) {
        // SAFETY: an array value: a u64, 8-byte aligned, valid while the
        // program runs. Atomic because every CPU bumps it (a lost update
        // could leave it unchanged); the result is unused, so LLVM emits
        // the plain atomic add every kernel accepts, not the fetch form
        // that needs 5.12 (`core`'s AtomicU64 has no fetch_add on this
        // target, hence the intrinsic).
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(g, 1) };
    }
}

/// Egress of the source pod (from-pod hook), on the post-DNAT tuple
/// (`daddr`, `dport`); `orig` is the service frontend when DNATed.
/// `true` lets the packet pass.
#[inline(always)]
pub fn egress(
    ctx: &TcContext,
    cfg: &LbConfig,
    p: &Packet,
    daddr: u32,
    dport: u16,
    orig: (u32, u16),
    now: u64,
) -> bool {
    let key = CtKey {
        saddr: p.saddr,
        daddr,
        sport: p.sport,
        dport,
        proto: p.proto,
        dir: 0,
        _pad: 0,
    };
    let existing = match known(&key, PCT_F_EGRESS_OK, p, now) {
        Ok(()) => return true,
        Err(existing) => existing,
    };
    let Some(src) = endpoint(p.saddr) else {
        return true;
    };
    let dst = ipcache(daddr);
    let isolated = cfg.flags & CFG_F_POLICY != 0 && src.flags & EP_F_EGRESS_ISOLATED != 0;
    let mut out = Outcome {
        daddr,
        dport,
        orig_daddr: orig.0,
        orig_dport: orig.1,
        src_identity: src.identity,
        dst_identity: dst.identity,
        policy_id: POLICY_ID_NONE,
        drop_reason: DROP_NONE,
        observation: OBS_FROM_POD,
    };
    if isolated {
        match rule(src.endpoint, &dst, DIR_EGRESS, p.proto, dport) {
            Some(id) => {
                out.policy_id = id;
                count(LbCounter::PolicyAllowed);
            }
            None => {
                out.drop_reason = DROP_POLICY_EGRESS;
                count(LbCounter::PolicyDeniedEgress);
                flow::emit(ctx, cfg, p, &out);
                return false;
            }
        }
    }
    admit(
        &key,
        existing,
        p,
        PCT_F_EGRESS_OK,
        src.identity,
        dst.identity,
        now,
    );
    flow::emit(ctx, cfg, p, &out);
    true
}

/// Ingress of the destination pod (to-pod hook), on the packet as it
/// arrives (before reverse NAT, so replies match the reversed from-pod
/// tuple). `true` lets the packet pass.
#[inline(always)]
pub fn ingress(ctx: &TcContext, cfg: &LbConfig, p: &Packet, now: u64) -> bool {
    // SAFETY: reading fields of this invocation's skb.
    let (ifindex, in_ifindex) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).ingress_ifindex) };
    if in_ifindex == ifindex {
        // Back out of the interface it came in on: the pod reaching itself
        // through a service (hairpin), or the refusal the from-pod hook
        // bounced. The pod's own traffic is never subject to its policy.
        return true;
    }
    let Some(dst) = endpoint(p.daddr) else {
        return true;
    };
    let key = CtKey {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        dir: 0,
        _pad: 0,
    };
    let existing = match known(&key, PCT_F_INGRESS_OK, p, now) {
        Ok(()) => return true,
        Err(existing) => existing,
    };
    // Sent by the node's own stack (no ingress interface): the host.
    let src = if in_ifindex == 0 {
        IpcacheValue {
            identity: ID_HOST,
            cidr_identity: ID_WORLD,
        }
    } else {
        ipcache(p.saddr)
    };
    let isolated = cfg.flags & CFG_F_POLICY != 0 && dst.flags & EP_F_INGRESS_ISOLATED != 0;
    let mut out = Outcome {
        daddr: p.daddr,
        dport: p.dport,
        orig_daddr: 0,
        orig_dport: 0,
        src_identity: src.identity,
        dst_identity: dst.identity,
        policy_id: POLICY_ID_NONE,
        drop_reason: DROP_NONE,
        observation: OBS_TO_POD,
    };
    if isolated {
        if src.identity == ID_HOST {
            // The own node (probes, hostNetwork pods) is always admitted.
            out.policy_id = POLICY_ID_HOST;
        } else {
            match rule(dst.endpoint, &src, DIR_INGRESS, p.proto, p.dport) {
                Some(id) => out.policy_id = id,
                None => {
                    out.drop_reason = DROP_POLICY_INGRESS;
                    count(LbCounter::PolicyDeniedIngress);
                    flow::emit(ctx, cfg, p, &out);
                    return false;
                }
            }
        }
        count(LbCounter::PolicyAllowed);
    }
    admit(
        &key,
        existing,
        p,
        PCT_F_INGRESS_OK,
        src.identity,
        dst.identity,
        now,
    );
    flow::emit(ctx, cfg, p, &out);
    true
}

/// A connection refused because its service has no backends: a DROPPED
/// event (the refusal itself is `reject`'s job).
#[inline(always)]
pub fn no_backend(ctx: &TcContext, cfg: &LbConfig, p: &Packet) {
    let out = Outcome {
        daddr: p.daddr,
        dport: p.dport,
        orig_daddr: p.daddr,
        orig_dport: p.dport,
        src_identity: ipcache(p.saddr).identity,
        dst_identity: ipcache(p.daddr).identity,
        policy_id: POLICY_ID_NONE,
        drop_reason: DROP_NO_BACKEND,
        observation: OBS_FROM_POD,
    };
    flow::emit(ctx, cfg, p, &out);
}
