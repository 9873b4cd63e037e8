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
    meta, preemption, quantity,
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

impl Resources {
    pub fn plus(self, o: Resources) -> Resources {
        Resources {
            milli_cpu: self.milli_cpu + o.milli_cpu,
            memory: self.memory + o.memory,
            pods: self.pods + o.pods,
        }
    }

    pub fn minus(self, o: Resources) -> Resources {
        Resources {
            milli_cpu: self.milli_cpu - o.milli_cpu,
            memory: self.memory - o.memory,
            pods: self.pods - o.pods,
        }
    }
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

/// A node taint, as the filters compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Taint {
    key: String,
    value: String,
    effect: String,
}

impl Taint {
    fn parse(t: &Value) -> Self {
        let s = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        Self {
            key: s("key"),
            value: s("value"),
            effect: s("effect"),
        }
    }
}

/// A pod toleration, parsed once per decision.
#[derive(Debug, Clone)]
pub(crate) struct Toleration {
    key: String,
    exists: bool,
    value: String,
    effect: String,
}

impl Toleration {
    fn parse(t: &Value) -> Self {
        let s = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        Self {
            key: s("key"),
            exists: t.get("operator").and_then(Value::as_str) == Some("Exists"),
            value: s("value"),
            effect: s("effect"),
        }
    }

    fn tolerates(&self, taint: &Taint) -> bool {
        let key_ok = (self.key.is_empty() && self.exists) || self.key == taint.key;
        let value_ok = self.exists || self.value == taint.value;
        let effect_ok = self.effect.is_empty() || self.effect == taint.effect;
        key_ok && value_ok && effect_ok
    }
}

fn tolerations(pod: &Value) -> Vec<Toleration> {
    pod.pointer("/spec/tolerations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(Toleration::parse)
        .collect()
}

pub(crate) fn tolerates(pod: &Value, taint: &Value) -> bool {
    let taint = Taint::parse(taint);
    tolerations(pod).iter().any(|t| t.tolerates(&taint))
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

/// What the filters and scores need of the pod being scheduled, read once
/// per decision rather than once per node.
struct PodFacts<'a> {
    req: Resources,
    tolerations: Vec<Toleration>,
    node_selector: Vec<(&'a str, &'a str)>,
    required_terms: Option<&'a Vec<Value>>,
    /// preferredDuringScheduling node affinity: (weight, term).
    preferred_terms: Vec<(i64, &'a Value)>,
    priority: i64,
}

impl<'a> PodFacts<'a> {
    fn new(pod: &'a Value) -> Self {
        let node_selector = pod
            .pointer("/spec/nodeSelector")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or("")))
            .collect();
        let preferred_terms = pod
            .pointer("/spec/affinity/nodeAffinity/preferredDuringSchedulingIgnoredDuringExecution")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let weight = p.get("weight").and_then(Value::as_i64)?;
                Some((weight, p.get("preference")?))
            })
            .collect();
        Self {
            req: pod_requests(pod),
            tolerations: tolerations(pod),
            node_selector,
            required_terms: pod
                .pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")
                .and_then(Value::as_array),
            preferred_terms,
            priority: priority(pod),
        }
    }

    fn tolerates(&self, taint: &Taint) -> bool {
        self.tolerations.iter().any(|t| t.tolerates(taint))
    }

    /// nodeSelector and required node affinity.
    fn matches_node(&self, node: &NodeInfo) -> bool {
        self.node_selector
            .iter()
            .all(|(k, v)| node.labels.get(*k).map(String::as_str) == Some(*v))
            && self.required_terms.is_none_or(|terms| {
                terms
                    .iter()
                    .any(|t| term_matches(t, &node.labels, &node.name))
            })
    }

    /// Sum of the weights of the preferred node-affinity terms the node
    /// matches.
    fn preferred_weight(&self, node: &NodeInfo) -> i64 {
        self.preferred_terms
            .iter()
            .filter(|(_, t)| term_matches(t, &node.labels, &node.name))
            .map(|(w, _)| *w)
            .sum()
    }

    /// PreferNoSchedule taints the pod does not tolerate.
    fn intolerable_preferences(&self, node: &NodeInfo) -> i64 {
        node.taints
            .iter()
            .filter(|t| t.effect == "PreferNoSchedule" && !self.tolerates(t))
            .count() as i64
    }
}

