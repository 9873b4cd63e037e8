//! The XDP early drop (`xdp_policy`) on a node's external interface, end
//! to end: an "external" namespace on its own veth to the node, the
//! program attached to the node side of that veth, an ingress-isolated
//! server pod whose policy admits one external CIDR. Real TCP and UDP from
//! an admitted and a denied external address; the drop is shown to happen
//! at XDP (its counter rises, the pod hook's does not). Each test builds
//! its own topology and pin directory, removed on drop (also on panic).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::{Pod, Topology, ask_udp, ask_with_peer, ip};
use skep_dataplane::{
    lb::{Datapath, KernelDatapath, LbSettings},
    policy::{
        Cidr, EndpointEntry, ID_CIDR_FIRST, ID_POD_FIRST, ID_WORLD, IpcacheEntry, KernelPolicy,
        PolicyDatapath, PolicyDirection, PolicyRule, PolicyState, PortMatch,
        xdp::{self, XdpMode},
    },
};
use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::{FromRawFd, OwnedFd},
    path::PathBuf,
    process::Command,
    time::Duration,
};

/// The external namespace's primary address (see `add_external`): no
/// rule admits it.
const DENIED: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
/// A second address of the external namespace, inside the admitted CIDR.
const ADMITTED: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 9);
const ADMITTED_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(192, 168, 50, 8), 29);
const CIDR_IDENTITY: u32 = ID_CIDR_FIRST + 1;
const SERVER_IDENTITY: u32 = ID_POD_FIRST;
const SERVER_ENDPOINT: u32 = 1;
/// The node side of the external veth.
const EXT_IF: &str = "ext0";
const TCP: u8 = 6;
const UDP: u8 = 17;
const XDP_DROPS: &str = "xdp_policy_drop";
const TC_DENIED: &str = "policy_denied_ingress";
const CACHE_HITS: &str = "xdp_deny_cache_hit";

struct Setup {
    // Field order is drop order: servers, then namespaces, then pins.
    _servers: Vec<harness::Server>,
    external: Pod,
    dp: KernelDatapath,
    policy: KernelPolicy,
    topo: Topology,
}

/// A node with one server pod (TCP 8080 and 9090, UDP 5353), ingress
/// isolated, admitting ADMITTED_CIDR on TCP 8080 and UDP 5353; an
/// external namespace with DENIED and ADMITTED and its own servers (TCP
/// 7000, UDP 7001, for connections the pod opens). Nothing attached at
/// XDP yet.
fn setup(test: &str) -> Setup {
    let topo = Topology::new(test, 1);
    let ext = topo.add_external();
    ip(&[
        "-n",
        ext.name(),
        "addr",
        "add",
        &format!("{ADMITTED}/24"),
        "dev",
        "eth0",
    ]);
    let external = Pod {
        name: "external".into(),
        ns: ext,
        ip: DENIED,
        host_if: EXT_IF.into(),
    };
    let server = &topo.pods[0];
    let servers = vec![
        server.tcp_server(8080),
        server.tcp_server(9090),
        server.udp_server(5353),
        external.tcp_server(7000),
        external.udp_server(7001),
    ];
    let dp = topo.datapath_with(LbSettings {
        policy_ct_entries: 4096,
        ipcache_entries: 4096,
        policy_entries: 4096,
        flow_ring_bytes: 1 << 16,
        ..topo.settings()
    });
    let mut policy = KernelPolicy::open(&topo.pins.0).expect("open the policy maps");
    policy.apply(&state(server.ip)).expect("apply the policy");
    assert!(policy.enforcing().unwrap());
    Setup {
        _servers: servers,
        external,
        dp,
        policy,
        topo,
    }
}

