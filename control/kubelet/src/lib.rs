//! skep's node agent (the kubelet side of a node).
//!
//! - `node`: registration (capacity, allocatable, addresses, nodeInfo,
//!   conditions) and heartbeats: the Node status and a Lease in
//!   `kube-node-lease`, both every 10 s; Ready follows the runtime's health.
//! - `pods`: the pod manager (sandboxes, containers, probes, status).
//! - `runtime`: the container runtime seam and its implementations.
//! - `network`: pod networking on this node (IPAM + the dataplane's veth
//!   and namespace plumbing + the load balancer's hooks on each pod).
//! - `services`: Services and EndpointSlices → the eBPF load balancer.
//! - `server`: the kubelet's HTTPS endpoint for logs/exec/attach/port-forward.
//! - `stats`: per-container, per-pod and node CPU/memory usage, served at
//!   the kubelet endpoint's `/stats/summary`.
//! - `flows`: the flow observer (gRPC, for the API server's relay) and the
//!   flow counters.
//! - `storage`: the node's local-path volume provisioner and deleter.
//! - `policy`: NetworkPolicy → identities, ipcache and allow rules in the
//!   kernel's policy maps.

mod conntrack_gc;
pub mod dataplane_status;
pub mod flows;
pub mod ipam;
mod json;
pub mod masquerade;
pub mod mesh;
pub mod network;
pub mod node;
pub mod pods;
pub mod policy;
pub mod probe;
pub mod routes;
pub mod runtime;
pub mod server;
pub mod services;
pub mod stats;
pub mod storage;
pub mod streams;
pub mod xdp;

use serde_json::json;
use skep_client::Client;
use std::{sync::Arc, time::Duration};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Api(#[from] skep_client::ClientError),
    /// The node could not be set up (runtime, directories, endpoint).
    #[error("{0}")]
    Setup(String),
    #[error(
        "the server refused the node token ({0}); use the token in the server's DATA_DIR/node-token"
    )]
    Unauthorized(String),
}

/// Which container runtime runs this node's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    /// Built in: each container a process in its own namespaces.
    Process,
    /// A Docker daemon, through its API.
    Docker,
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
    /// The agent's state directory (containers, pods, logs, IPAM).
    pub data_dir: std::path::PathBuf,
    pub runtime: RuntimeKind,
    /// Port of the kubelet endpoint (logs/exec/port-forward).
    pub kubelet_port: u16,
    /// Port of the flow observer (gRPC, TLS, API server only; 0 picks a
    /// free port); advertised in the Node annotation `skep.io/flows-port`.
    pub flows_port: u16,
    /// Plain-HTTP listener for the flow counters (`GET /metrics`); `None`:
    /// not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The cluster DNS service address written into pods' resolv.conf.
    pub cluster_dns: std::net::IpAddr,
    pub cluster_domain: String,
    /// The cluster CA (PEM): verifies the apiserver's client certificate
    /// on the kubelet endpoint and goes into pods' ca.crt.
    pub ca_pem: String,
    /// The `skep` binary the process runtime runs as each container's shim
    /// (default: this executable).
    pub shim_exe: Option<std::path::PathBuf>,
    /// Docker's API socket (with `RuntimeKind::Docker`).
    pub docker_socket: Option<std::path::PathBuf>,
    /// Attach the NetworkPolicy early drop (XDP) to the interface holding
    /// `node_ip` (with the dataplane).
    pub xdp_policy: bool,
    /// Container log rotation (containerLogMaxSize / containerLogMaxFiles).
    pub log_rotation: runtime::logrotate::LogRotation,
}

const HEARTBEAT: Duration = Duration::from_secs(10);
const LEASE_SECONDS: i64 = 40;

fn micro_time() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The NotReady reason between registration and the dataplane's start.
const DATAPLANE_STARTING: &str = "the eBPF dataplane is starting";

/// What the heartbeat reports about the node's health.
#[derive(Clone)]
struct Health {
    runtime: Arc<dyn runtime::Runtime>,
    runtime_version: String,
    dataplane_error: Option<String>,
}