/// A pod's priority (set by admission from its PriorityClass).
pub(crate) fn priority(pod: &Value) -> i64 {
    pod.pointer("/spec/priority")
        .and_then(Value::as_i64)
        .unwrap_or(0)
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

fn filter(pod: &PodFacts, node: &NodeInfo, used: Resources) -> Vec<Reject> {
    if !node.ready {
        return vec![Reject::NotReady];
    }
    let cordon = Taint {
        key: "node.kubernetes.io/unschedulable".into(),
        value: String::new(),
        effect: "NoSchedule".into(),
    };
    if node.unschedulable && !pod.tolerates(&cordon) {
        return vec![Reject::Unschedulable];
    }
    let untolerated = node
        .taints
        .iter()
        .any(|t| matches!(t.effect.as_str(), "NoSchedule" | "NoExecute") && !pod.tolerates(t));
    if untolerated {
        return vec![Reject::Taint];
    }
    if !pod.matches_node(node) {
        return vec![Reject::Affinity];
    }
    resource_misfits(pod.req, node.alloc, used)
}

/// NodeResourcesFit: what the node lacks for the pod.
fn resource_misfits(req: Resources, alloc: Resources, used: Resources) -> Vec<Reject> {
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

/// NodeResourcesFit as a yes/no.
fn fits(req: Resources, alloc: Resources, used: Resources) -> bool {
    resource_misfits(req, alloc, used).is_empty()
}

/// The best feasible node. Raw scores are normalized to 0–100 over the
/// feasible nodes where upstream normalizes them, then weighted as its
/// default profile: resources 1 (least allocated + balanced), topology
/// spread 2, node affinity 2, taint toleration 3, inter-pod affinity 2.
fn pick_best<'a>(feasible: &[(&'a Arc<NodeInfo>, [i64; 5])]) -> Option<&'a Arc<NodeInfo>> {
    let max = |i: usize| feasible.iter().map(|(_, s)| s[i]).max().unwrap_or(0);
    let min = |i: usize| feasible.iter().map(|(_, s)| s[i]).min().unwrap_or(0);
    let (aff_max, taint_max) = (max(2), max(3));
    let (pa_min, pa_max) = (min(4), max(4));
    feasible
        .iter()
        .max_by_key(|(_, s)| {
            let affinity = if aff_max > 0 { s[2] * 100 / aff_max } else { 0 };
            let taints = if taint_max > 0 {
                100 - s[3] * 100 / taint_max
            } else {
                100
            };
            let pod_affinity = if pa_max > pa_min {
                (s[4] - pa_min) * 100 / (pa_max - pa_min)
            } else {
                0
            };
            s[0] + 2 * s[1] + 2 * affinity + 3 * taints + 2 * pod_affinity
        })
        .map(|(n, _)| *n)
}

/// A chosen node, or the rejection counts and the number of nodes.
type Decision = std::result::Result<String, (BTreeMap<Reject, usize>, usize)>;

/// A node as the filters need it, parsed once per node change.
#[derive(Debug)]
struct NodeInfo {
    obj: Arc<Value>,
    name: String,
    labels: BTreeMap<String, String>,
    ready: bool,
    unschedulable: bool,
    taints: Vec<Taint>,
    alloc: Resources,
}

