//! `tc_count`: a TC classifier (any direction) that counts packets and bytes
//! per interface in a per-CPU hash map and lets every packet through.
//! Per-CPU values avoid atomics, which keeps the program loadable on 5.10
//! (no BPF_ATOMIC_FETCH there).

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::PerCpuHashMap,
    programs::TcContext,
};
use skep_ebpf_common::{IFACE_STATS_MAX_ENTRIES, IfaceStats};

#[map(name = "IFACE_STATS")]
static IFACE_STATS: PerCpuHashMap<u32, IfaceStats> =
    PerCpuHashMap::with_max_entries(IFACE_STATS_MAX_ENTRIES, 0);

#[classifier]
pub fn tc_count(ctx: TcContext) -> i32 {
    // SAFETY: `skb` points at the kernel's __sk_buff for this invocation.
    let (ifindex, len) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).len) };
    match IFACE_STATS.get_ptr_mut(&ifindex) {
        Some(stats) => {
            // SAFETY: the pointer comes from a map lookup on this CPU's slot
            // of a per-CPU map; no other CPU writes it.
            unsafe {
                (*stats).packets += 1;
                (*stats).bytes += u64::from(len);
            }
        }
        None => {
            let first = IfaceStats {
                packets: 1,
                bytes: u64::from(len),
            };
            // A full map only loses counts, never packets.
            let _ = IFACE_STATS.insert(&ifindex, &first, 0);
        }
    }
    TC_ACT_OK
}
