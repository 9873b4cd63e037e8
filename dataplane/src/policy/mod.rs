//! NetworkPolicy in the kernel: the desired state the agent computes
//! ([`PolicyState`]: ipcache, local endpoints, allow rules) and the seam
//! ([`PolicyDatapath`]) that programs it into the maps the pod hooks read.
//! The state is plain data so the compiler in the agent can be tested, and
//! its verdicts checked against a reference model, without a kernel
//! ([`PolicyState::evaluate`] answers the way the hooks do).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

pub use skep_ebpf_common::{
    DIR_EGRESS, DIR_INGRESS, ID_ANY, ID_CIDR_FIRST, ID_HOST, ID_POD_FIRST, ID_REMOTE_NODE,
    ID_UNKNOWN, ID_WORLD, POLICY_ID_HOST, POLICY_ID_NONE,
};

use crate::DataplaneError;

/// An IPv4 prefix (`addr` has no bits set past `len`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    /// The prefix `addr/len`, host bits cleared; `None` if `len` > 32.
    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Self> {
        if len > 32 {
            return None;
        }
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Some(Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            len,
        })
    }

    pub fn host(addr: Ipv4Addr) -> Self {
        Self { addr, len: 32 }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        };
        u32::from(ip) & mask == u32::from(self.addr)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What the ipcache says about a prefix (see `skep_ebpf_common::IpcacheValue`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcacheEntry {
    pub identity: u32,
    /// Identity of the most specific ipBlock CIDR containing the prefix
    /// (ID_WORLD when none).
    pub cidr_identity: u32,
}

/// A local pod as the hooks see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointEntry {
    /// Nonzero number used in rule keys; stable for the pod's lifetime.
    pub endpoint: u32,
    pub identity: u32,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
}

/// Direction of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyDirection {
    Ingress,
    Egress,
}

/// Which ports a rule admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortMatch {
    /// Every protocol and port.
    Any,
    /// Every port of one IP protocol (6 TCP, 17 UDP, 132 SCTP).
    AnyPort { proto: u8 },
    /// Ports `first..=last` of one protocol (first == last for one port).
    Range { proto: u8, first: u16, last: u16 },
}

/// One allow rule: `endpoint` may talk with peers of `identity`
/// (ID_ANY = any peer) in `direction` on `ports`. Kubernetes policies only
/// allow, so the rule set is a union and order does not matter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRule {
    pub endpoint: u32,
    pub direction: PolicyDirection,
    pub identity: u32,
    pub ports: PortMatch,
}

/// Everything the policy maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    pub ipcache: BTreeMap<Cidr, IpcacheEntry>,
    /// Local pods by address.
    pub endpoints: BTreeMap<Ipv4Addr, EndpointEntry>,
    /// Each rule with the id of the NetworkPolicy it came from (when two
    /// policies give the same rule, the lower id is kept).
    pub rules: BTreeMap<PolicyRule, u32>,
}

/// How a packet's first-packet policy check ended (see [`PolicyState::evaluate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted; the policy id that allowed it (POLICY_ID_NONE when the
    /// endpoint is not isolated, POLICY_ID_HOST for the own node).
    Allowed(u32),
    Denied,
}

impl PolicyState {
    /// The ipcache's answer for `ip` (longest prefix; WORLD when unknown).
    pub fn lookup(&self, ip: Ipv4Addr) -> IpcacheEntry {
        self.ipcache
            .iter()
            .filter(|(c, _)| c.contains(ip))
            .max_by_key(|(c, _)| c.len)
            .map(|(_, e)| *e)
            .unwrap_or(IpcacheEntry {
                identity: ID_WORLD,
                cidr_identity: ID_WORLD,
            })
    }

    /// Whether local endpoint `ep` admits a new connection with `peer` in
    /// `direction` to destination port `port` of `proto` — the same
    /// decision the hooks make (peer identity, then its CIDR identity,
    /// then the wildcard).
    pub fn evaluate(
        &self,
        ep: Ipv4Addr,
        direction: PolicyDirection,
        peer: Ipv4Addr,
        proto: u8,
        port: u16,
    ) -> Verdict {
        let Some(e) = self.endpoints.get(&ep) else {
            return Verdict::Allowed(POLICY_ID_NONE);
        };
        let isolated = match direction {
            PolicyDirection::Ingress => e.ingress_isolated,
            PolicyDirection::Egress => e.egress_isolated,
        };
        if !isolated {
            return Verdict::Allowed(POLICY_ID_NONE);
        }
        let remote = self.lookup(peer);
        if direction == PolicyDirection::Ingress && remote.identity == ID_HOST {
            return Verdict::Allowed(POLICY_ID_HOST);
        }
        for id in [remote.identity, remote.cidr_identity, ID_ANY] {
            let hit = self
                .rules
                .iter()
                .filter(|(r, _)| r.endpoint == e.endpoint && r.direction == direction)
                .filter(|(r, _)| r.identity == id)
                .find(|(r, _)| match r.ports {
                    PortMatch::Any => true,
                    PortMatch::AnyPort { proto: p } => p == proto,
                    PortMatch::Range {
                        proto: p,
                        first,
                        last,
                    } => p == proto && (first..=last).contains(&port),
                });
            if let Some((_, policy)) = hit {
                return Verdict::Allowed(*policy);
            }
        }
        Verdict::Denied
    }

    /// Identities that appear anywhere (for sizing and tests).
    pub fn identities(&self) -> BTreeSet<u32> {
        self.ipcache
            .values()
            .flat_map(|e| [e.identity, e.cidr_identity])
            .chain(self.endpoints.values().map(|e| e.identity))
            .collect()
    }
}

/// What one [`PolicyDatapath::apply`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub ipcache_written: usize,
    pub ipcache_deleted: usize,
    pub endpoints_written: usize,
    pub endpoints_deleted: usize,
    pub rule_keys_written: usize,
    pub rule_keys_deleted: usize,
}

/// Programs a [`PolicyState`]: the kernel maps, or a recording fake in
/// tests. `apply` makes the maps equal to `state` (writing only the
/// difference) and turns enforcement on after the first full state, so a
/// restarting agent never enforces a half-written state.
pub trait PolicyDatapath: Send {
    fn apply(&mut self, state: &PolicyState) -> Result<ApplyStats, DataplaneError>;
}

pub mod kernel;
pub use kernel::KernelPolicy;
pub mod xdp;
