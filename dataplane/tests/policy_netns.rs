//! NetworkPolicy in the kernel, end to end: real TCP and UDP between pod
//! namespaces of a routed node namespace, the pod hooks attached, the
//! policy maps programmed through `KernelPolicy`, and the flow events read
//! back through `FlowReader`. Each test builds its own topology and pin
//! directory, removed on drop (also on panic).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::{Pod, Topology, ask, ask_udp, ip};
use skep_dataplane::{
    flows::{DropReason, Flow, FlowReader, FlowVerdict, Observation},
    lb::{
        CtTimeouts, Datapath, Endpoint, EndpointState, KernelDatapath, LbSettings, LoadBalancer,
        Protocol, Service, ServicePort,
    },
    policy::{
        ApplyStats, Cidr, EndpointEntry, ID_ANY, ID_CIDR_FIRST, ID_HOST, ID_WORLD, IpcacheEntry,
        KernelPolicy, POLICY_ID_HOST, POLICY_ID_NONE, PolicyDatapath, PolicyDirection, PolicyRule,
        PolicyState, PortMatch, Verdict,
    },
};
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 100);
/// A frontend without endpoints.
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 101);
/// The node namespace's own address (on its loopback).
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 1);
const VIP_IDENTITY: u32 = 5000;
/// The ipBlock 10.42.0.12/30 (pods 2 and 3).
const CIDR_IDENTITY: u32 = ID_CIDR_FIRST + 1;
const TCP: u8 = 6;
const UDP: u8 = 17;

fn identity(pod: usize) -> u32 {
    1000 + pod as u32
}

fn endpoint(pod: usize) -> u32 {
    1 + pod as u32
}

/// The datapath with small policy maps (tests run in parallel).
fn settings(topo: &Topology) -> LbSettings {
    LbSettings {
        policy_ct_entries: 16384,
        ipcache_entries: 16384,
        policy_entries: 65536,
        flow_ring_bytes: 1 << 18,
        ..topo.settings()
    }
}

struct Cluster {
    topo: Topology,
    lb: LoadBalancer<KernelDatapath>,
    policy: KernelPolicy,
    flows: FlowReader,
    rt: tokio::runtime::Runtime,
}

/// Four pods; a service VIP:80 → pod3:8080 (TCP) and VIP:53 → pod3:5353
/// (UDP); EMPTY_VIP:81 without endpoints; servers on every pod (TCP 8080
/// and 9090, UDP 5353 and 6000).
fn cluster(test: &str) -> (Cluster, Vec<harness::Server>) {
    let topo = Topology::new(test, 4);
    ip(&[
        "-n",
        topo.node.name(),
        "addr",
        "add",
        &format!("{NODE_IP}/32"),
        "dev",
        "lo",
    ]);
    ip(&["-n", topo.node.name(), "link", "set", "lo", "up"]);
    let mut servers = Vec::new();
    for p in &topo.pods {
        servers.push(p.tcp_server(8080));
        servers.push(p.tcp_server(9090));
        servers.push(p.udp_server(5353));
        servers.push(p.udp_server(6000));
    }
    let dp = topo.datapath_with(settings(&topo));
    let mut lb = LoadBalancer::new(dp).unwrap();
    let port = |port, protocol, target_port| ServicePort {
        port,
        protocol,
        target_port,
        node_port: None,
    };
    let svc = |name: &str, vip, ports, endpoints| Service {
        name: name.into(),
        vip,
        ports,
        endpoints,
        session_affinity: None,
        internal_traffic_local: false,
        external_traffic_local: false,
        external_ips: Vec::new(),
    };
    lb.resync(vec![
        svc(
            "default/web",
            VIP,
            vec![port(80, Protocol::Tcp, 8080), port(53, Protocol::Udp, 5353)],
            vec![Endpoint {
                addr: topo.pods[3].ip,
                state: EndpointState::Ready,
                local: true,
            }],
        ),
        svc(
            "default/empty",
            EMPTY_VIP,
            vec![port(81, Protocol::Tcp, 8080)],
            Vec::new(),
        ),
    ])
    .unwrap();
    let policy = KernelPolicy::open(&topo.pins.0).expect("open the policy maps");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let flows = {
        let _guard = rt.enter();
        FlowReader::open(&topo.pins.0).expect("open the flow ring buffer")
    };
    (
        Cluster {
            topo,
            lb,
            policy,
            flows,
            rt,
        },
        servers,
    )
}

impl Cluster {
    fn pod(&self, i: usize) -> &Pod {
        &self.topo.pods[i]
    }

