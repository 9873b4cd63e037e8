//! Scheduler: binds each pending pod (`schedulerName: default-scheduler`,
//! no nodeName) to a node that passes every filter, preferring the least
//! allocated one.
//!
//! Filters: NodeReady, NodeUnschedulable, TaintToleration (NoSchedule and
//! NoExecute), NodeAffinity (nodeSelector and required node affinity),
//! NodeResourcesFit (cpu, memory, pods against allocatable), inter-pod
//! affinity and host ports (`interpod`), PodTopologySpread
//! (`topology_spread`: DoNotSchedule filters; ScheduleAnyway adds to the
//! score with weight 2, as upstream's default profile). A pod no node
//! fits gets `PodScheduled=False`, reason `Unschedulable`, with a message
//! counting the nodes each filter rejected (upstream's wording), and is
//! retried when nodes or pods change.
//!
//! Bindings made but not yet visible in the pod cache are kept as
//! "assumed", so back-to-back decisions account for each other.
//!
//! Volumes (`volume_scheduling`): a pod whose claims cannot be resolved
//! (missing, deleting, unbound Immediate) is unschedulable everywhere;
//! nodes a bound volume's affinity excludes are filtered out; unbound
//! WaitForFirstConsumer claims get the chosen node in
//! `volume.kubernetes.io/selected-node` before the pod is bound.

use crate::{
    client::{Client, NODES, PODS},
    error::Result,
    events::EventType,
    informer::{Change, Informer, Informers},
    meta, quantity,
    queue::Queue,
    runner::{Reconciler, Requeue},
    topology_spread,
    volume_scheduling::{self, ClaimPlan, VolumeInformers, VolumeMisfit},
};
use serde_json::{Value, json};
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

const SCHEDULER_NAME: &str = "default-scheduler";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: i64,
    pub memory: i64,
    pub pods: i64,
}

/// A pod's requests: the sum over containers, or the largest init
/// container if that is more (init containers run one at a time).
pub fn pod_requests(p: &Value) -> Resources {
    let sum = |kind: &str| {
        let mut r = Resources::default();
        for c in p
            .pointer(&format!("/spec/{kind}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let req = c.pointer("/resources/requests");
            let cpu = req
                .and_then(|r| r.get("cpu"))
                .and_then(Value::as_str)
                .and_then(quantity::millicores)
                .unwrap_or(0);
            let mem = req
                .and_then(|r| r.get("memory"))
                .and_then(Value::as_str)
                .and_then(quantity::units)
                .unwrap_or(0);
            if kind == "initContainers" {
                r.milli_cpu = r.milli_cpu.max(cpu);
                r.memory = r.memory.max(mem);
            } else {
                r.milli_cpu += cpu;
                r.memory += mem;
            }
        }
        r
    };
    let (main, init) = (sum("containers"), sum("initContainers"));
    Resources {
        milli_cpu: main.milli_cpu.max(init.milli_cpu),
        memory: main.memory.max(init.memory),
        pods: 1,
    }
}

fn allocatable(node: &Value) -> Resources {
    let field = |name: &str| {
        node.pointer(&format!("/status/allocatable/{name}"))
            .or_else(|| node.pointer(&format!("/status/capacity/{name}")))
            .and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
    };
    Resources {
        milli_cpu: field("cpu")
            .and_then(|q| quantity::millicores(&q))
            .unwrap_or(0),
        memory: field("memory")
            .and_then(|q| quantity::units(&q))
            .unwrap_or(0),
        pods: field("pods")
            .and_then(|q| quantity::units(&q))
            .unwrap_or(110),
    }
}

pub(crate) fn tolerates(pod: &Value, taint: &Value) -> bool {
    let key = taint.get("key").and_then(Value::as_str).unwrap_or("");
    let value = taint.get("value").and_then(Value::as_str).unwrap_or("");
    let effect = taint.get("effect").and_then(Value::as_str).unwrap_or("");
    pod.pointer("/spec/tolerations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|t| {
            let tk = t.get("key").and_then(Value::as_str).unwrap_or("");
            let op = t.get("operator").and_then(Value::as_str).unwrap_or("Equal");
            let tv = t.get("value").and_then(Value::as_str).unwrap_or("");
            let te = t.get("effect").and_then(Value::as_str).unwrap_or("");
            let key_ok = tk.is_empty() && op == "Exists" || tk == key;
            let value_ok = op == "Exists" || tv == value;
            let effect_ok = te.is_empty() || te == effect;
            key_ok && value_ok && effect_ok
        })
}

