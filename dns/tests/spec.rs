#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The Kubernetes DNS-based service discovery spec (v1.1.0), rule by rule,
//! against a running server fed by a real store, over UDP and TCP.

mod common;

use common::*;
use hickory_server::proto::{op::ResponseCode, rr::RecordType};
use serde_json::{Value, json};

fn objects() -> Vec<Value> {
    vec![
        service(
            "default",
            "web",
            "10.43.0.20",
            json!([
                {"name": "http", "port": 80, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"port": 8080, "protocol": "TCP"},
            ]),
        ),
        dual_stack_service("default", "dual", &["10.43.0.21", "fd00:43::21"]),
        headless("default", "db"),
        slice(
            "default",
            "db",
            "db-abc",
            &[
                ("10.42.0.5", true, Some("db-0")),
                ("10.42.0.6", true, None),
                ("10.42.0.7", false, Some("db-2")),
            ],
            json!([{"name": "pg", "port": 5432, "protocol": "TCP"}]),
        ),
        external("default", "ext", "web.default.svc.cluster.local"),
        external("default", "out", "www.example.test"),
        pod("default", "p1", "10.42.0.9", Some("h1"), Some("db")),
    ]
}

const WEB: &str = "web.default.svc.cluster.local.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ip_service_a_and_aaaa() {
    let c = Cluster::start(&objects()).await;
    let m = c.both(WEB, RecordType::A).await;
    assert_eq!(rcode(&m), ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(data(&m.answers), ["10.43.0.20"]);
    assert_eq!(m.answers[0].ttl, 5);
    // The name exists without AAAA: NODATA with the SOA.
    let m = c.both(WEB, RecordType::AAAA).await;
    assert_eq!(rcode(&m), ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert!(has_soa(&m));
    // Dual stack: A and AAAA.
    let dual = "dual.default.svc.cluster.local.";
    assert_eq!(
        data(&c.both(dual, RecordType::A).await.answers),
        ["10.43.0.21"]
    );
    assert_eq!(
        data(&c.both(dual, RecordType::AAAA).await.answers),
        ["fd00:43::21"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_for_named_ports() {
    let c = Cluster::start(&objects()).await;
    let m = c
        .both("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV)
        .await;
    assert_eq!(
        data(&m.answers),
        ["0 100 80 web.default.svc.cluster.local."]
    );
    // The target's address rides along in the additional section.
    assert!(
        m.additionals
            .iter()
            .any(|r| r.data.to_string() == "10.43.0.20")
    );
    let m = c
        .both("_dns._udp.web.default.svc.cluster.local.", RecordType::SRV)
        .await;
    assert_eq!(
        data(&m.answers),
        ["0 100 53 web.default.svc.cluster.local."]
    );
    // Wrong protocol for a port: no such name.
    let m = c
        .both("_http._udp.web.default.svc.cluster.local.", RecordType::SRV)
        .await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);
    assert!(has_soa(&m));
    // `_tcp.web…` exists (it has children) but holds nothing: NODATA.
    let m = c
        .both("_tcp.web.default.svc.cluster.local.", RecordType::SRV)
        .await;
    assert_eq!(rcode(&m), ResponseCode::NoError);
    assert!(m.answers.is_empty() && has_soa(&m));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_service_ready_endpoints_hostnames_and_srv() {
    let c = Cluster::start(&objects()).await;
    let db = "db.default.svc.cluster.local.";
    // Ready endpoints only.
    assert_eq!(
        data(&c.both(db, RecordType::A).await.answers),
        ["10.42.0.5", "10.42.0.6"]
    );
    assert_eq!(
        data(
            &c.both("db-0.db.default.svc.cluster.local.", RecordType::A)
                .await
                .answers
        ),
        ["10.42.0.5"]
    );
    // An endpoint without hostname gets its dashed address.
    assert_eq!(
        data(
            &c.both("10-42-0-6.db.default.svc.cluster.local.", RecordType::A)
                .await
                .answers
        ),
        ["10.42.0.6"]
    );
    // The unready endpoint's hostname does not exist.
    let m = c
        .both("db-2.db.default.svc.cluster.local.", RecordType::A)
        .await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);
    // SRV: one per ready endpoint × named port, targets are the endpoint names.
    let m = c
        .both("_pg._tcp.db.default.svc.cluster.local.", RecordType::SRV)
        .await;
    assert_eq!(
        data(&m.answers),
        [
            "0 50 5432 10-42-0-6.db.default.svc.cluster.local.",
            "0 50 5432 db-0.db.default.svc.cluster.local."
        ]
    );
    assert_eq!(
        m.additionals
            .iter()
            .filter(|r| r.record_type() == RecordType::A)
            .count(),
        2
    );
    // Pod hostname/subdomain naming the headless service.
    assert_eq!(
        data(
            &c.both("h1.db.default.svc.cluster.local.", RecordType::A)
                .await
                .answers
        ),
        ["10.42.0.9"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ptr_for_service_and_endpoint_addresses() {
    let c = Cluster::start(&objects()).await;
    let m = c.both("20.0.43.10.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(data(&m.answers), [WEB]);
    assert!(m.metadata.authoritative);
    let m = c.both("5.0.42.10.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(data(&m.answers), ["db-0.db.default.svc.cluster.local."]);
    let v6 = "1.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.3.4.0.0.0.0.d.f.ip6.arpa.";
    assert_eq!(
        data(&c.both(v6, RecordType::PTR).await.answers),
        ["dual.default.svc.cluster.local."]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_name_is_a_cname_chased_inside_the_zone() {
    let c = Cluster::start(&objects()).await;
    let m = c
        .both("ext.default.svc.cluster.local.", RecordType::A)
        .await;
    assert_eq!(rcode(&m), ResponseCode::NoError);
    assert_eq!(data(&m.answers), ["10.43.0.20", WEB]);
    assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
    let m = c
        .both("ext.default.svc.cluster.local.", RecordType::CNAME)
        .await;
    assert_eq!(data(&m.answers), [WEB]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_name_outside_the_zone_is_chased_through_the_upstreams() {
    let c = Cluster::start(&objects()).await;
    let stub = c.upstream.as_ref().unwrap();
    // A/AAAA: the CNAME, then the target's records from the upstream.
    let m = c
        .both("out.default.svc.cluster.local.", RecordType::A)
        .await;
    assert_eq!(rcode(&m), ResponseCode::NoError);
    assert_eq!(data(&m.answers), ["192.0.2.1", "www.example.test."]);
    assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
    assert_eq!(m.answers[1].name.to_ascii(), "www.example.test.");
    // UDP then TCP: the second came from the forwarder's cache.
    assert_eq!(stub.count(), 1);
    assert_eq!(
        (c.dns.metrics().cache_misses(), c.dns.metrics().cache_hits()),
        (1, 1)
    );
    // The target does not exist upstream: the rcode describes it (RFC
    // 6604), with the upstream's SOA; the CNAME is still there.
    c.put(&external("default", "gone", "nothing.example.org"))
        .await;
    let gone = "gone.default.svc.cluster.local.";
    c.eventually(
        gone,
        RecordType::A,
        std::time::Duration::from_secs(2),
        |m| !m.answers.is_empty(),
    )
    .await;
    let m = c.both(gone, RecordType::A).await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);
    assert_eq!(data(&m.answers), ["nothing.example.org."]);
    assert!(has_soa(&m));
    // Other types are not chased: the CNAME alone.
    let count = stub.count();
    let m = c
        .both("out.default.svc.cluster.local.", RecordType::TXT)
        .await;
    assert_eq!(rcode(&m), ResponseCode::NoError);
    assert_eq!(data(&m.answers), ["www.example.test."]);
    assert_eq!(stub.count(), count);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_name_target_with_upstream_down_is_the_cname_alone() {
    let c = Cluster::start_with(&objects(), |cfg| {
        // A loopback port nobody listens on: refused at once.
        cfg.forward.upstreams = vec!["127.0.0.1:9".parse().unwrap()];
        cfg.forward.timeout = std::time::Duration::from_millis(300);
    })
    .await;
    let m = c
        .both("out.default.svc.cluster.local.", RecordType::A)
        .await;
    assert_eq!(rcode(&m), ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(data(&m.answers), ["www.example.test."]);
}

/// A query for `web` A with an OPT record carrying `version` and the raw
/// option bytes `options` (RFC 6891 wire format), built by hand so that
/// malformed OPTs can be sent.
fn query_with_opt(id: u16, version: u8, options: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]);
    for label in WEB.trim_end_matches('.').split('.') {
        b.push(label.len() as u8);
        b.extend_from_slice(label.as_bytes());
    }
    b.push(0);
    b.extend_from_slice(&[0, 1, 0, 1]); // A, IN
    b.push(0); // root owner
    b.extend_from_slice(&41u16.to_be_bytes()); // OPT
    b.extend_from_slice(&1232u16.to_be_bytes()); // payload size
    b.extend_from_slice(&[0, version, 0, 0]); // ext-rcode, version, flags
    b.extend_from_slice(&(options.len() as u16).to_be_bytes());
    b.extend_from_slice(options);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edns_version_above_zero_is_badvers() {
    let c = Cluster::start(&objects()).await;
    for t in [Transport::Udp, Transport::Tcp] {
        let raw = exchange(c.addr(), &query_with_opt(0x5a5a, 1, &[]), t)
            .await
            .unwrap_or_else(|| panic!("no reply over {t:?}"));
        assert_eq!(raw[0..2], [0x5a, 0x5a], "{t:?}: id");
        // Header rcode bits 0: BADVERS (16) lives wholly in the OPT TTL.
        assert_eq!(raw[3] & 0x0f, 0, "{t:?}: header rcode");
        let m = hickory_server::proto::op::Message::from_vec(&raw).unwrap();
        let edns = m.edns.as_ref().expect("an OPT record in the reply");
        assert_eq!(edns.version(), 0, "{t:?}: our version");
        assert_eq!(edns.rcode_high(), 1, "{t:?}: extended rcode bits");
        // 16 is BADVERS for OPT (RFC 6891) and BADSIG for TSIG: hickory
        // decodes it as the latter, so compare the number.
        assert_eq!(u16::from(rcode(&m)), 16, "{t:?}: BADVERS");
        assert!(m.answers.is_empty(), "{t:?}: no answer with BADVERS");
        // Version 0 with the same query is answered normally.
        let raw = exchange(c.addr(), &query_with_opt(0x5a5b, 0, &[]), t)
            .await
            .unwrap();
        let m = hickory_server::proto::op::Message::from_vec(&raw).unwrap();
        assert_eq!(rcode(&m), ResponseCode::NoError, "{t:?}");
        assert_eq!(data(&m.answers), ["10.43.0.20"], "{t:?}");
    }
    let metrics = c.dns.metrics();
    assert_eq!(metrics.queries("A", "BADVERS"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_edns_option_is_formerr() {
    let c = Cluster::start(&objects()).await;
    // A COOKIE option (10) claiming 40 bytes with none following.
    let bad = [0, 10, 0, 40];
    for t in [Transport::Udp, Transport::Tcp] {
        let raw = exchange(c.addr(), &query_with_opt(0x6b6b, 0, &bad), t)
            .await
            .unwrap_or_else(|| panic!("no reply over {t:?}"));
        assert_eq!(raw[0..2], [0x6b, 0x6b], "{t:?}: id");
        assert_eq!(raw[2] & 0x80, 0x80, "{t:?}: a response");
        assert_eq!(raw[3] & 0x0f, 1, "{t:?}: FORMERR");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_version_txt() {
    let c = Cluster::start(&objects()).await;
    let m = c.both("dns-version.cluster.local.", RecordType::TXT).await;
    assert_eq!(data(&m.answers), ["1.1.0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_records_insecure_and_verified() {
    let c = Cluster::start(&objects()).await;
    let m = c
        .both("10-42-0-99.default.pod.cluster.local.", RecordType::A)
        .await;
    assert_eq!(data(&m.answers), ["10.42.0.99"]);
    let m = c
        .both("10-42-0-99.default.pod.cluster.local.", RecordType::AAAA)
        .await;
    assert_eq!(rcode(&m), ResponseCode::NoError);
    assert!(m.answers.is_empty() && has_soa(&m));
    let m = c
        .both("10-42-0.default.pod.cluster.local.", RecordType::A)
        .await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);

    let v = Cluster::start_with(&objects(), |cfg| {
        cfg.pod_records = skep_dns::PodRecords::Verified
    })
    .await;
    let m = v
        .both("10-42-0-9.default.pod.cluster.local.", RecordType::A)
        .await;
    assert_eq!(data(&m.answers), ["10.42.0.9"]);
    let m = v
        .both("10-42-0-99.default.pod.cluster.local.", RecordType::A)
        .await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);
    let m = v
        .both("10-42-0-9.other.pod.cluster.local.", RecordType::A)
        .await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negatives_nxdomain_vs_nodata_with_soa() {
    let c = Cluster::start(&objects()).await;
    let m = c
        .both("missing.default.svc.cluster.local.", RecordType::A)
        .await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);
    assert!(m.answers.is_empty() && has_soa(&m));
    assert!(m.metadata.authoritative);
    let soa = m
        .authorities
        .iter()
        .find(|r| r.record_type() == RecordType::SOA)
        .unwrap();
    assert_eq!(soa.name.to_ascii(), "cluster.local.");
    // Existing names without the type, and empty non-terminals: NODATA.
    for (name, t) in [
        (WEB, RecordType::MX),
        ("default.svc.cluster.local.", RecordType::A),
        ("svc.cluster.local.", RecordType::A),
        ("cluster.local.", RecordType::A),
    ] {
        let m = c.both(name, t).await;
        assert_eq!(rcode(&m), ResponseCode::NoError, "{name} {t}");
        assert!(m.answers.is_empty() && has_soa(&m), "{name} {t}");
    }
    let m = c.both("cluster.local.", RecordType::SOA).await;
    assert_eq!(m.answers.len(), 1);
    let m = c.both("nope.svc.cluster.local.", RecordType::A).await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_insensitive_and_echoed() {
    let c = Cluster::start(&objects()).await;
    for t in [Transport::Udp, Transport::Tcp] {
        let name = "WeB.DeFault.SVC.Cluster.Local.";
        let (m, _) = ask(c.addr(), name, RecordType::A, t, None).await;
        assert_eq!(data(&m.answers), ["10.43.0.20"]);
        assert_eq!(m.queries[0].name().to_ascii(), name);
        assert_eq!(m.answers[0].name.to_ascii(), name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_transfer_refused() {
    let c = Cluster::start(&objects()).await;
    let (m, _) = ask(
        c.addr(),
        "cluster.local.",
        RecordType::AXFR,
        Transport::Tcp,
        None,
    )
    .await;
    assert_eq!(rcode(&m), ResponseCode::Refused);
    assert!(m.answers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_with_a_100_endpoint_headless_service() {
    let eps: Vec<String> = (0..100).map(|i| format!("10.42.1.{i}")).collect();
    let list: Vec<(&str, bool, Option<&str>)> =
        eps.iter().map(|ip| (ip.as_str(), true, None)).collect();
    let c = Cluster::start(&[
        headless("default", "big"),
        slice(
            "default",
            "big",
            "big-1",
            &list,
            json!([{"name": "pg", "port": 5432, "protocol": "TCP"}]),
        ),
    ])
    .await;
    let name = "big.default.svc.cluster.local.";
    // No EDNS: at most 512 bytes, TC set.
    let (m, len) = ask(c.addr(), name, RecordType::A, Transport::Udp, None).await;
    assert!(m.metadata.truncation, "TC without EDNS");
    assert!(len <= 512, "{len} bytes without EDNS");
    // EDNS 1232: still too small for 100 A records (≈1.7 kB).
    let (m, len) = ask(c.addr(), name, RecordType::A, Transport::Udp, Some(1232)).await;
    assert!(m.metadata.truncation, "TC at 1232");
    assert!(len <= 1232, "{len} bytes with EDNS 1232");
    assert!(m.edns.is_some(), "EDNS echoed");
    // EDNS 4096: everything fits.
    let (m, len) = ask(c.addr(), name, RecordType::A, Transport::Udp, Some(4096)).await;
    assert!(!m.metadata.truncation, "no TC at 4096 ({len} bytes)");
    assert_eq!(m.answers.len(), 100);
    // TCP: everything, whatever the size.
    let (m, _) = ask(c.addr(), name, RecordType::A, Transport::Tcp, None).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
    let (m, _) = ask(
        c.addr(),
        "_pg._tcp.big.default.svc.cluster.local.",
        RecordType::SRV,
        Transport::Tcp,
        None,
    )
    .await;
    assert_eq!(m.answers.len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configurable_zone() {
    let svc = service("prod", "api", "10.43.1.1", json!([]));
    let c = Cluster::start_with(&[svc], |cfg| cfg.zone = "Corp.Internal".into()).await;
    let m = c.both("api.prod.svc.corp.internal.", RecordType::A).await;
    assert_eq!(data(&m.answers), ["10.43.1.1"]);
    assert_eq!(
        data(
            &c.both("dns-version.corp.internal.", RecordType::TXT)
                .await
                .answers
        ),
        ["1.1.0"]
    );
    // cluster.local is no longer ours: it goes upstream (the stub says NXDOMAIN).
    let m = c.both("api.prod.svc.cluster.local.", RecordType::A).await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);
    assert!(!m.metadata.authoritative);
}
