//! Pod network plumbing for real, as root: "node" namespaces made by the
//! test, pods set up inside them with `podnet::setup` (netlink only), then
//! real TCP between pods, to the node and across two nodes joined by a
//! veth link with node routes from `sync_cidr_routes`. `ip` is used only to
//! look at the result. Every namespace goes away on drop, also on panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use skep_dataplane::{
    NetNs,
    podnet::{
        self, PodNet, PodNetSpec,
        routes::{CidrRoute, sync_cidr_routes},
    },
};
use std::{
    future::Future,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and veths: run it as root"
    );
}

/// `ip ARGS`, returning stdout; panics with stderr on failure.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run `ip` (package iproute2; `cargo xtask setup` installs it)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pod UID unique to this process and call; its first 12 hex digits (the
/// netns name) are the pid and a counter, so parallel test runs never
/// share a pod namespace.
fn uid() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{:08x}-{:04x}-4{:03x}-8000-{:012x}",
        std::process::id(),
        n & 0xffff,
        nanos & 0xfff,
        u64::from(nanos)
    )
}

/// A node namespace and the pods made in it; dropping it removes the pod
/// namespaces (by name: they live in /run/netns) and then the node (with
/// every host veth in it).
struct Node {
    pods: Vec<String>,
    ns: NetNs,
}

impl Node {
    fn new(test: &str) -> Self {
        require_root();
        let ns = NetNs::create(&format!("skpt{}-{test}", std::process::id()))
            .expect("create node netns");
        Self {
            pods: Vec::new(),
            ns,
        }
    }

    /// Runs an async block on a current-thread runtime inside the node.
    fn block_on<T: Send, F: Future<Output = T>>(&self, f: impl FnOnce() -> F + Send) -> T {
        self.ns
            .run(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(f())
            })
            .unwrap()
    }

    fn spec(&mut self, ip: Ipv4Addr) -> PodNetSpec {
        let uid = uid();
        self.pods.push(uid.clone());
        PodNetSpec::new(&uid, ip, 1500)
    }

    fn setup(&self, spec: &PodNetSpec) -> PodNet {
        self.block_on(|| podnet::setup(spec)).expect("pod setup")
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.ns.name()];
        full.extend_from_slice(args);
        ip(&full)
    }

    fn host_veths(&self) -> Vec<String> {
        self.block_on(podnet::list_host_veths).unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for uid in &self.pods {
            let _ = NetNs::remove_named(&podnet::netns_name(uid));
        }
    }
}

fn pod_ip(args: &[&str], pod: &PodNet) -> String {
    let mut full = vec!["-n", pod.netns_name.as_str()];
    full.extend_from_slice(args);
    ip(&full)
}

/// A one-shot TCP echo server in namespace `ns`: answers one line with
/// "<peer ip> <line>" and returns.
fn echo_server(ns: &str, addr: SocketAddrV4) -> std::thread::JoinHandle<()> {
    let listener = NetNs::open(ns)
        .unwrap()
        .run(|| TcpListener::bind(addr))
        .unwrap()
        .unwrap_or_else(|e| panic!("bind {addr} in {ns}: {e}"));
    std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).unwrap();
        let reply = format!("{} {}", peer.ip(), String::from_utf8_lossy(&buf[..n]));
        conn.write_all(reply.as_bytes()).unwrap();
    })
}

/// Connects from namespace `ns` to `to`, sends `msg` and returns the reply.
fn talk(ns: &str, to: SocketAddrV4, msg: &str) -> std::io::Result<String> {
    let mut conn = NetNs::open(ns)
        .unwrap()
        .run(|| TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(2)))
        .unwrap()?;
    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
    conn.write_all(msg.as_bytes())?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    Ok(reply)
}