/// One `nodeSelectorTerm`: every expression must hold.
pub(crate) fn term_matches(
    term: &Value,
    labels: &BTreeMap<String, String>,
    node_name: &str,
) -> bool {
    let exprs = term
        .get("matchExpressions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let fields = term
        .get("matchFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false; // an empty term matches nothing, as upstream
    }
    let check = |e: &Value, actual: Option<&str>| {
        let values: Vec<&str> = e
            .get("values")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let num = |s: &str| s.parse::<i64>().ok();
        match e.get("operator").and_then(Value::as_str).unwrap_or("") {
            "In" => actual.is_some_and(|a| values.contains(&a)),
            "NotIn" => actual.is_none_or(|a| !values.contains(&a)),
            "Exists" => actual.is_some(),
            "DoesNotExist" => actual.is_none(),
            "Gt" => actual
                .and_then(num)
                .zip(values.first().and_then(|v| num(v)))
                .is_some_and(|(a, b)| a > b),
            "Lt" => actual
                .and_then(num)
                .zip(values.first().and_then(|v| num(v)))
                .is_some_and(|(a, b)| a < b),
            _ => false,
        }
    };
    exprs.iter().all(|e| {
        let k = e.get("key").and_then(Value::as_str).unwrap_or("");
        check(e, labels.get(k).map(String::as_str))
    }) && fields.iter().all(|e| {
        let k = e.get("key").and_then(Value::as_str).unwrap_or("");
        check(e, (k == "metadata.name").then_some(node_name))
    })
}

pub(crate) fn affinity_matches(pod: &Value, node: &Value) -> bool {
    let labels = meta::labels(node);
    let selector_ok = pod
        .pointer("/spec/nodeSelector")
        .and_then(Value::as_object)
        .is_none_or(|sel| {
            sel.iter()
                .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
        });
    let affinity_ok = pod
        .pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")
        .and_then(Value::as_array)
        .is_none_or(|terms| terms.iter().any(|t| term_matches(t, &labels, meta::name(node))));
    selector_ok && affinity_ok
}

/// Why a node was rejected, worded as upstream's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Reject {
    NotReady,
    Unschedulable,
    Taint,
    Affinity,
    Cpu,
    Memory,
    Pods,
    HostPorts,
    PodAffinity,
    PodAntiAffinity,
    VolumeConflict,
    VolumeBinding,
    Spread,
    SpreadLabel,
}

impl Reject {
    fn message(self) -> &'static str {
        match self {
            Reject::NotReady => "node(s) were not ready",
            Reject::Unschedulable => "node(s) were unschedulable",
            Reject::Taint => "node(s) had untolerated taint(s)",
            Reject::Affinity => "node(s) didn't match Pod's node affinity/selector",
            Reject::Cpu => "Insufficient cpu",
            Reject::Memory => "Insufficient memory",
            Reject::Pods => "Too many pods",
            Reject::HostPorts => "node(s) didn't have free ports for the requested pod ports",
            Reject::PodAffinity => "node(s) didn't match pod affinity rules",
            Reject::PodAntiAffinity => "node(s) didn't match pod anti-affinity rules",
            Reject::VolumeConflict => "node(s) had volume node affinity conflict",
            Reject::VolumeBinding => "node(s) didn't find available persistent volumes to bind",
            Reject::Spread => "node(s) didn't match pod topology spread constraints",
            Reject::SpreadLabel => {
                "node(s) didn't match pod topology spread constraints (missing required label)"
            }
        }
    }
}

