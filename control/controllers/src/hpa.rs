//! HorizontalPodAutoscaler controller (autoscaling/v2; v1 objects share
//! the storage and their `targetCPUUtilizationPercentage` is honoured).
//!
//! Every sync period (15 s, or the HPA's annotation
//! `autoscaling.skep.io/sync-period-seconds`) an HPA is reconciled:
//! the target's `/scale` subresource (Deployment, ReplicaSet,
//! StatefulSet) gives the replicas and the pod selector; pod usage comes
//! from metrics.k8s.io (`skep_apiserver::metrics_api`, in process); each
//! `Resource` metric (cpu/memory, `Utilization` or `AverageValue`) gives a
//! replica count by upstream's algorithm and the largest wins; then the
//! behavior applies (stabilization windows, Pods/Percent policies with
//! selectPolicy Max/Min/Disabled, defaults as upstream) and min/max. The
//! new count is written through `/scale`; the status carries
//! currentReplicas, desiredReplicas, currentMetrics, lastScaleTime and the
//! AbleToScale/ScalingActive/ScalingLimited conditions.
//!
//! Pods, simplified from upstream: deleting and Failed pods are ignored;
//! Pending pods, and for CPU pods that are not Ready, count as unready;
//! running pods without metrics as missing. When the ratio says "scale
//! up", unready and missing pods are assumed to use nothing; when it says
//! "scale down", missing pods are assumed to use exactly the target. No
//! CPU initialization period is applied. Other metric types (Pods,
//! Object, External, ContainerResource) are reported as unsupported.
//!
//! Recommendations and scale events (for windows and policies) are kept
//! in this controller's memory, as upstream does: a new leader starts
//! with the current size as the only recommendation.

use crate::{
    client::{Client, PODS},
    error::Result,
    events::EventType,
    informer::{Change, Informer, Informers},
    meta, quantity,
    queue::Queue,
    runner::{Reconciler, Requeue},
};
use serde_json::{Value, json};
use skep_apiserver::{metrics_api, routes::ResourceRoute, selectors::LabelSelector};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub const HPAS: crate::client::Gvr = ("autoscaling", "v2", "horizontalpodautoscalers");
/// How often each HPA is evaluated (kube-controller-manager's default).
pub const SYNC_PERIOD: Duration = Duration::from_secs(15);
/// Per-HPA override of the sync period, in whole seconds (≥ 1).
pub const SYNC_PERIOD_ANNOTATION: &str = "autoscaling.skep.io/sync-period-seconds";
/// Ratios within this distance of 1 change nothing.
pub const TOLERANCE: f64 = 0.1;
/// CPU target when an HPA names no metric (upstream's default).
const DEFAULT_CPU_UTILIZATION: f64 = 80.0;

/// A scaling policy of the behavior.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    Pods { value: i32, period: Duration },
    Percent { value: i32, period: Duration },
}

impl Policy {
    fn period(&self) -> Duration {
        match self {
            Self::Pods { period, .. } | Self::Percent { period, .. } => *period,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Select {
    Max,
    Min,
    Disabled,
}

/// One direction of `spec.behavior`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub window: Duration,
    pub select: Select,
    pub policies: Vec<Policy>,
}

impl Rules {
    /// Upstream's defaults: up 0 s, max of +100 % and +4 pods per 15 s;
    /// down 300 s, −100 % per 15 s.
    pub fn default_up() -> Self {
        Self {
            window: Duration::ZERO,
            select: Select::Max,
            policies: vec![
                Policy::Percent {
                    value: 100,
                    period: Duration::from_secs(15),
                },
                Policy::Pods {
                    value: 4,
                    period: Duration::from_secs(15),
                },
            ],
        }
    }

    pub fn default_down() -> Self {
        Self {
            window: Duration::from_secs(300),
            select: Select::Max,
            policies: vec![Policy::Percent {
                value: 100,
                period: Duration::from_secs(15),
            }],
        }
    }

    /// The rules in `v` (`spec.behavior.scaleUp|scaleDown`), missing
    /// fields from `default`.
    pub fn parse(v: Option<&Value>, default: Self) -> Self {
        let Some(v) = v else { return default };
        let window = v
            .get("stabilizationWindowSeconds")
            .and_then(Value::as_u64)
            .map_or(default.window, Duration::from_secs);
        let select = match v.get("selectPolicy").and_then(Value::as_str) {
            Some("Min") => Select::Min,
            Some("Disabled") => Select::Disabled,
            Some(_) => Select::Max,
            None => default.select,
        };
        let policies: Vec<Policy> = v
            .get("policies")
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| {
                        let value = i32::try_from(p.get("value")?.as_i64()?).ok()?;
                        let period = Duration::from_secs(p.get("periodSeconds")?.as_u64()?);
                        match p.get("type")?.as_str()? {
                            "Pods" => Some(Policy::Pods { value, period }),
                            "Percent" => Some(Policy::Percent { value, period }),
                            _ => None,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            window,
            select,
            policies: if policies.is_empty() {
                default.policies
            } else {
                policies
            },
        }
    }
}

/// What a metric is compared against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// Percent of the pods' requests.
    Utilization(f64),
    /// Per pod, in millicores (cpu) or bytes.
    AverageValue(f64),
}

/// One pod's figure for a resource: usage and request, same units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PodFigure {
    pub usage: f64,
    pub request: f64,
}

/// The pods of a target, sorted the way the algorithm needs them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grouped {
    /// Ready pods with metrics.
    pub ready: HashMap<String, PodFigure>,
    /// Pods not ready (their request, for utilization).
    pub unready: HashMap<String, f64>,
    /// Running pods without metrics (their request).
    pub missing: HashMap<String, f64>,
}

