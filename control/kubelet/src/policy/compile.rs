//! NetworkPolicy → [`PolicyState`]: identities for label sets, the
//! ipcache, this node's endpoints and their allow rules.
//!
//! Named ports: on ingress a name is resolved on the selected (local)
//! pod's containers, exactly. On egress the rule is keyed by the peer's
//! identity, so a name is resolved per identity: the union of the numbers
//! the pods sharing that identity give the name (for ipBlock peers: the
//! pods whose most specific ipBlock prefix is that CIDR identity). When
//! pods of one identity give one name different numbers, a destination
//! pod is reachable on the numbers its siblings use too; Kubernetes would
//! allow only its own. A name that resolves to nothing allows nothing.

use super::{
    PodRef, PolicySnapshot,
    cluster::{ClusterView, NetworkPolicy, Peer, PodInfo, PortRef, PortSpec, RuleSpec},
    ids::StableIds,
    selector::Labels,
};
use skep_dataplane::policy::{
    Cidr, EndpointEntry, ID_ANY, ID_CIDR_FIRST, ID_HOST, ID_POD_FIRST, ID_REMOTE_NODE, ID_WORLD,
    IpcacheEntry, POLICY_ID_HOST, PolicyDirection, PolicyRule, PolicyState, PortMatch,
};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

/// What makes two pods share an identity (shared with the server's
/// allocator, which must compute the same key).
pub use skep_client::identity::IdentityKey;

/// Where pod identity numbers come from: the seam between the compiler and
/// the numbering. [`StableIds`] numbers label sets on this node alone (unit
/// tests, the standalone dataplane harness, `skep ctl policy`);
/// [`super::identities::ClusterIdentities`] uses the numbers the server's
/// allocator shares with every node.
pub trait IdentitySource: std::fmt::Debug + Send {
    /// Numbers every key of `live` (the keys of the pods being compiled)
    /// and forgets the others; returns the keys left without a number.
    fn sync(&mut self, live: &[IdentityKey]) -> Vec<IdentityKey>;
    /// The number of a key of the last `sync`.
    fn get(&self, key: &IdentityKey) -> Option<u32>;
}

impl IdentitySource for StableIds<IdentityKey> {
    fn sync(&mut self, live: &[IdentityKey]) -> Vec<IdentityKey> {
        StableIds::sync(self, live.iter())
    }

    fn get(&self, key: &IdentityKey) -> Option<u32> {
        StableIds::get(self, key)
    }
}

/// Port numbers by name, then protocol.
type NamedPorts = BTreeMap<String, BTreeMap<u8, BTreeSet<u16>>>;

fn merge_named(into: &mut NamedPorts, from: &NamedPorts) {
    for (name, by_proto) in from {
        let slot = into.entry(name.clone()).or_default();
        for (proto, ports) in by_proto {
            slot.entry(*proto).or_default().extend(ports);
        }
    }
}

/// A pod identity in one compiled state.
#[derive(Debug)]
struct IdentityInfo<'a> {
    key: &'a IdentityKey,
    named_ports: NamedPorts,
}

/// The result of one compile.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub state: PolicyState,
    pub snapshot: PolicySnapshot,
    /// Every policy that gives each rule (the state keeps the lowest);
    /// filled only by a compiler made with [`Compiler::recording_sources`].
    pub sources: BTreeMap<PolicyRule, BTreeSet<u32>>,
}

/// Compiles cluster views for one node, keeping numbers stable from one
/// compile to the next.
#[derive(Debug)]
pub struct Compiler {
    identities: Box<dyn IdentitySource>,
    cidrs: StableIds<Cidr>,
    policies: StableIds<String>,
    /// By `namespace/name/uid`: a pod recreated under the same name is a
    /// new endpoint.
    endpoints: StableIds<String>,
    record_sources: bool,
}

impl Default for Compiler {
    fn default() -> Self {
        Self::new()
    }
}

/// The exact numbers of a `ports` entry, when they do not depend on a pod.
fn fixed_ports(spec: &PortSpec) -> Option<PortMatch> {
    match &spec.port {
        PortRef::All => Some(PortMatch::AnyPort { proto: spec.proto }),
        PortRef::Numbers { first, last } => Some(PortMatch::Range {
            proto: spec.proto,
            first: *first,
            last: *last,
        }),
        PortRef::Name(_) => None,
    }
}

