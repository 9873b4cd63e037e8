//! The agent's policy task: lists and watches Pods, Namespaces, Nodes and
//! NetworkPolicies, recompiles after every burst of changes and programs
//! the result through a [`PolicyDatapath`].
//!
//! A state is applied only once all four kinds have been listed: after a
//! watch failure everything is relisted (with backoff) before the next
//! apply, so the kernel never sees a state built from a partial view.

use super::{
    PolicySnapshot,
    cluster::{ClusterView, Kind},
    compile::Compiler,
    identities::{ClusterIdentities, spawn_watch},
};
use futures::{Stream, StreamExt, stream::SelectAll};
use serde_json::Value;
use skep_client::{Client, ClientError, WatchEvent};
use skep_dataplane::policy::PolicyDatapath;
use std::{collections::BTreeMap, pin::Pin, sync::Arc, time::Duration};
use tokio::sync::watch;

/// Changes arriving within this window after the first are compiled
/// together (a deployment rollout touches many pods at once).
const BATCH: Duration = Duration::from_millis(20);
/// Relist backoff after a failure.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Retry interval when programming the dataplane failed.
const APPLY_RETRY: Duration = Duration::from_secs(1);
/// How long the first apply waits for the server's identity allocations
/// (without them every pod would start on a temporary number).
const IDENTITIES_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("{kind:?}: {source}")]
    Api {
        kind: Kind,
        #[source]
        source: ClientError,
    },
    #[error("{kind:?} watch failed: {detail}")]
    Watch { kind: Kind, detail: String },
}

/// One watch's events, tagged with their kind; `None` once the server
/// ended the watch.
type Tagged = Pin<Box<dyn Stream<Item = (Kind, Option<Result<WatchEvent, ClientError>>)> + Send>>;

/// Starts the policy task for node `node_name`; the receiver gets the
/// snapshot of every state that was applied.
pub fn spawn(
    client: Client,
    node_name: String,
    datapath: Box<dyn PolicyDatapath>,
) -> watch::Receiver<Arc<PolicySnapshot>> {
    let (tx, rx) = watch::channel(Arc::new(PolicySnapshot::default()));
    tokio::spawn(run(client, node_name, datapath, tx));
    rx
}

struct Task {
    client: Client,
    node: String,
    datapath: Box<dyn PolicyDatapath>,
    compiler: Compiler,
    tx: watch::Sender<Arc<PolicySnapshot>>,
    applied_once: bool,
    /// Changes of the shared identity table the compiler reads.
    identity_changes: watch::Receiver<u64>,
    /// Whether the first list of identities was waited for (once: an
    /// agent that cannot read them must not wait again at every relist).
    identities_waited: bool,
}

