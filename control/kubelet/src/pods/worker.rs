//! One pod's worker: everything the node does for that pod, in one task.
//!
//! Each sync is level-based: from the pod as the API has it and the
//! containers as the runtime reports them, do the next step (network,
//! volumes, the next init container, app containers, restarts after
//! back-off, probe verdicts) and post the status if it changed. A restarted
//! agent therefore adopts running containers: they are simply observed.

use super::{
    Ctx, Msg, PodNetInfo, dnsconf,
    events::Kind,
    status::{self, ContainerFacts},
    streams::{ContainerView, InstanceView, PodView},
    volumes,
};
use crate::json::{str_at as s, strings_at as strings};
use crate::probe::{ProbeEvent, ProbeKind, ProbeStatus, ProbeTarget, Prober};
use crate::runtime::{
    ContainerInfo, ContainerLabels, ContainerSpec, ContainerState, Mount, RuntimeError,
};
use serde_json::{Value, json};
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, watch};

const TICK: Duration = Duration::from_millis(200);
/// Volumes (ConfigMaps, Secrets, tokens) are refreshed this often.
const VOLUME_RESYNC: Duration = Duration::from_secs(10);
/// A full sync happens at least this often even with nothing new.
const RESYNC: Duration = Duration::from_secs(1);
const BACKOFF_START: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A container that ran this long has its back-off forgotten.
const BACKOFF_RESET: Duration = Duration::from_secs(600);

struct Probes {
    for_id: String,
    startup: Option<(Prober, watch::Receiver<ProbeStatus>)>,
    liveness: Option<(Prober, watch::Receiver<ProbeStatus>)>,
    readiness: Option<(Prober, watch::Receiver<ProbeStatus>)>,
    events: Vec<mpsc::Receiver<ProbeEvent>>,
    started: bool,
}

/// One container name of the pod and what the worker remembers about it.
struct Slot {
    name: String,
    init: bool,
    /// An init container with restartPolicy Always (a sidecar).
    sidecar: bool,
    spec: Value,
    /// Delay before the next restart (None: the next restart is at once).
    backoff: Option<Duration>,
    /// (reason, message) while the container waits.
    waiting: Option<(String, String)>,
    /// Image pull back-off.
    image_retry: Option<(Instant, Duration)>,
    probes: Option<Probes>,
    /// An instance being stopped (liveness failure) — not stopped twice.
    killing: Option<String>,
    /// The container's image was changed in the pod spec since its
    /// instance started: the instance is replaced, whatever the restart
    /// policy (as the kubelet does for a changed container definition).
    respec: bool,
}

impl Slot {
    fn policy(&self, pod_policy: &str) -> String {
        if self.sidecar {
            "Always".into()
        } else if self.init {
            // Init containers never restart after success; after failure
            // they follow the pod's policy, with Always acting as OnFailure.
            if pod_policy == "Never" {
                "Never"
            } else {
                "OnFailure"
            }
            .into()
        } else {
            pod_policy.to_owned()
        }
    }
}

struct Worker {
    ctx: Arc<Ctx>,
    uid: String,
    pod: Value,
    gone: bool,
    finished: bool,
    net: Option<PodNetInfo>,
    net_error: Option<String>,
    volumes: BTreeMap<String, volumes::Prepared>,
    volumes_at: Option<Instant>,
    volume_error: Option<String>,
    slots: Vec<Slot>,
    observed: Vec<ContainerInfo>,
    /// Containers started but not yet seen in a relist.
    pending: Vec<(ContainerInfo, Instant)>,
    /// The runtime's view of this pod has arrived at least once: before
    /// that nothing is started (a restarted agent would otherwise start
    /// a second copy of a container it is about to adopt).
    relisted: bool,
    start_time: Option<String>,
    last_status: Option<Value>,
    last_sync: Instant,
    dirty: bool,
    terminal_done: bool,
    init_failed: bool,
    /// [mesh] injection decision and capture state (crate::mesh).
    mesh: crate::mesh::PodMesh,
}

pub(crate) async fn run(ctx: Arc<Ctx>, uid: String, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut w = Worker {
        ctx,
        uid,
        pod: Value::Null,
        gone: false,
        finished: false,
        net: None,
        net_error: None,
        volumes: BTreeMap::new(),
        volumes_at: None,
        volume_error: None,
        slots: Vec::new(),
        observed: Vec::new(),
        pending: Vec::new(),
        relisted: false,
        start_time: None,
        last_status: None,
        last_sync: Instant::now(),
        dirty: true,
        terminal_done: false,
        init_failed: false,
        mesh: Default::default(),
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = rx.recv() => w.receive(m),
            _ = tick.tick() => {
                if w.probes_changed() || w.last_sync.elapsed() >= RESYNC {
                    w.dirty = true;
                }
            }
        }
        // Take whatever else is queued before syncing once.
        while let Ok(m) = rx.try_recv() {
            w.receive(Some(m));
        }
        if w.dirty && !w.pod.is_null() && (w.relisted || w.gone) {
            w.dirty = false;
            w.last_sync = Instant::now();
            w.sync().await;
        }
        if w.finished {
            break;
        }
    }
}

impl Worker {
    fn receive(&mut self, m: Option<Msg>) {
        match m {
            Some(Msg::Pod(p)) => {
                if self.slots.is_empty() {
                    self.slots = slots_of(&p);
                } else {
                    self.note_image_changes(&p);
                }
                self.pod = *p;
            }
            Some(Msg::Containers(cs)) => {
                self.relisted = true;
                // A relist taken before our latest start may not have it
                // yet: keep what we started until the runtime reports it,
                // or a container would be started twice.
                self.pending.retain(|(p, at)| {
                    !cs.iter().any(|c| c.id == p.id) && at.elapsed() < Duration::from_secs(30)
                });
                self.observed = cs;
                self.observed
                    .extend(self.pending.iter().map(|(p, _)| p.clone()));
            }
            Some(Msg::Gone) | None => self.gone = true,
        }
        self.dirty = true;
    }

