//! `skep agent`: a node joining a server with the node token.

use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// URL of the server's API, e.g. https://10.0.0.1:6443.
    #[arg(long, env = "SKEP_SERVER")]
    server: String,
    /// Node join token (the server writes it to DATA_DIR/node-token).
    #[arg(long, env = "SKEP_TOKEN")]
    token: String,
    /// The agent's state directory.
    #[arg(long, env = "SKEP_DATA_DIR", default_value = "/var/lib/skep/agent")]
    data_dir: PathBuf,
    /// The cluster CA certificate (the server's DATA_DIR/tls/ca.crt);
    /// default DATA_DIR/ca.crt.
    #[arg(long, env = "SKEP_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Node name (default: the host name).
    #[arg(long, env = "SKEP_NODE_NAME")]
    node_name: Option<String>,
    /// This node's address as other nodes reach it.
    #[arg(long, env = "SKEP_NODE_IP", default_value = "127.0.0.1")]
    node_ip: String,
    /// bpffs directory for the dataplane's pinned maps and programs.
    #[arg(long, env = "SKEP_BPF_ROOT", default_value = "/sys/fs/bpf/skep")]
    bpf_root: PathBuf,
    /// Run the node without the eBPF dataplane.
    #[arg(long)]
    no_dataplane: bool,
}

/// The node name to use: given, else the host name.
pub fn node_name(given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_lowercase())
            .unwrap_or_else(|_| "node".into())
    })
}

pub async fn run(args: AgentArgs) -> Result<()> {
    let ca_file = args
        .ca_file
        .clone()
        .unwrap_or_else(|| args.data_dir.join("ca.crt"));
    let ca = std::fs::read(&ca_file).with_context(|| {
        format!(
            "reading the cluster CA {}: copy the server's DATA_DIR/tls/ca.crt there or pass --ca-file",
            ca_file.display()
        )
    })?;
    let client = skep_client::Client::new(
        &args.server,
        &ca,
        skep_client::Auth::Token(args.token.clone()),
    )?;
    let cfg = skep_kubelet::AgentConfig {
        node_name: node_name(args.node_name.clone()),
        node_ip: args.node_ip.clone(),
        labels: Vec::new(),
        bpf_root: (!args.no_dataplane).then(|| args.bpf_root.clone()),
    };
    skep_kubelet::run(client, cfg).await?;
    Ok(())
}
