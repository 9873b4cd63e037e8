//! The store conformance suite: one set of tests, run against every backend
//! (embedded SQLite and a real etcd started for each test).
//!
//! Tests compare revisions relative to a starting point, because a fresh
//! etcd and a fresh SQLite store do not start at the same revision.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use bytes::Bytes;
use skep_store::{
    Compactor, EtcdOptions, EtcdStore, Event, KeyValue, ListRequest, LocalEtcd, Revision,
    SqliteStore, Store, StoreError,
};
use std::{collections::BTreeMap, sync::Arc, time::Duration};

/// A store plus whatever keeps it alive (temp dir, etcd process).
struct Fixture {
    store: Arc<dyn Store>,
    _guard: Box<dyn std::any::Any + Send>,
}

async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path().join("state.db")).expect("open sqlite store");
    Fixture {
        store: Arc::new(store),
        _guard: Box::new(dir),
    }
}

async fn etcd() -> Fixture {
    let etcd = LocalEtcd::start().expect(
        "a real etcd is needed for the etcd backend tests: install Debian's etcd-server (cargo xtask setup)",
    );
    let store = EtcdStore::connect(EtcdOptions::new(vec![etcd.endpoint()]))
        .await
        .expect("connect to local etcd");
    Fixture {
        store: Arc::new(store),
        _guard: Box::new(etcd),
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::sqlite().await).await
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::etcd().await).await
                }
            )*
        }
    };
}

conformance!(
    create_get_update_delete,
    revisions_advance_by_one_per_write,
    concurrent_cas_writers_count_exactly,
    watch_from_old_revision_replays_exactly_the_missed_events,
    watch_and_list_after_compaction_are_gone,
    compaction_keeps_current_state,
    paginated_list_is_consistent_under_concurrent_writes,
    large_values_round_trip,
    ten_thousand_keys,
    deletes_reach_watchers_with_the_deleted_value,
    prefixes_do_not_leak,
    list_at_a_future_revision_fails,
    live_watch_is_in_revision_order_across_writers,
    periodic_compaction_forgets_old_history,
);

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn next_event(w: &mut skep_store::Watch) -> Event {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("watch event within 10 s")
        .expect("watch still open")
        .expect("watch event, not an error")
}

async fn create_get_update_delete(f: Fixture) {
    let s = f.store;
    let kv = s.create("/registry/pods/default/a", b("v1")).await.unwrap();
    assert_eq!(kv.create_revision, kv.mod_revision);
    assert_eq!(kv.value, b("v1"));

    match s.create("/registry/pods/default/a", b("again")).await {
        Err(StoreError::AlreadyExists { key }) => assert_eq!(key, "/registry/pods/default/a"),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(
        s.get("/registry/pods/default/a").await.unwrap(),
        Some(kv.clone())
    );
    assert_eq!(s.get("/registry/pods/default/missing").await.unwrap(), None);

    match s
        .update("/registry/pods/default/a", b("v2"), kv.mod_revision - 1)
        .await
    {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, kv.mod_revision),
        other => panic!("expected Conflict, got {other:?}"),
    }
    let kv2 = s
        .update("/registry/pods/default/a", b("v2"), kv.mod_revision)
        .await
        .unwrap();
    assert!(kv2.mod_revision > kv.mod_revision);
    assert_eq!(kv2.create_revision, kv.create_revision);
    assert_eq!(
        s.get("/registry/pods/default/a").await.unwrap(),
        Some(kv2.clone())
    );

    match s
        .delete("/registry/pods/default/a", Some(kv.mod_revision))
        .await
    {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, kv2.mod_revision),
        other => panic!("expected Conflict on stale delete, got {other:?}"),
    }
    let deleted = s
        .delete("/registry/pods/default/a", Some(kv2.mod_revision))
        .await
        .unwrap();
    assert_eq!(deleted.prev, kv2);
    assert!(deleted.revision > kv2.mod_revision);
    assert_eq!(s.get("/registry/pods/default/a").await.unwrap(), None);

    assert!(matches!(
        s.update("/registry/pods/default/a", b("v3"), deleted.revision)
            .await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.delete("/registry/pods/default/a", None).await,
        Err(StoreError::NotFound { .. })
    ));
    // Re-creating a deleted key starts a new life.
    let again = s.create("/registry/pods/default/a", b("v4")).await.unwrap();
    assert_eq!(again.create_revision, again.mod_revision);
    assert!(again.create_revision > deleted.revision);
    // An unconditional delete works too.
    s.delete("/registry/pods/default/a", None).await.unwrap();
}