/// A TCP round trip from pod `from` to `to`: the server must see the pod's
/// own IP (routed, no NAT).
fn assert_reaches(from: &PodNet, server_ns: &str, to: SocketAddrV4) {
    let server = echo_server(server_ns, to);
    let reply =
        talk(&from.netns_name, to, "hello").unwrap_or_else(|e| panic!("{} -> {to}: {e}", from.ip));
    assert_eq!(reply, format!("{} hello", from.ip));
    server.join().unwrap();
}

fn sysctl_in(ns: &NetNs, path: &str) -> String {
    ns.run(|| std::fs::read_to_string(path).unwrap())
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn pods_on_one_node_talk_to_each_other_and_to_the_node() {
    let mut node = Node::new("one");
    let spec_a = node.spec(Ipv4Addr::new(10, 42, 7, 2));
    let spec_b = node.spec(Ipv4Addr::new(10, 42, 7, 3));
    let start = Instant::now();
    let a = node.setup(&spec_a);
    let took = start.elapsed();
    let b = node.setup(&spec_b);
    eprintln!("setup of one pod took {took:?}");

    assert_eq!(a.host_veth, podnet::host_veth_name(&spec_a.pod_uid));
    assert_eq!(
        a.netns_path,
        std::path::Path::new("/run/netns").join(&a.netns_name)
    );
    assert!(NetNs::exists(&a.netns_name));

    // Pod side as DESIGN.md says.
    let addrs = pod_ip(&["-4", "-o", "addr", "show", "dev", "eth0"], &a);
    assert!(addrs.contains("inet 10.42.7.2/32"), "{addrs}");
    let links = pod_ip(&["-o", "link", "show", "eth0"], &a);
    assert!(
        links.contains("mtu 1500") && links.contains("LOWER_UP"),
        "{links}"
    );
    assert!(links.contains("link/ether 0a:58:0a:2a:07:02"), "{links}");
    let lo = pod_ip(&["-o", "link", "show", "lo"], &a);
    assert!(lo.contains(",UP"), "lo is up: {lo}");
    let routes = pod_ip(&["-4", "route", "show"], &a);
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("169.254.1.1 dev eth0 proto 84 scope link"),
        "{routes}"
    );
    let neigh = pod_ip(&["neigh", "show", "169.254.1.1", "dev", "eth0"], &a);
    assert!(
        neigh.contains("lladdr ee:ee:ee:ee:ee:ee") && neigh.contains("PERMANENT"),
        "{neigh}"
    );
    // Host side.
    let route = node.ip(&["-4", "route", "show", "10.42.7.2"]);
    assert_eq!(
        route.trim(),
        format!("10.42.7.2 dev {} proto 84 scope link", a.host_veth)
    );
    // With the node address as source: the node's own packets to the pod
    // come from it (a node service answering a pod's connected UDP socket).
    node.ip(&["addr", "add", "192.0.2.1/32", "dev", "lo"]);
    let spec_c = node
        .spec(Ipv4Addr::new(10, 42, 7, 4))
        .with_host_source(Ipv4Addr::new(192, 0, 2, 1));
    let c = node.setup(&spec_c);
    let route = node.ip(&["-4", "route", "show", "10.42.7.4"]);
    assert_eq!(
        route.trim(),
        format!(
            "10.42.7.4 dev {} proto 84 scope link src 192.0.2.1",
            c.host_veth
        )
    );
    let host_link = node.ip(&["-o", "link", "show", &a.host_veth]);
    assert!(
        host_link.contains("link/ether ee:ee:ee:ee:ee:ee") && host_link.contains("LOWER_UP"),
        "{host_link}"
    );
    assert_eq!(sysctl_in(&node.ns, "/proc/sys/net/ipv4/ip_forward"), "1");
    assert_eq!(
        sysctl_in(
            &node.ns,
            &format!("/proc/sys/net/ipv4/conf/{}/forwarding", a.host_veth)
        ),
        "1"
    );
    assert_eq!(
        sysctl_in(
            &node.ns,
            &format!("/proc/sys/net/ipv4/conf/{}/rp_filter", a.host_veth)
        ),
        "0"
    );

    // Pod to pod, both ways.
    assert_reaches(&a, &b.netns_name, SocketAddrV4::new(b.ip, 7000));
    assert_reaches(&b, &a.netns_name, SocketAddrV4::new(a.ip, 7001));
    // Pod to the node: an address of the node namespace.
    node.ip(&["addr", "add", "192.168.77.1/32", "dev", "lo"]);
    assert_reaches(
        &a,
        node.ns.name(),
        SocketAddrV4::new(Ipv4Addr::new(192, 168, 77, 1), 7002),
    );

    // The listings see both pods.
    let veths = node.host_veths();
    assert!(
        veths.contains(&a.host_veth) && veths.contains(&b.host_veth),
        "{veths:?}"
    );
    let names = podnet::list_pod_netns().unwrap();
    assert!(names.contains(&a.netns_name) && names.contains(&b.netns_name));

    // Teardown leaves nothing, and is idempotent.
    node.block_on(|| podnet::teardown(&spec_a.pod_uid)).unwrap();
    node.block_on(|| podnet::teardown(&spec_a.pod_uid)).unwrap();
    assert!(!node.host_veths().contains(&a.host_veth));
    assert!(!podnet::list_pod_netns().unwrap().contains(&a.netns_name));
    assert!(!a.netns_path.exists());
    assert_eq!(node.ip(&["-4", "route", "show", "10.42.7.2"]).trim(), "");
    // B is untouched.
    assert!(node.host_veths().contains(&b.host_veth));
    assert!(talk(&b.netns_name, SocketAddrV4::new(a.ip, 7003), "x").is_err());
}

