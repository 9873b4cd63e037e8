//! The controller manager: under leader election, starts the shared
//! informers, the scheduler and every controller; stops them all when
//! leadership is lost.

use crate::{
    client::Client,
    cronjob::CronJobController,
    daemonset::DaemonSetController,
    deployment::DeploymentController,
    endpoints::EndpointsController,
    gc::GarbageCollector,
    informer::Informers,
    job::JobController,
    leader::{self, LeaseConfig},
    nodelifecycle::NodeLifecycle,
    replicaset::ReplicaSetController,
    scheduler::Scheduler,
    serviceaccount::ServiceAccountController,
    statefulset::StatefulSetController,
};
use skep_apiserver::api::Api;
use std::{sync::Arc, time::Duration};
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
pub struct ManagerOptions {
    /// This server's name in the leader Lease.
    pub identity: String,
    /// How long a node may stay silent before it is marked unreachable
    /// (kube-controller-manager's node-monitor-grace-period).
    pub node_monitor_grace: Duration,
    /// Resource usage for the HPA controller (the API server's
    /// metrics.k8s.io source); without it HPAs report ScalingActive=False.
    pub metrics: Option<Arc<skep_apiserver::metrics_api::MetricsSource>>,
    /// Pod garbage collection (terminated-pod threshold, orphans).
    pub pod_gc: crate::podgc::PodGcOptions,
    /// Security identity allocation (grace period before unused numbers
    /// are deleted).
    pub security_identities: crate::identity::IdentityOptions,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "skep".into());
        Self {
            identity: format!("{host}_{}", uuid::Uuid::new_v4()),
            node_monitor_grace: Duration::from_secs(40),
            metrics: None,
            pod_gc: crate::podgc::PodGcOptions::default(),
            security_identities: crate::identity::IdentityOptions::default(),
        }
    }
}

/// The running controller manager; dropping it stops everything.
#[derive(Debug)]
pub struct Manager {
    task: JoinHandle<()>,
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Aborts the tasks of one term of leadership when dropped (also when the
/// manager task itself is aborted).
struct Term(Vec<JoinHandle<()>>);

impl Drop for Term {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl Manager {
    pub fn spawn(api: Arc<Api>, options: ManagerOptions) -> Self {
        let task = tokio::spawn(async move {
            let client = Client::new(api);
            let lease = LeaseConfig::controller_manager(options.identity.clone());
            loop {
                leader::acquire(&client, &lease).await;
                let term = match start_all(&client, &options) {
                    Ok(tasks) => Term(tasks),
                    Err(e) => {
                        tracing::error!(error = %e, "controllers could not start");
                        return;
                    }
                };
                leader::keep(&client, &lease).await;
                drop(term);
            }
        });
        Self { task }
    }
}

/// Builds every controller on one set of informers, then starts the
/// informers (handlers must be registered before the first list).
fn start_all(
    client: &Client,
    options: &ManagerOptions,
) -> crate::error::Result<Vec<JoinHandle<()>>> {
    let informers = Informers::default();
    let mut tasks = Vec::new();
    let (recorder, writer) = crate::events::Recorder::start(client.clone());
    tasks.push(writer);
    let client = &client.clone().with_events(recorder);
    tasks.extend(GarbageCollector::start(client, &informers));
    tasks.extend(ServiceAccountController::start(client, &informers)?);
    tasks.extend(ReplicaSetController::start(client, &informers)?);
    tasks.extend(DeploymentController::start(client, &informers)?);
    tasks.extend(JobController::start(client, &informers)?);
    tasks.extend(CronJobController::start(client, &informers)?);
    tasks.extend(DaemonSetController::start(client, &informers)?);
    tasks.extend(StatefulSetController::start(client, &informers)?);
    tasks.extend(crate::hpa::HpaController::start(
        client,
        &informers,
        options.metrics.clone(),
    )?);
    tasks.extend(crate::pv_binder::PvBinder::start(client, &informers)?);
    tasks.extend(Scheduler::start(client, &informers)?);
    tasks.extend(crate::disruption::DisruptionController::start(
        client, &informers,
    )?);
    tasks.extend(EndpointsController::start(client, &informers)?);
    tasks.extend(crate::podgc::PodGc::start(
        client,
        &informers,
        options.pod_gc,
    )?);
    tasks.extend(NodeLifecycle::start(
        client,
        &informers,
        options.node_monitor_grace,
    )?);
    tasks.extend(crate::identity::IdentityAllocator::start(
        client,
        &informers,
        options.security_identities,
    )?);
    for inf in informers.all() {
        tasks.push(tokio::spawn(inf.run(client.api.store.clone())));
    }
    tracing::info!("controllers started");
    Ok(tasks)
}
