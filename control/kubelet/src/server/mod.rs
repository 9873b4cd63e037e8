//! The kubelet's HTTPS streaming endpoint: container logs, exec, attach and
//! port-forward, on the paths the real kubelet serves. Only the API server
//! may call it: every request must carry a client certificate signed by the
//! cluster CA with CN `skep:apiserver` (the API server proxies `pods/log`,
//! `pods/exec`, … here after its own authentication and authorization).
//!
//! Protocols: logs are a plain (chunked) GET; exec/attach/port-forward
//! upgrade the HTTP/1.1 connection to SPDY/3.1 (kubectl ≤ 1.29) or to a
//! WebSocket (`v5.channel.k8s.io` … for exec/attach, `SPDY/3.1+portforward.k8s.io`
//! tunnelling for port-forward, kubectl ≥ 1.30/1.31).
//!
//! Resource usage: `GET /stats/summary` answers the kubelet Summary API
//! subset that `stats::StatsCollector` keeps (the API server's
//! metrics.k8s.io reads it); 503 until a collector is attached with
//! [`KubeletServer::set_stats`].

mod channels;
mod exec;
mod logs;
mod portforward;
pub mod spdy;
mod tls;
pub mod websocket;

use crate::streams::{ContainerRef, PodStreams, StreamError};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::{convert::Infallible, net::SocketAddr, path::Path, sync::Arc};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// For implementors of [`PodStreams`] outside this crate (the trait is an
/// `async_trait`).
pub use async_trait::async_trait;

/// The only client certificate CN allowed to call the kubelet.
pub const APISERVER_CN: &str = "skep:apiserver";

pub(crate) type Body = BoxBody<Bytes, Infallible>;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kubelet TLS configuration: {0}")]
    Tls(String),
}

/// A running streaming endpoint; stops accepting connections when dropped
/// (or on `shutdown`).
#[derive(Debug)]
pub struct KubeletServer {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    stats: StatsSlot,
}

/// The collector `/stats/summary` reads, attached after the server starts.
type StatsSlot = Arc<std::sync::OnceLock<Arc<crate::stats::StatsCollector>>>;

impl KubeletServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn shutdown(self) {
        self.task.abort();
    }

    /// Serves `/stats/summary` from `stats` (the first call wins).
    pub fn set_stats(&self, stats: Arc<crate::stats::StatsCollector>) {
        let _ = self.stats.set(stats);
    }
}

impl Drop for KubeletServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the streaming endpoint on `listen`. The serving certificate is
/// the kubelet's own (self-signed, kept in `data_dir`); client
/// certificates are verified against `cluster_ca_pem`.
pub async fn serve(
    listen: SocketAddr,
    cluster_ca_pem: &[u8],
    data_dir: &Path,
    streams: Arc<dyn PodStreams>,
) -> Result<KubeletServer, ServerError> {
    let config = tls::server_config(cluster_ca_pem, data_dir, listen)?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: listen,
        source,
    })?;
    tracing::info!(%local_addr, "kubelet streaming endpoint listening");
    let stats: StatsSlot = Arc::default();
    let stats_slot = stats.clone();
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "kubelet endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let streams = streams.clone();
            let stats = stats_slot.clone();
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "kubelet endpoint: TLS handshake failed");
                        return;
                    }
                };
                let caller = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|c| tls::common_name(c.as_ref()));
                let caller = Arc::new(caller);
                let service = hyper::service::service_fn(move |req| {
                    let streams = streams.clone();
                    let caller = caller.clone();
                    let stats = stats.clone();
                    async move { Ok::<_, Infallible>(handle(req, &caller, streams, &stats).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .with_upgrades()
                    .await
                {
                    tracing::debug!(%peer, error = %e, "kubelet endpoint: connection error");
                }
            });
        }
    });
    Ok(KubeletServer {
        local_addr,
        task,
        stats,
    })
}

