//! Deployment controller: owns one ReplicaSet per pod template (named
//! `<deployment>-<pod-template-hash>`) and moves replicas from the old ones
//! to the new one by the strategy: RollingUpdate within maxSurge /
//! maxUnavailable, or Recreate (old pods all gone before new ones start).
//! Revisions are the `deployment.kubernetes.io/revision` annotation of the
//! ReplicaSets (the newest one's is copied to the Deployment), which is
//! what `kubectl rollout history/undo` read.

use crate::{
    client::{Client, DEPLOYMENTS, PODS, REPLICA_SETS},
    enqueue,
    error::Result,
    events::EventType,
    informer::{Change, Informer, Informers},
    meta,
    own_writes::OwnWrites,
    queue::Queue,
    runner::{Reconciler, Requeue},
};
use serde_json::{Value, json};
use std::{collections::HashMap, sync::Arc, time::Duration};

/// The events' source, as upstream names it.
const COMPONENT: &str = "deployment-controller";

pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
pub const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
pub const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
pub const HASH_LABEL: &str = "pod-template-hash";

#[derive(Debug)]
pub struct DeploymentController {
    client: Client,
    deployments: Arc<Informer>,
    sets: Arc<Informer>,
    /// Recreate waits for the old pods themselves (terminating ones too).
    pods: Arc<Informer>,
    written: OwnWrites,
}

/// FNV-1a, 32 bits: upstream hashes the template with it too.
fn fnv32a(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The pod-template-hash of a template: its canonical JSON (serde_json's
/// maps are sorted), hashed, encoded with kube's safe alphabet.
pub fn template_hash(template: &Value, collision_count: i64) -> String {
    let mut t = template.clone();
    strip_hash(&mut t);
    let mut data = t.to_string().into_bytes();
    if collision_count > 0 {
        data.extend_from_slice(collision_count.to_string().as_bytes());
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    fnv32a(&data)
        .to_string()
        .bytes()
        .map(|b| ALPHABET[usize::from(b) % ALPHABET.len()] as char)
        .collect()
}

/// Drops nulls, empty objects and empty arrays, recursively: clients send
/// `creationTimestamp: null` and the like (kubectl rollout undo does), and
/// upstream's semantic equality treats them as absent.
fn prune_empty(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for x in m.values_mut() {
                prune_empty(x);
            }
            m.retain(|_, x| {
                !(x.is_null()
                    || x.as_object().is_some_and(|o| o.is_empty())
                    || x.as_array().is_some_and(|a| a.is_empty()))
            });
        }
        Value::Array(a) => a.iter_mut().for_each(prune_empty),
        _ => {}
    }
}

fn strip_hash(template: &mut Value) {
    prune_empty(template);
    if let Some(l) = template
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        l.remove(HASH_LABEL);
        if l.is_empty()
            && let Some(m) = template
                .pointer_mut("/metadata")
                .and_then(Value::as_object_mut)
        {
            m.remove("labels");
        }
    }
}

/// Templates equal apart from the hash label.
fn same_template(a: &Value, b: &Value) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    strip_hash(&mut a);
    strip_hash(&mut b);
    a == b
}

