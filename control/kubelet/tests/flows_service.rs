//! The flow observer for real: the tonic service on loopback over TLS (the
//! kubelet's serving certificate, client certificates from a test CA),
//! synthetic flows through its input channel, a real gRPC client — and the
//! API server's relay client against it. The kernel side that produces the
//! flows is tested with the dataplane.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use skep_kubelet::{
    flows::{
        self, DropReason, Flow, FlowObserver, FlowVerdict, FlowsConfig, Observation,
        proto::{
            self, FlowFilter, GetFlowsRequest, get_flows_response::Event,
            observer_client::ObserverClient,
        },
    },
    policy::{PodRef, PolicySnapshot},
};
use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsConnector;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(10);

/// A test CA and the client identities it signs.
struct Pki {
    ca_pem: String,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A client certificate and key (PEM).
struct Identity {
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    fn new(cn: &str) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = p.self_signed(&ca_key).unwrap();
        Self {
            ca_pem: ca_cert.pem(),
            ca_cert,
            ca_key,
        }
    }

    fn client(&self, cn: &str) -> Identity {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = p.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A running observer with its input and snapshot.
struct Node {
    observer: FlowObserver,
    input: mpsc::Sender<Flow>,
    snapshot: watch::Sender<Arc<PolicySnapshot>>,
    data_dir: tempfile::TempDir,
}

impl Node {
    async fn start(name: &str, pki: &Pki, snapshot: PolicySnapshot) -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        let (input, rx) = mpsc::channel(1024);
        let (snap_tx, snap_rx) = watch::channel(Arc::new(snapshot));
        let observer = flows::serve(
            FlowsConfig {
                node_name: name.into(),
                listen: "127.0.0.1:0".parse().unwrap(),
                cluster_ca_pem: pki.ca_pem.clone(),
                data_dir: data_dir.path().to_owned(),
                metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            },
            rx,
            snap_rx,
        )
        .await
        .expect("the flow observer starts on loopback");
        Self {
            observer,
            input,
            snapshot: snap_tx,
            data_dir,
        }
    }

    /// Feeds flows and waits until the observer has stored them.
    async fn feed(&self, flows: impl IntoIterator<Item = Flow>) {
        let before = self.observer.store().len();
        let mut n = 0;
        for f in flows {
            self.input.send(f).await.unwrap();
            n += 1;
        }
        let want = (before + n).min(flows::RING_CAPACITY);
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.observer.store().len() < want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the observer stored {} of {want} flows within {WAIT:?}",
                self.observer.store().len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn addr(&self) -> SocketAddr {
        self.observer.local_addr()
    }
}

/// Dials the observer over TLS, trusting the kubelet's serving certificate
/// in `data_dir` and presenting `identity` (or no certificate).
#[derive(Clone)]
struct Dialer {
    addr: SocketAddr,
    connector: TlsConnector,
}

type Conn = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower_service::Service<http::Uri> for Dialer {
    type Response = Conn;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let (addr, connector) = (self.addr, self.connector.clone());
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            Ok(hyper_util::rt::TokioIo::new(
                connector.connect(name, tcp).await?,
            ))
        })
    }
}

