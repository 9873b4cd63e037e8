//! The kube-proxy replacement's userspace half.
//!
//! * [`Service`] and friends: the desired state, in skep's own types (the
//!   agent fills them from Services and EndpointSlices).
//! * [`LoadBalancer`]: desired-state reconcile (full [`LoadBalancer::resync`]
//!   then deltas [`LoadBalancer::upsert_service`] /
//!   [`LoadBalancer::delete_service`]): id allocation, Maglev tables, and the
//!   minimal set of map writes.
//! * [`Datapath`]: the map-level operations the reconcile needs, with the
//!   real [`KernelDatapath`] (aya maps pinned under a bpffs directory) and an
//!   in-memory [`FakeDatapath`] for unit tests.

mod datapath;
mod fake;
mod inspect;
mod kernel;
pub mod maglev;
mod reconcile;
mod settings;

pub use datapath::{
    BackendEntry, ConntrackEntry, CtGcStats, CtTimeouts, Datapath, Frontend, FrontendState,
    LbCounters,
};
pub use fake::{FakeDatapath, FakeOp};
pub use inspect::{BackendView, FrontendView, LbSnapshot, PinnedLb};
pub use kernel::{KernelDatapath, PodHooks};
pub use reconcile::LoadBalancer;
pub use settings::LbSettings;

use std::{net::Ipv4Addr, time::Duration};

/// L4 protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub(crate) fn number(self) -> u8 {
        match self {
            Self::Tcp => skep_ebpf_common::IPPROTO_TCP,
            Self::Udp => skep_ebpf_common::IPPROTO_UDP,
        }
    }

    pub(crate) fn from_number(n: u8) -> Option<Self> {
        match n {
            skep_ebpf_common::IPPROTO_TCP => Some(Self::Tcp),
            skep_ebpf_common::IPPROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

/// One port of a Service: traffic to (VIP, `port`, `protocol`) goes to
/// (endpoint, `target_port`); with a `node_port`, so does traffic to
/// (each node address, `node_port`, `protocol`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: u16,
    pub node_port: Option<u16>,
}

/// Whether an endpoint takes new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointState {
    /// Ready: new connections may land on it.
    Ready,
    /// Terminating: its existing connections continue, new ones avoid it.
    Terminating,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub state: EndpointState,
    /// Runs on this node (traffic policies `Local` only use these).
    pub local: bool,
}

/// A Service as the dataplane sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Unique name, e.g. "namespace/name".
    pub name: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    /// ClientIP session affinity with its timeout (Kubernetes default 3 h).
    pub session_affinity: Option<Duration>,
    /// internalTrafficPolicy: Local — ClusterIP traffic only goes to
    /// endpoints on this node (none → refused).
    pub internal_traffic_local: bool,
    /// externalTrafficPolicy: Local — NodePort traffic only goes to
    /// endpoints on this node, and keeps the client's address. With
    /// Cluster, connections from outside to endpoints on other nodes are
    /// SNATed to the node (see `KernelDatapath::attach_external`).
    pub external_traffic_local: bool,
    /// ExternalIPs and LoadBalancer ingress IPs: every port is also a
    /// frontend on each of them (external traffic, like NodePorts).
    pub external_ips: Vec<Ipv4Addr>,
}
