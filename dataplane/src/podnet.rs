//! Pod network plumbing, routed model (DESIGN.md "Node and pod networking"):
//! no bridge; each pod gets its own named network namespace and a veth
//! pair.
//!
//! * Pod side, `eth0` in the pod namespace: `IP/32`, `lo` up, the route
//!   `169.254.1.1 dev eth0 scope link`, `default via 169.254.1.1 dev eth0`
//!   and a PERMANENT neighbour entry mapping 169.254.1.1 to the host veth's
//!   MAC ([`HOST_VETH_MAC`]), so the pod never ARPs for its gateway and the
//!   node needs no proxy ARP.
//! * Host side, [`host_veth_name`] in the calling (node) namespace: up,
//!   `IP/32 dev HOSTVETH scope link proto 84` ([`POD_ROUTE_PROTO`]), a
//!   PERMANENT neighbour entry for the pod IP (the pod MAC is derived from
//!   the IP, [`pod_mac`]), forwarding on, rp_filter off on the veth, and
//!   `ip_forward` on in the node namespace.
//!
//! Everything is done over netlink (rtnetlink): no `ip` processes. The node
//! namespace is the one of the calling thread, so these functions must run
//! on a tokio runtime whose threads are in the node namespace (the agent's
//! own runtime; tests run a current-thread runtime inside a test namespace).
//! Host veths keep their names for their whole life so the load balancer
//! hooks can be attached with `KernelDatapath::attach_pod(host_veth)`.

mod nl;
pub mod routes;

use crate::{DataplaneError, NetNs};
use nl::Nl;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        link::{InfoData, InfoKind, InfoVeth},
        route::{RouteProtocol, RouteScope},
    },
};
use std::{
    io,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::PathBuf,
};

/// The pods' gateway: a link-local address nobody owns; the pod resolves
/// it to the host veth's MAC through a permanent neighbour entry.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// MAC of every host-side veth (as Calico does): pods only ever send to
/// their gateway, so one well-known MAC keeps the pod side static.
pub const HOST_VETH_MAC: [u8; 6] = [0xee; 6];
/// Name of the pod side of the veth pair.
pub const POD_IFNAME: &str = "eth0";
/// Route protocol (`ip route ... proto 84`) of the pod /32 host routes.
pub const POD_ROUTE_PROTO: u8 = 84;
/// Route protocol (`proto 83`, 0x53 'S') of the node routes to other
/// nodes' pod CIDRs; see [`routes`].
pub const NODE_ROUTE_PROTO: u8 = 83;
/// Prefix of host veth names.
pub const HOST_VETH_PREFIX: &str = "skp";
/// Prefix of pod namespace names.
pub const NETNS_PREFIX: &str = "skep-";
const NETNS_HEX: usize = 12;
const VETH_HEX: usize = 11;

/// What a pod's network needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetSpec {
    pub pod_uid: String,
    /// Normally [`netns_name`]`(pod_uid)`; [`teardown`] and the reconcile
    /// helpers only know pods by that name.
    pub netns_name: String,
    pub ip: Ipv4Addr,
    pub mtu: u32,
    /// Preferred source of the node's own packets to the pod (the pod
    /// route's `src`): the node address. Without it the kernel picks some
    /// address of the node, and a node service answering a pod over UDP
    /// (the cluster DNS) may answer from an address the pod's connected
    /// socket does not expect.
    pub host_src: Option<Ipv4Addr>,
}

impl PodNetSpec {
    /// The usual spec: namespace named from the UID.
    pub fn new(pod_uid: &str, ip: Ipv4Addr, mtu: u32) -> Self {
        Self {
            pod_uid: pod_uid.to_owned(),
            netns_name: netns_name(pod_uid),
            ip,
            mtu,
            host_src: None,
        }
    }

    /// The node address the pod route names as source.
    pub fn with_host_source(mut self, src: Ipv4Addr) -> Self {
        self.host_src = Some(src);
        self
    }
}

/// A pod's network as set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNet {
    /// `/run/netns/NAME`: what a runtime joins (`setns`) for the pod.
    pub netns_path: PathBuf,
    pub netns_name: String,
    pub host_veth: String,
    pub ip: Ipv4Addr,
}