    /// Containers whose image the pod update changed (the only mutable
    /// field of a container) take the new spec and are marked for
    /// replacement.
    fn note_image_changes(&mut self, pod: &Value) {
        for slot in &mut self.slots {
            let list = if slot.init {
                "/spec/initContainers"
            } else {
                "/spec/containers"
            };
            let Some(new) = pod.pointer(list).and_then(Value::as_array).and_then(|cs| {
                cs.iter()
                    .find(|c| s(c, "/name") == Some(slot.name.as_str()))
            }) else {
                continue;
            };
            if s(new, "/image") != s(&slot.spec, "/image") {
                tracing::info!(
                    container = %slot.name,
                    from = s(&slot.spec, "/image").unwrap_or(""),
                    to = s(new, "/image").unwrap_or(""),
                    "container image changed: replacing the container"
                );
                slot.spec = new.clone();
                slot.respec = true;
                slot.backoff = None;
                slot.image_retry = None;
                slot.waiting = None;
            }
        }
    }

    fn probes_changed(&mut self) -> bool {
        let mut changed = false;
        for slot in &mut self.slots {
            if let Some(p) = &mut slot.probes {
                for (_, rx) in [&mut p.startup, &mut p.liveness, &mut p.readiness]
                    .into_iter()
                    .flatten()
                {
                    changed |= rx.has_changed().unwrap_or(false);
                }
                changed |= p.events.iter().any(|e| !e.is_empty());
            }
        }
        changed
    }

    fn ns(&self) -> String {
        s(&self.pod, "/metadata/namespace")
            .unwrap_or("default")
            .to_owned()
    }

    fn name(&self) -> String {
        s(&self.pod, "/metadata/name").unwrap_or("").to_owned()
    }

