//! NetworkPolicy benchmark (not a test). On the netns topology of the
//! dataplane tests (a node with a client pod and a server pod, skep's pod
//! hooks attached everywhere), in one run and on the same pod pair (each
//! mode programmed from empty in turn), compares
//!
//! * skep's eBPF policy with no policy and with 1, 100 and 1,000 policies
//!   over 1,000 identities, the server ingress-isolated and the probed
//!   client allowed by the last rule,
//! * the same allow rules as iptables-based engines write them (FORWARD:
//!   conntrack ESTABLISHED,RELATED accept first, then a per-pod chain for
//!   the server with one ACCEPT rule per policy, DROP at its end), with
//!   one ipset per policy holding its peers, as kube-router, Calico and
//!   Weave match pod selectors (the headline peer), and as flat rule lists
//!   (`-s IP/32`, the cheapest form iptables allows; no policy at all is
//!   only ~1.4× of it on this path, which the report prints); loaded
//!   with iptables-restore, skep's policy maps empty,
//!
//! for new connections (connect + request + close, one client thread
//! against a lean echo server, so the datapath is a visible share of the
//! cost) and request/response on one connection; the time to program
//! 1,000 policies (skep: `KernelPolicy::apply` from empty maps; iptables:
//! iptables-restore, plus ipset restore); and the rate at which denied UDP
//! from an external host is dropped at XDP (`xdp_policy` on the node's
//! external interface) vs an iptables `raw PREROUTING … DROP` rule with
//! XDP detached. Both drop measurements use the same generator, one thread
//! per CPU and one link queue per CPU: frames injected by the kernel
//! (BPF_PROG_TEST_RUN live frames, as xdp-trafficgen does; this kernel has
//! no pktgen), reported as the headline, and raw frames from AF_PACKET
//! sockets with sendmmsg, reported beside it (those arrive as skbs, which
//! XDP on a veth must copy first, so they show no XDP advantage). The drop
//! rate counts the packets the dropping hook saw (counter deltas).
//!
//! Run as root: `cargo run --release -p skep-dataplane --example
//! policy_bench` (SKEP_EBPF_OBJECT as for the tests), or `cargo xtask bench
//! policy`. Prints a table and writes target/bench/policy.json.
//! `POLICY_BENCH_SECS` sets the seconds per rate measurement (default
//! 0.75), `POLICY_BENCH_ROUNDS` the interleaved rounds of the rates
//! (default 15: the rate of one mode drifts by up to ±20 % over seconds on
//! this 2-CPU machine, so many short rounds, each comparing neighbours in
//! time, pin a ratio down better than a few long ones),
//! `POLICY_BENCH_DROP_ROUNDS` those of the drop rates (default 7);
//! `POLICY_BENCH_RATES_ONLY=1` stops after the rates, writing no report.
//! Rates are medians over rounds, ratios medians of the ratios within
//! each round.
//! Traffic stays inside the namespaces it creates.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "common/echo.rs"]
mod echo;
#[path = "../tests/harness/mod.rs"]
mod harness;

use echo::{EchoServer, Rates, measure};
use harness::Topology;
use skep_dataplane::{
    NetNs,
    lb::{Datapath, KernelDatapath, LbSettings},
    policy::{
        self, Cidr, EndpointEntry, ID_POD_FIRST, ID_WORLD, IpcacheEntry, KernelPolicy,
        PolicyDatapath, PolicyDirection, PolicyRule, PolicyState, PortMatch,
    },
};
use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Identities besides the two pods' (each a /32 in a spare range).
const IDENTITIES: usize = 1000;
const SERVER_PORT: u16 = 8080;
/// The denied UDP port of the drop test (also dropped by the raw rule).
const DENIED_PORT: u16 = 9999;
/// A port denied only by policy: iptables drops it where a policy engine
/// does, at the end of the pod chain.
const DENIED_PORT_ENGINE: u16 = 9998;
/// The external host (see `add_external`).
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
/// Upper bound of frames one drop measurement sends.
const DROP_MAX_PACKETS: u64 = 200_000_000;
const PROGRAM_REPEATS: usize = 5;
const CLIENT_ENDPOINT: u32 = 1;
const SERVER_ENDPOINT: u32 = 2;
const CLIENT_ID: u32 = ID_POD_FIRST;
const SERVER_ID: u32 = ID_POD_FIRST + 1;

fn spare_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 42, 128, 0)) + i as u32)
}

