//! skep's node agent (the kubelet side of a node).
//!
//! Built so far: the node's registration (capacity, allocatable, addresses,
//! nodeInfo, conditions) and its heartbeats: the Node status every 10 s and
//! a Lease in `kube-node-lease` renewed every 10 s. The node reports
//! `Ready=False` with the reason until a container runtime runs pods here,
//! so the scheduler never binds pods to a node that cannot run them.

pub mod node;
pub mod services;

use serde_json::json;
use skep_client::Client;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Api(#[from] skep_client::ClientError),
    #[error(
        "the server refused the node token ({0}); use the token in the server's DATA_DIR/node-token"
    )]
    Unauthorized(String),
}

/// What the agent is told about its node.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub node_ip: String,
    /// Labels added at registration (e.g. the control-plane role).
    pub labels: Vec<(String, String)>,
    /// bpffs directory for the service load balancer's pins; `None` runs
    /// the node without a dataplane.
    pub bpf_root: Option<std::path::PathBuf>,
}

const HEARTBEAT: Duration = Duration::from_secs(10);
const LEASE_SECONDS: i64 = 40;

fn micro_time() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Registers the node, then keeps its status and Lease fresh; returns only
/// on a fatal error.
pub async fn run(client: Client, cfg: AgentConfig) -> Result<(), AgentError> {
    // The server may not be up yet (or may still be loading): retry.
    let mut delay = Duration::from_millis(200);
    loop {
        match node::register(&client, &cfg).await {
            Ok(()) => break,
            // A refused token does not get better by retrying.
            Err(AgentError::Api(e)) if e.code() == Some(401) => {
                return Err(AgentError::Unauthorized(e.to_string()));
            }
            Err(e) => {
                tracing::warn!(node = %cfg.node_name, error = %e, retry_in = ?delay, "registering the node failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    tracing::info!(node = %cfg.node_name, "node registered");
    if let Some(root) = &cfg.bpf_root {
        let settings = skep_dataplane::lb::LbSettings {
            pin_root: root.clone(),
            ..Default::default()
        };
        match skep_dataplane::lb::KernelDatapath::open(settings)
            .and_then(skep_dataplane::lb::LoadBalancer::new)
        {
            Ok(lb) => {
                tracing::info!(pins = %root.display(), "service load balancer ready");
                tokio::spawn(services::run(client.clone(), lb, cfg.node_name.clone()));
            }
            Err(e) => {
                tracing::error!(error = %e, "the service load balancer could not start; services will not be programmed on this node")
            }
        }
    }
    if let Err(e) = renew_lease(&client, &cfg).await {
        tracing::warn!(node = %cfg.node_name, error = %e, "creating the node lease failed; retrying with the heartbeat");
    }
    let mut ticker = tokio::time::interval(HEARTBEAT);
    loop {
        ticker.tick().await;
        if let Err(e) = heartbeat(&client, &cfg).await {
            // A server restart or a network blip: keep trying.
            tracing::warn!(node = %cfg.node_name, error = %e, "heartbeat failed");
        }
    }
}

async fn heartbeat(client: &Client, cfg: &AgentConfig) -> Result<(), AgentError> {
    let status = node::status(cfg);
    match client
        .merge_patch(
            &format!("/api/v1/nodes/{}/status", cfg.node_name),
            &json!({"status": status}),
        )
        .await
    {
        Ok(_) => {}
        // Deleted by someone: register again.
        Err(e) if e.is_not_found() => node::register(client, cfg).await?,
        Err(e) => return Err(e.into()),
    }
    renew_lease(client, cfg).await
}

async fn renew_lease(client: &Client, cfg: &AgentConfig) -> Result<(), AgentError> {
    let path = format!(
        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{}",
        cfg.node_name
    );
    let spec = json!({"holderIdentity": cfg.node_name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_time()});
    match client.merge_patch(&path, &json!({"spec": spec})).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => {
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": cfg.node_name, "namespace": "kube-node-lease"},
                "spec": spec,
            });
            client
                .create(
                    "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                    &lease,
                )
                .await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
