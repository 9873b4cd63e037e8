//! Socket-level load balancing for host processes: a process in the node
//! namespace, in a cgroup with the sock_addr hooks attached, reaches a
//! ClusterIP over TCP (connect4, getpeername4) and UDP (sendmsg4,
//! recvmsg4) without any per-packet NAT. The client runs in a forked child
//! so that only it joins the test's cgroup.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::Topology;
use skep_dataplane::lb::{
    Datapath, Endpoint, EndpointState, LoadBalancer, Protocol, Service, ServicePort,
};
use std::{
    ffi::CString,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 100);

/// A cgroup v2 directory of this test, removed on drop (and the cgroup2
/// mount, if the test had to make one: the 5.10 test VM has none).
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
            Some(root) => (root, None),
            None => {
                let m = PathBuf::from(format!("/tmp/skep-cgroup2-{}", std::process::id()));
                std::fs::create_dir_all(&m).unwrap();
                nix::mount::mount(
                    Some("cgroup2"),
                    &m,
                    Some("cgroup2"),
                    nix::mount::MsFlags::empty(),
                    None::<&str>,
                )
                .expect("mount cgroup2 (kernel without cgroup v2?)");
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

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
}

fn addr_of(sa: &libc::sockaddr_in) -> String {
    format!(
        "{}:{}",
        Ipv4Addr::from(sa.sin_addr.s_addr.to_ne_bytes()),
        u16::from_be(sa.sin_port)
    )
}

/// What the child saw.
#[derive(Debug)]
struct ChildReport {
    tcp_peer: String,
    tcp_reply: String,
    udp_from: String,
    udp_reply: String,
}