/// `(ratio, utilization %, average value)` of `pods` against `target`.
fn usage_ratio(
    pods: &HashMap<String, PodFigure>,
    target: Target,
) -> Option<(f64, Option<i64>, f64)> {
    if pods.is_empty() {
        return None;
    }
    let usage: f64 = pods.values().map(|p| p.usage).sum();
    let average = usage / pods.len() as f64;
    match target {
        Target::Utilization(t) => {
            let requests: f64 = pods.values().map(|p| p.request).sum();
            if requests <= 0.0 || t <= 0.0 {
                return None;
            }
            // Whole percents, as upstream computes them.
            let utilization = (usage * 100.0 / requests) as i64;
            Some((utilization as f64 / t, Some(utilization), average))
        }
        Target::AverageValue(t) => (t > 0.0).then(|| (average / t, None, average)),
    }
}

/// The replica count one metric asks for (upstream's
/// `calcPlainMetricReplicas`/`GetResourceReplicas`), with the current
/// utilization and average value for the status.
pub fn replicas_for(
    current: i32,
    pods: &Grouped,
    target: Target,
) -> std::result::Result<(i32, Option<i64>, f64), String> {
    let (ratio, utilization, average) = usage_ratio(&pods.ready, target).ok_or_else(|| {
        "did not receive metrics for any ready pods, or their containers have no resource requests"
            .to_owned()
    })?;
    let scale_up_with_unready = !pods.unready.is_empty() && ratio > 1.0;
    if !scale_up_with_unready && pods.missing.is_empty() {
        if (1.0 - ratio).abs() <= TOLERANCE {
            return Ok((current, utilization, average));
        }
        return Ok((
            (ratio * pods.ready.len() as f64).ceil() as i32,
            utilization,
            average,
        ));
    }
    let mut all = pods.ready.clone();
    for (name, request) in &pods.missing {
        let usage = if ratio < 1.0 {
            // Scaling down: assume the missing use exactly the target.
            match target {
                Target::Utilization(t) => request * t / 100.0,
                Target::AverageValue(t) => t,
            }
        } else {
            0.0
        };
        all.insert(
            name.clone(),
            PodFigure {
                usage,
                request: *request,
            },
        );
    }
    if scale_up_with_unready {
        for (name, request) in &pods.unready {
            all.insert(
                name.clone(),
                PodFigure {
                    usage: 0.0,
                    request: *request,
                },
            );
        }
    }
    let Some((new_ratio, _, _)) = usage_ratio(&all, target) else {
        return Ok((current, utilization, average));
    };
    if (1.0 - new_ratio).abs() <= TOLERANCE
        || (ratio < 1.0 && new_ratio > 1.0)
        || (ratio > 1.0 && new_ratio < 1.0)
    {
        return Ok((current, utilization, average));
    }
    let n = (new_ratio * all.len() as f64).ceil() as i32;
    if (new_ratio < 1.0 && n > current) || (new_ratio > 1.0 && n < current) {
        return Ok((current, utilization, average));
    }
    Ok((n, utilization, average))
}

/// Recommendations and scale events of one HPA.
#[derive(Debug, Default, Clone)]
pub struct History {
    recommendations: Vec<(Instant, i32)>,
    /// (when, how many replicas were added / removed).
    ups: Vec<(Instant, i32)>,
    downs: Vec<(Instant, i32)>,
}

fn changed_within(events: &[(Instant, i32)], period: Duration, now: Instant) -> i32 {
    events
        .iter()
        .filter(|(t, _)| now.saturating_duration_since(*t) < period)
        .map(|(_, n)| n)
        .sum()
}