fn state(server: Ipv4Addr) -> PolicyState {
    let mut s = PolicyState::default();
    s.ipcache.insert(
        Cidr::host(server),
        IpcacheEntry {
            identity: SERVER_IDENTITY,
            cidr_identity: ID_WORLD,
        },
    );
    s.ipcache.insert(
        Cidr::new(ADMITTED_CIDR.0, ADMITTED_CIDR.1).unwrap(),
        IpcacheEntry {
            identity: CIDR_IDENTITY,
            cidr_identity: CIDR_IDENTITY,
        },
    );
    s.endpoints.insert(
        server,
        EndpointEntry {
            endpoint: SERVER_ENDPOINT,
            identity: SERVER_IDENTITY,
            ingress_isolated: true,
            egress_isolated: false,
        },
    );
    for (proto, port, id) in [(TCP, 8080, 1), (UDP, 5353, 2)] {
        s.rules.insert(
            PolicyRule {
                endpoint: SERVER_ENDPOINT,
                direction: PolicyDirection::Ingress,
                identity: CIDR_IDENTITY,
                ports: PortMatch::Range {
                    proto,
                    first: port,
                    last: port,
                },
            },
            id,
        );
    }
    s
}

impl Setup {
    fn server(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.topo.pods[0].ip, port)
    }

    fn pins(&self) -> PathBuf {
        self.topo.pins.0.clone()
    }

    fn attach(&self) -> XdpMode {
        let pins = self.pins();
        self.topo
            .node
            .run(|| xdp::attach(&pins, EXT_IF))
            .unwrap()
            .expect("attach xdp_policy to ext0")
    }

    /// (XDP drops, pod hook ingress denials) so far.
    fn counters(&self) -> (u64, u64) {
        let c = self.dp.counters().unwrap();
        (c.get(XDP_DROPS), c.get(TC_DENIED))
    }

    /// Denials `xdp_policy` took from its cache so far.
    fn cache_hits(&self) -> u64 {
        self.dp.counters().unwrap().get(CACHE_HITS)
    }

    /// The link pins of ext0 under `<root>/links`.
    fn link_pins(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(self.pins().join("links")) else {
            return Vec::new();
        };
        dir.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ext0-"))
            .collect()
    }

    /// What `ip link show ext0` in the node says.
    fn link_show(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", self.topo.node.name(), "link", "show", EXT_IF])
            .output()
            .expect("run ip");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A TCP connection from `src` in the external namespace.
    fn tcp_from(&self, src: Ipv4Addr, dst: SocketAddrV4) -> std::io::Result<TcpStream> {
        self.external.ns.run(|| connect_from(src, dst)).unwrap()
    }

    fn udp_from(&self, src: Ipv4Addr) -> UdpSocket {
        self.external
            .ns
            .run(|| UdpSocket::bind(SocketAddrV4::new(src, 0)))
            .unwrap()
            .expect("bind UDP in the external namespace")
    }

    /// A TCP exchange from `src` that must work; the server saw `src`.
    fn tcp_ok(&self, src: Ipv4Addr, port: u16) {
        let dst = self.server(port);
        let mut c = self
            .tcp_from(src, dst)
            .unwrap_or_else(|e| panic!("{src} → {dst} must connect: {e}"));
        for i in 0..3 {
            let (who, peer) = ask_with_peer(&mut c, &format!("hello {i}"))
                .unwrap_or_else(|e| panic!("{src} → {dst}: no answer: {e}"));
            assert_eq!((who.as_str(), peer), ("pod0", src.to_string()));
        }
    }

    /// A TCP connection from `src` that must time out (its SYNs dropped).
    fn tcp_denied(&self, src: Ipv4Addr, port: u16) {
        let dst = self.server(port);
        if let Ok(c) = self.tcp_from(src, dst) {
            panic!(
                "{src} → {dst} must be dropped, but connected ({:?})",
                c.local_addr()
            );
        }
    }

    fn udp_ok(&self, src: Ipv4Addr, port: u16) {
        let sock = self.udp_from(src);
        let dst = self.server(port);
        let who = ask_udp(&sock, dst, "q")
            .unwrap_or_else(|e| panic!("UDP {src} → {dst} must be answered: {e}"));
        assert_eq!(who, "pod0");
    }

    /// Sends `n` datagrams from `src` that must all go unanswered.
    fn udp_denied(&self, src: Ipv4Addr, port: u16, n: u64) {
        let sock = self.udp_from(src);
        let dst = self.server(port);
        for i in 0..n {
            sock.send_to(format!("flood {i}").as_bytes(), dst).unwrap();
        }
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 256];
        if let Ok((len, from)) = sock.recv_from(&mut buf) {
            panic!(
                "UDP {src} → {dst} must be dropped, but {from} answered {:?}",
                String::from_utf8_lossy(&buf[..len])
            );
        }
    }
}