async fn run(
    client: Client,
    node: String,
    datapath: Box<dyn PolicyDatapath>,
    tx: watch::Sender<Arc<PolicySnapshot>>,
) {
    let identities = spawn_watch(client.clone());
    let identity_changes = identities.subscribe();
    let mut task = Task {
        client,
        node,
        datapath,
        compiler: Compiler::with_identities(Box::new(ClusterIdentities::new(identities))),
        tx,
        applied_once: false,
        identity_changes,
        identities_waited: false,
    };
    let mut delay = BACKOFF_FIRST;
    loop {
        let e = task.sync(&mut delay).await;
        tracing::warn!(error = %e, retry_in = ?delay, "network policy sync failed; relisting");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

fn resource_version(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
}

async fn open(client: &Client, kind: Kind, rv: &str) -> Result<Tagged, SyncError> {
    let stream = client
        .watch(&format!(
            "{}?resourceVersion={rv}&allowWatchBookmarks=true",
            kind.path()
        ))
        .await
        .map_err(|source| SyncError::Api { kind, source })?;
    Ok(Box::pin(
        stream
            .map(move |e| (kind, Some(e)))
            .chain(futures::stream::once(async move { (kind, None) })),
    ))
}

impl Task {
    /// Compiles `view` and programs it; false when the dataplane refused.
    fn apply(&mut self, view: &ClusterView) -> bool {
        let started = std::time::Instant::now();
        let compiled = self.compiler.compile(view, &self.node);
        let compile_time = started.elapsed();
        match self.datapath.apply(&compiled.state) {
            Ok(stats) => {
                tracing::debug!(
                    ?stats,
                    ?compile_time,
                    total = ?started.elapsed(),
                    rules = compiled.state.rules.len(),
                    "network policy applied"
                );
                if !self.applied_once {
                    tracing::info!(
                        policies = view.policies.len(),
                        endpoints = compiled.state.endpoints.len(),
                        rules = compiled.state.rules.len(),
                        "network policy programmed"
                    );
                    self.applied_once = true;
                }
                self.tx.send_replace(Arc::new(compiled.snapshot));
                true
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?APPLY_RETRY, "programming network policy failed");
                false
            }
        }
    }

    /// Lists everything, applies, then follows the watches; returns the
    /// error that ended it.
    async fn sync(&mut self, delay: &mut Duration) -> SyncError {
        let mut view = ClusterView::default();
        let mut rvs: BTreeMap<Kind, String> = BTreeMap::new();
        for kind in Kind::ALL {
            let list = match self.client.get(kind.path()).await {
                Ok(l) => l,
                Err(source) => return SyncError::Api { kind, source },
            };
            view.replace_all(kind, &list);
            rvs.insert(kind, resource_version(&list).unwrap_or("0").to_owned());
        }
        let mut streams: SelectAll<Tagged> = SelectAll::new();
        for (kind, rv) in &rvs {
            match open(&self.client, *kind, rv).await {
                Ok(s) => streams.push(s),
                Err(e) => return e,
            }
        }
        *delay = BACKOFF_FIRST;
        if !self.identities_waited && *self.identity_changes.borrow() == 0 {
            let listed =
                tokio::time::timeout(IDENTITIES_WAIT, self.identity_changes.wait_for(|n| *n > 0))
                    .await;
            if listed.is_err() {
                tracing::warn!("no SecurityIdentity list yet; starting with node-local numbers");
            }
        }
        self.identities_waited = true;
        self.identity_changes.borrow_and_update();
        let mut pending = true;
        loop {
            if pending {
                // Compiling 1,000 policies takes ~0.15 s: keep it off the
                // other tasks' worker when the runtime allows.
                let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
                    == tokio::runtime::RuntimeFlavor::MultiThread;
                pending = if multi_thread {
                    !tokio::task::block_in_place(|| self.apply(&view))
                } else {
                    !self.apply(&view)
                };
            }
            // The first change (or the retry of a failed apply), then
            // whatever else arrives within the batch window.
            let mut events = Vec::new();
            let mut identities_changed = false;
            tokio::select! {
                Some(e) = streams.next() => events.push(e),
                Ok(()) = self.identity_changes.changed() => identities_changed = true,
                _ = tokio::time::sleep(APPLY_RETRY), if pending => continue,
                else => {
                    return SyncError::Watch {
                        kind: Kind::Pod,
                        detail: "every watch ended".into(),
                    };
                }
            }
            let deadline = tokio::time::Instant::now() + BATCH;
            loop {
                tokio::select! {
                    Some(e) = streams.next() => events.push(e),
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            // A shared number arrived or went: recompile with it.
            if identities_changed || self.identity_changes.has_changed().unwrap_or(false) {
                self.identity_changes.borrow_and_update();
                pending = true;
            }
            for (kind, event) in events {
                let event = match event {
                    // The server ended the watch (timeout): resume it.
                    None => {
                        let rv = rvs.get(&kind).cloned().unwrap_or_default();
                        match open(&self.client, kind, &rv).await {
                            Ok(s) => streams.push(s),
                            Err(e) => return e,
                        }
                        continue;
                    }
                    Some(Err(source)) => return SyncError::Api { kind, source },
                    Some(Ok(ev)) => ev,
                };
                if let Some(rv) = resource_version(&event.object) {
                    rvs.insert(kind, rv.to_owned());
                }
                match event.kind.as_str() {
                    "ADDED" | "MODIFIED" => {
                        view.upsert(kind, &event.object);
                        pending = true;
                    }
                    "DELETED" => {
                        view.remove(kind, &event.object);
                        pending = true;
                    }
                    "BOOKMARK" => {}
                    // 410 Gone and friends: start over from a list.
                    _ => {
                        return SyncError::Watch {
                            kind,
                            detail: event.object.to_string(),
                        };
                    }
                }
            }
        }
    }
}
