//! Types shared by the kernel programs (`ebpf/programs`) and userspace
//! (`dataplane`). Everything here is `#[repr(C)]`, `Copy`, and free of
//! padding surprises (explicit `_pad` fields), because the kernel and
//! userspace read the same bytes.
//!
//! Byte order: IPv4 addresses and L4 ports in map keys and values are kept
//! in *network* byte order, exactly as they appear in packets (an address is
//! the packet's 4 bytes read as a native `u32`). The kernel then compares and
//! rewrites without swapping, and userspace converts with
//! `u32::from_ne_bytes(ip.octets())` / `port.to_be()`.
#![no_std]

/// Names of the maps and programs in the eBPF object. Userspace looks them up
/// by these names, so both sides use the constants.
pub mod names {
    /// TC classifier that counts packets and bytes per interface.
    pub const PROG_TC_COUNT: &str = "tc_count";
    /// Per-CPU hash map: ifindex (u32) -> [`super::IfaceStats`].
    pub const MAP_IFACE_STATS: &str = "IFACE_STATS";

    /// TC ingress on a pod's host-side veth: service DNAT.
    pub const PROG_FROM_POD: &str = "from_pod";
    /// TC egress on a pod's host-side veth: reverse NAT of replies.
    pub const PROG_TO_POD: &str = "to_pod";

    /// Hash: [`super::ServiceKey`] -> [`super::ServiceValue`].
    pub const MAP_SERVICES: &str = "SKEP_SERVICES";
    /// Hash: backend id (u32) -> [`super::BackendValue`].
    pub const MAP_BACKENDS: &str = "SKEP_BACKENDS";
    /// Array: `service id * table size + slot` -> backend id (u32).
    pub const MAP_MAGLEV: &str = "SKEP_MAGLEV";
    /// LRU hash: [`super::CtKey`] -> [`super::CtValue`].
    pub const MAP_CT: &str = "SKEP_CT";
    /// LRU hash: [`super::AffinityKey`] -> [`super::AffinityValue`].
    pub const MAP_AFFINITY: &str = "SKEP_AFFINITY";
    /// Array of one [`super::LbConfig`].
    pub const MAP_CONFIG: &str = "SKEP_LB_CONFIG";
    /// Per-CPU array: [`super::LbCounter`] index -> u64.
    pub const MAP_COUNTERS: &str = "SKEP_COUNTERS";
    /// LRU hash: [`super::SockRevKey`] -> [`super::SockRevValue`].
    pub const MAP_SOCK_REVNAT: &str = "SKEP_SOCK_RNAT";

    /// cgroup/connect4: socket-level LB of TCP and connected UDP.
    pub const PROG_SOCK_CONNECT4: &str = "sock_connect4";
    /// cgroup/sendmsg4: socket-level LB of unconnected UDP sends.
    pub const PROG_SOCK_SENDMSG4: &str = "sock_sendmsg4";
    /// cgroup/recvmsg4: replies of unconnected UDP appear from the VIP.
    pub const PROG_SOCK_RECVMSG4: &str = "sock_recvmsg4";
    /// cgroup/getpeername4: connected sockets report the VIP as peer.
    pub const PROG_SOCK_GETPEERNAME4: &str = "sock_getpeername4";

    /// LPM trie: [`super::IpcacheKey`] -> [`super::IpcacheValue`]: every
    /// known address or CIDR and its security identity.
    pub const MAP_IPCACHE: &str = "SKEP_IPCACHE";
    /// Hash: local pod address (u32, network order) -> [`super::EndpointValue`].
    pub const MAP_ENDPOINTS: &str = "SKEP_ENDPOINTS";
    /// LPM trie: [`super::PolicyKey`] -> [`super::PolicyValue`]: the
    /// allow rules of every local endpoint.
    pub const MAP_POLICY: &str = "SKEP_POLICY";
    /// LRU hash: [`super::CtKey`] (post-DNAT tuple, `dir` = 0) ->
    /// [`super::PolicyCtValue`]: connections policy has admitted.
    pub const MAP_POLICY_CT: &str = "SKEP_POLICY_CT";
    /// Ring buffer of [`super::FlowEvent`]s.
    pub const MAP_FLOWS: &str = "SKEP_FLOWS";
    /// Array of one u64: the policy generation, bumped by userspace after
    /// every change of the ipcache, endpoint or rule maps. `xdp_policy`'s
    /// denial cache entries of an older generation are ignored.
    pub const MAP_POLICY_GEN: &str = "SKEP_POLICY_GEN";
    /// Per-CPU array: slot (a hash of the [`super::DenyKey`]) ->
    /// [`super::DenyEntry`]: `xdp_policy`'s recent denials, one
    /// direct-mapped table per CPU. Not pinned: each loader starts with an
    /// empty cache.
    pub const MAP_XDP_DENY: &str = "SKEP_XDP_DENY";

