//! skep's cluster DNS: the Kubernetes DNS-based service discovery
//! specification (v1.1.0) plus pod records, on hickory-server.
//!
//! Data flow: [`feed`] lists and watches Services, EndpointSlices and Pods
//! in the store and builds an immutable [`Snapshot`] (every owned name →
//! its records), swapped atomically into an `ArcSwapOption`. Each query
//! loads the current snapshot without locking; until the first sync the
//! zone answers SERVFAIL. Names outside the zone (and reverse names of
//! addresses the cluster does not own) go to the upstreams of
//! resolv.conf through a cache ([`forward`]); so do the targets of
//! ExternalNames outside the zone, whose records are appended to the CNAME.
//!
//! UDP is served by plain threads, one per SO_REUSEPORT socket (`udp`);
//! TCP by hickory's server. Both share one handler. Counters are served in
//! Prometheus format (CoreDNS's names) on `metrics_listen` (`metrics_http`).

mod answer;
mod feed;
pub mod forward;
pub mod metrics;
mod metrics_http;
pub mod model;
mod server;
mod udp;

pub use forward::{ForwardConfig, upstreams_from_resolv_conf};
pub use metrics::Metrics;
pub use model::{PodRecords, Snapshot};

use arc_swap::ArcSwapOption;
use skep_store::Store;
use std::{net::SocketAddr, sync::Arc, time::Duration};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("binding the DNS listener {addr}: {source} (is another DNS server using the port?)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the cluster domain {0:?} is not a valid DNS name")]
    Zone(String),
}

/// Settings of the cluster DNS.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// UDP and TCP address to serve on.
    pub listen: SocketAddr,
    /// The cluster domain (default cluster.local).
    pub zone: String,
    /// TTL of the cluster's records and of negative answers.
    pub ttl: u32,
    pub pod_records: PodRecords,
    /// UDP sockets sharing the port (SO_REUSEPORT); default: one per CPU.
    pub udp_sockets: usize,
    /// Idle TCP connections are closed after this long.
    pub tcp_timeout: Duration,
    pub forward: ForwardConfig,
    /// Where to serve Prometheus metrics over HTTP (GET /metrics); None:
    /// not served. `skep server` uses CoreDNS's 127.0.0.1:9153.
    pub metrics_listen: Option<SocketAddr>,
}

/// A metrics listen address as written on a command line: `ADDR:PORT`, or
/// `off` for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsListen(pub Option<SocketAddr>);

impl std::str::FromStr for MetricsListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        s.parse()
            .map(|a| Self(Some(a)))
            .map_err(|_| format!("{s:?} is neither ADDR:PORT (e.g. 127.0.0.1:9153) nor \"off\""))
    }
}

impl DnsConfig {
    /// Defaults, with the upstreams of the host's /etc/resolv.conf.
    pub fn new(listen: SocketAddr) -> Self {
        let upstreams = upstreams_from_resolv_conf(std::path::Path::new("/etc/resolv.conf"))
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read /etc/resolv.conf; names outside the cluster will fail");
                Vec::new()
            })
            .into_iter()
            // Forwarding to ourselves would loop (127.0.0.1:53 in
            // resolv.conf while we listen on 0.0.0.0:53, for instance).
            .filter(|u| !same_socket(*u, listen))
            .collect();
        Self {
            listen,
            zone: "cluster.local".into(),
            ttl: 5,
            pod_records: PodRecords::Insecure,
            udp_sockets: std::thread::available_parallelism().map_or(2, |n| n.get()),
            tcp_timeout: Duration::from_secs(10),
            forward: ForwardConfig {
                upstreams,
                ..ForwardConfig::default()
            },
            metrics_listen: None,
        }
    }
}

fn same_socket(upstream: SocketAddr, listen: SocketAddr) -> bool {
    upstream.port() == listen.port()
        && (upstream.ip() == listen.ip()
            || listen.ip().is_unspecified()
            || (upstream.ip().is_loopback() && listen.ip().is_loopback()))
}