fn tls_client(data_dir: &Path, identity: Option<&Identity>) -> TlsConnector {
    let serving = std::fs::read(data_dir.join("kubelet-serving.crt"))
        .expect("the observer serves the kubelet's serving certificate from the data dir");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &serving[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(
                rustls_pemfile::certs(&mut id.cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                rustls_pemfile::private_key(&mut id.key_pem.as_bytes())
                    .unwrap()
                    .unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    TlsConnector::from(Arc::new(config))
}

async fn client(node: &Node, identity: Option<&Identity>) -> ObserverClient<Channel> {
    let channel = tonic::transport::Endpoint::from_static("http://observer.test")
        .connect_with_connector(Dialer {
            addr: node.addr(),
            connector: tls_client(node.data_dir.path(), identity),
        })
        .await
        .expect("connecting to the observer");
    ObserverClient::new(channel)
}

/// The history of a non-follow request (which must end after its marker).
async fn query(
    c: &mut ObserverClient<Channel>,
    req: GetFlowsRequest,
) -> Result<Vec<proto::Flow>, tonic::Status> {
    let mut stream = c.get_flows(req).await?.into_inner();
    let mut out = Vec::new();
    let mut ended = false;
    while let Some(msg) = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the observer answers")?
    {
        match msg.event {
            Some(Event::Flow(f)) => {
                assert!(!ended, "a flow after the history's end");
                out.push(f)
            }
            Some(Event::HistoryEnd(_)) => ended = true,
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert!(ended, "the history ends with a HistoryEnd marker");
    Ok(out)
}

fn filtered(filter: FlowFilter) -> GetFlowsRequest {
    GetFlowsRequest {
        filter: Some(filter),
        ..Default::default()
    }
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

const XA: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 10);
const YB: Ipv4Addr = Ipv4Addr::new(10, 42, 1, 20);
const WORLD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 50);
const ID_XA: u32 = 300;
const ID_YB: u32 = 301;
const POLICY_ALLOW: u32 = 7;
const POLICY_DENY: u32 = 8;

fn snapshot() -> PolicySnapshot {
    let mut s = PolicySnapshot::default();
    for (ip, ns, name) in [(XA, "x", "a"), (YB, "y", "b")] {
        s.pods_by_ip.insert(
            ip,
            PodRef {
                namespace: ns.into(),
                name: name.into(),
                node: "n1".into(),
            },
        );
    }
    s.identities.insert(
        ID_XA,
        vec![
            "k8s:io.kubernetes.pod.namespace=x".into(),
            "k8s:pod=a".into(),
        ],
    );
    s.identities.insert(
        ID_YB,
        vec![
            "k8s:io.kubernetes.pod.namespace=y".into(),
            "k8s:pod=b".into(),
        ],
    );
    s.identities.insert(2, vec!["reserved:world".into()]);
    s.policy_names.insert(POLICY_ALLOW, "y/allow-x".into());
    s.policy_names.insert(POLICY_DENY, "y/deny-world".into());
    s
}

#[allow(clippy::too_many_arguments)]
fn flow(
    secs: u64,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    proto: u8,
    verdict: FlowVerdict,
    reason: DropReason,
) -> Flow {
    let identity = |ip| match ip {
        XA => ID_XA,
        YB => ID_YB,
        _ => 2,
    };
    Flow {
        time: at(secs),
        src,
        dst,
        sport,
        dport,
        service: None,
        proto,
        tcp_flags: if proto == 6 { 0x02 } else { 0 },
        verdict,
        drop_reason: reason,
        observation: Observation::ToPod,
        src_identity: identity(src),
        dst_identity: identity(dst),
        policy_id: 0,
        ifindex: 4,
    }
}

/// x/a → y/b TCP 80 allowed by policy (via a service), world → y/b TCP 80
/// denied, y/b → x/a UDP 53 forwarded (no policy), the host probing y/b.
fn sample() -> Vec<Flow> {
    let mut allowed = flow(
        100,
        XA,
        40000,
        YB,
        80,
        6,
        FlowVerdict::Forwarded,
        DropReason::None,
    );
    allowed.policy_id = POLICY_ALLOW;
    allowed.service = Some((VIP, 8080));
    allowed.observation = Observation::FromPod;
    let mut denied = flow(
        200,
        WORLD,
        50000,
        YB,
        80,
        6,
        FlowVerdict::Dropped,
        DropReason::PolicyIngress,
    );
    denied.policy_id = POLICY_DENY;
    let dns = flow(
        300,
        YB,
        41000,
        XA,
        53,
        17,
        FlowVerdict::Forwarded,
        DropReason::None,
    );
    let mut probe = flow(
        400,
        Ipv4Addr::new(10, 42, 1, 1),
        42000,
        YB,
        8080,
        6,
        FlowVerdict::Forwarded,
        DropReason::None,
    );
    probe.policy_id = u32::MAX;
    probe.tcp_flags = 0x12;
    vec![allowed, denied, dns, probe]
}

fn times(flows: &[proto::Flow]) -> Vec<u64> {
    flows
        .iter()
        .map(|f| (f.time_unix_nanos / 1_000_000_000) as u64)
        .collect()
}

#[tokio::test]
async fn history_is_enriched_and_in_order() {
    let pki = Pki::new("test CA");
    let node = Node::start("n1", &pki, snapshot()).await;
    node.feed(sample()).await;
    let apiserver = pki.client("skep:apiserver");
    let mut c = client(&node, Some(&apiserver)).await;
    let got = query(&mut c, GetFlowsRequest::default()).await.unwrap();
    assert_eq!(times(&got), [100, 200, 300, 400]);

    let allowed = &got[0];
    assert_eq!(allowed.node_name, "n1");
    assert_eq!(allowed.time_unix_nanos, 100_000_000_000);
    assert_eq!(allowed.verdict, proto::Verdict::Forwarded as i32);
    assert_eq!(allowed.drop_reason, proto::DropReason::Unspecified as i32);
    assert_eq!(allowed.observation, proto::Observation::FromPod as i32);
    assert_eq!(allowed.protocol, 6);
    assert_eq!(allowed.tcp_flags, ["SYN"]);
    assert_eq!(allowed.policy_name, "y/allow-x");
    assert_eq!(allowed.policy_id, POLICY_ALLOW);
    assert_eq!(allowed.ifindex, 4);
    let src = allowed.source.as_ref().unwrap();
    assert_eq!(
        (
            src.ip.as_str(),
            src.port,
            src.namespace.as_str(),
            src.pod.as_str()
        ),
        ("10.42.0.10", 40000, "x", "a")
    );
    assert_eq!(src.identity, ID_XA);
    assert_eq!(
        src.labels,
        ["k8s:io.kubernetes.pod.namespace=x", "k8s:pod=a"]
    );
    let dst = allowed.destination.as_ref().unwrap();
    assert_eq!(
        (dst.namespace.as_str(), dst.pod.as_str(), dst.port),
        ("y", "b", 80)
    );
    let svc = allowed.service.as_ref().unwrap();
    assert_eq!((svc.ip.as_str(), svc.port), ("10.43.0.50", 8080));

    let denied = &got[1];
    assert_eq!(denied.verdict, proto::Verdict::Dropped as i32);
    assert_eq!(
        denied.drop_reason,
        proto::DropReason::PolicyDeniedIngress as i32
    );
    assert_eq!(denied.observation, proto::Observation::ToPod as i32);
    assert_eq!(denied.policy_name, "y/deny-world");
    let world = denied.source.as_ref().unwrap();
    assert_eq!((world.ip.as_str(), world.pod.as_str()), ("192.0.2.7", ""));
    assert_eq!(world.labels, ["reserved:world"]);

    // UDP: no TCP flags; no policy decided: no name.
    assert!(got[2].tcp_flags.is_empty());
    assert_eq!(got[2].policy_name, "");
    // The node's own traffic.
    assert_eq!(got[3].policy_name, "host");
    assert_eq!(got[3].tcp_flags, ["SYN", "ACK"]);

    // Names are those of the moment the flow arrived: a pod renamed later
    // does not rewrite the history, new flows get the new name.
    let mut renamed = snapshot();
    renamed.pods_by_ip.get_mut(&XA).unwrap().name = "a2".into();
    node.snapshot.send(Arc::new(renamed)).unwrap();
    node.feed([flow(
        500,
        XA,
        1,
        YB,
        80,
        6,
        FlowVerdict::Forwarded,
        DropReason::None,
    )])
    .await;
    let got = query(&mut c, GetFlowsRequest::default()).await.unwrap();
    assert_eq!(got[0].source.as_ref().unwrap().pod, "a");
    assert_eq!(got[4].source.as_ref().unwrap().pod, "a2");
}

#[tokio::test]
async fn every_filter_selects_its_flows() {
    let pki = Pki::new("test CA");
    let node = Node::start("n1", &pki, snapshot()).await;
    node.feed(sample()).await;
    let mut c = client(&node, Some(&pki.client("skep:apiserver"))).await;
    let cases: Vec<(&str, FlowFilter, Vec<u64>)> = vec![
        ("no filter", FlowFilter::default(), vec![100, 200, 300, 400]),
        (
            "namespace x",
            FlowFilter {
                namespace: "x".into(),
                ..Default::default()
            },
            vec![100, 300],
        ),
        (
            "pod x/a",
            FlowFilter {
                pod: "x/a".into(),
                ..Default::default()
            },
            vec![100, 300],
        ),
        (
            "pod b in namespace x (none)",
            FlowFilter {
                namespace: "x".into(),
                pod: "b".into(),
                ..Default::default()
            },
            vec![],
        ),
        (
            "from x/a",
            FlowFilter {
                from: "x/a".into(),
                ..Default::default()
            },
            vec![100],
        ),
        (
            "from pod name a",
            FlowFilter {
                from: "a".into(),
                ..Default::default()
            },
            vec![100],
        ),
        (
            "from IP",
            FlowFilter {
                from: "192.0.2.7".into(),
                ..Default::default()
            },
            vec![200],
        ),
        (
            "from CIDR",
            FlowFilter {
                from: "10.42.1.0/24".into(),
                ..Default::default()
            },
            vec![300, 400],
        ),
        (
            "from label",
            FlowFilter {
                from: "pod=b".into(),
                ..Default::default()
            },
            vec![300],
        ),
        (
            "to y/b",
            FlowFilter {
                to: "y/b".into(),
                ..Default::default()
            },
            vec![100, 200, 400],
        ),
        (
            "to label with prefix",
            FlowFilter {
                to: "k8s:io.kubernetes.pod.namespace=x".into(),
                ..Default::default()
            },
            vec![300],
        ),
        (
            "verdict DROPPED",
            FlowFilter {
                verdict: proto::Verdict::Dropped as i32,
                ..Default::default()
            },
            vec![200],
        ),
        (
            "verdict FORWARDED",
            FlowFilter {
                verdict: proto::Verdict::Forwarded as i32,
                ..Default::default()
            },
            vec![100, 300, 400],
        ),
        (
            "UDP",
            FlowFilter {
                protocol: 17,
                ..Default::default()
            },
            vec![300],
        ),
        (
            "port 80",
            FlowFilter {
                port: 80,
                ..Default::default()
            },
            vec![100, 200],
        ),
        (
            "source port 41000",
            FlowFilter {
                port: 41000,
                ..Default::default()
            },
            vec![300],
        ),
        (
            "to y/b, TCP, forwarded, port 8080",
            FlowFilter {
                to: "y/b".into(),
                protocol: 6,
                verdict: proto::Verdict::Forwarded as i32,
                port: 8080,
                ..Default::default()
            },
            vec![400],
        ),
    ];
    for (what, filter, want) in cases {
        let got = query(&mut c, filtered(filter)).await.unwrap();
        assert_eq!(times(&got), want, "{what}");
    }
    for bad in [
        FlowFilter {
            from: "not a peer!".into(),
            ..Default::default()
        },
        FlowFilter {
            to: "10.0.0.0/99".into(),
            ..Default::default()
        },
        FlowFilter {
            pod: "app=web".into(),
            ..Default::default()
        },
        FlowFilter {
            verdict: 9,
            ..Default::default()
        },
    ] {
        let err = query(&mut c, filtered(bad.clone())).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}: {err}");
    }
}

#[tokio::test]
async fn since_first_and_last_bound_the_history() {
    let pki = Pki::new("test CA");
    let node = Node::start("n1", &pki, snapshot()).await;
    node.feed(sample()).await;
    let mut c = client(&node, Some(&pki.client("skep:apiserver"))).await;
    let req = |since: u64, first: u32, last: u32| GetFlowsRequest {
        since_unix_nanos: (since * 1_000_000_000) as i64,
        first,
        last,
        ..Default::default()
    };
    assert_eq!(
        times(&query(&mut c, req(200, 0, 0)).await.unwrap()),
        [200, 300, 400]
    );
    assert_eq!(
        times(&query(&mut c, req(401, 0, 0)).await.unwrap()),
        Vec::<u64>::new()
    );
    assert_eq!(
        times(&query(&mut c, req(0, 2, 0)).await.unwrap()),
        [100, 200]
    );
    assert_eq!(
        times(&query(&mut c, req(0, 0, 3)).await.unwrap()),
        [200, 300, 400]
    );
    assert_eq!(
        times(&query(&mut c, req(300, 0, 5)).await.unwrap()),
        [300, 400]
    );
    let err = query(&mut c, req(0, 1, 1)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn the_ring_keeps_the_last_8192() {
    let pki = Pki::new("test CA");
    let node = Node::start("n1", &pki, snapshot()).await;
    let total = flows::RING_CAPACITY as u64 + 100;
    node.feed((0..total).map(|i| {
        flow(
            1000 + i,
            XA,
            1,
            YB,
            80,
            6,
            FlowVerdict::Forwarded,
            DropReason::None,
        )
    }))
    .await;
    // The counters saw all of them; the ring keeps the newest.
    let deadline = tokio::time::Instant::now() + WAIT;
    while node
        .observer
        .store()
        .history()
        .last()
        .map(|f| f.time_unix_nanos)
        != Some(((1000 + total - 1) * 1_000_000_000) as i64)
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut c = client(&node, Some(&pki.client("skep:apiserver"))).await;
    let got = query(&mut c, GetFlowsRequest::default()).await.unwrap();
    assert_eq!(got.len(), flows::RING_CAPACITY);
    assert_eq!(times(&got)[0], 1100);
    assert_eq!(
        node.observer
            .metrics()
            .get(FlowVerdict::Forwarded, DropReason::None, Observation::ToPod),
        total
    );
}

#[tokio::test]
async fn follow_sends_history_then_live_flows() {
    let pki = Pki::new("test CA");
    let node = Node::start("n1", &pki, snapshot()).await;
    node.feed(sample()).await;
    let mut c = client(&node, Some(&pki.client("skep:apiserver"))).await;
    let mut stream = c
        .get_flows(GetFlowsRequest {
            follow: true,
            since_unix_nanos: 150_000_000_000,
            filter: Some(FlowFilter {
                to: "y/b".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("a follower gets the next event in time")
            .unwrap()
            .expect("a follow stream stays open")
            .event
            .unwrap()
    };
    let mut history = Vec::new();
    loop {
        match next().await {
            Event::Flow(f) => history.push(f),
            Event::HistoryEnd(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(times(&history), [200, 400]);
    // Live: one that does not match (to x/a), then two that do.
    node.input
        .send(flow(
            600,
            YB,
            1,
            XA,
            80,
            6,
            FlowVerdict::Forwarded,
            DropReason::None,
        ))
        .await
        .unwrap();
    node.input
        .send(flow(
            601,
            XA,
            2,
            YB,
            81,
            6,
            FlowVerdict::Dropped,
            DropReason::PolicyEgress,
        ))
        .await
        .unwrap();
    node.input
        .send(flow(
            602,
            XA,
            3,
            YB,
            82,
            17,
            FlowVerdict::Forwarded,
            DropReason::None,
        ))
        .await
        .unwrap();
    let Event::Flow(a) = next().await else {
        panic!("expected a flow")
    };
    let Event::Flow(b) = next().await else {
        panic!("expected a flow")
    };
    assert_eq!(times(&[a.clone(), b.clone()]), [601, 602]);
    assert_eq!(a.drop_reason, proto::DropReason::PolicyDeniedEgress as i32);
    assert_eq!(b.protocol, 17);
}

#[tokio::test]
async fn only_the_api_server_may_read_flows() {
    let pki = Pki::new("test CA");
    let node = Node::start("n1", &pki, snapshot()).await;
    node.feed(sample()).await;

    // No client certificate.
    let mut c = client(&node, None).await;
    let err = query(&mut c, GetFlowsRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert!(err.message().contains("skep:apiserver"), "{err}");

    // The cluster CA's, but another identity (a node, a user).
    let mut c = client(&node, Some(&pki.client("system:node:n2"))).await;
    let err = query(&mut c, GetFlowsRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("system:node:n2"), "{err}");

    // The right CN from another CA: the handshake itself fails.
    let other = Pki::new("another CA");
    let forged = other.client("skep:apiserver");
    let connect = tonic::transport::Endpoint::from_static("http://observer.test")
        .connect_with_connector(Dialer {
            addr: node.addr(),
            connector: tls_client(node.data_dir.path(), Some(&forged)),
        })
        .await;
    match connect {
        Err(_) => {}
        Ok(channel) => {
            let err = query(
                &mut ObserverClient::new(channel),
                GetFlowsRequest::default(),
            )
            .await
            .expect_err("a certificate of another CA is refused");
            assert_ne!(err.code(), tonic::Code::Ok);
        }
    }

    // The real caller still gets through.
    let mut c = client(&node, Some(&pki.client("skep:apiserver"))).await;
    assert_eq!(
        query(&mut c, GetFlowsRequest::default())
            .await
            .unwrap()
            .len(),
        4
    );
}

#[tokio::test]
async fn metrics_count_flows_by_verdict_reason_and_observation() {
    let pki = Pki::new("test CA");
    let node = Node::start("n1", &pki, snapshot()).await;
    node.feed(sample()).await;
    node.feed([
        flow(
            500,
            XA,
            1,
            YB,
            80,
            6,
            FlowVerdict::Dropped,
            DropReason::PolicyIngress,
        ),
        flow(
            501,
            XA,
            1,
            VIP,
            80,
            6,
            FlowVerdict::Dropped,
            DropReason::NoBackend,
        ),
    ])
    .await;
    let m = node.observer.metrics();
    assert_eq!(
        m.get(
            FlowVerdict::Dropped,
            DropReason::PolicyIngress,
            Observation::ToPod
        ),
        2
    );
    assert_eq!(
        m.get(
            FlowVerdict::Dropped,
            DropReason::NoBackend,
            Observation::ToPod
        ),
        1
    );
    assert_eq!(
        m.get(FlowVerdict::Forwarded, DropReason::None, Observation::ToPod),
        2
    );
    assert_eq!(
        m.get(
            FlowVerdict::Forwarded,
            DropReason::None,
            Observation::FromPod
        ),
        1
    );

    // The same over HTTP, in Prometheus' text format.
    let addr = node
        .observer
        .metrics_addr()
        .expect("metrics listener bound");
    let text = http_get(addr, "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("# TYPE skep_flows_total counter"), "{text}");
    for line in [
        r#"skep_flows_total{verdict="dropped",reason="policy_denied_ingress",observation="to_pod"} 2"#,
        r#"skep_flows_total{verdict="dropped",reason="no_backend",observation="to_pod"} 1"#,
        r#"skep_flows_total{verdict="forwarded",reason="none",observation="to_pod"} 2"#,
        r#"skep_flows_total{verdict="forwarded",reason="none",observation="from_pod"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
    }
    let other = http_get(addr, "/").await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

/// The API server's relay client (its TLS identity, its own decoding of
/// the messages) against two real observers and a node that is down.
#[tokio::test]
async fn the_relay_merges_nodes_and_reports_the_unreachable() {
    use skep_apiserver::flows_relay::{FlowsRelay, Merge, NodeEvent, pb};
    let pki = Pki::new("test CA");
    let n1 = Node::start("n1", &pki, snapshot()).await;
    let n2 = Node::start("n2", &pki, snapshot()).await;
    n1.feed(sample()).await;
    n2.feed([
        flow(
            150,
            WORLD,
            1,
            XA,
            80,
            6,
            FlowVerdict::Dropped,
            DropReason::PolicyIngress,
        ),
        flow(
            350,
            XA,
            1,
            WORLD,
            443,
            6,
            FlowVerdict::Forwarded,
            DropReason::None,
        ),
    ])
    .await;
    let apiserver = pki.client("skep:apiserver");
    let dir = tempfile::tempdir().unwrap();
    let relay = FlowsRelay::new(&skep_apiserver::pki::Credentials {
        ca_cert_pem: pki.ca_pem.clone(),
        server_cert_pem: String::new(),
        server_key_pem: String::new(),
        kubelet_client_cert_pem: apiserver.cert_pem.clone(),
        kubelet_client_key_pem: apiserver.key_pem.clone(),
        admin_token: String::new(),
        node_token: String::new(),
        kubeconfig_path: dir.path().join("kubeconfig"),
    })
    .unwrap();
    // A port nothing listens on.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let req = pb::GetFlowsRequest {
        follow: true,
        filter: Some(pb::FlowFilter {
            protocol: 6,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (tx, mut rx) = mpsc::channel(64);
    let mut merge = Merge::new(["n1".into(), "n2".into(), "n3".into()], 0, 0);
    for (name, addr) in [("n1", n1.addr()), ("n2", n2.addr()), ("n3", down)] {
        let (relay, req, tx) = (relay.clone(), req.clone(), tx.clone());
        tokio::spawn(async move { relay.read_node(name, addr, req, tx).await });
    }
    let mut lines = Vec::new();
    while lines
        .iter()
        .filter(|l: &&serde_json::Value| l["type"] == "FLOW")
        .count()
        < 5
    {
        let ev = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("the relay reads the nodes in time")
            .unwrap();
        lines.extend(merge.on(ev));
    }
    let errors: Vec<_> = lines.iter().filter(|l| l["type"] == "ERROR").collect();
    assert_eq!(errors.len(), 1, "{lines:?}");
    assert_eq!(errors[0]["object"]["node"], "n3");
    let message = errors[0]["object"]["error"].as_str().unwrap();
    assert!(message.contains("node n3"), "{message}");
    let flows: Vec<_> = lines
        .iter()
        .filter(|l| l["type"] == "FLOW")
        .map(|l| &l["object"])
        .collect();
    let seen: Vec<(String, String)> = flows
        .iter()
        .map(|f| {
            (
                f["node"].as_str().unwrap().to_owned(),
                f["time"].as_str().unwrap()[11..19].to_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("n1".to_owned(), "00:01:40".to_owned()),
            ("n2".to_owned(), "00:02:30".to_owned()),
            ("n1".to_owned(), "00:03:20".to_owned()),
            ("n2".to_owned(), "00:05:50".to_owned()),
            ("n1".to_owned(), "00:06:40".to_owned()),
        ]
    );
    // The JSON a client sees, decoded by the relay's own messages.
    let first = flows[0];
    assert_eq!(first["verdict"], "FORWARDED");
    assert_eq!(first["protocol"], "TCP");
    assert_eq!(first["source"]["namespace"], "x");
    assert_eq!(first["source"]["pod"], "a");
    assert_eq!(first["destination"]["pod"], "b");
    assert_eq!(first["service"]["ip"], "10.43.0.50");
    assert_eq!(first["policy"], "y/allow-x");
    assert_eq!(first["tcp_flags"][0], "SYN");
    assert_eq!(flows[1]["drop_reason"], "policy-denied-ingress");
    assert_eq!(flows[1]["observation"], "to-pod");
    assert_eq!(first["source_port"], 40000);
    assert_eq!(first["destination_port"], 80);
    assert_eq!(flows[1]["source"]["labels"][0], "reserved:world");

    // Live flows pass straight through once the histories are merged.
    n2.input
        .send(flow(
            900,
            YB,
            1,
            XA,
            80,
            6,
            FlowVerdict::Forwarded,
            DropReason::None,
        ))
        .await
        .unwrap();
    let live = loop {
        let ev = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        let NodeEvent::Flow(_) = &ev else { continue };
        break merge.on(ev);
    };
    assert_eq!(live.len(), 1);
    assert_eq!(live[0]["object"]["node"], "n2");
    assert_eq!(live[0]["object"]["source"]["pod"], "b");
}
