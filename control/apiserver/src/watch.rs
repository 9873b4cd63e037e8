//! Watches: a stream of `{"type": ..., "object": ...}` lines, one per event,
//! fed by a store watch. Implements the resourceVersion semantics of
//! kube-apiserver (unset/"0": current state as ADDED events first; N: every
//! change after N), label/field selectors (an object moving out of the
//! selector is DELETED, into it ADDED), bookmarks, `sendInitialEvents` and
//! `timeoutSeconds`, and ERROR 410 when the requested history is compacted.

use crate::{
    api::{Api, Filters, Query},
    objects,
    routes::ResourceRoute,
    status::ApiError,
    table::{self, IncludeObject},
};
use bytes::Bytes;
use serde_json::{Value, json};
use skep_store::{Event, StoreError};
use std::{sync::Arc, time::Duration};
use tokio::sync::mpsc;

/// How often a watch with `allowWatchBookmarks` gets a BOOKMARK.
const BOOKMARK_EVERY: Duration = Duration::from_secs(15);
/// Default and maximum lifetime of one watch (kube's min-request-timeout).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// Starts a watch; the receiver yields the encoded lines (JSON), or with
/// `proto` the length-prefixed protobuf `WatchEvent` frames
/// (`application/vnd.kubernetes.protobuf;stream=watch`).
pub async fn start(
    api: Arc<Api>,
    r: ResourceRoute,
    query: Query,
    table: Option<IncludeObject>,
    proto: bool,
) -> Result<mpsc::Receiver<Bytes>, ApiError> {
    let filters = Filters::from_query(&r.info, &query)?;
    let rv: Option<i64> = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") => None,
        Some(v) => Some(v.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion {v:?} is not a valid resource version"
            ))
        })?),
    };
    let send_initial = crate::api::flag(&query, "sendInitialEvents");
    let bookmarks = crate::api::flag(&query, "allowWatchBookmarks");
    if send_initial && !bookmarks {
        return Err(ApiError::invalid(
            "ListOptions",
            "",
            vec![crate::status::Cause::invalid(
                "allowWatchBookmarks",
                "sendInitialEvents requires allowWatchBookmarks=true",
            )],
        ));
    }
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT)
        .min(DEFAULT_TIMEOUT);
    let (tx, rx) = mpsc::channel(256);
    let prefix = r.info.prefix_in(r.namespace.as_deref());

    // Initial state, when asked for (no RV, RV 0, or sendInitialEvents).
    let initial = rv.is_none_or(|v| v == 0) || send_initial;
    let (initial_items, from) = if initial {
        let mut q = query.clone();
        q.remove("limit");
        q.remove("continue");
        q.remove("resourceVersion");
        let listed = api.list(&r, &q).await?;
        (listed.items, listed.revision)
    } else {
        (Vec::new(), rv.unwrap_or(0))
    };
    let store_watch = api.store.watch(&prefix, from).await;

    let info = r.info.clone();
    tokio::spawn(async move {
        // One event in the stream's framing. A protobuf frame that cannot
        // be encoded (the encoder rejects the object's values) goes out as
        // an ERROR event rather than breaking the framing.
        let frame = |kind: &str, object: Value| -> Bytes {
            if proto {
                let encoded = crate::protobuf::watch_frame(kind, &object).or_else(|e| {
                    tracing::warn!(error = %e, "a watch event has no protobuf form");
                    crate::protobuf::watch_frame(
                        "ERROR",
                        &ApiError::internal(format!("encoding the event failed: {e}")).to_status(),
                    )
                });
                return Bytes::from(encoded.unwrap_or_default());
            }
            let mut line = json!({"type": kind, "object": object})
                .to_string()
                .into_bytes();
            line.push(b'\n');
            Bytes::from(line)
        };
        let encode = |kind: &str, obj: Value| -> Bytes {
            let object = match table {
                Some(include) => table::table(&info, &[obj], json!({}), include),
                None => obj,
            };
            if proto {
                return frame(kind, object);
            }
            let mut line = json!({"type": kind, "object": object})
                .to_string()
                .into_bytes();
            line.push(b'\n');
            Bytes::from(line)
        };
        let bookmark = |rev: i64, initial_end: bool| -> Bytes {
            let mut meta = json!({"resourceVersion": rev.to_string()});
            if initial_end {
                meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            let obj =
                json!({"kind": info.kind, "apiVersion": info.api_version(), "metadata": meta});
            if proto {
                return frame("BOOKMARK", obj);
            }
            let mut line = json!({"type": "BOOKMARK", "object": obj})
                .to_string()
                .into_bytes();
            line.push(b'\n');
            Bytes::from(line)
        };
        let error = |e: ApiError| -> Bytes {
            if proto {
                return frame("ERROR", e.to_status());
            }
            let mut line = json!({"type": "ERROR", "object": e.to_status()})
                .to_string()
                .into_bytes();
            line.push(b'\n');
            Bytes::from(line)
        };

        let mut w = match store_watch {
            Ok(w) => w,
            Err(StoreError::Compacted { requested, .. }) => {
                let _ = tx
                    .send(error(ApiError::Expired {
                        message: format!("too old resource version: {requested}"),
                    }))
                    .await;
                return;
            }
            Err(e) => {
                let _ = tx
                    .send(error(ApiError::internal(format!("watch failed: {e}"))))
                    .await;
                return;
            }
        };
        for obj in initial_items {
            if tx.send(encode("ADDED", obj)).await.is_err() {
                return;
            }
        }
        if send_initial && tx.send(bookmark(from, true)).await.is_err() {
            return;
        }
        let mut last = from;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(BOOKMARK_EVERY);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                _ = ticker.tick(), if bookmarks => {
                    if tx.send(bookmark(last, false)).await.is_err() {
                        return;
                    }
                }
                event = w.next() => {
                    let line = match event {
                        None => return,
                        Some(Err(StoreError::Compacted { requested, .. })) => {
                            let _ = tx.send(error(ApiError::Expired { message: format!("too old resource version: {requested}") })).await;
                            return;
                        }
                        Some(Err(e)) => {
                            let _ = tx.send(error(ApiError::internal(format!("watch failed: {e}")))).await;
                            return;
                        }
                        Some(Ok(event)) => {
                            last = event.revision();
                            match translate(&event, &filters) {
                                Ok(Some((kind, obj))) => encode(kind, obj),
                                Ok(None) => continue,
                                Err(e) => {
                                    tracing::warn!(error = %e, "skipping an undecodable watch event");
                                    continue;
                                }
                            }
                        }
                    };
                    if tx.send(line).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(rx)
}

/// The API event for a store event, seen through the selectors.
fn translate(event: &Event, filters: &Filters) -> Result<Option<(&'static str, Value)>, ApiError> {
    match event {
        Event::Put { kv, prev } => {
            let new = objects::from_kv(kv)?;
            let new_match = filters.matches(&new);
            let old_match = match prev {
                Some(p) => Some(filters.matches(&objects::from_kv(p)?)),
                None => None,
            };
            Ok(match (old_match, new_match) {
                (None, true) | (Some(false), true) => Some(("ADDED", new)),
                (Some(true), true) => Some(("MODIFIED", new)),
                (Some(true), false) => Some(("DELETED", new)),
                _ => None,
            })
        }
        Event::Delete { revision, prev, .. } => {
            let Some(prev) = prev else { return Ok(None) };
            let mut obj = objects::from_kv(prev)?;
            if !filters.matches(&obj) {
                return Ok(None);
            }
            objects::set_resource_version(&mut obj, *revision);
            Ok(Some(("DELETED", obj)))
        }
    }
}