fn filter(
    pod: &Value,
    req: Resources,
    node: &Value,
    alloc: Resources,
    used: Resources,
) -> Vec<Reject> {
    if !meta::condition_true(node, "Ready") {
        return vec![Reject::NotReady];
    }
    let unschedulable = node.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true);
    if unschedulable
        && !tolerates(
            pod,
            &json!({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}),
        )
    {
        return vec![Reject::Unschedulable];
    }
    let untolerated = node
        .pointer("/spec/taints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|t| {
            matches!(
                t.get("effect").and_then(Value::as_str),
                Some("NoSchedule" | "NoExecute")
            ) && !tolerates(pod, t)
        });
    if untolerated {
        return vec![Reject::Taint];
    }
    if !affinity_matches(pod, node) {
        return vec![Reject::Affinity];
    }
    let mut out = Vec::new();
    if req.milli_cpu > 0 && used.milli_cpu + req.milli_cpu > alloc.milli_cpu {
        out.push(Reject::Cpu);
    }
    if req.memory > 0 && used.memory + req.memory > alloc.memory {
        out.push(Reject::Memory);
    }
    if used.pods + 1 > alloc.pods {
        out.push(Reject::Pods);
    }
    out
}

/// LeastAllocated (the mean free fraction of cpu and memory after placing
/// the pod, 0–100; nodes without a capacity figure count as half free)
/// plus BalancedAllocation (100 − the gap between the cpu and memory
/// fractions in use), as upstream's default weights (1:1).
fn score(req: Resources, alloc: Resources, used: Resources) -> i64 {
    let used_pct = |cap: i64, used: i64| {
        if cap <= 0 {
            50
        } else {
            (used.min(cap) * 100) / cap
        }
    };
    let cpu = used_pct(alloc.milli_cpu, used.milli_cpu + req.milli_cpu);
    let mem = used_pct(alloc.memory, used.memory + req.memory);
    let least = ((100 - cpu) + (100 - mem)) / 2;
    let balanced = 100 - (cpu - mem).abs();
    least + balanced
}

/// A chosen node, or the rejection counts and the number of nodes.
type Decision = std::result::Result<String, (BTreeMap<Reject, usize>, usize)>;

/// A node as the filters need it, parsed once per node change.
#[derive(Debug)]
struct NodeInfo {
    obj: Arc<Value>,
    alloc: Resources,
}

/// Where pods are (bound in the cache, or assumed: bound by us and not
/// yet seen bound), and the resulting per-node usage, kept incrementally.
#[derive(Debug, Default)]
struct Accounting {
    placed: HashMap<String, (String, Resources)>,
    assumed: HashSet<String>,
    per_node: HashMap<String, Resources>,
    nodes: BTreeMap<String, Arc<NodeInfo>>,
    /// Pods with required anti-affinity: every decision must respect
    /// them (symmetry), not only theirs.
    anti: HashSet<String>,
    /// Where the next search starts, so nodes share the load of searches
    /// that stop early.
    next_start: usize,
    /// Unbound WaitForFirstConsumer claims given a node by a decision
    /// whose annotation the claim cache may not show yet (claim key →
    /// node): every pod sharing the claim must go there.
    claims: HashMap<String, String>,
}

impl Accounting {
    fn place(&mut self, key: &str, at: Option<(String, Resources)>) {
        if let Some((node, r)) = self.placed.remove(key)
            && let Some(u) = self.per_node.get_mut(&node)
        {
            u.milli_cpu -= r.milli_cpu;
            u.memory -= r.memory;
            u.pods -= r.pods;
        }
        if let Some((node, r)) = at {
            let u = self.per_node.entry(node.clone()).or_default();
            u.milli_cpu += r.milli_cpu;
            u.memory += r.memory;
            u.pods += r.pods;
            self.placed.insert(key.to_owned(), (node, r));
        }
    }
}