#[test]
fn setup_is_idempotent_and_repairs_half_made_pods() {
    let mut node = Node::new("idem");
    let spec_a = node.spec(Ipv4Addr::new(10, 42, 7, 10));
    let spec_b = node.spec(Ipv4Addr::new(10, 42, 7, 11));
    let a = node.setup(&spec_a);
    let b = node.setup(&spec_b);
    let before = (
        pod_ip(&["-4", "-o", "addr"], &a),
        pod_ip(&["-4", "route"], &a),
        node.ip(&["-4", "route"]),
    );
    // Twice: same result, nothing duplicated.
    assert_eq!(node.setup(&spec_a), a);
    let after = (
        pod_ip(&["-4", "-o", "addr"], &a),
        pod_ip(&["-4", "route"], &a),
        node.ip(&["-4", "route"]),
    );
    assert_eq!(before, after);
    assert_reaches(&a, &b.netns_name, SocketAddrV4::new(b.ip, 7100));

    // The veth is gone (e.g. deleted by hand): setup makes it again.
    node.ip(&["link", "del", &a.host_veth]);
    assert_eq!(node.setup(&spec_a), a);
    assert_reaches(&a, &b.netns_name, SocketAddrV4::new(b.ip, 7101));

    // A different IP for the same pod: the old address and route go.
    let moved = PodNetSpec {
        ip: Ipv4Addr::new(10, 42, 7, 12),
        ..spec_a.clone()
    };
    let a2 = node.setup(&moved);
    let addrs = pod_ip(&["-4", "-o", "addr", "show", "dev", "eth0"], &a2);
    assert!(
        addrs.contains("10.42.7.12/32") && !addrs.contains("10.42.7.10/"),
        "{addrs}"
    );
    assert_eq!(node.ip(&["-4", "route", "show", "10.42.7.10"]).trim(), "");
    assert_reaches(&a2, &b.netns_name, SocketAddrV4::new(b.ip, 7102));
    assert_reaches(&b, &a2.netns_name, SocketAddrV4::new(a2.ip, 7103));
}

