//! The Node object: registration and the status the agent reports.

use crate::{AgentConfig, AgentError};
use serde_json::{Value, json};
use skep_client::Client;

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn memory_kib() -> u64 {
    read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn os_image() -> String {
    read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| "Linux".into())
}

fn uname_release() -> String {
    read("/proc/sys/kernel/osrelease").trim().to_owned()
}

/// What the agent knows about its own health at a heartbeat.
#[derive(Debug, Clone, Default)]
pub struct NodeHealth {
    /// Why the node cannot run pods now (None: Ready).
    pub not_ready: Option<String>,
    /// `skep-process://0.1.0`, `docker://28.2.2`.
    pub runtime_version: String,
}

/// CPU and memory of this machine, for the downward API's defaults.
pub fn facts() -> crate::pods::env::NodeFacts {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    crate::pods::env::NodeFacts {
        cpu_millis: cpus * 1000,
        memory_bytes: memory_kib() * 1024,
    }
}

/// The status the agent posts.
pub fn status(cfg: &AgentConfig, health: &NodeHealth) -> Value {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = format!("{}Ki", memory_kib());
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let condition = |t: &str, s: &str, reason: &str, message: &str| {
        json!({"type": t, "status": s, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    let ready = match health.not_ready.as_deref() {
        None => condition(
            "Ready",
            "True",
            "KubeletReady",
            "skep agent is posting ready status",
        ),
        Some(why) => condition("Ready", "False", "KubeletNotReady", why),
    };
    json!({
        "capacity": {"cpu": cpus.to_string(), "memory": mem, "pods": "110", "ephemeral-storage": "0"},
        "allocatable": {"cpu": cpus.to_string(), "memory": mem, "pods": "110", "ephemeral-storage": "0"},
        "addresses": [
            {"type": "InternalIP", "address": cfg.node_ip},
            {"type": "Hostname", "address": cfg.node_name},
        ],
        // Where the apiserver reaches this node's logs/exec/port-forward.
        "daemonEndpoints": {"kubeletEndpoint": {"Port": cfg.kubelet_port}},
        "nodeInfo": {
            "machineID": read("/etc/machine-id").trim(),
            "systemUUID": read("/sys/class/dmi/id/product_uuid").trim(),
            "bootID": read("/proc/sys/kernel/random/boot_id").trim(),
            "kernelVersion": uname_release(),
            "osImage": os_image(),
            "containerRuntimeVersion": health.runtime_version,
            "kubeletVersion": "v1.31.0-skep",
            "kubeProxyVersion": "v1.31.0-skep",
            "operatingSystem": "linux",
            "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        },
        "conditions": [
            ready,
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        ],
    })
}

/// Creates the Node if it does not exist (the server assigns its pod CIDR)
/// and posts its first status.
pub async fn register(
    client: &Client,
    cfg: &AgentConfig,
    health: &NodeHealth,
) -> Result<(), AgentError> {
    let path = format!("/api/v1/nodes/{}", cfg.node_name);
    match client.get(&path).await {
        Ok(_) => {}
        Err(e) if e.is_not_found() => {
            let mut labels = serde_json::Map::new();
            labels.insert("kubernetes.io/hostname".into(), json!(cfg.node_name));
            labels.insert("kubernetes.io/os".into(), json!("linux"));
            labels.insert("kubernetes.io/arch".into(), json!("amd64"));
            for (k, v) in &cfg.labels {
                labels.insert(k.clone(), json!(v));
            }
            let mut annotations = serde_json::Map::new();
            if cfg.flows_port != 0 {
                annotations.insert(
                    crate::flows::FLOWS_PORT_ANNOTATION.into(),
                    json!(cfg.flows_port.to_string()),
                );
            }
            let node = json!({"apiVersion": "v1", "kind": "Node",
                              "metadata": {"name": cfg.node_name, "labels": labels, "annotations": annotations}, "spec": {}});
            match client.create("/api/v1/nodes", &node).await {
                Ok(_) => {}
                Err(e) if e.is_conflict() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(e) => return Err(e.into()),
    }
    client
        .merge_patch(
            &format!("{path}/status"),
            &json!({"status": status(cfg, health)}),
        )
        .await?;
    Ok(())
}

/// Advertises the flow observer's port in the Node annotation the API
/// server's flow relay reads; `None` removes it (no observer here).
pub async fn advertise_flows_port(
    client: &Client,
    node_name: &str,
    port: Option<u16>,
) -> Result<(), AgentError> {
    let value = port.map_or(Value::Null, |p| json!(p.to_string()));
    client
        .merge_patch(
            &format!("/api/v1/nodes/{node_name}"),
            &json!({"metadata": {"annotations": {crate::flows::FLOWS_PORT_ANNOTATION: value}}}),
        )
        .await?;
    Ok(())
}
