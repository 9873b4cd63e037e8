//! Every map of the load balancer, in one place so that both hooks (and
//! userspace, through the names in `skep_ebpf_common::names`) agree on them.
//! Sizes here are small placeholders: userspace always sets the real ones at
//! load time from its configuration (`LbSettings`), and pins the maps so a
//! restarted agent re-adopts them. Small placeholders keep a plain
//! `Ebpf::load` of the object (e.g. the verifier test) cheap.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use skep_ebpf_common::{
    AffinityKey, AffinityValue, BackendValue, CtKey, CtValue, DenyEntry, EndpointValue,
    IpcacheValue, LB_COUNTERS, LbConfig, LbCounter, PolicyCtValue, PolicyValue, ServiceKey,
    ServiceValue, SockRevKey, SockRevValue, XDP_DENY_SLOTS,
};

const PLACEHOLDER_FRONTENDS: u32 = 64;
const PLACEHOLDER_MAGLEV_SIZE: u32 = 251;
const PLACEHOLDER_ENTRIES: u32 = 1024;
const PLACEHOLDER_RING_BYTES: u32 = 64 * 1024;

#[map(name = "SKEP_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(PLACEHOLDER_FRONTENDS, 0);

#[map(name = "SKEP_BACKENDS")]
pub static BACKENDS: HashMap<u32, BackendValue> = HashMap::with_max_entries(PLACEHOLDER_ENTRIES, 0);

/// One row of `maglev_size` backend ids per frontend id. An array (not a
/// map of maps: aya-ebpf 0.2.1 cannot declare those) sized
/// max_services * maglev_size by userspace. Mmapable (Linux ≥ 5.5), so
/// userspace writes rows with plain stores instead of one syscall per slot.
#[map(name = "SKEP_MAGLEV")]
pub static MAGLEV: Array<u32> = Array::with_max_entries(
    PLACEHOLDER_FRONTENDS * PLACEHOLDER_MAGLEV_SIZE,
    skep_ebpf_common::MAGLEV_MAP_FLAGS,
);

/// LRU so that a full table evicts the least recently used flow instead of
/// refusing new connections.
#[map(name = "SKEP_CT")]
pub static CT: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(PLACEHOLDER_ENTRIES, 0);

#[map(name = "SKEP_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(PLACEHOLDER_ENTRIES, 0);

#[map(name = "SKEP_SOCK_RNAT")]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::with_max_entries(PLACEHOLDER_ENTRIES, 0);

/// Address or CIDR (prefix, network-order address) → identity. aya-ebpf's
/// LPM key is `{prefix_len, data}`, the same bytes as `IpcacheKey`.
#[map(name = "SKEP_IPCACHE")]
pub static IPCACHE: LpmTrie<u32, IpcacheValue> = LpmTrie::with_max_entries(PLACEHOLDER_ENTRIES, 0);

#[map(name = "SKEP_ENDPOINTS")]
pub static ENDPOINTS: HashMap<u32, EndpointValue> =
    HashMap::with_max_entries(PLACEHOLDER_ENTRIES, 0);

/// Allow rules. The data is the 12 bytes after `PolicyKey::prefix_len`
/// (endpoint, identity, direction, protocol, port); see `PolicyKey`.
#[map(name = "SKEP_POLICY")]
pub static POLICY: LpmTrie<[u8; 12], PolicyValue> =
    LpmTrie::with_max_entries(PLACEHOLDER_ENTRIES, 0);

/// LRU: a full table forgets the least recently used connection (which
/// is then judged again by its next packet) instead of refusing new ones.
#[map(name = "SKEP_POLICY_CT")]
pub static POLICY_CT: LruHashMap<CtKey, PolicyCtValue> =
    LruHashMap::with_max_entries(PLACEHOLDER_ENTRIES, 0);

/// The policy generation (one u64): bumped by userspace (`KernelPolicy`)
/// after each change of IPCACHE, ENDPOINTS or POLICY. Its own map, not a
/// field of CONFIG: CONFIG is rewritten whole by the load balancer side.
#[map(name = "SKEP_POLICY_GEN")]
pub static POLICY_GEN: Array<u64> = Array::with_max_entries(1, 0);

/// The policy conntrack generation (one u64): bumped by the pod hooks
/// after each admission into POLICY_CT, so `xdp_policy` knows when a
/// cached denial must look at the conntrack again. Pinned with POLICY_CT:
/// the hooks and `xdp_node` of every loader must share one.
#[map(name = "SKEP_POLICY_CT_GEN")]
pub static POLICY_CT_GEN: Array<u64> = Array::with_max_entries(1, 0);

/// `xdp_policy`'s recent denials, valid while their generation is
/// current: a direct-mapped table per CPU. Not a hash map: an array slot
/// is found without a hash-table walk or lock (the lookup is inlined), and
/// per CPU no other writer can tear a slot while it is read. Not pinned
/// (a new loader starts empty).
#[map(name = "SKEP_XDP_DENY")]
pub static XDP_DENY: PerCpuArray<DenyEntry> = PerCpuArray::with_max_entries(XDP_DENY_SLOTS, 0);

/// Flow events; userspace sizes it (a power of two multiple of the page).
#[map(name = "SKEP_FLOWS")]
pub static FLOWS: RingBuf = RingBuf::with_byte_size(PLACEHOLDER_RING_BYTES, 0);

/// Per-CPU budget of `xdp_policy`'s drop events: [second of the window,
/// events sent in it, drops counted while it was spent]. Not pinned: a new loader starting a fresh budget
/// is harmless.
#[map(name = "SKEP_XDP_EVBUDGET")]
pub static XDP_EVENT_BUDGET: PerCpuArray<[u64; 3]> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space for bpf_fib_lookup's parameters (too big for
/// the 512-byte stack next to the hooks' other state). Not pinned.
#[map(name = "SKEP_FIB_SCRATCH")]
pub static FIB_SCRATCH: PerCpuArray<crate::snat::FibParams> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "SKEP_LB_CONFIG")]
pub static CONFIG: Array<LbConfig> = Array::with_max_entries(1, 0);

/// Per-CPU so counting needs no atomics (none with fetch semantics on 5.10).
#[map(name = "SKEP_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LB_COUNTERS, 0);

#[inline(always)]
pub fn count(counter: LbCounter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array; nothing
        // else writes it while this program runs (no preemption in BPF).
        unsafe { *slot += 1 };
    }
}

/// [mesh] capture: the app socket's cookie → where its connect() was going
/// (`mesh_connect4` writes, the sidecar reads after finding the app
/// socket's cookie through sock_diag). LRU: entries of sockets the sidecar
/// never asked about age out instead of filling the map.
#[map(name = "SKEP_MESH_ORIG")]
pub static MESH_ORIG: LruHashMap<u64, skep_ebpf_common::MeshOrigDst> =
    LruHashMap::with_max_entries(PLACEHOLDER_ENTRIES, 0);

/// [mesh] local meshed pods (address → flags): the sidecar's "is the
/// destination meshed" and to_pod's strict-mode refusal.
#[map(name = "SKEP_MESH_PODS")]
pub static MESH_PODS: HashMap<u32, skep_ebpf_common::MeshPod> =
    HashMap::with_max_entries(PLACEHOLDER_ENTRIES, 0);