fn spare_id(i: usize) -> u32 {
    ID_POD_FIRST + 2 + i as u32
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------
// Policy state and its iptables equivalent

/// The agent's state with `policies` allow rules on the server (None: no
/// policy selects it): the ipcache knows both pods and 1,000 other
/// identities; rules 1..n-1 allow spare identities, rule n the client.
fn policy_state(topo: &Topology, policies: Option<usize>) -> PolicyState {
    let (client, server) = (topo.pods[0].ip, topo.pods[1].ip);
    let mut s = PolicyState::default();
    let entry = |identity| IpcacheEntry {
        identity,
        cidr_identity: ID_WORLD,
    };
    s.ipcache.insert(Cidr::host(client), entry(CLIENT_ID));
    s.ipcache.insert(Cidr::host(server), entry(SERVER_ID));
    for i in 0..IDENTITIES {
        s.ipcache
            .insert(Cidr::host(spare_ip(i)), entry(spare_id(i)));
    }
    s.endpoints.insert(
        client,
        EndpointEntry {
            endpoint: CLIENT_ENDPOINT,
            identity: CLIENT_ID,
            ingress_isolated: false,
            egress_isolated: false,
        },
    );
    s.endpoints.insert(
        server,
        EndpointEntry {
            endpoint: SERVER_ENDPOINT,
            identity: SERVER_ID,
            ingress_isolated: policies.is_some(),
            egress_isolated: false,
        },
    );
    let n = policies.unwrap_or(0);
    for p in 0..n {
        let identity = if p + 1 == n { CLIENT_ID } else { spare_id(p) };
        s.rules.insert(
            PolicyRule {
                endpoint: SERVER_ENDPOINT,
                direction: PolicyDirection::Ingress,
                identity,
                ports: PortMatch::Range {
                    proto: 6,
                    first: SERVER_PORT,
                    last: SERVER_PORT,
                },
            },
            p as u32 + 1,
        );
    }
    s
}

/// The peer address allowed by policy `p` of `n` (the client is last).
fn peer_of(topo: &Topology, p: usize, n: usize) -> Ipv4Addr {
    if p + 1 == n {
        topo.pods[0].ip
    } else {
        spare_ip(p)
    }
}

const POD_CHAIN: &str = "KUBE-POD-FW-BENCHSERVER";

/// The filter table an iptables-based engine writes for `n` policies on
/// the server: rule lists, or (with `ipset`) one set per policy.
fn iptables_rules(topo: &Topology, n: usize, ipset: bool) -> String {
    let server = topo.pods[1].ip;
    let mut r = format!(":{POD_CHAIN} - [0:0]\n");
    r.push_str(
        "-A FORWARD -m comment --comment \"network policy: established\" \
         -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );
    r.push_str(&format!(
        "-A FORWARD -d {server}/32 -m comment --comment \"pod firewall bench/server\" -j {POD_CHAIN}\n"
    ));
    for p in 0..n {
        let from = if ipset {
            format!("-m set --match-set {} src", set_name(p))
        } else {
            format!("-s {}/32", peer_of(topo, p, n))
        };
        r.push_str(&format!(
            "-A {POD_CHAIN} {from} -p tcp -m tcp --dport {SERVER_PORT} \
             -m comment --comment \"bench/policy-{p}\" -j ACCEPT\n"
        ));
    }
    r.push_str(&format!(
        "-A {POD_CHAIN} -m comment --comment \"default deny\" -j DROP\n"
    ));
    format!("*filter\n{r}COMMIT\n")
}

fn set_name(p: usize) -> String {
    format!("KUBE-SRC-BENCH{p:06}")
}

/// `ipset restore` input: one hash:ip set per policy with its peer.
fn ipset_sets(topo: &Topology, n: usize) -> String {
    let mut s = String::new();
    for p in 0..n {
        let name = set_name(p);
        s.push_str(&format!(
            "create {name} hash:ip family inet hashsize 64 maxelem 65536\nadd {name} {}\n",
            peer_of(topo, p, n)
        ));
    }
    s
}

fn in_node(topo: &Topology, cmd: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", topo.node.name(), cmd]).args(args);
    c
}

/// Runs a restore tool in the node namespace with `input`; its duration.
fn restore(topo: &Topology, tool: &str, args: &[&str], input: &str) -> Duration {
    let start = Instant::now();
    let mut child = in_node(topo, tool, args)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool} ({e}); `cargo xtask setup` installs it"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{tool} {args:?} failed");
    start.elapsed()
}

