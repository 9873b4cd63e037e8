//! The pod manager: runs on every node what the API says should run there.
//!
//! - A watch on the pods bound to this node feeds one worker task per pod
//!   (`worker.rs`), which owns that pod: sandbox (network + volumes),
//!   containers, restarts with back-off, probes, hooks, status, and its
//!   termination.
//! - A relister (what the kubelet calls the PLEG) asks the runtime for
//!   every container a few times a second and hands each worker the
//!   state of its own containers, so exits are noticed without a process
//!   per container in the agent.
//! - At start, containers, networks and directories of pods that no
//!   longer exist on this node are removed (crash clean-up), and running
//!   containers of pods that do are adopted as they are.

pub mod dnsconf;
pub mod env;
pub mod events;
pub mod status;
pub mod streams;
pub mod volumes;
mod worker;

use crate::runtime::{ContainerInfo, Runtime};
use futures::StreamExt;
use serde_json::Value;
use skep_client::Client;
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::mpsc;

/// Reads ConfigMaps and Secrets for environments and volumes.
#[async_trait::async_trait]
pub trait ObjectSource: Send + Sync {
    /// `kind` is the plural resource (`configmaps`, `secrets`); an empty
    /// `namespace` names a cluster-scoped object (`persistentvolumes`).
    /// None when the object does not exist.
    async fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value>;
}

/// Pod networking as the pod manager needs it (the node's IPAM, veth and
/// namespace plumbing, and the dataplane's hooks on the pod's interface).
#[async_trait::async_trait]
pub trait PodNetwork: Send + Sync {
    /// Creates (or finds) the pod's network namespace and address.
    async fn setup(&self, pod_uid: &str) -> Result<PodNetInfo, String>;
    /// Removes the namespace, interface, routes and the address.
    async fn teardown(&self, pod_uid: &str) -> Result<(), String>;
    /// Removes everything belonging to pods not in `live` (crash
    /// clean-up); returns how many were removed.
    async fn reconcile(&self, live: &[String]) -> Result<usize, String>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetInfo {
    pub ip: IpAddr,
    pub netns: PathBuf,
}

/// What the manager is configured with.
#[derive(Debug)]
pub struct PodManagerConfig {
    pub node_name: String,
    pub node_ip: IpAddr,
    /// The agent's state directory (pods/, logs/ live below it).
    pub data_dir: PathBuf,
    pub dns: dnsconf::ClusterDns,
    pub node: env::NodeFacts,
    pub cluster_ca_pem: String,
}

/// Shared by every worker.
pub(crate) struct Ctx {
    pub client: Client,
    pub runtime: Arc<dyn Runtime>,
    pub network: Arc<dyn PodNetwork>,
    pub cfg: PodManagerConfig,
    pub objects: ApiObjects,
    pub events: events::Recorder,
    pub views: Arc<Mutex<HashMap<(String, String), streams::PodView>>>,
    pub host_resolv: String,
    /// Wakes the relister at once (a new pod's worker waits for its
    /// first relist before starting anything).
    pub relist_now: tokio::sync::Notify,
    /// Services by namespace (see `services_of`); an async lock so one
    /// LIST serves all the pods waiting for it.
    pub services: tokio::sync::Mutex<HashMap<String, (std::time::Instant, Vec<Value>)>>,
}

/// Services of a namespace are read at most this often for container
/// environments (many pods of a namespace start together).
const SERVICES_TTL: Duration = Duration::from_secs(2);

impl Ctx {
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.cfg.data_dir.join("pods").join(uid)
    }

    /// The Services of a namespace, from a short-lived cache.
    pub async fn services_of(&self, namespace: &str) -> Vec<Value> {
        let mut cache = self.services.lock().await;
        if let Some((at, list)) = cache.get(namespace)
            && at.elapsed() < SERVICES_TTL
        {
            return list.clone();
        }
        let list: Vec<Value> = match self
            .client
            .get(&format!("/api/v1/namespaces/{namespace}/services"))
            .await
        {
            Ok(l) => l
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            Err(e) => {
                tracing::warn!(namespace, error = %e, "listing services for pod environments failed");
                Vec::new()
            }
        };
        cache.insert(
            namespace.to_owned(),
            (std::time::Instant::now(), list.clone()),
        );
        list
    }
}

/// ConfigMaps and Secrets straight from the API.
pub(crate) struct ApiObjects {
    client: Client,
}

#[async_trait::async_trait]
impl ObjectSource for ApiObjects {
    async fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let path = if namespace.is_empty() {
            format!("/api/v1/{kind}/{name}")
        } else {
            format!("/api/v1/namespaces/{namespace}/{kind}/{name}")
        };
        match self.client.get(&path).await {
            Ok(v) => Some(v),
            Err(e) => {
                if !e.is_not_found() {
                    tracing::warn!(kind, namespace, name, error = %e, "reading an object for a pod failed");
                }
                None
            }
        }
    }
}