#[derive(Debug)]
pub struct Scheduler {
    client: Client,
    pods: Arc<Informer>,
    nodes: Arc<Informer>,
    queue: Arc<Queue>,
    acct: Mutex<Accounting>,
    volumes: VolumeInformers,
}

fn wants_scheduling(p: &Value) -> bool {
    meta::node_name(p).is_empty()
        && !meta::is_deleting(p)
        && !meta::pod_terminal(p)
        && p.pointer("/spec/schedulerName")
            .and_then(Value::as_str)
            .is_none_or(|s| s == SCHEDULER_NAME)
}

/// How many feasible nodes to find before choosing (upstream's adaptive
/// percentageOfNodesToScore: 50% − nodes/125, at least 5%, at least 100).
fn nodes_to_find(total: usize) -> usize {
    let percent = (50usize.saturating_sub(total / 125)).max(5);
    (total * percent / 100).max(100).min(total)
}

impl Scheduler {
    pub fn start(
        client: &Client,
        informers: &Informers,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let s = Arc::new(Self {
            client: client.clone(),
            pods: informers.get_or_create(client.info(PODS)?),
            nodes: informers.get_or_create(client.info(NODES)?),
            queue: Queue::new(),
            acct: Mutex::new(Accounting::default()),
            volumes: VolumeInformers {
                claims: informers.get_or_create(client.info(crate::pv_binder::PVCS)?),
                volumes: informers.get_or_create(client.info(crate::pv_binder::PVS)?),
                classes: informers.get_or_create(client.info(crate::pv_binder::STORAGE_CLASSES)?),
            },
        });
        let weak = Arc::downgrade(&s);
        s.pods.on_change(Arc::new(move |ch: &Change| {
            let Some(s) = weak.upgrade() else { return };
            let Some(p) = ch.object() else { return };
            let key = meta::key(p);
            let placement = ch.new.as_ref().and_then(|n| {
                (!meta::node_name(n).is_empty() && !meta::pod_terminal(n))
                    .then(|| (meta::node_name(n).to_owned(), pod_requests(n)))
            });
            let mut freed = false;
            if let Ok(mut a) = s.acct.lock() {
                let bound = ch
                    .new
                    .as_ref()
                    .is_some_and(|n| !meta::node_name(n).is_empty());
                if ch.new.is_none() || bound {
                    a.assumed.remove(&key);
                }
                // An assumed pod keeps its place until the cache shows it
                // bound (or gone).
                if !a.assumed.contains(&key) {
                    freed = a.placed.contains_key(&key) && placement.is_none();
                    a.place(&key, placement);
                }
                match &ch.new {
                    Some(n) if crate::interpod::has_anti_affinity(n) => {
                        a.anti.insert(key.clone());
                    }
                    _ => {
                        a.anti.remove(&key);
                    }
                }
            }
            if let Some(n) = &ch.new
                && wants_scheduling(n)
            {
                s.queue.add(key);
            }
            if freed {
                s.requeue_pending();
            }
        }));
        let weak = Arc::downgrade(&s);
        s.nodes.on_change(Arc::new(move |ch: &Change| {
            let Some(s) = weak.upgrade() else { return };
            if let Ok(mut a) = s.acct.lock() {
                match &ch.new {
                    Some(n) => {
                        let info = NodeInfo {
                            obj: n.clone(),
                            alloc: allocatable(n),
                        };
                        a.nodes.insert(meta::name(n).to_owned(), Arc::new(info));
                    }
                    None => {
                        if let Some(o) = &ch.old {
                            a.nodes.remove(meta::name(o));
                        }
                    }
                }
            }
            // Heartbeats change nothing a filter looks at.
            let relevant = |n: &Value| {
                (
                    n.get("spec").cloned(),
                    meta::labels(n),
                    allocatable(n),
                    meta::condition_true(n, "Ready"),
                )
            };
            if let (Some(o), Some(n)) = (&ch.old, &ch.new)
                && relevant(o) == relevant(n)
            {
                return;
            }
            s.requeue_pending();
        }));
        // Claims, volumes and classes decide where (and whether) pods with
        // volumes fit.
        let weak = Arc::downgrade(&s);
        s.volumes.claims.on_change(Arc::new(move |ch: &Change| {
            let Some(s) = weak.upgrade() else { return };
            if let Some(o) = ch.object() {
                let settled = ch.new.as_ref().is_none_or(|n| {
                    !crate::pv_binder::volume_name(n).is_empty()
                        || meta::annotation(n, crate::pv_binder::ANN_SELECTED_NODE).is_some()
                });
                if settled && let Ok(mut a) = s.acct.lock() {
                    a.claims.remove(&meta::key(o));
                }
            }
            s.requeue_pending();
        }));
        for inf in [&s.volumes.volumes, &s.volumes.classes] {
            let weak = Arc::downgrade(&s);
            inf.on_change(Arc::new(move |_: &Change| {
                if let Some(s) = weak.upgrade() {
                    s.requeue_pending();
                }
            }));
        }
        // One worker makes every decision (each sees the previous ones);
        // bindings are written concurrently.
        Ok(crate::runner::spawn(
            Arc::new(s.clone()),
            s.queue.clone(),
            1,
        ))
    }

