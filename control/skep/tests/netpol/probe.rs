//! Real connections from inside pods' network namespaces: each probe runs
//! on its own thread that has joined the source pod's namespace (setns
//! changes only the calling thread), so a whole matrix is probed at once.

use std::{
    io::Read,
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

/// Per attempt; denied probes cost `TRIES` × this.
const TIMEOUT: Duration = Duration::from_millis(1000);
const TRIES: usize = 2;

fn enter(netns: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{netns}"))
        .unwrap_or_else(|e| panic!("open netns {netns}: {e}"));
    // SAFETY: setns on this thread only, with a valid namespace fd.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {netns}: {}", std::io::Error::last_os_error());
}

/// One attempt: the answer (the server's host name) or `None`.
fn attempt(proto: Proto, target: SocketAddr) -> Option<String> {
    match proto {
        Proto::Tcp => {
            let mut s = TcpStream::connect_timeout(&target, TIMEOUT).ok()?;
            s.set_read_timeout(Some(TIMEOUT)).ok()?;
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
        }
        Proto::Udp => {
            let s = UdpSocket::bind("0.0.0.0:0").ok()?;
            s.set_read_timeout(Some(TIMEOUT)).ok()?;
            s.send_to(b"probe\n", target).ok()?;
            let mut buf = [0u8; 256];
            let (n, _) = s.recv_from(&mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
        }
    }
}

/// Probes `target` from inside `netns`; `Some(answer)` when it answered
/// within `TRIES` attempts.
pub fn probe(netns: &str, proto: Proto, ip: Ipv4Addr, port: u16) -> Option<String> {
    enter(netns);
    let target = SocketAddr::from((ip, port));
    (0..TRIES).find_map(|_| attempt(proto, target))
}

/// Runs every (source netns, target) probe at once; results in input order.
pub fn probe_all(jobs: &[(String, Proto, Ipv4Addr, u16)]) -> Vec<Option<String>> {
    let handles: Vec<_> = jobs
        .iter()
        .cloned()
        .map(|(netns, proto, ip, port)| std::thread::spawn(move || probe(&netns, proto, ip, port)))
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("probe thread"))
        .collect()
}

/// Resolves `name` (type A) through the cluster DNS service 10.43.0.10
/// from inside `netns`; the first address of the answer.
pub fn dns_query(netns: &str, name: &str) -> Option<Ipv4Addr> {
    enter(netns);
    let mut q = vec![0x5c, 0xe9, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.send_to(&q, "10.43.0.10:53").ok()?;
    let mut buf = [0u8; 512];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    let r = &buf[..n];
    if r.len() < 12 || r[0..2] != q[0..2] || u16::from_be_bytes([r[6], r[7]]) == 0 {
        return None;
    }
    // Skip the question, then the first answer's name (a pointer or
    // labels), type, class, TTL, rdlength.
    let mut i = 12;
    while i < r.len() && r[i] != 0 {
        i += 1 + r[i] as usize;
    }
    i += 5;
    if i < r.len() && r[i] & 0xc0 == 0xc0 {
        i += 2;
    } else {
        while i < r.len() && r[i] != 0 {
            i += 1 + r[i] as usize;
        }
        i += 1;
    }
    i += 10;
    let a = r.get(i..i + 4)?;
    Some(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
}