    /// Every pod in the ipcache (and pods 2, 3 inside the ipBlock), the
    /// VIP, the node; endpoints with the given isolation; `rules`.
    fn state(&self, isolation: &[(usize, bool, bool)], rules: &[(PolicyRule, u32)]) -> PolicyState {
        let mut s = PolicyState::default();
        let block = Cidr::new(Ipv4Addr::new(10, 42, 0, 12), 30).unwrap();
        for (i, p) in self.topo.pods.iter().enumerate() {
            s.ipcache.insert(
                Cidr::host(p.ip),
                IpcacheEntry {
                    identity: identity(i),
                    cidr_identity: if block.contains(p.ip) {
                        CIDR_IDENTITY
                    } else {
                        ID_WORLD
                    },
                },
            );
            let (ingress, egress) = isolation
                .iter()
                .find(|(pod, _, _)| *pod == i)
                .map_or((false, false), |(_, i, e)| (*i, *e));
            s.endpoints.insert(
                p.ip,
                EndpointEntry {
                    endpoint: endpoint(i),
                    identity: identity(i),
                    ingress_isolated: ingress,
                    egress_isolated: egress,
                },
            );
        }
        s.ipcache.insert(
            block,
            IpcacheEntry {
                identity: CIDR_IDENTITY,
                cidr_identity: CIDR_IDENTITY,
            },
        );
        s.ipcache.insert(
            Cidr::host(VIP),
            IpcacheEntry {
                identity: VIP_IDENTITY,
                cidr_identity: ID_WORLD,
            },
        );
        s.ipcache.insert(
            Cidr::host(NODE_IP),
            IpcacheEntry {
                identity: ID_HOST,
                cidr_identity: ID_WORLD,
            },
        );
        s.rules.extend(rules.iter().copied());
        s
    }

    fn apply(&mut self, s: &PolicyState) -> ApplyStats {
        self.policy.apply(s).expect("apply the policy state")
    }

    fn flows(&mut self, quiet: Duration) -> Vec<Flow> {
        read_flows(&self.rt, &mut self.flows, quiet)
    }
}

/// Flows that arrive within `quiet` of each other (the ring is read until
/// it has been empty that long).
fn read_flows(rt: &tokio::runtime::Runtime, reader: &mut FlowReader, quiet: Duration) -> Vec<Flow> {
    let mut out = Vec::new();
    rt.block_on(async {
        while let Ok(f) = tokio::time::timeout(quiet, reader.next()).await {
            out.push(f.expect("read a flow"));
        }
    });
    out
}

fn rule(pod: usize, direction: PolicyDirection, identity: u32, ports: PortMatch) -> PolicyRule {
    PolicyRule {
        endpoint: endpoint(pod),
        direction,
        identity,
        ports,
    }
}

fn tcp_port(port: u16) -> PortMatch {
    PortMatch::Range {
        proto: TCP,
        first: port,
        last: port,
    }
}

fn to(p: &Pod, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(p.ip, port)
}

/// A TCP connection that must work, with a request/response on it.
fn tcp_ok(from: &Pod, dst: SocketAddrV4, expect_server: &str) -> TcpStream {
    let mut c = from
        .connect(dst)
        .unwrap_or_else(|e| panic!("{} → {dst} must connect: {e}", from.name));
    assert_eq!(ask(&mut c, "hi").unwrap(), expect_server);
    c
}

fn tcp_denied(from: &Pod, dst: SocketAddrV4) {
    let t = Instant::now();
    match from.connect(dst) {
        Ok(_) => panic!("{} → {dst} must be denied, but connected", from.name),
        Err(e) => assert!(
            e.kind() == std::io::ErrorKind::TimedOut || t.elapsed() >= Duration::from_secs(1),
            "{} → {dst}: a denied SYN is dropped (time-out), got {e}",
            from.name
        ),
    }
}

fn udp_ok(from: &Pod, dst: SocketAddrV4, expect_server: &str) {
    let sock = from.udp(0);
    let who = ask_udp(&sock, dst, "q")
        .unwrap_or_else(|e| panic!("UDP {} → {dst} must be answered: {e}", from.name));
    assert_eq!(who, expect_server);
}

fn udp_denied(from: &Pod, dst: SocketAddrV4) {
    let sock = from.udp(0);
    assert!(
        ask_udp(&sock, dst, "q").is_err(),
        "UDP {} → {dst} must be dropped",
        from.name
    );
}

