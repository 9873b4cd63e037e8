//! Pod identity numbers shared by every node: the agent's side of the
//! server's SecurityIdentity allocator (skep-controllers' `identity`).
//!
//! A task lists and watches `skep.io/v1` SecurityIdentities into an
//! [`IdentityTable`]; [`ClusterIdentities`] is the compiler's
//! [`IdentitySource`] over that table. A label set the allocator has not
//! numbered yet (a pod whose labels just changed, or a brand-new label
//! set whose object has not arrived) gets a temporary node-local number
//! from [`LOCAL_FIRST`]`..=`[`LOCAL_LAST`], a range the allocator never
//! uses, so the ipcache never maps a pod to a number another node uses
//! for a different label set; the pod is enforced at once and moves to the
//! shared number as soon as it arrives (the table change triggers a
//! recompile). Temporary numbers are node-local like CIDR identities.
//!
//! When the server holds two objects for one label set (two allocators
//! raced), every node picks the lowest number, so all still agree; the
//! allocator deletes the other once its grace period is over.

use super::{compile::IdentitySource, ids::StableIds};
use futures::StreamExt;
use serde_json::Value;
use skep_client::{
    Client,
    identity::{IdentityKey, LOCAL_FIRST, LOCAL_LAST, PATH, parse_object},
};
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::watch;

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Retry interval when the server does not serve or let us read the
/// resource (an older server, or a cluster whose node role predates it).
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(30);

// The shared ranges must lie inside the dataplane's pod identity range.
const _: () = assert!(
    skep_client::identity::CLUSTER_FIRST == skep_dataplane::policy::ID_POD_FIRST
        && LOCAL_LAST == skep_dataplane::policy::ID_CIDR_FIRST - 1
        && skep_client::identity::CLUSTER_LAST + 1 == LOCAL_FIRST
);

/// The allocations the server holds, by object.
#[derive(Debug, Default)]
struct Allocations {
    by_id: BTreeMap<u32, IdentityKey>,
    by_key: BTreeMap<IdentityKey, BTreeSet<u32>>,
}

impl Allocations {
    fn insert(&mut self, id: u32, key: IdentityKey) {
        self.remove(id);
        self.by_key.entry(key.clone()).or_default().insert(id);
        self.by_id.insert(id, key);
    }

    fn remove(&mut self, id: u32) {
        if let Some(old) = self.by_id.remove(&id)
            && let Some(ids) = self.by_key.get_mut(&old)
        {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_key.remove(&old);
            }
        }
    }

    /// The number every node uses for `key`: the lowest of its objects.
    fn lookup(&self, key: &IdentityKey) -> Option<u32> {
        self.by_key.get(key).and_then(|ids| ids.first().copied())
    }
}

/// The server's allocations as this agent last saw them, shared between the
/// watch task and the compiler; `changes` counts updates (0 until the first
/// complete list).
#[derive(Clone, Debug)]
pub struct IdentityTable {
    inner: Arc<Mutex<Allocations>>,
    changes: Arc<watch::Sender<u64>>,
}

impl Default for IdentityTable {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            changes: Arc::new(watch::channel(0).0),
        }
    }
}

impl IdentityTable {
    fn with<R>(&self, f: impl FnOnce(&mut Allocations) -> R) -> R {
        // A poisoned lock only means a panic elsewhere while holding it;
        // every update leaves the maps consistent.
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Records one object (ignoring objects that are not allocations).
    pub fn upsert(&self, obj: &Value) {
        let name = obj.pointer("/metadata/name").and_then(Value::as_str);
        match parse_object(obj) {
            Some((id, key)) => self.with(|a| a.insert(id, key)),
            None => {
                tracing::debug!(?name, "ignoring a SecurityIdentity that is no allocation");
                if let Some(id) = name.and_then(|n| n.parse().ok()) {
                    self.with(|a| a.remove(id));
                }
            }
        }
        self.bump();
    }

    pub fn remove(&self, obj: &Value) {
        if let Some(id) = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .and_then(|n| n.parse().ok())
        {
            self.with(|a| a.remove(id));
        }
        self.bump();
    }

    /// Replaces everything with the items of a LIST response.
    pub fn replace_all(&self, list: &Value) {
        let mut fresh = Allocations::default();
        for item in list
            .get("items")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some((id, key)) = parse_object(item) {
                fresh.insert(id, key);
            }
        }
        self.with(|a| *a = fresh);
        self.bump();
    }

    /// The shared number of `key`, if the server has one.
    pub fn lookup(&self, key: &IdentityKey) -> Option<u32> {
        self.with(|a| a.lookup(key))
    }