fn run_in_node(topo: &Topology, cmd: &str, args: &[&str]) -> String {
    let out = in_node(topo, cmd, args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Programs `n` policies the iptables way; the time it took.
fn program_iptables(topo: &Topology, n: usize, ipset: bool) -> Duration {
    let mut t = Duration::ZERO;
    if ipset {
        t += restore(topo, "ipset", &["restore"], &ipset_sets(topo, n));
    }
    t + restore(
        topo,
        "iptables-restore",
        &[],
        &iptables_rules(topo, n, ipset),
    )
}

/// Empties the filter table (and the ipsets) of the node.
fn clear_iptables(topo: &Topology, ipset: bool) {
    restore(topo, "iptables-restore", &[], "*filter\nCOMMIT\n");
    if ipset {
        run_in_node(topo, "ipset", &["destroy"]);
    }
}

/// Packets counted by the first rule of `chain` whose line contains
/// `needle` (`iptables -L -v -x`).
fn rule_packets(topo: &Topology, table: &str, chain: &str, needle: &str) -> u64 {
    let out = run_in_node(
        topo,
        "iptables",
        &["-t", table, "-L", chain, "-n", "-v", "-x"],
    );
    out.lines()
        .find(|l| l.contains(needle))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rule with {needle:?} in {table}/{chain}:\n{out}"))
}

fn ipset_available() -> bool {
    Command::new("ipset")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

// ---------------------------------------------------------------------
// Connection and request/response rates

/// What enforces policy during a measurement.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Engine {
    /// skep's pod hooks with empty policy maps (no endpoint known).
    PolicyOff,
    Skep,
    /// Rule lists (`-s IP/32`).
    Iptables,
    /// One ipset per policy.
    Ipset,
}

/// One measured configuration of the pod pair. For skep, `policies: None`
/// is "no policy selects the server" (endpoints known, nothing isolated).
#[derive(Clone, Copy, Debug)]
struct Mode {
    engine: Engine,
    policies: Option<usize>,
}

impl Mode {
    fn name(&self) -> String {
        let n = self.policies.unwrap_or(0);
        match (self.engine, self.policies) {
            (Engine::PolicyOff, _) => "skep, policy off".into(),
            (Engine::Skep, None) => "skep, no policy".into(),
            (Engine::Skep, Some(n)) => format!("skep, {n} pol"),
            (Engine::Iptables, _) => format!("iptables, {n} pol"),
            (Engine::Ipset, _) => format!("iptables+ipset, {n} pol"),
        }
    }
}

/// The one pod pair every mode is measured on, so that a ratio compares
/// policy engines and nothing else. With a topology per mode, in one run
/// "skep, no policy" measured 9,461 connections/s and "skep, 1000 pol",
/// which does strictly more per connection, 10,722: the topologies
/// differed by more than the cost being measured. Fields drop in order:
/// server, policy and datapath before the namespaces.
struct Bed {
    _server: EchoServer,
    policy: KernelPolicy,
    dp: KernelDatapath,
    topo: Topology,
    /// Whether ipsets may exist in the node (they go after the rules).
    ipsets: bool,
}

fn settings(topo: &Topology) -> LbSettings {
    LbSettings {
        ipcache_entries: 4096,
        endpoint_entries: 64,
        policy_entries: 8192,
        policy_ct_entries: 65_536,
        ct_entries: 65_536,
        ..topo.settings()
    }
}

/// A topology with the datapath attached, the server listening and the
/// client allowed to reuse ports quickly (many short connections).
fn topology(tag: &str) -> (Topology, KernelDatapath, EchoServer) {
    let topo = Topology::new(tag, 2);
    let dp = topo.datapath_with(settings(&topo));
    let server = EchoServer::start(&topo.pods[1], SERVER_PORT);
    topo.pods[0]
        .ns
        .run(|| {
            std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1").unwrap();
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "10000 65000").unwrap();
        })
        .unwrap();
    (topo, dp, server)
}

impl Bed {
    /// Pins the echo server to the second CPU and the calling thread (and
    /// so the client threads it starts) to the first until
    /// [`unpin_cpu`], so that every measurement has the same placement
    /// (left to the scheduler, client and server may share a CPU in one
    /// measurement and not in the next).
    fn new() -> Self {
        pin_to_cpu(1);
        let (topo, dp, server) = topology("pair");
        pin_to_cpu(0);
        let policy = KernelPolicy::open(&topo.pins.0).expect("open the policy maps");
        Bed {
            _server: server,
            policy,
            dp,
            topo,
            ipsets: false,
        }
    }

    /// Empties skep's policy maps and the node's filter table (and its
    /// ipsets), then programs `mode`; the programming time (from empty).
    /// The filter table, empty, so exists in every mode, as on a node.
    fn switch(&mut self, mode: Mode) -> Option<Duration> {
        self.policy
            .apply(&PolicyState::default())
            .expect("empty the policy maps");
        clear_iptables(&self.topo, self.ipsets);
        self.ipsets = false;
        match mode.engine {
            Engine::PolicyOff => None,
            Engine::Skep => {
                let state = policy_state(&self.topo, mode.policies);
                let t = Instant::now();
                self.policy.apply(&state).expect("apply the policy state");
                Some(t.elapsed())
            }
            Engine::Iptables | Engine::Ipset => {
                let ipset = mode.engine == Engine::Ipset;
                self.ipsets = ipset;
                let n = mode.policies.expect("iptables modes have policies");
                Some(program_iptables(&self.topo, n, ipset))
            }
        }
    }

    /// After a mode's first measurement: its rules were really used.
    fn verify(&self, mode: Mode, allowed_before: u64) {
        match (mode.engine, mode.policies) {
            (Engine::Skep, Some(_)) => {
                let allowed = self.dp.counters().unwrap().get("policy_allowed");
                assert!(
                    allowed > allowed_before,
                    "{}: skep's policy admitted nothing (is enforcement on?)",
                    mode.name()
                );
                assert!(self.policy.enforcing().unwrap());
            }
            (Engine::Iptables | Engine::Ipset, Some(n)) => {
                // The client's rule is the last one, commented with its number.
                let needle = format!("bench/policy-{} */", n - 1);
                let hits = rule_packets(&self.topo, "filter", POD_CHAIN, &needle);
                assert!(hits > 0, "{}: the client's rule never matched", mode.name());
            }
            _ => {}
        }
    }

    fn allowed(&self) -> u64 {
        self.dp.counters().unwrap().get("policy_allowed")
    }
}

// ---------------------------------------------------------------------
// Programming time, from empty maps/tables

struct ProgramTimes {
    skep: Vec<f64>,
    iptables: Vec<f64>,
    ipset: Vec<f64>,
}

fn program_times(ipset: bool) -> ProgramTimes {
    let topo = Topology::new("prog", 2);
    let _dp = topo.datapath_with(settings(&topo));
    let mut kp = KernelPolicy::open(&topo.pins.0).unwrap();
    let full = policy_state(&topo, Some(1000));
    let mut out = ProgramTimes {
        skep: Vec::new(),
        iptables: Vec::new(),
        ipset: Vec::new(),
    };
    for _ in 0..PROGRAM_REPEATS {
        kp.apply(&PolicyState::default()).unwrap();
        let t = Instant::now();
        let stats = kp.apply(&full).unwrap();
        out.skep.push(t.elapsed().as_secs_f64());
        assert!(stats.rule_keys_written >= 1000 && stats.ipcache_written >= IDENTITIES);
        out.iptables
            .push(program_iptables(&topo, 1000, false).as_secs_f64());
        clear_iptables(&topo, false);
        if ipset {
            out.ipset
                .push(program_iptables(&topo, 1000, true).as_secs_f64());
            clear_iptables(&topo, true);
        }
    }
    out
}

// ---------------------------------------------------------------------
// Drop rate of denied traffic from outside

/// The MAC address of `dev` in namespace `ns`.
fn mac_of(ns: &str, dev: &str) -> [u8; 6] {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "dev", dev])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC for {dev} in {ns}: {text}"));
    let mut b = [0u8; 6];
    for (i, part) in mac.split(':').enumerate().take(6) {
        b[i] = u8::from_str_radix(part, 16).unwrap();
    }
    b
}

fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A 60-byte Ethernet/IPv4/UDP frame from the external host to `dst`.
fn frame(src_mac: [u8; 6], dst_mac: [u8; 6], dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let payload = [0u8; 18];
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&EXTERNAL_IP.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let csum = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&payload);
    f
}

/// An AF_PACKET socket on `dev` of the calling thread's namespace that
/// hands frames straight to the driver (no qdisc).
fn packet_socket(dev: &str) -> OwnedFd {
    let ifindex = nix::net::if_::if_nametoindex(dev).unwrap();
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        r,
        0,
        "PACKET_QDISC_BYPASS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: bind with a pointer to a live sockaddr_ll of the right size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
    fd
}

/// Frames injected by the kernel itself, the way xdp-trafficgen does it
/// (this kernel has no pktgen): a two-instruction XDP program returning
/// XDP_TX, run by BPF_PROG_TEST_RUN in live-frames mode (Linux ≥ 5.18)
/// with the external host's veth as ingress device, transmits each frame
/// out of that veth; the node's end receives it as an XDP frame, as from
/// a NIC's ring: with XDP attached the program sees it before any skb,
/// without it the stack builds an skb and iptables sees it.
mod live {
    use std::{
        io,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
    };

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_XDP: u32 = 37;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    pub const XDP_DROP: i32 = 1;
    pub const XDP_TX: i32 = 3;