fn revision_of(rs: &Value) -> i64 {
    meta::annotation(rs, REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(o: &Value) -> i64 {
    o.pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .max(0)
}

fn status_i64(o: &Value, f: &str) -> i64 {
    o.get("status")
        .and_then(|s| s.get(f))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

/// An int-or-percent of `total`, rounded up (surge) or down (unavailable).
pub(crate) fn int_or_percent(v: Option<&Value>, total: i64, round_up: bool, default: i64) -> i64 {
    match v {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(default),
        Some(Value::String(s)) => match s.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) {
            Some(p) => {
                let x = p * total;
                if round_up { (x + 99) / 100 } else { x / 100 }
            }
            None => s.parse().unwrap_or(default),
        },
        _ => default,
    }
}

/// (maxSurge, maxUnavailable) resolved against the replica count; both
/// zero would never progress, so unavailable becomes 1 then.
/// An active ReplicaSet as proportional scaling sees it.
#[derive(Debug, Clone, Copy)]
struct SizedSet {
    replicas: i64,
    /// The Deployment size plus surge it was last sized for.
    annotated_max: Option<i64>,
    revision: i64,
}

/// New sizes for active ReplicaSets when the Deployment's allowed size
/// (replicas + maxSurge) changes: each set moves by its share, rounded,
/// never past the total change; what rounding leaves goes to the largest
/// set (the newest among equals when growing, the oldest when
/// shrinking).
fn proportional_sizes(
    sets: &[SizedSet],
    replicas: i64,
    allowed: i64,
    status_replicas: i64,
) -> Vec<i64> {
    let total: i64 = sets.iter().map(|s| s.replicas).sum();
    let to_add = allowed - total;
    let mut order: Vec<usize> = (0..sets.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&sets[a], &sets[b]);
        y.replicas.cmp(&x.replicas).then(if to_add >= 0 {
            y.revision.cmp(&x.revision)
        } else {
            x.revision.cmp(&y.revision)
        })
    });
    let mut sizes: Vec<i64> = sets.iter().map(|s| s.replicas).collect();
    if to_add == 0 {
        return sizes;
    }
    let mut added = 0;
    for &i in &order {
        let s = &sets[i];
        if s.replicas == 0 || added == to_add {
            continue;
        }
        let fraction = if replicas == 0 {
            -s.replicas
        } else {
            let base = s.annotated_max.unwrap_or(status_replicas).max(1);
            ((s.replicas * allowed) as f64 / base as f64).round() as i64 - s.replicas
        };
        let left = to_add - added;
        let step = if to_add > 0 {
            fraction.min(left)
        } else {
            fraction.max(left)
        };
        sizes[i] += step;
        added += step;
    }
    if let Some(&first) = order.first() {
        sizes[first] = (sizes[first] + to_add - added).max(0);
    }
    sizes
}

fn surge_and_unavailable(d: &Value, replicas: i64) -> (i64, i64) {
    let ru = d.pointer("/spec/strategy/rollingUpdate");
    let surge = int_or_percent(
        ru.and_then(|r| r.get("maxSurge")),
        replicas,
        true,
        (replicas * 25 + 99) / 100,
    );
    let mut unavailable = int_or_percent(
        ru.and_then(|r| r.get("maxUnavailable")),
        replicas,
        false,
        replicas * 25 / 100,
    )
    .min(replicas);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    (surge, unavailable)
}

impl DeploymentController {
    pub fn start(
        client: &Client,
        informers: &Informers,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let queue = Queue::new();
        let c = Arc::new(Self {
            client: client.clone(),
            deployments: informers.get_or_create(client.info(DEPLOYMENTS)?),
            sets: informers.get_or_create(client.info(REPLICA_SETS)?),
            pods: informers.get_or_create(client.info(PODS)?),
            written: OwnWrites::default(),
        });
        c.deployments.on_change(enqueue::own_key(&queue));
        let q = queue.clone();
        let deployments = c.deployments.clone();
        c.sets.on_change(Arc::new(move |ch: &Change| {
            // An orphaned ReplicaSet may be adopted by a Deployment whose
            // selector matches it.
            if let Some(rs) = &ch.new
                && meta::controller_uid(rs).is_none()
                && !meta::is_deleting(rs)
            {
                enqueue::adopters(&q, &deployments, rs);
            }
            for rs in [&ch.old, &ch.new].into_iter().flatten() {
                enqueue::live_controller(&q, &deployments, "Deployment", rs);
            }
        }));
        // A pod going away may let a Recreate rollout proceed: wake the
        // Deployment owning the pod's ReplicaSet.
        let q = queue.clone();
        let sets = c.sets.clone();
        c.pods.on_change(Arc::new(move |ch: &Change| {
            let (Some(p), None) = (&ch.old, &ch.new) else {
                return;
            };
            let Some(ns) = meta::namespace(p) else { return };
            let Some(rs_uid) = meta::controller_uid(p) else {
                return;
            };
            for r in meta::owner_refs(p) {
                if r.get("uid").and_then(Value::as_str) != Some(rs_uid) {
                    continue;
                }
                let Some(rs) = r
                    .get("name")
                    .and_then(Value::as_str)
                    .and_then(|n| sets.get(&format!("{ns}/{n}")))
                else {
                    continue;
                };
                for o in meta::owner_refs(&rs) {
                    if o.get("kind").and_then(Value::as_str) == Some("Deployment")
                        && let Some(n) = o.get("name").and_then(Value::as_str)
                    {
                        q.add(format!("{ns}/{n}"));
                    }
                }
            }
        }));
        Ok(crate::runner::spawn(c, queue, 2))
    }

