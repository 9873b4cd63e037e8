//! The flow observer: what the eBPF dataplane reports about connections
//! and drops on this node, kept and served to the API server.
//!
//! ```text
//! dataplane flows ─mpsc─▶ ingest ─▶ enrich (PolicySnapshot) ─▶ store (ring of 8192 + live broadcast)
//!                            └─▶ metrics (skep_flows_total)        │
//! apiserver ──gRPC/TLS, client cert CN skep:apiserver──▶ service ◀─┘ (filter, since, first/last, follow)
//! ```
//!
//! - `input`: the raw flow records (the dataplane's) and the pump from the
//!   kernel's ring buffer.
//! - `enrich`: raw flow + the policy snapshot → the served [`proto::Flow`]
//!   (pod names, identity labels, policy names, TCP flag names).
//! - `store`: the ring of recent flows and the live feed.
//! - `filter`: the request's filters.
//! - `service`: the `skep.flows.v1.Observer` gRPC service over TLS.
//! - `metrics`: Prometheus counters, served on a plain-HTTP listener.

mod enrich;
pub mod filter;
mod input;
pub mod metrics;
mod service;
mod store;

pub use enrich::enrich;
pub use input::{DropReason, Flow, FlowVerdict, Observation, kernel_flows};
pub use metrics::FlowMetrics;
pub use service::{FlowObserver, FlowsConfig, serve};
pub use store::{FlowStore, RING_CAPACITY};

/// The generated protobuf messages, server and client (`proto/flows.proto`).
pub mod proto {
    #![allow(missing_debug_implementations, clippy::all)]
    tonic::include_proto!("skep.flows.v1");
}

/// The Node annotation that advertises the observer's port (the API
/// server's relay dials the node's InternalIP on it).
pub const FLOWS_PORT_ANNOTATION: &str = "skep.io/flows-port";

/// Default port of the observer (Hubble's).
pub const DEFAULT_FLOWS_PORT: u16 = 4244;

#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("flow observer TLS: {0}")]
    Tls(String),
}

/// Starts the observer for the agent `run()` and advertises it: serves on
/// `0.0.0.0:cfg.flows_port` (and the metrics listener), sets
/// `cfg.flows_port` to the bound port and writes the Node annotation
/// (re-registrations carry it from `cfg`). A port that cannot be bound is
/// logged and the node runs without flows (`cfg.flows_port` = 0,
/// annotation removed): flow visibility must not keep a node from running
/// pods.
pub async fn start(
    client: &skep_client::Client,
    cfg: &mut crate::AgentConfig,
    input: tokio::sync::mpsc::Receiver<Flow>,
    snapshot: tokio::sync::watch::Receiver<std::sync::Arc<crate::policy::PolicySnapshot>>,
) -> Option<FlowObserver> {
    let listen = std::net::SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        cfg.flows_port,
    );
    let observer = match serve(
        FlowsConfig {
            node_name: cfg.node_name.clone(),
            listen,
            cluster_ca_pem: cfg.ca_pem.clone(),
            data_dir: cfg.data_dir.clone(),
            metrics_listen: cfg.metrics_listen,
        },
        input,
        snapshot,
    )
    .await
    {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::error!(error = %e, "the flow observer could not start; `skep ctl flows` will not show this node (choose another --flows-port)");
            None
        }
    };
    cfg.flows_port = observer.as_ref().map_or(0, |o| o.local_addr().port());
    let port = observer.as_ref().map(|o| o.local_addr().port());
    if let Err(e) = crate::node::advertise_flows_port(client, &cfg.node_name, port).await {
        tracing::warn!(error = %e, "advertising the flow observer's port on the Node failed");
    }
    observer
}
