//! Test harness: a real SqliteStore holding objects as the API server
//! stores them, the DNS server on 127.0.0.1, a DNS client over real UDP and
//! TCP sockets, and a stub upstream on loopback (tests never leave the
//! machine).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use hickory_server::proto::{
    op::{Edns, Message, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata::A, rdata::SOA},
};
use serde_json::{Value, json};
use skep_dns::{DnsConfig, DnsServer};
use skep_store::{SqliteStore, Store};
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

pub struct Cluster {
    pub store: Arc<dyn Store>,
    pub dns: DnsServer,
    pub upstream: Option<Stub>,
    _dir: tempfile::TempDir,
}

pub fn service(ns: &str, name: &str, cluster_ip: &str, ports: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}")},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": ports},
    })
}

pub fn dual_stack_service(ns: &str, name: &str, ips: &[&str]) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "ClusterIP", "clusterIP": ips[0], "clusterIPs": ips,
                 "ipFamilies": ["IPv4", "IPv6"], "ports": [{"port": 80, "protocol": "TCP"}]},
    })
}

pub fn headless(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "ClusterIP", "clusterIP": "None", "clusterIPs": ["None"],
                 "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]},
    })
}

pub fn external(ns: &str, name: &str, target: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "ExternalName", "externalName": target},
    })
}

/// An endpoint: (address, ready, hostname).
pub fn slice(
    ns: &str,
    svc: &str,
    name: &str,
    eps: &[(&str, bool, Option<&str>)],
    ports: Value,
) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, ready, host)| {
            let mut e = json!({"addresses": [ip], "conditions": {"ready": ready}});
            if let Some(h) = host {
                e["hostname"] = json!(h);
            }
            e
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    })
}

