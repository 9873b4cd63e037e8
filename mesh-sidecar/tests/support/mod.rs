//! Test topology: pods as network namespaces joined by a veth pair, each
//! with its own tokio runtime whose threads live in the namespace (so
//! every socket its tasks open is the pod's), sidecars with certificates
//! from an in-test CA (the same issuing code as the server's), and a raw
//! AF_PACKET capture on the veth.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use skep_dataplane::netns::NetNs;
use skep_mesh_sidecar::{
    Certifier, IdentityStore, Issued, MeshCa, Seams, Sidecar, SidecarConfig,
    identity::{self, IdentityError},
    original_dst::{LocalAddrDst, PeerTable, StaticMeshedPeers},
};
use std::{
    fs::File,
    future::Future,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};

pub const TRUST_DOMAIN: &str = "cluster.local";

/// The in-test CA, certifying one fixed account per sidecar.
#[derive(Debug)]
pub struct TestCertifier {
    /// Swappable: a root rotation changes the CA under running sidecars.
    pub ca: Mutex<Arc<MeshCa>>,
    pub namespace: String,
    pub service_account: String,
}

#[async_trait::async_trait]
impl Certifier for TestCertifier {
    async fn certify(&self, csr_der: Vec<u8>) -> Result<Issued, IdentityError> {
        let ca = self.ca.lock().unwrap().clone();
        ca.issue(&csr_der, &self.namespace, &self.service_account)
            .map_err(|e| IdentityError::BadResponse(e.to_string()))
    }
}

/// A root generated in the test: (cert PEM, key PEM).
pub fn test_root() -> (String, String) {
    skep_mesh_sidecar::ca::generate_root(TRUST_DOMAIN).unwrap()
}

pub fn test_ca(lifetime: Duration) -> Arc<MeshCa> {
    let (cert, key) = skep_mesh_sidecar::ca::generate_root(TRUST_DOMAIN).unwrap();
    Arc::new(
        MeshCa::from_pem(&cert, &key, TRUST_DOMAIN)
            .unwrap()
            .with_lifetime(lifetime),
    )
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pod: a network namespace with a runtime inside it. The runtime is
/// dropped before the namespace (field order).
pub struct Pod {
    pub rt: tokio::runtime::Runtime,
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    pub ifname: String,
}

impl Pod {
    fn new(ns: NetNs, ip: Ipv4Addr, ifname: &str) -> Self {
        let file = Arc::new(File::open(ns.path()).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                // SAFETY: setns on the current thread with a valid nsfs fd.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            })
            .build()
            .unwrap();
        Pod {
            rt,
            ns,
            ip,
            ifname: ifname.to_owned(),
        }
    }

    /// Runs `fut` inside the pod (on its runtime's threads) and waits.
    pub fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let handle = self.rt.spawn(fut);
        self.rt.block_on(handle).unwrap()
    }
}

/// Two pods on 10.77.0.1/24 and 10.77.0.2/24 (addresses exist only inside
/// the test namespaces), joined by a veth.
pub fn two_pods(tag: &str) -> (Pod, Pod) {
    let pid = std::process::id();
    let a = NetNs::create(&format!("skep-mesh-{tag}-a-{pid}"))
        .expect("create a network namespace (run as root)");
    let b = NetNs::create(&format!("skep-mesh-{tag}-b-{pid}")).unwrap();
    ip(&[
        "-n",
        a.name(),
        "link",
        "add",
        "name",
        "mesha",
        "type",
        "veth",
        "peer",
        "name",
        "meshb",
        "netns",
        b.name(),
    ]);
    for (ns, dev, addr) in [(&a, "mesha", "10.77.0.1/24"), (&b, "meshb", "10.77.0.2/24")] {
        ip(&["-n", ns.name(), "addr", "add", addr, "dev", dev]);
        ip(&["-n", ns.name(), "link", "set", dev, "up"]);
    }
    (
        Pod::new(a, Ipv4Addr::new(10, 77, 0, 1), "mesha"),
        Pod::new(b, Ipv4Addr::new(10, 77, 0, 2), "meshb"),
    )
}

/// A sidecar running in a pod, with its capture seams.
pub struct Mesh {
    pub sidecar: Option<Sidecar>,
    pub identity: Arc<IdentityStore>,
    pub outbound_table: Arc<PeerTable>,
    pub inbound_table: Arc<PeerTable>,
    pub certifier: Arc<TestCertifier>,
    renewal: tokio::task::JoinHandle<()>,
}

pub struct SidecarOptions {
    pub config: SidecarConfig,
    pub namespace: &'static str,
    pub service_account: &'static str,
    pub meshed: Vec<Ipv4Addr>,
    /// Inbound redirection information (plaintext tests); else none.
    pub inbound_redirect: bool,
}

impl SidecarOptions {
    pub fn new(namespace: &'static str, service_account: &'static str) -> Self {
        let config = SidecarConfig {
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 15020)),
            ..SidecarConfig::default()
        };
        Self {
            config,
            namespace,
            service_account,
            meshed: Vec::new(),
            inbound_redirect: false,
        }
    }
}

