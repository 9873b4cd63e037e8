//! The security identity allocator: gives every label set in use by a pod
//! (namespace, pod labels, namespace labels — the key agents compile
//! NetworkPolicy with) one cluster-wide number, stored as a `skep.io/v1`
//! SecurityIdentity named by the number, as Cilium's CRD identity
//! allocation does. Every agent reads these objects, so a label set has the
//! same number on every node (flows and `skep ctl policy` agree).
//!
//! - A new label set gets the lowest number of the cluster range
//!   ([`skep_client::identity::CLUSTER_FIRST`]..=`CLUSTER_LAST`) not held
//!   by any object. Creating the object is the claim: a create that finds
//!   the name taken (409, another allocator or a cache behind) moves on to
//!   the next free number, so no number is ever given twice.
//! - A number whose label set no pod uses any more is deleted only after
//!   [`IdentityOptions::grace`], so flows, conntrack entries and agents
//!   still holding it settle first; only then can it be handed out again.
//! - Two objects for one label set (allocators that raced): agents use the
//!   lowest; the other is unused and goes after the grace period.
//!
//! Runs under the controller manager's leader election; uniqueness does
//! not depend on it (the 409 does).

use crate::{
    client::{Client, Gvr, NAMESPACES, PODS},
    error::Result,
    informer::{Informer, Informers},
    meta,
};
use serde_json::Value;
use skep_client::identity::{
    CLUSTER_FIRST, CLUSTER_LAST, IdentityKey, object, object_labels, parse_object,
    pod_needs_identity,
};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::Notify;

pub const SECURITY_IDENTITIES: Gvr = ("skep.io", "v1", "securityidentities");

/// Creates tried for one label set in a pass before waiting for the cache.
const CREATE_ATTEMPTS: usize = 16;
/// Longest wait for the cache to show an identity just created.
const OWN_WRITE_WAIT: Duration = Duration::from_secs(5);
/// A pass at least this often, whatever happens (a missed wake-up costs
/// no more than this).
const RESYNC: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
pub struct IdentityOptions {
    /// How long an unused number is kept before its object is deleted.
    pub grace: Duration,
    /// The numbers handed out.
    pub first: u32,
    pub last: u32,
}

impl Default for IdentityOptions {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(60),
            first: CLUSTER_FIRST,
            last: CLUSTER_LAST,
        }
    }
}

/// What one pass decided.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// Label sets without a number, with the number to claim.
    create: Vec<(IdentityKey, u32)>,
    /// Numbers unused for the whole grace period.
    delete: Vec<u32>,
    /// Label sets left without a number (the range is full).
    exhausted: usize,
    /// When the next unused number's grace period ends.
    next_expiry: Option<Duration>,
}

/// The lowest number of `first..=last` not in `taken`.
fn lowest_free(taken: &BTreeSet<u32>, first: u32, last: u32) -> Option<u32> {
    let mut candidate = first;
    for t in taken.range(first..=last) {
        if *t != candidate {
            break;
        }
        candidate = candidate.checked_add(1)?;
    }
    (candidate <= last).then_some(candidate)
}

/// The pure part of a pass. `existing`: every object named by a number
/// (with its key, `None` for objects that are no allocation: they keep
/// their number taken but are left alone); `unused_since` remembers when
/// each number was first seen unused.
fn plan(
    live: &BTreeSet<IdentityKey>,
    existing: &BTreeMap<u32, Option<IdentityKey>>,
    unused_since: &mut HashMap<u32, Instant>,
    now: Instant,
    options: &IdentityOptions,
) -> (Plan, BTreeSet<u32>) {
    let mut out = Plan::default();
    let mut lowest: BTreeMap<&IdentityKey, u32> = BTreeMap::new();
    for (id, key) in existing {
        if let Some(k) = key {
            // Ascending ids: the first seen is the lowest.
            lowest.entry(k).or_insert(*id);
        }
    }
    let mut taken: BTreeSet<u32> = existing.keys().copied().collect();
    for key in live {
        if lowest.contains_key(key) {
            continue;
        }
        match lowest_free(&taken, options.first, options.last) {
            Some(id) => {
                taken.insert(id);
                out.create.push((key.clone(), id));
            }
            None => out.exhausted += 1,
        }
    }
    let used: BTreeSet<u32> = lowest
        .iter()
        .filter(|(k, _)| live.contains(*k))
        .map(|(_, id)| *id)
        .collect();
    unused_since.retain(|id, _| existing.contains_key(id) && !used.contains(id));
    for (id, key) in existing {
        if key.is_none() || used.contains(id) {
            continue;
        }
        let since = *unused_since.entry(*id).or_insert(now);
        let unused_for = now.duration_since(since);
        if unused_for >= options.grace {
            out.delete.push(*id);
        } else {
            let left = options.grace - unused_for;
            out.next_expiry = Some(out.next_expiry.map_or(left, |n| n.min(left)));
        }
    }
    (out, taken)
}

