#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `skep server --dns-listen`: Services created with kubectl resolve through
//! the server's DNS (plain UDP queries on loopback), and go away when
//! deleted.

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A loopback port free for both TCP and UDP (the DNS binds both).
fn free_port() -> u16 {
    loop {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = t.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An A query over UDP: (rcode, IPv4 answers).
fn query_a(dns: SocketAddr, name: &str) -> (u8, Vec<[u8; 4]>) {
    let id: u16 = 0x5ce9;
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.send_to(&q, dns).unwrap();
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf).unwrap();
    let r = &buf[..n];
    assert_eq!(&r[..2], &id.to_be_bytes());
    let rcode = r[3] & 0xf;
    let answers = u16::from_be_bytes([r[6], r[7]]);
    // Skip the echoed question, then read answers (owner is a pointer).
    let mut i = q.len();
    let mut out = Vec::new();
    for _ in 0..answers {
        while r[i] != 0 && r[i] & 0xc0 != 0xc0 {
            i += 1 + r[i] as usize;
        }
        i += if r[i] == 0 { 1 } else { 2 };
        let rtype = u16::from_be_bytes([r[i], r[i + 1]]);
        let len = u16::from_be_bytes([r[i + 8], r[i + 9]]) as usize;
        i += 10;
        if rtype == 1 && len == 4 {
            out.push([r[i], r[i + 1], r[i + 2], r[i + 3]]);
        }
        i += len;
    }
    (rcode, out)
}

#[test]
fn services_created_with_kubectl_resolve_through_the_server_dns() {
    let dir = tempfile::tempdir().unwrap();
    let api = free_port();
    let dns: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let _server = Killed(
        Command::new(env!("CARGO_BIN_EXE_skep"))
            .args(["server", "--no-agent", "--data-dir"])
            .arg(dir.path())
            .args(["--api-listen", &format!("127.0.0.1:{api}")])
            .args(["--dns-listen", &dns.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let kubeconfig = dir.path().join("kubeconfig.yaml");
    let kubectl = |args: &[&str]| {
        Command::new("kubectl")
            .env("KUBECONFIG", &kubeconfig)
            .args(args)
            .output()
            .unwrap()
    };
    let server_log = || std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
    // Ready when the built-in `kubernetes` Service resolves.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // query_a panics while nothing listens yet (ICMP refused).
        let up = kubeconfig.exists()
            && std::panic::catch_unwind(|| query_a(dns, "kubernetes.default.svc.cluster.local"))
                .is_ok_and(|(rc, a)| rc == 0 && a == [[10, 43, 0, 1]]);
        if up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server DNS not ready: {}",
            server_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let out = kubectl(&["create", "service", "clusterip", "dnsweb", "--tcp=80:8080"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created = Instant::now();
    let ip = String::from_utf8(
        kubectl(&["get", "svc", "dnsweb", "-o", "jsonpath={.spec.clusterIP}"]).stdout,
    )
    .unwrap();
    let want: std::net::Ipv4Addr = ip.trim().parse().unwrap();
    loop {
        let (rc, a) = query_a(dns, "dnsweb.default.svc.cluster.local");
        if rc == 0 && a == [want.octets()] {
            break;
        }
        assert!(
            created.elapsed() < Duration::from_secs(1),
            "rcode {rc}, answers {a:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "resolvable {:?} after kubectl create returned",
        created.elapsed()
    );

    let out = kubectl(&["delete", "service", "dnsweb"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deleted = Instant::now();
    while query_a(dns, "dnsweb.default.svc.cluster.local").0 != 3 {
        assert!(
            deleted.elapsed() < Duration::from_secs(1),
            "still resolves after delete"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