pub fn pod(
    ns: &str,
    name: &str,
    ip: &str,
    hostname: Option<&str>,
    subdomain: Option<&str>,
) -> Value {
    let mut spec = json!({"containers": [{"name": "c", "image": "busybox"}]});
    if let Some(h) = hostname {
        spec["hostname"] = json!(h);
    }
    if let Some(s) = subdomain {
        spec["subdomain"] = json!(s);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

/// The store key kube-apiserver uses for an object.
pub fn key_of(v: &Value) -> String {
    let ns = v["metadata"]["namespace"].as_str().unwrap();
    let name = v["metadata"]["name"].as_str().unwrap();
    let res = match v["kind"].as_str().unwrap() {
        "Service" => "services",
        "EndpointSlice" => "discovery.k8s.io/endpointslices",
        "Pod" => "pods",
        k => panic!("unexpected kind {k}"),
    };
    format!("/registry/{res}/{ns}/{name}")
}

impl Cluster {
    pub async fn start(objects: &[Value]) -> Self {
        Self::start_with(objects, |_| {}).await
    }

    pub async fn start_with(objects: &[Value], tweak: impl FnOnce(&mut DnsConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(dir.path().join("state.db")).unwrap());
        for o in objects {
            store
                .create(&key_of(o), serde_json::to_vec(o).unwrap().into())
                .await
                .unwrap();
        }
        let upstream = Stub::start().await;
        let mut config = DnsConfig::new("127.0.0.1:0".parse().unwrap());
        config.forward.upstreams = vec![upstream.addr];
        config.udp_sockets = 2;
        tweak(&mut config);
        let dns = skep_dns::start(config, store.clone()).await.unwrap();
        let c = Self {
            store,
            dns,
            upstream: Some(upstream),
            _dir: dir,
        };
        c.wait_synced().await;
        c
    }

    pub async fn wait_synced(&self) {
        for _ in 0..200 {
            if self.dns.synced() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("DNS did not sync within 2 s");
    }

    pub fn addr(&self) -> SocketAddr {
        self.dns.local_addr()
    }

    pub async fn put(&self, v: &Value) {
        let key = key_of(v);
        let bytes = serde_json::to_vec(v).unwrap();
        match self.store.get(&key).await.unwrap() {
            Some(kv) => {
                self.store
                    .update(&key, bytes.into(), kv.mod_revision)
                    .await
                    .unwrap();
            }
            None => {
                self.store.create(&key, bytes.into()).await.unwrap();
            }
        }
    }

    pub async fn delete(&self, v: &Value) {
        self.store.delete(&key_of(v), None).await.unwrap();
    }

    /// Asks over UDP and TCP and checks both agree; returns the UDP reply.
    pub async fn both(&self, name: &str, qtype: RecordType) -> Message {
        let udp = ask(self.addr(), name, qtype, Transport::Udp, Some(4096))
            .await
            .0;
        let tcp = ask(self.addr(), name, qtype, Transport::Tcp, None).await.0;
        assert_eq!(
            udp.metadata.response_code, tcp.metadata.response_code,
            "{name} {qtype}"
        );
        assert_eq!(
            sorted(&udp.answers),
            sorted(&tcp.answers),
            "{name} {qtype}: UDP vs TCP"
        );
        assert_eq!(
            udp.authorities.len(),
            tcp.authorities.len(),
            "{name} {qtype}"
        );
        udp
    }

    /// Polls `name` until `ok` holds or `within` passes; returns the time it took.
    pub async fn eventually(
        &self,
        name: &str,
        qtype: RecordType,
        within: Duration,
        ok: impl Fn(&Message) -> bool,
    ) -> Duration {
        let start = std::time::Instant::now();
        loop {
            let m = ask(self.addr(), name, qtype, Transport::Udp, Some(1232))
                .await
                .0;
            if ok(&m) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "{name} {qtype}: not as expected within {within:?}: {m:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Transport {
    Udp,
    Tcp,
}

pub fn sorted(rs: &[Record]) -> Vec<String> {
    let mut v: Vec<String> = rs.iter().map(|r| r.to_string()).collect();
    v.sort();
    v
}

/// The records' data as strings (`10.43.0.20`, `0 100 80 web.default.svc.cluster.local.`).
pub fn data(rs: &[Record]) -> Vec<String> {
    let mut v: Vec<String> = rs.iter().map(|r| r.data.to_string()).collect();
    v.sort();
    v
}

/// A DNS query over a real socket. Returns the reply and its size in bytes.
pub async fn ask(
    addr: SocketAddr,
    name: &str,
    qtype: RecordType,
    transport: Transport,
    edns: Option<u16>,
) -> (Message, usize) {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    let bytes = m.to_vec().unwrap();
    let buf = exchange(addr, &bytes, transport)
        .await
        .unwrap_or_else(|| panic!("no answer to {name} {qtype} over {transport:?}"));
    let reply = Message::from_vec(&buf).unwrap();
    assert_eq!(reply.metadata.id, m.metadata.id);
    (reply, buf.len())
}

pub fn rcode(m: &Message) -> ResponseCode {
    m.metadata.response_code
}

pub fn has_soa(m: &Message) -> bool {
    m.authorities
        .iter()
        .any(|r| r.record_type() == RecordType::SOA)
}

/// A stub upstream resolver on 127.0.0.1 (UDP): `*.example.test` A
/// 192.0.2.1 (TTL 60), `big.example.test` 60 A records (needs TCP),
/// anything else NXDOMAIN with an SOA (minimum 30). Counts queries.
pub struct Stub {
    pub addr: SocketAddr,
    pub queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn stub_reply(req: &Message, tcp: bool) -> Message {
    let mut r = Message::response(req.metadata.id, req.metadata.op_code);
    r.metadata.recursion_available = true;
    r.metadata.recursion_desired = req.metadata.recursion_desired;
    let q = req.queries[0].clone();
    let name = q.name().to_ascii().to_ascii_lowercase();
    r.add_query(q.clone());
    if name == "big.example.test." && q.query_type() == RecordType::A {
        if !tcp {
            r.metadata.truncation = true;
            return r;
        }
        for i in 0..60u8 {
            r.add_answer(Record::from_rdata(
                q.name().clone(),
                60,
                RData::A(A::new(192, 0, 2, i)),
            ));
        }
    } else if name.ends_with(".example.test.") && q.query_type() == RecordType::A {
        r.add_answer(Record::from_rdata(
            q.name().clone(),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        ));
    } else {
        r.metadata.response_code = ResponseCode::NXDomain;
        let soa = SOA::new(
            Name::from_ascii("ns.test.").unwrap(),
            Name::from_ascii("hostmaster.test.").unwrap(),
            1,
            3600,
            600,
            86400,
            30,
        );
        r.add_authority(Record::from_rdata(
            Name::from_ascii("test.").unwrap(),
            300,
            RData::SOA(soa),
        ));
    }
    r
}

impl Stub {
    pub async fn start() -> Self {
        // One port for UDP and TCP; the UDP port the kernel picks may be
        // taken for TCP, so try a few.
        let (udp, tcp, addr) = 'found: {
            for _ in 0..50 {
                let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = tcp.local_addr().unwrap();
                if let Ok(udp) = UdpSocket::bind(addr).await {
                    break 'found (udp, tcp, addr);
                }
            }
            panic!("no loopback port free for both UDP and TCP");
        };
        let queries = Arc::new(AtomicUsize::new(0));
        let count = queries.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                tokio::select! {
                    r = udp.recv_from(&mut buf) => {
                        let Ok((n, from)) = r else { return };
                        let Ok(req) = Message::from_vec(&buf[..n]) else { continue };
                        count.fetch_add(1, Ordering::SeqCst);
                        let reply = stub_reply(&req, false).to_vec().unwrap();
                        let _ = udp.send_to(&reply, from).await;
                    }
                    c = tcp.accept() => {
                        let Ok((mut s, _)) = c else { return };
                        let count = count.clone();
                        tokio::spawn(async move {
                            let Ok(n) = s.read_u16().await else { return };
                            let mut b = vec![0u8; n.into()];
                            if s.read_exact(&mut b).await.is_err() { return }
                            let Ok(req) = Message::from_vec(&b) else { return };
                            count.fetch_add(1, Ordering::SeqCst);
                            let reply = stub_reply(&req, true).to_vec().unwrap();
                            let _ = s.write_all(&(reply.len() as u16).to_be_bytes()).await;
                            let _ = s.write_all(&reply).await;
                        });
                    }
                }
            }
        });
        Self {
            addr,
            queries,
            task,
        }
    }

    pub fn count(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

/// Sends raw DNS message bytes and returns the raw reply (None: no reply
/// within 5 s).
pub async fn exchange(addr: SocketAddr, bytes: &[u8], transport: Transport) -> Option<Vec<u8>> {
    tokio::time::timeout(Duration::from_secs(5), async {
        match transport {
            Transport::Udp => {
                let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                s.send_to(bytes, addr).await.unwrap();
                let mut buf = vec![0u8; 65535];
                let n = s.recv(&mut buf).await.unwrap();
                buf.truncate(n);
                buf
            }
            Transport::Tcp => {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(&(bytes.len() as u16).to_be_bytes())
                    .await
                    .unwrap();
                s.write_all(bytes).await.unwrap();
                let n = s.read_u16().await.unwrap();
                let mut buf = vec![0u8; n.into()];
                s.read_exact(&mut buf).await.unwrap();
                buf
            }
        }
    })
    .await
    .ok()
}

/// A plain HTTP/1.1 request over a real TCP connection; returns the status
/// code and the body.
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("HTTP reply within 5 s")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}
