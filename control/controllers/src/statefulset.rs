//! StatefulSet controller: pods with stable names `<set>-<ordinal>`,
//! hostname = pod name and subdomain = `serviceName`, and one PVC per
//! `volumeClaimTemplates` entry and ordinal (`<claim>-<set>-<ordinal>`,
//! created before the pod, kept after it).
//!
//! OrderedReady (default): ordinal i is created only when 0..i are Running
//! and Ready; scale-down removes the highest ordinal first, one at a time.
//! Parallel: all at once. RollingUpdate replaces pods whose revision
//! (`controller-revision-hash` = `<set>-<template hash>`) is not the
//! current template's, highest ordinal first, one at a time, only while
//! every other pod is Running and Ready, and only ordinals ≥ `partition`;
//! a pod below the partition that must be recreated gets the current
//! revision's template, kept in its ControllerRevision (`revisions`).
//! OnDelete leaves replacement to the user.

use crate::{
    client::{Client, PODS},
    deployment::template_hash,
    enqueue,
    error::Result,
    events::EventType,
    informer::{Informer, Informers},
    meta,
    own_writes::OwnWrites,
    queue::Queue,
    runner::{Reconciler, Requeue},
};
use serde_json::{Value, json};
use std::{collections::BTreeMap, sync::Arc};

pub const STATEFUL_SETS: crate::client::Gvr = ("apps", "v1", "statefulsets");
pub const PVCS: crate::client::Gvr = ("", "v1", "persistentvolumeclaims");
pub const REVISION_LABEL: &str = "controller-revision-hash";
pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

#[derive(Debug)]
pub struct StatefulSetController {
    client: Client,
    sets: Arc<Informer>,
    pods: Arc<Informer>,
    revisions: Arc<Informer>,
    written: OwnWrites,
}

/// The ordinal in `<set>-<ordinal>`.
fn ordinal(set: &str, pod: &str) -> Option<i64> {
    pod.strip_prefix(set)?.strip_prefix('-')?.parse().ok()
}

fn running_and_ready(p: &Value) -> bool {
    meta::pod_phase(p) == "Running" && meta::pod_ready(p) && !meta::is_deleting(p)
}

impl StatefulSetController {
    pub fn start(
        client: &Client,
        informers: &Informers,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let queue = Queue::new();
        let c = Arc::new(Self {
            client: client.clone(),
            sets: informers.get_or_create(client.info(STATEFUL_SETS)?),
            pods: informers.get_or_create(client.info(PODS)?),
            revisions: informers
                .get_or_create(client.info(crate::revisions::CONTROLLER_REVISIONS)?),
            written: OwnWrites::default(),
        });
        c.sets.on_change(enqueue::own_key(&queue));
        for inf in [&c.pods, &c.revisions] {
            inf.on_change(enqueue::controller_of(&queue, "StatefulSet"));
        }
        Ok(crate::runner::spawn(c, queue, 2))
    }

    fn claim_name(template: &Value, set: &str, ord: i64) -> String {
        format!("{}-{set}-{ord}", meta::name(template))
    }

    fn pod_for(sts: &Value, ord: i64, revision: &str) -> Value {
        let set = meta::name(sts);
        let name = format!("{set}-{ord}");
        let tmpl = sts.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let mut labels = tmpl
            .pointer("/metadata/labels")
            .cloned()
            .unwrap_or(json!({}));
        labels[REVISION_LABEL] = json!(revision);
        labels[POD_NAME_LABEL] = json!(name);
        labels[POD_INDEX_LABEL] = json!(ord.to_string());
        let mut spec = tmpl.get("spec").cloned().unwrap_or(json!({}));
        spec["hostname"] = json!(name);
        if let Some(svc) = sts.pointer("/spec/serviceName").and_then(Value::as_str)
            && !svc.is_empty()
        {
            spec["subdomain"] = json!(svc);
        }
        // Claims from the templates replace same-named volumes.
        let claims: Vec<Value> = sts
            .pointer("/spec/volumeClaimTemplates")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if !claims.is_empty() {
            let mut volumes: Vec<Value> = spec
                .get("volumes")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|v| {
                    !claims.iter().any(|c| {
                        meta::name(c) == v.get("name").and_then(Value::as_str).unwrap_or("")
                    })
                })
                .collect();
            for c in &claims {
                volumes.push(json!({"name": meta::name(c),
                    "persistentVolumeClaim": {"claimName": Self::claim_name(c, set, ord)}}));
            }
            spec["volumes"] = json!(volumes);
        }
        let mut metadata = json!({
            "name": name,
            "namespace": meta::namespace(sts),
            "labels": labels,
            "ownerReferences": [meta::controller_ref(sts, "apps/v1", "StatefulSet")],
        });
        if let Some(a) = tmpl.pointer("/metadata/annotations") {
            metadata["annotations"] = a.clone();
        }
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
    }

    async fn create_claims(&self, sts: &Value, ord: i64) -> Result<()> {
        let ns = meta::namespace(sts);
        for c in sts
            .pointer("/spec/volumeClaimTemplates")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let mut claim = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": Self::claim_name(c, meta::name(sts), ord), "namespace": ns,
                             "labels": sts.pointer("/spec/selector/matchLabels").cloned().unwrap_or(json!({}))},
                "spec": c.get("spec").cloned().unwrap_or(json!({}))});
            if let Some(l) = c.pointer("/metadata/labels").and_then(Value::as_object) {
                for (k, v) in l {
                    claim["metadata"]["labels"][k] = v.clone();
                }
            }
            match self.client.create(PVCS, ns, claim).await {
                Ok(_) => {}
                Err(e) if e.is_already_exists() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn delete(&self, key: &str, p: &Value) -> Result<()> {
        self.written.delete_pod(&self.client, key, p).await
    }
}

