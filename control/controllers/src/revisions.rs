//! ControllerRevisions (apps/v1) for DaemonSets and StatefulSets: one
//! immutable snapshot of the pod template per revision, owned by its set,
//! as upstream's history package keeps them.
//!
//! * The name is `<set>-<template hash>`, the label
//!   `controller-revision-hash` is the hash, the other labels are the
//!   template's (so `kubectl rollout history/undo` finds them by the set's
//!   selector and owner), the annotations are the set's
//!   (`kubernetes.io/change-cause` shows in the history).
//! * `data` is `{"spec":{"template":{…,"$patch":"replace"}}}`: the
//!   strategic merge patch `kubectl rollout undo` applies to the set.
//! * `revision` is one more than the highest so far; a template that comes
//!   back (an undo) has its old revision raised to the new highest.
//! * Beyond `revisionHistoryLimit` (default 10) the oldest revisions no pod
//!   uses, other than the set's current and update revisions, are deleted.

use crate::{
    client::{Client, Gvr},
    error::Result,
    informer::Informer,
    meta,
};
use serde_json::{Value, json};
use std::{collections::HashSet, sync::Arc};

pub const CONTROLLER_REVISIONS: Gvr = ("apps", "v1", "controllerrevisions");
pub const HASH_LABEL: &str = "controller-revision-hash";

/// The set's ControllerRevisions (by controller reference), oldest
/// revision first.
pub fn owned(revisions: &Informer, set: &Value) -> Vec<Arc<Value>> {
    let uid = meta::uid(set);
    let mut out: Vec<Arc<Value>> = revisions
        .list_ns(meta::namespace(set).unwrap_or("default"))
        .into_iter()
        .filter(|r| meta::controller_uid(r) == Some(uid))
        .collect();
    out.sort_by_key(|r| number(r));
    out
}

/// A revision's number.
pub fn number(r: &Value) -> i64 {
    r.get("revision").and_then(Value::as_i64).unwrap_or(0)
}

/// The pod template a revision holds.
pub fn template(r: &Value) -> Option<Value> {
    let mut t = r.pointer("/data/spec/template")?.clone();
    if let Some(m) = t.as_object_mut() {
        m.remove("$patch");
    }
    Some(t)
}

/// Makes sure the revision of `set`'s current template exists and is the
/// newest; returns its name. `kind` is the owner's kind.
pub async fn ensure_current(
    client: &Client,
    revisions: &Informer,
    set: &Value,
    kind: &str,
    hash: &str,
) -> Result<String> {
    let name = format!("{}-{hash}", meta::name(set));
    let ns = meta::namespace(set);
    let existing = owned(revisions, set);
    let highest = existing.iter().map(|r| number(r)).max().unwrap_or(0);
    if let Some(r) = existing.iter().find(|r| meta::name(r) == name) {
        if number(r) < highest {
            // The template came back (a rollback): it is the newest again.
            client
                .patch(
                    CONTROLLER_REVISIONS,
                    ns,
                    &name,
                    None,
                    json!({"revision": highest + 1}),
                )
                .await?;
        }
        return Ok(name);
    }
    let mut template = set.pointer("/spec/template").cloned().unwrap_or(json!({}));
    template["$patch"] = json!("replace");
    let mut labels = set
        .pointer("/spec/template/metadata/labels")
        .cloned()
        .unwrap_or(json!({}));
    labels[HASH_LABEL] = json!(hash);
    let mut metadata = json!({
        "name": name,
        "namespace": ns,
        "labels": labels,
        "ownerReferences": [meta::controller_ref(set, "apps/v1", kind)],
    });
    if let Some(a) = set.pointer("/metadata/annotations")
        && let Some(a) = a.as_object()
    {
        let kept: serde_json::Map<String, Value> = a
            .iter()
            .filter(|(k, _)| k.as_str() != "kubectl.kubernetes.io/last-applied-configuration")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        metadata["annotations"] = Value::Object(kept);
    }
    let revision = json!({
        "apiVersion": "apps/v1",
        "kind": "ControllerRevision",
        "metadata": metadata,
        "data": {"spec": {"template": template}},
        "revision": highest + 1,
    });
    match client.create(CONTROLLER_REVISIONS, ns, revision).await {
        Ok(_) => {}
        Err(e) if e.is_already_exists() => {}
        Err(e) => return Err(e),
    }
    Ok(name)
}

/// Deletes the oldest revisions beyond the set's history limit, sparing
/// those `in_use` (by pods or the set's status).
pub async fn prune(
    client: &Client,
    revisions: &Informer,
    set: &Value,
    in_use: &HashSet<String>,
) -> Result<()> {
    let limit = set
        .pointer("/spec/revisionHistoryLimit")
        .and_then(Value::as_i64)
        .unwrap_or(10)
        .max(0) as usize;
    let unused: Vec<Arc<Value>> = owned(revisions, set)
        .into_iter()
        .filter(|r| !in_use.contains(meta::name(r)))
        .collect();
    if unused.len() <= limit {
        return Ok(());
    }
    for r in &unused[..unused.len() - limit] {
        crate::client::ignore_not_found(
            client
                .delete(
                    CONTROLLER_REVISIONS,
                    meta::namespace(r),
                    meta::name(r),
                    Some(meta::uid(r)),
                )
                .await,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_comes_back_without_the_directive() {
        let r = json!({"data": {"spec": {"template": {"$patch": "replace",
            "metadata": {"labels": {"app": "a"}}, "spec": {"containers": []}}}}, "revision": 3});
        assert_eq!(
            template(&r),
            Some(json!({"metadata": {"labels": {"app": "a"}}, "spec": {"containers": []}}))
        );
        assert_eq!(number(&r), 3);
    }
}
