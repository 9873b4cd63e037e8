//! Connection tracking for load-balanced flows: two entries per connection in
//! one LRU hash, a forward one keyed by the client's pre-DNAT tuple (→ the
//! backend) and a reply one keyed by the backend → client tuple (→ the
//! frontend to restore). Userspace reads them for `skep ctl svc`/tests and
//! garbage-collects idle ones.

use skep_ebpf_common::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_CLOSING, CtKey, CtValue};

use crate::{
    maps::CT,
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

/// Records a new connection: forward entry, then the reply entry.
#[inline(always)]
pub fn create(
    p: &Packet,
    forward: &CtValue,
    reply_key: &CtKey,
    reply: &CtValue,
) -> Result<(), i64> {
    CT.insert(&forward_key(p), forward, 0).map_err(i64::from)?;
    CT.insert(reply_key, reply, 0).map_err(i64::from)
}

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtValue> {
    CT.get_ptr_mut(key)
}
