use std::{net::Ipv4Addr, path::PathBuf};

use skep_ebpf_common::{
    DEFAULT_AFFINITY_ENTRIES, DEFAULT_CT_ENTRIES, DEFAULT_ENDPOINT_ENTRIES,
    DEFAULT_FLOW_RING_BYTES, DEFAULT_IPCACHE_ENTRIES, DEFAULT_MAGLEV_SIZE, DEFAULT_MAX_BACKENDS,
    DEFAULT_MAX_SERVICES, DEFAULT_POLICY_CT_ENTRIES, DEFAULT_POLICY_ENTRIES, DEFAULT_SNAT_PORT_MAX,
    DEFAULT_SNAT_PORT_MIN, DEFAULT_SOCK_REVNAT_ENTRIES,
};

use crate::DataplaneError;

/// Sizes and addresses of the load balancer. Map sizes are fixed when the
/// maps are first created (and pinned); a loader with different sizes than
/// the pinned maps is refused.
///
/// Memory: the Maglev map is `max_frontends × maglev_size × 4` bytes,
/// preallocated. The default (1024 × 16381) is 64 MiB. For 10,000 services
/// pick a smaller prime table: e.g. 12,000 frontends × 1021 ≈ 47 MiB
/// (fine for Services with up to ≈ 10 endpoints; Maglev wants M ≥ 100 × N
/// for ≤ 1 % imbalance), or 12,000 × 4093 ≈ 187 MiB.
#[derive(Clone, Debug)]
pub struct LbSettings {
    /// bpffs directory holding `maps/`, `progs/` and `links/`.
    pub pin_root: PathBuf,
    /// Maglev table size per frontend; must be prime.
    pub maglev_size: u32,
    /// Frontends = (VIP, port, protocol) triples; a Service has one per port.
    pub max_frontends: u32,
    /// Backends over all frontends (one per frontend × endpoint).
    pub max_backends: u32,
    /// Conntrack entries (two per connection).
    pub ct_entries: u32,
    /// ClientIP affinity entries (one per client × frontend).
    pub affinity_entries: u32,
    /// Socket-LB reverse records (one per socket × backend in use).
    pub sock_revnat_entries: u32,
    /// Source address a pod sees when it reaches itself through a Service.
    pub hairpin_addr: Ipv4Addr,
    /// NetworkPolicy ipcache entries (addresses and CIDRs with an identity).
    pub ipcache_entries: u32,
    /// Local endpoints (pods) policy knows.
    pub endpoint_entries: u32,
    /// Policy rule keys (a port range takes a few).
    pub policy_entries: u32,
    /// Policy conntrack entries (one per connection seen by a pod hook).
    pub policy_ct_entries: u32,
    /// Bytes of the flow event ring buffer (a power of two, at least a page).
    pub flow_ring_bytes: u32,
    /// Source ports (inclusive) of external connections SNATed to the
    /// node; keep them outside `net.ipv4.ip_local_port_range`.
    pub snat_ports: (u16, u16),
}

impl Default for LbSettings {
    fn default() -> Self {
        Self {
            pin_root: PathBuf::from("/sys/fs/bpf/skep"),
            maglev_size: DEFAULT_MAGLEV_SIZE,
            max_frontends: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            ct_entries: DEFAULT_CT_ENTRIES,
            affinity_entries: DEFAULT_AFFINITY_ENTRIES,
            sock_revnat_entries: DEFAULT_SOCK_REVNAT_ENTRIES,
            hairpin_addr: Ipv4Addr::new(169, 254, 42, 1),
            ipcache_entries: DEFAULT_IPCACHE_ENTRIES,
            endpoint_entries: DEFAULT_ENDPOINT_ENTRIES,
            policy_entries: DEFAULT_POLICY_ENTRIES,
            policy_ct_entries: DEFAULT_POLICY_CT_ENTRIES,
            flow_ring_bytes: DEFAULT_FLOW_RING_BYTES,
            snat_ports: (DEFAULT_SNAT_PORT_MIN, DEFAULT_SNAT_PORT_MAX),
        }
    }
}

impl LbSettings {
    /// Checks the sizes before anything is created.
    pub fn validate(&self) -> Result<(), DataplaneError> {
        let bad = |what: String| Err(DataplaneError::Config(what));
        if self.snat_ports.0 == 0 || self.snat_ports.0 > self.snat_ports.1 {
            return bad(format!(
                "SNAT port range {}-{} is empty or starts at 0",
                self.snat_ports.0, self.snat_ports.1
            ));
        }
        if !super::maglev::is_prime(self.maglev_size) || self.maglev_size < 3 {
            return bad(format!(
                "maglev table size {} is not a prime ≥ 3 (try 16381, 4093, 1021 or 251)",
                self.maglev_size
            ));
        }
        if u64::from(self.max_frontends) * u64::from(self.maglev_size) > u64::from(u32::MAX) {
            return bad(format!(
                "max_frontends {} × maglev table size {} exceeds 2^32 slots; lower one of them",
                self.max_frontends, self.maglev_size
            ));
        }
        for (name, v) in [
            ("max_frontends", self.max_frontends),
            ("max_backends", self.max_backends),
            ("ct_entries", self.ct_entries),
            ("affinity_entries", self.affinity_entries),
            ("sock_revnat_entries", self.sock_revnat_entries),
            ("ipcache_entries", self.ipcache_entries),
            ("endpoint_entries", self.endpoint_entries),
            ("policy_entries", self.policy_entries),
            ("policy_ct_entries", self.policy_ct_entries),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if !self.flow_ring_bytes.is_power_of_two() || self.flow_ring_bytes < 4096 {
            return bad(format!(
                "flow_ring_bytes {} must be a power of two of at least 4096 (one page)",
                self.flow_ring_bytes
            ));
        }
        Ok(())
    }

    /// Bytes the Maglev map preallocates.
    pub fn maglev_bytes(&self) -> u64 {
        u64::from(self.max_frontends) * u64::from(self.maglev_size) * 4
    }
}
