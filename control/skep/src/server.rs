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
    /// How often history older than one interval is compacted.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    compaction_interval: Duration,
    /// Extra DNS names or IPs for the serving certificate.
    #[arg(long = "tls-san", value_delimiter = ',')]
    tls_sans: Vec<String>,
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
    if !args.no_agent {
        tracing::warn!(
            "this build has no node agent yet; running the control plane only (as with --no-agent)"
        );
    }
    let handle = skep_apiserver::serve(
        skep_apiserver::ServerConfig {
            listen: args.api_listen,
            data_dir: args.data_dir.clone(),
            extra_sans: args.tls_sans.clone(),
        },
        store,
    )
    .await?;
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
