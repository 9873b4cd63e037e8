//! The DNS data model: Kubernetes objects as the API stores them, reduced to
//! what DNS needs, and the immutable [`Snapshot`] built from them.
//!
//! A snapshot maps every owned name (lowercase, no trailing dot) to the
//! record data at that name. It is rebuilt from scratch on every batch of
//! changes and swapped in atomically, so a query reads one consistent view
//! without waiting for the feeder.

use hickory_server::proto::rr::{
    Name, RData,
    rdata::{A, AAAA, CNAME, PTR, SRV, TXT},
};
use serde_json::Value;
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

/// The version of the Kubernetes DNS specification served.
pub const SPEC_VERSION: &str = "1.1.0";

/// How `a-b-c-d.<ns>.pod.<zone>` names are answered (CoreDNS's `pods`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodRecords {
    /// No pod records: such names are NXDOMAIN.
    Disabled,
    /// Any well-formed address in any namespace resolves to itself.
    #[default]
    Insecure,
    /// Only addresses of pods that exist in that namespace resolve.
    Verified,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Port {
    pub name: String,
    pub protocol: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<IpAddr>,
    pub headless: bool,
    pub external_name: Option<String>,
    pub publish_not_ready: bool,
    pub ports: Vec<Port>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Endpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub hostname: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Slice {
    pub namespace: String,
    pub service: String,
    pub endpoints: Vec<Endpoint>,
    pub ports: Vec<Port>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Pod {
    pub namespace: String,
    pub ips: Vec<IpAddr>,
    pub hostname: Option<String>,
    pub subdomain: Option<String>,
}

fn s<'a>(v: &'a Value, path: &str) -> Option<&'a str> {
    v.pointer(path).and_then(Value::as_str)
}

fn ports(v: Option<&Value>) -> Vec<Port> {
    let Some(arr) = v.and_then(Value::as_array) else {
        return Vec::new();
    };
    arr.iter()
        .filter_map(|p| {
            let port = p.get("port")?.as_u64()?;
            Some(Port {
                name: p
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                protocol: p
                    .get("protocol")
                    .and_then(Value::as_str)
                    .unwrap_or("TCP")
                    .to_ascii_lowercase(),
                port: u16::try_from(port).ok()?,
            })
        })
        .collect()
}

fn lower_name(n: &str) -> String {
    n.trim_end_matches('.').to_ascii_lowercase()
}

impl Service {
    pub fn parse(v: &Value) -> Option<Self> {
        let namespace = s(v, "/metadata/namespace")?.to_owned();
        let name = s(v, "/metadata/name")?.to_owned();
        let spec = v.get("spec")?;
        let external_name = (spec.get("type").and_then(Value::as_str) == Some("ExternalName"))
            .then(|| spec.get("externalName").and_then(Value::as_str))
            .flatten()
            .map(lower_name);
        let mut ips: Vec<&str> = spec
            .get("clusterIPs")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if ips.is_empty()
            && let Some(ip) = spec.get("clusterIP").and_then(Value::as_str)
        {
            ips.push(ip);
        }
        let headless = external_name.is_none() && ips.contains(&"None");
        Some(Self {
            namespace,
            name,
            cluster_ips: ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
            headless,
            external_name,
            publish_not_ready: spec
                .get("publishNotReadyAddresses")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            ports: ports(spec.get("ports")),
        })
    }
}

