use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use super::Protocol;
use crate::DataplaneError;

/// A frontend: (VIP, port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// What the kernel knows about a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendState {
    /// Row in the Maglev map.
    pub id: u32,
    /// Backends new connections may use; 0 → connections are refused.
    pub backend_count: u32,
    /// ClientIP affinity timeout in seconds, 0 = none.
    pub affinity_timeout_s: u32,
    /// A NodePort, ExternalIP or LoadBalancer IP: connections entering the
    /// external interface to a remote backend are SNATed to the node.
    pub external: bool,
}

/// A backend of one frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub terminating: bool,
    /// Runs on another node (see [`FrontendState::external`]).
    pub remote: bool,
    /// The frontend id it belongs to.
    pub frontend_id: u32,
}

/// One tracked connection (the forward entry: client → frontend).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackEntry {
    pub client: (Ipv4Addr, u16),
    pub frontend: (Ipv4Addr, u16),
    pub protocol: Protocol,
    pub backend: (Ipv4Addr, u16),
    pub backend_id: u32,
    pub hairpin: bool,
    /// The node address and port an external connection to a remote
    /// backend leaves from (SNAT).
    pub snat: Option<(Ipv4Addr, u16)>,
    pub closing: bool,
    pub packets: u64,
    /// Nanoseconds since the last packet.
    pub idle_ns: u64,
}

/// Idle timeouts of conntrack GC (Cilium's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    /// Established TCP connections.
    pub tcp: Duration,
    /// TCP connections that saw a FIN or RST.
    pub tcp_closing: Duration,
    /// UDP flows.
    pub other: Duration,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self {
            tcp: Duration::from_secs(6 * 3600),
            tcp_closing: Duration::from_secs(10),
            other: Duration::from_secs(60),
        }
    }
}

/// Result of one GC pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtGcStats {
    /// Connections removed.
    pub removed: usize,
    /// Connections left.
    pub live: usize,
    /// Entries the map holds at most (two per connection).
    pub capacity: u32,
}

impl CtGcStats {
    /// Fill level of the conntrack map (0..1); near 1 the LRU starts
    /// evicting live connections: raise `ct_entries`.
    pub fn pressure(&self) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        (self.live * 2) as f64 / f64::from(self.capacity)
    }
}

/// The kernel's counters, summed over CPUs, by name (see
/// `skep_ebpf_common::LB_COUNTER_NAMES`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbCounters(pub BTreeMap<&'static str, u64>);

impl LbCounters {
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }
}

/// Map-level operations of the load balancer. The reconcile logic in
/// [`super::LoadBalancer`] only talks to this trait, so it is unit-tested
/// against [`super::FakeDatapath`].
pub trait Datapath {
    /// Maglev table size of every frontend.
    fn maglev_size(&self) -> u32;
    fn max_frontends(&self) -> u32;
    fn max_backends(&self) -> u32;

    /// Everything programmed now (a restarted agent re-adopts it).
    fn frontends(&self) -> Result<Vec<(Frontend, FrontendState)>, DataplaneError>;
    fn backends(&self) -> Result<Vec<(u32, BackendEntry)>, DataplaneError>;

    fn put_frontend(&mut self, fe: Frontend, state: FrontendState) -> Result<(), DataplaneError>;
    fn delete_frontend(&mut self, fe: Frontend) -> Result<(), DataplaneError>;
    fn put_backend(&mut self, id: u32, backend: BackendEntry) -> Result<(), DataplaneError>;
    fn delete_backend(&mut self, id: u32) -> Result<(), DataplaneError>;
    /// Writes `(slot, backend id)` pairs of a frontend's Maglev row.
    fn write_maglev(
        &mut self,
        frontend_id: u32,
        slots: &[(u32, u32)],
    ) -> Result<(), DataplaneError>;

    /// Forward conntrack entries.
    fn conntrack(&self) -> Result<Vec<ConntrackEntry>, DataplaneError>;
    /// Deletes connections idle for longer than their timeout (both
    /// entries of a connection together, judged by the newer one).
    fn gc_conntrack(&mut self, timeouts: &CtTimeouts) -> Result<CtGcStats, DataplaneError>;
    /// Deletes every conntrack entry; returns how many connections that was.
    fn flush_conntrack(&mut self) -> Result<usize, DataplaneError>;
    fn counters(&self) -> Result<LbCounters, DataplaneError>;
}
