//! `skep sidecar`: the proxy injected into meshed pods.

use crate::{
    ca_client::{CaClient, TokenSource},
    config::{DEFAULT_SERVER_FIRST_PORTS, Mode, SidecarConfig},
    identity::{self, IdentityStore},
    original_dst::{LocalAddrDst, NetfilterDst, StaticMeshedPeers},
    sidecar::{Seams, Sidecar},
};
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, clap::Args)]
pub struct SidecarArgs {
    /// The server's mesh CA (host:port), e.g. the API server's address
    /// with port 6445.
    #[arg(long, env = "SKEP_MESH_CA_ADDRESS")]
    pub ca_address: String,
    /// A name in the mesh CA's serving certificate (the API server's).
    #[arg(
        long,
        env = "SKEP_MESH_CA_SERVER_NAME",
        default_value = "kubernetes.default.svc"
    )]
    pub ca_server_name: String,
    /// The cluster CA the mesh CA's serving certificate chains to.
    #[arg(
        long,
        env = "SKEP_MESH_CLUSTER_CA",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    pub cluster_ca: PathBuf,
    /// The pod's projected service-account token (re-read at each renewal).
    #[arg(
        long,
        env = "SKEP_MESH_TOKEN",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub token: PathBuf,
    #[arg(long, env = "SKEP_MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    #[arg(long, default_value = "0.0.0.0:15006")]
    pub inbound_listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15001")]
    pub outbound_listen: SocketAddr,
    /// Metrics (/metrics), readiness (/ready) and liveness (/live).
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub admin_listen: SocketAddr,
    /// permissive: plaintext from unmeshed clients reaches the app;
    /// strict: refused.
    #[arg(long, value_enum, env = "SKEP_MESH_MODE", default_value = "permissive")]
    pub mode: Mode,
    /// Peer SPIFFE IDs allowed in (comma separated; empty: every identity
    /// of the trust domain).
    #[arg(long = "allow", env = "SKEP_MESH_ALLOW", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// Ports whose servers speak first: no protocol detection wait.
    #[arg(long, env = "SKEP_MESH_SERVER_FIRST_PORTS", value_delimiter = ',', default_values_t = DEFAULT_SERVER_FIRST_PORTS)]
    pub server_first_ports: Vec<u16>,
    /// App port for inbound plaintext that was not redirected.
    #[arg(long, env = "SKEP_MESH_INBOUND_DEFAULT_PORT")]
    pub inbound_default_port: Option<u16>,
    /// Meshed destinations (IPv4 addresses or CIDRs, comma separated);
    /// others are passed through in plaintext.
    #[arg(long, env = "SKEP_MESH_MESHED_PEERS", value_delimiter = ',')]
    pub meshed_peers: Vec<String>,
    /// Directory of the eBPF capture's pinned maps (SKEP_MESH_ORIG,
    /// SKEP_MESH_PODS): outbound destinations come from the connect4
    /// capture and local meshed pods from its table. Without it netfilter
    /// REDIRECT (SO_ORIGINAL_DST) is expected.
    #[arg(long, env = "SKEP_MESH_CAPTURE_MAPS")]
    pub capture_maps: Option<PathBuf>,
    /// Milliseconds to wait for an inbound client's first byte.
    #[arg(long, default_value_t = 100)]
    pub detect_timeout_ms: u64,
    /// Seconds open connections get to finish after SIGTERM.
    #[arg(long, env = "SKEP_MESH_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout_secs: u64,
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Runs until SIGTERM or SIGINT, then drains.
///
/// Meant for a current-thread runtime: one thread relays every connection
/// (no cross-thread wake-ups on the request path, one malloc arena).
pub async fn run(args: SidecarArgs) -> Result<(), Error> {
    crate::mem::single_malloc_arena();
    // Parsing the command line of a binary with every role's flags touched
    // code the sidecar never runs again: release it before the next phase
    // (getting the first certificate) adds its own, so the two never count
    // together at the peak.
    if let Err(e) = crate::mem::release_startup_code() {
        tracing::debug!(error = %e, "cannot release startup code");
    }
    let ca_pem = std::fs::read(&args.cluster_ca).map_err(|e| {
        format!(
            "cannot read the cluster CA {}: {e} (in a pod it is {SA_DIR}/ca.crt)",
            args.cluster_ca.display()
        )
    })?;
    let client = CaClient::new(
        &args.ca_address,
        &ca_pem,
        &args.ca_server_name,
        TokenSource::File(args.token.clone()),
    )?;
    let meshed = StaticMeshedPeers::parse(&args.meshed_peers)?;
    let config = SidecarConfig {
        inbound_listen: args.inbound_listen,
        outbound_listen: args.outbound_listen,
        admin_listen: args.admin_listen,
        trust_domain: args.trust_domain,
        mode: args.mode,
        allowed_peers: args.allow.into_iter().filter(|a| !a.is_empty()).collect(),
        server_first_ports: args.server_first_ports,
        detect_timeout: Duration::from_millis(args.detect_timeout_ms),
        inbound_default_port: args.inbound_default_port,
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        ..SidecarConfig::default()
    };
    let identity = IdentityStore::new();
    let renewal = identity::spawn_renewal(identity.clone(), Arc::new(client));
    // Until the eBPF capture provides its map, netfilter's REDIRECT is the
    // supported outbound capture.
    let seams = match &args.capture_maps {
        // The eBPF capture ([mesh] part 2): its map and pod table.
        Some(dir) => Seams {
            outbound_dst: Arc::new(crate::original_dst::BpfOrigDst::open(dir)?),
            inbound_dst: Arc::new(LocalAddrDst),
            meshed: Arc::new(crate::original_dst::BpfMeshedPeers::open(dir, meshed)?),
        },
        None => Seams {
            outbound_dst: Arc::new(NetfilterDst),
            inbound_dst: Arc::new(LocalAddrDst),
            meshed: Arc::new(meshed),
        },
    };
    let sidecar = Sidecar::start(config, identity.clone(), seams).await?;
    tokio::spawn(release_startup_code_when_ready(identity));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: draining"),
    }
    let cut = sidecar.drain().await;
    renewal.abort();
    tracing::info!(cut, "sidecar stopped");
    Ok(())
}

/// Once the first certificate is in, the startup code (argument parsing,
/// the gRPC client, key generation) is not needed again until the renewal
/// hours later: drop it from the page tables (see [`crate::mem`]).
async fn release_startup_code_when_ready(identity: Arc<IdentityStore>) {
    let mut generation = identity.subscribe();
    while !identity.is_ready() {
        if generation.changed().await.is_err() {
            return;
        }
    }
    // Let the first probes and handshakes that follow readiness finish.
    tokio::time::sleep(Duration::from_secs(1)).await;
    match crate::mem::release_startup_code() {
        Ok(bytes) => tracing::debug!(bytes, "startup code released"),
        Err(e) => tracing::debug!(error = %e, "cannot release startup code"),
    }
}