impl NodeInfo {
    fn new(obj: Arc<Value>) -> Self {
        Self {
            name: meta::name(&obj).to_owned(),
            labels: meta::labels(&obj),
            ready: meta::condition_true(&obj, "Ready"),
            unschedulable: obj.pointer("/spec/unschedulable").and_then(Value::as_bool)
                == Some(true),
            taints: obj
                .pointer("/spec/taints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(Taint::parse)
                .collect(),
            alloc: allocatable(&obj),
            obj,
        }
    }
}

/// A pod that preempted others and waits for them to go: the node is
/// held for it against pods of lower or equal priority.
#[derive(Debug, Clone)]
struct Nomination {
    node: String,
    req: Resources,
    priority: i64,
    victims: Vec<String>,
}

/// Where pods are (bound in the cache, or assumed: bound by us and not
/// yet seen bound), and the resulting per-node usage, kept incrementally.
#[derive(Debug, Default)]
struct Accounting {
    /// pod key → (node, requests, priority).
    placed: HashMap<String, (String, Resources, i64)>,
    assumed: HashSet<String>,
    per_node: HashMap<String, Resources>,
    nodes: BTreeMap<String, Arc<NodeInfo>>,
    /// `nodes` in order, shared with decisions; rebuilt after a change.
    node_list: Option<Arc<Vec<Arc<NodeInfo>>>>,
    /// Pods with required anti-affinity: every decision must respect
    /// them (symmetry), not only theirs.
    anti: HashSet<String>,
    /// Pods with any pod affinity: their terms weigh on the scores of
    /// the pods they select.
    affine: HashSet<String>,
    /// Where the next search starts, so nodes share the load of searches
    /// that stop early.
    next_start: usize,
    /// Unbound WaitForFirstConsumer claims given a node by a decision
    /// whose annotation the claim cache may not show yet (claim key →
    /// node): every pod sharing the claim must go there.
    claims: HashMap<String, String>,
    /// Preemptors waiting for their victims to go (pod key →
    /// nomination).
    nominated: HashMap<String, Nomination>,
}

impl Accounting {
    fn place(&mut self, key: &str, at: Option<(String, Resources, i64)>) {
        if let Some((node, r, _)) = self.placed.remove(key)
            && let Some(u) = self.per_node.get_mut(&node)
        {
            *u = u.minus(r);
        }
        if let Some((node, r, prio)) = at {
            let u = self.per_node.entry(node.clone()).or_default();
            *u = u.plus(r);
            self.placed.insert(key.to_owned(), (node, r, prio));
        }
    }