fn named(ports: &NamedPorts, name: &str, proto: u8) -> impl Iterator<Item = PortMatch> {
    ports
        .get(name)
        .and_then(|by_proto| by_proto.get(&proto))
        .into_iter()
        .flatten()
        .map(move |p| PortMatch::Range {
            proto,
            first: *p,
            last: *p,
        })
}

fn pod_named_ports(pod: &PodInfo) -> NamedPorts {
    let mut out = NamedPorts::new();
    for p in &pod.ports {
        out.entry(p.name.clone())
            .or_default()
            .entry(p.proto)
            .or_default()
            .insert(p.port);
    }
    out
}

/// `inner` ⊆ `outer`.
fn within(inner: &Cidr, outer: &Cidr) -> bool {
    inner.len >= outer.len && outer.contains(inner.addr)
}

/// Rules as they are produced (with duplicates), sorted once at the end:
/// far cheaper than a map insert per rule at hundreds of thousands.
#[derive(Default)]
struct RuleSink {
    rules: Vec<(PolicyRule, u32)>,
}

impl RuleSink {
    fn add(&mut self, rule: PolicyRule, policy: u32) {
        self.rules.push((rule, policy));
    }

    /// Each rule with the lowest policy id that gives it, and (when asked)
    /// every policy that gives it.
    fn finish(
        mut self,
        sources: Option<&mut BTreeMap<PolicyRule, BTreeSet<u32>>>,
    ) -> BTreeMap<PolicyRule, u32> {
        self.rules.sort_unstable();
        self.rules.dedup();
        if let Some(sources) = sources {
            for (r, p) in &self.rules {
                sources.entry(*r).or_default().insert(*p);
            }
        }
        // Sorted by (rule, policy): the first of each rule has the lowest id.
        self.rules.dedup_by_key(|(r, _)| *r);
        self.rules.into_iter().collect()
    }
}

/// The cluster-wide facts a compile needs while it walks the policies.
struct Tables<'a> {
    identities: BTreeMap<u32, IdentityInfo<'a>>,
    /// Pod identities by namespace, with the namespace's labels: selectors
    /// pick namespaces first, then pods within them.
    by_namespace: BTreeMap<&'a str, (&'a Labels, Vec<u32>)>,
    cidr_ids: BTreeMap<Cidr, u32>,
    /// Named ports of the pods behind each CIDR identity.
    cidr_named: BTreeMap<u32, NamedPorts>,
    /// Peers already resolved, by (peer, policy namespace): policies
    /// often repeat selectors.
    peer_cache: BTreeMap<(&'a Peer, &'a str), Vec<u32>>,
}