    /// Takes ReplicaSets without a controller that the selector matches
    /// and lets go of owned ones it no longer matches; true if it changed
    /// anything.
    async fn adopt_and_release(&self, key: &str, d: &Value) -> Result<bool> {
        crate::adoption::adopt_and_release(
            &self.client,
            &self.written,
            key,
            d,
            meta::controller_ref(d, "apps/v1", "Deployment"),
            &self.sets,
            |rs| !meta::is_deleting(rs),
        )
        .await
    }

    async fn scale(&self, key: &str, rs: &Value, replicas: i64, d: &Value) -> Result<()> {
        let (surge, _) = surge_and_unavailable(d, spec_replicas(d));
        // The annotations record the Deployment size the ReplicaSet was
        // last sized for: proportional scaling reads them.
        let annotated = meta::annotation(rs, DESIRED_REPLICAS)
            == Some(spec_replicas(d).to_string().as_str())
            && meta::annotation(rs, MAX_REPLICAS)
                == Some((spec_replicas(d) + surge).to_string().as_str());
        if spec_replicas(rs) == replicas && (annotated || replicas == 0) {
            return Ok(());
        }
        let patch = json!({
            "metadata": {"annotations": {
                DESIRED_REPLICAS: spec_replicas(d).to_string(),
                MAX_REPLICAS: (spec_replicas(d) + surge).to_string(),
            }},
            "spec": {"replicas": replicas},
        });
        let out = self
            .client
            .patch(
                REPLICA_SETS,
                meta::namespace(rs),
                meta::name(rs),
                None,
                patch,
            )
            .await?;
        self.written.note(key, meta::resource_version(&out));
        let from = spec_replicas(rs);
        if from == replicas {
            return Ok(());
        }
        let (dir, tail) = if replicas > from {
            ("up", String::new())
        } else {
            ("down", format!(" from {from}"))
        };
        self.client.event(
            COMPONENT,
            "Deployment",
            d,
            EventType::Normal,
            "ScalingReplicaSet",
            format!(
                "Scaled {dir} replica set {} to {replicas}{tail}",
                meta::name(rs)
            ),
        );
        Ok(())
    }