    /// Resources held on each node for nominated pods at least as
    /// important as `priority` (other than `key` itself).
    fn reserved(&self, key: &str, priority: i64) -> HashMap<String, Resources> {
        let mut out: HashMap<String, Resources> = HashMap::new();
        for (k, n) in &self.nominated {
            if k != key && n.priority >= priority {
                let r = out.entry(n.node.clone()).or_default();
                *r = r.plus(n.req);
            }
        }
        out
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
                    .then(|| (meta::node_name(n).to_owned(), pod_requests(n), priority(n)))
            });
            let mut freed = false;
            if let Ok(mut a) = s.acct.lock() {
                let bound = ch
                    .new
                    .as_ref()
                    .is_some_and(|n| !meta::node_name(n).is_empty());
                if ch.new.is_none() || bound {
                    a.assumed.remove(&key);
                    a.nominated.remove(&key);
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
                match &ch.new {
                    Some(n) if crate::interpod::has_any_affinity(n) => {
                        a.affine.insert(key.clone());
                    }
                    _ => {
                        a.affine.remove(&key);
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
            // Heartbeats change nothing a filter or score looks at: the
            // parsed node stays as it is.
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
            if let Ok(mut a) = s.acct.lock() {
                match &ch.new {
                    Some(n) => {
                        let info = NodeInfo::new(n.clone());
                        a.nodes.insert(info.name.clone(), Arc::new(info));
                    }
                    None => {
                        if let Some(o) = &ch.old {
                            a.nodes.remove(meta::name(o));
                        }
                    }
                }
                a.node_list = None;
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

    /// Queues every pending pod, the most important first (the queue is
    /// FIFO; upstream's active queue is ordered by priority likewise).
    fn requeue_pending(&self) {
        let mut pending: Vec<(i64, String)> = self
            .pods
            .list()
            .iter()
            .filter(|p| wants_scheduling(p))
            .map(|p| (priority(p), meta::key(p)))
            .collect();
        pending.sort_by_key(|p| std::cmp::Reverse(p.0));
        for (_, key) in pending {
            self.queue.add(key);
        }
    }

    /// Picks a node and assumes the pod there; `Err` has the rejection
    /// counts and the number of nodes considered.
    fn decide(&self, key: &str, pod: &Value, plans: &[ClaimPlan]) -> Option<Decision> {
        let facts = PodFacts::new(pod);
        let req = facts.req;
        let mut a = self.acct.lock().ok()?;
        if a.assumed.contains(key) {
            return None;
        }
        let nodes = match &a.node_list {
            Some(list) => list.clone(),
            None => {
                let list = Arc::new(a.nodes.values().cloned().collect::<Vec<_>>());
                a.node_list = Some(list.clone());
                list
            }
        };
        let total = nodes.len();
        let want = nodes_to_find(total);
        let start = if total == 0 { 0 } else { a.next_start % total };
        let reserved = if a.nominated.is_empty() {
            HashMap::new()
        } else {
            a.reserved(key, facts.priority)
        };
        let mut rejects: BTreeMap<Reject, usize> = BTreeMap::new();
        let mut looked = 0;
        let interpod = crate::interpod::needed(pod) || !a.anti.is_empty();
        let spreads = topology_spread::needed(pod);
        let prefers = crate::interpod::has_any_affinity(pod) || !a.affine.is_empty();
        // Pods by node, for the filters and scores that look at
        // neighbours.
        let placed: HashMap<String, Vec<Arc<Value>>> = if interpod || spreads || prefers {
            let mut placed: HashMap<String, Vec<Arc<Value>>> = HashMap::new();
            for (k, (node, _, _)) in &a.placed {
                if let Some(p) = self.pods.get(k) {
                    placed.entry(node.clone()).or_default().push(p);
                }
            }
            placed
        } else {
            HashMap::new()
        };
        let node_labels = || -> HashMap<String, BTreeMap<String, String>> {
            nodes
                .iter()
                .map(|n| (n.name.clone(), n.labels.clone()))
                .collect()
        };
        let neighbours =
            interpod.then(|| crate::interpod::Neighbours::new(pod, &placed, &node_labels()));
        let preferences = prefers
            .then(|| {
                let affine: Vec<(String, Arc<Value>)> = a
                    .affine
                    .iter()
                    .filter(|k| k.as_str() != key)
                    .filter_map(|k| {
                        let (node, _, _) = a.placed.get(k)?;
                        Some((node.clone(), self.pods.get(k)?))
                    })
                    .collect();
                crate::interpod::Preferences::new(pod, &placed, &affine, &node_labels())
            })
            .filter(|p| !p.is_empty());
        let spread = spreads.then(|| {
            let eligible: Vec<_> = nodes
                .iter()
                .map(|n| (n.name.clone(), n.labels.clone(), facts.matches_node(n)))
                .collect();
            topology_spread::Spread::new(pod, &eligible, &placed)
        });
        // Feasible nodes with their raw scores: (resources, spread,
        // preferred node affinity, PreferNoSchedule taints, pod affinity).
        let mut feasible: Vec<(&Arc<NodeInfo>, [i64; 5])> = Vec::new();
        for n in nodes.iter().cycle().skip(start).take(total) {
            looked += 1;
            let mut used = a.per_node.get(&n.name).copied().unwrap_or_default();
            if let Some(r) = reserved.get(&n.name) {
                used = used.plus(*r);
            }
            let mut why = filter(&facts, n, used);
            if why.is_empty()
                && let Some(nb) = &neighbours
                && let Some(m) = nb.check(&n.name, &n.labels)
            {
                why.push(match m {
                    crate::interpod::Misfit::HostPorts => Reject::HostPorts,
                    crate::interpod::Misfit::PodAffinity => Reject::PodAffinity,
                    crate::interpod::Misfit::PodAntiAffinity => Reject::PodAntiAffinity,
                });
            }
            if why.is_empty()
                && let Some(sp) = &spread
                && let Some(m) = sp.check(&n.labels)
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
                feasible.push((
                    n,
                    [
                        score(req, n.alloc, used),
                        spread.as_ref().map_or(0, |sp| sp.score(&n.labels)),
                        facts.preferred_weight(n),
                        facts.intolerable_preferences(n),
                        preferences.as_ref().map_or(0, |p| p.score(&n.labels)),
                    ],
                ));
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
        let Some(best) = pick_best(&feasible) else {
            return Some(Err((rejects, total)));
        };
        let node = best.name.clone();
        a.assumed.insert(key.to_owned());
        a.place(key, Some((node.clone(), req, facts.priority)));
        a.nominated.remove(key);
        for claim in volume_scheduling::claims_to_select(plans) {
            a.claims.insert(claim, node.clone());
        }
        Some(Ok(node))
    }

    /// When no node fits: the node and victims whose removal makes room
    /// (see `preemption`), nominated for the pod; `None` when the pod may
    /// not preempt, is still waiting for earlier victims, or no removal
    /// of lower-priority pods helps.
    fn preempt(&self, key: &str, pod: &Value) -> Option<(String, Vec<preemption::Placed>)> {
        if pod
            .pointer("/spec/preemptionPolicy")
            .and_then(Value::as_str)
            == Some("Never")
        {
            return None;
        }
        let facts = PodFacts::new(pod);
        let mut a = self.acct.lock().ok()?;
        // Victims of an earlier preemption still terminating: wait for
        // them rather than choosing more.
        if let Some(n) = a.nominated.get(key)
            && n.victims.iter().any(|v| self.pods.get(v).is_some())
        {
            return None;
        }
        let mut on_node: HashMap<&str, Vec<preemption::Placed>> = HashMap::new();
        for (k, (node, r, prio)) in &a.placed {
            on_node
                .entry(node.as_str())
                .or_default()
                .push(preemption::Placed {
                    key: k.clone(),
                    priority: *prio,
                    req: *r,
                });
        }
        let reserved = a.reserved(key, facts.priority);
        let mut candidates = Vec::new();
        for n in a.nodes.values() {
            // Only resources can be freed: the node must pass every other
            // filter as it is.
            let empty = Resources::default();
            if !filter(&facts, n, empty).is_empty() {
                continue;
            }
            let Some(pods) = on_node.get(n.name.as_str()) else {
                continue;
            };
            let mut used = a.per_node.get(&n.name).copied().unwrap_or_default();
            if let Some(r) = reserved.get(&n.name) {
                used = used.plus(*r);
            }
            if let Some(v) =
                preemption::victims_on(n.alloc, used, pods, facts.priority, facts.req, fits)
            {
                candidates.push((n.name.clone(), v));
            }
        }
        let (node, victims) = preemption::pick(candidates)?;
        a.nominated.insert(
            key.to_owned(),
            Nomination {
                node: node.clone(),
                req: facts.req,
                priority: facts.priority,
                victims: victims.iter().map(|v| v.key.clone()).collect(),
            },
        );
        Some((node, victims))
    }

    /// Carries out a preemption: the pod learns its nominated node, each
    /// victim gets a DisruptionTarget condition and an event, then is
    /// deleted (gracefully, as any deletion).
    async fn evict_victims(&self, pod: &Value, node: &str, victims: Vec<preemption::Placed>) {
        let (ns, name) = (meta::namespace(pod), meta::name(pod));
        let patch = json!({"status": {"nominatedNodeName": node}});
        if let Err(e) = self
            .client
            .patch(PODS, ns, name, Some("status"), patch)
            .await
            && !e.is_not_found()
        {
            tracing::debug!(pod = %meta::key(pod), error = %e, "setting nominatedNodeName failed");
        }
        for v in victims {
            let (vns, vname) = meta::split_key(&v.key);
            let Some(victim) = self.pods.get(&v.key) else {
                continue;
            };
            tracing::info!(victim = %v.key, preemptor = %meta::key(pod), %node, "preempting");
            let conditions = meta::with_condition(
                &victim,
                json!({
                    "type": "DisruptionTarget", "status": "True",
                    "reason": "PreemptionByScheduler",
                    "message": format!("{SCHEDULER_NAME}: preempting to accommodate a higher priority pod"),
                    "lastTransitionTime": meta::now_rfc3339(),
                }),
            );
            let patch = json!({"status": {"conditions": conditions}});
            if let Err(e) = self
                .client
                .patch(PODS, vns, vname, Some("status"), patch)
                .await
                && !e.is_not_found()
            {
                tracing::debug!(victim = %v.key, error = %e, "marking the victim failed");
            }
            self.client.event(
                SCHEDULER_NAME,
                "Pod",
                &victim,
                EventType::Normal,
                "Preempted",
                format!("Preempted by pod {} on node {node}", meta::uid(pod)),
            );
            if let Err(e) = self
                .client
                .delete(PODS, vns, vname, Some(meta::uid(&victim)))
                .await
                && !e.is_not_found()
            {
                tracing::warn!(victim = %v.key, error = %e, "deleting a preemption victim failed");
            }
        }
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
        let conditions = meta::with_condition(
            pod,
            json!({
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": message, "lastProbeTime": null,
                "lastTransitionTime": meta::now_rfc3339(),
            }),
        );
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
                if let Some((node, victims)) = self.preempt(key, &pod) {
                    self.evict_victims(&pod, &node, victims).await;
                }
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

    fn check(pod: &Value, n: &Value, used: Resources) -> Vec<Reject> {
        filter(
            &PodFacts::new(pod),
            &NodeInfo::new(Arc::new(n.clone())),
            used,
        )
    }

    #[test]
    fn filters_name_what_failed() {
        let pod = json!({"spec": {"containers": [{"resources": {"requests": {"cpu": "500m"}}}]}});
        let ok = node("a", json!({}));
        assert!(check(&pod, &ok, Resources::default()).is_empty());
        let full = Resources {
            milli_cpu: 1800,
            memory: 0,
            pods: 3,
        };
        assert_eq!(check(&pod, &ok, full), vec![Reject::Cpu, Reject::Pods]);
        let tainted = node(
            "b",
            json!({"spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]}}),
        );
        assert_eq!(
            check(&pod, &tainted, Resources::default()),
            vec![Reject::Taint]
        );
        let tolerant = json!({"spec": {"tolerations": [{"key": "k", "operator": "Exists"}], "containers": []}});
        assert!(check(&tolerant, &tainted, Resources::default()).is_empty());
        let soft = node(
            "s",
            json!({"spec": {"taints": [{"key": "k", "effect": "PreferNoSchedule"}]}}),
        );
        assert!(check(&pod, &soft, Resources::default()).is_empty());
        let cordoned = node("c", json!({"spec": {"unschedulable": true}}));
        assert_eq!(
            check(&pod, &cordoned, Resources::default()),
            vec![Reject::Unschedulable]
        );
        let not_ready = node(
            "r",
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        );
        assert_eq!(
            check(&pod, &not_ready, Resources::default()),
            vec![Reject::NotReady]
        );
        let picky = json!({"spec": {"nodeSelector": {"disk": "hdd"}, "containers": []}});
        assert_eq!(
            check(&picky, &ok, Resources::default()),
            vec![Reject::Affinity]
        );
        let affine = json!({"spec": {"containers": [], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}]}}}}});
        assert!(check(&affine, &ok, Resources::default()).is_empty());
    }

    #[test]
    fn preferences_steer_the_choice() {
        let a = Arc::new(NodeInfo::new(Arc::new(node("a", json!({})))));
        let mut labelled = node("b", json!({}));
        labelled["metadata"]["labels"]["zone"] = json!("z1");
        let b = Arc::new(NodeInfo::new(Arc::new(labelled)));
        let soft = Arc::new(NodeInfo::new(Arc::new(node(
            "c",
            json!({"spec": {"taints": [{"key": "k", "effect": "PreferNoSchedule"}]}}),
        ))));
        let pod = json!({"spec": {"containers": [], "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]}]}}]}}}});
        let facts = PodFacts::new(&pod);
        let raw = |n: &Arc<NodeInfo>| {
            [
                score(facts.req, n.alloc, Resources::default()),
                0,
                facts.preferred_weight(n),
                facts.intolerable_preferences(n),
                0,
            ]
        };
        let feasible = vec![(&a, raw(&a)), (&b, raw(&b)), (&soft, raw(&soft))];
        assert_eq!(pick_best(&feasible).map(|n| n.name.as_str()), Some("b"));
        // Without the preference the tainted node still loses to a clean
        // one.
        let plain = json!({"spec": {"containers": []}});
        let facts = PodFacts::new(&plain);
        let raw = |n: &Arc<NodeInfo>| {
            [
                score(facts.req, n.alloc, Resources::default()),
                0,
                facts.preferred_weight(n),
                facts.intolerable_preferences(n),
                0,
            ]
        };
        let feasible = vec![(&soft, raw(&soft)), (&a, raw(&a))];
        assert_eq!(pick_best(&feasible).map(|n| n.name.as_str()), Some("a"));
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
