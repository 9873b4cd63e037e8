//! Publishes this node's dataplane status (programs, links, map fill,
//! policy/flows switches; see `skep_dataplane::status`) on the Node as the
//! annotation `skep.io/dataplane`, every 30 s (5 s in the first minute)
//! and only when it changed.
//! `skep ctl status` and the console read it from there: one place, no
//! extra port, visible with plain kubectl.

use serde_json::json;
use std::{path::PathBuf, time::Duration};

/// The Node annotation holding the JSON status.
pub const ANNOTATION: &str = "skep.io/dataplane";
const EVERY: Duration = Duration::from_secs(30);
/// The first minute is read more often: the dataplane turns policy and
/// flows on shortly after the agent starts, and a status that lags by 30 s
/// right after boot misleads whoever is watching the node come up.
const EARLY: Duration = Duration::from_secs(5);
const EARLY_FOR: Duration = Duration::from_secs(60);

pub async fn run(client: skep_client::Client, node: String, pin_root: PathBuf) {
    let mut last: Option<String> = None;
    let started = tokio::time::Instant::now();
    let mut first = true;
    loop {
        if !first {
            let wait = if started.elapsed() < EARLY_FOR {
                EARLY
            } else {
                EVERY
            };
            tokio::time::sleep(wait).await;
        }
        first = false;
        let root = pin_root.clone();
        // Walks every hash map's keys: blocking work.
        let read = tokio::task::spawn_blocking(move || skep_dataplane::status::read(&root)).await;
        let value = match read {
            Ok(Ok(status)) => json!({
                "ok": true,
                "status": status,
                "at": crate::pods::status::now(),
            }),
            Ok(Err(e)) => {
                json!({"ok": false, "error": e.to_string(), "at": crate::pods::status::now()})
            }
            Err(e) => {
                json!({"ok": false, "error": e.to_string(), "at": crate::pods::status::now()})
            }
        };
        // Compare without the time stamp: an unchanged dataplane costs no write.
        let mut key = value.clone();
        if let Some(o) = key.as_object_mut() {
            o.remove("at");
        }
        let key = key.to_string();
        if last.as_deref() == Some(key.as_str()) {
            continue;
        }
        let patch = json!({"metadata": {"annotations": {ANNOTATION: value.to_string()}}});
        match client
            .merge_patch(&format!("/api/v1/nodes/{node}"), &patch)
            .await
        {
            Ok(_) => last = Some(key),
            Err(e) => tracing::warn!(error = %e, "publishing the dataplane status failed"),
        }
    }
}