/// The outcome of the behavior step.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub replicas: i32,
    /// AbleToScale's reason and message.
    pub able: (&'static str, String),
    /// ScalingLimited: limited?, reason, message.
    pub limited: (bool, &'static str, String),
}

impl History {
    /// Records a rescale from `from` to `to`.
    pub fn record_scale(&mut self, from: i32, to: i32, now: Instant) {
        if to > from {
            self.ups.push((now, to - from));
        } else if to < from {
            self.downs.push((now, from - to));
        }
    }

    /// Stabilizes `desired` (the metrics' recommendation), then applies
    /// the rate policies and min/max (upstream's
    /// `normalizeDesiredReplicasWithBehaviors`).
    pub fn normalize(
        &mut self,
        current: i32,
        desired: i32,
        (min, max): (i32, i32),
        (up, down): (&Rules, &Rules),
        now: Instant,
    ) -> Decision {
        if self.recommendations.is_empty() {
            // A fresh controller does not scale down before a window.
            self.recommendations.push((now, current));
        }
        let (mut up_rec, mut down_rec) = (desired, desired);
        for (t, r) in &self.recommendations {
            let age = now.saturating_duration_since(*t);
            if age < up.window {
                up_rec = up_rec.min(*r);
            }
            if age < down.window {
                down_rec = down_rec.max(*r);
            }
        }
        let stabilized = current.max(up_rec).min(down_rec);
        let keep = up.window.max(down.window);
        self.recommendations
            .retain(|(t, _)| now.saturating_duration_since(*t) <= keep);
        self.recommendations.push((now, desired));
        let longest = up
            .policies
            .iter()
            .chain(down.policies.iter())
            .map(Policy::period)
            .max()
            .unwrap_or(Duration::ZERO);
        self.ups
            .retain(|(t, _)| now.saturating_duration_since(*t) < longest);
        self.downs
            .retain(|(t, _)| now.saturating_duration_since(*t) < longest);
        let able = if stabilized == desired {
            (
                "ReadyForNewScale",
                "recommended size matches current size".to_owned(),
            )
        } else if desired >= current {
            ("ScaleUpStabilized", "recent recommendations were lower than current one, applying the lowest recent recommendation".to_owned())
        } else {
            ("ScaleDownStabilized", "recent recommendations were higher than current one, applying the highest recent recommendation".to_owned())
        };
        let within = (
            false,
            "DesiredWithinRange",
            "the desired count is within the acceptable range".to_owned(),
        );
        let (replicas, limited) = if stabilized > current {
            let limit = self.up_limit(current, up, now).max(current);
            let (allowed, reason, message) = if max > limit {
                (
                    limit,
                    "ScaleUpLimit",
                    "the desired replica count is increasing faster than the maximum scale rate",
                )
            } else {
                (
                    max,
                    "TooManyReplicas",
                    "the desired replica count is more than the maximum replica count",
                )
            };
            if stabilized > allowed {
                (allowed, (true, reason, message.to_owned()))
            } else {
                (stabilized, within)
            }
        } else if stabilized < current {
            let limit = self.down_limit(current, down, now).min(current);
            let (allowed, reason, message) = if min < limit {
                (
                    limit,
                    "ScaleDownLimit",
                    "the desired replica count is decreasing faster than the maximum scale rate",
                )
            } else {
                (
                    min,
                    "TooFewReplicas",
                    "the desired replica count is less than the minimum replica count",
                )
            };
            if stabilized < allowed {
                (allowed, (true, reason, message.to_owned()))
            } else {
                (stabilized, within)
            }
        } else {
            (stabilized, within)
        };
        Decision {
            replicas,
            able,
            limited,
        }
    }

    fn period_start(&self, current: i32, period: Duration, now: Instant) -> i32 {
        current - changed_within(&self.ups, period, now) + changed_within(&self.downs, period, now)
    }

    fn up_limit(&self, current: i32, rules: &Rules, now: Instant) -> i32 {
        if rules.select == Select::Disabled {
            return current;
        }
        let proposals = rules.policies.iter().map(|p| {
            let start = self.period_start(current, p.period(), now);
            match p {
                Policy::Pods { value, .. } => start + value,
                Policy::Percent { value, .. } => {
                    (f64::from(start) * (1.0 + f64::from(*value) / 100.0)).ceil() as i32
                }
            }
        });
        match rules.select {
            Select::Min => proposals.min(),
            _ => proposals.max(),
        }
        .unwrap_or(current)
    }

    fn down_limit(&self, current: i32, rules: &Rules, now: Instant) -> i32 {
        if rules.select == Select::Disabled {
            return current;
        }
        let proposals = rules.policies.iter().map(|p| {
            let start = self.period_start(current, p.period(), now);
            match p {
                Policy::Pods { value, .. } => start - value,
                Policy::Percent { value, .. } => {
                    (f64::from(start) * (1.0 - f64::from(*value) / 100.0)) as i32
                }
            }
        });
        // The largest change is the smallest count.
        match rules.select {
            Select::Min => proposals.max(),
            _ => proposals.min(),
        }
        .unwrap_or(current)
    }
}

/// A `Resource` metric of the spec.
#[derive(Debug, Clone, PartialEq)]
struct ResourceMetric {
    name: String,
    target: Target,
}

/// The Resource metrics of an HPA, or why one cannot be used.
fn metrics_of(hpa: &Value) -> std::result::Result<Vec<ResourceMetric>, String> {
    let Some(specs) = hpa.pointer("/spec/metrics").and_then(Value::as_array) else {
        let target = hpa
            .pointer("/spec/targetCPUUtilizationPercentage")
            .and_then(Value::as_f64)
            .unwrap_or(DEFAULT_CPU_UTILIZATION);
        return Ok(vec![ResourceMetric {
            name: "cpu".into(),
            target: Target::Utilization(target),
        }]);
    };
    let mut out = Vec::new();
    for m in specs {
        let kind = m.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "Resource" {
            return Err(format!(
                "metric type {kind:?} is not supported (only Resource cpu/memory metrics are)"
            ));
        }
        let name = m
            .pointer("/resource/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if name != "cpu" && name != "memory" {
            return Err(format!(
                "resource {name:?} has no metrics (only cpu and memory do)"
            ));
        }
        let t = m
            .pointer("/resource/target")
            .cloned()
            .unwrap_or(Value::Null);
        let target = match t.get("type").and_then(Value::as_str) {
            Some("Utilization") => Target::Utilization(
                t.get("averageUtilization")
                    .and_then(Value::as_f64)
                    .ok_or("a Utilization target needs averageUtilization")?,
            ),
            Some("AverageValue") => {
                let q = t
                    .get("averageValue")
                    .and_then(quantity_str)
                    .ok_or("an AverageValue target needs averageValue")?;
                Target::AverageValue(
                    in_units(&name, &q).ok_or(format!("averageValue {q:?} is not a quantity"))?,
                )
            }
            other => {
                return Err(format!(
                    "target type {other:?} is not supported for resource metrics"
                ));
            }
        };
        out.push(ResourceMetric { name, target });
    }
    Ok(out)
}

/// Quantities may come as strings or numbers.
fn quantity_str(v: &Value) -> Option<String> {
    v.as_str()
        .map(str::to_owned)
        .or_else(|| v.as_f64().map(|n| n.to_string()))
}

/// CPU in millicores, memory in bytes.
fn in_units(resource: &str, q: &str) -> Option<f64> {
    let v = quantity::parse(q)?;
    Some(if resource == "cpu" { v * 1000.0 } else { v })
}

/// The pod's request for `resource` (sum of its containers); `None` when
/// a container has none.
fn pod_request(pod: &Value, resource: &str) -> Option<f64> {
    let containers = pod.pointer("/spec/containers")?.as_array()?;
    containers
        .iter()
        .map(|c| {
            c.pointer(&format!("/resources/requests/{resource}"))
                .and_then(quantity_str)
                .and_then(|q| in_units(resource, &q))
        })
        .sum()
}

/// A quantity for the status: millicores for cpu, bytes otherwise.
fn status_quantity(resource: &str, v: f64) -> String {
    if resource == "cpu" {
        format!("{}m", v.round() as i64)
    } else {
        format!("{}", v.round() as i64)
    }
}

fn condition(kind: &str, status: bool, reason: &str, message: &str) -> Value {
    json!({"type": kind, "status": if status { "True" } else { "False" }, "reason": reason, "message": message})
}

/// Keeps the transition time of conditions whose status did not change.
fn with_transition_times(old: &Value, mut conditions: Vec<Value>) -> Vec<Value> {
    let now = meta::now_rfc3339();
    for c in &mut conditions {
        let kind = c.get("type").and_then(Value::as_str).unwrap_or("");
        let since = meta::condition(old, kind)
            .filter(|o| o.get("status") == c.get("status"))
            .and_then(|o| o.get("lastTransitionTime").cloned());
        c["lastTransitionTime"] = since.unwrap_or_else(|| json!(now));
    }
    conditions
}

/// The workload resources whose `/scale` an HPA may drive.
fn target_resource(kind: &str) -> Option<crate::client::Gvr> {
    match kind {
        "Deployment" => Some(("apps", "v1", "deployments")),
        "ReplicaSet" => Some(("apps", "v1", "replicasets")),
        "StatefulSet" => Some(("apps", "v1", "statefulsets")),
        _ => None,
    }
}

pub struct HpaController {
    client: Client,
    /// Where pods' usage comes from (None: no metrics API in this server).
    metrics: Option<Arc<metrics_api::MetricsSource>>,
    hpas: Arc<Informer>,
    pods: Arc<Informer>,
    history: Mutex<HashMap<String, History>>,
    /// When each HPA's pending periodic resync fires: one timer per HPA,
    /// however many extra reconciles spec changes cause.
    timers: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for HpaController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HpaController").finish_non_exhaustive()
    }
}