impl Health {
    async fn node_health(&self) -> node::NodeHealth {
        let problem = match self.runtime.health().await {
            Err(e) => Some(format!("container runtime is down: {e}")),
            Ok(()) => self.dataplane_error.clone(),
        };
        node::NodeHealth {
            not_ready: problem,
            runtime_version: self.runtime_version.clone(),
        }
    }
}

async fn make_runtime(cfg: &AgentConfig) -> Result<Arc<dyn runtime::Runtime>, AgentError> {
    match cfg.runtime {
        RuntimeKind::Process => {
            let shim = match &cfg.shim_exe {
                Some(p) => p.clone(),
                None => std::env::current_exe().map_err(|e| {
                    AgentError::Setup(format!("finding the skep binary for the shim: {e}"))
                })?,
            };
            let rt =
                runtime::process::ProcessRuntime::new(runtime::process::ProcessRuntimeConfig {
                    state_dir: cfg.data_dir.join("containers"),
                    image_cache: cfg.data_dir.join("images"),
                    shim_exe: shim,
                    cgroup_parent: format!("skep-{}", cfg.node_name),
                    log_rotation: cfg.log_rotation,
                })
                .map_err(|e| AgentError::Setup(e.to_string()))?;
            Ok(Arc::new(rt))
        }
        RuntimeKind::Docker => {
            let socket = cfg
                .docker_socket
                .clone()
                .unwrap_or_else(|| "/var/run/docker.sock".into());
            let rt = runtime::docker::DockerRuntime::connect(&socket)
                .await
                .map_err(|e| AgentError::Setup(e.to_string()))?
                .with_log_rotation(cfg.log_rotation);
            Ok(Arc::new(rt))
        }
    }
}