    /// Array, 1 entry: the policy conntrack generation (u64), bumped by
    /// the pod hooks whenever they admit something into
    /// [`MAP_POLICY_CT`] (a new entry or a new direction). A cached
    /// denial that saw the current value needs no conntrack lookup.
    pub const MAP_POLICY_CT_GEN: &str = "SKEP_POLICY_CT_GEN";

    /// Every policy map the dataplane pins next to the LB maps.
    pub const POLICY_MAPS: [&str; 7] = [
        MAP_IPCACHE,
        MAP_ENDPOINTS,
        MAP_POLICY,
        MAP_POLICY_CT,
        MAP_FLOWS,
        MAP_POLICY_GEN,
        MAP_POLICY_CT_GEN,
    ];

    /// Every map the load balancer pins (in this order in the pin dir).
    pub const LB_MAPS: [&str; 8] = [
        MAP_SERVICES,
        MAP_BACKENDS,
        MAP_MAGLEV,
        MAP_CT,
        MAP_AFFINITY,
        MAP_CONFIG,
        MAP_COUNTERS,
        MAP_SOCK_REVNAT,
    ];

    /// XDP on a node's external interface: service load balancing of
    /// external frontends (NodePort, ExternalIPs, LoadBalancer IPs) with
    /// SNAT for remote backends, then the early drop of traffic a local
    /// pod's ingress policy denies.
    pub const PROG_XDP_NODE: &str = "xdp_node";
    /// XDP program that passes everything. Attached to the peer of a veth
    /// that `xdp_node` transmits on: before Linux 5.13 a veth only accepts
    /// XDP frames when its peer runs an XDP program.
    pub const PROG_XDP_PASS: &str = "xdp_pass";

    /// cgroup/connect4 on a meshed pod's cgroup v2 directory: the app's TCP
    /// connects go to the sidecar's outbound port ([mesh] capture).
    pub const PROG_MESH_CONNECT4: &str = "mesh_connect4";
    /// LRU hash: app socket cookie (u64) -> [`super::MeshOrigDst`].
    pub const MAP_MESH_ORIG: &str = "SKEP_MESH_ORIG";
    /// Hash: local meshed pod address (u32, network order) ->
    /// [`super::MeshPod`].
    pub const MAP_MESH_PODS: &str = "SKEP_MESH_PODS";
    /// The mesh maps, pinned beside the LB maps.
    pub const MESH_MAPS: [&str; 2] = [MAP_MESH_ORIG, MAP_MESH_PODS];
}

/// Where a captured connect() was going (value of
/// [`names::MAP_MESH_ORIG`]): after service translation, so a pod address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshOrigDst {
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// A meshed pod (value of [`names::MAP_MESH_PODS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshPod {
    /// `MESH_POD_F_*`.
    pub flags: u32,
}

/// The pod runs a sidecar (accepts mTLS on [`MESH_INBOUND_PORT`]).
pub const MESH_POD_F_MESHED: u32 = 1;
/// Strict mode: new TCP connections from other hosts/pods are only
/// admitted to [`MESH_INBOUND_PORT`] (to_pod drops the rest).
pub const MESH_POD_F_STRICT: u32 = 2;
/// The sidecar's ports (host order).
pub const MESH_OUTBOUND_PORT: u16 = 15001;
pub const MESH_INBOUND_PORT: u16 = 15006;
pub const MESH_ADMIN_PORT: u16 = 15020;
/// SO_MARK of every socket the sidecar opens: exempt from capture.
pub const MESH_SIDECAR_MARK: u32 = 0x5ce9;
pub const DEFAULT_MESH_ORIG_ENTRIES: u32 = 65536;
pub const DEFAULT_MESH_POD_ENTRIES: u32 = 4096;

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

