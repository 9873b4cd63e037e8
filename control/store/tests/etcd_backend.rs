//! Tests of the etcd backend's own behaviour (connecting, surviving an etcd
//! restart) and of `LocalEtcd`. The Store semantics themselves are covered
//! by the conformance suite, which runs against both backends.

// Test helpers panic on failure like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use skep_store::{EtcdOptions, EtcdStore, Event, ListRequest, LocalEtcd, Store, StoreError, Watch};
use std::time::{Duration, Instant};

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Shows the backend's logs (retries, re-watches) in failing tests' output.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "skep_store=info".into()),
        )
        .try_init();
}

fn local_etcd() -> LocalEtcd {
    init_tracing();
    LocalEtcd::start()
        .expect("start a local etcd (install Debian's etcd-server: cargo xtask setup)")
}

async fn connect(endpoints: Vec<String>) -> EtcdStore {
    EtcdStore::connect(EtcdOptions::new(endpoints))
        .await
        .expect("connect to local etcd")
}

async fn next_event(w: &mut Watch) -> Event {
    tokio::time::timeout(Duration::from_secs(20), w.next())
        .await
        .expect("a watch event within 20 s")
        .expect("watch still open")
        .expect("an event, not an error")
}

#[tokio::test]
async fn connect_to_a_closed_port_gives_up_with_unavailable() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    init_tracing();
    let started = Instant::now();
    let err = EtcdStore::connect(
        EtcdOptions::new(vec![endpoint.clone()]).with_connect_timeout(Duration::from_secs(2)),
    )
    .await
    .expect_err("nothing listens there");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2), "gave up after {waited:?}");
    assert!(waited < Duration::from_secs(8), "took {waited:?}");
    let message = err.to_string();
    match err {
        StoreError::Unavailable {
            endpoints,
            attempts,
            waited_s,
            ..
        } => {
            assert_eq!(endpoints, endpoint);
            assert!(attempts > 1, "only {attempts} attempt(s)");
            assert!(waited_s >= 2.0);
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(message.contains(&endpoint), "{message}");
    assert!(message.contains("attempts"), "{message}");
}

#[tokio::test]
async fn connect_with_no_endpoints_is_invalid() {
    assert!(matches!(
        EtcdStore::connect(EtcdOptions::new(Vec::new())).await,
        Err(StoreError::InvalidRequest(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_against_a_real_etcd() {
    let etcd = local_etcd();
    assert!(etcd.pid().is_some());
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    let s = connect(vec![etcd.endpoint()]).await;
    assert!(format!("{s:?}").contains(&etcd.endpoint()));

    let r0 = s.revision().await.unwrap();
    let mut w = s.watch("/smoke/", r0).await.unwrap();

    let a = s.create("/smoke/a", b("1")).await.unwrap();
    assert_eq!(a.mod_revision, r0 + 1);
    assert_eq!(a.create_revision, a.mod_revision);
    assert!(matches!(
        s.create("/smoke/a", b("again")).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(s.get("/smoke/a").await.unwrap(), Some(a.clone()));
    assert_eq!(s.get("/smoke/none").await.unwrap(), None);

    match s.update("/smoke/a", b("2"), a.mod_revision + 5).await {
        Err(StoreError::Conflict {
            expected, actual, ..
        }) => {
            assert_eq!(expected, a.mod_revision + 5);
            assert_eq!(actual, a.mod_revision);
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert!(matches!(
        s.update("/smoke/none", b("2"), 0).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.update("/smoke/a", b("2"), 0).await,
        Err(StoreError::Conflict { .. })
    ));
    let a2 = s.update("/smoke/a", b("2"), a.mod_revision).await.unwrap();
    assert_eq!(a2.mod_revision, r0 + 2);
    assert_eq!(a2.create_revision, a.create_revision);
    s.create("/smoke/b", b("b")).await.unwrap();
    s.create("/smokeless", b("outside")).await.unwrap();

    let page = s
        .list(ListRequest {
            prefix: "/smoke/",
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.items, vec![a2.clone()]);
    assert!(page.more);
    assert_eq!(page.revision, s.revision().await.unwrap());
    let rest = s
        .list(ListRequest {
            prefix: "/smoke/",
            start: page.next_start().as_deref(),
            limit: 1,
            revision: Some(page.revision),
        })
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_eq!(rest.items[0].key, "/smoke/b");
    assert!(!rest.more);
    // The whole keyspace (empty prefix) sees keys outside /smoke/ too.
    let all = s.list(ListRequest::prefix("")).await.unwrap();
    assert_eq!(all.items.len(), 3);
    // An old revision reads the old value.
    let old = s
        .list(ListRequest {
            prefix: "/smoke/",
            revision: Some(a.mod_revision),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(old.items, vec![a.clone()]);
    assert_eq!(old.revision, a.mod_revision);

    match s.delete("/smoke/a", Some(a.mod_revision)).await {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, a2.mod_revision),
        other => panic!("expected Conflict, got {other:?}"),
    }
    let d = s.delete("/smoke/a", Some(a2.mod_revision)).await.unwrap();
    assert_eq!(d.prev, a2);
    assert!(matches!(
        s.delete("/smoke/a", None).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.delete("/smoke/a", Some(d.revision)).await,
        Err(StoreError::NotFound { .. })
    ));

    // The watch saw everything under /smoke/, in order, and nothing else.
    match next_event(&mut w).await {
        Event::Put { kv, prev: None } => assert_eq!(kv, a),
        other => panic!("expected the create, got {other:?}"),
    }
    match next_event(&mut w).await {
        Event::Put { kv, prev } => {
            assert_eq!(kv, a2);
            assert_eq!(prev, Some(a.clone()));
        }
        other => panic!("expected the update, got {other:?}"),
    }
    assert_eq!(next_event(&mut w).await.key(), "/smoke/b");
    match next_event(&mut w).await {
        Event::Delete {
            key,
            revision,
            prev,
        } => {
            assert_eq!(key, "/smoke/a");
            assert_eq!(revision, d.revision);
            assert_eq!(prev, Some(a2.clone()));
        }
        other => panic!("expected the delete, got {other:?}"),
    }

    // Compaction: old reads and watches fail, naming where history starts.
    let now = s.revision().await.unwrap();
    s.compact(now).await.unwrap();
    s.compact(now - 1).await.unwrap();
    match s
        .list(ListRequest {
            prefix: "/smoke/",
            revision: Some(r0),
            ..Default::default()
        })
        .await
    {
        Err(StoreError::Compacted {
            requested,
            compacted,
        }) => {
            assert_eq!(requested, r0);
            assert_eq!(compacted, now);
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    match s.watch("/smoke/", r0).await {
        Err(StoreError::Compacted {
            requested,
            compacted,
        }) => {
            assert_eq!(requested, r0);
            assert_eq!(compacted, now);
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    s.watch("/smoke/", now - 1).await.unwrap();
    match s.compact(now + 10).await {
        Err(StoreError::FutureRevision { requested, current }) => {
            assert_eq!(requested, now + 10);
            assert_eq!(current, now);
        }
        other => panic!("expected FutureRevision, got {other:?}"),
    }
    match s.watch("/smoke/", -1).await {
        Err(StoreError::InvalidRequest(_)) => {}
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_an_etcd_restart() {
    let mut etcd = local_etcd();
    let s = connect(vec![etcd.endpoint()]).await;
    let r0 = s.revision().await.unwrap();
    let mut w = s.watch("/r/", r0).await.unwrap();
    let before = s.create("/r/before", b("x")).await.unwrap();
    assert_eq!(next_event(&mut w).await.revision(), before.mod_revision);

    etcd.kill();
    assert!(etcd.pid().is_none());
    assert!(s.get("/r/before").await.is_err(), "etcd is down");
    etcd.restart().unwrap();

    // The same store reconnects by itself (retry: the first requests may
    // still hit the broken connection).
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        match s.create("/r/after", b("y")).await {
            Ok(kv) => break kv,
            Err(e) => {
                assert!(Instant::now() < deadline, "no reconnect: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // The watch was re-created from where it stopped: the next event is the
    // first write after the restart, with no duplicate of the one before.
    let e = next_event(&mut w).await;
    assert_eq!(e.key(), "/r/after");
    assert_eq!(e.revision(), after.mod_revision);
}

/// etcd's gauge of open watchers, from its `/metrics` on the client port.
fn etcd_watchers(etcd: &LocalEtcd) -> u64 {
    use std::io::{Read, Write};
    let addr = etcd.endpoint().trim_start_matches("http://").to_owned();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
        .expect("etcd_debugging_mvcc_watcher_total in /metrics")
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_watch_cancels_it_in_etcd() {
    let etcd = local_etcd();
    let s = connect(vec![etcd.endpoint()]).await;
    let mut watches = Vec::new();
    for i in 0..20 {
        watches.push(s.watch("/drop/", 0).await.unwrap());
        s.create(&format!("/drop/{i}"), b("x")).await.unwrap();
    }
    // Each watch is being served (some may sit unread in the buffer).
    for w in &mut watches[..3] {
        assert_eq!(next_event(w).await.key(), "/drop/0");
    }
    assert!(etcd_watchers(&etcd) >= 20);
    drop(watches);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = etcd_watchers(&etcd);
        if open == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} etcd watchers still open");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The store works on after many dropped watches.
    let page = s.list(ListRequest::prefix("/drop/")).await.unwrap();
    assert_eq!(page.items.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_cluster() {
    let members = LocalEtcd::start_cluster(3).unwrap();
    let endpoints: Vec<String> = members.iter().map(LocalEtcd::endpoint).collect();
    let mut ports: Vec<&str> = endpoints.iter().map(String::as_str).collect();
    ports.dedup();
    assert_eq!(ports.len(), 3);
    let s = connect(endpoints.clone()).await;
    let kv = s.create("/ha/x", b("1")).await.unwrap();
    // Every member serves the write.
    for endpoint in &endpoints {
        let one = connect(vec![endpoint.clone()]).await;
        assert_eq!(one.get("/ha/x").await.unwrap(), Some(kv.clone()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_keeps_serving_when_a_member_dies() {
    let mut members = LocalEtcd::start_cluster(3).unwrap();
    let endpoints: Vec<String> = members.iter().map(LocalEtcd::endpoint).collect();
    let s = connect(endpoints).await;
    let r0 = s.revision().await.unwrap();
    let mut w = s.watch("/ha/", r0).await.unwrap();
    let before = s.create("/ha/before", b("x")).await.unwrap();
    assert_eq!(next_event(&mut w).await, {
        Event::Put {
            kv: before.clone(),
            prev: None,
        }
    });

    members[0].kill();
    // Writes resume once the cluster settled (it may need a new leader);
    // each probe uses a new key, as a timed-out create may still land.
    let deadline = Instant::now() + Duration::from_secs(20);
    for probe in 0.. {
        let key = format!("/ha/probe-{probe}");
        match tokio::time::timeout(Duration::from_secs(5), s.create(&key, b("p"))).await {
            Ok(Ok(_)) => break,
            other => assert!(
                Instant::now() < deadline,
                "no write went through: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // From then on no request fails, although a third of them are first
    // sent to the dead member.
    let mut last = None;
    for i in 0..30 {
        let kv = s.create(&format!("/ha/{i:02}"), b("y")).await.unwrap();
        assert_eq!(s.get(&kv.key).await.unwrap(), Some(kv.clone()));
        last = Some(kv);
    }
    let last = last.unwrap();
    // New watches work too.
    for _ in 0..10 {
        let mut w = s.watch("/ha/", last.mod_revision - 1).await.unwrap();
        assert_eq!(next_event(&mut w).await.revision(), last.mod_revision);
    }
    // The watch goes on, in order, up to the last write.
    let mut seen = before.mod_revision;
    while seen < last.mod_revision {
        let e = next_event(&mut w).await;
        assert!(e.revision() > seen, "{e:?} after revision {seen}");
        seen = e.revision();
    }
    assert_eq!(seen, last.mod_revision);
}
