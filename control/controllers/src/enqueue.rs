//! Change handlers and routing shared by the workload controllers: which
//! keys a change of a watched object puts on a controller's queue.

use crate::{
    informer::{Change, Handler, Informer},
    meta,
    queue::Queue,
};
use serde_json::Value;
use std::sync::Arc;

/// A handler that queues the changed object's own key (the controller's
/// primary resource: any change of it, deletion included, is reconciled).
pub fn own_key(queue: &Arc<Queue>) -> Handler {
    let q = queue.clone();
    Arc::new(move |ch: &Change| {
        if let Some(o) = ch.object() {
            q.add(meta::key(o));
        }
    })
}

/// A handler that queues the managing controller of `kind` of the object
/// before and after the change (the owner may have changed with it).
pub fn controller_of(queue: &Arc<Queue>, kind: &'static str) -> Handler {
    let q = queue.clone();
    Arc::new(move |ch: &Change| {
        for o in [&ch.old, &ch.new].into_iter().flatten() {
            if let Some(owner) = meta::controller_key(o, kind) {
                q.add(owner);
            }
        }
    })
}

/// Queues every object of `owners` in `orphan`'s namespace whose selector
/// matches `orphan`'s labels: the candidates to adopt it.
pub fn adopters(q: &Queue, owners: &Informer, orphan: &Value) {
    let Some(ns) = meta::namespace(orphan) else {
        return;
    };
    let labels = meta::labels(orphan);
    for owner in owners.list_ns(ns) {
        if meta::selector(&owner).is_some_and(|sel| sel.matches(&labels)) {
            q.add(meta::key(&owner));
        }
    }
}

/// Queues `o`'s managing controller of `kind` when `owners` holds it with
/// the uid the reference names; a reference to an owner that was deleted
/// and recreated under the same name wakes nothing.
pub fn live_controller(q: &Queue, owners: &Informer, kind: &str, o: &Value) {
    let (Some(uid), Some(ns)) = (meta::controller_uid(o), meta::namespace(o)) else {
        return;
    };
    for r in meta::owner_refs(o) {
        if r.get("kind").and_then(Value::as_str) == Some(kind)
            && r.get("uid").and_then(Value::as_str) == Some(uid)
            && let Some(n) = r.get("name").and_then(Value::as_str)
        {
            let key = format!("{ns}/{n}");
            if owners
                .get(&key)
                .is_some_and(|owner| meta::uid(&owner) == uid)
            {
                q.add(key);
            }
        }
    }
}
