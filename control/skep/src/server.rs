//! `skep server`: the control plane on one machine.

use anyhow::{Context, Result};
use skep_store::{Compactor, EtcdOptions, EtcdStore, SqliteStore, Store};
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// Embedded SQLite in DATA_DIR/state.db (single server).
    Sqlite,
    /// A real etcd cluster (HA).
    Etcd,
}

#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Directory for the store, certificates, tokens and kubeconfig.
    #[arg(long, env = "SKEP_DATA_DIR", default_value = "/var/lib/skep/server")]
    data_dir: PathBuf,
    /// Address of the HTTPS API.
    #[arg(long, env = "SKEP_API_LISTEN", default_value = "0.0.0.0:6443")]
    api_listen: SocketAddr,
    /// Where cluster state lives.
    #[arg(long, value_enum, env = "SKEP_STORE", default_value = "sqlite")]
    store: StoreKind,
    /// etcd client URLs, comma separated (with --store etcd).
    #[arg(long, env = "SKEP_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Do not run a node (kubelet, dataplane) in this process.
    #[arg(long)]
    no_agent: bool,
    /// Name of this server's node (default: the host name).
    #[arg(long, env = "SKEP_NODE_NAME")]
    node_name: Option<String>,
    /// Address of this server's node (default: the API listen address).
    #[arg(long, env = "SKEP_NODE_IP")]
    node_ip: Option<String>,
    /// bpffs directory for this node's dataplane pins.
    #[arg(long, env = "SKEP_BPF_ROOT", default_value = "/sys/fs/bpf/skep")]
    bpf_root: PathBuf,
    /// Run this server's node without the eBPF dataplane.
    #[arg(long)]
    no_dataplane: bool,
    /// How often history older than one interval is compacted.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    compaction_interval: Duration,
    /// How long a node may go without a heartbeat before it is marked
    /// unreachable and its pods are evicted.
    #[arg(long, env = "SKEP_NODE_MONITOR_GRACE_PERIOD", default_value = "40s", value_parser = parse_duration)]
    node_monitor_grace_period: Duration,
    /// Terminated pods (Succeeded/Failed) kept before the oldest are
    /// deleted; 0 keeps them all.
    #[arg(long, default_value_t = 12_500)]
    terminated_pod_gc_threshold: usize,
    /// How long a security identity no pod uses is kept before it is
    /// deleted (flows and conntrack entries naming it settle first).
    #[arg(long, env = "SKEP_IDENTITY_GC_GRACE", default_value = "60s", value_parser = parse_duration)]
    identity_gc_grace: Duration,
    /// Extra DNS names or IPs for the serving certificate.
    #[arg(long = "tls-san", value_delimiter = ',')]
    tls_sans: Vec<String>,
    /// Serve the cluster DNS (UDP and TCP) on this address, e.g.
    /// 127.0.0.1:5353. With a node agent it defaults to 0.0.0.0:10053, and
    /// the `kube-dns` Service (10.43.0.10:53) points at this node's address
    /// and that port.
    #[arg(long, env = "SKEP_DNS_LISTEN")]
    dns_listen: Option<SocketAddr>,
    /// Serve the cluster DNS's Prometheus metrics (GET /metrics) here, as
    /// CoreDNS does on :9153; `off` for none.
    #[arg(
        long,
        env = "SKEP_DNS_METRICS_LISTEN",
        default_value = "127.0.0.1:9153"
    )]
    dns_metrics_listen: skep_dns::MetricsListen,
    #[command(flatten)]
    node: crate::agent::NodeArgs,
    #[command(flatten)]
    mesh: crate::mesh_ca::MeshCaArgs,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m or 1h"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    })
}

