//! Service lookup and backend selection: (VIP, port, protocol) → frontend,
//! then ClientIP affinity if the frontend has it, else the frontend's Maglev
//! table row indexed by the flow hash.

use skep_ebpf_common::{
    AffinityKey, AffinityValue, BACKEND_F_TERMINATING, BackendValue, LbConfig, LbCounter,
    ServiceKey, ServiceValue,
};

use crate::{
    maps::{AFFINITY, BACKENDS, MAGLEV, SERVICES, count},
    packet::{Packet, flow_hash},
};

#[inline(always)]
pub fn lookup_service(p: &Packet) -> Option<ServiceValue> {
    lookup_key(&ServiceKey {
        addr: p.daddr,
        port: p.dport,
        proto: p.proto,
        _pad: 0,
    })
}

#[inline(always)]
pub fn lookup_key(key: &ServiceKey) -> Option<ServiceValue> {
    // SAFETY: SERVICES is only written by userspace with whole-value
    // updates; the copy below is taken immediately.
    unsafe { SERVICES.get(key).copied() }
}

#[inline(always)]
pub fn backend(id: u32) -> Option<BackendValue> {
    // SAFETY: as above, a prompt copy of a userspace-written value.
    unsafe { BACKENDS.get(&id).copied() }
}

/// A backend new connections of `svc` may use.
#[inline(always)]
fn usable(b: &BackendValue, svc: &ServiceValue) -> bool {
    b.service_id == svc.id && b.flags & BACKEND_F_TERMINATING == 0
}

/// Picks the backend of a new connection; `None` when the frontend has no
/// usable backend (the caller refuses the connection).
#[inline(always)]
pub fn select(
    p: &Packet,
    svc: &ServiceValue,
    cfg: &LbConfig,
    now: u64,
) -> Option<(u32, BackendValue)> {
    let akey = AffinityKey {
        client_addr: p.saddr,
        service_id: svc.id,
    };
    if svc.affinity_timeout_s != 0 {
        if let Some(a) = AFFINITY.get_ptr_mut(&akey) {
            // SAFETY: pointer from a successful lookup; plain stores only.
            let (id, last) = unsafe { ((*a).backend_id, (*a).last_used_ns) };
            let timeout = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
            if now.wrapping_sub(last) < timeout
                && let Some(b) = backend(id)
                && usable(&b, svc)
            {
                // SAFETY: as above.
                unsafe { (*a).last_used_ns = now };
                count(LbCounter::AffinityHit);
                return Some((id, b));
            }
        }
    }
    let size = cfg.maglev_size;
    if size == 0 {
        return None;
    }
    let slot = flow_hash(p) % size;
    let id = *MAGLEV.get(svc.id.wrapping_mul(size).wrapping_add(slot))?;
    let b = backend(id)?;
    if !usable(&b, svc) {
        return None;
    }
    if svc.affinity_timeout_s != 0 {
        let v = AffinityValue {
            backend_id: id,
            _pad: 0,
            last_used_ns: now,
        };
        // Losing an affinity record (full LRU) only loses stickiness.
        let _ = AFFINITY.insert(&akey, &v, 0);
    }
    Some((id, b))
}