/// IP protocol numbers the load balancer handles.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// SCTP: judged by NetworkPolicy (its ports sit where TCP's and UDP's do),
/// never load-balanced (its CRC32c covers the ports, so no incremental
/// rewrite, and skep's Services carry TCP and UDP only).
pub const IPPROTO_SCTP: u8 = 132;

/// Default sizes of the load balancer's maps (`LbSettings::default`);
/// userspace sets them at load time (`EbpfLoader::map_max_entries`), the
/// object itself only carries small placeholders.
pub const DEFAULT_MAX_SERVICES: u32 = 1024;
pub const DEFAULT_MAX_BACKENDS: u32 = 65536;
/// Default Maglev table size (a prime, as Maglev needs).
pub const DEFAULT_MAGLEV_SIZE: u32 = 16381;
/// Map flags of the Maglev array: BPF_F_MMAPABLE, so userspace can write
/// whole rows through a shared mapping.
pub const MAGLEV_MAP_FLAGS: u32 = 1 << 10;
pub const DEFAULT_CT_ENTRIES: u32 = 262_144;
pub const DEFAULT_AFFINITY_ENTRIES: u32 = 65536;

/// A service frontend: one (VIP, port, protocol) of a Service. A Service with
/// several ports has one key per port, each with its own id and Maglev table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// The frontend's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Row of this frontend in the Maglev map (`id * table size`).
    pub id: u32,
    /// Backends new connections may use (0 → refuse: RST for TCP).
    pub backend_count: u32,
    /// ClientIP session affinity timeout in seconds; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// `SVC_F_*` bits.
    pub flags: u32,
}

/// Frontend flag: external (a NodePort, ExternalIP or LoadBalancer IP).
/// Connections entering the node's external interface for it are SNATed
/// to the node when the chosen backend runs on another node.
pub const SVC_F_EXTERNAL: u32 = 1;

/// Backend state bit: terminating. Existing connections keep using it, new
/// ones never land on it (userspace also leaves it out of the Maglev table).
pub const BACKEND_F_TERMINATING: u8 = 1;
/// Backend state bit: the backend runs on another node (external
/// connections to it need SNAT so that its replies come back here).
pub const BACKEND_F_REMOTE: u8 = 2;

/// A backend of one frontend (ids are per frontend, so removing an endpoint
/// from one Service never disturbs another).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendValue {
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub flags: u8,
    pub _pad: u8,
    /// Frontend (service id) this backend belongs to.
    pub service_id: u32,
}

/// Conntrack direction: the client's packets (key = pre-DNAT tuple).
pub const CT_DIR_FORWARD: u8 = 0;
/// Conntrack direction: the backend's replies (key = backend → client).
pub const CT_DIR_REPLY: u8 = 1;

/// A conntrack key: the packet's tuple as seen on the hook that looks it up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u16,
}

/// Conntrack flag: the client is its own backend; its source was rewritten
/// to the hairpin address.
pub const CT_F_HAIRPIN: u8 = 1;
/// Conntrack flag: a TCP FIN or RST was seen (GC may reap it early).
pub const CT_F_CLOSING: u8 = 2;
/// Conntrack flag: an external connection to a remote backend, source-NATed
/// to the node (see [`CtValue::snat_addr`]).
pub const CT_F_SNAT: u8 = 4;

/// A conntrack value. Forward entries hold the backend (DNAT target); reply
/// entries hold the frontend (source to restore).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// Network byte order.
    pub nat_addr: u32,
    /// Network byte order.
    pub nat_port: u16,
    pub flags: u8,
    pub _pad: u8,
    pub backend_id: u32,
    pub service_id: u32,
    /// bpf_ktime_get_ns() of the last packet (CLOCK_MONOTONIC).
    pub last_seen_ns: u64,
    pub packets: u64,
    /// With [`CT_F_SNAT`], network byte order. Forward entry: the node
    /// address and port the connection leaves from (new source). Reply
    /// entry (key: backend → node address, SNAT port): the client to
    /// restore as destination.
    pub snat_addr: u32,
    pub snat_port: u16,
    pub _pad2: u16,
}

/// ClientIP session affinity key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client_addr: u32,
    pub service_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// bpf_ktime_get_ns() of the last new connection that used it.
    pub last_used_ns: u64,
}