impl<'a> Tables<'a> {
    /// Identities a peer stands for, from a policy in `ns`.
    fn peer(&mut self, peer: &'a Peer, ns: &'a str) -> &[u32] {
        if !self.peer_cache.contains_key(&(peer, ns)) {
            let ids = self.resolve(peer, ns);
            self.peer_cache.insert((peer, ns), ids);
        }
        self.peer_cache
            .get(&(peer, ns))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    fn resolve(&self, peer: &Peer, ns: &str) -> Vec<u32> {
        let mut out = Vec::new();
        match peer {
            Peer::Nothing => {}
            Peer::Selectors { pods, namespaces } => {
                let namespaces: Vec<&(&Labels, Vec<u32>)> = match namespaces {
                    Some(sel) => self
                        .by_namespace
                        .values()
                        .filter(|(labels, _)| sel.matches(labels))
                        .collect(),
                    None => self.by_namespace.get(ns).into_iter().collect(),
                };
                for (_, ids) in namespaces {
                    for id in ids {
                        let selected = match (pods, self.identities.get(id)) {
                            (None, _) => true,
                            (Some(sel), Some(info)) => sel.matches(&info.key.pod_labels),
                            (Some(_), None) => false,
                        };
                        if selected {
                            out.push(*id);
                        }
                    }
                }
            }
            Peer::IpBlock { cidr, except } => {
                // Every prefix inside the block and outside each exception:
                // the ipcache's longest-prefix answer for any address is one
                // of these exactly when the address is admitted.
                for (c, id) in self.cidr_ids.range(cidr..) {
                    if !cidr.contains(c.addr) {
                        break;
                    }
                    if within(c, cidr) && !except.iter().any(|e| within(c, e)) {
                        out.push(*id);
                    }
                }
            }
        }
        out
    }

    fn peers(&mut self, rule: &'a RuleSpec, ns: &'a str) -> BTreeSet<u32> {
        match &rule.peers {
            None => BTreeSet::from([ID_ANY]),
            Some(peers) => {
                let mut out = BTreeSet::new();
                for p in peers {
                    out.extend(self.peer(p, ns).iter().copied());
                }
                out
            }
        }
    }

    /// Egress rules of one policy, the same for every endpoint it selects.
    fn egress(&mut self, pol: &'a NetworkPolicy) -> Vec<(u32, PortMatch)> {
        let mut out = Vec::new();
        for rule in &pol.egress {
            let peers = self.peers(rule, &pol.namespace);
            let Some(ports) = &rule.ports else {
                out.extend(peers.iter().map(|p| (*p, PortMatch::Any)));
                continue;
            };
            for spec in ports {
                if let Some(m) = fixed_ports(spec) {
                    out.extend(peers.iter().map(|p| (*p, m)));
                    continue;
                }
                let PortRef::Name(name) = &spec.port else {
                    continue;
                };
                for peer in &peers {
                    if *peer == ID_ANY {
                        // Any destination: each pod identity on its own
                        // numbers (non-pods have no named ports).
                        for (id, info) in &self.identities {
                            out.extend(
                                named(&info.named_ports, name, spec.proto).map(|m| (*id, m)),
                            );
                        }
                    } else if let Some(info) = self.identities.get(peer) {
                        out.extend(named(&info.named_ports, name, spec.proto).map(|m| (*peer, m)));
                    } else if let Some(np) = self.cidr_named.get(peer) {
                        out.extend(named(np, name, spec.proto).map(|m| (*peer, m)));
                    }
                }
            }
        }
        out
    }

    /// Ingress rules of one policy, before named ports are resolved on the
    /// endpoint.
    fn ingress(&mut self, pol: &'a NetworkPolicy) -> Vec<IngressTemplate> {
        pol.ingress
            .iter()
            .map(|rule| IngressTemplate {
                peers: self.peers(rule, &pol.namespace).into_iter().collect(),
                ports: rule.ports.as_ref().map(|ports| {
                    ports
                        .iter()
                        .filter_map(|spec| match &spec.port {
                            PortRef::Name(n) => Some(PortTemplate::Named(n.clone(), spec.proto)),
                            _ => fixed_ports(spec).map(PortTemplate::Fixed),
                        })
                        .collect()
                }),
            })
            .collect()
    }
}

enum PortTemplate {
    Fixed(PortMatch),
    Named(String, u8),
}

struct IngressTemplate {
    peers: Vec<u32>,
    /// `None`: every port.
    ports: Option<Vec<PortTemplate>>,
}

/// A local pod being compiled.
struct LocalEndpoint<'a> {
    pod: &'a PodInfo,
    ip: Ipv4Addr,
    entry: EndpointEntry,
}

impl Compiler {
    pub fn new() -> Self {
        Self::with_identities(Box::new(StableIds::<IdentityKey>::new(
            ID_POD_FIRST,
            ID_CIDR_FIRST - 1,
        )))
    }

    /// A compiler taking pod identity numbers from `identities`.
    pub fn with_identities(identities: Box<dyn IdentitySource>) -> Self {
        Self {
            identities,
            cidrs: StableIds::new(ID_CIDR_FIRST, u32::MAX - 1),
            policies: StableIds::new(1, POLICY_ID_HOST - 1),
            endpoints: StableIds::new(1, u32::MAX),
            record_sources: false,
        }
    }

    /// A compiler that also fills [`Compiled::sources`] (for explaining a
    /// pod's rules; the agent does not need it).
    pub fn recording_sources() -> Self {
        Self {
            record_sources: true,
            ..Self::new()
        }
    }

    /// Like [`Self::recording_sources`], with the pod identity numbers of
    /// `identities` (the cluster's shared ones, as the agents use them).
    pub fn recording_sources_with(identities: Box<dyn IdentitySource>) -> Self {
        Self {
            record_sources: true,
            ..Self::with_identities(identities)
        }
    }

