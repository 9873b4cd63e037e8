//! PersistentVolume binder: binds claims to volumes, drives dynamic
//! provisioning, releases volumes whose claim is gone, and keeps claims in
//! use from disappearing (kube-controller-manager's persistentvolume-binder
//! and pvc-protection controllers, for what skep provisions).
//!
//! Claims (`pvc/<namespace>/<name>` in the queue):
//! - every live claim carries the `kubernetes.io/pvc-protection` finalizer;
//!   a deleting claim loses it once no running pod uses it;
//! - a claim created without `storageClassName` gets the default class
//!   (annotation `storageclass.kubernetes.io/is-default-class: "true"`,
//!   the newest when several are): skep's API server has no admission
//!   plugin for it, so this is done here, as upstream's retroactive
//!   default class assignment does;
//! - an unbound claim binds to the smallest matching available volume
//!   (class, access modes, capacity, selector, volume mode; a volume whose
//!   claimRef names the claim first); WaitForFirstConsumer claims wait for
//!   the scheduler's `volume.kubernetes.io/selected-node` and then only
//!   take volumes reachable from that node;
//! - with nothing to bind to, a claim whose class has a provisioner is
//!   annotated `volume.kubernetes.io/storage-provisioner` (and the beta
//!   name). For `skep.io/local-path` the class's reclaim policy goes along
//!   in `local-path.skep.io/reclaim-policy`, because the node that
//!   provisions may not read StorageClasses; the node then creates the
//!   volume pre-bound (claimRef) and this controller completes the bind.
//!
//! Volumes (`pv/<name>`): phase Available (no claim, or pre-bound to a
//! claim that is not bound yet), Bound, or Released once the claim with
//! the claimRef's uid is gone (checked against the API, not only the
//! cache). Released + Retain stays; Released + Delete of a local-path
//! volume is deleted by its node (directory first); Delete of any other
//! volume, and Recycle, end Failed with a message: skep has no deleter
//! for them.

use crate::{
    client::{Client, Gvr, NODES, PODS},
    error::Result,
    informer::{Change, Informer, Informers},
    meta,
    own_writes::OwnWrites,
    quantity,
    queue::Queue,
    runner::{Reconciler, Requeue},
};
use serde_json::{Value, json};
use skep_apiserver::selectors::LabelSelector;
use std::{sync::Arc, time::Duration};

pub const PVCS: Gvr = ("", "v1", "persistentvolumeclaims");
pub const PVS: Gvr = ("", "v1", "persistentvolumes");
pub const STORAGE_CLASSES: Gvr = ("storage.k8s.io", "v1", "storageclasses");

/// The node chosen for a WaitForFirstConsumer claim (written by the
/// scheduler).
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
pub const ANN_STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
pub const ANN_BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
/// The class's reclaim policy, for the node provisioning the claim.
pub const ANN_RECLAIM_POLICY: &str = "local-path.skep.io/reclaim-policy";
pub const ANN_BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
pub const ANN_BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
pub const ANN_DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";
const ANN_BETA_DEFAULT_CLASS: &str = "storageclass.beta.kubernetes.io/is-default-class";
pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";
/// skep's node-local directory provisioner.
pub const LOCAL_PATH_PROVISIONER: &str = "skep.io/local-path";

// ---- matching (pure functions over the objects) ----

fn str_at<'a>(v: &'a Value, p: &str) -> Option<&'a str> {
    v.pointer(p).and_then(Value::as_str)
}

/// `spec.volumeName` of a claim ("" when unbound).
pub fn volume_name(pvc: &Value) -> &str {
    str_at(pvc, "/spec/volumeName").unwrap_or("")
}

/// The class a claim asks for: its `storageClassName`, or the default
/// class when it has none (null or absent; "" explicitly means no class).
pub fn effective_class(pvc: &Value, classes: &[Arc<Value>]) -> String {
    match str_at(pvc, "/spec/storageClassName") {
        Some(c) => c.to_owned(),
        None => default_class(classes).unwrap_or_default(),
    }
}