/// Socket-level LB: which backend a socket's frontend was rewritten to,
/// keyed by socket cookie and backend, so replies and getpeername can show
/// the frontend again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

pub const DEFAULT_SOCK_REVNAT_ENTRIES: u32 = 65536;

/// Load balancer settings the kernel reads on every packet (entry 0 of
/// [`names::MAP_CONFIG`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// Maglev table size (prime) of every frontend.
    pub maglev_size: u32,
    /// Source address for hairpin connections (network byte order).
    pub hairpin_addr: u32,
    /// Nonzero once userspace has written the config; until then the
    /// programs let everything pass.
    pub ready: u32,
    /// `CFG_F_*` bits.
    pub flags: u32,
    /// The node address external connections to remote backends are
    /// SNATed to (network byte order); 0: no SNAT (remote backends of
    /// external frontends are then not used by external clients).
    pub node_addr: u32,
    /// Interface index of the node's external interface (the TC hooks
    /// there handle SNAT and its replies); 0 when not attached.
    pub ext_ifindex: u32,
    /// SNAT source ports, host byte order, inclusive: outside the
    /// kernel's ephemeral range so no local socket competes for them.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub _pad: u32,
}

/// Default SNAT port range (Linux's ephemeral ports end at 60999).
pub const DEFAULT_SNAT_PORT_MIN: u16 = 61000;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 65535;

/// Indexes of the per-CPU counters in [`names::MAP_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbCounter {
    /// IPv4 TCP/UDP packets the from-pod hook looked at.
    FromPodPackets = 0,
    /// Packets DNATed by an existing conntrack entry.
    CtHit = 1,
    /// New connections to a service (conntrack entry created).
    NewConnection = 2,
    /// New connections that reused a session-affinity backend.
    AffinityHit = 3,
    /// Hairpin connections (source rewritten to the hairpin address).
    Hairpin = 4,
    /// TCP connection attempts to a service without backends, answered RST.
    NoBackendRst = 5,
    /// Other packets to a service without backends, dropped.
    NoBackendDrop = 6,
    /// Conntrack insert failed (the LRU map evicts, so this is rare).
    CtInsertFailed = 7,
    /// Packet rewrite (store or checksum helper) failed; packet dropped.
    RewriteFailed = 8,
    /// Replies reverse-NATed by the to-pod hook.
    ReverseNat = 9,
    /// Hairpin replies whose destination was restored in from-pod.
    HairpinReply = 10,
    /// Conntrack entries whose backend had gone; the flow was re-balanced.
    CtStaleBackend = 11,
    /// Non-first IPv4 fragments (no L4 header: passed unchanged).
    Fragment = 12,
    /// UDP datagrams to a service without backends, answered ICMP port
    /// unreachable.
    NoBackendIcmp = 13,
    /// Sockets of host processes connected/sent straight to a backend.
    SockLb = 14,
    /// Socket connects/sends to a service without backends, refused.
    SockRefused = 15,
    /// New connections an isolated endpoint's policy admitted (either hook).
    PolicyAllowed = 16,
    /// Packets dropped by the source pod's egress policy.
    PolicyDeniedEgress = 17,
    /// Packets dropped by the destination pod's ingress policy.
    PolicyDeniedIngress = 18,
    /// Flow events lost because the ring buffer was full (no reader, or a
    /// slow one).
    FlowsLost = 19,
    /// Packets the XDP program on the external interface dropped because
    /// the destination pod's ingress policy denies them.
    XdpPolicyDrop = 20,
    /// New external connections to remote backends (SNAT port taken).
    SnatNew = 21,
    /// External connections refused because no SNAT port was free.
    SnatExhausted = 22,
    /// Packets of SNATed connections (both directions) the TC hooks
    /// redirected after a FIB lookup.
    SnatRedirectTc = 23,
    /// Packets `xdp_node` load-balanced and passed up (local backends).
    XdpLbPass = 24,
    /// Packets `xdp_node` translated and transmitted itself (SNATed
    /// connections, both directions).
    XdpLbTx = 25,
    /// Packets `xdp_node` left to the TC hooks because it could not finish
    /// them (neighbour unresolved, fragment, no FIB route).
    XdpLbFallback = 26,
    /// Of the [`LbCounter::XdpPolicyDrop`] drops, those decided by the
    /// denial cache (no endpoint, ipcache or rule lookups).
    XdpDenyCacheHit = 27,
}