/// The label sets pods use, kept current from pod and namespace events:
/// a pass then costs O(label sets), not a walk over every pod (10,000 pods
/// created in a burst would otherwise keep a core busy with passes).
#[derive(Debug, Default)]
struct InUse {
    /// Each pod that needs an identity ("ns/name") and its label set.
    pods: HashMap<String, IdentityKey>,
    /// How many of those pods use each label set.
    counts: BTreeMap<IdentityKey, usize>,
}

impl InUse {
    /// Records pod `name`'s label set (`None`: it needs none, or is gone).
    fn set(&mut self, name: &str, key: Option<IdentityKey>) {
        if self.pods.get(name) == key.as_ref() {
            return;
        }
        let previous = match key {
            Some(k) => {
                *self.counts.entry(k.clone()).or_default() += 1;
                self.pods.insert(name.to_owned(), k)
            }
            None => self.pods.remove(name),
        };
        if let Some(p) = previous
            && let Some(n) = self.counts.get_mut(&p)
        {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&p);
            }
        }
    }

    fn keys(&self) -> BTreeSet<IdentityKey> {
        self.counts.keys().cloned().collect()
    }
}

#[derive(Debug)]
pub struct IdentityAllocator {
    client: Client,
    pods: Arc<Informer>,
    namespaces: Arc<Informer>,
    identities: Arc<Informer>,
    options: IdentityOptions,
    wake: Arc<Notify>,
    /// Updated by the informers' handlers; each handler reads the caches
    /// while holding it, so a pod event and a namespace event that race
    /// cannot leave a label set computed from stale namespace labels.
    in_use: std::sync::Mutex<InUse>,
}

/// Shortest pause between two allocation passes.
const MIN_PASS_GAP: Duration = Duration::from_millis(250);

impl IdentityAllocator {
    pub fn start(
        client: &Client,
        informers: &Informers,
        options: IdentityOptions,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let a = Arc::new(Self {
            client: client.clone(),
            pods: informers.get_or_create(client.info(PODS)?),
            namespaces: informers.get_or_create(client.info(NAMESPACES)?),
            identities: informers.get_or_create(client.info(SECURITY_IDENTITIES)?),
            options,
            wake: Arc::new(Notify::new()),
            in_use: std::sync::Mutex::new(InUse::default()),
        });
        let weak = Arc::downgrade(&a);
        a.pods.on_change(Arc::new(move |ch| {
            if let (Some(a), Some(pod)) = (weak.upgrade(), ch.object()) {
                a.pod_changed(pod, ch.new.is_none());
            }
        }));
        let weak = Arc::downgrade(&a);
        a.namespaces.on_change(Arc::new(move |ch| {
            if let (Some(a), Some(ns)) = (weak.upgrade(), ch.object()) {
                a.namespace_changed(meta::name(ns));
            }
        }));
        let wake = a.wake.clone();
        a.identities.on_change(Arc::new(move |_| wake.notify_one()));
        Ok(vec![tokio::spawn(a.run())])
    }

    /// The label set of `pod`, if it needs one (namespace labels from the
    /// cache as it is now).
    fn key_of(&self, pod: &Value) -> Option<IdentityKey> {
        if !pod_needs_identity(pod) {
            return None;
        }
        let ns_labels = meta::namespace(pod)
            .and_then(|n| self.namespaces.get(n))
            .map(|n| object_labels(&n));
        Some(IdentityKey::of_pod(pod, ns_labels.as_ref()))
    }

    fn lock_in_use(&self) -> std::sync::MutexGuard<'_, InUse> {
        // The state is rebuilt from the caches at every resync, so one
        // left half-updated by a panicking handler heals.
        self.in_use
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pod_changed(&self, pod: &Value, deleted: bool) {
        let name = meta::key(pod);
        {
            let mut in_use = self.lock_in_use();
            let key = if deleted { None } else { self.key_of(pod) };
            in_use.set(&name, key);
        }
        // One stored permit covers any burst.
        self.wake.notify_one();
    }

    fn namespace_changed(&self, ns: &str) {
        {
            let mut in_use = self.lock_in_use();
            for pod in self.pods.list_ns(ns) {
                let key = self.key_of(&pod);
                in_use.set(&meta::key(&pod), key);
            }
        }
        self.wake.notify_one();
    }