fn find<'a>(flows: &'a [Flow], what: &str, pred: impl Fn(&Flow) -> bool) -> &'a Flow {
    flows
        .iter()
        .find(|f| pred(f))
        .unwrap_or_else(|| panic!("no flow event for {what} among {flows:#?}"))
}

#[test]
fn without_isolation_everything_passes_and_new_connections_are_reported() {
    let (mut c, _servers) = cluster("open");
    let s = c.state(&[], &[]);
    let stats = c.apply(&s);
    assert_eq!(stats.endpoints_written, 4);
    assert!(c.policy.enforcing().unwrap());
    let started = std::time::SystemTime::now();

    let conn = tcp_ok(c.pod(0), to(c.pod(1), 8080), "pod1");
    let sport = conn.local_addr().unwrap().port();
    udp_ok(c.pod(0), to(c.pod(2), 5353), "pod2");
    let svc = tcp_ok(c.pod(0), SocketAddrV4::new(VIP, 80), "pod3");
    let svc_sport = svc.local_addr().unwrap().port();
    udp_ok(c.pod(1), SocketAddrV4::new(VIP, 53), "pod3");
    // Refused at once by the no-backend path.
    let refused = c.pod(0).connect(SocketAddrV4::new(EMPTY_VIP, 81));
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );

    let flows = c.flows(Duration::from_millis(300));
    let (a, b) = (c.pod(0).ip, c.pod(1).ip);
    let out = find(&flows, "pod0 → pod1 from-pod", |f| {
        f.observation == Observation::FromPod && f.src == a && f.dst == b && f.sport == sport
    });
    assert_eq!(
        (
            out.dport,
            out.proto,
            out.verdict,
            out.drop_reason,
            out.src_identity,
            out.dst_identity,
            out.policy_id,
            out.service,
        ),
        (
            8080,
            TCP,
            FlowVerdict::Forwarded,
            DropReason::None,
            identity(0),
            identity(1),
            POLICY_ID_NONE,
            None
        )
    );
    assert_eq!(out.tcp_flags & 0x12, 0x02, "the first packet is the SYN");
    let since = out.time.duration_since(started).unwrap_or_default();
    assert!(since < Duration::from_secs(30), "event time {:?}", out.time);
    let ifindex = c
        .topo
        .node
        .run(|| nix::net::if_::if_nametoindex(c.pod(0).host_if.as_str()).unwrap())
        .unwrap();
    assert_eq!(out.ifindex, ifindex);
    let inn = find(&flows, "pod0 → pod1 to-pod", |f| {
        f.observation == Observation::ToPod && f.src == a && f.dst == b && f.sport == sport
    });
    assert_eq!(
        (inn.verdict, inn.src_identity, inn.dst_identity),
        (FlowVerdict::Forwarded, identity(0), identity(1))
    );
    find(&flows, "UDP pod0 → pod2", |f| {
        f.proto == UDP && f.src == a && f.dst == c.pod(2).ip && f.dport == 5353
    });
    // Through the service: judged (and reported) on the backend, with the
    // frontend alongside.
    let via = find(&flows, "pod0 → VIP:80 from-pod", |f| {
        f.observation == Observation::FromPod && f.src == a && f.sport == svc_sport
    });
    assert_eq!(
        (via.dst, via.dport, via.service, via.dst_identity),
        (c.pod(3).ip, 8080, Some((VIP, 80)), identity(3))
    );
    find(&flows, "UDP pod1 → VIP:53", |f| {
        f.src == b && f.service == Some((VIP, 53)) && f.dst == c.pod(3).ip && f.dport == 5353
    });
    let nb = find(&flows, "no backend", |f| {
        f.drop_reason == DropReason::NoBackend
    });
    assert_eq!(
        (nb.verdict, nb.src, nb.service, nb.observation),
        (
            FlowVerdict::Dropped,
            a,
            Some((EMPTY_VIP, 81)),
            Observation::FromPod
        )
    );
    // Replies are no new connections: exactly one event per hook and
    // connection.
    assert_eq!(
        flows
            .iter()
            .filter(|f| f.sport == sport && f.src == a)
            .count(),
        2,
        "{flows:#?}"
    );
    assert!(
        !flows.iter().any(|f| f.src == b && f.dport == sport),
        "replies must not be reported: {flows:#?}"
    );
    drop((conn, svc));
}