/// Number of counters (size of [`names::MAP_COUNTERS`]).
pub const LB_COUNTERS: u32 = 28;

/// Every counter with its name, for userspace reports.
pub const LB_COUNTER_NAMES: [(LbCounter, &str); LB_COUNTERS as usize] = [
    (LbCounter::FromPodPackets, "from_pod_packets"),
    (LbCounter::CtHit, "ct_hit"),
    (LbCounter::NewConnection, "new_connection"),
    (LbCounter::AffinityHit, "affinity_hit"),
    (LbCounter::Hairpin, "hairpin"),
    (LbCounter::NoBackendRst, "no_backend_rst"),
    (LbCounter::NoBackendDrop, "no_backend_drop"),
    (LbCounter::CtInsertFailed, "ct_insert_failed"),
    (LbCounter::RewriteFailed, "rewrite_failed"),
    (LbCounter::ReverseNat, "reverse_nat"),
    (LbCounter::HairpinReply, "hairpin_reply"),
    (LbCounter::CtStaleBackend, "ct_stale_backend"),
    (LbCounter::Fragment, "fragment"),
    (LbCounter::NoBackendIcmp, "no_backend_icmp"),
    (LbCounter::SockLb, "sock_lb"),
    (LbCounter::SockRefused, "sock_refused"),
    (LbCounter::PolicyAllowed, "policy_allowed"),
    (LbCounter::PolicyDeniedEgress, "policy_denied_egress"),
    (LbCounter::PolicyDeniedIngress, "policy_denied_ingress"),
    (LbCounter::FlowsLost, "flows_lost"),
    (LbCounter::XdpPolicyDrop, "xdp_policy_drop"),
    (LbCounter::SnatNew, "snat_new"),
    (LbCounter::SnatExhausted, "snat_exhausted"),
    (LbCounter::SnatRedirectTc, "snat_redirect_tc"),
    (LbCounter::XdpLbPass, "xdp_lb_pass"),
    (LbCounter::XdpLbTx, "xdp_lb_tx"),
    (LbCounter::XdpLbFallback, "xdp_lb_fallback"),
    (LbCounter::XdpDenyCacheHit, "xdp_deny_cache_hit"),
];

/// Config flag ([`LbConfig::flags`]): enforce NetworkPolicy in the pod
/// hooks. Until userspace has written the first full policy state the
/// hooks admit everything (a restarting agent must not cut connections).
pub const CFG_F_POLICY: u32 = 1;
/// Config flag: emit [`FlowEvent`]s to [`names::MAP_FLOWS`].
pub const CFG_F_FLOWS: u32 = 2;
/// Config flag: `xdp_node` load-balances external frontends itself (else
/// it leaves them to the TC hooks). Off where the external interface may
/// receive packets whose checksum a local sender left for the device to
/// complete (veths): XDP cannot see or complete that state.
pub const CFG_F_XDP_LB: u32 = 4;

/// Reserved security identities (Cilium's numbering, so that people who
/// know it read flows without a table).
pub const ID_UNKNOWN: u32 = 0;
/// The local node: its addresses, and anything the node's own stack sends
/// (hostNetwork pods, kubelet probes). Always admitted to local pods.
pub const ID_HOST: u32 = 1;
/// Any address the ipcache does not know.
pub const ID_WORLD: u32 = 2;
/// Another node of the cluster (its node addresses).
pub const ID_REMOTE_NODE: u32 = 6;
/// First identity of CIDR peers (ipBlock); 1..256 are reserved.
pub const ID_CIDR_FIRST: u32 = 1 << 24;
/// First identity of label sets (pods); below the CIDR range.
pub const ID_POD_FIRST: u32 = 256;
/// Wildcard remote identity in a [`PolicyKey`]: any peer.
pub const ID_ANY: u32 = 0;

/// Default sizes of the policy maps.
pub const DEFAULT_IPCACHE_ENTRIES: u32 = 65536;
pub const DEFAULT_ENDPOINT_ENTRIES: u32 = 4096;
pub const DEFAULT_POLICY_ENTRIES: u32 = 262_144;
pub const DEFAULT_POLICY_CT_ENTRIES: u32 = 262_144;
/// Ring buffer size in bytes (a power of two, multiple of the page size).
pub const DEFAULT_FLOW_RING_BYTES: u32 = 1 << 20;