async fn revisions_advance_by_one_per_write(f: Fixture) {
    let s = f.store;
    let r0 = s.revision().await.unwrap();
    let a = s.create("/k/a", b("1")).await.unwrap();
    assert_eq!(a.mod_revision, r0 + 1);
    let a2 = s.update("/k/a", b("2"), a.mod_revision).await.unwrap();
    assert_eq!(a2.mod_revision, r0 + 2);
    // Failed writes do not consume revisions.
    let _ = s.create("/k/a", b("x")).await.unwrap_err();
    let _ = s.update("/k/a", b("x"), 1).await.unwrap_err();
    let d = s.delete("/k/a", None).await.unwrap();
    assert_eq!(d.revision, r0 + 3);
    assert_eq!(s.revision().await.unwrap(), r0 + 3);
}

async fn concurrent_cas_writers_count_exactly(f: Fixture) {
    const TASKS: usize = 16;
    const INCREMENTS: usize = 40;
    let s = f.store;
    s.create("/counter", b("0")).await.unwrap();
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut conflicts = 0usize;
            for _ in 0..INCREMENTS {
                loop {
                    let kv = s.get("/counter").await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                    match s
                        .update("/counter", b(&(n + 1).to_string()), kv.mod_revision)
                        .await
                    {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => conflicts += 1,
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for h in handles {
        conflicts += h.await.unwrap();
    }
    let kv = s.get("/counter").await.unwrap().unwrap();
    assert_eq!(
        std::str::from_utf8(&kv.value).unwrap(),
        (TASKS * INCREMENTS).to_string(),
        "lost updates ({conflicts} conflicts were retried)"
    );
    assert!(
        conflicts > 0,
        "16 concurrent writers on one key never conflicted: CAS is not being exercised"
    );
}

/// Applies a random mix of writes and returns the expected events under
/// `/w/` in order.
async fn mixed_writes(
    s: &Arc<dyn Store>,
    n: usize,
) -> Vec<(String, Option<String>, Option<String>, Revision)> {
    // (key, new value or None for delete, previous value, revision)
    let mut expected = Vec::new();
    let mut current: BTreeMap<String, (String, Revision)> = BTreeMap::new();
    for i in 0..n {
        let key = format!("/w/k{}", i % 7);
        // Writes outside the prefix must not show up.
        s.create(&format!("/x/{i}"), b("noise")).await.unwrap();
        match current.get(&key).cloned() {
            None => {
                let v = format!("v{i}");
                let kv = s.create(&key, b(&v)).await.unwrap();
                expected.push((key.clone(), Some(v.clone()), None, kv.mod_revision));
                current.insert(key, (v, kv.mod_revision));
            }
            Some((old, rev)) if i % 3 == 0 => {
                let d = s.delete(&key, Some(rev)).await.unwrap();
                expected.push((key.clone(), None, Some(old), d.revision));
                current.remove(&key);
            }
            Some((old, rev)) => {
                let v = format!("v{i}");
                let kv = s.update(&key, b(&v), rev).await.unwrap();
                expected.push((key.clone(), Some(v.clone()), Some(old), kv.mod_revision));
                current.insert(key, (v, kv.mod_revision));
            }
        }
    }
    expected
}

fn describe(e: &Event) -> (String, Option<String>, Option<String>, Revision) {
    let text = |kv: &KeyValue| String::from_utf8(kv.value.to_vec()).unwrap();
    match e {
        Event::Put { kv, prev } => (
            kv.key.clone(),
            Some(text(kv)),
            prev.as_ref().map(text),
            kv.mod_revision,
        ),
        Event::Delete {
            key,
            revision,
            prev,
        } => (key.clone(), None, prev.as_ref().map(text), *revision),
    }
}

async fn watch_from_old_revision_replays_exactly_the_missed_events(f: Fixture) {
    let s = f.store;
    let r0 = s.revision().await.unwrap();
    let expected = mixed_writes(&s, 60).await;
    let mut w = s.watch("/w/", r0).await.unwrap();
    for want in &expected {
        let got = describe(&next_event(&mut w).await);
        assert_eq!(&got, want);
    }
    // Then live events follow without a gap or a duplicate.
    let kv = s.create("/w/live", b("now")).await.unwrap();
    let got = next_event(&mut w).await;
    assert_eq!(got.revision(), kv.mod_revision);
    assert_eq!(got.key(), "/w/live");

    // Watching from the middle replays only the tail.
    let mid = expected[30].3;
    let mut w2 = s.watch("/w/", mid).await.unwrap();
    let first = describe(&next_event(&mut w2).await);
    assert_eq!(first, expected[31]);
}

async fn watch_and_list_after_compaction_are_gone(f: Fixture) {
    let s = f.store;
    for i in 0..20 {
        s.create(&format!("/c/{i}"), b("x")).await.unwrap();
    }
    let mid = s.revision().await.unwrap() - 5;
    let before_mid = mid - 10;
    s.compact(mid).await.unwrap();
    match s.watch("/c/", before_mid).await {
        Err(StoreError::Compacted { .. }) => {}
        Err(e) => panic!("expected Compacted, got error {e}"),
        Ok(mut w) => match w.next().await {
            Some(Err(StoreError::Compacted { .. })) => {}
            other => panic!("expected Compacted, got {other:?}"),
        },
    }
    match s
        .list(ListRequest {
            prefix: "/c/",
            revision: Some(before_mid),
            ..Default::default()
        })
        .await
    {
        Err(StoreError::Compacted { .. }) => {}
        other => panic!("expected Compacted list, got {other:?}"),
    }
    // The compaction point itself is still readable and watchable.
    let page = s
        .list(ListRequest {
            prefix: "/c/",
            revision: Some(mid),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.items.len(), 15);
    let mut w = s.watch("/c/", mid).await.unwrap();
    assert_eq!(next_event(&mut w).await.revision(), mid + 1);
    // Compacting again at or below is a no-op.
    s.compact(mid).await.unwrap();
    s.compact(mid - 1).await.unwrap();
}

async fn compaction_keeps_current_state(f: Fixture) {
    let s = f.store;
    let mut live = BTreeMap::new();
    for i in 0..30 {
        let key = format!("/s/{i:02}");
        let kv = s.create(&key, b("a")).await.unwrap();
        let kv = s
            .update(&key, b(&format!("b{i}")), kv.mod_revision)
            .await
            .unwrap();
        if i % 4 == 0 {
            s.delete(&key, None).await.unwrap();
        } else {
            live.insert(key, kv);
        }
    }
    let now = s.revision().await.unwrap();
    s.compact(now).await.unwrap();
    let page = s.list(ListRequest::prefix("/s/")).await.unwrap();
    let got: BTreeMap<_, _> = page
        .items
        .into_iter()
        .map(|kv| (kv.key.clone(), kv))
        .collect();
    assert_eq!(got, live);
    for (key, kv) in &live {
        assert_eq!(s.get(key).await.unwrap().as_ref(), Some(kv));
    }
    assert_eq!(s.get("/s/00").await.unwrap(), None);
    // Writes continue normally after compaction.
    let kv = s.create("/s/new", b("n")).await.unwrap();
    assert_eq!(kv.mod_revision, now + 1);
}

async fn paginated_list_is_consistent_under_concurrent_writes(f: Fixture) {
    let s = f.store;
    let mut state: BTreeMap<String, (String, Revision)> = BTreeMap::new();
    for i in 0..600 {
        let key = format!("/p/{i:04}");
        let kv = s.create(&key, b("0")).await.unwrap();
        state.insert(key, ("0".into(), kv.mod_revision));
    }
    let start_rev = s.revision().await.unwrap();

    // A writer mutates the prefix while we paginate, logging every
    // acknowledged write with its revision.
    let writer = {
        let s = s.clone();
        let mut state = state.clone();
        tokio::spawn(async move {
            let mut log = Vec::new();
            for i in 0..400usize {
                let key = format!("/p/{:04}", (i * 37) % 700);
                let op = match state.get(&key).cloned() {
                    Some((_, rev)) if i % 5 == 0 => {
                        let d = s.delete(&key, Some(rev)).await.unwrap();
                        state.remove(&key);
                        (d.revision, key, None)
                    }
                    Some((_, rev)) => {
                        let v = format!("u{i}");
                        let kv = s.update(&key, b(&v), rev).await.unwrap();
                        state.insert(key.clone(), (v.clone(), kv.mod_revision));
                        (kv.mod_revision, key, Some(v))
                    }
                    None => {
                        let v = format!("c{i}");
                        let kv = s.create(&key, b(&v)).await.unwrap();
                        state.insert(key.clone(), (v.clone(), kv.mod_revision));
                        (kv.mod_revision, key, Some(v))
                    }
                };
                log.push(op);
            }
            log
        })
    };

    // Paginate in small pages at the first page's revision.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let first = s
        .list(ListRequest {
            prefix: "/p/",
            limit: 37,
            ..Default::default()
        })
        .await
        .unwrap();
    let snapshot = first.revision;
    let mut items = first.items.clone();
    let mut next = first.next_start();
    let mut pages = 1;
    while let Some(start) = next {
        let page = s
            .list(ListRequest {
                prefix: "/p/",
                start: Some(&start),
                limit: 37,
                revision: Some(snapshot),
            })
            .await
            .unwrap();
        assert_eq!(page.revision, snapshot);
        items.extend(page.items.iter().cloned());
        next = page.next_start();
        pages += 1;
    }
    let log = writer.await.unwrap();
    assert!(pages > 10);

    // Expected state at `snapshot`: the initial state plus every logged
    // write at or below it.
    assert!(snapshot >= start_rev);
    let mut expected: BTreeMap<String, String> =
        state.into_iter().map(|(k, (v, _))| (k, v)).collect();
    for (rev, key, value) in &log {
        if *rev <= snapshot {
            match value {
                Some(v) => expected.insert(key.clone(), v.clone()),
                None => expected.remove(key),
            };
        }
    }
    let got: BTreeMap<String, String> = items
        .iter()
        .map(|kv| {
            (
                kv.key.clone(),
                String::from_utf8(kv.value.to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(got.len(), items.len(), "a key appeared on two pages");
    assert_eq!(got, expected);
    // And the same revision read in one go gives the same answer.
    let whole = s
        .list(ListRequest {
            prefix: "/p/",
            revision: Some(snapshot),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(whole.items, items);
}

async fn large_values_round_trip(f: Fixture) {
    let s = f.store;
    let big: Vec<u8> = (0..(3 * 1024 * 1024 / 2))
        .map(|i| (i % 251) as u8)
        .collect();
    let big = Bytes::from(big);
    let r0 = s.revision().await.unwrap();
    let mut w = s.watch("/big/", r0).await.unwrap();
    let kv = s.create("/big/one", big.clone()).await.unwrap();
    assert_eq!(s.get("/big/one").await.unwrap().unwrap().value, big);
    let page = s.list(ListRequest::prefix("/big/")).await.unwrap();
    assert_eq!(page.items[0].value, big);
    match next_event(&mut w).await {
        Event::Put { kv: got, .. } => assert_eq!(got.value, big),
        other => panic!("expected Put, got {other:?}"),
    }
    let d = s.delete("/big/one", Some(kv.mod_revision)).await.unwrap();
    assert_eq!(d.prev.value, big);
}

async fn ten_thousand_keys(f: Fixture) {
    let s = f.store;
    let mut handles = Vec::new();
    for t in 0..32 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            for i in (t..10_000).step_by(32) {
                s.create(&format!("/many/{i:05}"), b(&format!("value-{i}")))
                    .await
                    .unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let all = s.list(ListRequest::prefix("/many/")).await.unwrap();
    assert_eq!(all.items.len(), 10_000);
    assert!(!all.more);
    for (i, kv) in all.items.iter().enumerate() {
        assert_eq!(kv.key, format!("/many/{i:05}"));
        assert_eq!(kv.value, b(&format!("value-{i}")));
    }
    let mut count = 0;
    let mut start = None::<String>;
    loop {
        let page = s
            .list(ListRequest {
                prefix: "/many/",
                start: start.as_deref(),
                limit: 500,
                revision: Some(all.revision),
            })
            .await
            .unwrap();
        count += page.items.len();
        match page.next_start() {
            Some(n) => start = Some(n),
            None => break,
        }
    }
    assert_eq!(count, 10_000);
}

async fn deletes_reach_watchers_with_the_deleted_value(f: Fixture) {
    let s = f.store;
    let kv = s.create("/d/x", b("first")).await.unwrap();
    let kv = s.update("/d/x", b("last"), kv.mod_revision).await.unwrap();
    let mut w = s.watch("/d/", s.revision().await.unwrap()).await.unwrap();
    let d = s.delete("/d/x", None).await.unwrap();
    match next_event(&mut w).await {
        Event::Delete {
            key,
            revision,
            prev,
        } => {
            assert_eq!(key, "/d/x");
            assert_eq!(revision, d.revision);
            assert_eq!(prev, Some(kv));
        }
        other => panic!("expected Delete, got {other:?}"),
    }
}

async fn prefixes_do_not_leak(f: Fixture) {
    let s = f.store;
    for k in ["/a/1", "/a/2", "/ab/1", "/a", "/b/1"] {
        s.create(k, b(k)).await.unwrap();
    }
    let keys: Vec<String> = s
        .list(ListRequest::prefix("/a/"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["/a/1", "/a/2"]);
    let r = s.revision().await.unwrap();
    let mut w = s.watch("/a/", r).await.unwrap();
    s.create("/ab/2", b("no")).await.unwrap();
    s.create("/a/3", b("yes")).await.unwrap();
    assert_eq!(next_event(&mut w).await.key(), "/a/3");
    assert!(matches!(
        s.list(ListRequest {
            prefix: "/a/",
            start: Some("/b/"),
            ..Default::default()
        })
        .await,
        Err(StoreError::InvalidRequest(_))
    ));
}

async fn list_at_a_future_revision_fails(f: Fixture) {
    let s = f.store;
    s.create("/f/1", b("x")).await.unwrap();
    let r = s.revision().await.unwrap();
    match s
        .list(ListRequest {
            prefix: "/f/",
            revision: Some(r + 100),
            ..Default::default()
        })
        .await
    {
        Err(StoreError::FutureRevision { requested, .. }) => assert_eq!(requested, r + 100),
        other => panic!("expected FutureRevision, got {other:?}"),
    }
}

async fn live_watch_is_in_revision_order_across_writers(f: Fixture) {
    let s = f.store;
    let r0 = s.revision().await.unwrap();
    let mut w = s.watch("/o/", r0).await.unwrap();
    let mut handles = Vec::new();
    for t in 0..8 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..50 {
                s.create(&format!("/o/{t}/{i}"), b("x")).await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let mut last = r0;
    for _ in 0..400 {
        let e = next_event(&mut w).await;
        assert_eq!(e.revision(), last + 1, "gap or reorder in the watch");
        last = e.revision();
    }
}

async fn periodic_compaction_forgets_old_history(f: Fixture) {
    let s = f.store;
    let r0 = s.revision().await.unwrap();
    for i in 0..10 {
        s.create(&format!("/pc/{i}"), b("x")).await.unwrap();
    }
    let _compactor = Compactor::spawn(s.clone(), Duration::from_millis(300));
    // After two ticks the revision seen at the first tick is compacted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        s.create(&format!("/pc/t{}", s.revision().await.unwrap()), b("y"))
            .await
            .unwrap();
        let gone = match s.watch("/pc/", r0).await {
            Err(StoreError::Compacted { .. }) => true,
            Err(e) => panic!("unexpected error {e}"),
            Ok(mut w) => matches!(
                tokio::time::timeout(Duration::from_secs(5), w.next()).await,
                Ok(Some(Err(StoreError::Compacted { .. })))
            ),
        };
        if gone {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history was never compacted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Current state is intact: the ten first keys are all still there.
    let keys: Vec<String> = s
        .list(ListRequest::prefix("/pc/"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    for i in 0..10 {
        assert!(
            keys.contains(&format!("/pc/{i}")),
            "/pc/{i} lost by compaction"
        );
    }
}