#[test]
fn ingress_isolation_admits_only_the_allowed_identity_and_port() {
    let (mut c, _servers) = cluster("ingress");
    // pod1 ingress isolated; pod0 may reach it on TCP 8080 (policy 7).
    let rules = [(
        rule(1, PolicyDirection::Ingress, identity(0), tcp_port(8080)),
        7,
    )];
    let s = c.state(&[(1, true, false)], &rules);
    c.apply(&s);
    let (p0, p1, p2) = (&c.topo.pods[0], &c.topo.pods[1], &c.topo.pods[2]);
    let mut allowed = tcp_ok(p0, to(p1, 8080), "pod1");
    let sport = allowed.local_addr().unwrap().port();
    for i in 0..5 {
        // Replies (and later packets) of the admitted connection pass.
        assert_eq!(ask(&mut allowed, &format!("again {i}")).unwrap(), "pod1");
    }
    tcp_denied(p2, to(p1, 8080));
    tcp_denied(p0, to(p1, 9090));
    udp_denied(p0, to(p1, 5353));
    // The isolated pod's own connections (egress is open) and their
    // replies pass.
    tcp_ok(p1, to(p2, 8080), "pod2");
    udp_ok(p1, to(p2, 5353), "pod2");
    // The node's own stack (probes) is always admitted.
    let from_node = c
        .topo
        .node
        .run(|| TcpStream::connect_timeout(&SocketAddr::V4(to(p1, 9090)), Duration::from_secs(2)))
        .unwrap();
    let mut from_node = from_node.expect("the node reaches an isolated pod");
    assert_eq!(ask(&mut from_node, "probe").unwrap(), "pod1");
    let node_sport = from_node.local_addr().unwrap().port();

    // The reference model agrees.
    assert_eq!(
        s.evaluate(p1.ip, PolicyDirection::Ingress, p0.ip, TCP, 8080),
        Verdict::Allowed(7)
    );
    assert_eq!(
        s.evaluate(p1.ip, PolicyDirection::Ingress, p2.ip, TCP, 8080),
        Verdict::Denied
    );

    let flows = read_flows(&c.rt, &mut c.flows, Duration::from_millis(300));
    let (a, b, o) = (p0.ip, p1.ip, p2.ip);
    let ok = find(&flows, "admitted pod0 → pod1 at pod1", |f| {
        f.observation == Observation::ToPod && f.src == a && f.sport == sport
    });
    assert_eq!(
        (ok.verdict, ok.policy_id, ok.src_identity, ok.dst_identity),
        (FlowVerdict::Forwarded, 7, identity(0), identity(1))
    );
    let denied = find(&flows, "denied pod2 → pod1", |f| {
        f.src == o && f.dst == b && f.verdict == FlowVerdict::Dropped
    });
    assert_eq!(
        (
            denied.drop_reason,
            denied.observation,
            denied.dport,
            denied.src_identity,
            denied.dst_identity,
            denied.policy_id
        ),
        (
            DropReason::PolicyIngress,
            Observation::ToPod,
            8080,
            identity(2),
            identity(1),
            POLICY_ID_NONE
        )
    );
    find(&flows, "denied pod0 → pod1:9090", |f| {
        f.src == a && f.dport == 9090 && f.drop_reason == DropReason::PolicyIngress
    });
    find(&flows, "denied UDP pod0 → pod1:5353", |f| {
        f.src == a && f.proto == UDP && f.drop_reason == DropReason::PolicyIngress
    });
    let host = find(&flows, "node → pod1", |f| {
        f.src == NODE_IP && f.sport == node_sport && f.observation == Observation::ToPod
    });
    assert_eq!(
        (host.verdict, host.src_identity, host.policy_id),
        (FlowVerdict::Forwarded, ID_HOST, POLICY_ID_HOST)
    );
    let counters = c.lb.datapath().counters().unwrap();
    assert!(counters.get("policy_denied_ingress") >= 3, "{counters:?}");
    assert!(counters.get("policy_allowed") >= 2, "{counters:?}");
    assert_eq!(counters.get("policy_denied_egress"), 0, "{counters:?}");
}