    /// Annotations a new ReplicaSet inherits from its Deployment
    /// (`kubernetes.io/change-cause` among them, for rollout history).
    fn inherited_annotations(d: &Value) -> serde_json::Map<String, Value> {
        d.pointer("/metadata/annotations")
            .and_then(Value::as_object)
            .map(|a| {
                a.iter()
                    .filter(|(k, _)| {
                        k.as_str() != REVISION
                            && k.as_str() != REVISION_HISTORY
                            && k.as_str() != "kubectl.kubernetes.io/last-applied-configuration"
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Finds or creates the ReplicaSet of the current template, with the
    /// revision after every old one.
    async fn new_replica_set(
        &self,
        key: &str,
        d: &Value,
        new: Option<Arc<Value>>,
        old: &[Arc<Value>],
        initial: i64,
    ) -> Result<Value> {
        let max_old = old.iter().map(|r| revision_of(r)).max().unwrap_or(0);
        let ns = meta::namespace(d).unwrap_or("default");
        if let Some(rs) = new {
            // A rollback made an old ReplicaSet current again: it becomes
            // the newest revision, the old number goes to the history.
            let rev = revision_of(&rs);
            if rev <= max_old {
                let mut history: Vec<String> = meta::annotation(&rs, REVISION_HISTORY)
                    .map(|h| h.split(',').map(str::to_owned).collect())
                    .unwrap_or_default();
                if rev > 0 {
                    history.push(rev.to_string());
                }
                let mut ann = Self::inherited_annotations(d);
                ann.insert(REVISION.into(), json!((max_old + 1).to_string()));
                ann.insert(REVISION_HISTORY.into(), json!(history.join(",")));
                let out = self
                    .client
                    .patch(
                        REPLICA_SETS,
                        Some(ns),
                        meta::name(&rs),
                        None,
                        json!({"metadata": {"annotations": ann}}),
                    )
                    .await?;
                self.written.note(key, meta::resource_version(&out));
                return Ok(out);
            }
            return Ok((*rs).clone());
        }
        let collisions = d
            .pointer("/status/collisionCount")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let mut template = d.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let hash = template_hash(&template, collisions);
        template["metadata"]["labels"][HASH_LABEL] = json!(hash);
        let mut selector = d.pointer("/spec/selector").cloned().unwrap_or(json!({}));
        selector["matchLabels"][HASH_LABEL] = json!(hash);
        let (surge, _) = surge_and_unavailable(d, spec_replicas(d));
        let mut ann = Self::inherited_annotations(d);
        ann.insert(REVISION.into(), json!((max_old + 1).to_string()));
        ann.insert(DESIRED_REPLICAS.into(), json!(spec_replicas(d).to_string()));
        ann.insert(
            MAX_REPLICAS.into(),
            json!((spec_replicas(d) + surge).to_string()),
        );
        let rs = json!({
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": format!("{}-{hash}", meta::name(d)),
                "namespace": ns,
                "labels": template["metadata"]["labels"].clone(),
                "annotations": ann,
                "ownerReferences": [meta::controller_ref(d, "apps/v1", "Deployment")],
            },
            "spec": {
                "replicas": initial,
                "minReadySeconds": d.pointer("/spec/minReadySeconds").cloned().unwrap_or(json!(0)),
                "selector": selector,
                "template": template,
            },
        });
        match self.client.create(REPLICA_SETS, Some(ns), rs).await {
            Ok(out) => {
                self.written.note(key, meta::resource_version(&out));
                tracing::info!(deployment = %key, replicaset = %meta::name(&out), "created a ReplicaSet");
                self.client.event(
                    COMPONENT,
                    "Deployment",
                    d,
                    EventType::Normal,
                    "ScalingReplicaSet",
                    format!("Scaled up replica set {} to {initial}", meta::name(&out)),
                );
                Ok(out)
            }
            Err(e) if e.is_already_exists() => {
                // A ReplicaSet of that name with another template: count
                // the collision so the next hash differs.
                let patch = json!({"status": {"collisionCount": collisions + 1}});
                self.client
                    .patch(DEPLOYMENTS, Some(ns), meta::name(d), Some("status"), patch)
                    .await?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// A scale change in the middle of a rollout (or while paused): the
    /// difference is shared among the active ReplicaSets in proportion to
    /// their sizes, as upstream does, instead of all going to the new
    /// one. Returns whether this was such a scaling event.
    async fn scale_proportionally(
        &self,
        key: &str,
        d: &Value,
        new: &Value,
        old: &[Arc<Value>],
    ) -> Result<bool> {
        let replicas = spec_replicas(d);
        let mut active: Vec<&Value> = old
            .iter()
            .filter(|r| spec_replicas(r) > 0)
            .map(|r| r.as_ref())
            .collect();
        if spec_replicas(new) > 0 {
            active.push(new);
        }
        if active.len() < 2 {
            return Ok(false);
        }
        let resized = active.iter().any(|r| {
            meta::annotation(r, DESIRED_REPLICAS)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v != replicas)
        });
        if !resized {
            return Ok(false);
        }
        let (surge, _) = surge_and_unavailable(d, replicas);
        let sets: Vec<SizedSet> = active
            .iter()
            .map(|r| SizedSet {
                replicas: spec_replicas(r),
                annotated_max: meta::annotation(r, MAX_REPLICAS).and_then(|v| v.parse().ok()),
                revision: revision_of(r),
            })
            .collect();
        let sizes =
            proportional_sizes(&sets, replicas, replicas + surge, status_i64(d, "replicas"));
        for (rs, size) in active.iter().zip(sizes) {
            self.scale(key, rs, size, d).await?;
        }
        Ok(true)
    }

    /// RollingUpdate: scale the new ReplicaSet up within maxSurge, the old
    /// ones down within maxUnavailable.
    async fn rolling(&self, key: &str, d: &Value, new: &Value, old: &[Arc<Value>]) -> Result<()> {
        let replicas = spec_replicas(d);
        let (surge, max_unavailable) = surge_and_unavailable(d, replicas);
        let all_spec: i64 = old.iter().map(|r| spec_replicas(r)).sum::<i64>() + spec_replicas(new);
        // New ReplicaSet up.
        let new_spec = spec_replicas(new);
        let target = if new_spec > replicas {
            replicas
        } else {
            let room = (replicas + surge - all_spec).max(0);
            (new_spec + room).min(replicas)
        };
        self.scale(key, new, target, d).await?;
        let all_spec = all_spec - new_spec + target;

        // Old ones down.
        let old_total: i64 = old.iter().map(|r| spec_replicas(r)).sum();
        if old_total == 0 {
            return Ok(());
        }
        let min_available = replicas - max_unavailable;
        let new_unavailable = (target - status_i64(new, "availableReplicas")).max(0);
        let mut budget = all_spec - min_available - new_unavailable;
        if budget <= 0 {
            return Ok(());
        }
        let mut sorted: Vec<&Arc<Value>> = old.iter().collect();
        sorted.sort_by_key(|r| revision_of(r));
        // First the unhealthy (unavailable) replicas of old sets: removing
        // them costs no availability.
        let mut left: HashMap<String, i64> = HashMap::new();
        for rs in &sorted {
            let spec = spec_replicas(rs);
            let unhealthy = (spec - status_i64(rs, "availableReplicas")).max(0);
            let cut = unhealthy.min(budget).min(spec);
            budget -= cut;
            left.insert(meta::name(rs).to_owned(), spec - cut);
        }
        // Then available ones, while enough stay available overall.
        let available: i64 = old
            .iter()
            .map(|r| status_i64(r, "availableReplicas"))
            .sum::<i64>()
            + status_i64(new, "availableReplicas");
        let mut down = (available - min_available).max(0).min(budget.max(0));
        for rs in &sorted {
            let l = left.get(meta::name(rs)).copied().unwrap_or(0);
            let cut = l.min(down);
            down -= cut;
            self.scale(key, rs, l - cut, d).await?;
        }
        Ok(())
    }

    /// Recreate: every old pod gone before the new ReplicaSet scales up.
    async fn recreate(&self, key: &str, d: &Value, new: &Value, old: &[Arc<Value>]) -> Result<()> {
        for rs in old {
            self.scale(key, rs, 0, d).await?;
        }
        // Old pods count until they are gone, terminating ones included.
        let old_uids: Vec<&str> = old.iter().map(|r| meta::uid(r)).collect();
        let old_running = self
            .pods
            .list_ns(meta::namespace(d).unwrap_or("default"))
            .iter()
            .any(|p| {
                !meta::pod_terminal(p)
                    && meta::controller_uid(p).is_some_and(|u| old_uids.contains(&u))
            });
        if old_running || old.iter().any(|r| spec_replicas(r) > 0) {
            return Ok(());
        }
        self.scale(key, new, spec_replicas(d), d).await
    }

    /// Deletes old, empty ReplicaSets beyond revisionHistoryLimit.
    async fn clean_history(&self, d: &Value, old: &[Arc<Value>]) -> Result<()> {
        let limit = d
            .pointer("/spec/revisionHistoryLimit")
            .and_then(Value::as_i64)
            .unwrap_or(10)
            .max(0) as usize;
        let mut empty: Vec<&Arc<Value>> = old
            .iter()
            .filter(|r| {
                spec_replicas(r) == 0 && status_i64(r, "replicas") == 0 && !meta::is_deleting(r)
            })
            .collect();
        if empty.len() <= limit {
            return Ok(());
        }
        empty.sort_by_key(|r| revision_of(r));
        for rs in &empty[..empty.len() - limit] {
            crate::client::ignore_not_found(
                self.client
                    .delete(
                        REPLICA_SETS,
                        meta::namespace(rs),
                        meta::name(rs),
                        Some(meta::uid(rs)),
                    )
                    .await,
            )?;
        }
        Ok(())
    }

    fn condition(
        old_status: &Value,
        kind: &str,
        status: &str,
        reason: &str,
        message: String,
        now: &str,
    ) -> Value {
        let prev = old_status
            .get("conditions")
            .and_then(Value::as_array)
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
            });
        let same_status =
            prev.and_then(|p| p.get("status")).and_then(Value::as_str) == Some(status);
        let same_reason =
            prev.and_then(|p| p.get("reason")).and_then(Value::as_str) == Some(reason);
        let transition = match prev {
            Some(p) if same_status => p.get("lastTransitionTime").cloned().unwrap_or(json!(now)),
            _ => json!(now),
        };
        let update = match prev {
            Some(p) if same_status && same_reason => {
                p.get("lastUpdateTime").cloned().unwrap_or(json!(now))
            }
            _ => json!(now),
        };
        json!({"type": kind, "status": status, "reason": reason, "message": message,
               "lastUpdateTime": update, "lastTransitionTime": transition})
    }

    async fn update_status(
        &self,
        d: &Value,
        new: Option<&Value>,
        all: &[&Value],
        created_new: bool,
    ) -> Result<Requeue> {
        let replicas = spec_replicas(d);
        let (_, max_unavailable) = surge_and_unavailable(d, replicas);
        let total: i64 = all.iter().map(|r| status_i64(r, "replicas")).sum();
        let ready: i64 = all.iter().map(|r| status_i64(r, "readyReplicas")).sum();
        let available: i64 = all.iter().map(|r| status_i64(r, "availableReplicas")).sum();
        let updated = new.map_or(0, |n| status_i64(n, "replicas"));
        let old_status = d.get("status").cloned().unwrap_or(json!({}));
        let now = meta::now_rfc3339();
        let available_cond = if available >= replicas - max_unavailable {
            Self::condition(
                &old_status,
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".into(),
                &now,
            )
        } else {
            Self::condition(
                &old_status,
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".into(),
                &now,
            )
        };
        let new_name = new.map(|n| meta::name(n).to_owned()).unwrap_or_default();
        let complete = updated == replicas
            && total == replicas
            && new.is_some_and(|n| status_i64(n, "availableReplicas") == replicas);
        let paused = d.pointer("/spec/paused").and_then(Value::as_bool) == Some(true);
        let deadline = d
            .pointer("/spec/progressDeadlineSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(600);
        let prev_progress = meta::condition(d, "Progressing").cloned();
        let mut requeue = Requeue::No;
        let progressing = if paused {
            Self::condition(
                &old_status,
                "Progressing",
                "Unknown",
                "DeploymentPaused",
                "Deployment is paused".into(),
                &now,
            )
        } else if complete {
            Self::condition(
                &old_status,
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                format!("ReplicaSet \"{new_name}\" has successfully progressed."),
                &now,
            )
        } else {
            let reason = if created_new {
                "NewReplicaSetCreated"
            } else {
                "ReplicaSetUpdated"
            };
            // Progress (a status change) renews the deadline; none within
            // it marks the rollout as stuck.
            let last = prev_progress
                .as_ref()
                .and_then(|c| c.get("lastUpdateTime"))
                .and_then(Value::as_str)
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&chrono::Utc));
            let moved = old_status.get("updatedReplicas").and_then(Value::as_i64) != Some(updated)
                || old_status.get("availableReplicas").and_then(Value::as_i64) != Some(available)
                || created_new;
            let overdue =
                !moved && last.is_some_and(|t| (chrono::Utc::now() - t).num_seconds() > deadline);
            if overdue {
                Self::condition(
                    &old_status,
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    format!("ReplicaSet \"{new_name}\" has timed out progressing."),
                    &now,
                )
            } else {
                requeue = Requeue::After(Duration::from_secs(deadline.max(1) as u64 + 1));
                let mut c = Self::condition(
                    &old_status,
                    "Progressing",
                    "True",
                    reason,
                    format!("ReplicaSet \"{new_name}\" is progressing."),
                    &now,
                );
                if moved {
                    c["lastUpdateTime"] = json!(now);
                }
                c
            }
        };
        let mut status = old_status.clone();
        status["observedGeneration"] = json!(meta::generation(d));
        status["replicas"] = json!(total);
        status["updatedReplicas"] = json!(updated);
        status["readyReplicas"] = json!(ready);
        status["availableReplicas"] = json!(available);
        status["unavailableReplicas"] = json!((replicas - available).max(0));
        status["conditions"] = json!([available_cond, progressing]);
        if status != old_status {
            crate::client::ignore_not_found(
                self.client
                    .patch(
                        DEPLOYMENTS,
                        meta::namespace(d),
                        meta::name(d),
                        Some("status"),
                        json!({"status": status}),
                    )
                    .await,
            )?;
        }
        Ok(requeue)
    }
}

#[async_trait::async_trait]
impl Reconciler for DeploymentController {
    fn name(&self) -> &'static str {
        "deployment"
    }

    async fn reconcile(&self, key: &str) -> Result<Requeue> {
        let Some(d) = self
            .written
            .current(key, &self.sets, &self.deployments)
            .await
            .filter(|d| !meta::is_deleting(d))
        else {
            return Ok(Requeue::No);
        };
        let uid = meta::uid(&d).to_owned();
        let ns = meta::namespace(&d).unwrap_or("default").to_owned();
        if self.adopt_and_release(key, &d).await? {
            return Ok(Requeue::After(Duration::from_millis(1)));
        }
        let owned: Vec<Arc<Value>> = self
            .sets
            .list_ns(&ns)
            .into_iter()
            .filter(|r| meta::controller_uid(r) == Some(uid.as_str()) && !meta::is_deleting(r))
            .collect();
        let template = d.pointer("/spec/template").cloned().unwrap_or(json!({}));
        // The oldest matching one wins if there are several.
        let mut matching: Vec<&Arc<Value>> = owned
            .iter()
            .filter(|r| {
                r.pointer("/spec/template")
                    .is_some_and(|t| same_template(t, &template))
            })
            .collect();
        matching.sort_by_key(|r| revision_of(r));
        let existing_new = matching.first().map(|r| (*r).clone());
        let old: Vec<Arc<Value>> = owned
            .iter()
            .filter(|r| {
                existing_new
                    .as_ref()
                    .is_none_or(|n| meta::uid(n) != meta::uid(r))
            })
            .cloned()
            .collect();
        let paused = d.pointer("/spec/paused").and_then(Value::as_bool) == Some(true);
        let recreate = d.pointer("/spec/strategy/type").and_then(Value::as_str) == Some("Recreate");

        let created_new = existing_new.is_none();
        let new = if paused && existing_new.is_none() {
            None
        } else {
            let initial = if recreate {
                0
            } else {
                let replicas = spec_replicas(&d);
                let (surge, _) = surge_and_unavailable(&d, replicas);
                let all: i64 = old.iter().map(|r| spec_replicas(r)).sum();
                (replicas + surge - all).clamp(0, replicas)
            };
            Some(
                self.new_replica_set(key, &d, existing_new, &old, initial)
                    .await?,
            )
        };

        if let Some(new) = &new {
            if !recreate && self.scale_proportionally(key, &d, new, &old).await? {
                // The rollout goes on at the next pass, from the new
                // sizes.
            } else if paused {
                // Paused: only follow scale changes, no rollout.
                if old.iter().all(|r| spec_replicas(r) == 0) {
                    self.scale(key, new, spec_replicas(&d), &d).await?;
                }
            } else if recreate {
                self.recreate(key, &d, new, &old).await?;
            } else {
                self.rolling(key, &d, new, &old).await?;
            }
            let rev = revision_of(new).to_string();
            if meta::annotation(&d, REVISION) != Some(rev.as_str()) {
                let out = self
                    .client
                    .patch(
                        DEPLOYMENTS,
                        Some(&ns),
                        meta::name(&d),
                        None,
                        json!({"metadata": {"annotations": {REVISION: rev}}}),
                    )
                    .await?;
                let _ = out;
            }
        }
        if !paused {
            self.clean_history(&d, &old).await?;
        }
        // Status from the freshest view of the ReplicaSets.
        let fresh = |r: &Value| {
            self.sets
                .get(&meta::key(r))
                .unwrap_or_else(|| Arc::new(r.clone()))
        };
        let new_fresh = new.as_ref().map(&fresh);
        let old_fresh: Vec<Arc<Value>> = old.iter().map(|r| fresh(r)).collect();
        let mut all: Vec<&Value> = old_fresh.iter().map(|r| r.as_ref()).collect();
        if let Some(n) = &new_fresh {
            all.push(n.as_ref());
        }
        self.update_status(&d, new_fresh.as_deref(), &all, created_new)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_ignores_the_hash_label_and_changes_with_the_template() {
        let a = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"image": "v1"}]}});
        let mut a2 = a.clone();
        a2["metadata"]["labels"][HASH_LABEL] = json!("x");
        let b = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"image": "v2"}]}});
        assert_eq!(template_hash(&a, 0), template_hash(&a2, 0));
        assert_ne!(template_hash(&a, 0), template_hash(&b, 0));
        assert_ne!(template_hash(&a, 0), template_hash(&a, 1));
        assert!(same_template(&a, &a2));
        let mut a3 = a.clone();
        a3["metadata"]["creationTimestamp"] = Value::Null;
        a3["spec"]["volumes"] = json!([]);
        assert!(same_template(&a, &a3));
        assert_eq!(template_hash(&a, 0), template_hash(&a3, 0));
    }

    #[test]
    fn scaling_mid_rollout_is_proportional() {
        // 10 replicas, surge 3: old set 8, new set 5 (13 = 10 + 3), then
        // scaled to 20 (allowed 23): +10 shared 8:5 → old 14, new 9.
        let sets = [
            SizedSet {
                replicas: 8,
                annotated_max: Some(13),
                revision: 1,
            },
            SizedSet {
                replicas: 5,
                annotated_max: Some(13),
                revision: 2,
            },
        ];
        let sizes = proportional_sizes(&sets, 20, 23, 13);
        assert_eq!(sizes.iter().sum::<i64>(), 23);
        assert_eq!(sizes, vec![14, 9]);
        // Down to 5 (allowed 7 with surge 2): -6 shared.
        let down = proportional_sizes(&sets, 5, 7, 13);
        assert_eq!(down.iter().sum::<i64>(), 7);
        assert!(down[0] >= down[1], "{down:?}");
        // Scaled to 0: everything goes.
        assert_eq!(proportional_sizes(&sets, 0, 0, 13), vec![0, 0]);
    }

    #[test]
    fn surge_and_unavailable_resolve_like_upstream() {
        let d = json!({"spec": {"replicas": 10, "strategy": {"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}}});
        assert_eq!(surge_and_unavailable(&d, 10), (3, 2));
        let d =
            json!({"spec": {"strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}}});
        assert_eq!(surge_and_unavailable(&d, 3), (0, 1));
    }
}