    /// The `prog_load` part of union bpf_attr this needs.
    #[repr(C)]
    struct ProgLoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }

    /// The `test` part of union bpf_attr.
    #[repr(C)]
    struct TestRunAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }

    /// struct xdp_md.
    #[repr(C)]
    struct XdpMd {
        data: u32,
        data_end: u32,
        data_meta: u32,
        ingress_ifindex: u32,
        rx_queue_index: u32,
        egress_ifindex: u32,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a #[repr(C)] prefix of union bpf_attr for
        // `cmd`; it and what it points to live across the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T,
                std::mem::size_of::<T>() as libc::c_uint,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// `r0 = verdict; exit`: XDP_TX for the injector, XDP_DROP for the
    /// floor (the cheapest possible drop at the receiving end).
    pub fn verdict_program(verdict: i32, name: &str) -> io::Result<OwnedFd> {
        let mov_r0 = 0xb7u64 | (u64::from(verdict as u32) << 32);
        let exit = 0x95u64;
        let insns = [mov_r0, exit];
        let license = b"GPL\0";
        let mut prog_name = [0u8; 16];
        for (d, s) in prog_name.iter_mut().take(15).zip(name.bytes()) {
            *d = s;
        }
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name,
            prog_ifindex: 0,
            expected_attach_type: 0,
        };
        let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
        let fd = i32::try_from(fd).map_err(|_| io::Error::other("bad fd"))?;
        // SAFETY: a fresh fd from the kernel, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Attaches `prog` natively to `ifindex` (calling thread's namespace)
    /// until the returned link is dropped.
    pub fn attach_native(prog: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
        #[repr(C)]
        struct LinkCreateAttr {
            prog_fd: u32,
            target_ifindex: u32,
            attach_type: u32,
            flags: u32,
            _rest: [u64; 2],
        }
        let mut attr = LinkCreateAttr {
            prog_fd: prog.as_raw_fd() as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags: XDP_FLAGS_DRV_MODE,
            _rest: [0; 2],
        };
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        let fd = i32::try_from(fd).map_err(|_| io::Error::other("bad fd"))?;
        // SAFETY: a fresh fd from the kernel, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Transmits `frame` `repeat` times out of `ifindex` (of the calling
    /// thread's namespace).
    pub fn inject(prog: &OwnedFd, frame: &[u8], ifindex: u32, repeat: u32) -> io::Result<()> {
        test_run(prog, frame, ifindex, repeat, BPF_F_TEST_XDP_LIVE_FRAMES).map(drop)
    }

    /// Runs `prog` on `frame` `repeat` times without sending anything;
    /// the kernel's average time per run in ns and the last verdict.
    pub fn time(prog: &OwnedFd, frame: &[u8], repeat: u32) -> io::Result<(u32, u32)> {
        test_run(prog, frame, 0, repeat, 0)
    }

    fn test_run(
        prog: &OwnedFd,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
        flags: u32,
    ) -> io::Result<(u32, u32)> {
        let mut ctx = XdpMd {
            data: 0,
            data_end: frame.len() as u32,
            data_meta: 0,
            ingress_ifindex: ifindex,
            rx_queue_index: 0,
            egress_ifindex: 0,
        };
        let mut attr = TestRunAttr {
            prog_fd: prog.as_raw_fd() as u32,
            retval: 0,
            data_size_in: frame.len() as u32,
            data_size_out: 0,
            data_in: frame.as_ptr() as u64,
            data_out: 0,
            repeat,
            duration: 0,
            ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
            ctx_size_out: 0,
            ctx_in: &mut ctx as *mut XdpMd as u64,
            ctx_out: 0,
            flags,
            cpu: 0,
            batch_size: 0,
            _pad: 0,
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        Ok((attr.duration, attr.retval))
    }

    /// Opens a pinned program.
    pub fn obj_get(path: &std::path::Path) -> io::Result<OwnedFd> {
        #[repr(C)]
        struct ObjAttr {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
        }
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::other("NUL in path"))?;
        let mut attr = ObjAttr {
            pathname: c.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
        };
        let fd = bpf(BPF_OBJ_GET, &mut attr)?;
        let fd = i32::try_from(fd).map_err(|_| io::Error::other("bad fd"))?;
        // SAFETY: a fresh fd from the kernel, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Turns GRO on for `dev` (calling thread's namespace): a veth then
/// receives through NAPI like a NIC, which XDP frames sent to it need
/// when it runs no XDP program itself.
fn enable_gro(dev: &str) {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_SGRO: u32 = 0x2c;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_SGRO,
        data: 1,
    };
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: plain socket(2); closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(sock >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: the ioctl reads `ifr` and the ethtool_value it points to,
    // both alive for the call.
    let r = unsafe { libc::ioctl(sock, SIOCETHTOOL as _, &mut ifr) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the socket made above.
    unsafe { libc::close(sock) };
    assert_eq!(r, 0, "enable GRO on {dev}: {err}");
}

/// Pins the calling thread to CPU `cpu` (modulo the CPU count), so that
/// sender threads spread over the CPUs and their receive queues.
/// The CPUs online (not the calling thread's share of them, which is
/// what `available_parallelism` answers once a thread is pinned).
fn online_cpus() -> usize {
    // SAFETY: sysconf only reads a system value.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(1)
}

/// Lets the calling thread run on every CPU again.
fn unpin_cpu() {
    let n = online_cpus();
    // SAFETY: as in `pin_to_cpu`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in 0..n {
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: as in `pin_to_cpu`.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(
        r,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
}

fn pin_to_cpu(cpu: usize) {
    let n = online_cpus();
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu % n, &mut set) };
    // SAFETY: sched_setaffinity reads the set, alive for the call; pid 0
    // is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(
        r,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
}

/// Sends `frame` with sendmmsg until `secs` or `max` frames; frames sent.
fn flood(sock: &OwnedFd, frame: &[u8], secs: f64, max: u64) -> u64 {
    const BATCH: usize = 256;
    let mut iov = libc::iovec {
        iov_base: frame.as_ptr() as *mut libc::c_void,
        iov_len: frame.len(),
    };
    // SAFETY: mmsghdr is plain data; zeroed is valid.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < max && start.elapsed().as_secs_f64() < secs {
        // SAFETY: every header points at `iov`, which points at `frame`;
        // both outlive the call; the kernel only reads them.
        let r = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                0,
            )
        };
        if r > 0 {
            sent += r as u64;
        } else {
            // ENOBUFS when the device is busy: try again.
            std::thread::yield_now();
        }
    }
    sent
}