#[test]
fn egress_isolation_with_ip_blocks_and_port_ranges() {
    let (mut c, _servers) = cluster("egress");
    let rules = [
        // ipBlock 10.42.0.12/30 (pods 2, 3) on TCP 8000-8090.
        (
            rule(
                0,
                PolicyDirection::Egress,
                CIDR_IDENTITY,
                PortMatch::Range {
                    proto: TCP,
                    first: 8000,
                    last: 8090,
                },
            ),
            11,
        ),
        // Anyone on UDP 5000-5400 (endPort).
        (
            rule(
                0,
                PolicyDirection::Egress,
                ID_ANY,
                PortMatch::Range {
                    proto: UDP,
                    first: 5000,
                    last: 5400,
                },
            ),
            12,
        ),
    ];
    let s = c.state(&[(0, false, true)], &rules);
    c.apply(&s);
    let (p0, p1, p2) = (&c.topo.pods[0], &c.topo.pods[1], &c.topo.pods[2]);
    let mut conn = tcp_ok(p0, to(p2, 8080), "pod2");
    assert_eq!(ask(&mut conn, "more").unwrap(), "pod2");
    tcp_denied(p0, to(p2, 9090));
    tcp_denied(p0, to(p1, 8080));
    udp_ok(p0, to(p1, 5353), "pod1");
    udp_denied(p0, to(p1, 6000));
    // Others' egress is not isolated; pod0's ingress is open, so pod1 →
    // pod0 works and pod0's replies to it pass despite egress isolation.
    tcp_ok(p1, to(p0, 9090), "pod0");
    udp_ok(p1, to(p0, 6000), "pod0");

    let flows = read_flows(&c.rt, &mut c.flows, Duration::from_millis(300));
    let ok = find(&flows, "pod0 → pod2:8080", |f| {
        f.src == p0.ip && f.dst == p2.ip && f.observation == Observation::FromPod
    });
    assert_eq!(
        (ok.verdict, ok.policy_id, ok.dst_identity),
        (FlowVerdict::Forwarded, 11, identity(2))
    );
    let udp = find(&flows, "UDP pod0 → pod1:5353", |f| {
        f.src == p0.ip && f.proto == UDP && f.observation == Observation::FromPod
    });
    assert_eq!(udp.policy_id, 12);
    let denied = find(&flows, "pod0 → pod1:8080 denied", |f| {
        f.src == p0.ip && f.dst == p1.ip && f.dport == 8080
    });
    assert_eq!(
        (
            denied.verdict,
            denied.drop_reason,
            denied.observation,
            denied.src_identity,
            denied.dst_identity
        ),
        (
            FlowVerdict::Dropped,
            DropReason::PolicyEgress,
            Observation::FromPod,
            identity(0),
            identity(1)
        )
    );
    find(&flows, "UDP pod0 → pod1:6000 denied", |f| {
        f.dport == 6000 && f.drop_reason == DropReason::PolicyEgress
    });
    find(&flows, "pod0 → pod2:9090 denied", |f| {
        f.dport == 9090 && f.drop_reason == DropReason::PolicyEgress
    });
}

#[test]
fn egress_to_a_service_is_judged_on_the_backend() {
    let (mut c, _servers) = cluster("service");
    // A rule for the VIP's identity and the service port does not admit.
    let vip_rule = [(
        rule(0, PolicyDirection::Egress, VIP_IDENTITY, tcp_port(80)),
        21,
    )];
    let s = c.state(&[(0, false, true)], &vip_rule);
    c.apply(&s);
    tcp_denied(c.pod(0), SocketAddrV4::new(VIP, 80));
    let flows = c.flows(Duration::from_millis(300));
    let denied = find(&flows, "pod0 → VIP denied", |f| {
        f.drop_reason == DropReason::PolicyEgress
    });
    assert_eq!(
        (
            denied.dst,
            denied.dport,
            denied.service,
            denied.dst_identity
        ),
        (c.pod(3).ip, 8080, Some((VIP, 80)), identity(3))
    );

    // The backend's identity and target port do.
    let backend_rule = [(
        rule(0, PolicyDirection::Egress, identity(3), tcp_port(8080)),
        22,
    )];
    let s = c.state(&[(0, false, true), (3, true, false)], &backend_rule);
    let stats = c.apply(&s);
    assert_eq!((stats.rule_keys_written, stats.rule_keys_deleted), (1, 1));
    // pod3's ingress is isolated too, without a rule for pod0: denied there.
    tcp_denied(c.pod(0), SocketAddrV4::new(VIP, 80));
    let ingress = [
        backend_rule[0],
        (
            rule(3, PolicyDirection::Ingress, identity(0), tcp_port(8080)),
            23,
        ),
    ];
    let s = c.state(&[(0, false, true), (3, true, false)], &ingress);
    c.apply(&s);
    let mut conn = tcp_ok(c.pod(0), SocketAddrV4::new(VIP, 80), "pod3");
    assert_eq!(
        conn.peer_addr().unwrap(),
        SocketAddr::V4(SocketAddrV4::new(VIP, 80))
    );
    assert_eq!(ask(&mut conn, "x").unwrap(), "pod3");
    let sport = conn.local_addr().unwrap().port();
    let flows = c.flows(Duration::from_millis(300));
    find(&flows, "denied at pod3's ingress", |f| {
        f.drop_reason == DropReason::PolicyIngress && f.dst == c.pod(3).ip && f.dport == 8080
    });
    let out = find(&flows, "pod0 → VIP → pod3 from-pod", |f| {
        f.sport == sport && f.observation == Observation::FromPod
    });
    assert_eq!(
        (out.verdict, out.policy_id, out.dst, out.service),
        (FlowVerdict::Forwarded, 22, c.pod(3).ip, Some((VIP, 80)))
    );
    let inn = find(&flows, "pod0 → pod3 to-pod", |f| {
        f.sport == sport && f.observation == Observation::ToPod
    });
    assert_eq!((inn.policy_id, inn.dport), (23, 8080));

    // The backend reaching itself through its service (hairpin) is always
    // allowed, though its ingress only admits pod0.
    let mut own = tcp_ok(c.pod(3), SocketAddrV4::new(VIP, 80), "pod3");
    assert_eq!(ask(&mut own, "me").unwrap(), "pod3");
}

