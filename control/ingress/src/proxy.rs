//! The reverse proxy: HTTP/1.1 and HTTP/2 (h2c prior knowledge on the
//! plain port, ALPN `h2`/`http/1.1` on TLS) in, HTTP/1.1 to the Service's
//! ready endpoints out, over pooled keep-alive connections per endpoint
//! ([`crate::pool`]).
//!
//! Every request reads the current routing [`Snapshot`] once (an
//! `ArcSwap` load), so a reload swaps the table between two requests and
//! never drops one: requests already routed finish on the backend they
//! were given. Endpoints are taken round-robin; a connect failure (pod
//! gone, port closed) moves the request to the next endpoint, which is
//! safe because nothing of it was sent yet (the pool hands the request
//! back with the error).

use crate::{
    metrics::Registry,
    pool::{Pool, PooledBody, UpstreamError},
    routes::Snapshot,
};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
    uri::{Authority, PathAndQuery},
};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tokio::net::TcpListener;

/// Responses: the upstream's body streamed through, or our own.
pub type RespBody = Either<PooledBody, Full<Bytes>>;

/// Connect attempts per request (each on another endpoint).
const MAX_ATTEMPTS: usize = 3;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The request body sent upstream (`None`: no body).
#[derive(Debug)]
pub struct UpBody {
    inner: Option<Incoming>,
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut().inner.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// The proxy: the live routing table and the upstream connection pool.
#[derive(Debug)]
pub struct Proxy {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub registry: Arc<Registry>,
    pool: Arc<Pool>,
    server: auto::Builder<TokioExecutor>,
    /// False until the first full list of the API objects was applied:
    /// until then every request is 503, not a misleading 404.
    synced: AtomicBool,
}

/// Headers that describe one hop, not the message (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Names listed in Connection are hop-by-hop too.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn local(status: StatusCode, text: &'static str) -> Response<RespBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The request's host, lower-case, without the port: the Host header
/// (HTTP/1.1) or the URI authority (HTTP/2).
fn host_of(req: &Request<Incoming>) -> String {
    let raw = req
        .uri()
        .authority()
        .map(Authority::as_str)
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
        .unwrap_or("");
    let without_port = if raw.starts_with('[') {
        // [v6]:port
        raw.split_once(']').map_or(raw, |(h, _)| &h[1..])
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    without_port.to_ascii_lowercase()
}

impl Proxy {
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>, registry: Arc<Registry>) -> Arc<Self> {
        let server = auto::Builder::new(TokioExecutor::new());
        Arc::new(Self {
            snapshot,
            registry,
            pool: Arc::new(Pool::default()),
            server,
            synced: AtomicBool::new(false),
        })
    }

    /// Installs a new routing table (all requests after this use it).
    pub fn update(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
        self.synced.store(true, Ordering::Release);
    }

    /// Serves plain HTTP (HTTP/1.1, and HTTP/2 with prior knowledge).
    pub async fn serve_http(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "ingress accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            tokio::spawn(async move {
                proxy.serve_conn(TokioIo::new(stream), peer, false).await;
            });
        }
    }

    /// Serves HTTPS with the certificates of the live snapshot (SNI).
    pub async fn serve_https(self: Arc<Self>, listener: TcpListener) {
        let config = match crate::tls::server_config(self.snapshot.clone()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "the ingress TLS configuration is unusable; HTTPS is off");
                return;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "ingress accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => proxy.serve_conn(TokioIo::new(tls), peer, true).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    }

    async fn serve_conn<I>(self: Arc<Self>, io: I, peer: SocketAddr, https: bool)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let proxy = self.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, peer, https).await) }
        });
        if let Err(e) = self.server.serve_connection_with_upgrades(io, svc).await {
            tracing::debug!(%peer, error = %e, "ingress connection ended with an error");
        }
    }

    /// Routes and forwards one request.
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        https: bool,
    ) -> Response<RespBody> {
        let started = Instant::now();
        if !self.synced.load(Ordering::Acquire) {
            return local(
                StatusCode::SERVICE_UNAVAILABLE,
                "ingress routes are not loaded yet\n",
            );
        }
        let host = host_of(&req);
        let backend = {
            let snap = self.snapshot.load();
            snap.route(&host, req.uri().path()).cloned()
        };
        let Some(backend) = backend else {
            let resp = local(
                StatusCode::NOT_FOUND,
                "no Ingress rule matches this request\n",
            );
            self.registry.unmatched.observe(404, started.elapsed());
            access_log(&req, peer, &host, 404, None, None, started);
            return resp;
        };
        // HTTP/1.1 upgrades (WebSocket): the Upgrade header goes through,
        // and after the upstream's 101 both connections are spliced.
        let upgrade = wants_upgrade(&req).then(|| {
            (
                req.headers().get(header::UPGRADE).cloned(),
                hyper::upgrade::on(&mut req),
            )
        });
        let (mut parts, body) = req.into_parts();
        let method = parts.method.clone();
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        // The Host the client asked for goes upstream unchanged (HTTP/2
        // carries it as :authority).
        let original_host = match parts.headers.get(header::HOST) {
            Some(h) => Some(h.clone()),
            None => parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        strip_hop_by_hop(&mut parts.headers);
        let mut client_upgrade = None;
        if let Some((Some(protocol), on)) = upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol);
            client_upgrade = Some(on);
        }
        let headers = &mut parts.headers;
        if let Some(h) = &original_host {
            headers.insert(header::HOST, h.clone());
            headers.insert("x-forwarded-host", h.clone());
        }
        let client_ip = peer.ip().to_string();
        let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {client_ip}"),
            None => client_ip,
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert("x-forwarded-for", v);
        }
        headers.insert(
            "x-forwarded-proto",
            HeaderValue::from_static(if https { "https" } else { "http" }),
        );
        let attempts = backend.endpoints.len().clamp(1, MAX_ATTEMPTS);
        let start = backend.start();
        let mut up = Request::new(UpBody {
            inner: (!body.is_end_stream()).then_some(body),
        });
        *up.method_mut() = method.clone();
        *up.version_mut() = Version::HTTP_11;
        *up.headers_mut() = std::mem::take(&mut parts.headers);
        let version = parts.version;
        let mut pending = Some(up);
        for attempt in 0..attempts {
            let Some((endpoint, authority)) = backend.pick(start, attempt) else {
                break;
            };
            let Some(mut up) = pending.take() else { break };
            // Origin form on the wire; an HTTP/1.0 client without Host
            // gets the endpoint's.
            *up.uri_mut() = Uri::from(path_and_query.clone());
            if !up.headers().contains_key(header::HOST)
                && let Ok(h) = HeaderValue::from_str(authority.as_str())
            {
                up.headers_mut().insert(header::HOST, h);
            }
            match self.pool.send(endpoint, up).await {
                Ok(mut resp) => {
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                        && let Some(client) = client_upgrade.take()
                    {
                        let upstream = hyper::upgrade::on(&mut resp);
                        tokio::spawn(splice(client, upstream));
                        backend.stats.observe(101, started.elapsed());
                        let (rparts, mut rbody) = resp.into_parts();
                        // The connection now belongs to the splice.
                        rbody.forget_connection();
                        return Response::from_parts(
                            rparts,
                            Either::Right(Full::new(Bytes::new())),
                        );
                    }
                    let (mut rparts, rbody) = resp.into_parts();
                    strip_hop_by_hop(&mut rparts.headers);
                    if version == Version::HTTP_2 {
                        rparts.headers.remove("keep-alive");
                    }
                    let code = rparts.status.as_u16();
                    backend.stats.observe(code, started.elapsed());
                    access_log_parts(
                        &method,
                        &path_and_query,
                        peer,
                        &host,
                        code,
                        Some(endpoint),
                        Some(&backend),
                        started,
                    );
                    return Response::from_parts(rparts, Either::Left(rbody));
                }
                Err((e @ UpstreamError::Connect(..), Some(back))) if attempt + 1 < attempts => {
                    tracing::debug!(%endpoint, error = %e, "upstream connect failed; trying the next endpoint");
                    pending = Some(back);
                }
                Err((e, _)) => {
                    tracing::debug!(%endpoint, error = %e, "upstream request failed");
                    break;
                }
            }
        }
        let (status, text) = if backend.endpoints.is_empty() {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the Service has no ready endpoints\n",
            )
        } else {
            (StatusCode::BAD_GATEWAY, "the upstream did not answer\n")
        };
        backend.stats.observe(status.as_u16(), started.elapsed());
        access_log_parts(
            &method,
            &path_and_query,
            peer,
            &host,
            status.as_u16(),
            None,
            Some(&backend),
            started,
        );
        local(status, text)
    }
}

