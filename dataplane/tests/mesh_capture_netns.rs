//! [mesh] outbound capture: `mesh_connect4` attached to a cgroup v2
//! directory sends a TCP connect() of a process in it (inside pod 0's
//! namespace) to 127.0.0.1:15001 and records where it was going under the
//! socket's cookie, with a ClusterIP already translated to its backend; a
//! socket marked 0x5ce9 (the sidecar's) is not captured; after `detach`
//! nothing is. `mesh_getpeername4` makes a captured socket's getpeername()
//! answer the original destination (the ClusterIP it dialled, or the pod
//! address). Also runs inside Linux 5.10 (`cargo xtask vm-test`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::Topology;
use skep_dataplane::lb::{Endpoint, EndpointState, LoadBalancer, Protocol, Service, ServicePort};
use std::{
    ffi::CString,
    io::Read,
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 77);

/// A cgroup v2 directory of this test (and a cgroup2 mount when the host
/// has none, as in the 5.10 VM); removed on drop.
struct TestCgroup {
    dir: PathBuf,
    own_mount: Option<PathBuf>,
}

impl TestCgroup {
    fn create(name: &str) -> Self {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let existing = mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        });
        let (root, own_mount) = match existing {
            Some(r) => (r, None),
            None => {
                let m = PathBuf::from(format!("/tmp/skep-mesh-cg2-{}", std::process::id()));
                std::fs::create_dir_all(&m).unwrap();
                nix::mount::mount(
                    Some("cgroup2"),
                    &m,
                    Some("cgroup2"),
                    nix::mount::MsFlags::empty(),
                    None::<&str>,
                )
                .expect("mount cgroup2");
                (m.clone(), Some(m))
            }
        };
        let dir = root.join(name);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).expect("create the test cgroup");
        Self { dir, own_mount }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(m) = &self.own_mount {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(m);
        }
    }
}

/// What a forked client in the cgroup saw for one connect().
#[derive(Debug, Clone, Copy)]
struct Connected {
    /// errno of connect (0: connected).
    errno: i32,
    cookie: u64,
    local_port: u16,
    /// What getpeername() answered after the connect.
    peer: SocketAddrV4,
}