#[test]
fn removing_a_rule_blocks_new_connections_but_not_established_ones() {
    let (mut c, _servers) = cluster("remove");
    let rules = [(
        rule(1, PolicyDirection::Ingress, identity(0), tcp_port(8080)),
        3,
    )];
    let s = c.state(&[(1, true, false)], &rules);
    c.apply(&s);
    let mut established = tcp_ok(c.pod(0), to(c.pod(1), 8080), "pod1");
    let s = c.state(&[(1, true, false)], &[]);
    let stats = c.apply(&s);
    assert_eq!(stats.rule_keys_deleted, 1);
    tcp_denied(c.pod(0), to(c.pod(1), 8080));
    for i in 0..3 {
        assert_eq!(
            ask(&mut established, &format!("still {i}")).unwrap(),
            "pod1",
            "an established connection survives the rule's removal"
        );
    }
    // Once the sweep forgets the idle connection, its next packet is
    // judged like a new one: the rule is gone, so it is dropped.
    let zero = CtTimeouts {
        tcp: Duration::ZERO,
        tcp_closing: Duration::ZERO,
        other: Duration::ZERO,
    };
    std::thread::sleep(Duration::from_millis(10));
    c.lb.datapath_mut().gc_conntrack(&zero).unwrap();
    assert!(
        ask(&mut established, "after the sweep").is_err(),
        "a forgotten connection is judged again"
    );
    // Enforcement off: everything passes again; on: denied again.
    c.policy.set_enforcement(false);
    assert!(!c.policy.enforcing().unwrap());
    tcp_ok(c.pod(0), to(c.pod(1), 9090), "pod1");
    c.policy.set_enforcement(true);
    assert!(c.policy.enforcing().unwrap());
    tcp_denied(c.pod(0), to(c.pod(1), 9090));
}

/// A TCP connection from `from`'s source port `sport` (reused at once:
/// SO_REUSEADDR), with a request/response on it; `None` when the SYN goes
/// unanswered within `within`.
fn tcp_from_port(from: &Pod, sport: u16, dst: SocketAddrV4, within: Duration) -> Option<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
    };
    from.ns
        .run(|| {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::empty(),
                None,
            )
            .expect("TCP socket");
            setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
            // connect(2) gives up after the send timeout.
            setsockopt(
                &fd,
                sockopt::SendTimeout,
                &nix::sys::time::TimeVal::from(libc::timeval {
                    tv_sec: within.as_secs() as _,
                    tv_usec: 0,
                }),
            )
            .unwrap();
            bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &SockaddrIn::from(SocketAddrV4::new(from.ip, sport)),
            )
            .unwrap_or_else(|e| panic!("bind {}:{sport}: {e}", from.ip));
            match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(dst)) {
                Ok(()) => Some(TcpStream::from(fd)),
                Err(
                    nix::errno::Errno::EINPROGRESS
                    | nix::errno::Errno::ETIMEDOUT
                    | nix::errno::Errno::EAGAIN,
                ) => None,
                Err(e) => panic!("connect {} → {dst} from port {sport}: {e}", from.name),
            }
        })
        .unwrap()
}