    fn requeue_pending(&self) {
        for p in self.pods.list() {
            if wants_scheduling(&p) {
                self.queue.add(meta::key(&p));
            }
        }
    }

    /// Picks a node and assumes the pod there; `Err` has the rejection
    /// counts and the number of nodes considered.
    fn decide(&self, key: &str, pod: &Value, plans: &[ClaimPlan]) -> Option<Decision> {
        let req = pod_requests(pod);
        let mut a = self.acct.lock().ok()?;
        if a.assumed.contains(key) {
            return None;
        }
        let nodes: Vec<Arc<NodeInfo>> = a.nodes.values().cloned().collect();
        let total = nodes.len();
        let want = nodes_to_find(total);
        let start = if total == 0 { 0 } else { a.next_start % total };
        let mut feasible: Vec<(i64, &Arc<NodeInfo>)> = Vec::new();
        let mut rejects: BTreeMap<Reject, usize> = BTreeMap::new();
        let mut looked = 0;
        let interpod = crate::interpod::needed(pod) || !a.anti.is_empty();
        let spreads = topology_spread::needed(pod);
        // Pods by node, for the filters that look at neighbours.
        let placed: HashMap<String, Vec<Arc<Value>>> = if interpod || spreads {
            let mut placed: HashMap<String, Vec<Arc<Value>>> = HashMap::new();
            for (k, (node, _)) in &a.placed {
                if let Some(p) = self.pods.get(k) {
                    placed.entry(node.clone()).or_default().push(p);
                }
            }
            placed
        } else {
            HashMap::new()
        };
        let neighbours = interpod.then(|| {
            let labels = nodes
                .iter()
                .map(|n| (meta::name(&n.obj).to_owned(), meta::labels(&n.obj)))
                .collect();
            crate::interpod::Neighbours::new(pod, &placed, &labels)
        });
        let spread = spreads.then(|| {
            let eligible: Vec<_> = nodes
                .iter()
                .map(|n| {
                    (
                        meta::name(&n.obj).to_owned(),
                        meta::labels(&n.obj),
                        affinity_matches(pod, &n.obj),
                    )
                })
                .collect();
            topology_spread::Spread::new(pod, &eligible, &placed)
        });
        for n in nodes.iter().cycle().skip(start).take(total) {
            looked += 1;
            let used = a
                .per_node
                .get(meta::name(&n.obj))
                .copied()
                .unwrap_or_default();
            let mut why = filter(pod, req, &n.obj, n.alloc, used);
            if why.is_empty()
                && let Some(nb) = &neighbours
                && let Some(m) = nb.check(meta::name(&n.obj), &meta::labels(&n.obj))
            {
                why.push(match m {
                    crate::interpod::Misfit::HostPorts => Reject::HostPorts,
                    crate::interpod::Misfit::PodAffinity => Reject::PodAffinity,
                    crate::interpod::Misfit::PodAntiAffinity => Reject::PodAntiAffinity,
                });
            }
            if why.is_empty()
                && let Some(sp) = &spread
                && let Some(m) = sp.check(&meta::labels(&n.obj))
            {
                why.push(match m {
                    topology_spread::Misfit::MissingLabel => Reject::SpreadLabel,
                    topology_spread::Misfit::Skew => Reject::Spread,
                });
            }
            if why.is_empty()
                && let Some(m) = volume_scheduling::node_misfit(plans, &n.obj)
            {
                why.push(match m {
                    VolumeMisfit::AffinityConflict => Reject::VolumeConflict,
                    VolumeMisfit::NoVolume => Reject::VolumeBinding,
                });
            }
            if why.is_empty() {
                // PodTopologySpread weighs 2 against the resource scores,
                // as in upstream's default profile.
                let spread_score = spread
                    .as_ref()
                    .map_or(0, |sp| 2 * sp.score(&meta::labels(&n.obj)));
                feasible.push((score(req, n.alloc, used) + spread_score, n));
                if feasible.len() >= want {
                    break;
                }
            } else {
                for r in why {
                    *rejects.entry(r).or_default() += 1;
                }
            }
        }
        a.next_start = start + looked;
        let Some((_, best)) = feasible.iter().max_by_key(|(s, _)| *s) else {
            return Some(Err((rejects, total)));
        };
        let node = meta::name(&best.obj).to_owned();
        a.assumed.insert(key.to_owned());
        a.place(key, Some((node.clone(), req)));
        for claim in volume_scheduling::claims_to_select(plans) {
            a.claims.insert(claim, node.clone());
        }
        Some(Ok(node))
    }

