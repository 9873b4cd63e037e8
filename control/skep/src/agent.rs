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
    /// This node's address as other nodes reach it (default: the address
    /// of the interface with the default route).
    #[arg(long, env = "SKEP_NODE_IP")]
    node_ip: Option<String>,
    /// bpffs directory for the dataplane's pinned maps and programs.
    #[arg(long, env = "SKEP_BPF_ROOT", default_value = "/sys/fs/bpf/skep")]
    bpf_root: PathBuf,
    /// Run the node without the eBPF dataplane.
    #[arg(long)]
    no_dataplane: bool,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// What a node (a remote agent, or the server's own) is configured with.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// The container runtime: the built-in process runtime (no daemon) or
    /// Docker.
    #[arg(long, value_enum, env = "SKEP_RUNTIME", default_value = "process")]
    pub runtime: RuntimeArg,
    /// Docker's API socket (with --runtime docker).
    #[arg(
        long,
        env = "SKEP_DOCKER_SOCKET",
        default_value = "/var/run/docker.sock"
    )]
    pub docker_socket: PathBuf,
    /// Port of the kubelet endpoint the apiserver calls for logs, exec and
    /// port-forward.
    #[arg(long, env = "SKEP_KUBELET_PORT", default_value_t = 10250)]
    pub kubelet_port: u16,
    /// Port of the flow observer (gRPC over TLS; only the apiserver reads
    /// it, for `skep ctl flows`); 0 picks a free port.
    #[arg(long, env = "SKEP_FLOWS_PORT", default_value_t = skep_kubelet::flows::DEFAULT_FLOWS_PORT)]
    pub flows_port: u16,
    /// Plain-HTTP listener for the flow counters (`GET /metrics`,
    /// Prometheus text: skep_flows_total); `off` disables it.
    #[arg(long, env = "SKEP_METRICS_LISTEN", default_value = "127.0.0.1:9962")]
    pub metrics_listen: MetricsListen,
    /// The cluster DNS address pods get in resolv.conf.
    #[arg(long, env = "SKEP_CLUSTER_DNS", default_value = "10.43.0.10")]
    pub cluster_dns: std::net::IpAddr,
    /// The cluster domain.
    #[arg(long, env = "SKEP_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Do not attach the NetworkPolicy early drop (XDP) to the interface
    /// holding the node IP; the pod hooks enforce policy either way.
    #[arg(long)]
    pub no_xdp_policy: bool,
    /// Size at which a container's log file is rotated, as the kubelet's
    /// containerLogMaxSize (`10Mi`, `500Ki`, `1G` or bytes).
    #[arg(long, env = "SKEP_CONTAINER_LOG_MAX_SIZE", default_value = "10Mi", value_parser = parse_size)]
    pub container_log_max_size: u64,
    /// Log files kept per container, the current one included
    /// (containerLogMaxFiles; at least 2).
    #[arg(long, env = "SKEP_CONTAINER_LOG_MAX_FILES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(2..))]
    pub container_log_max_files: u32,
    /// The Ingress proxy (ports 80/443) this node runs.
    #[command(flatten)]
    pub ingress: skep_ingress::IngressArgs,
}

/// `--metrics-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsListen(pub Option<std::net::SocketAddr>);

impl std::str::FromStr for MetricsListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        s.parse()
            .map(|a| Self(Some(a)))
            .map_err(|_| format!("{s:?} is not an address with a port (127.0.0.1:9962) or \"off\""))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeArg {
    Process,
    Docker,
}

impl NodeArgs {
    /// The kubelet's configuration for a node of this binary.
    pub fn config(
        &self,
        node_name: String,
        node_ip: String,
        data_dir: PathBuf,
        bpf_root: Option<PathBuf>,
        ca_pem: String,
        labels: Vec<(String, String)>,
    ) -> skep_kubelet::AgentConfig {
        skep_kubelet::AgentConfig {
            node_name,
            node_ip,
            labels,
            bpf_root,
            data_dir,
            runtime: match self.runtime {
                RuntimeArg::Process => skep_kubelet::RuntimeKind::Process,
                RuntimeArg::Docker => skep_kubelet::RuntimeKind::Docker,
            },
            kubelet_port: self.kubelet_port,
            flows_port: self.flows_port,
            metrics_listen: self.metrics_listen.0,
            cluster_dns: self.cluster_dns,
            cluster_domain: self.cluster_domain.clone(),
            ca_pem,
            shim_exe: None,
            docker_socket: Some(self.docker_socket.clone()),
            xdp_policy: !self.no_xdp_policy,
            log_rotation: skep_kubelet::runtime::logrotate::LogRotation {
                max_bytes: self.container_log_max_size,
                max_files: self.container_log_max_files as usize,
            },
        }
    }
}

/// A size with an optional binary (Ki, Mi, Gi) or decimal (K, M, G)
/// suffix, as Kubernetes quantities write them.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 10Mi, 500Ki, 1G or a number of bytes)"))?;
    let factor: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use Ki, Mi, Gi, K, M or G)"
            ));
        }
    };
    n.checked_mul(factor)
        .filter(|b| *b >= 1024)
        .ok_or_else(|| format!("{s:?}: the size must be between 1Ki and 16Ei"))
}

/// This machine's address as other machines see it: the address of the
/// interface that holds the default route, else the first global IPv4.
pub fn detect_node_ip() -> Option<String> {
    let route = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let default_iface = route.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"00000000")).then(|| f[0].to_owned())
    });
    let addrs: Vec<(String, std::net::Ipv4Addr)> = nix::ifaddrs::getifaddrs()
        .ok()?
        .filter_map(|a| {
            let ip = a.address?.as_sockaddr_in()?.ip();
            (!ip.is_loopback() && !ip.is_link_local()).then_some((a.interface_name, ip))
        })
        .collect();
    default_iface
        .and_then(|i| addrs.iter().find(|(n, _)| *n == i))
        .or_else(|| addrs.first())
        .map(|(_, ip)| ip.to_string())
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
    let node_ip = match args.node_ip.clone().or_else(detect_node_ip) {
        Some(ip) => ip,
        None => anyhow::bail!("could not find this machine's address; pass --node-ip"),
    };
    let cfg = args.node.config(
        node_name(args.node_name.clone()),
        node_ip,
        args.data_dir.clone(),
        (!args.no_dataplane).then(|| args.bpf_root.clone()),
        String::from_utf8_lossy(&ca).into_owned(),
        Vec::new(),
    );
    let _ingress = skep_ingress::spawn(client.clone(), &args.node.ingress, cfg.node_name.clone());
    skep_kubelet::run(client, cfg).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10Mi"), Ok(10 << 20));
        assert_eq!(parse_size("500Ki"), Ok(500 << 10));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("10Xi").unwrap_err().contains("unknown unit"));
        assert!(parse_size("Mi").unwrap_err().contains("not a size"));
        assert!(parse_size("10").unwrap_err().contains("between"));
    }
}
