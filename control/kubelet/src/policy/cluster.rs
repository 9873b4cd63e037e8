//! The objects NetworkPolicy is computed from (pods, namespaces, nodes,
//! NetworkPolicies), parsed once from their JSON when they arrive so a
//! recompile does not re-read JSON.

use super::selector::{LabelSelector, Labels};
use serde_json::Value;
use skep_dataplane::policy::Cidr;
use std::{collections::BTreeMap, net::Ipv4Addr};

/// IANA protocol numbers of the protocols NetworkPolicy names.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// Kubernetes' label on every namespace with the namespace's name (set by
/// kube-apiserver; added here when the server did not, so policies that
/// select namespaces by name work).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The kinds of object the policy view holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pod,
    Namespace,
    Node,
    NetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Pod, Kind::Namespace, Kind::Node, Kind::NetworkPolicy];

    /// The cluster-wide collection path of the kind.
    pub fn path(self) -> &'static str {
        match self {
            Kind::Pod => "/api/v1/pods",
            Kind::Namespace => "/api/v1/namespaces",
            Kind::Node => "/api/v1/nodes",
            Kind::NetworkPolicy => "/apis/networking.k8s.io/v1/networkpolicies",
        }
    }
}

/// A container port a pod names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub proto: u8,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.nodeName` ("" while unscheduled).
    pub node: String,
    pub ip: Option<Ipv4Addr>,
    pub host_network: bool,
    /// Succeeded or Failed: its address may already belong to another pod.
    pub terminal: bool,
    pub labels: Labels,
    pub ports: Vec<NamedPort>,
}

impl PodInfo {
    /// Whether the pod is a policy endpoint (has its own address);
    /// hostNetwork pods are the node.
    pub fn has_own_address(&self) -> bool {
        self.ip.is_some() && !self.host_network && !self.terminal
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub internal_ips: Vec<Ipv4Addr>,
}

/// Which ports a `ports` entry names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    /// `port` omitted: every port of the protocol.
    All,
    /// A number, or a range with `endPort`.
    Numbers { first: u16, last: u16 },
    /// A named container port, resolved per pod.
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub proto: u8,
    pub port: PortRef,
}

/// One entry of `from`/`to`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// podSelector and/or namespaceSelector (both set = both must match).
    Selectors {
        pods: Option<LabelSelector>,
        namespaces: Option<LabelSelector>,
    },
    IpBlock {
        cidr: Cidr,
        except: Vec<Cidr>,
    },
    /// Something this node cannot match (an IPv6 block, an empty peer).
    Nothing,
}

/// One ingress or egress rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    /// `None`: any peer (`from`/`to` empty or missing).
    pub peers: Option<Vec<Peer>>,
    /// `None`: every port (`ports` empty or missing).
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: LabelSelector,
    pub affects_ingress: bool,
    pub affects_egress: bool,
    pub ingress: Vec<RuleSpec>,
    pub egress: Vec<RuleSpec>,
}

impl NetworkPolicy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn str_at<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or("")
}

fn labels_at(v: &Value, p: &str) -> Labels {
    v.pointer(p)
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
        .collect()
}

fn array<'a>(v: &'a Value, p: &str) -> impl Iterator<Item = &'a Value> {
    v.pointer(p).and_then(Value::as_array).into_iter().flatten()
}

fn protocol(v: &Value) -> Option<u8> {
    match v.get("protocol").and_then(Value::as_str).unwrap_or("TCP") {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        "SCTP" => Some(PROTO_SCTP),
        _ => None,
    }
}

fn parse_cidr(s: &str) -> Option<Cidr> {
    let (ip, len) = s.split_once('/')?;
    Cidr::new(ip.parse().ok()?, len.parse().ok()?)
}

pub fn parse_pod(obj: &Value) -> PodInfo {
    let mut ports = Vec::new();
    for c in array(obj, "/spec/containers") {
        for p in array(c, "/ports") {
            let (Some(name), Some(proto), Some(port)) = (
                p.get("name").and_then(Value::as_str),
                protocol(p),
                p.get("containerPort")
                    .and_then(Value::as_u64)
                    .and_then(|n| u16::try_from(n).ok()),
            ) else {
                continue;
            };
            ports.push(NamedPort {
                name: name.to_owned(),
                proto,
                port,
            });
        }
    }
    let phase = str_at(obj, "/status/phase");
    PodInfo {
        namespace: str_at(obj, "/metadata/namespace").to_owned(),
        name: str_at(obj, "/metadata/name").to_owned(),
        uid: str_at(obj, "/metadata/uid").to_owned(),
        node: str_at(obj, "/spec/nodeName").to_owned(),
        ip: str_at(obj, "/status/podIP").parse().ok(),
        host_network: obj
            .pointer("/spec/hostNetwork")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        terminal: phase == "Succeeded" || phase == "Failed",
        labels: labels_at(obj, "/metadata/labels"),
        ports,
    }
}

pub fn parse_node(obj: &Value) -> NodeInfo {
    NodeInfo {
        name: str_at(obj, "/metadata/name").to_owned(),
        internal_ips: array(obj, "/status/addresses")
            .filter(|a| str_at(a, "/type") == "InternalIP")
            .filter_map(|a| str_at(a, "/address").parse().ok())
            .collect(),
    }
}

