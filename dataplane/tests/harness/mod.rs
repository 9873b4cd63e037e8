//! A routed pod network in network namespaces, as DESIGN.md describes it:
//! one node namespace, pod namespaces on veth pairs (pod side `eth0` with a
//! /32 from 10.42.0.0/24, default route via the link-local gateway
//! 169.254.1.1 resolved by a static neighbour to the host veth's MAC), /32
//! host routes in the node, ip_forward on. Every namespace and the test's
//! bpffs pin directory go away on drop, also when the test panics.
//!
//! Sockets are created inside a namespace (`NetNs::run`) and then used from
//! any thread: a socket stays in the namespace it was created in.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use skep_dataplane::{
    NetNs,
    lb::{KernelDatapath, LbSettings},
};
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// MAC of every host-side veth (as Calico does: the pods only ever talk to
/// their gateway).
pub const HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";
pub const GATEWAY: &str = "169.254.1.1";

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads BPF programs and creates network namespaces: run it as root"
    );
}

pub fn ip(args: &[&str]) {
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
}

/// Removes a test's pin directory on drop.
pub struct PinDir(pub PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = KernelDatapath::remove_pins(&self.0);
    }
}

pub struct Pod {
    pub name: String,
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    /// Host-side veth in the node namespace.
    pub host_if: String,
}

impl Pod {
    /// A TCP connection from this pod (the socket lives in its namespace).
    pub fn connect(&self, to: SocketAddrV4) -> std::io::Result<TcpStream> {
        self.ns
            .run(|| TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(2)))
            .unwrap()
    }

    pub fn udp(&self, port: u16) -> UdpSocket {
        self.ns
            .run(|| UdpSocket::bind(SocketAddrV4::new(self.ip, port)))
            .unwrap()
            .expect("bind UDP socket in pod")
    }

    /// Starts a TCP server answering "<pod name> <line>\n" for each line.
    pub fn tcp_server(&self, port: u16) -> Server {
        let listener = self
            .ns
            .run(|| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))
            .unwrap()
            .expect("bind TCP server in pod");
        Server::tcp(listener, self.name.clone())
    }

    /// Starts a UDP server answering each datagram with "<pod name> <datagram>".
    pub fn udp_server(&self, port: u16) -> Server {
        let sock = self
            .ns
            .run(|| UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))
            .unwrap()
            .expect("bind UDP server in pod");
        Server::udp(sock, self.name.clone())
    }
}

/// A server thread; stops on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    pub served: Arc<AtomicUsize>,
    /// Listening socket to shut down to wake a blocked accept.
    wake: Option<std::os::fd::RawFd>,
}

impl Server {
    fn tcp(listener: TcpListener, id: String) -> Self {
        // A blocking accept (no polling delay in the measurements); Drop
        // wakes it with shutdown(2) on the listening socket.
        let wake = {
            use std::os::fd::AsRawFd;
            listener.as_raw_fd()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let (s, n) = (stop.clone(), served.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        n.fetch_add(1, Ordering::Relaxed);
                        let id = id.clone();
                        let s = s.clone();
                        std::thread::spawn(move || serve_tcp(conn, &id, &s));
                    }
                    Err(_) if s.load(Ordering::Relaxed) => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Self {
            stop,
            handle: Some(handle),
            served,
            wake: Some(wake),
        }
    }

    fn udp(sock: UdpSocket, id: String) -> Self {
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let (s, n) = (stop.clone(), served.clone());
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((len, from)) = sock.recv_from(&mut buf) {
                    n.fetch_add(1, Ordering::Relaxed);
                    let reply = format!("{id} {}", String::from_utf8_lossy(&buf[..len]));
                    let _ = sock.send_to(reply.as_bytes(), from);
                }
            }
        });
        Self {
            stop,
            handle: Some(handle),
            served,
            wake: None,
        }
    }
}