/// Injects `frame` out of `dev` until `secs` or `max` frames; frames
/// offered (the receiving ring may refuse some when full).
fn inject_flood(prog: &OwnedFd, frame: &[u8], dev: &str, secs: f64, max: u64) -> u64 {
    const CHUNK: u32 = 65_536;
    let ifindex = nix::net::if_::if_nametoindex(dev).unwrap();
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < max && start.elapsed().as_secs_f64() < secs {
        live::inject(prog, frame, ifindex, CHUNK).expect("BPF_PROG_TEST_RUN live frames");
        sent += u64::from(CHUNK);
    }
    sent
}

/// Which traffic generator a drop measurement used.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Sender {
    /// Kernel-injected XDP frames (see [`live`]).
    LiveFrames,
    /// Raw frames from AF_PACKET sockets with sendmmsg (skbs from the
    /// start, so XDP on a veth must first copy them into an XDP buffer).
    AfPacket,
}

struct DropRun {
    dropped: u64,
    sent: u64,
    secs: f64,
}

impl DropRun {
    fn pps(&self) -> f64 {
        self.dropped as f64 / self.secs
    }

    fn offered(&self) -> f64 {
        self.sent as f64 / self.secs
    }
}

/// Runs `send(thread)` on `threads` threads; `dropped` reads the hook's
/// counter before and after.
fn drop_run(
    threads: usize,
    send: &(dyn Fn(usize) -> u64 + Sync),
    dropped: impl Fn() -> u64,
) -> DropRun {
    let before = dropped();
    let start = Instant::now();
    let sent: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|i| s.spawn(move || send(i))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let elapsed = start.elapsed().as_secs_f64();
    // Let the last queued frames reach the hook.
    std::thread::sleep(Duration::from_millis(100));
    DropRun {
        dropped: dropped() - before,
        sent,
        secs: elapsed,
    }
}

/// Per sender: the XDP runs and the iptables runs.
struct DropResults {
    runs: Vec<(Sender, Vec<DropRun>, Vec<DropRun>)>,
    /// Live frames into a one-instruction XDP_DROP program: the cost of
    /// generating and receiving a frame, with (next to) nothing to judge.
    floor: Vec<DropRun>,
    /// Live frames to a port only policy denies, dropped by the iptables
    /// engine's pod chain (conntrack, routing, 1,000 rules, DROP).
    engine: Vec<DropRun>,
    /// xdp_policy's own cost per denied packet (BPF_PROG_TEST_RUN), ns.
    xdp_prog_ns: u32,
    mode: policy::xdp::XdpMode,
    threads: usize,
}

/// An "external" host on its own link to the node, like the harness's
/// (node side `ext0` 192.168.50.1/24, host 192.168.50.2), but with one
/// queue per CPU on both ends, as a NIC has with RSS: each sender thread
/// then feeds its own receive queue, processed on its own CPU.
fn add_external(topo: &Topology, queues: usize) -> NetNs {
    let ns = NetNs::create(&format!("{}-x", topo.node.name().trim_end_matches("-n")))
        .expect("create external netns");
    let node = topo.node.name();
    let q = queues.to_string();
    harness::ip(&[
        "-n",
        node,
        "link",
        "add",
        "ext0",
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
        "netns",
        ns.name(),
    ]);
    harness::ip(&["-n", node, "addr", "add", "192.168.50.1/24", "dev", "ext0"]);
    harness::ip(&["-n", node, "link", "set", "ext0", "up"]);
    let ext = ns.name();
    harness::ip(&["-n", ext, "addr", "add", "192.168.50.2/24", "dev", "eth0"]);
    harness::ip(&["-n", ext, "link", "set", "eth0", "up"]);
    harness::ip(&["-n", ext, "route", "add", "default", "via", "192.168.50.1"]);
    ns
}