/// The node's pod CIDR, once the server has assigned it.
async fn pod_cidr(client: &Client, node: &str) -> Result<(std::net::Ipv4Addr, u8), AgentError> {
    let mut delay = Duration::from_millis(100);
    loop {
        let n = client.get(&format!("/api/v1/nodes/{node}")).await?;
        if let Some((ip, len)) = n
            .pointer("/spec/podCIDR")
            .and_then(serde_json::Value::as_str)
            .and_then(|c| c.split_once('/'))
            && let (Ok(ip), Ok(len)) = (ip.parse(), len.parse())
        {
            return Ok((ip, len));
        }
        tracing::info!(
            node,
            "waiting for the server to assign this node a pod CIDR"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Registers the node, starts the runtime, pod manager, dataplane and
/// kubelet endpoint, then keeps the node's status and Lease fresh; returns
/// only on a fatal error.
pub async fn run(client: Client, cfg: AgentConfig) -> Result<(), AgentError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        AgentError::Setup(format!(
            "creating the agent directory {}: {e}",
            cfg.data_dir.display()
        ))
    })?;
    let rt = make_runtime(&cfg).await?;
    // [mesh] what sidecar injection and the capture need from this node.
    mesh::configure(mesh::MeshNodeConfig {
        pin_root: cfg.bpf_root.clone(),
        cgroup_parent: matches!(cfg.runtime, RuntimeKind::Process)
            .then(|| format!("skep-{}", cfg.node_name)),
        ca_address: mesh::ca_address_for(client.server(), &cfg.node_ip),
    });
    let runtime_version = rt
        .version()
        .await
        .unwrap_or_else(|e| format!("{}://unavailable ({e})", rt.name()));
    // A new node with a dataplane registers NotReady until its programs
    // are loaded: pods scheduled before that would run without Services
    // or policy. A node that exists already is an agent restart: its
    // programs and maps stay pinned and keep working meanwhile, and a
    // NotReady flash would have its pods evicted by the not-ready taint.
    let known = client
        .get(&format!("/api/v1/nodes/{}", cfg.node_name))
        .await
        .is_ok();
    let mut health = Health {
        runtime: rt.clone(),
        runtime_version,
        dataplane_error: (cfg.bpf_root.is_some() && !known).then(|| DATAPLANE_STARTING.to_owned()),
    };
    // The server may not be up yet (or may still be loading): retry.
    let mut delay = Duration::from_millis(200);
    loop {
        match node::register(&client, &cfg, &health.node_health().await).await {
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
    let (cidr_ip, cidr_len) = pod_cidr(&client, &cfg.node_name).await?;
    if cfg.bpf_root.is_some() {
        // Pods' traffic leaving the cluster goes out with the node address.
        match masquerade::install((cidr_ip, cidr_len)) {
            Ok(()) => {
                tracing::info!(pod_cidr = %format!("{cidr_ip}/{cidr_len}"), "pod egress masqueraded")
            }
            Err(e) => tracing::warn!(error = %e, "pods cannot reach addresses outside the cluster"),
        }
    }
    let mut lb: Option<network::SharedLb> = None;
    // The names behind the numbers of the applied NetworkPolicy state (for
    // the flows service); `None` without a dataplane.
    let mut policy_snapshots: Option<tokio::sync::watch::Receiver<Arc<policy::PolicySnapshot>>> =
        None;
    if let Some(root) = &cfg.bpf_root {
        let settings = skep_dataplane::lb::LbSettings {
            pin_root: root.clone(),
            ..Default::default()
        };
        match skep_dataplane::lb::KernelDatapath::open(settings)
            .and_then(skep_dataplane::lb::LoadBalancer::new)
        {
            Ok(mut l) => {
                tracing::info!(pins = %root.display(), "service load balancer ready");
                // NodePorts on the node address, and the hooks that serve
                // them (with SNAT to remote backends) on its interface.
                xdp::attach_lb_external(&mut l, &cfg.node_ip);
                let shared = Arc::new(std::sync::Mutex::new(l));
                // [mesh] other nodes' meshed pods into SKEP_MESH_PODS.
                tokio::spawn(mesh::peers::run(
                    client.clone(),
                    cfg.node_name.clone(),
                    root.clone(),
                ));
                tokio::spawn(services::run(
                    client.clone(),
                    shared.clone(),
                    cfg.node_name.clone(),
                ));
                tokio::spawn(conntrack_gc::run(shared.clone()));
                tokio::spawn(dataplane_status::run(
                    client.clone(),
                    cfg.node_name.clone(),
                    root.clone(),
                ));
                lb = Some(shared);
                // NetworkPolicy: its maps are pinned by the loader above.
                match skep_dataplane::policy::KernelPolicy::open(root) {
                    Ok(k) => {
                        policy_snapshots = Some(policy::spawn(
                            client.clone(),
                            cfg.node_name.clone(),
                            Box::new(k),
                        ));
                        // The early drop needs the policy maps above; the
                        // pod hooks enforce without it.
                        if cfg.xdp_policy {
                            let attached = xdp::attach_external(root, &cfg.node_ip);
                            if let Some(l) = &lb {
                                xdp::choose_xdp_lb(l, attached.as_ref().map(|(i, _)| i.as_str()));
                            }
                        } else {
                            xdp::detach_external(root, &cfg.node_ip);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "network policy could not start; policies will not be enforced on this node");
                        health.dataplane_error =
                            Some(format!("network policy could not start: {e}"));
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "the service load balancer could not start; services will not be programmed on this node");
                health.dataplane_error = Some(format!("the eBPF dataplane could not start: {e}"));
            }
        }
    }
    if health.dataplane_error.as_deref() == Some(DATAPLANE_STARTING) {
        health.dataplane_error = None;
    }
    // The flows service reads the kernel's flow events (once per node: the
    // ring buffer has one consumer) when the dataplane runs.
    let flow_input = match cfg.bpf_root.as_deref() {
        Some(root) if health.dataplane_error.is_none() => flows::kernel_flows(root)
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "flow events cannot be read; `skep ctl flows` will show none from this node");
                tokio::sync::mpsc::channel(1).1
            }),
        _ => tokio::sync::mpsc::channel(1).1,
    };
    let ipam = ipam::Ipam::open(cfg.data_dir.join("ipam.json"), cidr_ip, cidr_len)
        .map_err(|e| AgentError::Setup(e.to_string()))?;
    let net =
        Arc::new(network::NodeNetwork::new(ipam, lb, 1500).with_node_ip(cfg.node_ip.parse().ok()));
    let node_ip: std::net::IpAddr = cfg.node_ip.parse().map_err(|_| {
        AgentError::Setup(format!("--node-ip {:?} is not an IP address", cfg.node_ip))
    })?;
    let manager = pods::PodManager::spawn(
        client.clone(),
        rt.clone(),
        net,
        pods::PodManagerConfig {
            node_name: cfg.node_name.clone(),
            node_ip,
            data_dir: cfg.data_dir.clone(),
            dns: pods::dnsconf::ClusterDns {
                server: cfg.cluster_dns,
                domain: cfg.cluster_domain.clone(),
            },
            node: node::facts(),
            cluster_ca_pem: cfg.ca_pem.clone(),
        },
    );
    let listen = std::net::SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        cfg.kubelet_port,
    );
    let _kubelet = server::serve(
        listen,
        cfg.ca_pem.as_bytes(),
        &cfg.data_dir,
        manager.streams(),
    )
    .await
    .map_err(|e| AgentError::Setup(format!("serving the kubelet endpoint on {listen}: {e}")))?;
    // Resource usage for metrics.k8s.io (`kubectl top`, the HPA).
    let _stats = match stats::StatsCollector::for_agent(&cfg, rt.clone()) {
        Ok(collector) => {
            _kubelet.set_stats(collector.clone());
            Some(collector.spawn())
        }
        Err(e) => {
            tracing::warn!(error = %e, "resource usage will not be reported by this node");
            None
        }
    };
    // Advertise the port actually bound (`--kubelet-port 0` picks one).
    let mut cfg = cfg;
    cfg.kubelet_port = _kubelet.local_addr().port();
    // Names for the flows: the policy state's, else (no dataplane) none.
    let snapshots =
        policy_snapshots.unwrap_or_else(|| tokio::sync::watch::channel(Arc::default()).1);
    // Binds, sets `cfg.flows_port` to the bound port and advertises it.
    let _flows = flows::start(&client, &mut cfg, flow_input, snapshots).await;
    if let Err(e) = heartbeat(&client, &cfg, &health.node_health().await).await {
        tracing::warn!(node = %cfg.node_name, error = %e, "posting the node status failed; retrying with the heartbeat");
    }
    tokio::spawn(routes::run(client.clone(), cfg.node_name.clone()));
    // local-path volumes on this node (DATA/storage) and the volumes pods'
    // claims resolve to.
    tokio::spawn(storage::run(
        client.clone(),
        cfg.node_name.clone(),
        cfg.data_dir.join("storage"),
    ));
    if let Err(e) = renew_lease(&client, &cfg).await {
        tracing::warn!(node = %cfg.node_name, error = %e, "creating the node lease failed; retrying with the heartbeat");
    }
    let mut ticker = tokio::time::interval(HEARTBEAT);
    loop {
        ticker.tick().await;
        let h = health.node_health().await;
        if let Err(e) = heartbeat(&client, &cfg, &h).await {
            // A server restart or a network blip: keep trying.
            tracing::warn!(node = %cfg.node_name, error = %e, "heartbeat failed");
        }
    }
}

async fn heartbeat(
    client: &Client,
    cfg: &AgentConfig,
    health: &node::NodeHealth,
) -> Result<(), AgentError> {
    let status = node::status(cfg, health);
    match client
        .merge_patch(
            &format!("/api/v1/nodes/{}/status", cfg.node_name),
            &json!({"status": status}),
        )
        .await
    {
        Ok(_) => {}
        // Deleted by someone: register again.
        Err(e) if e.is_not_found() => node::register(client, cfg, health).await?,
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