/// The default StorageClass: the newest of those annotated as default.
pub fn default_class(classes: &[Arc<Value>]) -> Option<String> {
    classes
        .iter()
        .filter(|c| {
            [ANN_DEFAULT_CLASS, ANN_BETA_DEFAULT_CLASS]
                .iter()
                .any(|a| meta::annotation(c, a) == Some("true"))
        })
        .max_by(|a, b| {
            let t = |c: &Value| {
                str_at(c, "/metadata/creationTimestamp")
                    .unwrap_or("")
                    .to_owned()
            };
            t(a).cmp(&t(b))
                .then_with(|| meta::name(b).cmp(meta::name(a)))
        })
        .map(|c| meta::name(c).to_owned())
}

pub fn wait_for_first_consumer(class: &Value) -> bool {
    str_at(class, "/volumeBindingMode") == Some("WaitForFirstConsumer")
}

pub fn has_provisioner(class: &Value) -> bool {
    str_at(class, "/provisioner")
        .is_some_and(|p| !p.is_empty() && p != "kubernetes.io/no-provisioner")
}

fn strings(v: &Value, p: &str) -> Vec<String> {
    v.pointer(p)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect()
}

fn bytes(q: Option<&Value>) -> Option<f64> {
    match q? {
        Value::String(s) => quantity::parse(s),
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
}

/// Whether `pv` satisfies `pvc` (ignoring who else may hold it): same
/// class, every requested access mode, enough capacity, the claim's
/// selector, the same volume mode.
pub fn volume_matches_claim(pv: &Value, pvc: &Value, class: &str) -> bool {
    if str_at(pv, "/spec/storageClassName").unwrap_or("") != class {
        return false;
    }
    let modes = strings(pv, "/spec/accessModes");
    if !strings(pvc, "/spec/accessModes")
        .iter()
        .all(|m| modes.contains(m))
    {
        return false;
    }
    let want = bytes(pvc.pointer("/spec/resources/requests/storage")).unwrap_or(0.0);
    let have = bytes(pv.pointer("/spec/capacity/storage")).unwrap_or(0.0);
    if have < want {
        return false;
    }
    let mode = |v: &Value| {
        str_at(v, "/spec/volumeMode")
            .unwrap_or("Filesystem")
            .to_owned()
    };
    if mode(pv) != mode(pvc) {
        return false;
    }
    match pvc.pointer("/spec/selector") {
        Some(s) if s.as_object().is_some_and(|m| !m.is_empty()) => {
            LabelSelector::from_json(s).is_ok_and(|sel| sel.matches(&meta::labels(pv)))
        }
        _ => true,
    }
}

/// The volume's claimRef names this claim (by namespace and name, and by
/// uid when the claimRef has one).
pub fn claim_ref_names(pv: &Value, pvc: &Value) -> bool {
    let Some(r) = pv.pointer("/spec/claimRef").filter(|r| !r.is_null()) else {
        return false;
    };
    let uid = str_at(r, "/uid").unwrap_or("");
    str_at(r, "/namespace") == meta::namespace(pvc)
        && str_at(r, "/name") == Some(meta::name(pvc))
        && (uid.is_empty() || uid == meta::uid(pvc))
}

/// The volume may be bound to `pvc`: not deleting, not Released or Failed,
/// and free or pre-bound to this claim.
pub fn volume_available_for(pv: &Value, pvc: &Value) -> bool {
    if meta::is_deleting(pv) || matches!(str_at(pv, "/status/phase"), Some("Released" | "Failed")) {
        return false;
    }
    match pv.pointer("/spec/claimRef") {
        None | Some(Value::Null) => true,
        Some(_) => claim_ref_names(pv, pvc),
    }
}

/// The volume to bind `pvc` to: volumes pre-bound to it first, then the
/// smallest that fits; only volumes reachable from `node` when given.
pub fn best_volume(
    pvc: &Value,
    class: &str,
    volumes: &[Arc<Value>],
    node: Option<&Value>,
) -> Option<Arc<Value>> {
    volumes
        .iter()
        .filter(|pv| volume_available_for(pv, pvc) && volume_matches_claim(pv, pvc, class))
        .filter(|pv| node.is_none_or(|n| crate::volume_scheduling::volume_fits_node(pv, n)))
        .min_by(|a, b| {
            let pre = |pv: &Value| !claim_ref_names(pv, pvc);
            let size = |pv: &Value| bytes(pv.pointer("/spec/capacity/storage")).unwrap_or(0.0);
            pre(a)
                .cmp(&pre(b))
                .then(size(a).total_cmp(&size(b)))
                .then_with(|| meta::name(a).cmp(meta::name(b)))
        })
        .cloned()
}

/// Pods (not finished) of `ns` that mount claim `name`.
fn claim_in_use(pods: &[Arc<Value>], name: &str) -> bool {
    pods.iter().any(|p| {
        !meta::pod_terminal(p)
            && crate::volume_scheduling::claim_names(p)
                .iter()
                .any(|c| c == name)
    })
}

// ---- the controller ----

#[derive(Debug)]
pub struct PvBinder {
    client: Client,
    claims: Arc<Informer>,
    volumes: Arc<Informer>,
    classes: Arc<Informer>,
    pods: Arc<Informer>,
    nodes: Arc<Informer>,
    queue: Arc<Queue>,
    claim_writes: OwnWrites,
    volume_writes: OwnWrites,
}

fn claim_key(k: &str) -> String {
    format!("pvc/{k}")
}

fn volume_key(name: &str) -> String {
    format!("pv/{name}")
}

impl PvBinder {
    pub fn start(
        client: &Client,
        informers: &Informers,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let c = Arc::new(Self {
            client: client.clone(),
            claims: informers.get_or_create(client.info(PVCS)?),
            volumes: informers.get_or_create(client.info(PVS)?),
            classes: informers.get_or_create(client.info(STORAGE_CLASSES)?),
            pods: informers.get_or_create(client.info(PODS)?),
            nodes: informers.get_or_create(client.info(NODES)?),
            queue: Queue::new(),
            claim_writes: OwnWrites::default(),
            volume_writes: OwnWrites::default(),
        });
        let weak = Arc::downgrade(&c);
        c.claims.on_change(Arc::new(move |ch: &Change| {
            let Some(c) = weak.upgrade() else { return };
            for o in [&ch.old, &ch.new].into_iter().flatten() {
                c.queue.add(claim_key(&meta::key(o)));
                let v = volume_name(o);
                if !v.is_empty() {
                    c.queue.add(volume_key(v));
                }
            }
            if ch.new.is_none()
                && let Some(old) = &ch.old
            {
                // Volumes pre-bound to the claim are released too.
                for pv in c.volumes.list() {
                    if claim_ref_names(&pv, old) {
                        c.queue.add(volume_key(meta::name(&pv)));
                    }
                }
            }
        }));
        let weak = Arc::downgrade(&c);
        c.volumes.on_change(Arc::new(move |ch: &Change| {
            let Some(c) = weak.upgrade() else { return };
            for o in [&ch.old, &ch.new].into_iter().flatten() {
                c.queue.add(volume_key(meta::name(o)));
                if let (Some(ns), Some(n)) = (
                    str_at(o, "/spec/claimRef/namespace"),
                    str_at(o, "/spec/claimRef/name"),
                ) {
                    c.queue.add(claim_key(&format!("{ns}/{n}")));
                }
            }
            // A new or freed volume may fit a waiting claim.
            c.requeue_unbound_claims();
        }));
        let weak = Arc::downgrade(&c);
        c.classes.on_change(Arc::new(move |_: &Change| {
            if let Some(c) = weak.upgrade() {
                c.requeue_unbound_claims();
            }
        }));
        let weak = Arc::downgrade(&c);
        c.pods.on_change(Arc::new(move |ch: &Change| {
            let Some(c) = weak.upgrade() else { return };
            // Only a pod going away (or finishing) can release a
            // protected claim.
            let released = match (&ch.old, &ch.new) {
                (_, None) => true,
                (Some(o), Some(n)) => !meta::pod_terminal(o) && meta::pod_terminal(n),
                (None, Some(_)) => false,
            };
            if !released {
                return;
            }
            if let Some(p) = ch.object() {
                let ns = meta::namespace(p).unwrap_or("default");
                for name in crate::volume_scheduling::claim_names(p) {
                    c.queue.add(claim_key(&format!("{ns}/{name}")));
                }
            }
        }));
        Ok(crate::runner::spawn(c.clone(), c.queue.clone(), 2))
    }

    fn requeue_unbound_claims(&self) {
        for pvc in self.claims.list() {
            if volume_name(&pvc).is_empty() {
                self.queue.add(claim_key(&meta::key(&pvc)));
            }
        }
    }

    async fn patch_claim(
        &self,
        qkey: &str,
        pvc: &Value,
        sub: Option<&str>,
        patch: Value,
    ) -> Result<()> {
        let out = self
            .client
            .patch(PVCS, meta::namespace(pvc), meta::name(pvc), sub, patch)
            .await?;
        self.claim_writes.note(qkey, meta::resource_version(&out));
        Ok(())
    }

    async fn patch_volume(
        &self,
        qkey: &str,
        pv: &Value,
        sub: Option<&str>,
        patch: Value,
    ) -> Result<()> {
        let out = self
            .client
            .patch(PVS, None, meta::name(pv), sub, patch)
            .await?;
        self.volume_writes.note(qkey, meta::resource_version(&out));
        Ok(())
    }

    async fn claim_phase(&self, qkey: &str, pvc: &Value, phase: &str) -> Result<()> {
        if str_at(pvc, "/status/phase") == Some(phase) {
            return Ok(());
        }
        self.patch_claim(
            qkey,
            pvc,
            Some("status"),
            json!({"status": {"phase": phase}}),
        )
        .await
    }

    async fn volume_phase(
        &self,
        qkey: &str,
        pv: &Value,
        phase: &str,
        message: Option<&str>,
    ) -> Result<()> {
        if str_at(pv, "/status/phase") == Some(phase) && str_at(pv, "/status/message") == message {
            return Ok(());
        }
        self.patch_volume(
            qkey,
            pv,
            Some("status"),
            json!({"status": {"phase": phase, "message": message}}),
        )
        .await
    }

    async fn reconcile_claim(&self, qkey: &str, key: &str) -> Result<Requeue> {
        self.claim_writes.catch_up(qkey, &self.claims).await;
        let Some(pvc) = self.claims.get(key) else {
            self.claim_writes.forget(qkey);
            return Ok(Requeue::No);
        };
        let ns = meta::namespace(&pvc).unwrap_or("default").to_owned();
        let finalizers = strings(&pvc, "/metadata/finalizers");
        let protected = finalizers.iter().any(|f| f == PVC_PROTECTION);
        if meta::is_deleting(&pvc) {
            if protected && !claim_in_use(&self.pods.list_ns(&ns), meta::name(&pvc)) {
                let rest: Vec<&String> =
                    finalizers.iter().filter(|f| *f != PVC_PROTECTION).collect();
                let patch = json!({"metadata": {"finalizers": rest,
                    "resourceVersion": meta::resource_version(&pvc).to_string()}});
                crate::client::ignore_not_found(self.patch_claim(qkey, &pvc, None, patch).await)?;
            }
            return Ok(Requeue::No);
        }
        if !protected {
            let mut all = finalizers.clone();
            all.push(PVC_PROTECTION.into());
            let patch = json!({"metadata": {"finalizers": all,
                "resourceVersion": meta::resource_version(&pvc).to_string()}});
            self.patch_claim(qkey, &pvc, None, patch).await?;
            return Ok(Requeue::No);
        }
        let classes = self.classes.list();
        if str_at(&pvc, "/spec/storageClassName").is_none()
            && let Some(def) = default_class(&classes)
        {
            let patch = json!({"metadata": {"resourceVersion": meta::resource_version(&pvc).to_string()},
                "spec": {"storageClassName": def}});
            self.patch_claim(qkey, &pvc, None, patch).await?;
            return Ok(Requeue::No);
        }
        let class_name = effective_class(&pvc, &classes);
        let bound_to = volume_name(&pvc).to_owned();
        if !bound_to.is_empty() {
            return self.sync_bound_claim(qkey, &pvc, &bound_to).await;
        }
        let class = (!class_name.is_empty())
            .then(|| self.classes.get(&class_name))
            .flatten();
        let delayed = class.as_deref().is_some_and(wait_for_first_consumer);
        let selected = meta::annotation(&pvc, ANN_SELECTED_NODE).map(str::to_owned);
        let node = selected.as_deref().and_then(|n| self.nodes.get(n));
        let volumes = self.volumes.list();
        let target = if delayed && selected.is_none() {
            // Only a volume made for this claim binds before a consumer
            // exists.
            volumes
                .iter()
                .find(|pv| {
                    claim_ref_names(pv, &pvc)
                        && volume_available_for(pv, &pvc)
                        && volume_matches_claim(pv, &pvc, &class_name)
                })
                .cloned()
        } else if selected.is_some() && node.is_none() {
            // The node is not in the cache (yet): only volumes made for
            // the claim, whose node is known to be right.
            volumes
                .iter()
                .find(|pv| claim_ref_names(pv, &pvc) && volume_matches_claim(pv, &pvc, &class_name))
                .cloned()
        } else {
            best_volume(&pvc, &class_name, &volumes, node.as_deref())
        };
        if let Some(pv) = target {
            self.bind(qkey, &pvc, &pv).await?;
            return Ok(Requeue::No);
        }
        if let Some(class) = &class
            && has_provisioner(class)
            && (!delayed || selected.is_some())
        {
            let provisioner = str_at(class, "/provisioner").unwrap_or("");
            if meta::annotation(&pvc, ANN_STORAGE_PROVISIONER) != Some(provisioner) {
                let mut ann = json!({ANN_STORAGE_PROVISIONER: provisioner,
                    ANN_BETA_STORAGE_PROVISIONER: provisioner});
                if provisioner == LOCAL_PATH_PROVISIONER {
                    ann[ANN_RECLAIM_POLICY] =
                        json!(str_at(class, "/reclaimPolicy").unwrap_or("Delete"));
                }
                self.patch_claim(qkey, &pvc, None, json!({"metadata": {"annotations": ann}}))
                    .await?;
            }
            if provisioner == LOCAL_PATH_PROVISIONER && !delayed {
                tracing::warn!(claim = %key, class = %class_name,
                    "local-path volumes are made on the consuming pod's node: the class needs volumeBindingMode WaitForFirstConsumer");
            }
        }
        self.claim_phase(qkey, &pvc, "Pending").await?;
        Ok(Requeue::No)
    }

    /// Both halves of a bind: the volume's claimRef (the lock: a
    /// resourceVersion precondition, so two claims never take one
    /// volume), then the claim's volumeName, then both statuses.
    async fn bind(&self, qkey: &str, pvc: &Value, pv: &Value) -> Result<()> {
        let pv_name = meta::name(pv).to_owned();
        let vkey = volume_key(&pv_name);
        let claim_ref = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "namespace": meta::namespace(pvc), "name": meta::name(pvc), "uid": meta::uid(pvc),
            "resourceVersion": meta::resource_version(pvc).to_string()});
        let mut pv_patch = json!({"metadata": {"resourceVersion": meta::resource_version(pv).to_string()},
            "spec": {"claimRef": claim_ref}});
        if !claim_ref_names(pv, pvc) {
            pv_patch["metadata"]["annotations"] = json!({ANN_BOUND_BY_CONTROLLER: "yes"});
        }
        let out = self
            .client
            .patch(PVS, None, &pv_name, None, pv_patch)
            .await?;
        self.volume_writes.note(&vkey, meta::resource_version(&out));
        let patch = json!({"metadata": {"resourceVersion": meta::resource_version(pvc).to_string(),
                "annotations": {ANN_BIND_COMPLETED: "yes", ANN_BOUND_BY_CONTROLLER: "yes"}},
            "spec": {"volumeName": pv_name}});
        self.patch_claim(qkey, pvc, None, patch).await?;
        self.volume_phase(&vkey, &out, "Bound", None).await?;
        self.claim_bound_status(qkey, pvc, &out).await?;
        tracing::info!(claim = %meta::key(pvc), volume = %pv_name, "claim bound");
        Ok(())
    }

    async fn claim_bound_status(&self, qkey: &str, pvc: &Value, pv: &Value) -> Result<()> {
        let status = json!({"phase": "Bound",
            "accessModes": pv.pointer("/spec/accessModes").cloned().unwrap_or(json!([])),
            "capacity": pv.pointer("/spec/capacity").cloned().unwrap_or(json!({}))});
        let cur = pvc.get("status").cloned().unwrap_or(json!({}));
        if ["phase", "accessModes", "capacity"]
            .iter()
            .all(|k| cur.get(*k) == status.get(*k))
        {
            return Ok(());
        }
        self.patch_claim(qkey, pvc, Some("status"), json!({"status": status}))
            .await
    }

    async fn sync_bound_claim(&self, qkey: &str, pvc: &Value, pv_name: &str) -> Result<Requeue> {
        let Some(pv) = self.volumes.get(pv_name) else {
            // Bound once, the volume is gone: Lost (upstream's phase).
            if str_at(pvc, "/status/phase") == Some("Bound") {
                self.claim_phase(qkey, pvc, "Lost").await?;
            } else {
                self.claim_phase(qkey, pvc, "Pending").await?;
            }
            return Ok(Requeue::No);
        };
        let free = pv.pointer("/spec/claimRef").is_none_or(Value::is_null);
        if free {
            // A claim naming its volume (spec.volumeName set by the user):
            // take the volume if it fits.
            let class = effective_class(pvc, &self.classes.list());
            if volume_available_for(&pv, pvc) && volume_matches_claim(&pv, pvc, &class) {
                self.bind(qkey, pvc, &pv).await?;
            } else {
                self.claim_phase(qkey, pvc, "Pending").await?;
            }
            return Ok(Requeue::No);
        }
        if !claim_ref_names(&pv, pvc) {
            // The volume belongs to another claim.
            self.claim_phase(qkey, pvc, "Pending").await?;
            return Ok(Requeue::No);
        }
        if meta::annotation(pvc, ANN_BIND_COMPLETED) != Some("yes") {
            self.patch_claim(
                qkey,
                pvc,
                None,
                json!({"metadata": {"annotations": {ANN_BIND_COMPLETED: "yes"}}}),
            )
            .await?;
        }
        self.claim_bound_status(qkey, pvc, &pv).await?;
        Ok(Requeue::No)
    }

    async fn reconcile_volume(&self, qkey: &str, name: &str) -> Result<Requeue> {
        self.volume_writes.catch_up(qkey, &self.volumes).await;
        let Some(pv) = self.volumes.get(name) else {
            self.volume_writes.forget(qkey);
            return Ok(Requeue::No);
        };
        if meta::is_deleting(&pv) {
            return Ok(Requeue::No);
        }
        let Some(claim_ref) = pv.pointer("/spec/claimRef").filter(|r| !r.is_null()) else {
            self.volume_phase(qkey, &pv, "Available", None).await?;
            return Ok(Requeue::No);
        };
        let ns = str_at(claim_ref, "/namespace")
            .unwrap_or("default")
            .to_owned();
        let claim = str_at(claim_ref, "/name").unwrap_or("").to_owned();
        let uid = str_at(claim_ref, "/uid").unwrap_or("").to_owned();
        let cached = self
            .claims
            .get(&format!("{ns}/{claim}"))
            .filter(|c| uid.is_empty() || meta::uid(c) == uid);
        if let Some(pvc) = cached {
            let bound_to = volume_name(&pvc);
            if bound_to == name {
                self.volume_phase(qkey, &pv, "Bound", None).await?;
            } else if bound_to.is_empty() {
                // Pre-bound, or the bind is under way.
                self.volume_phase(qkey, &pv, "Available", None).await?;
            } else if meta::annotation(&pv, ANN_BOUND_BY_CONTROLLER) == Some("yes") {
                // The claim went to another volume: undo our half-bind.
                let patch = json!({"metadata": {"resourceVersion": meta::resource_version(&pv).to_string()},
                    "spec": {"claimRef": null}});
                self.patch_volume(qkey, &pv, None, patch).await?;
            }
            return Ok(Requeue::No);
        }
        if uid.is_empty() {
            // Pre-bound by name to a claim that does not exist yet.
            self.volume_phase(qkey, &pv, "Available", None).await?;
            return Ok(Requeue::No);
        }
        // The cache says the claim is gone; the API must agree before the
        // volume is released (and maybe deleted with its data).
        match self.client.get(PVCS, Some(&ns), &claim).await {
            Ok(live) if meta::uid(&live) == uid => {
                return Ok(Requeue::After(Duration::from_secs(1)));
            }
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        let policy = str_at(&pv, "/spec/persistentVolumeReclaimPolicy").unwrap_or("Retain");
        let local = meta::annotation(&pv, ANN_PROVISIONED_BY) == Some(LOCAL_PATH_PROVISIONER);
        match policy {
            "Delete" if !local => {
                self.volume_phase(
                    qkey,
                    &pv,
                    "Failed",
                    Some("no deleter for this volume: skep deletes only volumes provisioned by skep.io/local-path"),
                )
                .await?
            }
            "Recycle" => {
                self.volume_phase(
                    qkey,
                    &pv,
                    "Failed",
                    Some("the Recycle reclaim policy is not supported"),
                )
                .await?
            }
            // Retain keeps it; a local-path Delete volume is removed by its
            // node once it sees Released.
            _ => self.volume_phase(qkey, &pv, "Released", None).await?,
        }
        Ok(Requeue::No)
    }
}