    /// Notified on every change (the value counts them).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// The compiler's numbers from the cluster's allocations, with temporary
/// node-local numbers for label sets not allocated yet.
#[derive(Debug)]
pub struct ClusterIdentities {
    table: IdentityTable,
    local: StableIds<IdentityKey>,
    current: BTreeMap<IdentityKey, u32>,
}

impl ClusterIdentities {
    pub fn new(table: IdentityTable) -> Self {
        Self {
            table,
            local: StableIds::new(LOCAL_FIRST, LOCAL_LAST),
            current: BTreeMap::new(),
        }
    }
}

impl IdentitySource for ClusterIdentities {
    fn sync(&mut self, live: &[IdentityKey]) -> Vec<IdentityKey> {
        self.current.clear();
        let mut waiting = Vec::new();
        self.table.with(|a| {
            for k in live {
                match a.lookup(k) {
                    Some(id) => {
                        self.current.insert(k.clone(), id);
                    }
                    None => waiting.push(k.clone()),
                }
            }
        });
        if !waiting.is_empty() {
            tracing::debug!(
                count = waiting.len(),
                "label sets without a shared identity yet; using node-local numbers"
            );
        }
        // Keys that got their shared number (or went away) release their
        // temporary one.
        let left = self.local.sync(waiting.iter());
        for k in waiting {
            if let Some(n) = self.local.get(&k) {
                self.current.insert(k, n);
            }
        }
        left
    }