/// FNV-1a: a hash that stays the same across Rust releases (names must
/// survive agent upgrades; `DefaultHasher` promises no such thing).
fn fnv1a(data: &str) -> u64 {
    data.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Host-side veth of a pod: `skp` + 11 hex digits of a hash of the UID
/// (14 characters; Linux allows 15).
pub fn host_veth_name(pod_uid: &str) -> String {
    // The top 44 bits: 11 hex digits.
    format!("{HOST_VETH_PREFIX}{:011x}", fnv1a(pod_uid) >> 20)
}

/// Network namespace of a pod: `skep-` + the first 12 hex digits of the UID
/// (a hash of it when the UID has fewer hex digits, as test UIDs may).
pub fn netns_name(pod_uid: &str) -> String {
    let hex: String = pod_uid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .take(NETNS_HEX)
        .collect();
    if hex.len() == NETNS_HEX {
        format!("{NETNS_PREFIX}{hex}")
    } else {
        format!("{NETNS_PREFIX}{:012x}", fnv1a(pod_uid) >> 16)
    }
}

fn is_hex_suffix(name: &str, prefix: &str, len: usize) -> bool {
    name.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == len
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Whether `name` has the form of a pod namespace name.
pub fn is_pod_netns_name(name: &str) -> bool {
    is_hex_suffix(name, NETNS_PREFIX, NETNS_HEX)
}

/// Whether `name` has the form of a host veth name.
pub fn is_host_veth_name(name: &str) -> bool {
    is_hex_suffix(name, HOST_VETH_PREFIX, VETH_HEX)
}

/// The pod side's MAC, derived from its IP (`0a:58:` + the IP, like the
/// Kubernetes host-local convention): locally administered, unicast, and
/// known to the node without asking the pod.
pub fn pod_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

fn ns_err<'a>(
    name: &'a str,
    action: &'static str,
) -> impl FnOnce(io::Error) -> DataplaneError + use<'a> {
    move |source| DataplaneError::NetNs {
        name: name.to_owned(),
        action,
        source,
    }
}

/// Sets up (or completes, or repairs) the network of a pod. Idempotent:
/// a second call with the same spec changes nothing; a half-made setup
/// (namespace without veth, veth whose peer is gone, missing address or
/// routes, a different IP) is completed.
pub async fn setup(spec: &PodNetSpec) -> Result<PodNet, DataplaneError> {
    let name = spec.netns_name.as_str();
    let host_veth = host_veth_name(&spec.pod_uid);
    let ns = ensure_netns(name)?;
    let node = Nl::current().map_err(ns_err(name, "opening a netlink socket (node)"))?;
    let pod = Nl::in_netns(&ns)?;

    let existing = nl::link_by_name(&node.handle, &host_veth)
        .await
        .map_err(ns_err(name, "looking up the host veth"))?;
    let pod_eth0 = nl::link_by_name(&pod.handle, POD_IFNAME)
        .await
        .map_err(ns_err(name, "looking up eth0"))?;
    // A veth pair lives and dies as a pair, so both names present means
    // they are each other's peer.
    let fresh = match (existing, pod_eth0) {
        (Some(_), Some(_)) => false,
        (host, eth0) => {
            if let Some(h) = host {
                del_link(&node.handle, h.header.index)
                    .await
                    .map_err(ns_err(name, "removing a stale host veth"))?;
            }
            if let Some(e) = eth0 {
                del_link(&pod.handle, e.header.index)
                    .await
                    .map_err(ns_err(name, "removing a stale eth0"))?;
            }
            create_veth(&node.handle, &ns, &host_veth, spec)
                .await
                .map_err(ns_err(name, "creating the veth pair"))?;
            true
        }
    };
    let host_idx = nl::link_by_name(&node.handle, &host_veth)
        .await
        .and_then(|l| l.ok_or_else(|| io::Error::other("host veth vanished")))
        .map_err(ns_err(name, "looking up the host veth"))?
        .header
        .index;
    let eth0 = nl::link_by_name(&pod.handle, POD_IFNAME)
        .await
        .and_then(|l| l.ok_or_else(|| io::Error::other("eth0 vanished")))
        .map_err(ns_err(name, "looking up eth0"))?;
    let eth0_idx = eth0.header.index;
    // The MAC eth0 really has: a repaired pod keeps the one derived from
    // its first IP.
    let eth0_mac = nl::link_mac(&eth0).unwrap_or(pod_mac(spec.ip));

    configure_pod_side(&pod.handle, eth0_idx, spec, fresh)
        .await
        .map_err(ns_err(name, "configuring eth0 in the pod"))?;
    configure_host_side(&node.handle, host_idx, &host_veth, spec, eth0_mac, fresh)
        .await
        .map_err(ns_err(name, "configuring the host veth"))?;
    tracing::debug!(netns = name, %host_veth, ip = %spec.ip, fresh, "pod network ready");
    Ok(PodNet {
        netns_path: ns.path().to_path_buf(),
        netns_name: name.to_owned(),
        host_veth,
        ip: spec.ip,
    })
}