    /// Recomputes the label sets in use from the caches (at start and at
    /// every resync, a backstop for the event-driven updates).
    fn rebuild_in_use(&self) {
        let mut in_use = self.lock_in_use();
        let mut fresh = InUse::default();
        for pod in self.pods.list() {
            let key = self.key_of(&pod);
            fresh.set(&meta::key(&pod), key);
        }
        *in_use = fresh;
    }

    /// Every label set in use by a pod.
    fn live_keys(&self) -> BTreeSet<IdentityKey> {
        self.lock_in_use().keys()
    }

    fn existing(&self) -> BTreeMap<u32, Option<IdentityKey>> {
        self.identities
            .list()
            .iter()
            .filter_map(|o| {
                let id: u32 = meta::name(o).parse().ok()?;
                Some((id, parse_object(o).map(|(_, k)| k)))
            })
            .collect()
    }

    async fn run(self: Arc<Self>) {
        // Complete caches only: a pod missing from an unsynced cache is no
        // reason to delete its identity.
        self.pods.synced().await;
        self.namespaces.synced().await;
        self.identities.synced().await;
        self.rebuild_in_use();
        let mut unused_since = HashMap::new();
        loop {
            let (plan, taken) = plan(
                &self.live_keys(),
                &self.existing(),
                &mut unused_since,
                Instant::now(),
                &self.options,
            );
            if plan.exhausted > 0 {
                tracing::error!(
                    count = plan.exhausted,
                    "security identities exhausted; those label sets get node-local numbers"
                );
            }
            let next = plan.next_expiry;
            self.carry_out(plan, taken).await;
            // Passes are cheap, but a burst of pod writes (10,000 pods
            // created at once) would still run one per write: changes
            // that arrive meanwhile leave a permit, so the next pass
            // follows this pause. Agents number a pod locally until its
            // shared number arrives, so this delays no enforcement.
            tokio::time::sleep(MIN_PASS_GAP).await;
            let wait = next.map_or(RESYNC, |n| n.min(RESYNC));
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => self.rebuild_in_use(),
            }
        }
    }

    async fn carry_out(&self, plan: Plan, mut taken: BTreeSet<u32>) {
        for (key, first_choice) in plan.create {
            let mut id = Some(first_choice);
            for _ in 0..CREATE_ATTEMPTS {
                let Some(n) = id else { break };
                match self
                    .client
                    .create(SECURITY_IDENTITIES, None, object(n, &key))
                    .await
                {
                    Ok(created) => {
                        tracing::info!(id = n, namespace = %key.namespace, labels = ?key.pod_labels, "security identity allocated");
                        // The next pass must see it, or it would number the
                        // same label set again.
                        let rev = meta::resource_version(&created);
                        if !self.identities.wait_for(rev, OWN_WRITE_WAIT).await {
                            tracing::warn!(id = n, "identity cache behind its own write");
                        }
                        break;
                    }
                    Err(e) if e.is_already_exists() => {
                        // Someone holds this number already (another
                        // allocator, or our cache is behind): the next one.
                        tracing::debug!(id = n, "identity number taken; trying the next");
                        id = lowest_free(&taken, self.options.first, self.options.last);
                        if let Some(next) = id {
                            taken.insert(next);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(id = n, error = %e, "creating a security identity failed");
                        // Retried by the resync.
                        break;
                    }
                }
            }
        }
        for id in plan.delete {
            let name = id.to_string();
            let Some(obj) = self.identities.get(&name) else {
                continue;
            };
            tracing::info!(
                id,
                "deleting a security identity unused for the grace period"
            );
            if let Err(e) = self
                .client
                .delete(SECURITY_IDENTITIES, None, &name, Some(meta::uid(&obj)))
                .await
                && !e.is_not_found()
            {
                tracing::warn!(id, error = %e, "deleting a security identity failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skep_client::identity::{Labels, namespace_labels};

    fn key(app: &str) -> IdentityKey {
        IdentityKey {
            namespace: "x".into(),
            pod_labels: Labels::from([("app".into(), app.into())]),
            namespace_labels: namespace_labels("x", None),
        }
    }

    fn opts(grace: u64) -> IdentityOptions {
        IdentityOptions {
            grace: Duration::from_secs(grace),
            first: 256,
            last: 260,
        }
    }

    #[test]
    fn in_use_counts_pods_per_label_set() {
        let mut u = InUse::default();
        u.set("x/a", Some(key("web")));
        u.set("x/b", Some(key("web")));
        u.set("x/c", Some(key("db")));
        assert_eq!(u.keys(), BTreeSet::from([key("db"), key("web")]));
        // A relabelled pod moves; repeated events change nothing.
        u.set("x/c", Some(key("web")));
        u.set("x/c", Some(key("web")));
        assert_eq!(u.keys(), BTreeSet::from([key("web")]));
        assert_eq!(u.counts[&key("web")], 3);
        u.set("x/a", None);
        u.set("x/b", None);
        u.set("x/b", None);
        assert_eq!(u.counts[&key("web")], 1);
        u.set("x/c", None);
        assert!(u.keys().is_empty() && u.pods.is_empty());
    }

    #[test]
    fn lowest_free_fills_holes_first() {
        let taken = BTreeSet::from([256, 257, 259]);
        assert_eq!(lowest_free(&taken, 256, 260), Some(258));
        assert_eq!(lowest_free(&BTreeSet::new(), 256, 260), Some(256));
        let full: BTreeSet<u32> = (256..=260).collect();
        assert_eq!(lowest_free(&full, 256, 260), None);
        // Numbers outside the range do not matter.
        assert_eq!(lowest_free(&BTreeSet::from([1, 256]), 256, 260), Some(257));
        assert_eq!(
            lowest_free(&BTreeSet::new(), u32::MAX, u32::MAX),
            Some(u32::MAX)
        );
        assert_eq!(
            lowest_free(&BTreeSet::from([u32::MAX]), u32::MAX, u32::MAX),
            None
        );
    }

    #[test]
    fn new_label_sets_get_the_lowest_free_numbers() {
        let live = BTreeSet::from([key("a"), key("b"), key("c")]);
        let existing = BTreeMap::from([(256, Some(key("b"))), (258, None)]);
        let (p, taken) = plan(
            &live,
            &existing,
            &mut HashMap::new(),
            Instant::now(),
            &opts(60),
        );
        assert_eq!(p.create, vec![(key("a"), 257), (key("c"), 259)]);
        assert!(p.delete.is_empty());
        assert_eq!(taken, BTreeSet::from([256, 257, 258, 259]));
        // The range runs out.
        let live: BTreeSet<IdentityKey> = ["a", "b", "c", "d", "e", "f"].map(key).into();
        let (p, _) = plan(
            &live,
            &existing,
            &mut HashMap::new(),
            Instant::now(),
            &opts(60),
        );
        // 257, 259 and 260 are all that is free.
        assert_eq!(p.create.len(), 3);
        assert_eq!(p.exhausted, 2);
    }

    #[test]
    fn unused_numbers_go_only_after_the_grace_period() {
        let existing = BTreeMap::from([(256, Some(key("a"))), (257, Some(key("b")))]);
        let mut since = HashMap::new();
        let t0 = Instant::now();
        let live = BTreeSet::from([key("a")]);
        let (p, _) = plan(&live, &existing, &mut since, t0, &opts(60));
        assert!(p.delete.is_empty() && p.create.is_empty());
        assert_eq!(p.next_expiry, Some(Duration::from_secs(60)));
        // A new label set meanwhile does not get 257 back.
        let live2 = BTreeSet::from([key("a"), key("c")]);
        let (p, _) = plan(
            &live2,
            &existing,
            &mut since,
            t0 + Duration::from_secs(30),
            &opts(60),
        );
        assert_eq!(p.create, vec![(key("c"), 258)]);
        assert_eq!(p.next_expiry, Some(Duration::from_secs(30)));
        let (p, _) = plan(
            &live,
            &existing,
            &mut since,
            t0 + Duration::from_secs(60),
            &opts(60),
        );
        assert_eq!(p.delete, vec![257]);
        // Back in use before the grace ended: the clock starts over.
        let mut since = HashMap::new();
        plan(&live, &existing, &mut since, t0, &opts(60));
        let both = BTreeSet::from([key("a"), key("b")]);
        plan(
            &both,
            &existing,
            &mut since,
            t0 + Duration::from_secs(50),
            &opts(60),
        );
        assert!(since.is_empty());
        let (p, _) = plan(
            &live,
            &existing,
            &mut since,
            t0 + Duration::from_secs(70),
            &opts(60),
        );
        assert!(p.delete.is_empty(), "unused for 0 s only");
    }

    #[test]
    fn duplicates_keep_the_lowest_and_foreign_objects_stay() {
        // Two allocators raced on one label set: 258 is the one agents use.
        let existing = BTreeMap::from([(256, None), (258, Some(key("a"))), (259, Some(key("a")))]);
        let live = BTreeSet::from([key("a")]);
        let mut since = HashMap::new();
        let t0 = Instant::now();
        let (p, _) = plan(&live, &existing, &mut since, t0, &opts(0));
        assert!(p.create.is_empty());
        assert_eq!(p.delete, vec![259], "the duplicate goes; 256 is not ours");
    }
}
