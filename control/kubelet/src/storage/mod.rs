//! Node-side storage: the `skep.io/local-path` provisioner and deleter of
//! this node, and the PersistentVolumes the pod volumes resolve claims to.
//!
//! One task lists and watches PersistentVolumeClaims and
//! PersistentVolumes. After each burst of changes (and every 10 s, so a
//! failed step is retried):
//! - a claim annotated for this provisioner (by the binder) whose
//!   `volume.kubernetes.io/selected-node` is this node (by the scheduler)
//!   and that is not bound gets its directory `DATA/storage/pvc-<uid>` and
//!   a PersistentVolume pre-bound to it;
//! - a local-path volume of this node that the binder marked Released,
//!   with reclaim policy Delete, loses its directory, then its object.
//!   Retain leaves both.
//!
//! Pods' claims are resolved to these volumes by the pod volume code
//! (pods/volumes.rs), which reads the claim and its volume through the
//! pod manager's API object source.

pub mod local_path;

use futures::StreamExt;
use serde_json::Value;
use skep_client::{Client, WatchStream};
use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

const CLAIMS: &str = "/api/v1/persistentvolumeclaims";
const VOLUMES: &str = "/api/v1/persistentvolumes";
/// Changes arriving within this window are handled together.
const BATCH: Duration = Duration::from_millis(20);
/// Everything is looked at again this often (retries of failed steps).
const RESYNC: Duration = Duration::from_secs(10);

fn name_of(v: &Value) -> String {
    v.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

fn key_of(v: &Value) -> String {
    let ns = v
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    format!("{ns}/{}", name_of(v))
}

/// Runs the node's provisioner and deleter until the task is dropped;
/// `root` is where volumes live (`DATA/storage`).
pub async fn run(client: Client, node: String, root: PathBuf) {
    loop {
        if let Err(e) = follow(&client, &node, &root).await {
            tracing::warn!(error = %e, "local-path storage: watch failed; listing again");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn list(
    client: &Client,
    path: &str,
    key: fn(&Value) -> String,
) -> Result<(BTreeMap<String, Arc<Value>>, WatchStream), String> {
    let list = client.get(path).await.map_err(|e| e.to_string())?;
    let items = list
        .get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|o| (key(o), Arc::new(o.clone())))
        .collect();
    let rv = list
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("0");
    let watch = client
        .watch(&format!(
            "{path}?resourceVersion={rv}&allowWatchBookmarks=true"
        ))
        .await
        .map_err(|e| e.to_string())?;
    Ok((items, watch))
}

type Event = Option<Result<skep_client::WatchEvent, skep_client::ClientError>>;

/// Applies one watch event to `objects`.
fn apply(
    objects: &mut BTreeMap<String, Arc<Value>>,
    ev: Event,
    key: fn(&Value) -> String,
) -> Result<(), String> {
    let ev = match ev {
        None => return Err("the API server ended the watch".into()),
        Some(Err(e)) => return Err(e.to_string()),
        Some(Ok(ev)) => ev,
    };
    match ev.kind.as_str() {
        "ADDED" | "MODIFIED" => {
            objects.insert(key(&ev.object), Arc::new(ev.object));
        }
        "DELETED" => {
            objects.remove(&key(&ev.object));
        }
        "ERROR" => return Err(format!("watch error: {}", ev.object)),
        _ => {}
    }
    Ok(())
}

async fn follow(client: &Client, node: &str, root: &std::path::Path) -> Result<(), String> {
    let (mut claims, mut claim_watch) = list(client, CLAIMS, key_of).await?;
    let (mut volumes, mut volume_watch) = list(client, VOLUMES, name_of).await?;
    reconcile(client, node, root, &claims, &volumes).await;
    let mut resync = tokio::time::interval(RESYNC);
    resync.reset();
    loop {
        tokio::select! {
            ev = claim_watch.next() => apply(&mut claims, ev, key_of)?,
            ev = volume_watch.next() => apply(&mut volumes, ev, name_of)?,
            _ = resync.tick() => {}
        }
        let deadline = tokio::time::Instant::now() + BATCH;
        loop {
            tokio::select! {
                ev = claim_watch.next() => apply(&mut claims, ev, key_of)?,
                ev = volume_watch.next() => apply(&mut volumes, ev, name_of)?,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        reconcile(client, node, root, &claims, &volumes).await;
    }
}

/// One pass: provision what this node was asked for, delete what it
/// should reclaim. Failures are logged and retried on the next pass.
async fn reconcile(
    client: &Client,
    node: &str,
    root: &std::path::Path,
    claims: &BTreeMap<String, Arc<Value>>,
    volumes: &BTreeMap<String, Arc<Value>>,
) {
    for pvc in claims.values() {
        if !local_path::wants_volume(pvc, node) {
            continue;
        }
        let Some(name) = local_path::volume_name(pvc) else {
            continue;
        };
        if volumes.contains_key(&name) {
            continue;
        }
        let dir = root.join(&name);
        let made =
            local_path::make_dir(&dir).and_then(|()| local_path::volume_for(pvc, node, &dir));
        let pv = match made {
            Ok(pv) => pv,
            Err(e) => {
                tracing::warn!(claim = %key_of(pvc), error = %e, "provisioning a local-path volume failed");
                continue;
            }
        };
        match client.create(VOLUMES, &pv).await {
            Ok(_) => {
                tracing::info!(claim = %key_of(pvc), volume = %name, dir = %dir.display(), "local-path volume provisioned")
            }
            // Made by an earlier pass whose event is still on its way.
            Err(e) if e.code() == Some(409) => {}
            Err(e) => {
                tracing::warn!(claim = %key_of(pvc), volume = %name, error = %e, "creating the PersistentVolume failed")
            }
        }
    }
    for pv in volumes.values() {
        let Some(dir) = local_path::to_delete(pv, node, root) else {
            continue;
        };
        let name = name_of(pv);
        if let Err(e) = local_path::remove_dir(&dir) {
            tracing::warn!(volume = %name, error = %e, "deleting a local-path volume's directory failed");
            continue;
        }
        match client.delete(&format!("{VOLUMES}/{name}")).await {
            Ok(_) => {
                tracing::info!(volume = %name, dir = %dir.display(), "released local-path volume deleted")
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                tracing::warn!(volume = %name, error = %e, "deleting a released PersistentVolume failed")
            }
        }
    }
}
