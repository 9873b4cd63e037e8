//! Resource usage of this node and its pods, for the metrics API
//! (`kubectl top`) and the HorizontalPodAutoscaler.
//!
//! Every [`SAMPLE_INTERVAL`] the collector reads the cumulative CPU time
//! and the memory working set of each running container (process runtime:
//! its cgroup, see `cgroup`; docker: one-shot `stats`) and of the node
//! (/proc, see `host`), and keeps the last two readings. CPU usage is the
//! rate between them, so the first value appears one interval after a
//! container starts. The kubelet endpoint serves the result at
//! `/stats/summary` in the shape of the kubelet's Summary API (a subset:
//! `node.{cpu,memory}`, `pods[].{podRef,cpu,memory,containers[]}`; each
//! `cpu` has `time`, `usageCoreNanoSeconds` and, once two readings
//! exist, `usageNanoCores` plus skep's `windowSeconds`, the span the rate
//! was measured over).

pub mod cgroup;
mod docker;
mod host;

use crate::runtime::{ContainerLabels, ContainerState, Runtime};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// How often usage is read; also the window CPU rates are measured over.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Where container counters come from.
pub enum Source {
    /// The process runtime's cgroups under this parent (`skep-<node>`).
    Process { cgroup_parent: String },
    /// A dockerd.
    Docker(bollard::Docker),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Process { cgroup_parent } => f
                .debug_struct("Process")
                .field("cgroup_parent", cgroup_parent)
                .finish(),
            Self::Docker(_) => f.write_str("Docker"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    time: DateTime<Utc>,
    reading: cgroup::Reading,
}

/// The last two readings of one counter set.
#[derive(Debug, Clone, Copy)]
struct Series {
    prev: Option<Sample>,
    last: Sample,
}

impl Series {
    fn new(s: Sample) -> Self {
        Self {
            prev: None,
            last: s,
        }
    }

    fn push(&mut self, s: Sample) {
        self.prev = Some(self.last);
        self.last = s;
    }

    /// CPU in nanocores over the last window, and the window. A counter
    /// that went backwards (see `cgroup`) counts as idle.
    fn rate(&self) -> Option<(u64, Duration)> {
        let prev = self.prev?;
        let window = self.last.at.checked_duration_since(prev.at)?;
        if window.is_zero() {
            return None;
        }
        let used = self.last.reading.cpu_ns.saturating_sub(prev.reading.cpu_ns);
        let nanocores = (used as f64 / window.as_secs_f64()).round() as u64;
        Some((nanocores, window))
    }
}

#[derive(Debug)]
struct ContainerSeries {
    labels: ContainerLabels,
    series: Series,
}

#[derive(Debug, Default)]
struct State {
    node: Option<Series>,
    containers: HashMap<String, ContainerSeries>,
}

/// Samples usage and answers `/stats/summary`.
pub struct StatsCollector {
    node_name: String,
    source: Source,
    runtime: Arc<dyn Runtime>,
    state: Mutex<State>,
}

impl std::fmt::Debug for StatsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsCollector")
            .field("node_name", &self.node_name)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The Summary API's `cpu` and `memory` of one series.
fn usage_json(s: &Series) -> (Value, Value) {
    let time = rfc3339(s.last.time);
    let mut cpu = json!({"time": time, "usageCoreNanoSeconds": s.last.reading.cpu_ns});
    if let Some((nanocores, window)) = s.rate() {
        cpu["usageNanoCores"] = json!(nanocores);
        cpu["windowSeconds"] = json!(window.as_secs_f64());
    }
    let memory = json!({"time": time, "workingSetBytes": s.last.reading.working_set});
    (cpu, memory)
}

impl StatsCollector {
    pub fn new(node_name: String, runtime: Arc<dyn Runtime>, source: Source) -> Arc<Self> {
        Arc::new(Self {
            node_name,
            source,
            runtime,
            state: Mutex::new(State::default()),
        })
    }

    /// The collector for an agent's runtime (`cfg.runtime`).
    pub fn for_agent(
        cfg: &crate::AgentConfig,
        runtime: Arc<dyn Runtime>,
    ) -> Result<Arc<Self>, String> {
        let source = match cfg.runtime {
            crate::RuntimeKind::Process => Source::Process {
                cgroup_parent: format!("skep-{}", cfg.node_name),
            },
            crate::RuntimeKind::Docker => {
                let socket = cfg
                    .docker_socket
                    .clone()
                    .unwrap_or_else(|| "/var/run/docker.sock".into());
                Source::Docker(docker::connect(&socket)?)
            }
        };
        Ok(Self::new(cfg.node_name.clone(), runtime, source))
    }