fn parse_peer(v: &Value) -> Peer {
    if let Some(block) = v.get("ipBlock") {
        return match parse_cidr(str_at(block, "/cidr")) {
            Some(cidr) => Peer::IpBlock {
                cidr,
                // IPv6 exceptions cannot overlap an IPv4 block.
                except: array(block, "/except")
                    .filter_map(|e| e.as_str().and_then(parse_cidr))
                    .collect(),
            },
            None => Peer::Nothing,
        };
    }
    let pods = v
        .get("podSelector")
        .filter(|s| !s.is_null())
        .map(LabelSelector::parse);
    let namespaces = v
        .get("namespaceSelector")
        .filter(|s| !s.is_null())
        .map(LabelSelector::parse);
    if pods.is_none() && namespaces.is_none() {
        return Peer::Nothing;
    }
    Peer::Selectors { pods, namespaces }
}

fn parse_port(v: &Value) -> Option<PortSpec> {
    let proto = protocol(v)?;
    let port = match v.get("port") {
        None | Some(Value::Null) => PortRef::All,
        Some(Value::String(name)) => PortRef::Name(name.clone()),
        Some(n) => {
            let first = u16::try_from(n.as_u64()?).ok()?;
            let last = match v.get("endPort").and_then(Value::as_u64) {
                Some(e) => u16::try_from(e).ok().filter(|e| *e >= first)?,
                None => first,
            };
            PortRef::Numbers { first, last }
        }
    };
    Some(PortSpec { proto, port })
}

fn parse_rule(v: &Value, peers_field: &str) -> RuleSpec {
    let peers: Vec<Peer> = array(v, &format!("/{peers_field}"))
        .map(parse_peer)
        .collect();
    let raw_ports: Vec<&Value> = array(v, "/ports").collect();
    RuleSpec {
        peers: (!peers.is_empty()).then_some(peers),
        // Entries this node cannot parse match nothing, but do not turn a
        // port list into "all ports".
        ports: (!raw_ports.is_empty())
            .then(|| raw_ports.into_iter().filter_map(parse_port).collect()),
    }
}

pub fn parse_network_policy(obj: &Value) -> NetworkPolicy {
    let ingress: Vec<RuleSpec> = array(obj, "/spec/ingress")
        .map(|r| parse_rule(r, "from"))
        .collect();
    let egress: Vec<RuleSpec> = array(obj, "/spec/egress")
        .map(|r| parse_rule(r, "to"))
        .collect();
    let (affects_ingress, affects_egress) =
        match obj.pointer("/spec/policyTypes").and_then(Value::as_array) {
            Some(types) => (
                types.iter().any(|t| t.as_str() == Some("Ingress")),
                types.iter().any(|t| t.as_str() == Some("Egress")),
            ),
            // Kubernetes' defaulting: Ingress always, Egress when there are
            // egress rules.
            None => (true, !egress.is_empty()),
        };
    NetworkPolicy {
        namespace: str_at(obj, "/metadata/namespace").to_owned(),
        name: str_at(obj, "/metadata/name").to_owned(),
        pod_selector: LabelSelector::parse(
            obj.pointer("/spec/podSelector").unwrap_or(&Value::Null),
        ),
        affects_ingress,
        affects_egress,
        ingress,
        egress,
    }
}

/// What the cluster looks like, as far as NetworkPolicy cares.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// By `namespace/name`.
    pub pods: BTreeMap<String, PodInfo>,
    /// Namespace labels by name.
    pub namespaces: BTreeMap<String, Labels>,
    pub nodes: BTreeMap<String, NodeInfo>,
    /// By `namespace/name`.
    pub policies: BTreeMap<String, NetworkPolicy>,
}

fn object_key(obj: &Value) -> String {
    let ns = str_at(obj, "/metadata/namespace");
    let name = str_at(obj, "/metadata/name");
    if ns.is_empty() {
        name.to_owned()
    } else {
        format!("{ns}/{name}")
    }
}

impl ClusterView {
    /// Records an added or modified object.
    pub fn upsert(&mut self, kind: Kind, obj: &Value) {
        let key = object_key(obj);
        match kind {
            Kind::Pod => {
                self.pods.insert(key, parse_pod(obj));
            }
            Kind::Namespace => {
                self.namespaces
                    .insert(key, labels_at(obj, "/metadata/labels"));
            }
            Kind::Node => {
                self.nodes.insert(key, parse_node(obj));
            }
            Kind::NetworkPolicy => {
                self.policies.insert(key, parse_network_policy(obj));
            }
        }
    }

    pub fn remove(&mut self, kind: Kind, obj: &Value) {
        let key = object_key(obj);
        match kind {
            Kind::Pod => self.pods.remove(&key).map(drop),
            Kind::Namespace => self.namespaces.remove(&key).map(drop),
            Kind::Node => self.nodes.remove(&key).map(drop),
            Kind::NetworkPolicy => self.policies.remove(&key).map(drop),
        };
    }

    /// Replaces every object of `kind` with the items of a LIST response.
    pub fn replace_all(&mut self, kind: Kind, list: &Value) {
        match kind {
            Kind::Pod => self.pods.clear(),
            Kind::Namespace => self.namespaces.clear(),
            Kind::Node => self.nodes.clear(),
            Kind::NetworkPolicy => self.policies.clear(),
        }
        for item in array(list, "/items") {
            self.upsert(kind, item);
        }
    }

    /// A namespace's labels as selectors see them (with its name label).
    pub fn namespace_labels(&self, ns: &str) -> Labels {
        let mut labels = self.namespaces.get(ns).cloned().unwrap_or_default();
        labels
            .entry(NAMESPACE_NAME_LABEL.to_owned())
            .or_insert_with(|| ns.to_owned());
        labels
    }
}