/// connect(2) from a given source address, giving up after 2 s (SO_SNDTIMEO
/// bounds a blocking connect on Linux). Call inside the namespace.
fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> std::io::Result<TcpStream> {
    let sockaddr = |a: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns, with
    // pointers to live locals of the sizes passed.
    unsafe {
        let fd = check(libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let fd = OwnedFd::from_raw_fd(fd);
        use std::os::fd::AsRawFd;
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        check(libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        ))?;
        let local = sockaddr(src, 0);
        check(libc::bind(
            fd.as_raw_fd(),
            (&local as *const libc::sockaddr_in).cast(),
            len,
        ))?;
        let remote = sockaddr(*dst.ip(), dst.port());
        check(libc::connect(
            fd.as_raw_fd(),
            (&remote as *const libc::sockaddr_in).cast(),
            len,
        ))?;
        Ok(TcpStream::from(fd))
    }
}

#[test]
fn denied_external_traffic_is_dropped_at_xdp_before_the_pod_hook() {
    let s = setup("deny");
    let mode = s.attach();
    assert_eq!(mode, XdpMode::Native, "veth supports native XDP");
    assert!(
        s.link_show().contains("xdp"),
        "ip link shows no XDP program on ext0:\n{}",
        s.link_show()
    );
    let ifindex = s
        .topo
        .node
        .run(|| nix::net::if_::if_nametoindex(EXT_IF).unwrap())
        .unwrap();
    assert_eq!(s.link_pins(), vec![format!("ext0-{ifindex}-xdp")]);
    // Attaching again keeps the one attachment.
    assert_eq!(s.attach(), XdpMode::Native);
    assert_eq!(s.link_pins().len(), 1);

    // The admitted CIDR reaches the admitted ports.
    let before = s.counters();
    s.tcp_ok(ADMITTED, 8080);
    s.udp_ok(ADMITTED, 5353);
    assert_eq!(s.counters(), before, "admitted traffic dropped nowhere");

    // Denied: UDP floods are dropped at XDP, one count per datagram, and
    // never reach the pod hook.
    s.udp_denied(DENIED, 5353, 20);
    let after = s.counters();
    assert_eq!(
        after.0 - before.0,
        20,
        "every denied datagram is dropped at XDP"
    );
    assert_eq!(after.1, before.1, "nothing reached the pod hook's denial");
    // TCP SYNs from the denied address, and from the admitted one to a port
    // no rule opens.
    s.tcp_denied(DENIED, 8080);
    let syns = s.counters().0 - after.0;
    assert!(syns >= 1, "the denied SYNs were not dropped at XDP");
    s.tcp_denied(ADMITTED, 9090);
    s.udp_denied(ADMITTED, 5354, 3);
    let end = s.counters();
    assert!(end.0 - after.0 >= syns + 1 + 3, "{end:?} after {after:?}");
    assert_eq!(end.1, before.1, "the pod hook denied nothing: {end:?}");
    // The admitted address still works after the floods.
    s.tcp_ok(ADMITTED, 8080);
}

#[test]
fn replies_to_the_pods_own_connections_pass() {
    let s = setup("replies");
    s.attach();
    let pod = &s.topo.pods[0];
    let before = s.counters();
    // DENIED may not open connections to the pod, but the pod's own
    // connections to it (egress is open) get their replies.
    let to_ext = SocketAddrV4::new(DENIED, 7000);
    let mut c = pod
        .connect(to_ext)
        .unwrap_or_else(|e| panic!("pod0 → {to_ext} must connect: {e}"));
    for i in 0..5 {
        let (who, peer) = ask_with_peer(&mut c, &format!("out {i}")).unwrap();
        assert_eq!((who.as_str(), peer), ("external", pod.ip.to_string()));
    }
    let sock = pod.udp(0);
    for _ in 0..3 {
        assert_eq!(
            ask_udp(&sock, SocketAddrV4::new(DENIED, 7001), "dns?").unwrap(),
            "external"
        );
    }
    assert_eq!(s.counters(), before, "no reply was dropped");
    // A new connection from that address is still dropped.
    s.udp_denied(DENIED, 5353, 4);
    assert_eq!(s.counters().0 - before.0, 4);
}

