//! NetworkPolicy on this node: the agent's view of pods, namespaces,
//! nodes and NetworkPolicies, compiled into the dataplane's
//! [`skep_dataplane::policy::PolicyState`] and programmed into the kernel.
//!
//! [`PolicySnapshot`] is what the rest of the agent (flow enrichment,
//! `skep ctl policy`) reads about the compiled result.
//!
//! - `cluster`: the objects, parsed from their JSON; `selector`: label
//!   selectors; `ids`: stable numbering; `compile`: view → state;
//!   `watch`: the agent's list/watch/apply task; `view`: one pod's rules
//!   for `skep ctl policy`.
//! - `identities`: pod identity numbers shared by every node (the server's
//!   SecurityIdentity allocations), the compiler's `IdentitySource` in the
//!   agent.

pub mod cluster;
pub mod compile;
pub mod identities;
pub mod ids;
pub mod selector;
pub mod view;
pub mod watch;

pub use cluster::ClusterView;
pub use compile::{Compiled, Compiler};
pub use watch::spawn;

use std::{collections::BTreeMap, net::Ipv4Addr};

/// A pod named in flows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub node: String,
}

/// The names behind the numbers of the last compiled state.
#[derive(Clone, Debug, Default)]
pub struct PolicySnapshot {
    /// Every pod address in the cluster.
    pub pods_by_ip: BTreeMap<Ipv4Addr, PodRef>,
    /// Identity → its labels (`k=v`, with `k8s:io.kubernetes.pod.namespace=NS`
    /// first) or, for reserved and CIDR identities, a description
    /// (`reserved:host`, `cidr:10.0.0.0/8`).
    pub identities: BTreeMap<u32, Vec<String>>,
    /// Policy id → `namespace/name`.
    pub policy_names: BTreeMap<u32, String>,
}