/// The reconcile's findings, written to the status.
struct Outcome {
    current: i32,
    desired: i32,
    metrics: Vec<Value>,
    conditions: Vec<Value>,
    rescaled: bool,
}

impl HpaController {
    pub fn start(
        client: &Client,
        informers: &Informers,
        metrics: Option<Arc<metrics_api::MetricsSource>>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let queue = Queue::new();
        let c = Arc::new(Self {
            client: client.clone(),
            metrics,
            hpas: informers.get_or_create(client.info(HPAS)?),
            pods: informers.get_or_create(client.info(PODS)?),
            history: Mutex::new(HashMap::new()),
            timers: Mutex::new(HashMap::new()),
        });
        let q = queue.clone();
        c.hpas.on_change(Arc::new(move |ch: &Change| {
            // New HPAs and spec/annotation changes; the controller's own
            // status writes would otherwise re-run it at once, and the
            // sync period drives everything else.
            let relevant = match (&ch.old, &ch.new) {
                (None, Some(_)) | (Some(_), None) => true,
                (Some(o), Some(n)) => {
                    meta::generation(o) != meta::generation(n)
                        || o.pointer("/metadata/annotations") != n.pointer("/metadata/annotations")
                }
                (None, None) => false,
            };
            if relevant && let Some(o) = ch.object() {
                q.add(meta::key(o));
            }
        }));
        Ok(crate::runner::spawn(c, queue, 1))
    }

