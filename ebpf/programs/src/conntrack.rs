//! Connection tracking for load-balanced flows: two entries per connection in
//! one LRU hash, a forward one keyed by the client's pre-DNAT tuple (→ the
//! backend) and a reply one keyed by the backend → client tuple (→ the
//! frontend to restore). Userspace reads them for `skep ctl svc`/tests and
//! garbage-collects idle ones.

use skep_ebpf_common::{
    BackendValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_CLOSING, CtKey, CtValue, LbCounter,
};

use crate::{
    maps::{CT, count},
    packet::{Packet, TCP_FIN, TCP_RST},
};

#[inline(always)]
pub fn forward_key(p: &Packet) -> CtKey {
    CtKey {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    }
}

/// The key of replies as the to-pod hook sees them (after any hairpin
/// un-SNAT): backend → client.
#[inline(always)]
pub fn reply_key(p: &Packet) -> CtKey {
    CtKey {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    }
}

/// Marks an entry used by this packet. Plain stores: a lost update between
/// CPUs only makes a timestamp a little older.
#[inline(always)]
pub fn touch(entry: *mut CtValue, p: &Packet, now: u64) {
    // SAFETY: `entry` comes from a successful lookup in CT; LRU values stay
    // valid memory for the duration of the program (RCU).
    unsafe {
        (*entry).last_seen_ns = now;
        (*entry).packets += 1;
        if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            (*entry).flags |= CT_F_CLOSING;
        }
    }
}

/// Records a new connection to `backend` (no SNAT): the forward entry
/// (client's tuple → backend), then the reply entry (backend → client's
/// tuple → the frontend to restore). A failed insert is counted; the
/// packet is still forwarded and the next one retries.
#[inline(always)]
pub fn create(
    p: &Packet,
    backend_id: u32,
    backend: &BackendValue,
    service_id: u32,
    flags: u8,
    now: u64,
) {
    let forward = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags,
        _pad: 0,
        backend_id,
        service_id,
        last_seen_ns: now,
        packets: 1,
        snat_addr: 0,
        snat_port: 0,
        _pad2: 0,
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
    let ok = CT.insert(&forward_key(p), &forward, 0).is_ok() && {
        let reply = CtValue {
            nat_addr: p.daddr,
            nat_port: p.dport,
            packets: 0,
            ..forward
        };
        CT.insert(&reply_key, &reply, 0).is_ok()
    };
    if !ok {
        count(LbCounter::CtInsertFailed);
    }
    count(LbCounter::NewConnection);
}

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtValue> {
    CT.get_ptr_mut(key)
}