pub async fn run(args: ServerArgs) -> Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
    let store: Arc<dyn Store> = match args.store {
        StoreKind::Sqlite => Arc::new(SqliteStore::open(args.data_dir.join("state.db"))?),
        StoreKind::Etcd => {
            if args.etcd_endpoints.is_empty() {
                anyhow::bail!("--store etcd needs --etcd-endpoints (e.g. http://127.0.0.1:2379)");
            }
            Arc::new(EtcdStore::connect(EtcdOptions::new(args.etcd_endpoints.clone())).await?)
        }
    };
    let _compactor = Compactor::spawn(store.clone(), args.compaction_interval);
    let dns_listen = args
        .dns_listen
        .or_else(|| (!args.no_agent).then(|| SocketAddr::from(([0, 0, 0, 0], 10053))));
    let _dns = match dns_listen {
        Some(listen) => {
            let mut config = skep_dns::DnsConfig::new(listen);
            config.zone = args.node.cluster_domain.clone();
            config.metrics_listen = args.dns_metrics_listen.0;
            Some(skep_dns::start(config, store.clone()).await?)
        }
        None => None,
    };
    crate::bootstrap::before_start(store.as_ref(), &args.data_dir).await?;
    let handle = skep_apiserver::serve(
        skep_apiserver::ServerConfig {
            listen: args.api_listen,
            data_dir: args.data_dir.clone(),
            extra_sans: args.tls_sans.clone(),
        },
        store.clone(),
    )
    .await?;
    crate::bootstrap::after_start(store.as_ref(), &args.data_dir).await?;
    // Workload certificates for meshed pods (issue [mesh]).
    let _mesh_ca =
        crate::mesh_ca::start(&args.mesh, store.as_ref(), &args.data_dir, &handle).await?;
    if let Some(dns) = &_dns {
        // Readiness includes cluster DNS answering for a Service.
        let (addr, zone) = (dns.local_addr(), args.node.cluster_domain.clone());
        handle.health.register(
            "dns",
            Arc::new(move || {
                let zone = zone.clone();
                Box::pin(async move { crate::dns_check::check(addr, &zone).await })
            }),
        );
    }
    // The scheduler and controllers, in process on the same `Api` (every
    // write validated and defaulted as a client's); a Lease elects the one
    // active set when several servers share a store.
    let _controllers = skep_controllers::Manager::spawn(
        handle.api.clone(),
        skep_controllers::ManagerOptions {
            node_monitor_grace: args.node_monitor_grace_period,
            metrics: Some(handle.metrics_source.clone()),
            pod_gc: skep_controllers::podgc::PodGcOptions {
                terminated_threshold: args.terminated_pod_gc_threshold,
                ..Default::default()
            },
            security_identities: skep_controllers::identity::IdentityOptions {
                grace: args.identity_gc_grace,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    // Auto-applied manifests (DATA_DIR/manifests), through the API with
    // the admin's credentials like any client.
    let manifests_dir = args.data_dir.join("manifests");
    std::fs::create_dir_all(&manifests_dir)
        .with_context(|| format!("creating {}", manifests_dir.display()))?;
    crate::storage_defaults::write(&manifests_dir)?;
    skep_ingress::write_class_manifest(&manifests_dir)
        .context("writing the IngressClass add-on")?;
    let admin = {
        let port = handle.local_addr.port();
        let host = if handle.local_addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            handle.local_addr.ip().to_string()
        };
        skep_client::Client::new(
            &format!("https://{host}:{port}"),
            handle.credentials.ca_cert_pem.as_bytes(),
            skep_client::Auth::Token(handle.credentials.admin_token.clone()),
        )?
    };
    // The server's own node, unless --no-agent: the agent talks to this
    // API over loopback with the node join token, as a remote agent would.
    let _agent = if args.no_agent {
        None
    } else {
        let port = handle.local_addr.port();
        let host = if handle.local_addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            handle.local_addr.ip().to_string()
        };
        let client = skep_client::Client::new(
            &format!("https://{host}:{port}"),
            handle.credentials.ca_cert_pem.as_bytes(),
            skep_client::Auth::Token(handle.credentials.node_token.clone()),
        )?;
        let node_ip = match args
            .node_ip
            .clone()
            .or_else(|| (!handle.local_addr.ip().is_unspecified()).then(|| host.clone()))
            .or_else(crate::agent::detect_node_ip)
        {
            Some(ip) => ip,
            None => anyhow::bail!("could not find this machine's address; pass --node-ip"),
        };
        if let Some(dns) = &_dns {
            // The port actually bound (the flag may say :0).
            let port = dns.local_addr().port();
            let file = manifests_dir.join(crate::kube_dns::MANIFEST);
            let doc = crate::kube_dns::manifest(&node_ip, port, args.node.cluster_dns);
            std::fs::write(&file, serde_json::to_vec_pretty(&doc)?)
                .with_context(|| format!("writing {}", file.display()))?;
        }
        let cfg = args.node.config(
            crate::agent::node_name(args.node_name.clone()),
            node_ip,
            args.data_dir.join("agent"),
            (!args.no_dataplane).then(|| args.bpf_root.clone()),
            handle.credentials.ca_cert_pem.clone(),
            vec![(
                "node-role.kubernetes.io/control-plane".into(),
                "true".into(),
            )],
        );
        let _ingress =
            skep_ingress::spawn(client.clone(), &args.node.ingress, cfg.node_name.clone());
        Some(tokio::spawn(async move {
            if let Err(e) = skep_kubelet::run(client, cfg).await {
                tracing::error!(error = %e, "node agent stopped");
            }
        }))
    };
    // status.loadBalancer of skep's Ingresses (the one writer).
    let _ingress_status = skep_ingress::status::spawn(admin.clone());
    // After the add-ons are written, so the first pass applies them.
    let _manifests = crate::manifests::spawn(admin, manifests_dir);
    eprintln!(
        "skep server ready on https://{}; export KUBECONFIG={}",
        handle.local_addr,
        std::fs::canonicalize(&handle.credentials.kubeconfig_path)
            .unwrap_or(handle.credentials.kubeconfig_path.clone())
            .display()
    );
    tokio::select! {
        _ = handle.wait() => Ok(()),
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted; shutting down");
            Ok(())
        }
    }
}