/// Forks a child that joins `cgroup`, enters the network namespace `netns`
/// and talks to VIP:80 (TCP) and VIP:53 (UDP). Only async-signal-safe
/// calls (raw syscalls on prepared buffers) run in the child.
fn run_child(cgroup: &Path, netns: &Path) -> ChildReport {
    let procs = CString::new(cgroup.join("cgroup.procs").to_string_lossy().as_bytes()).unwrap();
    let ns = std::fs::File::open(netns).unwrap();
    // SAFETY: plain open(2) of a prepared C string.
    let cg_fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    assert!(
        cg_fd >= 0,
        "open cgroup.procs: {}",
        std::io::Error::last_os_error()
    );
    let mut pipe = [0i32; 2];
    // SAFETY: pipe(2) into a 2-element array.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    let tcp_to = sockaddr(VIP, 80);
    let udp_to = sockaddr(VIP, 53);
    let sa_len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // Report layout: [tcp peer sockaddr][udp from sockaddr][tcp reply 64][udp reply 64]
    let mut report = [0u8; 2 * 16 + 128];

    // SAFETY: fork(2); the child below only makes raw syscalls on memory
    // prepared before the fork and ends with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: child side: async-signal-safe syscalls only.
        unsafe {
            if libc::write(cg_fd, b"0\n".as_ptr().cast(), 2) != 2 {
                libc::_exit(10);
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                libc::_exit(11);
            }
            // TCP: connect4 + getpeername4.
            let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if libc::connect(s, (&raw const tcp_to).cast(), sa_len) != 0 {
                libc::_exit(12);
            }
            let mut peer: libc::sockaddr_in = std::mem::zeroed();
            let mut len = sa_len;
            libc::getpeername(s, (&raw mut peer).cast(), &mut len);
            std::ptr::copy_nonoverlapping((&raw const peer).cast::<u8>(), report.as_mut_ptr(), 16);
            if libc::write(s, b"sock\n".as_ptr().cast(), 5) != 5 {
                libc::_exit(13);
            }
            let mut got = 0usize;
            while got < 64 {
                let n = libc::read(s, report.as_mut_ptr().add(32 + got).cast(), 64 - got);
                if n <= 0 {
                    break;
                }
                got += n as usize;
                if report[32 + got - 1] == b'\n' {
                    break;
                }
            }
            // UDP, unconnected: sendmsg4 + recvmsg4.
            let u = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            let tv = libc::timeval {
                tv_sec: 2,
                tv_usec: 0,
            };
            libc::setsockopt(
                u,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            if libc::sendto(
                u,
                b"udp".as_ptr().cast(),
                3,
                0,
                (&raw const udp_to).cast(),
                sa_len,
            ) != 3
            {
                libc::_exit(14);
            }
            let mut from: libc::sockaddr_in = std::mem::zeroed();
            let mut flen = sa_len;
            let n = libc::recvfrom(
                u,
                report.as_mut_ptr().add(96).cast(),
                64,
                0,
                (&raw mut from).cast(),
                &mut flen,
            );
            if n <= 0 {
                libc::_exit(15);
            }
            std::ptr::copy_nonoverlapping(
                (&raw const from).cast::<u8>(),
                report.as_mut_ptr().add(16),
                16,
            );
            if libc::write(pipe[1], report.as_ptr().cast(), report.len()) != report.len() as isize {
                libc::_exit(16);
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copies of fds the child uses.
    unsafe {
        libc::close(cg_fd);
        libc::close(pipe[1]);
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "client child failed (status {status:#x}; exit 12 = connect, 15 = no UDP reply)"
    );
    let mut buf = [0u8; 2 * 16 + 128];
    // SAFETY: reading into our buffer from the pipe.
    let n = unsafe { libc::read(pipe[0], buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: our fd.
    unsafe { libc::close(pipe[0]) };
    assert_eq!(n, buf.len() as isize, "short report from the child");
    // SAFETY: the child copied whole sockaddr_in values into these bytes.
    let (tcp_peer, udp_from): (libc::sockaddr_in, libc::sockaddr_in) = unsafe {
        (
            std::ptr::read_unaligned(buf.as_ptr().cast()),
            std::ptr::read_unaligned(buf.as_ptr().add(16).cast()),
        )
    };
    let text = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .trim_end_matches(['\0', '\n'])
            .to_owned()
    };
    ChildReport {
        tcp_peer: addr_of(&tcp_peer),
        tcp_reply: text(&buf[32..96]),
        udp_from: addr_of(&udp_from),
        udp_reply: text(&buf[96..160]),
    }
}

#[test]
fn host_processes_reach_services_through_socket_lb() {
    let topo = Topology::new("socklb", 3);
    // Gives the node an address for its own connections.
    let _external = topo.add_external();
    let backends = &topo.pods[1..];
    let _tcp: Vec<_> = backends.iter().map(|p| p.tcp_server(8080)).collect();
    let _udp: Vec<_> = backends.iter().map(|p| p.udp_server(5353)).collect();
    let cgroup = TestCgroup::create(&format!("skep-test-{}-socklb", std::process::id()));
    let mut dp = topo.datapath();
    dp.attach_cgroup(&cgroup.dir)
        .expect("attach the socket LB to the test cgroup");
    let mut lb = LoadBalancer::new(dp).unwrap();
    let port = |port, protocol, target_port| ServicePort {
        port,
        protocol,
        target_port,
        node_port: None,
    };
    lb.resync(vec![Service {
        name: "default/web".into(),
        vip: VIP,
        ports: vec![port(80, Protocol::Tcp, 8080), port(53, Protocol::Udp, 5353)],
        endpoints: backends
            .iter()
            .map(|p| Endpoint {
                addr: p.ip,
                state: EndpointState::Ready,
                local: true,
            })
            .collect(),
        session_affinity: None,
        internal_traffic_local: false,
        external_traffic_local: false,
        external_ips: Vec::new(),
    }])
    .unwrap();

    let netns = topo.node.path().to_owned();
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let r = run_child(&cgroup.dir, &netns);
        eprintln!("{r:?}");
        assert_eq!(
            r.tcp_peer, "10.43.0.100:80",
            "getpeername shows the frontend"
        );
        let (who, rest) = r.tcp_reply.split_once('@').expect("reply format");
        assert!(
            backends.iter().any(|p| p.name == who),
            "served by a backend: {r:?}"
        );
        assert_eq!(
            rest, "192.168.50.1 sock",
            "the backend sees the node's own address"
        );
        served.insert(who.to_owned());
        assert_eq!(
            r.udp_from, "10.43.0.100:53",
            "recvmsg shows the frontend as the source"
        );
        assert!(r.udp_reply.ends_with(" udp"), "{r:?}");
    }
    assert!(!served.is_empty());
    let counters = lb.datapath().counters().unwrap();
    assert!(counters.get("sock_lb") >= 12, "{counters:?}");
    // No per-packet NAT was involved.
    assert_eq!(counters.get("new_connection"), 0, "{counters:?}");
}
