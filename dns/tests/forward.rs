#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Names outside the cluster go to the upstream (a stub on 127.0.0.1 here),
//! with positive and negative caching.

mod common;

use common::*;
use hickory_server::proto::{op::ResponseCode, rr::RecordType};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_with_positive_cache_and_case_echo() {
    let c = Cluster::start(&[]).await;
    let stub = c.upstream.as_ref().unwrap();
    let m = c.both("www.example.test.", RecordType::A).await;
    assert_eq!(rcode(&m), ResponseCode::NoError);
    assert_eq!(data(&m.answers), ["192.0.2.1"]);
    assert!(!m.metadata.authoritative);
    assert!(m.metadata.recursion_available);
    // UDP and TCP asked once each above; only the first reached the stub.
    assert_eq!(stub.count(), 1);
    let (m, _) = ask(
        c.addr(),
        "WWW.Example.TEST.",
        RecordType::A,
        Transport::Udp,
        None,
    )
    .await;
    assert_eq!(m.answers[0].name.to_ascii(), "WWW.Example.TEST.");
    assert!(m.answers[0].ttl <= 60);
    assert_eq!(stub.count(), 1, "served from the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_answers_are_cached() {
    let c = Cluster::start(&[]).await;
    let stub = c.upstream.as_ref().unwrap();
    let m = c.both("nothing.test.", RecordType::A).await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);
    assert!(has_soa(&m));
    let _ = c.both("nothing.test.", RecordType::A).await;
    assert_eq!(stub.count(), 1);
    // A reverse name of an address the cluster does not own goes upstream.
    let m = c.both("1.2.0.192.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);
    assert_eq!(stub.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_upstream_answer_is_fetched_over_tcp() {
    let c = Cluster::start(&[]).await;
    let (m, _) = ask(
        c.addr(),
        "big.example.test.",
        RecordType::A,
        Transport::Tcp,
        None,
    )
    .await;
    assert_eq!(m.answers.len(), 60);
    // Over UDP without EDNS the client gets a truncated reply and retries on TCP.
    let (m, len) = ask(
        c.addr(),
        "big.example.test.",
        RecordType::A,
        Transport::Udp,
        None,
    )
    .await;
    assert!(m.metadata.truncation);
    assert!(len <= 512);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_servfail() {
    let c = Cluster::start_with(&[], |cfg| {
        // A loopback port nobody listens on: ICMP refused, immediate failure.
        cfg.forward.upstreams = vec!["127.0.0.1:9".parse().unwrap()];
        cfg.forward.timeout = std::time::Duration::from_millis(300);
    })
    .await;
    let (m, _) = ask(
        c.addr(),
        "www.example.test.",
        RecordType::A,
        Transport::Udp,
        None,
    )
    .await;
    assert_eq!(rcode(&m), ResponseCode::ServFail);
}

#[test]
fn resolv_conf_upstreams() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("resolv.conf");
    std::fs::write(
        &p,
        "# comment\nsearch example.test\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\noptions ndots:5\n",
    )
    .unwrap();
    let ups = skep_dns::upstreams_from_resolv_conf(&p).unwrap();
    assert_eq!(
        ups,
        vec![
            "127.0.0.53:53".parse().unwrap(),
            "[fe80::1]:53".parse().unwrap()
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_queries_rcodes_and_cache_hits() {
    let c = Cluster::start(&[service(
        "default",
        "web",
        "10.43.0.20",
        serde_json::json!([]),
    )])
    .await;
    let _ = c
        .both("web.default.svc.cluster.local.", RecordType::A)
        .await;
    let _ = c
        .both("nope.default.svc.cluster.local.", RecordType::A)
        .await;
    let _ = c.both("www.example.test.", RecordType::A).await;
    let m = c.dns.metrics();
    // Counted just after the reply is sent: give the last one a moment.
    for _ in 0..100 {
        if m.queries("A", "NOERROR") == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(m.queries("A", "NOERROR"), 4);
    assert_eq!(m.queries("A", "NXDOMAIN"), 2);
    assert_eq!((m.cache_misses(), m.cache_hits()), (1, 1));
    let text = m.prometheus();
    let server = format!("server=\"dns://{}\"", c.addr());
    for line in [
        format!(
            "coredns_dns_requests_total{{{server},zone=\".\",proto=\"udp\",family=\"1\",type=\"A\"}} 3"
        ),
        format!(
            "coredns_dns_requests_total{{{server},zone=\".\",proto=\"tcp\",family=\"1\",type=\"A\"}} 3"
        ),
        format!(
            "coredns_dns_responses_total{{{server},zone=\".\",proto=\"udp\",type=\"A\",rcode=\"NXDOMAIN\"}} 1"
        ),
        format!("coredns_dns_request_duration_seconds_count{{{server},zone=\".\"}} 6"),
        format!("coredns_cache_hits_total{{{server}}} 1"),
        format!("coredns_cache_misses_total{{{server}}} 1"),
        format!("skep_dns_snapshot_services{{{server}}} 1"),
    ] {
        assert!(text.contains(&line), "{line} missing from:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_over_http() {
    let c = Cluster::start_with(
        &[service(
            "default",
            "web",
            "10.43.0.20",
            serde_json::json!([]),
        )],
        |cfg| cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap()),
    )
    .await;
    let http_addr = c.dns.metrics_addr().expect("metrics served");
    let _ = c
        .both("web.default.svc.cluster.local.", RecordType::A)
        .await;
    let want = format!(
        "coredns_dns_responses_total{{server=\"dns://{}\",zone=\".\",proto=\"tcp\",type=\"A\",rcode=\"NOERROR\"}} 1",
        c.addr()
    );
    let mut body = String::new();
    for _ in 0..100 {
        let (status, b) = http(http_addr, "GET", "/metrics").await;
        assert_eq!(status, 200, "{b}");
        body = b;
        if body.contains(&want) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(body.contains(&want), "{want} missing from:\n{body}");
    assert!(body.contains("# TYPE coredns_dns_request_duration_seconds histogram"));
    assert!(body.contains("coredns_dns_request_duration_seconds_bucket{"));
    assert!(body.contains("skep_dns_snapshot_services{"));
    assert_eq!(http(http_addr, "GET", "/").await.0, 404);
    assert_eq!(http(http_addr, "GET", "/metricsx").await.0, 404);
    assert_eq!(http(http_addr, "POST", "/metrics").await.0, 404);
    // Dropping the server closes the metrics listener too.
    drop(c);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(http_addr).await.is_err());
}

#[test]
fn metrics_listen_flag_values() {
    use skep_dns::MetricsListen;
    assert_eq!(
        "127.0.0.1:9153".parse::<MetricsListen>().unwrap(),
        MetricsListen(Some("127.0.0.1:9153".parse().unwrap()))
    );
    assert_eq!("off".parse::<MetricsListen>().unwrap(), MetricsListen(None));
    assert!("9153".parse::<MetricsListen>().is_err());
}