/// Removes a pod's network: the host veth (its peer, routes and neighbour
/// entries go with it) and the namespace. Idempotent.
pub async fn teardown(pod_uid: &str) -> Result<(), DataplaneError> {
    let name = netns_name(pod_uid);
    let host_veth = host_veth_name(pod_uid);
    let node = Nl::current().map_err(ns_err(&name, "opening a netlink socket (node)"))?;
    // The veth first: a namespace kept alive by a lingering process would
    // otherwise keep the pair, and with it the host side, alive.
    if let Some(link) = nl::link_by_name(&node.handle, &host_veth)
        .await
        .map_err(ns_err(&name, "looking up the host veth"))?
    {
        del_link(&node.handle, link.header.index)
            .await
            .map_err(ns_err(&name, "removing the host veth"))?;
    }
    NetNs::remove_named(&name)?;
    tracing::debug!(netns = %name, %host_veth, "pod network removed");
    Ok(())
}

/// Names of the pod namespaces that exist (for reconciling after a crash:
/// any not belonging to a live pod is a leftover to tear down).
pub fn list_pod_netns() -> Result<Vec<String>, DataplaneError> {
    let mut names: Vec<String> = NetNs::list_names()?
        .into_iter()
        .filter(|n| is_pod_netns_name(n))
        .collect();
    names.sort();
    Ok(names)
}

/// Host veths (`skp*`) in the calling thread's namespace.
pub async fn list_host_veths() -> Result<Vec<String>, DataplaneError> {
    let node = Nl::current().map_err(ns_err("node", "opening a netlink socket"))?;
    let links = nl::links(&node.handle)
        .await
        .map_err(ns_err("node", "listing links"))?;
    let mut names: Vec<String> = links
        .iter()
        .filter_map(nl::link_name)
        .filter(|n| is_host_veth_name(n))
        .map(str::to_owned)
        .collect();
    names.sort();
    Ok(names)
}

/// Removes a host veth by name (for leftovers whose pod UID is unknown, as
/// found by [`list_host_veths`]). Idempotent.
pub async fn remove_host_veth(name: &str) -> Result<(), DataplaneError> {
    let node = Nl::current().map_err(ns_err(name, "opening a netlink socket"))?;
    if let Some(link) = nl::link_by_name(&node.handle, name)
        .await
        .map_err(ns_err(name, "looking up the host veth"))?
    {
        del_link(&node.handle, link.header.index)
            .await
            .map_err(ns_err(name, "removing the host veth"))?;
    }
    Ok(())
}

/// The MTU for pods on this node: that of the interface holding `node_ip`
/// in the calling thread's namespace, else 1500.
pub async fn node_mtu(node_ip: Ipv4Addr) -> u32 {
    const DEFAULT: u32 = 1500;
    let Ok(node) = Nl::current() else {
        return DEFAULT;
    };
    let Ok(index) = nl::interface_with(&node.handle, node_ip).await else {
        return DEFAULT;
    };
    match index {
        Some(i) => nl::link_mtu(&node.handle, i).await.unwrap_or(DEFAULT),
        None => DEFAULT,
    }
}

/// Opens the pod namespace, creating it (again) when absent or when only a
/// bare mount point is left.
fn ensure_netns(name: &str) -> Result<NetNs, DataplaneError> {
    if NetNs::exists(name) {
        return NetNs::open(name);
    }
    NetNs::remove_named(name)?;
    Ok(NetNs::create(name)?.keep())
}

async fn del_link(h: &Handle, index: u32) -> io::Result<()> {
    match h.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if nl::errno(&e) == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(nl::to_io(e)),
    }
}

/// One request creates both ends: the host side here, the peer directly in
/// the pod namespace, both with their MACs and MTU.
async fn create_veth(h: &Handle, ns: &NetNs, host: &str, spec: &PodNetSpec) -> io::Result<()> {
    let ns_file = std::fs::File::open(ns.path())?;
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(POD_IFNAME)
        .mtu(spec.mtu)
        .address(pod_mac(spec.ip).to_vec())
        .setns_by_fd(ns_file.as_raw_fd())
        .build();
    let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host)
        .mtu(spec.mtu)
        .address(HOST_VETH_MAC.to_vec())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .up()
        .build();
    let result = h.link().add(msg).execute().await.map_err(nl::to_io);
    // The kernel has resolved the fd by the time it answered.
    drop(ns_file);
    result
}

fn is_exists(e: &rtnetlink::Error) -> bool {
    nl::errno(e) == Some(libc::EEXIST)
}