#[async_trait::async_trait]
impl Reconciler for PvBinder {
    fn name(&self) -> &'static str {
        "pv-binder"
    }

    async fn reconcile(&self, key: &str) -> Result<Requeue> {
        if let Some(k) = key.strip_prefix("pvc/") {
            self.reconcile_claim(key, k).await
        } else if let Some(n) = key.strip_prefix("pv/") {
            self.reconcile_volume(key, n).await
        } else {
            Ok(Requeue::No)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pvc(class: Option<&str>, storage: &str, modes: &[&str]) -> Value {
        let mut c = json!({"metadata": {"name": "data", "namespace": "ns", "uid": "u1"},
            "spec": {"accessModes": modes, "resources": {"requests": {"storage": storage}}}});
        if let Some(cl) = class {
            c["spec"]["storageClassName"] = json!(cl);
        }
        c
    }

    fn pv(name: &str, class: &str, storage: &str, modes: &[&str]) -> Arc<Value> {
        Arc::new(
            json!({"metadata": {"name": name, "labels": {"tier": "fast"}},
            "spec": {"storageClassName": class, "capacity": {"storage": storage}, "accessModes": modes},
            "status": {"phase": "Available"}}),
        )
    }

    #[test]
    fn a_volume_matches_on_class_modes_capacity_selector_and_mode() {
        let c = pvc(Some("slow"), "1Gi", &["ReadWriteOnce"]);
        assert!(volume_matches_claim(
            &pv("a", "slow", "1Gi", &["ReadWriteOnce"]),
            &c,
            "slow"
        ));
        assert!(volume_matches_claim(
            &pv("a", "slow", "2G", &["ReadWriteOnce", "ReadOnlyMany"]),
            &c,
            "slow"
        ));
        assert!(
            !volume_matches_claim(&pv("a", "fast", "1Gi", &["ReadWriteOnce"]), &c, "slow"),
            "class"
        );
        assert!(
            !volume_matches_claim(&pv("a", "slow", "1G", &["ReadWriteOnce"]), &c, "slow"),
            "1G < 1Gi"
        );
        assert!(
            !volume_matches_claim(&pv("a", "slow", "1Gi", &["ReadOnlyMany"]), &c, "slow"),
            "modes"
        );
        let mut sel = c.clone();
        sel["spec"]["selector"] = json!({"matchLabels": {"tier": "fast"}});
        assert!(volume_matches_claim(
            &pv("a", "slow", "1Gi", &["ReadWriteOnce"]),
            &sel,
            "slow"
        ));
        sel["spec"]["selector"] = json!({"matchLabels": {"tier": "cold"}});
        assert!(
            !volume_matches_claim(&pv("a", "slow", "1Gi", &["ReadWriteOnce"]), &sel, "slow"),
            "selector"
        );
        let mut block = c.clone();
        block["spec"]["volumeMode"] = json!("Block");
        assert!(
            !volume_matches_claim(&pv("a", "slow", "1Gi", &["ReadWriteOnce"]), &block, "slow"),
            "volumeMode"
        );
    }

    #[test]
    fn the_smallest_free_volume_wins_and_prebound_ones_first() {
        let c = pvc(Some(""), "1Gi", &["ReadWriteOnce"]);
        let big = pv("big", "", "10Gi", &["ReadWriteOnce"]);
        let small = pv("small", "", "2Gi", &["ReadWriteOnce"]);
        let mut taken = (*pv("taken", "", "1Gi", &["ReadWriteOnce"])).clone();
        taken["spec"]["claimRef"] = json!({"namespace": "ns", "name": "other", "uid": "u2"});
        let mut released = (*pv("released", "", "1Gi", &["ReadWriteOnce"])).clone();
        released["status"]["phase"] = json!("Released");
        let vols = vec![
            big.clone(),
            small.clone(),
            Arc::new(taken),
            Arc::new(released),
        ];
        assert_eq!(
            meta::name(&best_volume(&c, "", &vols, None).unwrap()),
            "small"
        );
        let mut mine = (*pv("mine", "", "10Gi", &["ReadWriteOnce"])).clone();
        mine["spec"]["claimRef"] = json!({"namespace": "ns", "name": "data", "uid": "u1"});
        let mut vols2 = vols.clone();
        vols2.push(Arc::new(mine));
        assert_eq!(
            meta::name(&best_volume(&c, "", &vols2, None).unwrap()),
            "mine"
        );
        // A claimRef with another uid names an older claim of that name.
        let mut stale = (*pv("stale", "", "1Gi", &["ReadWriteOnce"])).clone();
        stale["spec"]["claimRef"] = json!({"namespace": "ns", "name": "data", "uid": "old"});
        assert!(!volume_available_for(&stale, &c));
    }

    #[test]
    fn node_affinity_limits_volumes_to_the_selected_node() {
        let c = pvc(Some("local"), "1Gi", &["ReadWriteOnce"]);
        let mut on_a = (*pv("on-a", "local", "1Gi", &["ReadWriteOnce"])).clone();
        on_a["spec"]["nodeAffinity"] = json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": ["a"]}]}]}});
        let vols = vec![Arc::new(on_a)];
        let node =
            |n: &str| json!({"metadata": {"name": n, "labels": {"kubernetes.io/hostname": n}}});
        assert!(best_volume(&c, "local", &vols, Some(&node("a"))).is_some());
        assert!(best_volume(&c, "local", &vols, Some(&node("b"))).is_none());
    }

    #[test]
    fn claims_without_a_class_get_the_newest_default() {
        let sc = |name: &str, default: bool, t: &str| {
            Arc::new(json!({"metadata": {"name": name, "creationTimestamp": t,
                "annotations": {ANN_DEFAULT_CLASS: if default {"true"} else {"false"}}}}))
        };
        let classes = vec![
            sc("old", true, "2024-01-01T00:00:00Z"),
            sc("new", true, "2025-01-01T00:00:00Z"),
            sc("other", false, "2026-01-01T00:00:00Z"),
        ];
        assert_eq!(default_class(&classes).as_deref(), Some("new"));
        assert_eq!(effective_class(&pvc(None, "1Gi", &[]), &classes), "new");
        assert_eq!(effective_class(&pvc(Some(""), "1Gi", &[]), &classes), "");
        assert_eq!(effective_class(&pvc(Some("x"), "1Gi", &[]), &classes), "x");
        assert_eq!(
            default_class(&[sc("other", false, "2026-01-01T00:00:00Z")]),
            None
        );
    }

    #[test]
    fn a_claim_is_in_use_while_a_running_pod_mounts_it() {
        let pod = |phase: &str| {
            Arc::new(json!({"metadata": {"name": "p", "namespace": "ns"},
                "spec": {"volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "data"}}]},
                "status": {"phase": phase}}))
        };
        assert!(claim_in_use(&[pod("Running")], "data"));
        assert!(claim_in_use(&[pod("Pending")], "data"));
        assert!(!claim_in_use(&[pod("Succeeded")], "data"));
        assert!(!claim_in_use(&[pod("Running")], "other"));
    }
}