pub fn start_sidecar(pod: &Pod, ca: &Arc<MeshCa>, opts: SidecarOptions) -> Mesh {
    let identity = IdentityStore::new();
    let outbound_table = Arc::new(PeerTable::default());
    let inbound_table = Arc::new(PeerTable::default());
    let certifier = Arc::new(TestCertifier {
        ca: Mutex::new(ca.clone()),
        namespace: opts.namespace.into(),
        service_account: opts.service_account.into(),
    });
    let seams = Seams {
        outbound_dst: outbound_table.clone(),
        inbound_dst: if opts.inbound_redirect {
            inbound_table.clone()
        } else {
            Arc::new(LocalAddrDst)
        },
        meshed: Arc::new(StaticMeshedPeers::hosts(opts.meshed)),
    };
    let (id, config, c) = (identity.clone(), opts.config, certifier.clone());
    let (sidecar, renewal) = pod.run(async move {
        let renewal = identity::spawn_renewal(id.clone(), c);
        let sidecar = Sidecar::start(config, id.clone(), seams).await.unwrap();
        let mut gen_rx = id.subscribe();
        tokio::time::timeout(Duration::from_secs(10), gen_rx.wait_for(|g| *g > 0))
            .await
            .expect("the sidecar gets a certificate")
            .unwrap();
        (sidecar, renewal)
    });
    Mesh {
        sidecar: Some(sidecar),
        identity,
        outbound_table,
        inbound_table,
        certifier,
        renewal,
    }
}

impl Mesh {
    pub fn sidecar(&self) -> &Sidecar {
        self.sidecar.as_ref().unwrap()
    }

    pub fn outbound(&self) -> SocketAddr {
        self.sidecar().outbound_addr()
    }

    pub fn admin(&self) -> SocketAddr {
        self.sidecar().admin_addr()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// What the eBPF capture will do: connect the app to the sidecar's
/// outbound port and record where it was going. Runs inside the pod.
pub async fn dial_captured(
    table: &PeerTable,
    outbound: SocketAddr,
    original: SocketAddrV4,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let SocketAddr::V4(local) = socket.local_addr()? else {
        unreachable!()
    };
    table.insert(local, original);
    socket.connect(outbound).await
}

/// Like [`dial_captured`] for a redirected inbound plaintext client: the
/// table is the destination sidecar's, keyed by the client's address.
pub async fn dial_redirected_inbound(
    table: &PeerTable,
    from: Ipv4Addr,
    sidecar_inbound: SocketAddr,
    original: SocketAddrV4,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    let SocketAddr::V4(local) = socket.local_addr()? else {
        unreachable!()
    };
    table.insert(local, original);
    socket.connect(sidecar_inbound).await
}

/// An echo server on `port`, inside the pod.
pub fn echo_server(pod: &Pod, port: u16) {
    pod.run(async move {
        let l = TcpListener::bind(("0.0.0.0", port)).await.unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    });
}

/// A keep-alive HTTP/1.1 server answering every request with `ok`.
pub fn http_server(pod: &Pod, port: u16) {
    pod.run(async move {
        let l = TcpListener::bind(("0.0.0.0", port)).await.unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(resp).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
    });
}

/// A server that speaks first: a banner on connect, then echo.
pub fn banner_server(pod: &Pod, port: u16) {
    pod.run(async move {
        let l = TcpListener::bind(("0.0.0.0", port)).await.unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let _ = s.write_all(b"220 banner ready\r\n").await;
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    });
}

/// Writes `msg` and reads the same number of bytes back.
pub async fn echo_once(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo in 5 s"))??;
    Ok(back)
}

/// GET on the admin port: (status line, body).
pub async fn admin_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: admin\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// The value of one metric line (exact labels), 0 when absent.
pub fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0)
}

/// A raw AF_PACKET capture of every frame on one interface of a pod.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    pub fn start(pod: &Pod) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let file = File::open(pod.ns.path()).unwrap();
        let ifname = std::ffi::CString::new(pod.ifname.clone()).unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            // SAFETY: plain syscalls on fds this thread owns; buffers are
            // valid for the lengths passed.
            unsafe {
                assert_eq!(libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET), 0);
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
                assert!(
                    fd >= 0,
                    "AF_PACKET socket: {}",
                    std::io::Error::last_os_error()
                );
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = libc::if_nametoindex(ifname.as_ptr()) as i32;
                assert!(sll.sll_ifindex > 0, "no interface {ifname:?}");
                let rc = libc::bind(
                    fd,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                ready_tx.send(()).unwrap();
                let mut frames = Vec::new();
                let mut buf = vec![0u8; 70_000];
                while !stop2.load(Ordering::Relaxed) {
                    let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                    if n > 0 {
                        frames.push(buf[..n as usize].to_vec());
                    }
                }
                libc::close(fd);
                frames
            }
        });
        ready_rx.recv().unwrap();
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns the TCP segments seen: (src port, dst port, payload).
    pub fn finish(mut self) -> Vec<(u16, u16, Vec<u8>)> {
        self.stop.store(true, Ordering::Relaxed);
        let frames = self.thread.take().unwrap().join().unwrap();
        frames.iter().filter_map(|f| tcp_payload(f)).collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn tcp_payload(frame: &[u8]) -> Option<(u16, u16, Vec<u8>)> {
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[9] != 6 || ip.len() < ihl + 20 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let tcp = &ip[ihl..total];
    let off = usize::from(tcp[12] >> 4) * 4;
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    Some((sport, dport, tcp.get(off..)?.to_vec()))
}

/// Whether `hay` contains `needle`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