/// LPM trie key of the ipcache: `prefix_len` bits of `addr` (network
/// order) must match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheKey {
    pub prefix_len: u32,
    /// Network byte order.
    pub addr: u32,
}

/// What the ipcache knows about an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    /// Identity of the address itself: a pod's label-set identity, HOST,
    /// REMOTE_NODE, or (for CIDR entries) the CIDR identity.
    pub identity: u32,
    /// Identity of the most specific ipBlock CIDR (or `except` hole)
    /// containing the address, computed by userspace; ID_WORLD when none.
    /// Lets an ipBlock rule match pod addresses too, with one lookup.
    pub cidr_identity: u32,
}

/// Endpoint flag: ingress is isolated (some policy selects the pod for
/// Ingress); without it every source is admitted.
pub const EP_F_INGRESS_ISOLATED: u32 = 1;
/// Endpoint flag: egress is isolated.
pub const EP_F_EGRESS_ISOLATED: u32 = 2;

/// A local pod, keyed by its address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointValue {
    /// Number of the endpoint in [`PolicyKey::endpoint`] (nonzero).
    pub endpoint: u32,
    /// The pod's own identity (for flow events).
    pub identity: u32,
    /// `EP_F_*` bits.
    pub flags: u32,
    pub _pad: u32,
}

/// Policy direction in [`PolicyKey::direction`].
pub const DIR_INGRESS: u8 = 1;
pub const DIR_EGRESS: u8 = 2;

/// Prefix length of a [`PolicyKey`] that matches one exact port.
pub const POLICY_PREFIX_EXACT: u32 = 96;
/// Prefix length matching every port of one protocol.
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;
/// Prefix length matching every protocol and port.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;

/// LPM trie key of the policy map. The data bytes are, in order:
/// endpoint (4, big endian), remote identity (4, big endian), direction (1),
/// protocol (1), destination port (2, network order). Everything up to the
/// protocol is always in the prefix; the port is matched on its first
/// `prefix_len - 80` bits, so a port range (endPort) is a few prefixes and
/// "any port" is prefix 80. Remote identity [`ID_ANY`] is the wildcard
/// peer; the hook looks up the peer's identity, its CIDR identity and
/// ID_ANY.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub prefix_len: u32,
    /// Big endian (so the trie orders it like the other bytes).
    pub endpoint: u32,
    /// Big endian.
    pub identity: u32,
    pub direction: u8,
    pub proto: u8,
    /// Network byte order.
    pub port: u16,
}

/// An allow rule's origin, for flow events and `skep ctl policy`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// Number of the NetworkPolicy that allowed it (userspace's table).
    pub policy_id: u32,
    pub _pad: u32,
}

/// Policy conntrack flags: which side's policy has admitted the connection.
pub const PCT_F_EGRESS_OK: u32 = 1;
pub const PCT_F_INGRESS_OK: u32 = 2;
/// A TCP FIN or RST was seen: the idle sweep may reap the entry early.
pub const PCT_F_CLOSING: u32 = 4;

/// A connection policy has seen (key: post-DNAT tuple of its first packet,
/// `dir` 0). Replies are matched by looking up the reversed tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyCtValue {
    /// `PCT_F_*` bits.
    pub flags: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub _pad: u32,
    /// bpf_ktime_get_ns() of the last packet.
    pub last_seen_ns: u64,
}

/// Flow verdicts.
pub const VERDICT_FORWARDED: u8 = 1;
pub const VERDICT_DROPPED: u8 = 2;

/// Drop reasons (0 when forwarded).
pub const DROP_NONE: u8 = 0;
/// The source pod's egress policy allows no rule for this peer and port.
pub const DROP_POLICY_EGRESS: u8 = 1;
/// The destination pod's ingress policy denies it.
pub const DROP_POLICY_INGRESS: u8 = 2;
/// A service without ready endpoints (refused with RST / ICMP).
pub const DROP_NO_BACKEND: u8 = 3;

/// Where the event was observed.
pub const OBS_FROM_POD: u8 = 1;
pub const OBS_TO_POD: u8 = 2;
/// Dropped by `xdp_policy` on the node's external interface (rate-limited
/// events: a flood must not cost a ring-buffer write per packet).
pub const OBS_XDP: u8 = 3;