    fn forget(&self, key: &str) {
        if let Ok(mut a) = self.acct.lock() {
            a.assumed.remove(key);
            a.place(key, None);
        }
    }

    async fn mark_unschedulable(&self, pod: &Value, message: String) -> Result<()> {
        let current = meta::condition(pod, "PodScheduled");
        if current
            .and_then(|c| c.get("message"))
            .and_then(Value::as_str)
            == Some(message.as_str())
        {
            return Ok(());
        }
        // Once per distinct reason (a retry with the same verdict is not
        // news; the condition already says it).
        self.client.event(
            SCHEDULER_NAME,
            "Pod",
            pod,
            EventType::Warning,
            "FailedScheduling",
            message.clone(),
        );
        let mut conditions: Vec<Value> = pod
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.get("type").and_then(Value::as_str) != Some("PodScheduled"))
            .collect();
        conditions.push(json!({
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": message, "lastProbeTime": null,
            "lastTransitionTime": meta::now_rfc3339(),
        }));
        crate::client::ignore_not_found(
            self.client
                .patch(
                    PODS,
                    meta::namespace(pod),
                    meta::name(pod),
                    Some("status"),
                    json!({"status": {"conditions": conditions, "phase": "Pending"}}),
                )
                .await,
        )?;
        Ok(())
    }

    /// Writes the binding; on failure the assumption is dropped and the pod
    /// retried.
    async fn bind(
        self: Arc<Self>,
        key: String,
        pod: Arc<Value>,
        node: String,
        claims: Vec<String>,
    ) {
        let (ns, name) = meta::split_key(&key);
        // The claims learn their node first: the binder and the node's
        // provisioner act on it while the pod starts.
        for claim in &claims {
            let (cns, cname) = meta::split_key(claim);
            let patch =
                json!({"metadata": {"annotations": {crate::pv_binder::ANN_SELECTED_NODE: node}}});
            if let Err(e) = self
                .client
                .patch(crate::pv_binder::PVCS, cns, cname, None, patch)
                .await
            {
                tracing::warn!(pod = %key, %claim, %node, error = %e, "selecting the node of a claim failed; will retry");
                self.forget(&key);
                if let Ok(mut a) = self.acct.lock() {
                    a.claims.remove(claim);
                }
                self.queue.add_rate_limited(&key);
                return;
            }
        }
        match self.client.bind(ns.unwrap_or("default"), name, &node).await {
            Ok(()) => {
                tracing::debug!(pod = %key, %node, "bound");
                self.client.event(
                    SCHEDULER_NAME,
                    "Pod",
                    &pod,
                    EventType::Normal,
                    "Scheduled",
                    format!("Successfully assigned {key} to {node}"),
                );
                // A pod once found unschedulable: the kubelet reports
                // PodScheduled=True when it takes the pod; until then the
                // stale Unschedulable condition should not show.
                if meta::condition(&pod, "PodScheduled").is_some() {
                    let conditions: Vec<Value> = pod
                        .pointer("/status/conditions")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|c| {
                            if c.get("type").and_then(Value::as_str) == Some("PodScheduled") {
                                json!({"type": "PodScheduled", "status": "True",
                                       "lastProbeTime": null,
                                       "lastTransitionTime": meta::now_rfc3339()})
                            } else {
                                c
                            }
                        })
                        .collect();
                    let patch = json!({"status": {"conditions": conditions}});
                    if let Err(e) = self
                        .client
                        .patch(PODS, ns, name, Some("status"), patch)
                        .await
                        && !e.is_not_found()
                    {
                        tracing::debug!(pod = %key, error = %e, "clearing PodScheduled=False failed");
                    }
                }
            }
            Err(e) if e.is_not_found() || e.is_conflict() => self.forget(&key),
            Err(e) => {
                tracing::warn!(pod = %key, %node, error = %e, "binding failed; will retry");
                self.forget(&key);
                self.queue.add_rate_limited(&key);
            }
        }
    }
}