    /// Samples every [`SAMPLE_INTERVAL`] until the task is aborted.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(SAMPLE_INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                me.sample().await;
            }
        })
    }

    async fn read_container(&self, labels: &ContainerLabels, id: &str) -> Option<cgroup::Reading> {
        match &self.source {
            Source::Process { cgroup_parent } => {
                let (parent, uid, id) =
                    (cgroup_parent.clone(), labels.pod_uid.clone(), id.to_owned());
                // Plain file reads, but many of them: off the async workers.
                tokio::task::spawn_blocking(move || cgroup::read(&parent, &uid, &id))
                    .await
                    .ok()
                    .flatten()
            }
            Source::Docker(d) => docker::read(d, id).await,
        }
    }

    /// Takes one reading of the node and every running container.
    pub async fn sample(&self) {
        let containers = match self.runtime.list().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "stats: listing containers failed");
                return;
            }
        };
        let mut readings = Vec::new();
        for c in containers {
            if !matches!(c.state, ContainerState::Running { .. }) {
                continue;
            }
            if let Some(r) = self.read_container(&c.labels, &c.id).await {
                readings.push((
                    c.id,
                    c.labels,
                    Sample {
                        at: Instant::now(),
                        time: Utc::now(),
                        reading: r,
                    },
                ));
            }
        }
        let node = tokio::task::spawn_blocking(host::read).await.ok().flatten();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = node {
            let s = Sample {
                at: Instant::now(),
                time: Utc::now(),
                reading: r,
            };
            match &mut state.node {
                Some(series) => series.push(s),
                None => state.node = Some(Series::new(s)),
            }
        }
        let mut next = HashMap::new();
        for (id, labels, s) in readings {
            let entry = match state.containers.remove(&id) {
                Some(mut old) => {
                    old.series.push(s);
                    old
                }
                None => ContainerSeries {
                    labels,
                    series: Series::new(s),
                },
            };
            next.insert(id, entry);
        }
        // Containers that stopped or went away are dropped.
        state.containers = next;
    }

    /// The Summary API document (see the module comment).
    pub fn summary(&self) -> Value {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut node = json!({"nodeName": self.node_name});
        if let Some(s) = &state.node {
            let (cpu, memory) = usage_json(s);
            node["cpu"] = cpu;
            node["memory"] = memory;
        }
        // Pods by uid, containers in name order.
        let mut pods: BTreeMap<&str, Vec<&ContainerSeries>> = BTreeMap::new();
        for c in state.containers.values() {
            pods.entry(c.labels.pod_uid.as_str()).or_default().push(c);
        }
        let mut out = Vec::new();
        for (uid, mut cs) in pods {
            cs.sort_by(|a, b| a.labels.container_name.cmp(&b.labels.container_name));
            let first = &cs[0].labels;
            let containers: Vec<Value> = cs
                .iter()
                .map(|c| {
                    let (cpu, memory) = usage_json(&c.series);
                    json!({"name": c.labels.container_name, "cpu": cpu, "memory": memory})
                })
                .collect();
            let latest = cs
                .iter()
                .map(|c| c.series.last.time)
                .max()
                .unwrap_or_else(Utc::now);
            let cum: u64 = cs.iter().map(|c| c.series.last.reading.cpu_ns).sum();
            let ws: u64 = cs.iter().map(|c| c.series.last.reading.working_set).sum();
            let mut cpu = json!({"time": rfc3339(latest), "usageCoreNanoSeconds": cum});
            // The pod's rate is known once every container has one.
            let rates: Option<Vec<(u64, Duration)>> = cs.iter().map(|c| c.series.rate()).collect();
            if let Some(rates) = rates {
                cpu["usageNanoCores"] = json!(rates.iter().map(|r| r.0).sum::<u64>());
                let window = rates.iter().map(|r| r.1).max().unwrap_or(SAMPLE_INTERVAL);
                cpu["windowSeconds"] = json!(window.as_secs_f64());
            }
            out.push(json!({
                "podRef": {"name": first.pod_name, "namespace": first.pod_namespace, "uid": uid},
                "cpu": cpu,
                "memory": {"time": rfc3339(latest), "workingSetBytes": ws},
                "containers": containers,
            }));
        }
        json!({"node": node, "pods": out})
    }
}