/// The endpoint's TLS (serving certificate from `data_dir`, client
/// certificates verified against `cluster_ca_pem`) with other ALPN
/// protocols, for the agent's other listeners that admit only the API
/// server: the flow observer serves gRPC (`h2`) with it.
pub fn tls_config(
    cluster_ca_pem: &[u8],
    data_dir: &Path,
    listen: SocketAddr,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, ServerError> {
    let mut config = tls::server_config(cluster_ca_pem, data_dir, listen)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The subject CN of a verified client certificate (DER).
pub fn client_common_name(der: &[u8]) -> Option<String> {
    tls::common_name(der)
}

pub(crate) fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

pub(crate) fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut msg = msg.into();
    msg.push('\n');
    let mut resp = Response::new(full(msg));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pub(crate) fn stream_error(e: &StreamError) -> Response<Body> {
    let status = match e {
        StreamError::NotFound(_) => StatusCode::NOT_FOUND,
        StreamError::BadRequest(_) => StatusCode::BAD_REQUEST,
        StreamError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    text(status, e.to_string())
}

/// Query parameters as (name, value) pairs, repeated names kept.
pub(crate) fn query_pairs(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

pub(crate) fn query_flag(q: &[(String, String)], name: &str) -> bool {
    q.iter()
        .any(|(k, v)| k == name && matches!(v.as_str(), "1" | "true" | "True" | "TRUE"))
}

pub(crate) fn query_value<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// All values of a request header, split on commas (a list may come as
/// one header or several).
pub(crate) fn header_list(req: &Request<Incoming>, name: &str) -> Vec<String> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The upgrade the client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Upgrade {
    WebSocket,
    Spdy,
}

pub(crate) fn upgrade_of(req: &Request<Incoming>) -> Option<Upgrade> {
    let up = req.headers().get(header::UPGRADE)?.to_str().ok()?;
    if up.eq_ignore_ascii_case("websocket") {
        Some(Upgrade::WebSocket)
    } else if up.to_ascii_lowercase().starts_with("spdy/3.1") {
        Some(Upgrade::Spdy)
    } else {
        None
    }
}

async fn handle(
    req: Request<Incoming>,
    caller: &Option<Option<String>>,
    streams: Arc<dyn PodStreams>,
    stats: &StatsSlot,
) -> Response<Body> {
    match caller {
        None => {
            return text(
                StatusCode::UNAUTHORIZED,
                "Unauthorized: a client certificate signed by the cluster CA is required",
            );
        }
        Some(cn) if cn.as_deref() != Some(APISERVER_CN) => {
            return text(
                StatusCode::FORBIDDEN,
                format!(
                    "Forbidden: only {APISERVER_CN} may use the kubelet's streaming endpoint (caller {:?})",
                    cn.as_deref().unwrap_or("")
                ),
            );
        }
        Some(_) => {}
    }
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let container = |ns: &str, pod: &str, c: &str| ContainerRef {
        namespace: ns.to_owned(),
        pod: pod.to_owned(),
        container: c.to_owned(),
    };
    tracing::debug!(method = %req.method(), %path, "kubelet endpoint request");
    match segments.as_slice() {
        ["healthz"] => text(StatusCode::OK, "ok"),
        ["stats", "summary"] => match stats.get() {
            Some(s) => {
                let mut resp = Response::new(full(s.summary().to_string()));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                resp
            }
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "resource statistics are not collected on this node yet",
            ),
        },
        ["containerLogs", ns, pod, c] => {
            let c = container(ns, pod, c);
            logs::handle(req, c, streams).await
        }
        ["exec", ns, pod, c] => {
            let c = container(ns, pod, c);
            exec::handle(req, c, streams, exec::Kind::Exec).await
        }
        ["attach", ns, pod, c] => {
            let c = container(ns, pod, c);
            exec::handle(req, c, streams, exec::Kind::Attach).await
        }
        ["portForward", ns, pod] => {
            portforward::handle(req, (*ns).to_owned(), (*pod).to_owned(), streams).await
        }
        _ => text(StatusCode::NOT_FOUND, format!("no handler for {path}")),
    }
}