pub(crate) struct ApiTokens {
    pub client: Client,
    pub ca_pem: String,
}

#[async_trait::async_trait]
impl volumes::TokenSource for ApiTokens {
    async fn token(
        &self,
        namespace: &str,
        service_account: &str,
        pod: &Value,
        audience: Option<&str>,
        expiration_seconds: i64,
    ) -> Result<String, String> {
        let mut spec = serde_json::json!({"expirationSeconds": expiration_seconds,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1",
                "name": pod.pointer("/metadata/name"), "uid": pod.pointer("/metadata/uid")}});
        if let Some(a) = audience {
            spec["audiences"] = serde_json::json!([a]);
        }
        let req = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec});
        let resp = self
            .client
            .create(
                &format!("/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"),
                &req,
            )
            .await
            .map_err(|e| {
                format!("requesting a token for service account {namespace}/{service_account}: {e}")
            })?;
        resp.pointer("/status/token")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| "the token response has no status.token".into())
    }

    fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }
}

/// Messages to a pod worker.
pub(crate) enum Msg {
    /// The pod as the API has it now.
    Pod(Box<Value>),
    /// The pod is gone from the API (force-deleted or deleted elsewhere).
    Gone,
    /// Its containers as the runtime reports them.
    Containers(Vec<ContainerInfo>),
}

/// Handle to the running pod manager.
pub struct PodManager {
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for PodManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodManager").finish_non_exhaustive()
    }
}

/// How often the runtime is relisted.
const RELIST: Duration = Duration::from_millis(250);

impl PodManager {
    /// Starts the manager; it runs until the process ends.
    pub fn spawn(
        client: Client,
        runtime: Arc<dyn Runtime>,
        network: Arc<dyn PodNetwork>,
        cfg: PodManagerConfig,
    ) -> Self {
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let ctx = Arc::new(Ctx {
            objects: ApiObjects {
                client: client.clone(),
            },
            events: events::Recorder::new(client.clone(), cfg.node_name.clone()),
            client,
            runtime,
            network,
            cfg,
            views: Arc::default(),
            host_resolv,
            services: tokio::sync::Mutex::default(),
            relist_now: tokio::sync::Notify::new(),
        });
        tokio::spawn(run(ctx.clone()));
        Self { ctx }
    }

    /// The streaming side (logs, exec, attach, port-forward) over this
    /// manager's pods.
    pub fn streams(&self) -> Arc<dyn crate::streams::PodStreams> {
        Arc::new(streams::ManagerStreams {
            views: self.ctx.views.clone(),
            runtime: self.ctx.runtime.clone(),
        })
    }

    /// How many pods have a worker (for tests and status).
    pub fn pod_count(&self) -> usize {
        self.ctx.views.lock().map(|v| v.len()).unwrap_or(0)
    }
}

