//! The controller runtime against a real SQLite store and the in-process
//! API: informers (including re-listing after compaction) and leader
//! election.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use skep_apiserver::api::Api;
use skep_controllers::{
    client::{Client, LEASES, NAMESPACES, SERVICE_ACCOUNTS},
    informer::{Change, Informer},
    leader::{self, LeaseConfig},
};
use skep_store::{Deleted, KeyValue, ListPage, ListRequest, Revision, SqliteStore, Store, Watch};
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

/// A real store whose first watch starts late: long enough for the test
/// to write and compact in between, so the informer's watch from its
/// list revision meets a genuine `Compacted`.
#[derive(Debug)]
struct LateFirstWatch {
    inner: Arc<SqliteStore>,
    first: AtomicBool,
    gate: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl Store for LateFirstWatch {
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
        self.inner.list(req).await
    }
    async fn watch(&self, prefix: &str, after: Revision) -> skep_store::Result<Watch> {
        if self.first.swap(false, Ordering::SeqCst) {
            self.gate.notified().await;
        }
        self.inner.watch(prefix, after).await
    }
    async fn compact(&self, revision: Revision) -> skep_store::Result<()> {
        self.inner.compact(revision).await
    }
}

async fn api_on(store: Arc<dyn Store>) -> Client {
    let client = Client::new(Arc::new(Api::new(store, "127.0.0.1:6443".into())));
    for ns in ["default", "kube-system"] {
        client
            .create(NAMESPACES, None, json!({"metadata": {"name": ns}}))
            .await
            .unwrap();
    }
    client
}

fn sa(name: &str) -> serde_json::Value {
    json!({"metadata": {"name": name}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informer_relists_after_compaction_and_reports_the_difference() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Arc::new(SqliteStore::open(dir.path().join("state.db")).unwrap());
    let store = Arc::new(LateFirstWatch {
        inner: sqlite.clone(),
        first: AtomicBool::new(true),
        gate: tokio::sync::Notify::new(),
    });
    let client = api_on(store.clone()).await;
    client
        .create(SERVICE_ACCOUNTS, Some("default"), sa("a"))
        .await
        .unwrap();

    let inf = Informer::new(client.info(SERVICE_ACCOUNTS).unwrap());
    let seen: Arc<Mutex<Vec<(String, &'static str)>>> = Arc::default();
    let log = seen.clone();
    inf.on_change(Arc::new(move |c: &Change| {
        let what = match (&c.old, &c.new) {
            (None, Some(_)) => "added",
            (Some(_), Some(_)) => "updated",
            _ => "deleted",
        };
        let name = c.object().unwrap()["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        log.lock().unwrap().push((name, what));
    }));
    tokio::spawn(inf.clone().run(store.clone()));
    inf.synced().await;
    assert!(inf.get("default/a").is_some());

    // While the informer's watch has not started: a is deleted, b created,
    // and the history compacted past the informer's list revision.
    client
        .delete(SERVICE_ACCOUNTS, Some("default"), "a", None)
        .await
        .unwrap();
    let b = client
        .create(SERVICE_ACCOUNTS, Some("default"), sa("b"))
        .await
        .unwrap();
    let rev = sqlite.revision().await.unwrap();
    sqlite.compact(rev).await.unwrap();
    store.gate.notify_one();

    let b_rev: i64 = b["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(inf.wait_for(b_rev, Duration::from_secs(10)).await);
    assert!(inf.get("default/a").is_none());
    assert!(inf.get("default/b").is_some());
    let seen = seen.lock().unwrap().clone();
    assert!(seen.contains(&("a".into(), "deleted")), "{seen:?}");
    assert!(seen.contains(&("b".into(), "added")), "{seen:?}");

    // Then it follows the watch again.
    let c = client
        .create(SERVICE_ACCOUNTS, Some("default"), sa("c"))
        .await
        .unwrap();
    let c_rev: i64 = c["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(inf.wait_for(c_rev, Duration::from_secs(10)).await);
    assert_eq!(inf.list_ns("default").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_takeover_after_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("state.db")).unwrap());
    let client = api_on(store).await;
    let cfg = |id: &str| LeaseConfig {
        lease_duration: Duration::from_secs(1),
        renew_every: Duration::from_millis(200),
        retry_every: Duration::from_millis(100),
        ..LeaseConfig::controller_manager(id.into())
    };
    let (a, b) = (cfg("a"), cfg("b"));
    assert!(leader::try_acquire_or_renew(&client, &a).await.unwrap());
    assert!(!leader::try_acquire_or_renew(&client, &b).await.unwrap());
    // a renews; b still loses.
    assert!(leader::try_acquire_or_renew(&client, &a).await.unwrap());
    assert!(!leader::try_acquire_or_renew(&client, &b).await.unwrap());
    // a stops renewing: b takes over once the lease has expired.
    tokio::time::timeout(Duration::from_secs(5), leader::acquire(&client, &b))
        .await
        .unwrap();
    let lease = client
        .get(LEASES, Some("kube-system"), "skep-controller-manager")
        .await
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    assert!(!leader::try_acquire_or_renew(&client, &a).await.unwrap());
}

/// Events: a new one is created with the object's reference; the same
/// event again raises the first one's count instead of adding another;
/// a different message is a new event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_posted_and_repeats_aggregated() {
    use skep_controllers::events::{EventType, Recorder};
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("state.db")).unwrap());
    let client = api_on(store).await;
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "default", "uid": "u-1", "resourceVersion": "7"}});
    let (recorder, writer) = Recorder::start(client.clone());
    let client = client.with_events(recorder);
    for _ in 0..3 {
        client.event(
            "default-scheduler",
            "Pod",
            &pod,
            EventType::Warning,
            "FailedScheduling",
            "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.".into(),
        );
    }
    client.event(
        "default-scheduler",
        "Pod",
        &pod,
        EventType::Normal,
        "Scheduled",
        "Successfully assigned default/web-1 to n1".into(),
    );
    let events = client.info(("", "v1", "events")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let items = loop {
        let list = client
            .api
            .list(
                &skep_apiserver::routes::ResourceRoute {
                    info: events.clone(),
                    namespace: Some("default".into()),
                    name: None,
                    subresource: None,
                },
                &skep_apiserver::api::Query::new(),
            )
            .await
            .unwrap();
        let items = list.items;
        let failed = items.iter().find(|e| e["reason"] == "FailedScheduling");
        if items.len() == 2 && failed.is_some_and(|e| e["count"] == 3) {
            break items;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected 2 events, FailedScheduling with count 3: {items:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for e in &items {
        assert_eq!(e["involvedObject"]["kind"], "Pod");
        assert_eq!(e["involvedObject"]["name"], "web-1");
        assert_eq!(e["involvedObject"]["uid"], "u-1");
        assert_eq!(e["source"]["component"], "default-scheduler");
        assert!(
            e["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with("web-1.")
        );
        assert!(e["lastTimestamp"].is_string() && e["firstTimestamp"].is_string());
    }
    let scheduled = items.iter().find(|e| e["reason"] == "Scheduled").unwrap();
    assert_eq!(scheduled["type"], "Normal");
    assert_eq!(scheduled["count"], 1);
    writer.abort();
}