#[async_trait::async_trait]
impl Reconciler for StatefulSetController {
    fn name(&self) -> &'static str {
        "statefulset"
    }

    async fn reconcile(&self, key: &str) -> Result<Requeue> {
        let Some(sts) = self
            .written
            .current(key, &self.pods, &self.sets)
            .await
            .filter(|sts| !meta::is_deleting(sts))
        else {
            return Ok(Requeue::No);
        };
        let set = meta::name(&sts).to_owned();
        let uid = meta::uid(&sts).to_owned();
        let ns = meta::namespace(&sts).unwrap_or("default").to_owned();
        let replicas = sts
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1)
            .max(0);
        let ordered = sts
            .pointer("/spec/podManagementPolicy")
            .and_then(Value::as_str)
            != Some("Parallel");
        let template = sts.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let update_rev = crate::revisions::ensure_current(
            &self.client,
            &self.revisions,
            &sts,
            "StatefulSet",
            &template_hash(&template, 0),
        )
        .await?;
        let old_status = sts.get("status").cloned().unwrap_or(json!({}));
        let status_current = old_status
            .get("currentRevision")
            .and_then(Value::as_str)
            .unwrap_or(&update_rev)
            .to_owned();
        let rolling = sts
            .pointer("/spec/updateStrategy/type")
            .and_then(Value::as_str)
            != Some("OnDelete");
        let partition = sts
            .pointer("/spec/updateStrategy/rollingUpdate/partition")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        // Below the partition a recreated pod keeps the current revision's
        // template, read back from its ControllerRevision (upstream's
        // newVersionedStatefulSetPod).
        let current_set: Option<Value> = (rolling && status_current != update_rev)
            .then(|| {
                let r = crate::revisions::owned(&self.revisions, &sts)
                    .into_iter()
                    .find(|r| meta::name(r) == status_current)?;
                let mut old = (*sts).clone();
                old["spec"]["template"] = crate::revisions::template(&r)?;
                Some(old)
            })
            .flatten();
        let mut pods: BTreeMap<i64, Arc<Value>> = BTreeMap::new();
        for p in self.pods.list_ns(&ns) {
            if meta::controller_uid(&p) == Some(uid.as_str())
                && let Some(o) = ordinal(&set, meta::name(&p))
            {
                pods.insert(o, p);
            }
        }
        let rev_of = |p: &Value| {
            meta::labels(p)
                .get(REVISION_LABEL)
                .cloned()
                .unwrap_or_default()
        };

        // Scale down: condemned ordinals, highest first.
        let condemned: Vec<Arc<Value>> = pods
            .range(replicas..)
            .rev()
            .map(|(_, p)| p.clone())
            .collect();
        let all_healthy_below = pods.range(..replicas).all(|(_, p)| running_and_ready(p));
        for p in &condemned {
            if meta::is_deleting(p) {
                if ordered {
                    break;
                }
                continue;
            }
            if ordered && !all_healthy_below {
                break;
            }
            self.delete(key, p).await?;
            if ordered {
                break;
            }
        }

        // Create or replace missing/finished pods in ordinal order.
        for ord in 0..replicas {
            match pods.get(&ord) {
                None => {
                    self.create_claims(&sts, ord).await?;
                    let pod = match &current_set {
                        Some(old) if ord < partition => Self::pod_for(old, ord, &status_current),
                        _ => Self::pod_for(&sts, ord, &update_rev),
                    };
                    match self.client.create(PODS, Some(&ns), pod).await {
                        Ok(out) => {
                            self.written.note(key, meta::resource_version(&out));
                            self.client.event(
                                "statefulset-controller",
                                "StatefulSet",
                                &sts,
                                EventType::Normal,
                                "SuccessfulCreate",
                                format!(
                                    "create Pod {} in StatefulSet {} successful",
                                    meta::name(&out),
                                    meta::name(&sts)
                                ),
                            );
                        }
                        Err(e) if e.is_already_exists() => {}
                        Err(e) => return Err(e),
                    }
                    if ordered {
                        break;
                    }
                }
                Some(p) if meta::pod_terminal(p) && !meta::is_deleting(p) => {
                    self.delete(key, p).await?;
                    if ordered {
                        break;
                    }
                }
                Some(p) => {
                    if ordered && !running_and_ready(p) {
                        break;
                    }
                }
            }
        }

        // Rolling update: one stale pod at a time, highest ordinal first.
        let in_range: Vec<&Arc<Value>> = pods.range(..replicas).map(|(_, p)| p).collect();
        if rolling
            && in_range.len() as i64 == replicas
            && in_range.iter().all(|p| running_and_ready(p))
            && condemned.is_empty()
            && let Some((_, stale)) = pods
                .range(partition.max(0)..replicas)
                .rev()
                .find(|(_, p)| rev_of(p) != update_rev)
        {
            self.delete(key, stale).await?;
        }

        // Status.
        let live: Vec<&Arc<Value>> = pods.values().filter(|p| !meta::is_deleting(p)).collect();
        let ready = live.iter().filter(|p| meta::pod_ready(p)).count();
        let updated = live.iter().filter(|p| rev_of(p) == update_rev).count();
        let mut current_rev = status_current.clone();
        if updated as i64 == replicas && live.len() as i64 == replicas {
            current_rev = update_rev.clone();
        }
        let mut in_use: std::collections::HashSet<String> =
            live.iter().map(|p| rev_of(p)).collect();
        in_use.insert(current_rev.clone());
        in_use.insert(update_rev.clone());
        crate::revisions::prune(&self.client, &self.revisions, &sts, &in_use).await?;
        let current = live.iter().filter(|p| rev_of(p) == current_rev).count();
        let mut status = old_status.clone();
        status["observedGeneration"] = json!(meta::generation(&sts));
        status["replicas"] = json!(live.len());
        status["readyReplicas"] = json!(ready);
        status["availableReplicas"] = json!(ready);
        status["currentReplicas"] = json!(current);
        status["updatedReplicas"] = json!(updated);
        status["currentRevision"] = json!(current_rev);
        status["updateRevision"] = json!(update_rev);
        if status != old_status {
            crate::client::ignore_not_found(
                self.client
                    .patch(
                        STATEFUL_SETS,
                        Some(&ns),
                        &set,
                        Some("status"),
                        json!({"status": status}),
                    )
                    .await,
            )?;
        }
        Ok(Requeue::No)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_parse_only_for_the_set() {
        assert_eq!(ordinal("web", "web-0"), Some(0));
        assert_eq!(ordinal("web", "web-12"), Some(12));
        assert_eq!(ordinal("web", "web-x"), None);
        assert_eq!(ordinal("web", "webb-1"), None);
    }

    #[test]
    fn pods_get_stable_identity_and_claims() {
        let sts = json!({"metadata": {"name": "db", "namespace": "ns", "uid": "u"},
            "spec": {"serviceName": "db-hl", "template": {"metadata": {"labels": {"app": "db"}},
                "spec": {"containers": [{"name": "c"}]}},
                "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {}}]}});
        let p = StatefulSetController::pod_for(&sts, 2, "db-abc");
        assert_eq!(p["metadata"]["name"], "db-2");
        assert_eq!(p["spec"]["hostname"], "db-2");
        assert_eq!(p["spec"]["subdomain"], "db-hl");
        assert_eq!(
            p["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "data-db-2"
        );
        assert_eq!(p["metadata"]["labels"][POD_INDEX_LABEL], "2");
    }
}