/// Forks a child that joins `cgroup`, enters `netns`, optionally marks its
/// socket, connects to `to`, writes one line and reports. Only raw
/// syscalls on memory prepared before the fork run in the child.
fn connect_from_cgroup(cgroup: &Path, netns: &Path, to: SocketAddrV4, mark: u32) -> Connected {
    let procs = CString::new(cgroup.join("cgroup.procs").to_string_lossy().as_bytes()).unwrap();
    let ns = std::fs::File::open(netns).unwrap();
    // SAFETY: open(2) of a prepared C string.
    let cg_fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    assert!(cg_fd >= 0, "open cgroup.procs");
    let mut pipe = [0i32; 2];
    // SAFETY: pipe(2) into a 2-element array.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let sa_len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let mut report = [0u8; 24];
    // SAFETY: fork(2); the child makes raw syscalls only and ends in _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: child side: async-signal-safe syscalls only.
        unsafe {
            if libc::write(cg_fd, b"0\n".as_ptr().cast(), 2) != 2 {
                libc::_exit(10);
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                libc::_exit(11);
            }
            let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if mark != 0 {
                libc::setsockopt(
                    s,
                    libc::SOL_SOCKET,
                    libc::SO_MARK,
                    (&raw const mark).cast(),
                    4,
                );
            }
            let tv = libc::timeval {
                tv_sec: 2,
                tv_usec: 0,
            };
            libc::setsockopt(
                s,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            let rc = libc::connect(s, (&raw const sa).cast(), sa_len);
            let errno = if rc == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            let mut cookie = 0u64;
            let mut clen = 8 as libc::socklen_t;
            libc::getsockopt(
                s,
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie).cast(),
                &mut clen,
            );
            let mut local: libc::sockaddr_in = std::mem::zeroed();
            let mut llen = sa_len;
            libc::getsockname(s, (&raw mut local).cast(), &mut llen);
            let mut peer: libc::sockaddr_in = std::mem::zeroed();
            let mut plen = sa_len;
            libc::getpeername(s, (&raw mut peer).cast(), &mut plen);
            if rc == 0 {
                libc::write(s, b"hello\n".as_ptr().cast(), 6);
            }
            report[0..4].copy_from_slice(&errno.to_ne_bytes());
            report[4..12].copy_from_slice(&cookie.to_ne_bytes());
            report[12..14].copy_from_slice(&u16::from_be(local.sin_port).to_ne_bytes());
            report[14..16].copy_from_slice(&u16::from_be(peer.sin_port).to_ne_bytes());
            report[16..20].copy_from_slice(&peer.sin_addr.s_addr.to_ne_bytes());
            if libc::write(pipe[1], report.as_ptr().cast(), 24) != 24 {
                libc::_exit(12);
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copies of the child's fds; waiting for our child.
    unsafe {
        libc::close(cg_fd);
        libc::close(pipe[1]);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "client child failed (status {status:#x})"
        );
    }
    let mut buf = [0u8; 24];
    // SAFETY: reading into our buffer; closing our fd.
    let n = unsafe { libc::read(pipe[0], buf.as_mut_ptr().cast(), 24) };
    // SAFETY: our fd.
    unsafe { libc::close(pipe[0]) };
    assert_eq!(n, 24, "short report from the child");
    Connected {
        errno: i32::from_ne_bytes(buf[0..4].try_into().unwrap()),
        cookie: u64::from_ne_bytes(buf[4..12].try_into().unwrap()),
        local_port: u16::from_ne_bytes(buf[12..14].try_into().unwrap()),
        peer: SocketAddrV4::new(
            Ipv4Addr::from(<[u8; 4]>::try_from(&buf[16..20]).unwrap()),
            u16::from_ne_bytes(buf[14..16].try_into().unwrap()),
        ),
    }
}

/// The next connection on the (non-blocking) capture listener, if one
/// arrives within a second: (peer port, first line).
fn accepted(l: &TcpListener) -> Option<(u16, String)> {
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        match l.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).unwrap_or(0);
                return Some((
                    peer.port(),
                    String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    None
}

#[test]
fn connect4_capture_redirects_records_and_exempts_the_sidecar() {
    let topo = Topology::new("meshcap", 2);
    let app = &topo.pods[0];
    let backend = &topo.pods[1];
    let _server = backend.tcp_server(8080);
    let dp = topo.datapath();
    let mut lb = LoadBalancer::new(dp).unwrap();
    lb.resync(vec![Service {
        name: "mesh/web".into(),
        vip: VIP,
        ports: vec![ServicePort {
            port: 80,
            protocol: Protocol::Tcp,
            target_port: 8080,
            node_port: None,
        }],
        endpoints: vec![Endpoint {
            addr: backend.ip,
            state: EndpointState::Ready,
            local: true,
        }],
        session_affinity: None,
        internal_traffic_local: false,
        external_traffic_local: false,
        external_ips: Vec::new(),
    }])
    .unwrap();
    let pins = topo.pins.0.clone();
    let cgroup = TestCgroup::create(&format!("skep-test-{}-meshcap", std::process::id()));
    skep_dataplane::mesh::attach(&pins, &cgroup.dir).expect("attach mesh_connect4");
    assert!(skep_dataplane::mesh::is_attached(&pins, &cgroup.dir));
    // Attaching again (a restarted agent) keeps one attachment.
    skep_dataplane::mesh::attach(&pins, &cgroup.dir).expect("re-attach");
    let mut pods = skep_dataplane::mesh::MeshPods::open(&pins).unwrap();
    pods.set(backend.ip, true).unwrap();
    assert_eq!(
        pods.list(),
        vec![skep_dataplane::mesh::MeshedPod {
            addr: backend.ip,
            strict: true
        }]
    );
    pods.remove(backend.ip).unwrap();
    assert!(pods.list().is_empty());

    // The "sidecar" listener in the app's namespace.
    let listener = app
        .ns
        .run(|| TcpListener::bind("127.0.0.1:15001"))
        .unwrap()
        .expect("bind 127.0.0.1:15001 in the pod");
    listener.set_nonblocking(true).unwrap();
    let netns = app.ns.path().to_owned();

    // 1. A ClusterIP: captured, recorded as the backend.
    let c = connect_from_cgroup(&cgroup.dir, &netns, SocketAddrV4::new(VIP, 80), 0);
    assert_eq!(c.errno, 0, "captured connect succeeds");
    let (peer_port, line) = accepted(&listener).expect("the connect arrived at 127.0.0.1:15001");
    assert_eq!(
        peer_port, c.local_port,
        "the accepted peer is the app socket"
    );
    assert_eq!(line, "hello");
    assert_eq!(
        skep_dataplane::mesh::original_dst(&pins, c.cookie).unwrap(),
        Some(SocketAddrV4::new(backend.ip, 8080)),
        "original destination recorded under the app socket's cookie, Service translated"
    );

    // 2. A pod address: recorded as is.
    let direct = SocketAddrV4::new(backend.ip, 8080);
    let c = connect_from_cgroup(&cgroup.dir, &netns, direct, 0);
    assert_eq!(c.errno, 0);
    assert!(accepted(&listener).is_some(), "pod address captured");
    assert_eq!(
        skep_dataplane::mesh::original_dst(&pins, c.cookie).unwrap(),
        Some(direct)
    );

    // 3. The sidecar's mark: not captured, reaches the backend itself.
    let c = connect_from_cgroup(&cgroup.dir, &netns, direct, 0x5ce9);
    assert_eq!(c.errno, 0, "marked connect reaches the backend");
    assert!(
        accepted(&listener).is_none(),
        "a marked socket must not be captured"
    );
    assert_eq!(
        skep_dataplane::mesh::original_dst(&pins, c.cookie).unwrap(),
        None
    );

    // 4. The sidecar's ports are never captured (nothing listens on the
    //    backend's 15006: refused, not redirected).
    let c = connect_from_cgroup(&cgroup.dir, &netns, SocketAddrV4::new(backend.ip, 15006), 0);
    assert_eq!(c.errno, libc::ECONNREFUSED, "15006 goes to the peer");
    assert!(accepted(&listener).is_none());

    // 5. Detached: nothing is captured any more.
    skep_dataplane::mesh::detach(&pins, &cgroup.dir).expect("detach");
    assert!(!skep_dataplane::mesh::is_attached(&pins, &cgroup.dir));
    let c = connect_from_cgroup(&cgroup.dir, &netns, direct, 0);
    assert_eq!(c.errno, 0);
    assert!(accepted(&listener).is_none(), "captured after detach");
}

/// The next connection on the (non-blocking) capture listener within a
/// second: its peer as the accepting side (the sidecar) sees it.
fn accepted_peer(l: &TcpListener) -> Option<std::net::SocketAddr> {
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        match l.accept() {
            Ok((_, peer)) => return Some(peer),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    None
}

/// `mesh_getpeername4`: a captured app socket's getpeername() answers the
/// original destination (the ClusterIP:port it dialled, or the pod
/// address), not 127.0.0.1:15001; sockets without a capture record (the
/// sidecar's marked ones, a direct connect to the sidecar) and the
/// sidecar's accepted side keep their real addresses.
#[test]
fn getpeername4_shows_the_original_destination() {
    let topo = Topology::new("meshpeer", 2);
    let app = &topo.pods[0];
    let backend = &topo.pods[1];
    let _server = backend.tcp_server(8080);
    let dp = topo.datapath();
    let mut lb = LoadBalancer::new(dp).unwrap();
    lb.resync(vec![Service {
        name: "mesh/web".into(),
        vip: VIP,
        ports: vec![ServicePort {
            port: 80,
            protocol: Protocol::Tcp,
            target_port: 8080,
            node_port: None,
        }],
        endpoints: vec![Endpoint {
            addr: backend.ip,
            state: EndpointState::Ready,
            local: true,
        }],
        session_affinity: None,
        internal_traffic_local: false,
        external_traffic_local: false,
        external_ips: Vec::new(),
    }])
    .unwrap();
    let pins = topo.pins.0.clone();
    let cgroup = TestCgroup::create(&format!("skep-test-{}-meshpeer", std::process::id()));
    skep_dataplane::mesh::attach(&pins, &cgroup.dir).expect("attach the mesh capture");
    assert!(
        skep_dataplane::mesh::getpeername_attached(&pins, &cgroup.dir),
        "mesh_getpeername4 must be attached with mesh_connect4 (the kernel needs ≥ 5.8; \
         uname -r: {})",
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default()
    );
    let listener = app
        .ns
        .run(|| TcpListener::bind("127.0.0.1:15001"))
        .unwrap()
        .expect("bind 127.0.0.1:15001 in the pod");
    listener.set_nonblocking(true).unwrap();
    let netns = app.ns.path().to_owned();
    let sidecar = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001);

    // 1. A ClusterIP: the app sees the ClusterIP:port; the sidecar's map
    //    holds the backend; the sidecar sees the app's real loopback tuple.
    let front = SocketAddrV4::new(VIP, 80);
    let c = connect_from_cgroup(&cgroup.dir, &netns, front, 0);
    assert_eq!(c.errno, 0, "captured connect succeeds");
    assert_eq!(
        c.peer, front,
        "getpeername() of a captured socket dialled to a ClusterIP"
    );
    assert_eq!(
        skep_dataplane::mesh::original_dst(&pins, c.cookie).unwrap(),
        Some(SocketAddrV4::new(backend.ip, 8080)),
        "the capture record (what the sidecar reads) is the backend"
    );
    assert_eq!(
        accepted_peer(&listener),
        Some(std::net::SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::LOCALHOST,
            c.local_port
        ))),
        "the sidecar's accepted socket shows the app socket's real address"
    );

    // 2. A pod address: the app sees it.
    let direct = SocketAddrV4::new(backend.ip, 8080);
    let c = connect_from_cgroup(&cgroup.dir, &netns, direct, 0);
    assert_eq!(c.errno, 0);
    assert_eq!(c.peer, direct, "getpeername() of a captured pod connection");
    assert!(accepted_peer(&listener).is_some(), "pod address captured");

    // 3. The sidecar's own (marked) socket is not captured and shows its
    //    real peer.
    let c = connect_from_cgroup(&cgroup.dir, &netns, direct, 0x5ce9);
    assert_eq!(c.errno, 0);
    assert_eq!(c.peer, direct);
    assert!(accepted_peer(&listener).is_none(), "marked socket captured");

    // 4. A socket that dials the sidecar's port itself has no record: its
    //    peer stays 127.0.0.1:15001.
    let c = connect_from_cgroup(&cgroup.dir, &netns, sidecar, 0);
    assert_eq!(c.errno, 0);
    assert_eq!(
        c.peer, sidecar,
        "an unrecorded socket must not be rewritten"
    );
    assert!(accepted_peer(&listener).is_some());

    // 5. Detached: both programs are gone.
    skep_dataplane::mesh::detach(&pins, &cgroup.dir).expect("detach");
    assert!(!skep_dataplane::mesh::getpeername_attached(
        &pins,
        &cgroup.dir
    ));
    let c = connect_from_cgroup(&cgroup.dir, &netns, direct, 0);
    assert_eq!(c.errno, 0);
    assert_eq!(c.peer, direct);
    assert!(accepted_peer(&listener).is_none(), "captured after detach");
}
