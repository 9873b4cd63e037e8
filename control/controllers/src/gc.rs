//! Garbage collector: deletes objects whose owners are gone, and carries
//! out the two deletion modes that need the dependents' cooperation:
//!
//! * `foregroundDeletion` finalizer: the owner stays (with
//!   deletionTimestamp) while its dependents are deleted; once no
//!   dependent with `blockOwnerDeletion` remains, the finalizer goes and
//!   the owner with it;
//! * `orphan` finalizer: the owner's uid is removed from every dependent's
//!   ownerReferences, then the finalizer goes.
//!
//! Background deletion needs nothing special: the owner disappears at once
//! and its dependents, now dangling, are deleted here.
//!
//! Dependents are found through an index (owner uid → dependents) built
//! from the informers of the resources below; whether an owner exists is
//! always asked of the API (a cache could lag behind a just-created owner).

use crate::{
    client::{Client, ignore_not_found},
    error::Result,
    informer::{Change, Informer, Informers},
    meta,
    queue::Queue,
    runner::{Reconciler, Requeue},
};
use serde_json::{Value, json};
use skep_apiserver::resources::ResourceInfo;
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

/// Resources whose objects may have owners (or own others).
const RESOURCES: &[(&str, &str, &str)] = &[
    ("", "v1", "pods"),
    ("", "v1", "services"),
    ("", "v1", "endpoints"),
    ("", "v1", "configmaps"),
    ("", "v1", "secrets"),
    ("", "v1", "serviceaccounts"),
    ("", "v1", "persistentvolumeclaims"),
    ("", "v1", "replicationcontrollers"),
    ("apps", "v1", "replicasets"),
    ("apps", "v1", "deployments"),
    ("apps", "v1", "statefulsets"),
    ("apps", "v1", "daemonsets"),
    ("apps", "v1", "controllerrevisions"),
    ("batch", "v1", "jobs"),
    ("batch", "v1", "cronjobs"),
    ("discovery.k8s.io", "v1", "endpointslices"),
    ("policy", "v1", "poddisruptionbudgets"),
];

#[derive(Debug, Default)]
struct Index {
    /// owner uid → dependents' GC keys.
    dependents: HashMap<String, HashSet<String>>,
    /// uid → GC key, to wake owners when a dependent goes.
    by_uid: HashMap<String, String>,
}

pub struct GarbageCollector {
    client: Client,
    informers: Vec<Arc<Informer>>,
    index: Mutex<Index>,
    queue: Arc<Queue>,
}

impl std::fmt::Debug for GarbageCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GarbageCollector").finish_non_exhaustive()
    }
}

fn gc_key(i: usize, key: &str) -> String {
    format!("{i}|{key}")
}