/// A running DNS server. Dropping it stops the server and the feed.
#[derive(Debug)]
pub struct DnsServer {
    local_addr: SocketAddr,
    snapshot: Arc<ArcSwapOption<Snapshot>>,
    metrics: Arc<Metrics>,
    metrics_addr: Option<SocketAddr>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    /// Stops the UDP threads when dropped.
    _udp: udp::UdpThreads,
    feed: tokio::task::JoinHandle<()>,
    /// Stops the hickory server when sent (or dropped).
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl DnsServer {
    /// The address actually bound (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Query, latency and cache counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The address /metrics is served on, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// True once the first full list of the store has been loaded.
    pub fn synced(&self) -> bool {
        self.snapshot.load().is_some()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.feed.abort();
        if let Some(t) = &self.metrics_task {
            t.abort();
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts the DNS server and its feed from `store`. Must be called inside a
/// Tokio runtime.
pub async fn start(config: DnsConfig, store: Arc<dyn Store>) -> Result<DnsServer, DnsError> {
    let zone = config
        .zone
        .trim_end_matches('.')
        .trim_start_matches('.')
        .to_ascii_lowercase();
    if zone.is_empty() || hickory_server::proto::rr::Name::from_ascii(format!("{zone}.")).is_err() {
        return Err(DnsError::Zone(config.zone.clone()));
    }
    let (udp, tcp, local_addr) =
        server::bind(config.listen, config.udp_sockets).map_err(|source| DnsError::Bind {
            addr: config.listen,
            source,
        })?;
    let snapshot = Arc::new(ArcSwapOption::<Snapshot>::empty());
    let metrics = Arc::new(Metrics::new(format!("dns://{local_addr}")));
    // A metrics port in use (another skep on this machine, a CoreDNS) must
    // not take name resolution down with it: warn and serve DNS anyway.
    let (metrics_addr, metrics_task) = match config.metrics_listen {
        None => (None, None),
        Some(addr) => match metrics_http::serve(addr, metrics.clone()).await {
            Ok((a, t)) => {
                tracing::info!(addr = %a, "DNS metrics on http://{a}/metrics");
                (Some(a), Some(t))
            }
            Err(e) => {
                tracing::warn!(%addr, error = %e, "cannot serve DNS metrics; continuing without");
                (None, None)
            }
        },
    };
    let handler = server::SharedHandler(Arc::new(server::Handler {
        snapshot: snapshot.clone(),
        settings: answer::ZoneSettings::new(zone.clone(), config.ttl, config.pod_records),
        forwarder: forward::Forwarder::new(config.forward.clone()),
        metrics: metrics.clone(),
    }));
    // UDP on our own threads (see `udp` for why); TCP on hickory's server.
    let udp_threads = udp::spawn(udp, handler.clone()).map_err(|source| DnsError::Bind {
        addr: local_addr,
        source,
    })?;
    let mut srv = hickory_server::Server::new(handler);
    srv.register_listener(tcp, config.tcp_timeout, 64);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::select! {
            r = srv.block_until_done() => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "DNS server stopped");
                }
            }
            _ = rx => {
                let _ = srv.shutdown_gracefully().await;
            }
        }
    });
    let feed = tokio::spawn(feed::run(store, zone, snapshot.clone(), metrics.clone()));
    tracing::info!(%local_addr, "cluster DNS listening (UDP and TCP)");
    Ok(DnsServer {
        local_addr,
        snapshot,
        metrics,
        metrics_addr,
        metrics_task,
        _udp: udp_threads,
        feed,
        shutdown: Some(tx),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::same_socket;

    #[test]
    fn own_address_is_never_an_upstream() {
        let a = |s: &str| s.parse().unwrap();
        assert!(same_socket(a("127.0.0.1:53"), a("0.0.0.0:53")));
        assert!(same_socket(a("127.0.0.53:53"), a("127.0.0.1:53")));
        assert!(same_socket(a("10.43.0.10:53"), a("10.43.0.10:53")));
        assert!(!same_socket(a("127.0.0.53:53"), a("127.0.0.1:5353")));
        assert!(!same_socket(a("192.0.2.1:53"), a("10.43.0.10:53")));
    }
}
