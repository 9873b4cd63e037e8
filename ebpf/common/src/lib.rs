//! Types shared by the kernel programs (`ebpf/programs`) and userspace
//! (`dataplane`). Everything here is `#[repr(C)]`, `Copy`, and free of
//! padding surprises, because the kernel and userspace read the same bytes.
#![no_std]

/// Names of the maps and programs in the eBPF object. Userspace looks them up
/// by these names, so both sides use the constants.
pub mod names {
    /// TC classifier that counts packets and bytes per interface.
    pub const PROG_TC_COUNT: &str = "tc_count";
    /// Per-CPU hash map: ifindex (u32) -> [`super::IfaceStats`].
    pub const MAP_IFACE_STATS: &str = "IFACE_STATS";
}

/// Maximum number of interfaces the packet counter tracks.
pub const IFACE_STATS_MAX_ENTRIES: u32 = 4096;

/// Packet and byte counters of one interface (one CPU's share when read from
/// a per-CPU map; userspace sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceStats {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
// SAFETY: IfaceStats is #[repr(C)], Copy, made of two u64 with no padding, so
// any byte pattern of its size is a valid value.
unsafe impl aya::Pod for IfaceStats {}