#[test]
fn crash_leftovers_are_found_and_a_bare_mount_point_is_recreated() {
    let mut node = Node::new("crash");
    let spec = node.spec(Ipv4Addr::new(10, 42, 7, 20));
    let pod = node.setup(&spec);
    // The agent "crashed": all it has after a restart are the listings.
    assert!(podnet::list_pod_netns().unwrap().contains(&pod.netns_name));
    let veths = node.host_veths();
    assert_eq!(veths, vec![pod.host_veth.clone()]);
    for v in &veths {
        node.block_on(|| podnet::remove_host_veth(v)).unwrap();
    }
    NetNs::remove_named(&pod.netns_name).unwrap();
    assert!(node.host_veths().is_empty());
    assert!(!podnet::list_pod_netns().unwrap().contains(&pod.netns_name));

    // A crash between creating the mount point and mounting the namespace
    // leaves an empty file: setup must not take it for a namespace.
    let other = node.spec(Ipv4Addr::new(10, 42, 7, 21));
    let bare = std::path::Path::new("/run/netns").join(&other.netns_name);
    std::fs::write(&bare, b"").unwrap();
    assert!(!NetNs::exists(&other.netns_name));
    let p = node.setup(&other);
    assert!(NetNs::exists(&p.netns_name));
    node.ip(&["addr", "add", "192.168.77.2/32", "dev", "lo"]);
    assert_reaches(
        &p,
        node.ns.name(),
        SocketAddrV4::new(Ipv4Addr::new(192, 168, 77, 2), 7200),
    );
}

#[test]
fn many_pods_at_once_are_quick() {
    const PODS: u8 = 40;
    let mut node = Node::new("many");
    let specs: Vec<PodNetSpec> = (0..PODS)
        .map(|i| node.spec(Ipv4Addr::new(10, 42, 8, 10 + i)))
        .collect();
    let start = Instant::now();
    let pods = node
        .block_on(|| async { futures::future::join_all(specs.iter().map(podnet::setup)).await });
    let took = start.elapsed();
    let pods: Vec<PodNet> = pods.into_iter().map(|p| p.expect("setup")).collect();
    eprintln!(
        "{PODS} pods set up concurrently in {took:?} ({:?} per pod)",
        took / u32::from(PODS)
    );
    // Generous bound: CI machines are small and tests run in parallel; the
    // 5.10 VM without KVM emulates every instruction.
    let slack = if std::env::var("SKEP_VM_ACCEL").as_deref() == Ok("tcg") {
        20
    } else {
        1
    };
    assert!(
        took < Duration::from_millis(100) * u32::from(PODS) * slack,
        "setting up {PODS} pods took {took:?}"
    );
    assert_eq!(node.host_veths().len(), usize::from(PODS));
    assert_reaches(
        &pods[0],
        &pods[usize::from(PODS) - 1].netns_name,
        SocketAddrV4::new(pods[usize::from(PODS) - 1].ip, 7300),
    );
    let start = Instant::now();
    node.block_on(|| async {
        for s in &specs {
            podnet::teardown(&s.pod_uid).await.unwrap();
        }
    });
    eprintln!("{PODS} pods torn down in {:?}", start.elapsed());
    assert!(node.host_veths().is_empty());
    let left = podnet::list_pod_netns().unwrap();
    assert!(pods.iter().all(|p| !left.contains(&p.netns_name)));
}