    fn sync_period(hpa: &Value) -> Duration {
        meta::annotation(hpa, SYNC_PERIOD_ANNOTATION)
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|s| *s >= 1)
            .map_or(SYNC_PERIOD, Duration::from_secs)
    }

    /// Groups the target's pods for `resource` with their usage.
    fn group(
        pods: &[Arc<Value>],
        usage: &HashMap<String, f64>,
        resource: &str,
    ) -> std::result::Result<Grouped, String> {
        let mut g = Grouped::default();
        for p in pods {
            if meta::is_deleting(p)
                || meta::pod_phase(p) == "Failed"
                || meta::pod_phase(p) == "Succeeded"
            {
                continue;
            }
            let name = meta::name(p).to_owned();
            let request = pod_request(p, resource);
            let request_or_zero = request.unwrap_or(0.0);
            if meta::pod_phase(p) == "Pending" {
                g.unready.insert(name, request_or_zero);
                continue;
            }
            let Some(u) = usage.get(&name) else {
                g.missing.insert(name, request_or_zero);
                continue;
            };
            if resource == "cpu" && !meta::pod_ready(p) {
                g.unready.insert(name, request_or_zero);
                continue;
            }
            g.ready.insert(
                name,
                PodFigure {
                    usage: *u,
                    request: request_or_zero,
                },
            );
        }
        Ok(g)
    }

    async fn evaluate(&self, key: &str, hpa: &Value) -> Result<Outcome> {
        let ns = meta::namespace(hpa).unwrap_or("default").to_owned();
        let kind = hpa
            .pointer("/spec/scaleTargetRef/kind")
            .and_then(Value::as_str)
            .unwrap_or("");
        let target_name = hpa
            .pointer("/spec/scaleTargetRef/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let min = hpa
            .pointer("/spec/minReplicas")
            .and_then(Value::as_i64)
            .unwrap_or(1) as i32;
        let max = hpa
            .pointer("/spec/maxReplicas")
            .and_then(Value::as_i64)
            .unwrap_or(1) as i32;
        let fail =
            |able: Option<(&str, String)>, active: Option<(&str, String)>, current: i32| Outcome {
                current,
                desired: current,
                metrics: Vec::new(),
                conditions: [
                    able.map(|(r, m)| condition("AbleToScale", false, r, &m)),
                    active.map(|(r, m)| condition("ScalingActive", false, r, &m)),
                ]
                .into_iter()
                .flatten()
                .collect(),
                rescaled: false,
            };
        let Some(gvr) = target_resource(kind) else {
            return Ok(fail(
                Some((
                    "FailedGetScale",
                    format!(
                        "the HPA controller cannot scale {kind:?} (Deployments, ReplicaSets and StatefulSets are supported)"
                    ),
                )),
                None,
                0,
            ));
        };
        let info = self.client.info(gvr)?;
        let scale_route = ResourceRoute {
            info: info.clone(),
            namespace: Some(ns.clone()),
            name: Some(target_name.to_owned()),
            subresource: Some("scale".into()),
        };
        let scale = match self.client.api.get(&scale_route).await {
            Ok(s) => s,
            Err(e) => {
                return Ok(fail(
                    Some((
                        "FailedGetScale",
                        format!(
                            "the HPA controller was unable to get the target's current scale: {e}"
                        ),
                    )),
                    None,
                    0,
                ));
            }
        };
        let current = scale
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(0) as i32;
        let status_replicas = scale
            .pointer("/status/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(0) as i32;
        if current == 0 && min != 0 {
            return Ok(fail(
                None,
                Some((
                    "ScalingDisabled",
                    "scaling is disabled since the replica count of the target is zero".into(),
                )),
                status_replicas,
            ));
        }
        let selector_text = scale
            .pointer("/status/selector")
            .and_then(Value::as_str)
            .unwrap_or("");
        let selector = match LabelSelector::parse(selector_text) {
            Ok(s) if !selector_text.is_empty() => s,
            _ => {
                return Ok(fail(
                    None,
                    Some((
                        "InvalidSelector",
                        format!("the target's selector {selector_text:?} cannot select pods"),
                    )),
                    status_replicas,
                ));
            }
        };
        let pods: Vec<Arc<Value>> = self
            .pods
            .list_ns(&ns)
            .into_iter()
            .filter(|p| selector.matches(&meta::labels(p)))
            .collect();
        let mut recommendation: Option<(i32, String)> = None;
        let mut current_metrics = Vec::new();
        let mut error: Option<String> = None;
        let (desired_raw, active_message) = if current > max {
            (max, "the desired count is above the maximum".to_owned())
        } else if current < min {
            (min, "the desired count is below the minimum".to_owned())
        } else {
            match metrics_of(hpa) {
                Err(e) => error = Some(e),
                Ok(specs) => {
                    let usage = self.pod_usage(&ns).await;
                    match usage {
                        Err(e) => error = Some(e),
                        Ok(usage) => {
                            for m in specs {
                                let figures: HashMap<String, f64> = usage
                                    .iter()
                                    .map(|(pod, (cpu, mem))| {
                                        (pod.clone(), if m.name == "cpu" { *cpu } else { *mem })
                                    })
                                    .collect();
                                let grouped = Self::group(&pods, &figures, &m.name);
                                let outcome = grouped.and_then(|g| {
                                    if matches!(m.target, Target::Utilization(_))
                                        && let Some(p) = pods.iter().find(|p| {
                                            g.ready.contains_key(meta::name(p))
                                                && pod_request(p, &m.name).is_none()
                                        })
                                    {
                                        return Err(format!(
                                            "missing request for {} in pod {}",
                                            m.name,
                                            meta::name(p)
                                        ));
                                    }
                                    replicas_for(current, &g, m.target)
                                });
                                match outcome {
                                    Ok((n, utilization, average)) => {
                                        let mut cur = json!({"averageValue": status_quantity(&m.name, average)});
                                        if let Some(u) = utilization {
                                            cur["averageUtilization"] = json!(u);
                                        }
                                        current_metrics.push(json!({"type": "Resource", "resource": {"name": m.name, "current": cur}}));
                                        let what = match m.target {
                                            Target::Utilization(_) => format!(
                                                "{} resource utilization (percentage of request)",
                                                m.name
                                            ),
                                            Target::AverageValue(_) => {
                                                format!("{} resource", m.name)
                                            }
                                        };
                                        if recommendation.as_ref().is_none_or(|(r, _)| n > *r) {
                                            recommendation = Some((n, what));
                                        }
                                    }
                                    Err(e) => {
                                        error = Some(format!(
                                            "failed to get {} utilization: {e}",
                                            m.name
                                        ));
                                    }
                                }
                            }
                        }
                    }
                }
            }
            match (&recommendation, &error) {
                (Some((n, what)), _) => (
                    *n,
                    format!(
                        "the HPA was able to successfully calculate a replica count from {what}"
                    ),
                ),
                (None, e) => {
                    let message = e.clone().unwrap_or_else(|| "no metrics".into());
                    tracing::debug!(hpa = %key, %message, "cannot compute a replica count");
                    let mut out = fail(
                        None,
                        Some(("FailedGetResourceMetric", message)),
                        status_replicas,
                    );
                    out.conditions.insert(
                        0,
                        condition(
                            "AbleToScale",
                            true,
                            "SucceededGetScale",
                            "the HPA controller was able to get the target's current scale",
                        ),
                    );
                    out.desired = current;
                    return Ok(out);
                }
            }
        };
        let now = Instant::now();
        let up = Rules::parse(hpa.pointer("/spec/behavior/scaleUp"), Rules::default_up());
        let down = Rules::parse(
            hpa.pointer("/spec/behavior/scaleDown"),
            Rules::default_down(),
        );
        let decision = if current > max || current < min {
            Decision {
                replicas: desired_raw,
                able: (
                    "ReadyForNewScale",
                    "recommended size matches current size".into(),
                ),
                limited: (
                    true,
                    if current > max {
                        "TooManyReplicas"
                    } else {
                        "TooFewReplicas"
                    },
                    active_message.clone(),
                ),
            }
        } else {
            let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
            h.entry(key.to_owned()).or_default().normalize(
                current,
                desired_raw,
                (min, max),
                (&up, &down),
                now,
            )
        };
        let desired = decision.replicas;
        let mut able = condition("AbleToScale", true, decision.able.0, &decision.able.1);
        let mut rescaled = false;
        if desired != current {
            let patch = json!({"spec": {"replicas": desired}});
            match self
                .client
                .patch_in(&info, Some(&ns), target_name, Some("scale"), patch)
                .await
            {
                Ok(_) => {
                    rescaled = true;
                    self.history
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(key.to_owned())
                        .or_default()
                        .record_scale(current, desired, now);
                    tracing::info!(hpa = %key, from = current, to = desired, "rescaled the target");
                    // Upstream's wording, so dashboards and habits carry over.
                    let reason = if current < min {
                        "Current number of replicas below Spec.MinReplicas".to_owned()
                    } else if current > max {
                        "Current number of replicas above Spec.MaxReplicas".to_owned()
                    } else if desired > current {
                        let what = recommendation
                            .as_ref()
                            .map_or("a metric", |(_, w)| w.as_str());
                        format!("{what} above target")
                    } else {
                        "All metrics below target".to_owned()
                    };
                    self.client.event(
                        "horizontal-pod-autoscaler",
                        "HorizontalPodAutoscaler",
                        hpa,
                        EventType::Normal,
                        "SuccessfulRescale",
                        format!("New size: {desired}; reason: {reason}"),
                    );
                    able = condition(
                        "AbleToScale",
                        true,
                        "SucceededRescale",
                        &format!(
                            "the HPA controller was able to update the target scale to {desired}"
                        ),
                    );
                }
                Err(e) => {
                    able = condition(
                        "AbleToScale",
                        false,
                        "FailedUpdateScale",
                        &format!("the HPA controller was unable to update the target scale: {e}"),
                    );
                }
            }
        }
        let mut conditions = vec![able];
        conditions.push(match &error {
            // Another metric failed: upstream still scales on the others.
            Some(e) if recommendation.is_some() => condition(
                "ScalingActive",
                true,
                "ValidMetricFound",
                &format!("{active_message} (another metric failed: {e})"),
            ),
            _ => condition("ScalingActive", true, "ValidMetricFound", &active_message),
        });
        conditions.push(condition(
            "ScalingLimited",
            decision.limited.0,
            decision.limited.1,
            &decision.limited.2,
        ));
        Ok(Outcome {
            current: status_replicas,
            desired,
            metrics: current_metrics,
            conditions,
            rescaled,
        })
    }

    /// Per pod of `ns`: (cpu millicores, memory bytes).
    async fn pod_usage(
        &self,
        ns: &str,
    ) -> std::result::Result<HashMap<String, (f64, f64)>, String> {
        let source = self
            .metrics
            .as_ref()
            .ok_or("the resource metrics API is not running in this server")?;
        let usage = source
            .pod_usage(&self.client.api, Some(ns))
            .await
            .map_err(|e| format!("unable to get metrics from the resource metrics API: {e}"))?;
        Ok(usage
            .into_iter()
            .map(|(_, u)| {
                let cpu: u64 = u.containers.iter().map(|(_, c)| c.cpu_nanocores).sum();
                let mem: u64 = u.containers.iter().map(|(_, c)| c.memory_bytes).sum();
                (u.name, (cpu as f64 / 1e6, mem as f64))
            })
            .collect())
    }
}

#[async_trait::async_trait]
impl Reconciler for HpaController {
    fn name(&self) -> &'static str {
        "horizontal-pod-autoscaler"
    }

    async fn reconcile(&self, key: &str) -> Result<Requeue> {
        let Some(hpa) = self.hpas.get(key) else {
            self.history
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(key);
            self.timers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(key);
            return Ok(Requeue::No);
        };
        if meta::is_deleting(&hpa) {
            return Ok(Requeue::No);
        }
        let period = Self::sync_period(&hpa);
        let out = self.evaluate(key, &hpa).await?;
        let old = hpa.get("status").cloned().unwrap_or(json!({}));
        let mut status = json!({
            "observedGeneration": meta::generation(&hpa),
            "currentReplicas": out.current,
            "desiredReplicas": out.desired,
            "currentMetrics": out.metrics,
            "conditions": with_transition_times(&hpa, out.conditions),
        });
        match (out.rescaled, old.get("lastScaleTime")) {
            (true, _) => status["lastScaleTime"] = json!(meta::now_rfc3339()),
            (false, Some(t)) => status["lastScaleTime"] = t.clone(),
            (false, None) => {}
        }
        if status != old {
            let (ns, name) = meta::split_key(key);
            match self
                .client
                .patch(HPAS, ns, name, Some("status"), json!({"status": status}))
                .await
            {
                Ok(_) => {}
                Err(e) if e.is_not_found() => return Ok(Requeue::No),
                Err(e) => return Err(e),
            }
        }
        let now = Instant::now();
        let mut timers = self.timers.lock().unwrap_or_else(|p| p.into_inner());
        match timers.get(key) {
            Some(due) if *due > now => Ok(Requeue::No),
            _ => {
                timers.insert(key.to_owned(), now + period);
                Ok(Requeue::After(period))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ready(pods: &[(&str, f64, f64)]) -> Grouped {
        Grouped {
            ready: pods
                .iter()
                .map(|(n, u, r)| {
                    (
                        (*n).to_owned(),
                        PodFigure {
                            usage: *u,
                            request: *r,
                        },
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn utilization_scales_by_ratio_with_tolerance() {
        // 250 % of 50 % → 5× one pod.
        let g = ready(&[("a", 250.0, 100.0)]);
        assert_eq!(
            replicas_for(1, &g, Target::Utilization(50.0)).unwrap(),
            (5, Some(250), 250.0)
        );
        // 54 % vs 50 %: within 10 %.
        let g = ready(&[("a", 54.0, 100.0), ("b", 54.0, 100.0)]);
        assert_eq!(replicas_for(2, &g, Target::Utilization(50.0)).unwrap().0, 2);
        // Idle: down to ceil(0.02 × 2) = 1.
        let g = ready(&[("a", 1.0, 100.0), ("b", 1.0, 100.0)]);
        assert_eq!(replicas_for(2, &g, Target::Utilization(50.0)).unwrap().0, 1);
        // AverageValue: 300m average vs 100m target → 3 × 2.
        let g = ready(&[("a", 300.0, 0.0), ("b", 300.0, 0.0)]);
        assert_eq!(
            replicas_for(2, &g, Target::AverageValue(100.0)).unwrap().0,
            6
        );
    }

    #[test]
    fn missing_and_unready_pods_dampen_the_change() {
        // Scale up: the missing pod counts as idle: (200+0)/200 = 100 % vs 50 %.
        let mut g = ready(&[("a", 200.0, 100.0)]);
        g.missing.insert("b".into(), 100.0);
        assert_eq!(replicas_for(2, &g, Target::Utilization(50.0)).unwrap().0, 4);
        // Scale down: the missing pod counts as at target: (10+50)/200 = 30 %.
        let mut g = ready(&[("a", 10.0, 100.0)]);
        g.missing.insert("b".into(), 100.0);
        assert_eq!(replicas_for(2, &g, Target::Utilization(50.0)).unwrap().0, 2);
        // Unready pods count as idle when scaling up.
        let mut g = ready(&[("a", 100.0, 100.0)]);
        g.unready.insert("b".into(), 100.0);
        g.unready.insert("c".into(), 100.0);
        assert_eq!(replicas_for(3, &g, Target::Utilization(50.0)).unwrap().0, 3);
        assert!(replicas_for(1, &Grouped::default(), Target::Utilization(50.0)).is_err());
    }

    #[test]
    fn behavior_limits_the_rate_and_stabilizes() {
        let up = Rules {
            window: Duration::ZERO,
            select: Select::Max,
            policies: vec![Policy::Pods {
                value: 1,
                period: Duration::from_secs(15),
            }],
        };
        let down = Rules::default_down();
        let mut h = History::default();
        let t0 = Instant::now();
        let d = h.normalize(1, 5, (1, 10), (&up, &down), t0);
        assert_eq!(d.replicas, 2);
        assert_eq!(d.limited.1, "ScaleUpLimit");
        h.record_scale(1, 2, t0);
        // Within the period: still at most 1 + 1.
        let d = h.normalize(2, 5, (1, 10), (&up, &down), t0 + Duration::from_secs(5));
        assert_eq!(d.replicas, 2);
        // After it: 2 + 1.
        let d = h.normalize(2, 5, (1, 10), (&up, &down), t0 + Duration::from_secs(16));
        assert_eq!(d.replicas, 3);
        h.record_scale(2, 3, t0 + Duration::from_secs(16));
        // Scale down waits out the 300 s window of higher recommendations.
        let d = h.normalize(3, 1, (1, 10), (&up, &down), t0 + Duration::from_secs(40));
        assert_eq!(d.replicas, 3);
        assert_eq!(d.able.0, "ScaleDownStabilized");
        let d = h.normalize(3, 1, (1, 10), (&up, &down), t0 + Duration::from_secs(400));
        assert_eq!(d.replicas, 1);
        // Max replicas caps.
        let mut h = History::default();
        let d = h.normalize(2, 50, (1, 4), (&Rules::default_up(), &down), t0);
        assert_eq!((d.replicas, d.limited.1), (4, "TooManyReplicas"));
        // Disabled scale-up never grows.
        let off = Rules {
            select: Select::Disabled,
            ..Rules::default_up()
        };
        let d = History::default().normalize(2, 5, (1, 10), (&off, &down), t0);
        assert_eq!(d.replicas, 2);
    }

    #[test]
    fn behavior_parses_with_defaults() {
        let v = json!({"stabilizationWindowSeconds": 5, "policies": [{"type": "Percent", "value": 50, "periodSeconds": 10}], "selectPolicy": "Min"});
        let r = Rules::parse(Some(&v), Rules::default_down());
        assert_eq!(r.window, Duration::from_secs(5));
        assert_eq!(r.select, Select::Min);
        assert_eq!(
            r.policies,
            vec![Policy::Percent {
                value: 50,
                period: Duration::from_secs(10)
            }]
        );
        assert_eq!(Rules::parse(None, Rules::default_up()), Rules::default_up());
    }
}