async fn configure_pod_side(
    h: &Handle,
    eth0: u32,
    spec: &PodNetSpec,
    fresh: bool,
) -> io::Result<()> {
    if !fresh {
        // Repair path: drop any address other than the pod's (the pod may
        // have been given a new IP).
        for (ip, len) in nl::ipv4_addresses(h, eth0).await? {
            if (ip, len) != (spec.ip, 32) {
                let msg = rtnetlink::AddressMessageBuilder::<Ipv4Addr>::new()
                    .index(eth0)
                    .address(ip, len)
                    .build();
                h.address().del(msg).execute().await.map_err(nl::to_io)?;
            }
        }
    }
    match h
        .address()
        .add(eth0, IpAddr::V4(spec.ip), 32)
        .execute()
        .await
    {
        Ok(()) => {}
        Err(e) if is_exists(&e) => {}
        Err(e) => return Err(nl::to_io(e)),
    }
    h.link()
        .set(LinkUnspec::new_with_index(eth0).up().build())
        .execute()
        .await
        .map_err(nl::to_io)?;
    let gw_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(GATEWAY, 32)
        .output_interface(eth0)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::Other(POD_ROUTE_PROTO))
        .build();
    h.route()
        .add(gw_route)
        .replace()
        .execute()
        .await
        .map_err(nl::to_io)?;
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .gateway(GATEWAY)
        .output_interface(eth0)
        .protocol(RouteProtocol::Other(POD_ROUTE_PROTO))
        .build();
    h.route()
        .add(default)
        .replace()
        .execute()
        .await
        .map_err(nl::to_io)?;
    h.neighbours()
        .add(eth0, IpAddr::V4(GATEWAY))
        .link_layer_address(&HOST_VETH_MAC)
        .replace()
        .execute()
        .await
        .map_err(nl::to_io)
}

async fn configure_host_side(
    h: &Handle,
    idx: u32,
    name: &str,
    spec: &PodNetSpec,
    pod_mac: [u8; 6],
    fresh: bool,
) -> io::Result<()> {
    // /proc/sys/net is the namespace of the thread that opens the file: the
    // calling (node) thread, as wanted. Done inline, not on a blocking
    // pool whose threads could be in another namespace.
    enable_ip_forward()?;
    write_sysctl(&format!("/proc/sys/net/ipv4/conf/{name}/forwarding"), "1")?;
    write_sysctl(&format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"), "0")?;
    if !fresh {
        h.link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .map_err(nl::to_io)?;
        // Routes left from an earlier IP of this pod.
        for r in nl::main_ipv4_routes(h).await? {
            if nl::route_oif(&r) == Some(idx) && nl::route_dst(&r) != (spec.ip, 32) {
                h.route().del(r).execute().await.map_err(nl::to_io)?;
            }
        }
    }
    h.neighbours()
        .add(idx, IpAddr::V4(spec.ip))
        .link_layer_address(&pod_mac)
        .replace()
        .execute()
        .await
        .map_err(nl::to_io)?;
    let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(spec.ip, 32)
        .output_interface(idx)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::Other(POD_ROUTE_PROTO));
    if let Some(src) = spec.host_src {
        route = route.pref_source(src);
    }
    let route = route.build();
    h.route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(nl::to_io)
}

fn write_sysctl(path: &str, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}

/// Turns on IPv4 forwarding in the calling thread's namespace, only when it
/// is off: every write to ip_forward walks all interfaces.
fn enable_ip_forward() -> io::Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let current = std::fs::read_to_string(PATH)
        .map_err(|e| io::Error::new(e.kind(), format!("{PATH}: {e}")))?;
    if current.trim() != "1" {
        write_sysctl(PATH, "1")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_fit_linux_limits() {
        let uid = "3f2b9c1e-7a4d-4e8b-9c0d-112233445566";
        let veth = host_veth_name(uid);
        assert_eq!(veth.len(), 14);
        assert!(veth.len() <= 15, "IFNAMSIZ - 1");
        assert!(is_host_veth_name(&veth));
        assert_eq!(veth, host_veth_name(uid), "deterministic");
        assert_ne!(veth, host_veth_name("another"));
        // Pinned: a change here renames every existing pod's veth.
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        let ns = netns_name(uid);
        assert_eq!(ns, "skep-3f2b9c1e7a4d");
        assert!(is_pod_netns_name(&ns));
        let short = netns_name("pod-x");
        assert!(is_pod_netns_name(&short), "{short}");
        assert!(!is_pod_netns_name("skep-test-node"));
        assert!(!is_host_veth_name("skp0"));
        assert_eq!(
            pod_mac(Ipv4Addr::new(10, 42, 7, 2)),
            [0x0a, 0x58, 10, 42, 7, 2]
        );
    }
}