#[async_trait::async_trait]
impl Reconciler for Arc<Scheduler> {
    fn name(&self) -> &'static str {
        "scheduler"
    }

    async fn reconcile(&self, key: &str) -> Result<Requeue> {
        let Some(pod) = self.pods.get(key) else {
            return Ok(Requeue::No);
        };
        if !wants_scheduling(&pod) {
            return Ok(Requeue::No);
        }
        let plans = if volume_scheduling::claim_names(&pod).is_empty() {
            Ok(Vec::new())
        } else {
            let assumed_claims = self
                .acct
                .lock()
                .map(|a| a.claims.clone())
                .unwrap_or_default();
            volume_scheduling::plan(&pod, &self.volumes, &assumed_claims)
        };
        let plans = match plans {
            Ok(p) => p,
            Err(why) => {
                let total = self.acct.lock().map(|a| a.nodes.len()).unwrap_or(0);
                let message = format!("0/{total} nodes are available: {why}.");
                tracing::debug!(pod = %key, %message, "pod is unschedulable");
                self.mark_unschedulable(&pod, message).await?;
                // Claim changes requeue it; the timer is a backstop.
                return Ok(Requeue::After(Duration::from_secs(30)));
            }
        };
        match self.decide(key, &pod, &plans) {
            None => Ok(Requeue::No),
            Some(Ok(node)) => {
                let claims = volume_scheduling::claims_to_select(&plans);
                tokio::spawn(self.clone().bind(key.to_owned(), pod, node, claims));
                Ok(Requeue::No)
            }
            Some(Err((rejects, total))) => {
                let mut parts: Vec<String> = rejects
                    .iter()
                    .map(|(r, n)| format!("{n} {}", r.message()))
                    .collect();
                parts.sort();
                let message = if total == 0 {
                    "0/0 nodes are available: no nodes registered.".to_owned()
                } else {
                    format!("0/{total} nodes are available: {}.", parts.join(", "))
                };
                tracing::debug!(pod = %key, %message, "pod is unschedulable");
                self.mark_unschedulable(&pod, message).await?;
                // Node and pod changes requeue it; the timer is a backstop.
                Ok(Requeue::After(Duration::from_secs(30)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, extra: Value) -> Value {
        let mut n = json!({"metadata": {"name": name, "labels": {"disk": "ssd"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "3"}}});
        if let (Some(m), Some(e)) = (n.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                m.insert(k.clone(), v.clone());
            }
        }
        n
    }

    #[test]
    fn filters_name_what_failed() {
        let pod = json!({"spec": {"containers": [{"resources": {"requests": {"cpu": "500m"}}}]}});
        let ok = node("a", json!({}));
        assert!(
            filter(
                &pod,
                pod_requests(&pod),
                &ok,
                allocatable(&ok),
                Resources::default()
            )
            .is_empty()
        );
        let full = Resources {
            milli_cpu: 1800,
            memory: 0,
            pods: 3,
        };
        assert_eq!(
            filter(&pod, pod_requests(&pod), &ok, allocatable(&ok), full),
            vec![Reject::Cpu, Reject::Pods]
        );
        let tainted = node(
            "b",
            json!({"spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]}}),
        );
        assert_eq!(
            filter(
                &pod,
                pod_requests(&pod),
                &tainted,
                allocatable(&tainted),
                Resources::default()
            ),
            vec![Reject::Taint]
        );
        let tolerant = json!({"spec": {"tolerations": [{"key": "k", "operator": "Exists"}], "containers": []}});
        assert!(
            filter(
                &tolerant,
                pod_requests(&tolerant),
                &tainted,
                allocatable(&tainted),
                Resources::default()
            )
            .is_empty()
        );
        let cordoned = node("c", json!({"spec": {"unschedulable": true}}));
        assert_eq!(
            filter(
                &pod,
                pod_requests(&pod),
                &cordoned,
                allocatable(&cordoned),
                Resources::default()
            ),
            vec![Reject::Unschedulable]
        );
        let picky = json!({"spec": {"nodeSelector": {"disk": "hdd"}, "containers": []}});
        assert_eq!(
            filter(
                &picky,
                pod_requests(&picky),
                &ok,
                allocatable(&ok),
                Resources::default()
            ),
            vec![Reject::Affinity]
        );
        let affine = json!({"spec": {"containers": [], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}]}}}}});
        assert!(
            filter(
                &affine,
                pod_requests(&affine),
                &ok,
                allocatable(&ok),
                Resources::default()
            )
            .is_empty()
        );
    }

    #[test]
    fn nodes_to_find_follows_upstreams_percentage() {
        assert_eq!(nodes_to_find(50), 50);
        assert_eq!(nodes_to_find(1000), 420);
        assert_eq!(nodes_to_find(5000), 500);
        assert_eq!(nodes_to_find(10_000), 500);
    }

    #[test]
    fn least_allocated_prefers_the_emptier_node() {
        let pod = json!({"spec": {"containers": [{"resources": {"requests": {"cpu": "100m", "memory": "100Mi"}}}]}});
        let n = node("a", json!({}));
        let busy = Resources {
            milli_cpu: 1500,
            memory: 3 << 30,
            pods: 1,
        };
        let (req, alloc) = (pod_requests(&pod), allocatable(&n));
        assert!(score(req, alloc, Resources::default()) > score(req, alloc, busy));
    }
}