#[test]
fn enforcement_off_drops_nothing_and_detach_removes_the_program() {
    let mut s = setup("off");
    s.attach();
    s.policy.set_enforcement(false);
    assert!(!s.policy.enforcing().unwrap());
    let before = s.counters();
    s.tcp_ok(DENIED, 8080);
    s.udp_ok(DENIED, 5353);
    s.tcp_ok(ADMITTED, 9090);
    assert_eq!(s.counters(), before, "enforcement off: nothing dropped");

    s.policy.set_enforcement(true);
    s.udp_denied(DENIED, 5353, 5);
    let on = s.counters();
    assert_eq!(on.0 - before.0, 5, "enforcing again: dropped at XDP");

    // Detached: the pin and the program go; admitted traffic flows, and
    // the pod hook alone denies the rest.
    let pins = s.pins();
    assert!(xdp::detach(&pins, EXT_IF).unwrap());
    assert!(s.link_pins().is_empty(), "{:?}", s.link_pins());
    // The kernel releases the link when its last reference goes, which
    // on a slow (emulated) 5.10 can trail the unpin by a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut shown = s.link_show();
    while shown.contains("xdp") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        shown = s.link_show();
    }
    assert!(
        !shown.contains("xdp"),
        "ext0 still runs an XDP program 5 s after detach:\n{shown}"
    );
    assert!(
        !xdp::detach(&pins, EXT_IF).unwrap(),
        "nothing left to detach"
    );
    s.tcp_ok(ADMITTED, 8080);
    s.udp_ok(ADMITTED, 5353);
    s.udp_denied(DENIED, 5353, 5);
    let off = s.counters();
    assert_eq!(off.0, on.0, "no XDP drops once detached");
    assert_eq!(off.1 - on.1, 5, "the pod hook drops what XDP did before");
}

/// The attachment outlives its loader: a new datapath (agent restart)
/// replaces the program in place, and the early drop keeps working.
#[test]
fn a_new_loader_keeps_the_attachment() {
    let s = setup("reload");
    s.attach();
    let dp2 = s.topo.datapath_with(LbSettings {
        policy_ct_entries: 4096,
        ipcache_entries: 4096,
        policy_entries: 4096,
        flow_ring_bytes: 1 << 16,
        ..s.topo.settings()
    });
    assert_eq!(s.attach(), XdpMode::Native);
    assert_eq!(s.link_pins().len(), 1);
    let before = dp2.counters().unwrap().get(XDP_DROPS);
    s.udp_denied(DENIED, 5353, 3);
    assert_eq!(dp2.counters().unwrap().get(XDP_DROPS) - before, 3);
    s.tcp_ok(ADMITTED, 8080);
}

/// Keeps the calling thread (and the threads it spawns, e.g. to enter a
/// namespace) on CPU 0. The denial cache is per CPU, and a veth runs the
/// receiver's XDP on the sending CPU: pinned, every datagram a test sends
/// meets the same cache, so hit counts are exact.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read
    // and write that local.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        r,
        0,
        "sched_setaffinity(CPU 0): {}",
        std::io::Error::last_os_error()
    );
}