fn drop_test(rounds: usize, secs: f64) -> DropResults {
    let (topo, dp, _server) = topology("drop");
    let threads = online_cpus();
    let external = add_external(&topo, threads);
    let mut kp = KernelPolicy::open(&topo.pins.0).unwrap();
    kp.apply(&policy_state(&topo, Some(1000))).unwrap();
    let server = topo.pods[1].ip;
    let pins = topo.pins.0.clone();
    topo.node.run(|| enable_gro("ext0")).unwrap();
    // The same denial as iptables would write it, as early as it can.
    run_in_node(
        &topo,
        "iptables",
        &[
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-i",
            "ext0",
            "-d",
            &format!("{server}/32"),
            "-p",
            "udp",
            "-m",
            "udp",
            "--dport",
            &DENIED_PORT.to_string(),
            "-j",
            "DROP",
        ],
    );
    // And the 1,000 policies as an iptables engine writes them.
    program_iptables(&topo, 1000, false);
    let dst_mac = mac_of(topo.node.name(), "ext0");
    let src_mac = mac_of(external.name(), "eth0");
    let frames: Vec<Vec<u8>> = (0..threads)
        .map(|i| frame(src_mac, dst_mac, server, 40_000 + i as u16, DENIED_PORT))
        .collect();
    let sockets: Vec<OwnedFd> = (0..threads)
        .map(|_| external.run(|| packet_socket("eth0")).unwrap())
        .collect();
    let prog = live::verdict_program(live::XDP_TX, "bench_xmit")
        .expect("load the frame injector (BPF_PROG_LOAD)");
    let floor_prog = live::verdict_program(live::XDP_DROP, "bench_floor").unwrap();
    let per_thread = DROP_MAX_PACKETS / threads as u64;
    let live_send = |i: usize| {
        external
            .run(|| {
                pin_to_cpu(i);
                inject_flood(&prog, &frames[i], "eth0", secs, per_thread)
            })
            .unwrap()
    };
    let engine_frames: Vec<Vec<u8>> = (0..threads)
        .map(|i| {
            frame(
                src_mac,
                dst_mac,
                server,
                40_000 + i as u16,
                DENIED_PORT_ENGINE,
            )
        })
        .collect();
    let engine_send = |i: usize| {
        external
            .run(|| {
                pin_to_cpu(i);
                inject_flood(&prog, &engine_frames[i], "eth0", secs, per_thread)
            })
            .unwrap()
    };
    let packet_send = |i: usize| {
        pin_to_cpu(i);
        flood(&sockets[i], &frames[i], secs, per_thread)
    };
    let xdp_drops = || dp.counters().unwrap().get("xdp_policy_drop");
    let ipt_drops = || rule_packets(&topo, "raw", "PREROUTING", "udp dpt:9999");
    let engine_drops = || rule_packets(&topo, "filter", POD_CHAIN, "default deny");
    let mut out = DropResults {
        runs: vec![
            (Sender::LiveFrames, Vec::new(), Vec::new()),
            (Sender::AfPacket, Vec::new(), Vec::new()),
        ],
        floor: Vec::new(),
        engine: Vec::new(),
        mode: policy::xdp::XdpMode::Native,
        threads,
        xdp_prog_ns: 0,
    };
    {
        let xdp_prog =
            live::obj_get(&pins.join("progs").join("xdp_node")).expect("open the pinned xdp_node");
        let (ns, verdict) = live::time(&xdp_prog, &frames[0], 1_000_000).expect("time xdp_node");
        assert_eq!(
            verdict, 1,
            "xdp_node must drop the denied frame (XDP_DROP = 1)"
        );
        out.xdp_prog_ns = ns;
    }
    for round in 0..rounds {
        for (sender, xdp_runs, ipt_runs) in &mut out.runs {
            let send: &(dyn Fn(usize) -> u64 + Sync) = match sender {
                Sender::LiveFrames => &live_send,
                Sender::AfPacket => &packet_send,
            };
            out.mode = topo
                .node
                .run(|| policy::xdp::attach(&pins, "ext0"))
                .unwrap()
                .expect("attach the XDP early drop");
            let x = drop_run(threads, send, xdp_drops);
            assert!(
                x.dropped > 0,
                "{sender:?}: XDP dropped nothing (sent {})",
                x.sent
            );
            xdp_runs.push(x);
            let detached = topo
                .node
                .run(|| policy::xdp::detach(&pins, "ext0"))
                .unwrap()
                .unwrap();
            assert!(detached, "the XDP link pin was not found");
            let i = drop_run(threads, send, ipt_drops);
            assert!(
                i.dropped > 0,
                "{sender:?}: the iptables rule dropped nothing (sent {})",
                i.sent
            );
            ipt_runs.push(i);
        }
        let e = drop_run(threads, &engine_send, engine_drops);
        assert!(
            e.dropped > 0,
            "the pod chain dropped nothing (sent {})",
            e.sent
        );
        out.engine.push(e);
        let link = topo
            .node
            .run(|| {
                let ifindex = nix::net::if_::if_nametoindex("ext0").unwrap();
                live::attach_native(&floor_prog, ifindex)
            })
            .unwrap()
            .expect("attach the XDP_DROP floor program");
        // Every frame offered reaches the one-instruction program (the
        // ring never overflowed in the runs above: offered == dropped).
        let mut f = drop_run(threads, &live_send, || 0);
        f.dropped = f.sent;
        out.floor.push(f);
        drop(link);
        eprintln!("drop round {} of {rounds} done", round + 1);
    }
    drop(kp);
    out
}

// ---------------------------------------------------------------------
// Report

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn key(name: &str) -> String {
    name.replace([' ', ',', '+'], "_").replace("__", "_")
}