#[test]
fn pods_on_two_nodes_talk_through_node_routes() {
    let mut n1 = Node::new("two1");
    let mut n2 = Node::new("two2");
    // The "L2" between the nodes: one veth pair.
    n1.ip(&[
        "link",
        "add",
        "uplink",
        "type",
        "veth",
        "peer",
        "name",
        "uplink",
        "netns",
        n2.ns.name(),
    ]);
    n1.ip(&["addr", "add", "10.99.0.1/24", "dev", "uplink"]);
    n2.ip(&["addr", "add", "10.99.0.2/24", "dev", "uplink"]);
    n1.ip(&["link", "set", "uplink", "mtu", "1450", "up"]);
    n2.ip(&["link", "set", "uplink", "up"]);

    // Pods take the MTU of the node's interface.
    let mtu = n1.block_on(|| podnet::node_mtu(Ipv4Addr::new(10, 99, 0, 1)));
    assert_eq!(mtu, 1450);
    let unknown = n1.block_on(|| podnet::node_mtu(Ipv4Addr::new(10, 99, 0, 77)));
    assert_eq!(unknown, 1500);

    let s1 = n1.spec(Ipv4Addr::new(10, 42, 1, 2));
    let s2 = n2.spec(Ipv4Addr::new(10, 42, 2, 2));
    let p1 = n1.setup(&s1);
    let p2 = n2.setup(&s2);

    // Routes that are not ours must survive a sync; stale ones of ours go.
    n1.ip(&["route", "add", "10.55.0.0/24", "via", "10.99.0.2"]);
    n1.ip(&[
        "route",
        "add",
        "10.42.9.0/24",
        "via",
        "10.99.0.2",
        "proto",
        "83",
    ]);
    let to_n2 = CidrRoute {
        cidr: Ipv4Addr::new(10, 42, 2, 0),
        prefix_len: 24,
        gateway: Ipv4Addr::new(10, 99, 0, 2),
    };
    let to_n1 = CidrRoute {
        cidr: Ipv4Addr::new(10, 42, 1, 0),
        prefix_len: 24,
        gateway: Ipv4Addr::new(10, 99, 0, 1),
    };
    let report = n1
        .block_on(|| async move { sync_cidr_routes(&[to_n2]).await })
        .unwrap();
    assert_eq!(report.installed, vec![to_n2]);
    assert_eq!(report.removed, vec![(Ipv4Addr::new(10, 42, 9, 0), 24)]);
    n2.block_on(|| async move { sync_cidr_routes(&[to_n1]).await })
        .unwrap();
    // A second sync changes nothing.
    let again = n1
        .block_on(|| async move { sync_cidr_routes(&[to_n2]).await })
        .unwrap();
    assert!(
        again.installed.is_empty() && again.removed.is_empty(),
        "{again:?}"
    );

    let table = n1.ip(&["-4", "route", "show"]);
    assert!(
        table.contains("10.42.2.0/24 via 10.99.0.2 dev uplink proto 83"),
        "{table}"
    );
    assert!(table.contains("10.55.0.0/24 via 10.99.0.2"), "{table}");
    assert!(!table.contains("10.42.9.0/24"), "{table}");
    assert!(
        table.contains(&format!("10.42.1.2 dev {}", p1.host_veth)),
        "{table}"
    );

    assert_reaches(&p1, &p2.netns_name, SocketAddrV4::new(p2.ip, 7400));
    assert_reaches(&p2, &p1.netns_name, SocketAddrV4::new(p1.ip, 7401));

    // A gateway off every connected network is reported, the rest applied.
    let bad = CidrRoute {
        cidr: Ipv4Addr::new(10, 42, 3, 0),
        prefix_len: 24,
        gateway: Ipv4Addr::new(172, 31, 255, 1),
    };
    let err = n1
        .block_on(|| async move { sync_cidr_routes(&[to_n2, bad]).await })
        .unwrap_err()
        .to_string();
    assert!(err.contains("10.42.3.0/24 via 172.31.255.1"), "{err}");

    // Node 2 leaves: its route goes, the pod /32 and foreign routes stay.
    let report = n1.block_on(|| sync_cidr_routes(&[])).unwrap();
    assert_eq!(report.removed, vec![(Ipv4Addr::new(10, 42, 2, 0), 24)]);
    let table = n1.ip(&["-4", "route", "show"]);
    assert!(!table.contains("10.42.2.0/24"), "{table}");
    assert!(table.contains("10.55.0.0/24"), "{table}");
    assert!(table.contains("10.42.1.2 dev"), "{table}");
}