    fn get(&self, key: &IdentityKey) -> Option<u32> {
        self.current.get(key).copied()
    }
}

/// Starts the task keeping a table of the server's allocations current.
pub fn spawn_watch(client: Client) -> IdentityTable {
    let table = IdentityTable::default();
    tokio::spawn(run(client, table.clone()));
    table
}

async fn run(client: Client, table: IdentityTable) {
    let mut delay = BACKOFF_FIRST;
    loop {
        let e = follow(&client, &table, &mut delay).await;
        let unavailable = matches!(e.code(), Some(403 | 404));
        let wait = if unavailable {
            UNAVAILABLE_RETRY
        } else {
            delay
        };
        if unavailable {
            tracing::warn!(error = %e, retry_in = ?wait, "cannot read SecurityIdentities; pods get node-local identity numbers");
        } else {
            tracing::warn!(error = %e, retry_in = ?wait, "SecurityIdentity watch failed; relisting");
        }
        tokio::time::sleep(wait).await;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

/// Why following the allocations stopped.
#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error(transparent)]
    Api(#[from] skep_client::ClientError),
    #[error("watch ended: {0}")]
    Ended(String),
}

impl FollowError {
    fn code(&self) -> Option<u16> {
        match self {
            FollowError::Api(e) => e.code(),
            FollowError::Ended(_) => None,
        }
    }
}

/// Lists, then follows the watch (resuming it when the server ends it);
/// returns what ended it.
async fn follow(client: &Client, table: &IdentityTable, delay: &mut Duration) -> FollowError {
    let list = match client.get(PATH).await {
        Ok(l) => l,
        Err(e) => return e.into(),
    };
    table.replace_all(&list);
    let mut rv = list
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("0")
        .to_owned();
    *delay = BACKOFF_FIRST;
    loop {
        let mut stream = match client
            .watch(&format!(
                "{PATH}?resourceVersion={rv}&allowWatchBookmarks=true"
            ))
            .await
        {
            Ok(s) => s,
            Err(e) => return e.into(),
        };
        while let Some(ev) = stream.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => return e.into(),
            };
            if let Some(v) = ev
                .object
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
            {
                rv = v.to_owned();
            }
            match ev.kind.as_str() {
                "ADDED" | "MODIFIED" => table.upsert(&ev.object),
                "DELETED" => table.remove(&ev.object),
                "BOOKMARK" => {}
                // 410 Gone and friends: start over from a list.
                _ => return FollowError::Ended(ev.object.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use skep_client::identity::{Labels, namespace_labels, object};

    fn key(app: &str) -> IdentityKey {
        IdentityKey {
            namespace: "x".into(),
            pod_labels: Labels::from([("app".into(), app.into())]),
            namespace_labels: namespace_labels("x", None),
        }
    }

    #[test]
    fn shared_numbers_win_and_temporary_ones_fill_the_gap() {
        let table = IdentityTable::default();
        let rx = table.subscribe();
        table.replace_all(&json!({"items": [object(300, &key("a"))]}));
        assert!(rx.has_changed().unwrap(), "a list is a change");
        let mut ids = ClusterIdentities::new(table.clone());
        assert!(ids.sync(&[key("a"), key("b")]).is_empty());
        assert_eq!(ids.get(&key("a")), Some(300));
        let temp = ids.get(&key("b")).unwrap();
        assert!((LOCAL_FIRST..=LOCAL_LAST).contains(&temp), "{temp}");

        // b's allocation arrives: it moves to the shared number.
        table.upsert(&object(257, &key("b")));
        ids.sync(&[key("a"), key("b")]);
        assert_eq!(ids.get(&key("b")), Some(257));

        // Two objects for one key: the lowest, on every node.
        table.upsert(&object(260, &key("a")));
        ids.sync(&[key("a"), key("b")]);
        assert_eq!(ids.get(&key("a")), Some(260));
        table.remove(&object(260, &key("a")));
        ids.sync(&[key("a"), key("b")]);
        assert_eq!(ids.get(&key("a")), Some(300));

        // A deleted allocation of a live key: back to a temporary number,
        // never to another key's shared one.
        table.remove(&object(257, &key("b")));
        ids.sync(&[key("a"), key("b")]);
        assert!(ids.get(&key("b")).unwrap() >= LOCAL_FIRST);
        // Keys not synced have no number.
        assert_eq!(ids.get(&key("c")), None);
    }

    fn pod(name: &str, app: &str, node: &str, ip: [u8; 4]) -> Value {
        json!({"metadata": {"namespace": "x", "name": name, "uid": format!("uid-{name}"),
                            "labels": {"app": app}},
               "spec": {"nodeName": node, "containers": [{"name": "c"}]},
               "status": {"phase": "Running", "podIP": std::net::Ipv4Addr::from(ip).to_string()}})
    }

    /// The seam end to end: compilers of two nodes with different
    /// histories, over one table, program the same numbers; rules name them.
    #[test]
    fn compilers_on_two_nodes_program_the_shared_numbers() {
        use crate::policy::{ClusterView, Compiler, cluster::Kind};
        use skep_dataplane::policy::{Cidr, PolicyDirection};
        let table = IdentityTable::default();
        table.replace_all(&json!({"items": [object(400, &key("a")), object(300, &key("b"))]}));
        let mut n1 = Compiler::with_identities(Box::new(ClusterIdentities::new(table.clone())));
        let mut n2 = Compiler::with_identities(Box::new(ClusterIdentities::new(table.clone())));
        let mut view = ClusterView::default();
        view.upsert(Kind::Namespace, &json!({"metadata": {"name": "x"}}));
        // n1 first sees a label set that then goes away; n2 never does.
        view.upsert(Kind::Pod, &pod("z", "z", "n1", [10, 42, 0, 9]));
        let early = n1.compile(&view, "n1");
        let z = early.state.ipcache[&Cidr::host([10, 42, 0, 9].into())].identity;
        assert!(
            (LOCAL_FIRST..=LOCAL_LAST).contains(&z),
            "unallocated: temporary {z}"
        );
        view.pods.clear();
        view.upsert(Kind::Pod, &pod("a", "a", "n1", [10, 42, 0, 10]));
        view.upsert(Kind::Pod, &pod("b", "b", "n2", [10, 42, 1, 10]));
        view.upsert(
            Kind::NetworkPolicy,
            &json!({"metadata": {"namespace": "x", "name": "b-from-a"},
                    "spec": {"podSelector": {"matchLabels": {"app": "b"}},
                             "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}]}]}}),
        );
        let s1 = n1.compile(&view, "n1");
        let s2 = n2.compile(&view, "n2");
        for s in [&s1, &s2] {
            assert_eq!(
                s.state.ipcache[&Cidr::host([10, 42, 0, 10].into())].identity,
                400
            );
            assert_eq!(
                s.state.ipcache[&Cidr::host([10, 42, 1, 10].into())].identity,
                300
            );
            assert_eq!(s.snapshot.identities[&400][1], "app=a");
        }
        let b_ep = s2.state.endpoints[&std::net::Ipv4Addr::new(10, 42, 1, 10)];
        assert_eq!(b_ep.identity, 300);
        assert!(s2.state.rules.keys().any(|r| r.endpoint == b_ep.endpoint
            && r.direction == PolicyDirection::Ingress
            && r.identity == 400));

        // a's labels change to a set not allocated yet: a temporary number
        // on n1 at once (no longer admitted by b), the shared one once it
        // is allocated.
        view.upsert(Kind::Pod, &pod("a", "c", "n1", [10, 42, 0, 10]));
        let s2 = n2.compile(&view, "n2");
        let temp = s2.state.ipcache[&Cidr::host([10, 42, 0, 10].into())].identity;
        assert!(temp >= LOCAL_FIRST, "{temp}");
        assert!(!s2.state.rules.keys().any(|r| r.identity == temp));
        table.upsert(&object(256, &key("c")));
        for (c, node) in [(&mut n1, "n1"), (&mut n2, "n2")] {
            let s = c.compile(&view, node);
            assert_eq!(
                s.state.ipcache[&Cidr::host([10, 42, 0, 10].into())].identity,
                256
            );
        }
    }

    #[test]
    fn foreign_objects_do_not_number_anything() {
        let table = IdentityTable::default();
        let mut bad = object(300, &key("a"));
        bad["securityLabels"]["stray"] = json!("1");
        table.upsert(&bad);
        table.upsert(&object(LOCAL_FIRST, &key("b")));
        assert_eq!(table.lookup(&key("a")), None);
        assert_eq!(table.lookup(&key("b")), None);
        // An object rewritten into something foreign stops numbering.
        table.upsert(&object(301, &key("c")));
        assert_eq!(table.lookup(&key("c")), Some(301));
        let mut rewritten = object(301, &key("c"));
        rewritten["securityLabels"] = json!({});
        table.upsert(&rewritten);
        assert_eq!(table.lookup(&key("c")), None);
    }
}
