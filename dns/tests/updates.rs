#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Live updates through the watch-fed snapshot, and SERVFAIL before the
//! first sync.

mod common;

use async_trait::async_trait;
use common::*;
use hickory_server::proto::{op::ResponseCode, rr::RecordType};
use serde_json::json;
use skep_store::{
    Deleted, KeyValue, ListPage, ListRequest, Revision, SqliteStore, Store, StoreError, Watch,
};
use std::{sync::Arc, time::Duration};

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_created_resolves_within_one_second_then_deleted() {
    let c = Cluster::start(&[]).await;
    let name = "new.default.svc.cluster.local.";
    let m = c.both(name, RecordType::A).await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);
    let svc = service(
        "default",
        "new",
        "10.43.0.30",
        json!([{"name": "http", "port": 80, "protocol": "TCP"}]),
    );
    c.put(&svc).await;
    let took = c
        .eventually(name, RecordType::A, SECOND, |m| {
            data(&m.answers) == ["10.43.0.30"]
        })
        .await;
    eprintln!("service resolvable {took:?} after its creation");
    c.delete(&svc).await;
    c.eventually(name, RecordType::A, SECOND, |m| {
        rcode(m) == ResponseCode::NXDomain
    })
    .await;
    c.eventually(
        "_http._tcp.new.default.svc.cluster.local.",
        RecordType::SRV,
        SECOND,
        |m| rcode(m) == ResponseCode::NXDomain,
    )
    .await;
    c.eventually("30.0.43.10.in-addr.arpa.", RecordType::PTR, SECOND, |m| {
        !m.metadata.authoritative
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_becoming_unready_leaves_the_headless_answer() {
    let ports = json!([{"name": "pg", "port": 5432, "protocol": "TCP"}]);
    let ready = slice(
        "default",
        "db",
        "db-1",
        &[
            ("10.42.0.5", true, Some("db-0")),
            ("10.42.0.6", true, Some("db-1")),
        ],
        ports.clone(),
    );
    let c = Cluster::start(&[headless("default", "db"), ready]).await;
    let name = "db.default.svc.cluster.local.";
    assert_eq!(
        data(&c.both(name, RecordType::A).await.answers),
        ["10.42.0.5", "10.42.0.6"]
    );
    let unready = slice(
        "default",
        "db",
        "db-1",
        &[
            ("10.42.0.5", true, Some("db-0")),
            ("10.42.0.6", false, Some("db-1")),
        ],
        ports,
    );
    c.put(&unready).await;
    c.eventually(name, RecordType::A, SECOND, |m| {
        data(&m.answers) == ["10.42.0.5"]
    })
    .await;
    c.eventually(
        "db-1.db.default.svc.cluster.local.",
        RecordType::A,
        SECOND,
        |m| rcode(m) == ResponseCode::NXDomain,
    )
    .await;
    c.eventually(
        "_pg._tcp.db.default.svc.cluster.local.",
        RecordType::SRV,
        SECOND,
        |m| m.answers.len() == 1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_name_switched_to_cluster_ip() {
    let c = Cluster::start(&[external("default", "sw", "www.example.test")]).await;
    let name = "sw.default.svc.cluster.local.";
    let m = c.both(name, RecordType::A).await;
    assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
    c.put(&service("default", "sw", "10.43.0.40", json!([])))
        .await;
    c.eventually(name, RecordType::A, SECOND, |m| {
        data(&m.answers) == ["10.43.0.40"] && m.answers[0].record_type() == RecordType::A
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_changes_across_a_store_compaction() {
    let c = Cluster::start(&[]).await;
    // Many writes, then compaction past the watch's start: the feed must
    // keep (or regain) an up-to-date view.
    for i in 0..20 {
        c.put(&service(
            "default",
            &format!("s{i}"),
            &format!("10.43.2.{i}"),
            json!([]),
        ))
        .await;
    }
    let rev = c.store.revision().await.unwrap();
    c.store.compact(rev).await.unwrap();
    c.put(&service("default", "after", "10.43.2.200", json!([])))
        .await;
    c.eventually(
        "after.default.svc.cluster.local.",
        RecordType::A,
        SECOND,
        |m| data(&m.answers) == ["10.43.2.200"],
    )
    .await;
    c.eventually(
        "s19.default.svc.cluster.local.",
        RecordType::A,
        SECOND,
        |m| data(&m.answers) == ["10.43.2.19"],
    )
    .await;
}

/// A store whose lists wait until released: the DNS has no data yet.
#[derive(Debug)]
struct Gated {
    inner: SqliteStore,
    open: tokio::sync::watch::Receiver<bool>,
}

#[async_trait]
impl Store for Gated {
    async fn revision(&self) -> skep_store::Result<Revision> {
        self.inner.revision().await
    }
    async fn get(&self, key: &str) -> skep_store::Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn create(&self, key: &str, value: bytes::Bytes) -> skep_store::Result<KeyValue> {
        self.inner.create(key, value).await
    }
    async fn update(
        &self,
        key: &str,
        value: bytes::Bytes,
        expected: Revision,
    ) -> skep_store::Result<KeyValue> {
        self.inner.update(key, value, expected).await
    }
    async fn delete(&self, key: &str, expected: Option<Revision>) -> skep_store::Result<Deleted> {
        self.inner.delete(key, expected).await
    }
    async fn list(&self, req: ListRequest<'_>) -> skep_store::Result<ListPage> {
        let mut open = self.open.clone();
        open.wait_for(|o| *o)
            .await
            .map_err(|_| StoreError::Closed)?;
        self.inner.list(req).await
    }
    async fn watch(&self, prefix: &str, after: Revision) -> skep_store::Result<Watch> {
        self.inner.watch(prefix, after).await
    }
    async fn compact(&self, revision: Revision) -> skep_store::Result<()> {
        self.inner.compact(revision).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_until_the_first_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let inner = SqliteStore::open(dir.path().join("state.db")).unwrap();
    let svc = service("default", "web", "10.43.0.20", json!([]));
    inner
        .create(&key_of(&svc), serde_json::to_vec(&svc).unwrap().into())
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(Gated { inner, open: rx });
    let stub = Stub::start().await;
    let mut config = skep_dns::DnsConfig::new("127.0.0.1:0".parse().unwrap());
    config.forward.upstreams = vec![stub.addr];
    let dns = skep_dns::start(config, store).await.unwrap();
    let name = "web.default.svc.cluster.local.";
    for t in [Transport::Udp, Transport::Tcp] {
        let (m, _) = ask(dns.local_addr(), name, RecordType::A, t, None).await;
        assert_eq!(rcode(&m), ResponseCode::ServFail, "{t:?}");
        let (m, _) = ask(
            dns.local_addr(),
            "nothere.default.svc.cluster.local.",
            RecordType::A,
            t,
            None,
        )
        .await;
        assert_eq!(
            rcode(&m),
            ResponseCode::ServFail,
            "never NXDOMAIN before the sync"
        );
    }
    // Names outside the zone do not depend on the sync.
    let (m, _) = ask(
        dns.local_addr(),
        "www.example.test.",
        RecordType::A,
        Transport::Udp,
        None,
    )
    .await;
    assert_eq!(data(&m.answers), ["192.0.2.1"]);
    tx.send(true).unwrap();
    let start = std::time::Instant::now();
    loop {
        let (m, _) = ask(dns.local_addr(), name, RecordType::A, Transport::Udp, None).await;
        if rcode(&m) == ResponseCode::NoError {
            assert_eq!(data(&m.answers), ["10.43.0.20"]);
            break;
        }
        assert!(start.elapsed() < SECOND, "still {:?}", rcode(&m));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A store whose first watch reports `Compacted`, as a watch that fell
/// behind a compaction does; counts the lists of Services.
#[derive(Debug)]
struct CompactsOnce {
    inner: SqliteStore,
    failed: std::sync::atomic::AtomicBool,
    service_lists: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Store for CompactsOnce {
    async fn revision(&self) -> skep_store::Result<Revision> {
        self.inner.revision().await
    }
    async fn get(&self, key: &str) -> skep_store::Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn create(&self, key: &str, value: bytes::Bytes) -> skep_store::Result<KeyValue> {
        self.inner.create(key, value).await
    }
    async fn update(
        &self,
        key: &str,
        value: bytes::Bytes,
        expected: Revision,
    ) -> skep_store::Result<KeyValue> {
        self.inner.update(key, value, expected).await
    }
    async fn delete(&self, key: &str, expected: Option<Revision>) -> skep_store::Result<Deleted> {
        self.inner.delete(key, expected).await
    }
    async fn list(&self, req: ListRequest<'_>) -> skep_store::Result<ListPage> {
        if req.prefix == "/registry/services/" && req.start.is_none() {
            self.service_lists
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.list(req).await
    }
    async fn watch(&self, prefix: &str, after: Revision) -> skep_store::Result<Watch> {
        if !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(Err(StoreError::Compacted {
                requested: after,
                compacted: after + 1,
            }))
            .await
            .unwrap();
            return Ok(Watch::new(rx));
        }
        self.inner.watch(prefix, after).await
    }
    async fn compact(&self, revision: Revision) -> skep_store::Result<()> {
        self.inner.compact(revision).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_watch_relists() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(CompactsOnce {
        inner: SqliteStore::open(dir.path().join("state.db")).unwrap(),
        failed: false.into(),
        service_lists: 0.into(),
    });
    let dyn_store: Arc<dyn Store> = store.clone();
    let stub = Stub::start().await;
    let mut config = skep_dns::DnsConfig::new("127.0.0.1:0".parse().unwrap());
    config.forward.upstreams = vec![stub.addr];
    let dns = skep_dns::start(config, dyn_store.clone()).await.unwrap();
    // Written after the start: only a working (re-established) watch, or
    // a new list, can deliver it.
    let svc = service("default", "late", "10.43.3.1", json!([]));
    dyn_store
        .create(&key_of(&svc), serde_json::to_vec(&svc).unwrap().into())
        .await
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        let (m, _) = ask(
            dns.local_addr(),
            "late.default.svc.cluster.local.",
            RecordType::A,
            Transport::Udp,
            None,
        )
        .await;
        if data(&m.answers) == ["10.43.3.1"] {
            break;
        }
        assert!(start.elapsed() < SECOND, "not resolvable: {m:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        store
            .service_lists
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2,
        "the Compacted watch made the feed list again"
    );
    // And it keeps following changes afterwards.
    let svc2 = service("default", "later", "10.43.3.2", json!([]));
    dyn_store
        .create(&key_of(&svc2), serde_json::to_vec(&svc2).unwrap().into())
        .await
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        let (m, _) = ask(
            dns.local_addr(),
            "later.default.svc.cluster.local.",
            RecordType::A,
            Transport::Udp,
            None,
        )
        .await;
        if data(&m.answers) == ["10.43.3.2"] {
            break;
        }
        assert!(start.elapsed() < SECOND, "not resolvable: {m:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Repeated identical questions are answered from the UDP threads'
/// prepared replies: every reply carries its own query's ID and the same
/// answer, the query metrics count each one, and a change to the service
/// is answered at once (a new snapshot empties the prepared replies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_questions_keep_their_ids_and_follow_changes() {
    let ports = json!([{"name": "http", "port": 80, "protocol": "TCP"}]);
    let c = Cluster::start(&[service("default", "rep", "10.43.0.40", ports.clone())]).await;
    let name = "rep.default.svc.cluster.local.";
    let before = c.dns.metrics().queries("A", "NOERROR");
    for _ in 0..50 {
        // `ask` checks the reply's ID is this query's (a new one each time).
        let (m, _) = ask(c.addr(), name, RecordType::A, Transport::Udp, Some(1232)).await;
        assert_eq!(data(&m.answers), ["10.43.0.40"]);
        assert!(m.metadata.authoritative);
    }
    // The server counts an answer right after sending it, so the last
    // count may land a moment after the client has its reply.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut counted = c.dns.metrics().queries("A", "NOERROR") - before;
    while counted < 50 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        counted = c.dns.metrics().queries("A", "NOERROR") - before;
    }
    assert_eq!(counted, 50, "every answer is counted, prepared or not");
    // Another EDNS size is another question (its reply carries its own OPT).
    let (m, _) = ask(c.addr(), name, RecordType::A, Transport::Udp, Some(4096)).await;
    assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(4096));
    let (m, _) = ask(c.addr(), name, RecordType::A, Transport::Udp, None).await;
    assert!(
        m.edns.is_none(),
        "no OPT in the reply to a query without one"
    );
    c.put(&service("default", "rep", "10.43.0.41", ports)).await;
    let took = c
        .eventually(name, RecordType::A, SECOND, |m| {
            data(&m.answers) == ["10.43.0.41"]
        })
        .await;
    eprintln!("changed address answered {took:?} after the change");
}