/// Policy id in a flow event when no policy was involved (the endpoint is
/// not isolated in that direction, or the flow is a reply).
pub const POLICY_ID_NONE: u32 = 0;
/// Policy id when the host rule (own node always allowed) admitted it.
pub const POLICY_ID_HOST: u32 = u32::MAX;

/// One flow event: the first packet of every new connection each hook
/// admits, and every dropped packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// bpf_ktime_get_ns() (CLOCK_MONOTONIC).
    pub time_ns: u64,
    /// Network byte order; after DNAT (the backend) for from-pod events.
    pub saddr: u32,
    pub daddr: u32,
    /// The service frontend before DNAT (0 when there was none).
    pub orig_daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub orig_dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// `DROP_*`.
    pub drop_reason: u8,
    /// `OBS_*`.
    pub observation: u8,
    pub _pad: u8,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The policy that allowed (or [`POLICY_ID_NONE`]/[`POLICY_ID_HOST`]).
    pub policy_id: u32,
    /// The host-side interface of the hook.
    pub ifindex: u32,
}

/// What a cached denial ([`DenyEntry`]) is about: what the decision
/// depends on besides the maps covered by the policy generation. No source
/// port, so a flood with random source ports hits the same entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DenyKey {
    /// Network byte order, as in the packet.
    pub saddr: u32,
    pub daddr: u32,
    pub dport: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// A slot of [`names::MAP_XDP_DENY`]: one cached denial.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyEntry {
    pub key: DenyKey,
    /// The source's identity at the decision (for flow events of hits).
    pub src_identity: u32,
    /// The destination endpoint's identity then (likewise).
    pub dst_identity: u32,
    /// The source port of the packet whose tuple the policy conntrack was
    /// last checked for (network order): the key has no source port, the
    /// conntrack's answer depends on it.
    pub ct_sport: u16,
    pub _pad: u16,
    /// The policy generation read before the decision was made; 0 = empty
    /// (userspace bumps the generation before enforcing anything).
    pub generation: u64,
    /// The policy conntrack generation read before that check: while it is
    /// current, nothing has been admitted since, so the check would still
    /// find no connection for (key, `ct_sport`).
    pub ct_generation: u64,
}

/// log2 of the slots per CPU of the denial cache (40 bytes each: 160 KiB
/// per CPU). Two denials whose keys share a slot take turns; a miss only
/// costs the full decision.
pub const XDP_DENY_SLOTS_LOG2: u32 = 12;
pub const XDP_DENY_SLOTS: u32 = 1 << XDP_DENY_SLOTS_LOG2;

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all impls below): each type is #[repr(C)], Copy, built only from
    // integers, with explicit padding fields so there are no implicit holes;
    // any byte pattern of its size is a valid value.
    unsafe impl aya::Pod for super::IfaceStats {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::BackendValue {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::LbConfig {}
    unsafe impl aya::Pod for super::SockRevKey {}
    unsafe impl aya::Pod for super::SockRevValue {}
    unsafe impl aya::Pod for super::IpcacheValue {}
    unsafe impl aya::Pod for super::EndpointValue {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::PolicyCtValue {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::MeshOrigDst {}
    unsafe impl aya::Pod for super::MeshPod {}
    unsafe impl aya::Pod for super::DenyKey {}
    unsafe impl aya::Pod for super::DenyEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(size_of::<BackendValue>(), 12);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 40);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<LbConfig>(), 32);
        assert_eq!(size_of::<SockRevKey>(), 16);
        assert_eq!(size_of::<SockRevValue>(), 8);
        assert_eq!(size_of::<IpcacheKey>(), 8);
        assert_eq!(size_of::<IpcacheValue>(), 8);
        assert_eq!(size_of::<DenyKey>(), 12);
        assert_eq!(size_of::<DenyEntry>(), 40);
        assert_eq!(size_of::<EndpointValue>(), 16);
        assert_eq!(size_of::<PolicyKey>(), 16);
        assert_eq!(size_of::<PolicyValue>(), 8);
        assert_eq!(size_of::<PolicyCtValue>(), 24);
        assert_eq!(size_of::<FlowEvent>(), 48);
    }
}