fn owner_uids(o: &Value) -> Vec<String> {
    meta::owner_refs(o)
        .iter()
        .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

fn has_finalizer(o: &Value, f: &str) -> bool {
    skep_apiserver::objects::finalizers(o)
        .iter()
        .any(|x| x == f)
}

impl GarbageCollector {
    pub fn start(client: &Client, informers: &Informers) -> Vec<tokio::task::JoinHandle<()>> {
        let infos: Vec<Arc<ResourceInfo>> = RESOURCES
            .iter()
            .filter_map(|(g, v, p)| client.api.registry.lookup(g, v, p))
            .collect();
        let gc = Arc::new(GarbageCollector {
            client: client.clone(),
            informers: infos
                .into_iter()
                .map(|i| informers.get_or_create(i))
                .collect(),
            index: Mutex::new(Index::default()),
            queue: Queue::new(),
        });
        for (i, inf) in gc.informers.iter().enumerate() {
            let weak = Arc::downgrade(&gc);
            inf.on_change(Arc::new(move |c: &Change| {
                if let Some(gc) = weak.upgrade() {
                    gc.observe(i, c);
                }
            }));
        }
        crate::runner::spawn(gc.clone(), gc.queue.clone(), 2)
    }

    /// Keeps the index current and queues what the change may affect.
    fn observe(&self, i: usize, c: &Change) {
        let Some(obj) = c.object() else { return };
        let key = gc_key(i, &meta::key(obj));
        let uid = meta::uid(obj).to_owned();
        let old_owners = c.old.as_deref().map(owner_uids).unwrap_or_default();
        let new_owners = c.new.as_deref().map(owner_uids).unwrap_or_default();
        let mut wake = Vec::new();
        if let Ok(mut idx) = self.index.lock() {
            for o in &old_owners {
                if let Some(set) = idx.dependents.get_mut(o) {
                    set.remove(&key);
                    if set.is_empty() {
                        idx.dependents.remove(o);
                    }
                }
            }
            for o in &new_owners {
                idx.dependents
                    .entry(o.clone())
                    .or_default()
                    .insert(key.clone());
            }
            match &c.new {
                Some(_) => {
                    idx.by_uid.insert(uid.clone(), key.clone());
                }
                None => {
                    idx.by_uid.remove(&uid);
                }
            }
            // A dependent that changed or went may unblock an owner
            // waiting in foreground deletion.
            for o in old_owners.iter().chain(&new_owners) {
                if let Some(k) = idx.by_uid.get(o) {
                    wake.push(k.clone());
                }
            }
            // The dependents of an owner that went are now dangling.
            if c.new.is_none() {
                wake.extend(idx.dependents.get(&uid).into_iter().flatten().cloned());
            }
        }
        if let Some(new) = &c.new {
            let deleting = meta::is_deleting(new)
                && (has_finalizer(new, "orphan") || has_finalizer(new, "foregroundDeletion"));
            if deleting || (!new_owners.is_empty() && new_owners != old_owners) {
                wake.push(key.clone());
            }
        }
        for k in wake {
            self.queue.add(k);
        }
    }

    fn dependents_of(&self, uid: &str) -> Vec<(usize, Arc<Value>)> {
        let keys: Vec<String> = self
            .index
            .lock()
            .map(|idx| {
                idx.dependents
                    .get(uid)
                    .into_iter()
                    .flatten()
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        keys.iter()
            .filter_map(|k| {
                let (i, key) = k.split_once('|')?;
                let i: usize = i.parse().ok()?;
                Some((i, self.informers.get(i)?.get(key)?))
            })
            .collect()
    }

    async fn remove_finalizer(&self, i: usize, obj: &Value, finalizer: &str) -> Result<()> {
        let remaining: Vec<String> = skep_apiserver::objects::finalizers(obj)
            .into_iter()
            .filter(|f| f != finalizer)
            .collect();
        let patch = json!({"metadata": {
            "finalizers": remaining,
            "resourceVersion": meta::resource_version(obj).to_string(),
        }});
        let info = &self.informers[i].info;
        ignore_not_found(
            self.client
                .patch_in(info, meta::namespace(obj), meta::name(obj), None, patch)
                .await,
        )?;
        Ok(())
    }

    /// Rewrites `dep`'s ownerReferences without the ones in `drop`.
    async fn strip_owners(&self, i: usize, dep: &Value, drop: &HashSet<String>) -> Result<()> {
        let kept: Vec<Value> = meta::owner_refs(dep)
            .into_iter()
            .filter(|r| {
                r.get("uid")
                    .and_then(Value::as_str)
                    .is_none_or(|u| !drop.contains(u))
            })
            .collect();
        let patch = json!({"metadata": {
            "ownerReferences": if kept.is_empty() { Value::Null } else { json!(kept) },
            "resourceVersion": meta::resource_version(dep).to_string(),
        }});
        let info = &self.informers[i].info;
        ignore_not_found(
            self.client
                .patch_in(info, meta::namespace(dep), meta::name(dep), None, patch)
                .await,
        )?;
        Ok(())
    }

    async fn orphan_dependents(&self, i: usize, obj: &Value) -> Result<()> {
        let uid = meta::uid(obj).to_owned();
        let drop = HashSet::from([uid.clone()]);
        for (j, dep) in self.dependents_of(&uid) {
            self.strip_owners(j, &dep, &drop).await?;
        }
        self.remove_finalizer(i, obj, "orphan").await
    }

    async fn delete_dependents(&self, i: usize, obj: &Value) -> Result<Requeue> {
        let uid = meta::uid(obj).to_owned();
        let mut blocking = 0usize;
        for (j, dep) in self.dependents_of(&uid) {
            let blocks = meta::owner_refs(&dep).iter().any(|r| {
                r.get("uid").and_then(Value::as_str) == Some(uid.as_str())
                    && r.get("blockOwnerDeletion").and_then(Value::as_bool) == Some(true)
            });
            if blocks {
                blocking += 1;
            }
            if meta::is_deleting(&dep) {
                continue;
            }
            let info = &self.informers[j].info;
            // Dependents that own things are deleted in the foreground too,
            // so the whole tree goes bottom-up; pods are left to the
            // kubelet's graceful termination.
            let policy = if info.plural == "pods" {
                "Background"
            } else {
                "Foreground"
            };
            ignore_not_found(
                self.client
                    .delete_in(
                        info,
                        meta::namespace(&dep),
                        meta::name(&dep),
                        Some(policy),
                        Some(meta::uid(&dep)),
                    )
                    .await,
            )?;
        }
        if blocking > 0 {
            // Dependents' deletions wake us; the timer covers a missed one.
            return Ok(Requeue::After(Duration::from_secs(10)));
        }
        self.remove_finalizer(i, obj, "foregroundDeletion").await?;
        Ok(Requeue::No)
    }

    /// Whether the owner a reference names still exists (same uid).
    async fn owner_exists(&self, dep: &Value, r: &Value) -> Result<bool> {
        let api_version = r.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = r.get("kind").and_then(Value::as_str).unwrap_or("");
        let name = r.get("name").and_then(Value::as_str).unwrap_or("");
        let uid = r.get("uid").and_then(Value::as_str).unwrap_or("");
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        let Some(info) = self.client.api.registry.by_kind(group, kind) else {
            // An owner of an unknown kind cannot be checked: keep the
            // dependent rather than delete on a guess.
            return Ok(true);
        };
        let ns = if info.namespaced {
            meta::namespace(dep)
        } else {
            None
        };
        match self.client.get_in(&info, ns, name).await {
            Ok(owner) => Ok(meta::uid(&owner) == uid),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn collect_if_dangling(&self, i: usize, obj: &Value) -> Result<()> {
        let refs = meta::owner_refs(obj);
        if refs.is_empty() || meta::is_deleting(obj) {
            return Ok(());
        }
        let mut dangling = HashSet::new();
        for r in &refs {
            if !self.owner_exists(obj, r).await?
                && let Some(u) = r.get("uid").and_then(Value::as_str)
            {
                dangling.insert(u.to_owned());
            }
        }
        if dangling.is_empty() {
            return Ok(());
        }
        let info = &self.informers[i].info;
        if dangling.len() == refs.len() {
            tracing::debug!(resource = %info.group_resource(), key = %meta::key(obj), "deleting an object whose owners are gone");
            ignore_not_found(
                self.client
                    .delete_in(
                        info,
                        meta::namespace(obj),
                        meta::name(obj),
                        None,
                        Some(meta::uid(obj)),
                    )
                    .await,
            )?;
            Ok(())
        } else {
            self.strip_owners(i, obj, &dangling).await
        }
    }
}

#[async_trait::async_trait]
impl Reconciler for GarbageCollector {
    fn name(&self) -> &'static str {
        "garbage-collector"
    }

    async fn reconcile(&self, k: &str) -> Result<Requeue> {
        let Some((i, key)) = k.split_once('|') else {
            return Ok(Requeue::No);
        };
        let Ok(i) = i.parse::<usize>() else {
            return Ok(Requeue::No);
        };
        let Some(obj) = self.informers.get(i).and_then(|inf| inf.get(key)) else {
            return Ok(Requeue::No);
        };
        if meta::is_deleting(&obj) {
            if has_finalizer(&obj, "orphan") {
                self.orphan_dependents(i, &obj).await?;
                return Ok(Requeue::No);
            }
            if has_finalizer(&obj, "foregroundDeletion") {
                return self.delete_dependents(i, &obj).await;
            }
            return Ok(Requeue::No);
        }
        self.collect_if_dangling(i, &obj).await?;
        Ok(Requeue::No)
    }
}