fn uid_of(pod: &Value) -> String {
    pod.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

struct Workers {
    senders: HashMap<String, mpsc::UnboundedSender<Msg>>,
    shared: Senders,
    /// Workers were added since the last publish.
    new_workers: bool,
}

impl Workers {
    fn send(&mut self, ctx: &Arc<Ctx>, pod: Value) {
        let uid = uid_of(&pod);
        if uid.is_empty() {
            return;
        }
        if let Some(tx) = self.senders.get(&uid)
            && tx.send(Msg::Pod(Box::new(pod.clone()))).is_ok()
        {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(Msg::Pod(Box::new(pod)));
        self.senders.insert(uid.clone(), tx);
        tokio::spawn(worker::run(ctx.clone(), uid, rx));
        self.new_workers = true;
    }

    fn gone(&mut self, uid: &str) {
        if let Some(tx) = self.senders.remove(uid) {
            let _ = tx.send(Msg::Gone);
        }
    }
}

async fn run(ctx: Arc<Ctx>) {
    let mut workers = Workers {
        senders: HashMap::new(),
        shared: Senders::default(),
        new_workers: false,
    };
    let mut first = true;
    loop {
        if let Err(e) = watch_pods(&ctx, &mut workers, &mut first).await {
            tracing::warn!(error = %e, "pod watch failed; relisting");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn watch_pods(ctx: &Arc<Ctx>, workers: &mut Workers, first: &mut bool) -> Result<(), String> {
    let selector = format!("spec.nodeName={}", ctx.cfg.node_name);
    let path = format!("/api/v1/pods?fieldSelector={selector}");
    let list = ctx.client.get(&path).await.map_err(|e| e.to_string())?;
    let rv = list
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("0")
        .to_owned();
    let items: Vec<Value> = list
        .get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let live: Vec<String> = items.iter().map(uid_of).collect();
    if *first {
        *first = false;
        cleanup_orphans(ctx, &live).await;
        tokio::spawn(relist(ctx.clone(), workers.shared.clone()));
    }
    // Pods that vanished while the watch was down.
    let gone: Vec<String> = workers
        .senders
        .keys()
        .filter(|u| !live.contains(u))
        .cloned()
        .collect();
    for uid in gone {
        workers.gone(&uid);
    }
    for pod in items {
        workers.send(ctx, pod);
    }
    workers.publish(ctx);
    let mut stream = ctx
        .client
        .watch(&format!(
            "/api/v1/pods?fieldSelector={selector}&resourceVersion={rv}&allowWatchBookmarks=true"
        ))
        .await
        .map_err(|e| e.to_string())?;
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(|e| e.to_string())?;
        match ev.kind.as_str() {
            "ADDED" | "MODIFIED" => workers.send(ctx, ev.object),
            "DELETED" => workers.gone(&uid_of(&ev.object)),
            "ERROR" => return Err(format!("watch error: {}", ev.object)),
            _ => {}
        }
        workers.publish(ctx);
    }
    Err("the API server ended the pod watch".into())
}

/// The set of worker senders, shared with the relister.
type Senders = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Msg>>>>;

impl Workers {
    /// Makes the current senders visible to the relister.
    fn publish(&mut self, ctx: &Ctx) {
        self.senders.retain(|_, tx| !tx.is_closed());
        if let Ok(mut m) = self.shared.lock() {
            m.clone_from(&self.senders);
        }
        if std::mem::take(&mut self.new_workers) {
            ctx.relist_now.notify_one();
        }
    }
}

/// Hands every worker the state of its containers, a few times a second.
async fn relist(ctx: Arc<Ctx>, senders: Senders) {
    let mut last: HashMap<String, String> = HashMap::new();
    let mut ticker = tokio::time::interval(RELIST);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = ctx.relist_now.notified() => {}
        }
        let all = match ctx.runtime.list().await {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(error = %e, "listing containers failed");
                continue;
            }
        };
        let mut by_pod: BTreeMap<String, Vec<ContainerInfo>> = BTreeMap::new();
        for c in all {
            by_pod.entry(c.labels.pod_uid.clone()).or_default().push(c);
        }
        let Ok(senders) = senders.lock().map(|s| s.clone()) else {
            continue;
        };
        for (uid, tx) in &senders {
            let mut cs = by_pod.remove(uid).unwrap_or_default();
            cs.sort_by(|a, b| a.id.cmp(&b.id));
            // Only changes are sent: a worker is not woken for nothing.
            let fingerprint = serde_json::to_string(&cs).unwrap_or_default();
            if last.get(uid) != Some(&fingerprint) {
                last.insert(uid.clone(), fingerprint);
                let _ = tx.send(Msg::Containers(cs));
            }
        }
        last.retain(|uid, _| senders.contains_key(uid));
    }
}

/// After a crash or restart: containers, networks and directories of pods
/// that are not on this node any more go; the rest is adopted by workers.
async fn cleanup_orphans(ctx: &Arc<Ctx>, live: &[String]) {
    match ctx.runtime.list().await {
        Ok(all) => {
            for c in all.iter().filter(|c| !live.contains(&c.labels.pod_uid)) {
                tracing::info!(container = %c.id, pod = %c.labels.pod_name, "removing a container of a pod that is gone");
                let _ = ctx.runtime.stop(&c.id, Duration::from_secs(2)).await;
                let _ = ctx.runtime.remove(&c.id).await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing containers at start failed"),
    }
    // Sandboxes (Docker's pause containers) of pods that are gone.
    match ctx.runtime.list_sandboxes().await {
        Ok(uids) => {
            for uid in uids.iter().filter(|u| !live.contains(u)) {
                if let Err(e) = ctx.runtime.remove_sandbox(uid).await {
                    tracing::warn!(pod_uid = %uid, error = %e, "removing a stale pod sandbox failed");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing pod sandboxes at start failed"),
    }
    match ctx.network.reconcile(live).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            removed = n,
            "removed pod networks left by pods that are gone"
        ),
        Err(e) => tracing::warn!(error = %e, "reconciling pod networks failed"),
    }
    let pods_dir = ctx.cfg.data_dir.join("pods");
    for entry in std::fs::read_dir(&pods_dir).into_iter().flatten().flatten() {
        let uid = entry.file_name().to_string_lossy().to_string();
        if !live.contains(&uid) {
            volumes::cleanup(&entry.path());
        }
    }
    let logs_dir = ctx.cfg.data_dir.join("logs");
    for entry in std::fs::read_dir(&logs_dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !live.iter().any(|u| name.ends_with(&format!("_{u}"))) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