/// A repeated denial comes from the cache (no ipcache or rule lookups);
/// an apply that admits the source makes the very next packet pass, and
/// one that takes the admission back denies again at once.
#[test]
fn cached_denials_end_with_the_next_policy_apply() {
    pin_to_cpu0();
    let mut s = setup("dcache");
    s.attach();
    let server = s.topo.pods[0].ip;
    let (drops0, _) = s.counters();
    let hits0 = s.cache_hits();
    // Five datagrams from one socket: the first is judged and cached, the
    // four others hit the cache. The pod hook sees none of them.
    s.udp_denied(DENIED, 5353, 5);
    let (drops1, tc1) = s.counters();
    assert_eq!(drops1 - drops0, 5, "all five dropped at XDP");
    assert_eq!(
        s.cache_hits() - hits0,
        4,
        "the second and later hit the cache"
    );
    // Another source port of the same source: the same entry.
    s.udp_denied(DENIED, 5353, 2);
    assert_eq!(s.counters().0 - drops1, 2);
    assert_eq!(
        s.cache_hits() - hits0,
        6,
        "the source port is not in the key"
    );

    // Admit the world on UDP 5353: DENIED (in no ipcache entry) is WORLD.
    let gen_before = s.policy.generation().unwrap();
    let mut admitting = state(server);
    admitting.rules.insert(
        PolicyRule {
            endpoint: SERVER_ENDPOINT,
            direction: PolicyDirection::Ingress,
            identity: ID_WORLD,
            ports: PortMatch::AnyPort { proto: UDP },
        },
        3,
    );
    s.policy.apply(&admitting).unwrap();
    assert!(
        s.policy.generation().unwrap() > gen_before,
        "an apply that changed a rule must bump the generation"
    );
    let (drops2, _) = s.counters();
    let hits2 = s.cache_hits();
    // ask_udp sends one datagram: its answer proves the first packet after
    // the apply passed.
    s.udp_ok(DENIED, 5353);
    assert_eq!(s.counters().0, drops2, "no stale denial after the apply");
    assert_eq!(s.cache_hits(), hits2);
    // TCP from DENIED is still refused (the rule is UDP only) ...
    s.tcp_denied(DENIED, 8080);
    let (drops3, _) = s.counters();
    assert!(drops3 > drops2, "the SYNs were not dropped at XDP");

    // ... and taking the rule back denies the next datagram at once, with a
    // fresh decision (no hit), then from the cache again.
    s.policy.apply(&state(server)).unwrap();
    let hits3 = s.cache_hits();
    s.udp_denied(DENIED, 5353, 3);
    let (drops4, tc4) = s.counters();
    assert_eq!(drops4 - drops3, 3, "denied again right after the apply");
    assert_eq!(s.cache_hits() - hits3, 2, "the first was judged afresh");
    assert_eq!(tc4, tc1, "nothing reached the pod hook's denial");
    s.tcp_ok(ADMITTED, 8080);
}

/// A reply of a connection the pod opened passes even when the same
/// (source, destination, port, protocol) was cached as denied before: the
/// policy conntrack is checked before the cache.
#[test]
fn replies_pass_despite_a_cached_denial_of_the_same_tuple() {
    const POD_PORT: u16 = 6000;
    pin_to_cpu0();
    let s = setup("dcreply");
    s.attach();
    let pod = &s.topo.pods[0];
    let (drops0, _) = s.counters();
    let hits0 = s.cache_hits();
    // DENIED → pod:6000 is denied and cached.
    s.udp_denied(DENIED, POD_PORT, 3);
    let (drops1, _) = s.counters();
    assert_eq!(drops1 - drops0, 3);
    assert_eq!(s.cache_hits() - hits0, 2, "the denial is cached");
    // Now the pod talks to DENIED from port 6000: the replies carry the
    // cached (DENIED, pod, 6000, UDP) and must all pass.
    let sock = pod.udp(POD_PORT);
    for i in 0..5 {
        let who = ask_udp(&sock, SocketAddrV4::new(DENIED, 7001), &format!("q{i}"))
            .unwrap_or_else(|e| panic!("reply {i} of the pod's own exchange was lost: {e}"));
        assert_eq!(who, "external");
    }
    assert_eq!(s.counters().0, drops1, "no reply was dropped at XDP");
    // A new exchange DENIED opens to that port is still denied, from the
    // cache.
    let hits1 = s.cache_hits();
    s.udp_denied(DENIED, POD_PORT, 2);
    assert_eq!(s.counters().0 - drops1, 2);
    assert_eq!(s.cache_hits() - hits1, 2);
}