    /// The state node `node` should enforce for `view`.
    pub fn compile(&mut self, view: &ClusterView, node: &str) -> Compiled {
        let mut out = Compiled::default();

        // Identities: one per (namespace, pod labels, namespace labels).
        let mut ns_labels: BTreeMap<&str, Labels> = BTreeMap::new();
        let pods: Vec<(&PodInfo, Ipv4Addr)> = view
            .pods
            .values()
            .filter(|p| p.has_own_address())
            .filter_map(|p| p.ip.map(|ip| (p, ip)))
            .collect();
        let keys: Vec<IdentityKey> = pods
            .iter()
            .map(|(p, _)| IdentityKey {
                namespace: p.namespace.clone(),
                pod_labels: p.labels.clone(),
                namespace_labels: ns_labels
                    .entry(&p.namespace)
                    .or_insert_with(|| view.namespace_labels(&p.namespace))
                    .clone(),
            })
            .collect();
        let left = self.identities.sync(&keys);
        if !left.is_empty() {
            tracing::error!(
                count = left.len(),
                "pod identities exhausted; pods without one match no policy peer"
            );
        }
        let mut identities: BTreeMap<u32, IdentityInfo<'_>> = BTreeMap::new();
        let mut pod_ids: Vec<Option<u32>> = Vec::with_capacity(pods.len());
        for ((pod, _), key) in pods.iter().zip(&keys) {
            let id = self.identities.get(key);
            if let Some(id) = id {
                let info = identities.entry(id).or_insert_with(|| IdentityInfo {
                    key,
                    named_ports: NamedPorts::new(),
                });
                merge_named(&mut info.named_ports, &pod_named_ports(pod));
            }
            pod_ids.push(id);
        }

        // CIDR identities: every ipBlock prefix and exception.
        let cidrs: BTreeSet<Cidr> = view
            .policies
            .values()
            .flat_map(|p| p.ingress.iter().chain(&p.egress))
            .flat_map(|r| r.peers.iter().flatten())
            .flat_map(|peer| match peer {
                Peer::IpBlock { cidr, except } => std::iter::once(*cidr)
                    .chain(except.iter().copied())
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        if !self.cidrs.sync(cidrs.iter()).is_empty() {
            tracing::error!("CIDR identities exhausted");
        }
        let cidr_ids: BTreeMap<Cidr, u32> = cidrs
            .iter()
            .filter_map(|c| self.cidrs.get(c).map(|id| (*c, id)))
            .collect();
        let lengths: BTreeSet<u8> = cidr_ids.keys().map(|c| c.len).collect();
        let most_specific = |ip: Ipv4Addr| -> u32 {
            lengths
                .iter()
                .rev()
                .filter_map(|len| Cidr::new(ip, *len))
                .find_map(|c| cidr_ids.get(&c).copied())
                .unwrap_or(ID_WORLD)
        };

        // The ipcache: CIDRs, then node addresses, then pods (a pod's /32
        // wins over an ipBlock /32 and keeps it as its CIDR identity).
        let ipcache = &mut out.state.ipcache;
        for (c, id) in &cidr_ids {
            ipcache.insert(
                *c,
                IpcacheEntry {
                    identity: *id,
                    cidr_identity: *id,
                },
            );
        }
        for n in view.nodes.values() {
            let identity = if n.name == node {
                ID_HOST
            } else {
                ID_REMOTE_NODE
            };
            for ip in &n.internal_ips {
                ipcache.insert(
                    Cidr::host(*ip),
                    IpcacheEntry {
                        identity,
                        cidr_identity: most_specific(*ip),
                    },
                );
            }
        }
        let mut cidr_named: BTreeMap<u32, NamedPorts> = BTreeMap::new();
        for ((pod, ip), id) in pods.iter().zip(&pod_ids) {
            let Some(id) = id else { continue };
            let cidr_identity = most_specific(*ip);
            ipcache.insert(
                Cidr::host(*ip),
                IpcacheEntry {
                    identity: *id,
                    cidr_identity,
                },
            );
            if cidr_identity != ID_WORLD {
                let np = cidr_named.entry(cidr_identity).or_default();
                merge_named(np, &pod_named_ports(pod));
            }
            out.snapshot.pods_by_ip.insert(
                *ip,
                PodRef {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    node: pod.node.clone(),
                },
            );
        }

        // Local endpoints.
        let local: Vec<(&PodInfo, Ipv4Addr, u32, String)> = pods
            .iter()
            .zip(&pod_ids)
            .filter(|((p, _), _)| p.node == node)
            .filter_map(|((p, ip), id)| {
                id.map(|id| (*p, *ip, id, format!("{}/{}/{}", p.namespace, p.name, p.uid)))
            })
            .collect();
        self.endpoints.sync(local.iter().map(|(_, _, _, k)| k));
        let mut endpoints: Vec<LocalEndpoint<'_>> = local
            .iter()
            .filter_map(|(pod, ip, id, key)| {
                self.endpoints.get(key).map(|endpoint| LocalEndpoint {
                    pod,
                    ip: *ip,
                    entry: EndpointEntry {
                        endpoint,
                        identity: *id,
                        ingress_isolated: false,
                        egress_isolated: false,
                    },
                })
            })
            .collect();

        // Policies, in id order.
        self.policies.sync(view.policies.keys());
        let mut by_namespace: BTreeMap<&str, (&Labels, Vec<u32>)> = BTreeMap::new();
        for (id, info) in &identities {
            by_namespace
                .entry(info.key.namespace.as_str())
                .or_insert_with(|| (&info.key.namespace_labels, Vec::new()))
                .1
                .push(*id);
        }
        let mut tables = Tables {
            identities,
            by_namespace,
            cidr_ids,
            cidr_named,
            peer_cache: BTreeMap::new(),
        };
        let mut sink = RuleSink::default();
        for (key, pol) in &view.policies {
            let Some(policy_id) = self.policies.get(key) else {
                continue;
            };
            out.snapshot.policy_names.insert(policy_id, key.clone());
            let selected: Vec<usize> = endpoints
                .iter()
                .enumerate()
                .filter(|(_, e)| {
                    e.pod.namespace == pol.namespace && pol.pod_selector.matches(&e.pod.labels)
                })
                .map(|(i, _)| i)
                .collect();
            if selected.is_empty() {
                continue;
            }
            let ingress = if pol.affects_ingress {
                tables.ingress(pol)
            } else {
                Vec::new()
            };
            let egress = if pol.affects_egress {
                tables.egress(pol)
            } else {
                Vec::new()
            };
            for i in selected {
                let ep = &mut endpoints[i];
                ep.entry.ingress_isolated |= pol.affects_ingress;
                ep.entry.egress_isolated |= pol.affects_egress;
                let endpoint = ep.entry.endpoint;
                let local_ports = pod_named_ports(ep.pod);
                for t in &ingress {
                    let ports: Vec<PortMatch> = match &t.ports {
                        None => vec![PortMatch::Any],
                        Some(list) => list
                            .iter()
                            .flat_map(|p| match p {
                                PortTemplate::Fixed(m) => vec![*m],
                                PortTemplate::Named(n, proto) => {
                                    named(&local_ports, n, *proto).collect()
                                }
                            })
                            .collect(),
                    };
                    for identity in &t.peers {
                        for m in &ports {
                            sink.add(
                                PolicyRule {
                                    endpoint,
                                    direction: PolicyDirection::Ingress,
                                    identity: *identity,
                                    ports: *m,
                                },
                                policy_id,
                            );
                        }
                    }
                }
                for (identity, m) in &egress {
                    sink.add(
                        PolicyRule {
                            endpoint,
                            direction: PolicyDirection::Egress,
                            identity: *identity,
                            ports: *m,
                        },
                        policy_id,
                    );
                }
            }
        }
        out.state.rules = sink.finish(self.record_sources.then_some(&mut out.sources));
        for ep in &endpoints {
            out.state.endpoints.insert(ep.ip, ep.entry);
        }

        // Names for the numbers.
        let names = &mut out.snapshot.identities;
        names.insert(ID_HOST, vec!["reserved:host".into()]);
        names.insert(ID_WORLD, vec!["reserved:world".into()]);
        names.insert(ID_REMOTE_NODE, vec!["reserved:remote-node".into()]);
        for (id, info) in &tables.identities {
            let mut labels = vec![format!(
                "k8s:io.kubernetes.pod.namespace={}",
                info.key.namespace
            )];
            labels.extend(info.key.pod_labels.iter().map(|(k, v)| format!("{k}={v}")));
            names.insert(*id, labels);
        }
        for (c, id) in &tables.cidr_ids {
            names.insert(*id, vec![format!("cidr:{c}")]);
        }
        out
    }
}
