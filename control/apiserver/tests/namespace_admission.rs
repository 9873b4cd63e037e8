//! Creating into a namespace: admitted while it is active, refused (403)
//! the moment this server has marked it for deletion, even though the
//! check is answered from a watch-fed cache; 404 when it does not exist.
//! Runs the real API layer on a real SQLite store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use skep_apiserver::{
    api::{Api, Query},
    routes::ResourceRoute,
    status::ApiError,
};
use skep_store::{Store, sqlite::SqliteStore};
use std::{sync::Arc, time::Duration};

fn route(api: &Api, plural: &str, ns: Option<&str>, name: Option<&str>) -> ResourceRoute {
    ResourceRoute {
        info: api.registry.lookup("", "v1", plural).expect(plural),
        namespace: ns.map(str::to_owned),
        name: name.map(str::to_owned),
        subresource: None,
    }
}

async fn create_cm(api: &Api, ns: &str, name: &str) -> Result<Value, ApiError> {
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}});
    api.create(&route(api, "configmaps", Some(ns), None), cm, &Query::new())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_follow_the_namespace_lifecycle_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("db.sqlite")).unwrap());
    let api = Api::new(store, "127.0.0.1:6443".into());

    let missing = create_cm(&api, "nowhere", "c").await.unwrap_err();
    assert!(
        matches!(missing, ApiError::NotFound { .. }),
        "create in a missing namespace: {missing:?}"
    );

    for round in 0..20 {
        let ns = format!("ns{round}");
        api.create(
            &route(&api, "namespaces", None, None),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            &Query::new(),
        )
        .await
        .unwrap();
        // Right after the namespace exists (the cache may not know it yet).
        create_cm(&api, &ns, "first").await.unwrap();
        // Odd rounds give the watch time to deliver the namespace, so the
        // check below runs against a cache that holds it as active.
        if round % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            create_cm(&api, &ns, "second").await.unwrap();
        }
        let deleted = api
            .delete(
                &route(&api, "namespaces", None, Some(&ns)),
                &json!({}),
                &Query::new(),
            )
            .await
            .unwrap();
        assert_eq!(deleted["status"]["phase"], "Terminating", "{deleted}");
        let refused = create_cm(&api, &ns, "late").await.unwrap_err();
        assert!(
            matches!(&refused, ApiError::Forbidden { message } if message.contains("being terminated")),
            "round {round}: create right after the namespace was deleted: {refused:?}"
        );
    }
}