/// A denial cached for one full tuple (one source port, so later packets
/// skip the conntrack lookups while nothing new is admitted) yields as soon
/// as the pod opens an exchange that makes that tuple a reply: the pod
/// hook's admission bumps the conntrack generation.
#[test]
fn a_cached_denial_of_one_source_port_yields_to_the_pods_own_exchange() {
    const POD_PORT: u16 = 6001;
    const PEER_PORT: u16 = 7101;
    pin_to_cpu0();
    let s = setup("dcport");
    s.attach();
    let pod = &s.topo.pods[0];
    let peer = s
        .external
        .ns
        .run(|| UdpSocket::bind(SocketAddrV4::new(DENIED, PEER_PORT)))
        .unwrap()
        .expect("bind the peer's UDP socket in the external namespace");
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (drops0, _) = s.counters();
    let hits0 = s.cache_hits();
    for i in 0..4 {
        peer.send_to(format!("flood {i}").as_bytes(), s.server(POD_PORT))
            .unwrap();
    }
    let sock = pod.udp(POD_PORT);
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (drops1, _) = s.counters();
    assert_eq!(
        drops1 - drops0,
        4,
        "the peer's datagrams were dropped at XDP"
    );
    assert_eq!(s.cache_hits() - hits0, 3, "the denial is cached");
    let mut buf = [0u8; 256];
    for i in 0..3 {
        let q = format!("q{i}");
        sock.send_to(q.as_bytes(), SocketAddrV4::new(DENIED, PEER_PORT))
            .unwrap();
        let (len, from) = peer
            .recv_from(&mut buf)
            .expect("the pod's datagram reached the peer");
        assert_eq!(&buf[..len], q.as_bytes());
        peer.send_to(format!("a{i}").as_bytes(), from).unwrap();
        let (len, _) = sock
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("reply {i} to the pod's own exchange was lost: {e}"));
        assert_eq!(&buf[..len], format!("a{i}").as_bytes());
    }
    assert_eq!(s.counters().0, drops1, "no reply was dropped at XDP");
}

/// A connection admitted before its rule went keeps working although new
/// connections of the same (source, destination, port) are now denied
/// and cached: the admitted connection's conntrack entry is checked before
/// a cached denial is applied.
#[test]
fn an_admitted_connection_outlives_a_cached_denial_of_its_port() {
    pin_to_cpu0();
    let mut s = setup("dcestab");
    s.attach();
    let server = s.topo.pods[0].ip;
    let dst = s.server(8080);
    let mut open = s
        .tcp_from(ADMITTED, dst)
        .unwrap_or_else(|e| panic!("{ADMITTED} → {dst} must connect: {e}"));
    assert_eq!(ask_with_peer(&mut open, "before").unwrap().0, "pod0");
    // Take the TCP rule away: new connections from ADMITTED to 8080 are
    // denied: the first SYN judged, a later connection's SYN (sent from
    // this thread's CPU, like the first) from the cache.
    let mut without_tcp = state(server);
    without_tcp
        .rules
        .retain(|r, _| !matches!(r.ports, PortMatch::Range { proto: TCP, .. }));
    s.policy.apply(&without_tcp).unwrap();
    let hits0 = s.cache_hits();
    let (drops0, _) = s.counters();
    s.tcp_denied(ADMITTED, 8080);
    s.tcp_denied(ADMITTED, 8080);
    assert!(s.counters().0 - drops0 >= 2, "the SYNs were dropped at XDP");
    assert!(
        s.cache_hits() > hits0,
        "the second connection's SYN hit the cache"
    );
    // The open connection's packets carry the cached key and pass.
    let (drops1, _) = s.counters();
    let hits1 = s.cache_hits();
    for i in 0..5 {
        let (who, peer) = ask_with_peer(&mut open, &format!("after {i}"))
            .unwrap_or_else(|e| panic!("the admitted connection broke: {e}"));
        assert_eq!((who.as_str(), peer), ("pod0", ADMITTED.to_string()));
    }
    assert_eq!(s.counters().0, drops1, "no packet of it was dropped at XDP");
    assert_eq!(s.cache_hits(), hits1);
}