    fn host_network(&self) -> bool {
        self.pod
            .pointer("/spec/hostNetwork")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    fn restart_policy(&self) -> String {
        s(&self.pod, "/spec/restartPolicy")
            .unwrap_or("Always")
            .to_owned()
    }

    fn pod_ip(&self) -> Option<IpAddr> {
        if self.host_network() {
            Some(self.ctx.cfg.node_ip)
        } else {
            self.net.as_ref().map(|n| n.ip)
        }
    }

    /// The newest and the one-before instances of a container.
    fn instances(&self, name: &str) -> (Option<&ContainerInfo>, Option<&ContainerInfo>) {
        let mut mine: Vec<&ContainerInfo> = self
            .observed
            .iter()
            .filter(|c| c.labels.container_name == name)
            .collect();
        mine.sort_by_key(|c| std::cmp::Reverse(c.labels.attempt));
        (mine.first().copied(), mine.get(1).copied())
    }

    async fn sync(&mut self) {
        if self.gone {
            self.terminate(Duration::ZERO).await;
            self.finished = true;
            return;
        }
        if self
            .pod
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|v| !v.is_null())
        {
            let grace = self
                .pod
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(30);
            self.terminate(Duration::from_secs(grace)).await;
            self.finish_deletion().await;
            return;
        }
        if matches!(s(&self.pod, "/status/phase"), Some("Succeeded" | "Failed")) {
            // A finished pod stays finished; its sidecars and network go.
            self.wind_down_terminal().await;
            self.publish_view();
            return;
        }
        if self.start_time.is_none() {
            self.start_time = Some(
                s(&self.pod, "/status/startTime")
                    .map(str::to_owned)
                    .unwrap_or_else(status::now),
            );
        }
        // [mesh] decide once (namespace labels), then keep the sidecar in
        // this worker's copy of the pod (the API's copy has none).
        if !self.mesh.decided()
            && let Err(e) = self.mesh.decide(&self.ctx.client, &self.pod).await
        {
            tracing::warn!(pod = %self.name(), error = %e, "mesh decision pending");
            return;
        }
        if self.mesh.apply(&mut self.pod)
            && !self
                .slots
                .iter()
                .any(|s| s.name == crate::mesh::SIDECAR_NAME)
        {
            self.slots = slots_of(&self.pod);
        }
        let t0 = Instant::now();
        let ready = self.prepare_sandbox().await;
        // [mesh] capture attached before any container of a meshed pod runs.
        let ready = ready
            && match self.mesh.set_up(&self.uid, self.pod_ip()) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(pod = %self.name(), error = %e, "mesh capture not attached");
                    false
                }
            };
        let t1 = Instant::now();
        if ready {
            self.drain_probe_events();
            self.step_containers().await;
        }
        // [mesh] the sidecar's identity into the pod's annotations.
        let ip = self.pod_ip();
        self.mesh.report(&self.ctx.client, &self.pod, ip).await;
        let t2 = Instant::now();
        self.publish_view();
        self.push_status().await;
        tracing::debug!(
            pod = %self.name(),
            sandbox_ms = (t1 - t0).as_millis() as u64,
            containers_ms = (t2 - t1).as_millis() as u64,
            status_ms = t2.elapsed().as_millis() as u64,
            "pod synced"
        );
    }

    /// Network, pod files and volumes; false while they are not ready.
    async fn prepare_sandbox(&mut self) -> bool {
        if !self.host_network() && self.net.is_none() {
            let netns = std::path::Path::new("/run/netns")
                .join(skep_dataplane::podnet::netns_name(&self.uid));
            let pod = crate::runtime::ContainerLabels {
                pod_uid: self.uid.clone(),
                pod_namespace: self.ns(),
                pod_name: self.name(),
                container_name: String::new(),
                attempt: 0,
                init: false,
            };
            let made = self
                .ctx
                .runtime
                .create_sandbox(&self.uid, &pod, &netns)
                .await
                .map_err(|e| e.to_string());
            match async {
                made?;
                self.ctx.network.setup(&self.uid).await
            }
            .await
            {
                Ok(n) => {
                    self.net = Some(n);
                    self.net_error = None;
                }
                Err(e) => {
                    if self.net_error.as_deref() != Some(e.as_str()) {
                        self.ctx.events.pod(
                            &self.pod,
                            None,
                            Kind::Warning,
                            "FailedCreatePodSandBox",
                            format!("Failed to create pod sandbox: {e}"),
                        );
                    }
                    self.net_error = Some(e);
                    return false;
                }
            }
        }
        let dir = self.ctx.pod_dir(&self.uid);
        if let Err(e) = self.write_pod_files(&dir) {
            self.volume_error = Some(e);
            return false;
        }
        if self.volumes_at.is_none_or(|t| t.elapsed() >= VOLUME_RESYNC)
            || self.volume_error.is_some()
        {
            let tokens = super::ApiTokens {
                client: self.ctx.client.clone(),
                ca_pem: self.ctx.cfg.cluster_ca_pem.clone(),
            };
            let cx = volumes::VolumeContext {
                pod_dir: &dir,
                objects: &self.ctx.objects,
                tokens: &tokens,
                node: &self.ctx.cfg.node,
            };
            let tv = Instant::now();
            let prepared = volumes::prepare(&self.pod, &cx).await;
            tracing::debug!(pod = %self.name(), volumes_ms = tv.elapsed().as_millis() as u64, "volumes prepared");
            match prepared {
                Ok(v) => {
                    self.volumes = v;
                    self.volumes_at = Some(Instant::now());
                    self.volume_error = None;
                }
                Err(e) => {
                    let msg = format!("MountVolume.SetUp failed for {e}");
                    if self.volume_error.as_deref() != Some(msg.as_str()) {
                        self.ctx.events.pod(
                            &self.pod,
                            None,
                            Kind::Warning,
                            "FailedMount",
                            msg.clone(),
                        );
                    }
                    self.volume_error = Some(msg);
                    // Running containers keep running on the volumes they
                    // have; new ones wait.
                    return self.volumes_at.is_some();
                }
            }
        }
        true
    }

    fn write_pod_files(&self, dir: &std::path::Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let files = [
            (
                "resolv.conf",
                dnsconf::resolv_conf(&self.pod, &self.ctx.cfg.dns, &self.ctx.host_resolv),
            ),
            (
                "hosts",
                dnsconf::hosts(&self.pod, self.pod_ip(), &self.ctx.cfg.dns.domain),
            ),
            ("hostname", format!("{}\n", dnsconf::hostname(&self.pod))),
        ];
        for (name, text) in files {
            let path = dir.join(name);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                std::fs::write(&path, text)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Init containers in order, then app containers; restarts; probes.
    async fn step_containers(&mut self) {
        let policy = self.restart_policy();
        let mut blocked = false;
        for i in 0..self.slots.len() {
            if !self.slots[i].init {
                continue;
            }
            let name = self.slots[i].name.clone();
            let (cur, _) = self.instances(&name);
            let cur = cur.cloned();
            if self.slots[i].sidecar {
                self.keep_running(i, cur.as_ref(), &policy).await;
                let started = self.slots[i].probes.as_ref().is_some_and(|p| p.started);
                if !matches!(cur.map(|c| c.state), Some(ContainerState::Running { .. })) || !started
                {
                    blocked = true;
                    break;
                }
                continue;
            }
            match cur.as_ref().map(|c| &c.state) {
                Some(ContainerState::Exited { exit_code: 0, .. }) => continue,
                Some(ContainerState::Exited { exit_code, .. }) => {
                    if policy == "Never" {
                        self.init_failed = true;
                    } else {
                        let code = *exit_code;
                        self.maybe_restart(i, cur.as_ref(), code).await;
                    }
                    blocked = true;
                    break;
                }
                Some(_) => {
                    blocked = true;
                    break;
                }
                None => {
                    self.start(i, 0).await;
                    blocked = true;
                    break;
                }
            }
        }
        if blocked {
            return;
        }
        for i in 0..self.slots.len() {
            if self.slots[i].init {
                continue;
            }
            let name = self.slots[i].name.clone();
            let cur = self.instances(&name).0.cloned();
            self.keep_running(i, cur.as_ref(), &policy).await;
        }
    }

    /// Starts a container that has no instance, restarts one that exited
    /// (per policy and back-off), and runs its probes while it runs.
    async fn keep_running(&mut self, i: usize, cur: Option<&ContainerInfo>, policy: &str) {
        match cur.map(|c| &c.state) {
            None => {
                self.slots[i].respec = false;
                self.start(i, 0).await
            }
            Some(ContainerState::Exited { .. }) if self.slots[i].respec => {
                // The old image's instance is gone: the new one starts now,
                // whatever the restart policy, without back-off.
                let attempt = cur.map_or(0, |c| c.labels.attempt + 1);
                let slot = &mut self.slots[i];
                slot.respec = false;
                slot.killing = None;
                slot.probes = None;
                self.prune_instances(i, attempt).await;
                self.start(i, attempt).await;
            }
            Some(ContainerState::Running { .. } | ContainerState::Created)
                if self.slots[i].respec =>
            {
                if let Some(c) = cur {
                    self.stop_changed(i, c);
                }
            }
            Some(ContainerState::Exited { exit_code, .. }) => {
                let code = *exit_code;
                let p = self.slots[i].policy(policy);
                if status::restarts(&p, self.slots[i].sidecar, code) {
                    self.maybe_restart(i, cur, code).await;
                }
                self.slots[i].probes = None;
            }
            Some(ContainerState::Running { .. }) => {
                if let Some(c) = cur {
                    self.ensure_probes(i, c);
                }
            }
            Some(ContainerState::Created) => {}
        }
    }

    /// Restart now, or wait out the back-off (CrashLoopBackOff).
    async fn maybe_restart(&mut self, i: usize, cur: Option<&ContainerInfo>, _code: i32) {
        let Some(cur) = cur else { return };
        let ContainerState::Exited {
            started_at,
            finished_at,
            ..
        } = &cur.state
        else {
            return;
        };
        let ran = started_at
            .map(|st| (*finished_at - st).to_std().unwrap_or_default())
            .unwrap_or_default();
        let slot = &mut self.slots[i];
        if ran >= BACKOFF_RESET {
            slot.backoff = None;
        }
        let due = match slot.backoff {
            None => true,
            Some(d) => {
                let since = (chrono::Utc::now() - *finished_at)
                    .to_std()
                    .unwrap_or_default();
                since >= d
            }
        };
        if !due {
            let d = slot.backoff.unwrap_or(BACKOFF_START);
            let msg = format!(
                "back-off {}s restarting failed container={} pod={}_{}({})",
                d.as_secs(),
                slot.name,
                s(&self.pod, "/metadata/name").unwrap_or(""),
                s(&self.pod, "/metadata/namespace").unwrap_or(""),
                self.uid
            );
            if slot.waiting.as_ref().map(|w| w.0.as_str()) != Some("CrashLoopBackOff") {
                self.ctx.events.pod(
                    &self.pod,
                    Some(&slot.name),
                    Kind::Warning,
                    "BackOff",
                    "Back-off restarting failed container".into(),
                );
            }
            slot.waiting = Some(("CrashLoopBackOff".into(), msg));
            return;
        }
        slot.backoff = Some(match slot.backoff {
            None => BACKOFF_START,
            Some(d) => (d * 2).min(BACKOFF_MAX),
        });
        let attempt = cur.labels.attempt + 1;
        self.prune_instances(i, attempt).await;
        self.start(i, attempt).await;
    }

    /// Before starting instance `attempt`: keeps one previous instance
    /// (for `logs --previous`), removes older ones.
    async fn prune_instances(&mut self, i: usize, attempt: u32) {
        let name = &self.slots[i].name;
        let old: Vec<String> = self
            .observed
            .iter()
            .filter(|c| &c.labels.container_name == name && c.labels.attempt + 1 < attempt)
            .map(|c| c.id.clone())
            .collect();
        for id in old {
            let _ = self.ctx.runtime.remove(&id).await;
            self.observed.retain(|c| c.id != id);
        }
    }

    /// Stops the instance of a container whose image changed (once; the
    /// next sync after it exits starts the new image).
    fn stop_changed(&mut self, i: usize, c: &ContainerInfo) {
        if self.slots[i].killing.as_deref() == Some(c.id.as_str()) {
            return;
        }
        let name = self.slots[i].name.clone();
        self.slots[i].killing = Some(c.id.clone());
        self.ctx.events.pod(
            &self.pod,
            Some(&name),
            Kind::Normal,
            "Killing",
            format!("Container {name} definition changed, will be restarted"),
        );
        let (rt, id, grace) = (self.ctx.runtime.clone(), c.id.clone(), self.grace());
        // Stopping takes up to the grace period: not on the worker.
        tokio::spawn(async move {
            if let Err(e) = rt.stop(&id, grace).await {
                tracing::warn!(container = %id, error = %e, "stopping a changed container failed");
            }
        });
    }

    /// Creates and starts one container instance.
    async fn start(&mut self, i: usize, attempt: u32) {
        if let Some((until, _)) = self.slots[i].image_retry
            && Instant::now() < until
        {
            return;
        }
        if self.volume_error.is_some() && self.volumes_at.is_none() {
            return;
        }
        let spec_json = self.slots[i].spec.clone();
        let name = self.slots[i].name.clone();
        let image = s(&spec_json, "/image").unwrap_or("").to_owned();
        let rt = self.ctx.runtime.clone();
        let image_id = match rt.ensure_image(&image).await {
            Ok(id) => {
                self.slots[i].image_retry = None;
                id
            }
            Err(e) => {
                let slot = &mut self.slots[i];
                let (reason, delay) = match slot.image_retry {
                    None => ("ErrImagePull", BACKOFF_START),
                    Some((_, d)) => ("ImagePullBackOff", (d * 2).min(BACKOFF_MAX)),
                };
                slot.image_retry = Some((Instant::now() + delay, delay));
                slot.waiting = Some((reason.into(), e.to_string()));
                self.ctx.events.pod(
                    &self.pod,
                    Some(&name),
                    Kind::Warning,
                    "Failed",
                    format!("Failed to pull image \"{image}\": {e}"),
                );
                return;
            }
        };
        let _ = image_id;
        match self.container_spec(i, attempt, &image).await {
            Err(msg) => {
                if self.slots[i].waiting.as_ref().map(|w| &w.1) != Some(&msg) {
                    self.ctx.events.pod(
                        &self.pod,
                        Some(&name),
                        Kind::Warning,
                        "Failed",
                        format!("Error: {msg}"),
                    );
                }
                self.slots[i].waiting = Some(("CreateContainerConfigError".into(), msg));
            }
            Ok(spec) => {
                self.ctx.events.pod(
                    &self.pod,
                    Some(&name),
                    Kind::Normal,
                    "Pulled",
                    format!("Container image \"{image}\" already present on machine"),
                );
                match rt.start(&spec).await {
                    Ok(id) => {
                        self.slots[i].waiting = None;
                        self.ctx.events.pod(
                            &self.pod,
                            Some(&name),
                            Kind::Normal,
                            "Created",
                            format!("Created container {name}"),
                        );
                        self.ctx.events.pod(
                            &self.pod,
                            Some(&name),
                            Kind::Normal,
                            "Started",
                            format!("Started container {name}"),
                        );
                        // Seen as running until the relister says more.
                        let info = ContainerInfo {
                            id: id.clone(),
                            labels: spec.labels.clone(),
                            image: image.clone(),
                            image_id: String::new(),
                            state: ContainerState::Running {
                                started_at: chrono::Utc::now(),
                            },
                            log_path: spec.log_path.clone(),
                        };
                        self.pending.push((info.clone(), Instant::now()));
                        self.observed.push(info);
                        self.post_start(i, &id).await;
                    }
                    Err(e) => {
                        let reason = match e {
                            RuntimeError::Image { .. } => "ErrImagePull",
                            _ => "RunContainerError",
                        };
                        self.ctx.events.pod(
                            &self.pod,
                            Some(&name),
                            Kind::Warning,
                            "Failed",
                            format!("Error: {e}"),
                        );
                        self.slots[i].waiting = Some((reason.into(), e.to_string()));
                    }
                }
            }
        }
    }

    async fn post_start(&mut self, i: usize, id: &str) {
        let Some(hook) = self.slots[i].spec.pointer("/lifecycle/postStart").cloned() else {
            return;
        };
        let name = self.slots[i].name.clone();
        if let Err(msg) = self.run_hook(&hook, i, id, Duration::from_secs(30)).await {
            self.ctx.events.pod(
                &self.pod,
                Some(&name),
                Kind::Warning,
                "FailedPostStartHook",
                msg,
            );
            self.ctx.events.pod(
                &self.pod,
                Some(&name),
                Kind::Normal,
                "Killing",
                format!("FailedPostStartHook: container {name} will be restarted"),
            );
            let _ = self.ctx.runtime.stop(id, self.grace()).await;
        }
    }

    /// Runs a lifecycle hook (exec, httpGet, sleep) against an instance.
    async fn run_hook(
        &self,
        hook: &Value,
        i: usize,
        id: &str,
        limit: Duration,
    ) -> Result<(), String> {
        if let Some(secs) = hook.pointer("/sleep/seconds").and_then(Value::as_u64) {
            tokio::time::sleep(Duration::from_secs(secs).min(limit)).await;
            return Ok(());
        }
        let mut probe = hook.clone();
        probe["timeoutSeconds"] = json!(limit.as_secs().max(1));
        match crate::probe::probe_once(&probe, &self.probe_target(i, id)).await {
            crate::probe::ProbeResult::Success => Ok(()),
            crate::probe::ProbeResult::Failure(m) => Err(m),
        }
    }

    fn probe_target(&self, i: usize, id: &str) -> ProbeTarget {
        ProbeTarget {
            pod_ip: self.pod_ip(),
            host_ip: self.ctx.cfg.node_ip,
            container_id: id.to_owned(),
            container: self.slots[i].spec.clone(),
            runtime: self.ctx.runtime.clone(),
        }
    }

    fn grace(&self) -> Duration {
        Duration::from_secs(
            self.pod
                .pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(30),
        )
    }

    /// Starts the probes of a new instance; after a startup probe
    /// succeeds, starts liveness and readiness.
    fn ensure_probes(&mut self, i: usize, c: &ContainerInfo) {
        let fresh = self.slots[i]
            .probes
            .as_ref()
            .is_none_or(|p| p.for_id != c.id);
        if fresh {
            let target = self.probe_target(i, &c.id);
            let spec = self.slots[i].spec.clone();
            let mut p = Probes {
                for_id: c.id.clone(),
                startup: None,
                liveness: None,
                readiness: None,
                events: Vec::new(),
                started: false,
            };
            match spec.get("startupProbe") {
                Some(probe) => {
                    let (prober, rx, ev) = Prober::spawn(ProbeKind::Startup, probe.clone(), target);
                    p.startup = Some((prober, rx));
                    p.events.push(ev);
                }
                None => p.started = true,
            }
            self.slots[i].probes = Some(p);
            self.slots[i].killing = None;
        }
        let target = self.probe_target(i, &c.id);
        let spec = self.slots[i].spec.clone();
        let Some(p) = self.slots[i].probes.as_mut() else {
            return;
        };
        if !p.started
            && let Some((_, rx)) = &mut p.startup
            && rx.borrow_and_update().ready
        {
            p.started = true;
            p.startup = None;
        }
        if p.started && p.liveness.is_none() && p.readiness.is_none() {
            if let Some(probe) = spec.get("livenessProbe") {
                let (prober, rx, ev) =
                    Prober::spawn(ProbeKind::Liveness, probe.clone(), target.clone());
                p.liveness = Some((prober, rx));
                p.events.push(ev);
            }
            if let Some(probe) = spec.get("readinessProbe") {
                let (prober, rx, ev) = Prober::spawn(ProbeKind::Readiness, probe.clone(), target);
                p.readiness = Some((prober, rx));
                p.events.push(ev);
            }
        }
    }

    /// Probe failures become events; liveness/startup thresholds restart
    /// the container.
    fn drain_probe_events(&mut self) {
        let mut kills = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(p) = slot.probes.as_mut() else {
                continue;
            };
            for rx in &mut p.events {
                while let Ok(ev) = rx.try_recv() {
                    match ev {
                        ProbeEvent::Failed { kind, message } => {
                            self.ctx.events.pod(
                                &self.pod,
                                Some(&slot.name),
                                Kind::Warning,
                                "Unhealthy",
                                format!("{} probe failed: {message}", kind_name(kind)),
                            );
                        }
                        ProbeEvent::ThresholdReached { kind, .. }
                            if kind != ProbeKind::Readiness =>
                        {
                            kills.push((i, p.for_id.clone(), kind));
                        }
                        ProbeEvent::ThresholdReached { .. } => {}
                    }
                }
            }
        }
        for (i, id, kind) in kills {
            if self.slots[i].killing.as_deref() == Some(id.as_str()) {
                continue;
            }
            let name = self.slots[i].name.clone();
            self.slots[i].killing = Some(id.clone());
            self.ctx.events.pod(
                &self.pod,
                Some(&name),
                Kind::Normal,
                "Killing",
                format!(
                    "Container {name} failed {} probe, will be restarted",
                    kind_name(kind).to_lowercase()
                ),
            );
            let probe_key = if kind == ProbeKind::Liveness {
                "livenessProbe"
            } else {
                "startupProbe"
            };
            let grace = self.slots[i]
                .spec
                .pointer(&format!("/{probe_key}/terminationGracePeriodSeconds"))
                .and_then(Value::as_u64)
                .map(Duration::from_secs)
                .unwrap_or_else(|| self.grace());
            let rt = self.ctx.runtime.clone();
            // Stopping takes up to the grace period: not on the worker.
            tokio::spawn(async move {
                if let Err(e) = rt.stop(&id, grace).await {
                    tracing::warn!(container = %id, error = %e, "stopping an unhealthy container failed");
                }
            });
        }
    }

    async fn container_spec(
        &self,
        i: usize,
        attempt: u32,
        image: &str,
    ) -> Result<ContainerSpec, String> {
        let slot = &self.slots[i];
        let c = &slot.spec;
        let img = self
            .ctx
            .runtime
            .image_config(image)
            .await
            .map_err(|e| e.to_string())?;
        let services = self.service_env().await;
        let env = super::env::build(
            &self.pod,
            c,
            &img.env,
            &services,
            &self.ctx.objects,
            &self.ctx.cfg.node,
        )
        .await
        .map_err(|e| e.0)?;
        let vars: BTreeMap<String, String> = env.iter().cloned().collect();
        let cmd = strings(c, "/command");
        let args = strings(c, "/args");
        let (command, args) = if !cmd.is_empty() {
            (cmd, args)
        } else if !args.is_empty() {
            (img.entrypoint.clone(), args)
        } else {
            (img.entrypoint.clone(), img.cmd.clone())
        };
        let expand = |v: Vec<String>| -> Vec<String> {
            v.iter().map(|a| super::env::expand(a, &vars)).collect()
        };
        let mut mounts = Vec::new();
        for vm in c
            .get("volumeMounts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let vname = s(vm, "/name").unwrap_or("");
            let prepared = self.volumes.get(vname).ok_or_else(|| {
                format!("volumeMount {vname:?}: the pod has no volume of that name")
            })?;
            let mut host = prepared.host_path.clone();
            let sub = s(vm, "/subPath")
                .map(str::to_owned)
                .or_else(|| s(vm, "/subPathExpr").map(|e| super::env::expand(e, &vars)))
                .filter(|p| !p.is_empty());
            if let Some(sub) = sub {
                if sub.starts_with('/') || sub.split('/').any(|x| x == "..") {
                    return Err(format!(
                        "subPath {sub:?} must be a relative path without '..'"
                    ));
                }
                host = host.join(&sub);
                if !host.exists() {
                    std::fs::create_dir_all(&host)
                        .map_err(|e| format!("creating subPath {}: {e}", host.display()))?;
                }
            }
            mounts.push(Mount {
                host_path: host,
                container_path: s(vm, "/mountPath").unwrap_or("").to_owned(),
                read_only: vm.get("readOnly").and_then(Value::as_bool).unwrap_or(false)
                    || prepared.read_only,
            });
        }
        if volumes::automount_token(&self.pod)
            && !mounts.iter().any(|m| m.container_path == volumes::SA_MOUNT)
            && let Some(v) = self.volumes.get(volumes::SA_VOLUME)
        {
            mounts.push(Mount {
                host_path: v.host_path.clone(),
                container_path: volumes::SA_MOUNT.into(),
                read_only: true,
            });
        }
        let dir = self.ctx.pod_dir(&self.uid);
        let mut files = vec![
            ("resolv.conf", "/etc/resolv.conf"),
            ("hostname", "/etc/hostname"),
        ];
        if !self.host_network() {
            files.push(("hosts", "/etc/hosts"));
        }
        for (f, target) in files {
            mounts.push(Mount {
                host_path: dir.join(f),
                container_path: target.into(),
                read_only: false,
            });
        }
        let sc = |p: &str| {
            c.pointer(&format!("/securityContext/{p}"))
                .or_else(|| self.pod.pointer(&format!("/spec/securityContext/{p}")))
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
        };
        let ns = self.ns();
        let pod_name = self.name();
        let log_path = self
            .ctx
            .cfg
            .data_dir
            .join("logs")
            .join(format!("{ns}_{pod_name}_{}", self.uid))
            .join(&slot.name)
            .join(format!("{attempt}.log"));
        Ok(ContainerSpec {
            labels: ContainerLabels {
                pod_uid: self.uid.clone(),
                pod_namespace: ns,
                pod_name,
                container_name: slot.name.clone(),
                attempt,
                init: slot.init,
            },
            image: image.to_owned(),
            command: expand(command),
            args: expand(args),
            env,
            working_dir: s(c, "/workingDir")
                .map(str::to_owned)
                .or(img.working_dir.clone()),
            mounts,
            netns: if self.host_network() {
                None
            } else {
                self.net.as_ref().map(|n| n.netns.clone())
            },
            hostname: if self.host_network() {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_default()
            } else {
                dnsconf::hostname(&self.pod)
            },
            run_as_user: sc("runAsUser"),
            run_as_group: sc("runAsGroup"),
            supplemental_groups: self
                .pod
                .pointer("/spec/securityContext/supplementalGroups")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|g| g.as_u64().and_then(|g| u32::try_from(g).ok()))
                .collect(),
            resources: status::resources(c),
            stdin: c.get("stdin").and_then(Value::as_bool).unwrap_or(false),
            stdin_once: c.get("stdinOnce").and_then(Value::as_bool).unwrap_or(false),
            tty: c.get("tty").and_then(Value::as_bool).unwrap_or(false),
            log_path,
        })
    }

    /// Service variables (enableServiceLinks, default on) plus the
    /// `kubernetes` service's, which every pod gets.
    async fn service_env(&self) -> Vec<(String, String)> {
        let links = self
            .pod
            .pointer("/spec/enableServiceLinks")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let ns = self.ns();
        let mut services = self.ctx.services_of("default").await;
        services.retain(|svc| s(svc, "/metadata/name") == Some("kubernetes"));
        if links {
            for svc in self.ctx.services_of(&ns).await {
                if !(ns == "default" && s(&svc, "/metadata/name") == Some("kubernetes")) {
                    services.push(svc);
                }
            }
        }
        super::env::service_env(&services)
    }

    /// Stops every container (preStop hooks first, app containers before
    /// sidecars), then removes the pod's network, volumes and containers.
    async fn terminate(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        let running: Vec<(usize, String)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let (cur, _) = self.instances(&slot.name);
                cur.filter(|c| {
                    matches!(
                        c.state,
                        ContainerState::Running { .. } | ContainerState::Created
                    )
                })
                .map(|c| (i, c.id.clone()))
            })
            .collect();
        // App containers first, then sidecars (in reverse start order).
        let (sidecars, apps): (Vec<_>, Vec<_>) =
            running.into_iter().partition(|(i, _)| self.slots[*i].init);
        for group in [apps, sidecars.into_iter().rev().collect()] {
            let mut stops = Vec::new();
            for (i, id) in group {
                let name = self.slots[i].name.clone();
                self.slots[i].probes = None;
                if let Some(hook) = self.slots[i].spec.pointer("/lifecycle/preStop").cloned() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if let Err(msg) = self.run_hook(&hook, i, &id, left).await {
                        self.ctx.events.pod(
                            &self.pod,
                            Some(&name),
                            Kind::Warning,
                            "FailedPreStopHook",
                            msg,
                        );
                    }
                }
                self.ctx.events.pod(
                    &self.pod,
                    Some(&name),
                    Kind::Normal,
                    "Killing",
                    format!("Stopping container {name}"),
                );
                let rt = self.ctx.runtime.clone();
                let left = deadline.saturating_duration_since(Instant::now());
                stops.push(async move { (id.clone(), rt.stop(&id, left).await) });
            }
            for (id, r) in futures::future::join_all(stops).await {
                if let Err(e) = r {
                    tracing::warn!(container = %id, error = %e, "stopping a container failed");
                }
            }
        }
        self.release_sandbox().await;
        for c in std::mem::take(&mut self.observed) {
            let _ = self.ctx.runtime.remove(&c.id).await;
        }
        let logs = self.ctx.cfg.data_dir.join("logs").join(format!(
            "{}_{}_{}",
            self.ns(),
            self.name(),
            self.uid
        ));
        let _ = std::fs::remove_dir_all(logs);
        volumes::cleanup(&self.ctx.pod_dir(&self.uid));
        if let Ok(mut v) = self.ctx.views.lock() {
            v.remove(&(self.ns(), self.name()));
        }
    }

    async fn release_sandbox(&mut self) {
        // [mesh] capture and meshed-pod entry go with the sandbox.
        self.mesh.tear_down();
        if self.host_network() {
            return;
        }
        if let Err(e) = self.ctx.network.teardown(&self.uid).await {
            tracing::warn!(pod = %self.name(), error = %e, "removing the pod network failed");
        }
        if let Err(e) = self.ctx.runtime.remove_sandbox(&self.uid).await {
            tracing::warn!(pod = %self.name(), error = %e, "removing the pod sandbox failed");
        }
        self.net = None;
    }

    /// The last step of a graceful deletion: the kubelet removes the pod
    /// once its containers are gone.
    async fn finish_deletion(&mut self) {
        let path = format!("/api/v1/namespaces/{}/pods/{}", self.ns(), self.name());
        let body = json!({"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                          "preconditions": {"uid": self.uid}});
        match self
            .ctx
            .client
            .request(http::Method::DELETE, &path, Some(&body), "application/json")
            .await
        {
            Ok(_) => self.finished = true,
            Err(e) if e.is_not_found() || e.is_conflict() => self.finished = true,
            Err(e) => {
                // Retried on the next sync.
                tracing::warn!(pod = %self.name(), error = %e, "deleting the terminated pod failed");
            }
        }
    }

    /// A pod that reached Succeeded/Failed: its sidecars stop, its IP is
    /// released; its containers and logs stay until it is deleted.
    async fn wind_down_terminal(&mut self) {
        if self.terminal_done {
            return;
        }
        let running: Vec<String> = self
            .observed
            .iter()
            .filter(|c| matches!(c.state, ContainerState::Running { .. }))
            .map(|c| c.id.clone())
            .collect();
        for id in running {
            let _ = self.ctx.runtime.stop(&id, self.grace()).await;
        }
        for slot in &mut self.slots {
            slot.probes = None;
        }
        self.release_sandbox().await;
        self.terminal_done = true;
    }

    fn publish_view(&self) {
        let mut view = PodView {
            uid: self.uid.clone(),
            netns: self.net.as_ref().map(|n| n.netns.clone()),
            host_network: self.host_network(),
            order: Vec::new(),
            default_container: s(
                &self.pod,
                "/metadata/annotations/kubectl.kubernetes.io~1default-container",
            )
            .map(str::to_owned),
            containers: BTreeMap::new(),
        };
        let inst = |c: &ContainerInfo| InstanceView {
            id: c.id.clone(),
            log_path: c.log_path.clone(),
            running: matches!(c.state, ContainerState::Running { .. }),
        };
        for slot in self
            .slots
            .iter()
            .filter(|x| !x.init)
            .chain(self.slots.iter().filter(|x| x.init))
        {
            let (cur, prev) = self.instances(&slot.name);
            view.order.push(slot.name.clone());
            view.containers.insert(
                slot.name.clone(),
                ContainerView {
                    current: cur.map(inst),
                    previous: prev.map(inst),
                },
            );
        }
        view.order
            .retain(|n| self.slots.iter().any(|x| &x.name == n && !x.init));
        if let Ok(mut v) = self.ctx.views.lock() {
            v.insert((self.ns(), self.name()), view);
        }
    }

    fn container_facts_status(&self, slot: &Slot, initializing: bool) -> Value {
        let (cur, prev) = self.instances(&slot.name);
        let running = cur.is_some_and(|c| matches!(c.state, ContainerState::Running { .. }));
        let probes = slot
            .probes
            .as_ref()
            .filter(|p| cur.is_some_and(|c| c.id == p.for_id));
        let started = running && probes.is_some_and(|p| p.started);
        let ready = started
            && match probes.and_then(|p| p.readiness.as_ref()) {
                Some((_, rx)) => rx.borrow().ready,
                None => slot.spec.get("readinessProbe").is_none(),
            };
        let waiting = match (&slot.waiting, cur) {
            (Some(w), _) => Some((w.0.clone(), w.1.clone())),
            (None, None) if initializing && !slot.init => {
                Some(("PodInitializing".to_owned(), String::new()))
            }
            _ => None,
        };
        // A waiting reason only applies while there is no running instance.
        let waiting = waiting.filter(|_| !running);
        let facts = ContainerFacts {
            name: &slot.name,
            image: s(&slot.spec, "/image").unwrap_or(""),
            current: cur,
            previous: prev,
            waiting: waiting.as_ref().map(|(r, m)| (r.as_str(), m.as_str())),
            ready,
            started,
            runtime: self.ctx.runtime.name(),
        };
        status::container_status(&facts)
    }

    fn compute_status(&self) -> Value {
        let old = self.pod.get("status").cloned().unwrap_or(json!({}));
        let policy = self.restart_policy();
        let inits: Vec<&Slot> = self.slots.iter().filter(|x| x.init).collect();
        let apps: Vec<&Slot> = self.slots.iter().filter(|x| !x.init).collect();
        let init_done = inits.iter().all(|slot| {
            let (cur, _) = self.instances(&slot.name);
            match cur.map(|c| &c.state) {
                Some(ContainerState::Exited { exit_code: 0, .. }) => !slot.sidecar,
                Some(ContainerState::Running { .. }) => slot.sidecar,
                _ => false,
            }
        });
        let init_statuses: Vec<Value> = inits
            .iter()
            .map(|x| self.container_facts_status(x, !init_done))
            .collect();
        let app_statuses: Vec<Value> = apps
            .iter()
            .map(|x| self.container_facts_status(x, !init_done))
            .collect();
        let mut all_terminated = !apps.is_empty();
        let mut any_failed = false;
        let mut any_running = false;
        for slot in &apps {
            let (cur, _) = self.instances(&slot.name);
            match cur.map(|c| &c.state) {
                Some(ContainerState::Exited { exit_code, .. }) => {
                    if status::restarts(&policy, false, *exit_code) {
                        all_terminated = false;
                        any_running = true;
                    } else if *exit_code != 0 {
                        any_failed = true;
                    }
                }
                Some(ContainerState::Running { .. } | ContainerState::Created) => {
                    all_terminated = false;
                    any_running = true;
                }
                None => all_terminated = false,
            }
        }
        let phase = if self.init_failed {
            "Failed"
        } else if !init_done {
            "Pending"
        } else if all_terminated {
            if any_failed { "Failed" } else { "Succeeded" }
        } else if any_running {
            "Running"
        } else {
            "Pending"
        };
        let containers_ready = init_done
            && !app_statuses.is_empty()
            && app_statuses
                .iter()
                .all(|c| c.get("ready") == Some(&json!(true)))
            && inits
                .iter()
                .zip(&init_statuses)
                .all(|(slot, st)| !slot.sidecar || st.get("ready") == Some(&json!(true)));
        let terminal = matches!(phase, "Succeeded" | "Failed");
        let reason_not_ready = (!containers_ready).then_some("ContainersNotReady");
        let mut conditions = vec![
            status::condition(
                &old,
                "PodReadyToStartContainers",
                self.net.is_some() || self.host_network(),
                None,
            ),
            status::condition(
                &old,
                "Initialized",
                init_done || terminal,
                (!init_done && !terminal).then_some("ContainersNotInitialized"),
            ),
            status::condition(
                &old,
                "Ready",
                containers_ready,
                reason_not_ready.or(terminal.then_some("PodCompleted")),
            ),
            status::condition(&old, "ContainersReady", containers_ready, reason_not_ready),
        ];
        if let Some(sched) = old
            .get("conditions")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| s(c, "/type") == Some("PodScheduled")))
        {
            conditions.push(sched.clone());
        }
        let mut st = json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": self.ctx.cfg.node_ip.to_string(),
            "hostIPs": [{"ip": self.ctx.cfg.node_ip.to_string()}],
            "startTime": self.start_time,
            "qosClass": status::qos_class(&self.pod),
            "containerStatuses": app_statuses,
        });
        if !init_statuses.is_empty() {
            st["initContainerStatuses"] = json!(init_statuses);
        }
        if let Some(ip) = self.pod_ip() {
            st["podIP"] = json!(ip.to_string());
            st["podIPs"] = json!([{"ip": ip.to_string()}]);
        }
        if let Some(e) = self.volume_error.as_ref().or(self.net_error.as_ref())
            && phase == "Pending"
        {
            st["message"] = json!(e);
        }
        st
    }

    async fn push_status(&mut self) {
        let st = self.compute_status();
        if self.last_status.as_ref() == Some(&st) {
            return;
        }
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}/status",
            self.ns(),
            self.name()
        );
        match self
            .ctx
            .client
            .merge_patch(&path, &json!({"status": st}))
            .await
        {
            Ok(updated) => {
                self.last_status = Some(st);
                // Our own write: keep the newest object.
                if updated.get("metadata").is_some() {
                    self.pod = updated;
                }
            }
            Err(e) if e.is_not_found() => self.gone = true,
            Err(e) => tracing::warn!(pod = %self.name(), error = %e, "posting pod status failed"),
        }
    }
}

fn kind_name(kind: ProbeKind) -> &'static str {
    match kind {
        ProbeKind::Startup => "Startup",
        ProbeKind::Liveness => "Liveness",
        ProbeKind::Readiness => "Readiness",
    }
}

/// The containers of a pod spec (init first, in order).
fn slots_of(pod: &Value) -> Vec<Slot> {
    let mut out = Vec::new();
    for (path, init) in [("/spec/initContainers", true), ("/spec/containers", false)] {
        for c in pod
            .pointer(path)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.push(Slot {
                name: s(c, "/name").unwrap_or("").to_owned(),
                init,
                sidecar: init && s(c, "/restartPolicy") == Some("Always"),
                spec: c.clone(),
                backoff: None,
                waiting: None,
                image_retry: None,
                probes: None,
                killing: None,
                respec: false,
            });
        }
    }
    out
}
