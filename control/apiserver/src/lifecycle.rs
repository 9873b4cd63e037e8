//! Namespace deletion: a namespace being deleted is emptied (every
//! namespaced object in it is deleted), then its `kubernetes` finalizer is
//! removed and the namespace itself goes. Runs in the API server until the
//! controller manager takes it over.

use crate::{
    api::{Api, Query},
    objects,
    routes::ResourceRoute,
};
use serde_json::{Value, json};
use skep_store::ListRequest;
use std::{sync::Arc, time::Duration};

pub fn spawn_namespace_finalizer(api: Arc<Api>) {
    tokio::spawn(async move {
        let Some(ns_info) = api.registry.lookup("", "v1", "namespaces") else {
            return;
        };
        let prefix = ns_info.storage_prefix();
        loop {
            // A watch wakes the loop quickly; the timeout bounds how long a
            // missed event can delay a deletion.
            let from = api.store.revision().await.unwrap_or(0);
            if let Err(e) = finalize_all(&api).await {
                tracing::warn!(error = %e, "namespace finalization pass failed");
            }
            match api.store.watch(&prefix, from).await {
                Ok(mut w) => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), w.next()).await;
                }
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    });
}

async fn finalize_all(api: &Arc<Api>) -> Result<(), crate::status::ApiError> {
    let Some(ns_info) = api.registry.lookup("", "v1", "namespaces") else {
        return Ok(());
    };
    let page = api
        .store
        .list(ListRequest::prefix(&ns_info.storage_prefix()))
        .await
        .map_err(|e| crate::status::from_store(e, "namespaces", ""))?;
    for kv in page.items {
        let ns = objects::from_kv(&kv)?;
        if ns
            .pointer("/metadata/deletionTimestamp")
            .is_none_or(Value::is_null)
        {
            continue;
        }
        let name = objects::name(&ns).to_owned();
        let mut remaining = 0usize;
        for info in api.registry.all() {
            if !info.namespaced || info.is_virtual() {
                continue;
            }
            let route = ResourceRoute {
                info: info.clone(),
                namespace: Some(name.clone()),
                name: None,
                subresource: None,
            };
            let listed = api.list(&route, &Query::new()).await?;
            for obj in listed.items {
                remaining += 1;
                if obj
                    .pointer("/metadata/deletionTimestamp")
                    .is_some_and(|v| !v.is_null())
                {
                    continue;
                }
                let one = ResourceRoute {
                    name: Some(objects::name(&obj).to_owned()),
                    ..route.clone()
                };
                if let Err(e) = api.delete(&one, &json!({}), &Query::new()).await {
                    tracing::debug!(namespace = %name, error = %e, "deleting namespace content");
                }
            }
        }
        if remaining > 0 {
            continue;
        }
        // Empty: drop the finalizer and the namespace.
        let key = ns_info.key(None, &name);
        match api.store.delete(&key, Some(kv.mod_revision)).await {
            Ok(_) => tracing::info!(namespace = %name, "namespace deleted"),
            Err(e) => {
                tracing::debug!(namespace = %name, error = %e, "namespace changed during finalization")
            }
        }
    }
    Ok(())
}