#[test]
fn a_new_connection_reusing_an_admitted_tuple_is_judged_by_the_current_rules() {
    let (mut c, _servers) = cluster("reuse");
    let rules = [(
        rule(1, PolicyDirection::Ingress, identity(0), tcp_port(8080)),
        3,
    )];
    let s = c.state(&[(1, true, false)], &rules);
    c.apply(&s);
    const SPORT: u16 = 41_234;
    let dst = to(c.pod(1), 8080);
    let mut first = tcp_from_port(c.pod(0), SPORT, dst, Duration::from_secs(2))
        .expect("the allowed connection must open");
    assert_eq!(ask(&mut first, "hi").unwrap(), "pod1");
    // Closed with a reset: neither side keeps the tuple in TIME_WAIT, so
    // the same tuple can open again at once, while the policy conntrack
    // still holds the admitted entry (no sweep has run).
    nix::sys::socket::setsockopt(
        &first,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .expect("SO_LINGER 0");
    drop(first);
    let s = c.state(&[(1, true, false)], &[]);
    c.apply(&s);
    assert!(
        tcp_from_port(c.pod(0), SPORT, dst, Duration::from_secs(2)).is_none(),
        "a SYN on the tuple of an earlier admitted connection is a new connection: \
         the rule that admitted the earlier one is gone, so it must be dropped"
    );
    // And with the rule back, the same tuple opens again.
    let s = c.state(&[(1, true, false)], &rules);
    c.apply(&s);
    let mut again = tcp_from_port(c.pod(0), SPORT, dst, Duration::from_secs(2))
        .expect("allowed again once the rule is back");
    assert_eq!(ask(&mut again, "again").unwrap(), "pod1");
}

/// Rules of 1,000 identities, 4 rules each, on pod1.
fn big_state(c: &Cluster) -> PolicyState {
    let mut s = c.state(&[(1, true, true)], &[]);
    for i in 0..1000u32 {
        let id = 10_000 + i;
        s.ipcache.insert(
            Cidr::host(Ipv4Addr::new(10, 44, (i / 250) as u8, (i % 250) as u8 + 1)),
            IpcacheEntry {
                identity: id,
                cidr_identity: ID_WORLD,
            },
        );
        for (direction, ports) in [
            (PolicyDirection::Ingress, tcp_port(8080)),
            (
                PolicyDirection::Ingress,
                PortMatch::Range {
                    proto: UDP,
                    first: 5000,
                    last: 5100,
                },
            ),
            (PolicyDirection::Egress, PortMatch::AnyPort { proto: TCP }),
            (PolicyDirection::Egress, PortMatch::Any),
        ] {
            s.rules.insert(rule(1, direction, id, ports), 100 + i);
        }
    }
    // pod0 may reach pod1 on 8080, nobody else.
    s.rules.insert(
        rule(1, PolicyDirection::Ingress, identity(0), tcp_port(8080)),
        1,
    );
    s.rules
        .insert(rule(1, PolicyDirection::Egress, ID_ANY, PortMatch::Any), 2);
    s
}

#[test]
fn reopened_policy_writes_nothing_and_enforcement_survives_a_reload() {
    let (mut c, _servers) = cluster("reopen");
    let s = big_state(&c);
    let t = Instant::now();
    let stats = c.apply(&s);
    let took = t.elapsed();
    println!(
        "applied 1,000 identities × 4 rules ({} rule keys, {} ipcache entries) in {took:?}",
        stats.rule_keys_written, stats.ipcache_written
    );
    assert!(stats.rule_keys_written > 4000, "{stats:?}");
    tcp_ok(c.pod(0), to(c.pod(1), 8080), "pod1");
    tcp_denied(c.pod(2), to(c.pod(1), 8080));

    // A new handle on the same pins (agent restart) writes nothing.
    let pins = c.topo.pins.0.clone();
    c.policy = KernelPolicy::open(&pins).unwrap();
    let t = Instant::now();
    assert_eq!(c.apply(&s), ApplyStats::default());
    println!("identical re-apply after reopen: {:?}", t.elapsed());

    // A new loader on the same pins keeps enforcing.
    let dp = c.topo.datapath_with(settings(&c.topo));
    assert!(c.policy.enforcing().unwrap());
    tcp_denied(c.pod(2), to(c.pod(1), 8080));
    tcp_ok(c.pod(0), to(c.pod(1), 8080), "pod1");
    drop(dp);
    let reopened = KernelPolicy::open(&pins).unwrap();
    assert!(reopened.enforcing().unwrap());
}

const SCTP: u8 = 132;

/// A raw IPPROTO_SCTP socket: SCTP packets are sent and received without
/// the kernel's SCTP module (this machine has none), which is all the
/// datapath sees of SCTP: an IP protocol with ports where TCP's are.
fn raw_sctp(pod: &Pod) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    pod.ns
        .run(|| {
            // SAFETY: plain socket(2); the fd is owned by the returned OwnedFd.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, i32::from(SCTP)) };
            assert!(
                fd >= 0,
                "raw SCTP socket: {}",
                std::io::Error::last_os_error()
            );
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 300_000,
            };
            // SAFETY: setsockopt on the fd just made, with a timeval.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            assert_eq!(rc, 0);
            // SAFETY: fd is a fresh socket owned by nobody else.
            unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
        })
        .unwrap()
}