impl Slice {
    pub fn parse(v: &Value) -> Option<Self> {
        let namespace = s(v, "/metadata/namespace")?.to_owned();
        let service = s(v, "/metadata/labels/kubernetes.io~1service-name")?.to_owned();
        let endpoints = v
            .get("endpoints")
            .and_then(Value::as_array)
            .map(|eps| {
                eps.iter()
                    .map(|e| Endpoint {
                        addresses: e
                            .get("addresses")
                            .and_then(Value::as_array)
                            .map(|a| a.iter().filter_map(|x| x.as_str()?.parse().ok()).collect())
                            .unwrap_or_default(),
                        // The API says a missing `ready` means ready.
                        ready: e
                            .pointer("/conditions/ready")
                            .and_then(Value::as_bool)
                            .unwrap_or(true),
                        hostname: e
                            .get("hostname")
                            .and_then(Value::as_str)
                            .map(str::to_ascii_lowercase),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Self {
            namespace,
            service,
            endpoints,
            ports: ports(v.get("ports")),
        })
    }
}

impl Pod {
    pub fn parse(v: &Value) -> Option<Self> {
        let namespace = s(v, "/metadata/namespace")?.to_owned();
        let mut ips: Vec<IpAddr> = v
            .pointer("/status/podIPs")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.get("ip")?.as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if ips.is_empty()
            && let Some(ip) = s(v, "/status/podIP").and_then(|x| x.parse().ok())
        {
            ips.push(ip);
        }
        Some(Self {
            namespace,
            ips,
            hostname: s(v, "/spec/hostname").map(str::to_ascii_lowercase),
            subdomain: s(v, "/spec/subdomain").map(str::to_ascii_lowercase),
        })
    }
}

/// The record data at one name.
#[derive(Debug, Default, Clone)]
pub(crate) struct Node {
    pub rdatas: Vec<RData>,
    /// The CNAME target (lowercase, no trailing dot), to chase in-zone.
    pub cname: Option<String>,
}

impl Node {
    fn add(&mut self, rd: RData) {
        if !self.rdatas.contains(&rd) {
            self.rdatas.push(rd);
        }
    }
}

/// An immutable view of the cluster's names.
#[derive(Debug)]
pub struct Snapshot {
    /// The cluster domain, lowercase, without a trailing dot.
    pub(crate) zone: String,
    pub(crate) nodes: NameMap<Node>,
    /// (namespace, address) of every pod, for [`PodRecords::Verified`].
    pub(crate) pod_ips: HashSet<(String, IpAddr)>,
    /// Store revision the snapshot reflects (the SOA serial).
    pub(crate) revision: i64,
}

impl Snapshot {
    /// The cluster domain it serves.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// The store revision it reflects.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Number of owned names.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// The reverse-lookup name of an address (`4.3.2.1.in-addr.arpa`,
/// nibbles under `ip6.arpa`), lowercase without the trailing dot.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut out = String::with_capacity(72);
            for b in v6.octets().iter().rev() {
                out.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            out.push_str("ip6.arpa");
            out
        }
    }
}

/// The dashed form of an address used as a name label (`10-42-0-5`,
/// `fd00--1`), as CoreDNS writes it.
pub fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

fn fqdn(name: &str) -> Option<Name> {
    Name::from_ascii(format!("{name}.")).ok()
}

fn addr_rdata(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
}

/// Names to data, looked up once (or more) per query: foldhash is several
/// times cheaper than SipHash on these short keys, and its per-process
/// seed still keeps the layout unpredictable. Keys come from the cluster's
/// own objects, never from queries.
pub(crate) type NameMap<V> = HashMap<String, V, foldhash::fast::RandomState>;

struct Builder {
    zone: String,
    nodes: NameMap<Node>,
}

impl Builder {
    fn node(&mut self, name: &str) -> &mut Node {
        // Every name inside the zone makes its ancestors exist (empty
        // non-terminals answer NODATA, never NXDOMAIN).
        if let Some(rest) = name.strip_suffix(&self.zone) {
            let mut rest = rest.trim_end_matches('.');
            while let Some((_, parent)) = rest.split_once('.') {
                let full = format!("{parent}.{}", self.zone);
                if self.nodes.contains_key(&full) {
                    break;
                }
                self.nodes.insert(full, Node::default());
                rest = parent;
            }
        }
        self.nodes.entry(name.to_owned()).or_default()
    }

    fn addr(&mut self, name: &str, ip: IpAddr) {
        self.node(name).add(addr_rdata(ip));
    }

    fn ptr(&mut self, ip: IpAddr, target: &str) {
        if let Some(t) = fqdn(target) {
            self.node(&reverse_name(ip)).add(RData::PTR(PTR(t)));
        }
    }

    fn srv(&mut self, name: &str, weight: u16, port: u16, target: &str) {
        if let Some(t) = fqdn(target) {
            self.node(name)
                .add(RData::SRV(SRV::new(0, weight, port, t)));
        }
    }
}

/// Builds a snapshot from the objects currently known.
pub(crate) fn build<'a>(
    zone: &str,
    revision: i64,
    services: impl Iterator<Item = &'a Service>,
    slices: impl Iterator<Item = &'a Slice> + Clone,
    pods: impl Iterator<Item = &'a Pod> + Clone,
) -> Snapshot {
    let mut b = Builder {
        zone: zone.to_owned(),
        nodes: NameMap::default(),
    };
    b.node(zone);
    b.node(&format!("svc.{zone}"));
    b.node(&format!("pod.{zone}"));
    b.node(&format!("dns-version.{zone}"))
        .add(RData::TXT(TXT::new(vec![SPEC_VERSION.to_owned()])));

    // Slices grouped by (namespace, service) once, not per service.
    let mut by_service: HashMap<(&str, &str), Vec<&Slice>> = HashMap::new();
    for sl in slices {
        by_service
            .entry((sl.namespace.as_str(), sl.service.as_str()))
            .or_default()
            .push(sl);
    }
    let mut pods_by_subdomain: HashMap<(&str, &str), Vec<&Pod>> = HashMap::new();
    let mut pod_ips = HashSet::new();
    for p in pods {
        for ip in &p.ips {
            pod_ips.insert((p.namespace.clone(), *ip));
        }
        if let (Some(_), Some(sub)) = (&p.hostname, &p.subdomain) {
            pods_by_subdomain
                .entry((p.namespace.as_str(), sub.as_str()))
                .or_default()
                .push(p);
        }
    }

    for svc in services {
        let base = format!(
            "{}.{}.svc.{zone}",
            svc.name.to_ascii_lowercase(),
            svc.namespace.to_ascii_lowercase()
        );
        if let Some(target) = &svc.external_name {
            if let Some(t) = fqdn(target) {
                let n = b.node(&base);
                n.add(RData::CNAME(CNAME(t)));
                n.cname = Some(target.clone());
            }
            continue;
        }
        if !svc.headless {
            if svc.cluster_ips.is_empty() {
                continue;
            }
            for ip in &svc.cluster_ips {
                b.addr(&base, *ip);
                b.ptr(*ip, &base);
            }
            for p in svc.ports.iter().filter(|p| !p.name.is_empty()) {
                let name = format!("_{}._{}.{base}", p.name.to_ascii_lowercase(), p.protocol);
                b.srv(&name, 100, p.port, &base);
            }
            b.node(&base);
            continue;
        }
        // Headless: the service name exists even without endpoints.
        b.node(&base);
        let slices = by_service
            .get(&(svc.namespace.as_str(), svc.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let ready: Vec<(&Slice, &Endpoint)> = slices
            .iter()
            .flat_map(|sl| sl.endpoints.iter().map(move |e| (*sl, e)))
            .filter(|(_, e)| e.ready || svc.publish_not_ready)
            .collect();
        let weight = u16::try_from((100 / ready.len().max(1)).max(1)).unwrap_or(1);
        for (sl, ep) in &ready {
            for ip in &ep.addresses {
                let label = ep.hostname.clone().unwrap_or_else(|| dashed(*ip));
                let ep_name = format!("{label}.{base}");
                b.addr(&base, *ip);
                b.addr(&ep_name, *ip);
                b.ptr(*ip, &ep_name);
                for p in sl.ports.iter().filter(|p| !p.name.is_empty()) {
                    let name = format!("_{}._{}.{base}", p.name.to_ascii_lowercase(), p.protocol);
                    b.srv(&name, weight, p.port, &ep_name);
                }
            }
        }
        // Pods naming this headless service as their subdomain get
        // `hostname.subdomain.ns.svc.zone` even before an endpoint lists them.
        if let Some(pods) = pods_by_subdomain.get(&(svc.namespace.as_str(), svc.name.as_str())) {
            for p in pods {
                if let Some(h) = &p.hostname {
                    let ep_name = format!("{h}.{base}");
                    for ip in &p.ips {
                        b.addr(&ep_name, *ip);
                    }
                }
            }
        }
    }
    Snapshot {
        zone: zone.to_owned(),
        nodes: b.nodes,
        pod_ips,
        revision,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reverse_names() {
        assert_eq!(
            reverse_name("10.43.0.10".parse().unwrap()),
            "10.0.43.10.in-addr.arpa"
        );
        let v6 = reverse_name("2001:db8::1".parse().unwrap());
        assert!(v6.starts_with("1.0.0.0.0.0.0.0"));
        assert!(v6.ends_with("8.b.d.0.1.0.0.2.ip6.arpa"));
        assert_eq!(dashed("10.42.0.5".parse().unwrap()), "10-42-0-5");
    }

    #[test]
    fn ancestors_exist() {
        let svc = Service {
            namespace: "ns".into(),
            name: "web".into(),
            cluster_ips: vec!["10.43.0.5".parse().unwrap()],
            headless: false,
            external_name: None,
            publish_not_ready: false,
            ports: vec![Port {
                name: "http".into(),
                protocol: "tcp".into(),
                port: 80,
            }],
        };
        let snap = build("cluster.local", 1, [svc].iter(), [].iter(), [].iter());
        for n in [
            "web.ns.svc.cluster.local",
            "ns.svc.cluster.local",
            "_tcp.web.ns.svc.cluster.local",
            "_http._tcp.web.ns.svc.cluster.local",
            "5.0.43.10.in-addr.arpa",
        ] {
            assert!(snap.nodes.contains_key(n), "{n}");
        }
    }
}