/// An HTTP/1.1 request asking to switch protocols.
fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Copies bytes both ways between the upgraded client and upstream
/// connections until either side closes.
async fn splice(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, upstream) {
        Ok((c, u)) => {
            let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                tracing::debug!(error = %e, "upgraded connection ended");
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
    }
}

fn access_log(
    req: &Request<Incoming>,
    peer: SocketAddr,
    host: &str,
    code: u16,
    endpoint: Option<SocketAddr>,
    backend: Option<&crate::routes::Backend>,
    started: Instant,
) {
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    access_log_parts(
        req.method(),
        &pq,
        peer,
        host,
        code,
        endpoint,
        backend,
        started,
    );
}

#[allow(clippy::too_many_arguments)]
fn access_log_parts(
    method: &http::Method,
    pq: &PathAndQuery,
    peer: SocketAddr,
    host: &str,
    code: u16,
    endpoint: Option<SocketAddr>,
    backend: Option<&crate::routes::Backend>,
    started: Instant,
) {
    tracing::info!(
        target: "skep::ingress::access",
        client = %peer.ip(),
        %method,
        host,
        path = %pq,
        status = code,
        upstream = %endpoint.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
        ingress = backend.map(|b| &*b.ingress).unwrap_or("-"),
        service = backend.map(|b| &*b.service).unwrap_or("-"),
        ms = started.elapsed().as_secs_f64() * 1e3,
        "request"
    );
}