/// Sends one SCTP packet (common header + a dummy chunk) from `sock`.
fn send_sctp(sock: &std::os::fd::OwnedFd, to: Ipv4Addr, sport: u16, dport: u16) {
    use std::os::fd::AsRawFd;
    let mut pkt = Vec::new();
    pkt.extend_from_slice(&sport.to_be_bytes());
    pkt.extend_from_slice(&dport.to_be_bytes());
    pkt.extend_from_slice(&[0u8; 8]); // verification tag, checksum
    pkt.extend_from_slice(&[1, 0, 0, 4]); // an INIT-typed chunk header
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(to).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sendto(2) with a live buffer and a sockaddr_in of its size.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    assert_eq!(n, pkt.len() as isize, "{}", std::io::Error::last_os_error());
}

/// The (source, sport, dport) of SCTP packets `sock` receives until it
/// has been quiet for its timeout.
fn received_sctp(sock: &std::os::fd::OwnedFd) -> Vec<(Ipv4Addr, u16, u16)> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        // SAFETY: recv(2) into a live buffer of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 24 {
            return out;
        }
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
        let sport = u16::from_be_bytes([buf[ihl], buf[ihl + 1]]);
        let dport = u16::from_be_bytes([buf[ihl + 2], buf[ihl + 3]]);
        out.push((src, sport, dport));
    }
}

/// NetworkPolicy's SCTP ports are enforced like TCP's and UDP's: an
/// ingress-isolated pod gets SCTP only from the allowed identity on the
/// allowed port, a pod without isolation gets all of it, and the drops are
/// reported as flows with protocol 132.
#[test]
fn sctp_ports_are_judged_by_policy() {
    let (mut c, _servers) = cluster("sctp");
    let rules = [(
        rule(
            1,
            PolicyDirection::Ingress,
            identity(0),
            PortMatch::Range {
                proto: SCTP,
                first: 5000,
                last: 5000,
            },
        ),
        11,
    )];
    let s = c.state(&[(1, true, false)], &rules);
    c.apply(&s);
    let (a, b, o, d) = (c.pod(0).ip, c.pod(1).ip, c.pod(2).ip, c.pod(3).ip);
    let rx1 = raw_sctp(c.pod(1));
    let rx3 = raw_sctp(c.pod(3));
    let tx0 = raw_sctp(c.pod(0));
    let tx2 = raw_sctp(c.pod(2));
    send_sctp(&tx0, b, 4000, 5000); // allowed
    send_sctp(&tx0, b, 4001, 5001); // wrong port
    send_sctp(&tx2, b, 4002, 5000); // wrong identity
    send_sctp(&tx0, d, 4003, 5001); // pod3 is not isolated
    assert_eq!(received_sctp(&rx1), vec![(a, 4000, 5000)]);
    assert_eq!(received_sctp(&rx3), vec![(a, 4003, 5001)]);
    assert_eq!(
        s.evaluate(b, PolicyDirection::Ingress, a, SCTP, 5000),
        Verdict::Allowed(11)
    );

    let flows = c.flows(Duration::from_millis(300));
    let ok = find(&flows, "admitted SCTP pod0 → pod1:5000", |f| {
        f.proto == SCTP
            && f.src == a
            && f.dport == 5000
            && f.observation == Observation::ToPod
            && f.verdict == FlowVerdict::Forwarded
    });
    assert_eq!(ok.policy_id, 11);
    for (src, dport) in [(a, 5001), (o, 5000)] {
        let d = find(&flows, "denied SCTP to pod1", |f| {
            f.proto == SCTP
                && f.src == src
                && f.dport == dport
                && f.observation == Observation::ToPod
        });
        assert_eq!(
            (d.verdict, d.drop_reason),
            (FlowVerdict::Dropped, DropReason::PolicyIngress)
        );
    }
}
