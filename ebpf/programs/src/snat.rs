//! Source NAT of external connections to remote backends, shared by the TC
//! hooks and `xdp_node` on the node's external interface.
//!
//! A client outside the cluster reaches (node, NodePort). When the chosen
//! backend runs on another node, its replies would go straight from the
//! pod to the client with the pod's address as source, which the client
//! has never heard of. So the connection leaves this node from
//! (node address, SNAT port): the backend answers to this node, and the
//! reply entry turns it back into (frontend → client).
//!
//! Both directions then need forwarding by this node, and after the
//! translation both carry one of this node's addresses as source (the
//! SNAT address going to the backend, the frontend going back to the
//! client): handed back to the stack on ingress, they would be dropped as
//! martians. So they are sent on after a FIB lookup, by XDP_TX / redirect
//! in `xdp_node`, or by `bpf_redirect`/`bpf_redirect_neigh` in TC when XDP
//! cannot finish (no neighbour entry yet).

use aya_ebpf::{
    bindings::{BPF_NOEXIST, bpf_fib_lookup as FibLookup},
    helpers::generated::bpf_fib_lookup,
};
use skep_ebpf_common::{
    BackendValue, CT_DIR_REPLY, CT_F_SNAT, CtKey, CtValue, LbConfig, LbCounter,
};

use crate::{
    conntrack,
    maps::{CT, FIB_SCRATCH, count},
    packet::{Packet, flow_hash},
};

/// Ports tried for a new connection before it is refused. A few tries
/// keep the program small; with thousands of ports per backend a
/// collision on all of them means the range is nearly full.
const TRIES: u32 = 4;

/// Whether a new connection of `svc_flags` to `backend`, entering on the
/// external interface, must be source-NATed.
#[inline(always)]
pub fn needed(cfg: &LbConfig, svc_flags: u32, backend: &BackendValue) -> bool {
    cfg.node_addr != 0
        && svc_flags & skep_ebpf_common::SVC_F_EXTERNAL != 0
        && backend.flags & skep_ebpf_common::BACKEND_F_REMOTE != 0
}

/// Takes a free SNAT port for a new connection and records both
/// conntrack entries; returns the forward entry (its `snat_*` fields are
/// the new source), or `None` when every port tried is taken.
#[inline(always)]
pub fn create(
    p: &Packet,
    cfg: &LbConfig,
    backend_id: u32,
    backend: &BackendValue,
    service_id: u32,
    now: u64,
) -> Option<CtValue> {
    let min = u32::from(cfg.snat_port_min);
    let max = u32::from(cfg.snat_port_max);
    if min == 0 || max < min {
        count(LbCounter::SnatExhausted);
        return None;
    }
    let span = max - min + 1;
    // Spelled out so the compiler drops its divide-by-zero panic path
    // (the verifier refuses a program that could end there).
    if span == 0 {
        return None;
    }
    let h = flow_hash(p);
    let reply = CtValue {
        nat_addr: p.daddr,
        nat_port: p.dport,
        flags: CT_F_SNAT,
        _pad: 0,
        backend_id,
        service_id,
        last_seen_ns: now,
        packets: 0,
        snat_addr: p.saddr,
        snat_port: p.sport,
        _pad2: 0,
    };
    let mut i = 0;
    while i < TRIES {
        // Odd stride: successive tries land on different ports.
        let port = (min + h.wrapping_add(i.wrapping_mul(0x9e37_79b1)) % span) as u16;
        let reply_key = CtKey {
            saddr: backend.addr,
            daddr: cfg.node_addr,
            sport: backend.port,
            dport: port.to_be(),
            proto: p.proto,
            dir: CT_DIR_REPLY,
            _pad: 0,
        };
        // NOEXIST: another CPU may be taking the same port right now.
        if CT
            .insert(&reply_key, &reply, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            let forward = CtValue {
                nat_addr: backend.addr,
                nat_port: backend.port,
                flags: CT_F_SNAT,
                _pad: 0,
                backend_id,
                service_id,
                last_seen_ns: now,
                packets: 1,
                snat_addr: cfg.node_addr,
                snat_port: port.to_be(),
                _pad2: 0,
            };
            if CT.insert(&conntrack::forward_key(p), &forward, 0).is_err() {
                // The next packet allocates again; this reply entry ages
                // out through GC.
                count(LbCounter::CtInsertFailed);
            }
            count(LbCounter::SnatNew);
            return Some(forward);
        }
        i += 1;
    }
    count(LbCounter::SnatExhausted);
    None
}

/// The reply entry of a SNATed connection for a packet arriving at the
/// node's address: `(frontend, client)` to write as (source, destination).
#[inline(always)]
pub fn reply(p: &Packet, cfg: &LbConfig, now: u64) -> Option<CtValue> {
    if cfg.node_addr == 0 || p.daddr != cfg.node_addr {
        return None;
    }
    let port = u16::from_be(p.dport);
    if port < cfg.snat_port_min || port > cfg.snat_port_max {
        return None;
    }
    let entry = conntrack::lookup(&conntrack::reply_key(p))?;
    // SAFETY: pointer from a successful lookup; copied at once.
    let ct = unsafe { *entry };
    if ct.flags & CT_F_SNAT == 0 {
        return None;
    }
    conntrack::touch(entry, p, now);
    Some(ct)
}

/// bpf_fib_lookup's parameters, with room to spare: newer kernels may
/// grow the struct, and the helper refuses a buffer shorter than its own
/// definition (older ones accept a longer one).
#[repr(C)]
pub struct FibParams {
    pub p: FibLookup,
    pub _spare: [u8; 16],
}

pub const AF_INET: u8 = 2;
pub const FIB_SUCCESS: i64 = 0;
pub const FIB_NO_NEIGH: i64 = 7;

/// Looks up how to send a packet `src → dst` (network order) that arrived
/// on `ifindex`. `ctx` is the program's context (skb or xdp_md). Returns
/// the helper's answer and its parameters (this CPU's scratch slot, valid
/// until the program ends), or `None` if the scratch slot is missing.
#[inline(always)]
pub fn fib(
    ctx: *mut core::ffi::c_void,
    ifindex: u32,
    p: &Packet,
    src: u32,
    dst: u32,
    tot_len: u16,
) -> Option<(i64, *mut FibParams)> {
    let f = FIB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of a per-CPU array, used only by this
    // program run; an all-zero bpf_fib_lookup is its documented initial
    // state, and the helper gets the slot's exact size.
    unsafe {
        core::ptr::write_bytes(f, 0, 1);
        (*f).p.family = AF_INET;
        (*f).p.l4_protocol = p.proto;
        (*f).p.ifindex = ifindex;
        (*f).p.__bindgen_anon_1.tot_len = tot_len;
        (*f).p.__bindgen_anon_3.ipv4_src = src;
        (*f).p.__bindgen_anon_4.ipv4_dst = dst;
        let rc = bpf_fib_lookup(
            ctx,
            &mut (*f).p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        );
        Some((rc, f))
    }
}