fn main() {
    harness::require_root();
    let secs: f64 = env_or("POLICY_BENCH_SECS", 0.75);
    let rounds: usize = env_or("POLICY_BENCH_ROUNDS", 15).max(1);
    let drop_rounds: usize = env_or("POLICY_BENCH_DROP_ROUNDS", 7).max(1);
    // The peer of the headline: iptables-based engines match pod
    // selectors through ipsets.
    assert!(
        ipset_available(),
        "ipset is not installed (`cargo xtask setup` installs it): the iptables peer needs it"
    );

    // All modes run on one pod pair, one after another; the pairs the
    // report compares sit next to each other, and rounds go forwards and
    // backwards in turn, so each pair is measured close in time with
    // neither side always first: load from elsewhere on the machine then
    // hits both sides of a pair alike.
    let mode = |engine, policies| Mode { engine, policies };
    let mut modes = vec![
        mode(Engine::Iptables, Some(1000)),
        mode(Engine::Skep, None),
        mode(Engine::Skep, Some(1000)),
        mode(Engine::Ipset, Some(1000)),
        mode(Engine::PolicyOff, None),
    ];
    for n in [1usize, 100] {
        modes.push(mode(Engine::Skep, Some(n)));
        modes.push(mode(Engine::Iptables, Some(n)));
        modes.push(mode(Engine::Ipset, Some(n)));
    }
    let names: Vec<String> = modes.iter().map(Mode::name).collect();

    let mut bed = Bed::new();
    let target = SocketAddrV4::new(bed.topo.pods[1].ip, SERVER_PORT);
    let mut samples: Vec<Vec<Rates>> = modes.iter().map(|_| Vec::new()).collect();
    let mut programs: Vec<Vec<f64>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..modes.len()).collect()
        } else {
            (0..modes.len()).rev().collect()
        };
        for i in order {
            if let Some(t) = bed.switch(modes[i]) {
                programs[i].push(t.as_secs_f64());
            }
            let allowed_before = bed.allowed();
            samples[i].push(measure(&bed.topo, target, secs));
            if round == 0 {
                bed.verify(modes[i], allowed_before);
            }
        }
        eprintln!(
            "round {} of {rounds} done; conn/s: {}",
            round + 1,
            names
                .iter()
                .zip(&samples)
                .map(|(n, m)| format!("{n} {:.0}", m[round].conn_rate))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // Median over rounds of the ratio within each round.
    let index = |name: &str| names.iter().position(|s| s == name).unwrap();
    let paired = |a: &str, b: &str, f: fn(&Rates) -> f64| {
        let (a, b) = (index(a), index(b));
        median(
            samples[a]
                .iter()
                .zip(&samples[b])
                .map(|(x, y)| f(x) / f(y))
                .collect(),
        )
    };
    let conn = |r: &Rates| r.conn_rate;
    let rr = |r: &Rates| r.rr_rate;
    let conn_vs_none = paired("skep, 1000 pol", "skep, no policy", conn);
    let rr_vs_none = paired("skep, 1000 pol", "skep, no policy", rr);
    let conn_vs_off = paired("skep, 1000 pol", "skep, policy off", conn);
    let conn_vs_ipt = paired("skep, 1000 pol", "iptables, 1000 pol", conn);
    let rr_vs_ipt = paired("skep, 1000 pol", "iptables, 1000 pol", rr);
    let conn_vs_ipset = paired("skep, 1000 pol", "iptables+ipset, 1000 pol", conn);
    let rr_vs_ipset = paired("skep, 1000 pol", "iptables+ipset, 1000 pol", rr);
    // The most a policy engine could reach against the iptables rule
    // lists: no policy at all, against them.
    let ceiling_vs_ipt = paired("skep, no policy", "iptables, 1000 pol", conn);
    let rows: Vec<(String, Rates, Option<f64>)> = names
        .iter()
        .zip(&samples)
        .zip(&programs)
        .map(|((name, m), p)| {
            let pick = |f: fn(&Rates) -> f64| median(m.iter().map(f).collect());
            let r = Rates {
                conn_rate: pick(|r| r.conn_rate),
                rr_rate: pick(|r| r.rr_rate),
                p50_us: pick(|r| r.p50_us),
                p99_us: pick(|r| r.p99_us),
            };
            (name.clone(), r, (!p.is_empty()).then(|| median(p.clone())))
        })
        .collect();
    // The pair goes before the next phase (fewer threads, less noise).
    drop(bed);
    unpin_cpu();
    if env_or("POLICY_BENCH_RATES_ONLY", 0u8) == 1 {
        // A shortcut while working on the rate measurement: no report.
        for (mode, r, _) in &rows {
            println!("{mode:<24} {:>10.0} {:>10.0}", r.conn_rate, r.rr_rate);
        }
        println!(
            "conn 1000 pol / none {conn_vs_none:.3}, / off {conn_vs_off:.3}, / iptables \
             {conn_vs_ipt:.3}, no policy / iptables {ceiling_vs_ipt:.3}"
        );
        return;
    }

    let prog = program_times(true);
    let drop_secs = 2.25;
    let drops = drop_test(drop_rounds, drop_secs);

    println!(
        "\nmedians of {rounds} rounds × {secs} s\n{:<24} {:>10} {:>10} {:>9} {:>9} {:>11}",
        "mode", "conn/s", "req/s", "p50 µs", "p99 µs", "program"
    );
    // Table order: by engine, then by number of policies.
    let mut rows = rows;
    rows.sort_by_key(|(name, _, _)| {
        let engine = [
            "skep, policy off",
            "skep, no",
            "skep",
            "iptables,",
            "iptables+ipset",
        ]
        .iter()
        .position(|e| name.starts_with(e))
        .unwrap_or(9);
        let n: usize = name
            .split(", ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        (engine, n)
    });
    for (mode, r, p) in &rows {
        let p = p.map(|d| format!("{d:.4} s")).unwrap_or_default();
        println!(
            "{mode:<24} {:>10.0} {:>10.0} {:>9.1} {:>9.1} {p:>11}",
            r.conn_rate, r.rr_rate, r.p50_us, r.p99_us
        );
    }
    let prog_skep = median(prog.skep.clone());
    let prog_ipt = median(prog.iptables.clone());
    let prog_ipset = (!prog.ipset.is_empty()).then(|| median(prog.ipset.clone()));
    // Per sender: XDP pps, iptables pps, XDP offered/s, iptables
    // offered/s (medians) and the median of the per-round XDP/iptables
    // ratios.
    let drop_figures: Vec<(Sender, [f64; 5])> = drops
        .runs
        .iter()
        .map(|(sender, x, i)| {
            let m = |v: &[DropRun], f: fn(&DropRun) -> f64| median(v.iter().map(f).collect());
            let paired = median(x.iter().zip(i).map(|(x, i)| x.pps() / i.pps()).collect());
            (
                *sender,
                [
                    m(x, DropRun::pps),
                    m(i, DropRun::pps),
                    m(x, DropRun::offered),
                    m(i, DropRun::offered),
                    paired,
                ],
            )
        })
        .collect();
    // The headline uses the generator with the highest rate (the kernel's
    // frame injection); the AF_PACKET figures are reported beside it.
    let [xdp_pps, ipt_pps, _, _, drop_ratio] = drop_figures
        .iter()
        .find(|(s, _)| *s == Sender::LiveFrames)
        .unwrap()
        .1;
    // Derived: the CPUs are busy all along (the senders spin), so CPU time
    // per frame is CPUs / rate; minus the floor's, what is left is the
    // cost of the dropping hook itself (and the path to it).
    let floor_pps = median(drops.floor.iter().map(DropRun::pps).collect());
    let cpu_ns = |pps: f64| drops.threads as f64 * 1e9 / pps;
    let (live_x, live_i) = drops
        .runs
        .iter()
        .find(|(s, _, _)| *s == Sender::LiveFrames)
        .map(|(_, x, i)| (x, i))
        .unwrap();
    let hook = |runs: &[DropRun]| {
        median(
            runs.iter()
                .zip(&drops.floor)
                .map(|(r, f)| cpu_ns(r.pps()) - cpu_ns(f.pps()))
                .collect(),
        )
    };
    let (hook_xdp_ns, hook_ipt_ns) = (hook(live_x), hook(live_i));
    let engine_pps = median(drops.engine.iter().map(DropRun::pps).collect());
    let engine_ratio = median(
        live_x
            .iter()
            .zip(&drops.engine)
            .map(|(x, e)| x.pps() / e.pps())
            .collect(),
    );

    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "\nprogramming 1,000 policies from empty (median of {PROGRAM_REPEATS}): skep {prog_skep:.4} s, \
         iptables-restore {prog_ipt:.4} s{}",
        prog_ipset
            .map(|t| format!(", ipset+iptables-restore {t:.4} s"))
            .unwrap_or_default()
    );
    println!(
        "drop of denied UDP from outside, {} sender threads, XDP in {:?} mode (median of {drop_rounds} × {:.1} s):",
        drops.threads, drops.mode, drop_secs
    );
    println!(
        "  xdp_policy's own cost per denied packet (BPF_PROG_TEST_RUN): {} ns",
        drops.xdp_prog_ns
    );
    for (sender, [x, i, xo, io, ratio]) in &drop_figures {
        println!(
            "  {:<12} XDP {x:>10.0} pps (offered {xo:>10.0}/s)   iptables raw DROP {i:>10.0} pps \
             (offered {io:>10.0}/s)   {ratio:.2}×",
            format!("{sender:?}"),
        );
    }
    println!(
        "  LiveFrames   iptables policy engine (FORWARD → pod chain of 1,000 rules → DROP): \
         {engine_pps:.0} pps; XDP {engine_ratio:.2}× that"
    );
    println!(
        "  floor (LiveFrames into a one-instruction XDP_DROP): {floor_pps:.0} pps; CPU per frame \
         beyond it (derived): XDP {hook_xdp_ns:.0} ns, iptables {hook_ipt_ns:.0} ns ({:.2}×)",
        hook_ipt_ns / hook_xdp_ns
    );
    println!(
        "\nconn rate at 1,000 policies vs no policy: {conn_vs_none:.3}× (target ≥ 0.95: {})",
        verdict(conn_vs_none >= 0.95)
    );
    println!(
        "  (vs policy off: {conn_vs_off:.3}×; request/response vs no policy: {rr_vs_none:.3}×)"
    );
    println!(
        "conn rate at 1,000 policies vs iptables as policy engines write it (pod chain, an ipset \
         per policy's peers): {conn_vs_ipset:.2}× (target ≥ 2: {}); request/response {rr_vs_ipset:.2}×",
        verdict(conn_vs_ipset >= 2.0),
    );
    println!(
        "  vs flat rule lists (-s IP/32 per policy): {conn_vs_ipt:.2}×, request/response \
         {rr_vs_ipt:.2}×; no policy at all vs those: {ceiling_vs_ipt:.2}×, the most any policy \
         engine could reach against them on this path"
    );
    println!(
        "programming 1,000 policies: {prog_skep:.4} s (target ≤ 1 s: {})",
        verdict(prog_skep <= 1.0)
    );
    println!(
        "XDP drop rate vs iptables: {drop_ratio:.2}× (target ≥ 3: {})",
        verdict(drop_ratio >= 3.0)
    );

    let mut json = vec![
        format!("\"conn_rate_ratio_1000_policies_vs_none\": {conn_vs_none:.4}"),
        format!("\"conn_rate_ratio_vs_iptables_1000\": {conn_vs_ipset:.4}"),
        "\"iptables_peer\": \"per-pod chain, one ipset per policy (how iptables-based engines match pod selectors); the flat rule-list form is conn_rate_ratio_vs_iptables_rule_lists_1000\"".to_owned(),
        format!("\"conn_rate_ratio_vs_iptables_rule_lists_1000\": {conn_vs_ipt:.4}"),
        format!("\"program_1000_policies_s\": {prog_skep:.6}"),
        format!("\"xdp_drop_pps_ratio_vs_iptables\": {drop_ratio:.4}"),
        format!("\"conn_rate_ratio_1000_policies_vs_policy_off\": {conn_vs_off:.4}"),
        format!("\"rr_ratio_1000_policies_vs_none\": {rr_vs_none:.4}"),
        format!("\"rr_ratio_vs_iptables_1000\": {rr_vs_ipset:.4}"),
        format!("\"rr_ratio_vs_iptables_rule_lists_1000\": {rr_vs_ipt:.4}"),
        format!("\"conn_rate_ratio_no_policy_vs_iptables_rule_lists_1000\": {ceiling_vs_ipt:.4}"),
        format!("\"iptables_program_1000_policies_s\": {prog_ipt:.6}"),
        format!("\"xdp_drop_pps\": {xdp_pps:.0}"),
        format!("\"iptables_drop_pps\": {ipt_pps:.0}"),
        format!("\"xdp_mode\": \"{:?}\"", drops.mode),
        format!(
            "\"drop_sender\": \"{} threads injecting 60-byte UDP frames with BPF_PROG_TEST_RUN live frames (XDP_TX out of the external veth)\"",
            drops.threads
        ),
        format!("\"drop_seconds_per_measurement\": {drop_secs}"),
        format!(
            "\"xdp_program_ns_per_denied_packet\": {}",
            drops.xdp_prog_ns
        ),
        format!("\"rounds\": {rounds}"),
        format!("\"drop_rounds\": {drop_rounds}"),
        format!("\"seconds_per_measurement\": {secs}"),
    ];
    for (sender, [x, i, xo, io, ratio]) in &drop_figures {
        let name = match sender {
            Sender::LiveFrames => "drop_live_frames",
            Sender::AfPacket => "drop_af_packet_sendmmsg",
        };
        json.push(format!(
            "\"{name}\": {{\"xdp_pps\": {x:.0}, \"iptables_pps\": {i:.0}, \"xdp_offered_pps\": {xo:.0}, \"iptables_offered_pps\": {io:.0}, \"ratio\": {ratio:.4}}}"
        ));
    }
    if let Some(t) = prog_ipset {
        json.push(format!("\"ipset_program_1000_policies_s\": {t:.6}"));
    }
    for (mode, r, p) in &rows {
        json.push(format!(
            "\"{}\": {{\"conn_rate\": {:.1}, \"rr_rate\": {:.1}, \"p50_us\": {:.1}, \"p99_us\": {:.1}{}}}",
            key(mode),
            r.conn_rate,
            r.rr_rate,
            r.p50_us,
            r.p99_us,
            p.map(|d| format!(", \"program_s\": {d:.6}"))
                .unwrap_or_default()
        ));
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("policy.json"),
        format!("{{\n  {}\n}}\n", json.join(",\n  ")),
    )
    .unwrap();
    println!("wrote {}", out.join("policy.json").display());
}