fn serve_tcp(conn: TcpStream, id: &str, stop: &AtomicBool) {
    conn.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    // Replies say who served and whom they saw: "<pod>@<peer ip> <line>".
    let peer = conn
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let id = format!("{id}@{peer}");
    let id = id.as_str();
    let mut writer = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {
                if writer.write_all(format!("{id} {line}").as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(fd) = self.wake {
            // SAFETY: the listener is owned by the accept thread, alive until
            // it is joined below; shutdown only wakes its accept().
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Sends one line on a connection and returns the serving pod's name.
pub fn ask(conn: &mut TcpStream, msg: &str) -> std::io::Result<String> {
    ask_with_peer(conn, msg).map(|(who, _)| who)
}

/// Like [`ask`], also returning the client address the server saw.
pub fn ask_with_peer(conn: &mut TcpStream, msg: &str) -> std::io::Result<(String, String)> {
    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
    conn.write_all(format!("{msg}\n").as_bytes())?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = conn.read(&mut byte)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed",
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        buf.push(byte[0]);
    }
    let reply = String::from_utf8_lossy(&buf).into_owned();
    let (who, echoed) = reply.split_once(' ').unwrap_or((&reply, ""));
    assert_eq!(echoed, msg, "echo mismatch in reply {reply:?}");
    let (who, peer) = who.split_once('@').unwrap_or((who, ""));
    Ok((who.to_owned(), peer.to_owned()))
}

/// Sends a datagram and returns the serving pod's name.
pub fn ask_udp(sock: &UdpSocket, to: SocketAddrV4, msg: &str) -> std::io::Result<String> {
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.send_to(msg.as_bytes(), to)?;
    let mut buf = [0u8; 2048];
    let (len, from) = sock.recv_from(&mut buf)?;
    assert_eq!(
        from,
        SocketAddr::V4(to),
        "reply must come from the frontend"
    );
    let reply = String::from_utf8_lossy(&buf[..len]).into_owned();
    let (who, echoed) = reply.split_once(' ').unwrap_or((&reply, ""));
    assert_eq!(echoed, msg);
    Ok(who.to_owned())
}

/// The node and its pods. Field order is drop order: pods, node, pins.
pub struct Topology {
    pub pods: Vec<Pod>,
    pub node: NetNs,
    pub pins: PinDir,
}

impl Topology {
    /// `test` must be unique among the tests of one binary (namespaces and
    /// pin directories are named after it).
    pub fn new(test: &str, n_pods: usize) -> Self {
        require_root();
        let tag = format!("{}-{test}", std::process::id());
        let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/skep-test-{tag}")));
        let _ = KernelDatapath::remove_pins(&pins.0);
        let node = NetNs::create(&format!("sk{tag}-n")).expect("create node netns");
        node.run(|| {
            for (path, value) in [
                ("/proc/sys/net/ipv4/ip_forward", "1"),
                ("/proc/sys/net/ipv4/conf/all/rp_filter", "0"),
                ("/proc/sys/net/ipv4/conf/default/rp_filter", "0"),
                ("/proc/sys/net/ipv4/conf/all/send_redirects", "0"),
                ("/proc/sys/net/ipv4/conf/default/send_redirects", "0"),
            ] {
                std::fs::write(path, value).unwrap_or_else(|e| panic!("write {path}: {e}"));
            }
        })
        .unwrap();
        let mut topo = Self {
            pods: Vec::new(),
            node,
            pins,
        };
        for i in 0..n_pods {
            topo.add_pod(i);
        }
        topo
    }

    fn add_pod(&mut self, i: usize) {
        let name = format!("pod{i}");
        let ns = NetNs::create(&format!("{}-p{i}", self.node.name().trim_end_matches("-n")))
            .expect("create pod netns");
        let addr = Ipv4Addr::new(10, 42, 0, 10 + i as u8);
        let ip_s = addr.to_string();
        let host_if = format!("vh{i}");
        let pod_mac = format!("02:00:0a:2a:00:{:02x}", 10 + i);
        let node = self.node.name().to_owned();
        ip(&[
            "-n",
            &node,
            "link",
            "add",
            &host_if,
            "address",
            HOST_MAC,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            &pod_mac,
            "netns",
            ns.name(),
        ]);
        ip(&[
            "-n",
            ns.name(),
            "addr",
            "add",
            &format!("{ip_s}/32"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", ns.name(), "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            ns.name(),
            "route",
            "add",
            GATEWAY,
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        ip(&[
            "-n",
            ns.name(),
            "route",
            "add",
            "default",
            "via",
            GATEWAY,
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            ns.name(),
            "neigh",
            "add",
            GATEWAY,
            "lladdr",
            HOST_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        ip(&["-n", &node, "link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &node,
            "route",
            "add",
            &format!("{ip_s}/32"),
            "dev",
            &host_if,
        ]);
        ip(&[
            "-n",
            &node,
            "neigh",
            "add",
            &ip_s,
            "lladdr",
            &pod_mac,
            "dev",
            &host_if,
            "nud",
            "permanent",
        ]);
        self.pods.push(Pod {
            name,
            ns,
            ip: addr,
            host_if,
        });
    }

    /// An "external" host on its own link to the node (node side `ext0`,
    /// 192.168.50.1/24; host 192.168.50.2, default route via the node).
    pub fn add_external(&self) -> NetNs {
        let ns = NetNs::create(&format!("{}-x", self.node.name().trim_end_matches("-n")))
            .expect("create external netns");
        let node = self.node.name();
        ip(&[
            "-n",
            node,
            "link",
            "add",
            "ext0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]);
        ip(&["-n", node, "addr", "add", "192.168.50.1/24", "dev", "ext0"]);
        ip(&["-n", node, "link", "set", "ext0", "up"]);
        ip(&[
            "-n",
            ns.name(),
            "addr",
            "add",
            "192.168.50.2/24",
            "dev",
            "eth0",
        ]);
        ip(&["-n", ns.name(), "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            ns.name(),
            "route",
            "add",
            "default",
            "via",
            "192.168.50.1",
        ]);
        ns
    }

    pub fn settings(&self) -> LbSettings {
        LbSettings {
            pin_root: self.pins.0.clone(),
            // Small maps: tests run in parallel on small machines.
            maglev_size: 1021,
            max_frontends: 64,
            max_backends: 1024,
            ct_entries: 16384,
            affinity_entries: 1024,
            ..LbSettings::default()
        }
    }

    /// Opens (or re-adopts) the datapath and attaches it to every pod.
    pub fn datapath(&self) -> KernelDatapath {
        self.datapath_with(self.settings())
    }

    pub fn datapath_with(&self, settings: LbSettings) -> KernelDatapath {
        let mut dp = KernelDatapath::open(settings)
            .expect("open the LB datapath (did `cargo xtask build-ebpf` run?)");
        self.node
            .run(|| {
                for p in &self.pods {
                    dp.attach_pod(&p.host_if).expect("attach pod hooks");
                }
            })
            .unwrap();
        dp
    }
}

/// Turns off TX checksum offload of `iface` in `ns` (`ethtool -K tx off`,
/// through the ioctl). A local socket's packets then carry full checksums.
/// Needed where `xdp_node` forwards them over veths: an XDP frame drops the
/// skb's "checksum still to be completed" state, which a NIC would never
/// hand to XDP in the first place.
pub fn tx_checksum_off(ns: &NetNs, iface: &str) {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    let iface = iface.to_owned();
    ns.run(move || {
        let mut value = EthtoolValue {
            cmd: ETHTOOL_STXCSUM,
            data: 0,
        };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: &mut value,
            _pad: [0; 16],
        };
        for (d, s) in req.name.iter_mut().zip(iface.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: plain socket/ioctl/close calls on a struct that lives
        // across them, laid out as the kernel's ifreq + ethtool_value.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(fd >= 0, "socket for SIOCETHTOOL");
            let rc = libc::ioctl(fd, SIOCETHTOOL, &mut req);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert!(rc == 0, "ethtool tx off on {iface}: {err}");
        }
    })
    .unwrap();
}

/// Attaches the object's `xdp_pass` to `iface` in `ns` (native mode), so
/// the veth accepts frames its peer transmits from XDP. The returned
/// object owns the attachment; dropping it detaches.
pub fn attach_xdp_pass(ns: &NetNs, iface: &str) -> aya::Ebpf {
    let bytes = skep_dataplane::object::bytes().expect("the eBPF object");
    let mut ebpf = aya::Ebpf::load(&bytes).expect("load the eBPF object");
    let iface = iface.to_owned();
    let prog: &mut aya::programs::Xdp = ebpf
        .program_mut(skep_ebpf_common::names::PROG_XDP_PASS)
        .expect("xdp_pass in the object")
        .try_into()
        .expect("xdp_pass is XDP");
    prog.load().expect("load xdp_pass");
    ns.run(|| {
        prog.attach(&iface, aya::programs::XdpMode::Driver)
            .expect("attach xdp_pass")
    })
    .unwrap();
    ebpf
}

/// Two nodes and an external client behind one router (its own
/// namespace; plain routing, so no bridge module is needed, which Debian's
/// 5.10 cloud kernel in `vm-test` lacks), for external traffic to backends
/// on another node:
///
/// * node 1 is `topo.node` (skep's datapath; `ext0` = 192.168.71.1/24),
/// * node 2 only routes: `eth0` = 192.168.72.1/24, one pod at 10.42.1.10
///   behind `vr0` (10.42.1.1/24); node 1 and the router route
///   10.42.1.0/24 towards it,
/// * the client is 192.168.73.1/24, with no route to pod addresses.
///
/// TX checksum offload is off on the client and on the remote pod, whose
/// packets `xdp_node` forwards (see [`tx_checksum_off`]).
pub struct Lan {
    pub client: NetNs,
    pub remote_pod: Pod,
    pub node2: NetNs,
    /// The router.
    pub lan: NetNs,
}

pub const NODE1_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 71, 1);
pub const NODE2_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 72, 1);
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 73, 1);
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 42, 1, 10);

fn forwarding_on(ns: &NetNs) {
    ns.run(|| {
        for (path, value) in [
            ("/proc/sys/net/ipv4/ip_forward", "1"),
            ("/proc/sys/net/ipv4/conf/all/rp_filter", "0"),
            ("/proc/sys/net/ipv4/conf/default/rp_filter", "0"),
        ] {
            std::fs::write(path, value).unwrap_or_else(|e| panic!("write {path}: {e}"));
        }
    })
    .unwrap();
}

impl Lan {
    pub fn new(topo: &Topology) -> Self {
        let base = topo.node.name().trim_end_matches("-n").to_owned();
        let lan = NetNs::create(&format!("{base}-l")).expect("create router netns");
        let node2 = NetNs::create(&format!("{base}-m")).expect("create node 2 netns");
        let client = NetNs::create(&format!("{base}-c")).expect("create client netns");
        let pod_ns = NetNs::create(&format!("{base}-r")).expect("create remote pod netns");
        forwarding_on(&lan);
        forwarding_on(&node2);
        for (port, ns, iface, addr) in [
            ("l1", topo.node.name(), "ext0", NODE1_ADDR),
            ("l2", node2.name(), "eth0", NODE2_ADDR),
            ("l3", client.name(), "eth0", CLIENT_ADDR),
        ] {
            ip(&[
                "-n",
                lan.name(),
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                iface,
                "netns",
                ns,
            ]);
            let [a, b, c, _] = addr.octets();
            let gw = Ipv4Addr::new(a, b, c, 254).to_string();
            ip(&[
                "-n",
                lan.name(),
                "addr",
                "add",
                &format!("{gw}/24"),
                "dev",
                port,
            ]);
            ip(&["-n", lan.name(), "link", "set", port, "up"]);
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", iface]);
            ip(&["-n", ns, "link", "set", iface, "up"]);
            if ns != topo.node.name() {
                ip(&["-n", ns, "route", "add", "default", "via", &gw]);
            }
        }
        ip(&[
            "-n",
            node2.name(),
            "link",
            "add",
            "vr0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod_ns.name(),
        ]);
        ip(&[
            "-n",
            node2.name(),
            "addr",
            "add",
            "10.42.1.1/24",
            "dev",
            "vr0",
        ]);
        ip(&["-n", node2.name(), "link", "set", "vr0", "up"]);
        ip(&[
            "-n",
            pod_ns.name(),
            "addr",
            "add",
            "10.42.1.10/24",
            "dev",
            "eth0",
        ]);
        ip(&["-n", pod_ns.name(), "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            pod_ns.name(),
            "route",
            "add",
            "default",
            "via",
            "10.42.1.1",
        ]);
        for (ns, via) in [
            (topo.node.name(), "192.168.71.254"),
            (lan.name(), "192.168.72.1"),
        ] {
            ip(&["-n", ns, "route", "add", "10.42.1.0/24", "via", via]);
        }
        // Node 1 reaches the client and node 2 through the router.
        for net in ["192.168.72.0/24", "192.168.73.0/24"] {
            ip(&[
                "-n",
                topo.node.name(),
                "route",
                "add",
                net,
                "via",
                "192.168.71.254",
            ]);
        }
        tx_checksum_off(&client, "eth0");
        tx_checksum_off(&pod_ns, "eth0");
        Self {
            client,
            remote_pod: Pod {
                name: "remote".into(),
                ns: pod_ns,
                ip: REMOTE_POD,
                host_if: "vr0".into(),
            },
            node2,
            lan,
        }
    }

    /// Lets node 1's `ext0` transmit from XDP (see [`attach_xdp_pass`]);
    /// keep the result for as long as it should.
    pub fn accept_xdp_frames(&self) -> aya::Ebpf {
        attach_xdp_pass(&self.lan, "l1")
    }
}
