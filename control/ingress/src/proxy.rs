//! The reverse proxy: HTTP/1.1 and HTTP/2 (h2c prior knowledge on the
//! plain port, ALPN `h2`/`http/1.1` on TLS) in, HTTP/1.1 to the Service's
//! ready endpoints out, over pooled keep-alive connections per endpoint
//! and worker ([`crate::upstream`]; upgrades through hyper's client,
//! [`crate::pool`]). HTTP/1.1 connections (plain, and TLS unless ALPN
//! chose h2) start on the fast path ([`crate::fast`]), which hands them
//! to the hyper server here for what it does not serve itself (upgrades,
//! h2c, HTTP/1.0, `Expect`, malformed heads). Plain-HTTP requests to a
//! host some Ingress serves over TLS are answered `308` to `https://`
//! (unless that Ingress turns `ssl-redirect` off).
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
    upstream::{self, H1Body},
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
    borrow::Cow,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tokio::net::TcpListener;

/// Responses: the upstream's body streamed through (read by
/// [`crate::upstream`], or by hyper's client after an upgrade), or our own.
pub type RespBody = Either<Either<H1Body, PooledBody>, Full<Bytes>>;

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
    server: auto::Builder<TokioExecutor>,
    /// False until the first full list of the API objects was applied:
    /// until then every request is 503, not a misleading 404.
    synced: AtomicBool,
    /// The HTTPS listener's port, for the HTTP→HTTPS redirect's Location
    /// (0: none; 443 is left out of the URL).
    https_port: AtomicU16,
}

/// What the request path needs of its connection, made once per
/// connection rather than per request.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) peer: SocketAddr,
    pub(crate) https: bool,
    /// The client's address as a header value (X-Forwarded-For).
    pub(crate) client_ip: HeaderValue,
    /// The worker's upstream connections for upgrades (hyper's client).
    pool: Arc<Pool>,
    /// The worker's upstream connections for everything else.
    pub(crate) h1: Arc<upstream::Pool>,
}

/// A worker's upstream connection pools.
#[derive(Debug, Default, Clone)]
pub(crate) struct Pools {
    pub upgrades: Arc<Pool>,
    pub h1: Arc<upstream::Pool>,
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

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == "keep-alive" || name == "proxy-connection"
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (no hashing)
    // spares the removals below.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
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
/// (HTTP/1.1) or the URI authority (HTTP/2). Borrowed unless it had to be
/// lower-cased.
fn host_of(req: &Request<Incoming>) -> Cow<'_, str> {
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
    if without_port.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(without_port.to_ascii_lowercase())
    } else {
        Cow::Borrowed(without_port)
    }
}

/// `308 Permanent Redirect` to the same host and request URI over HTTPS
/// (ingress-nginx's ssl-redirect answer).
fn redirect(host: &str, https_port: u16, pq: Option<&PathAndQuery>) -> Response<RespBody> {
    let pq = pq.map_or("/", PathAndQuery::as_str);
    let location = if https_port == 443 || https_port == 0 {
        format!("https://{host}{pq}")
    } else {
        format!("https://{host}:{https_port}{pq}")
    };
    let mut resp = local(StatusCode::PERMANENT_REDIRECT, "redirecting to HTTPS\n");
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        // The host came from a header value and the path from a parsed
        // URI, so this cannot happen; answer as for a bad request anyway.
        Err(_) => local(StatusCode::BAD_REQUEST, "bad host\n"),
    }
}

impl Proxy {
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>, registry: Arc<Registry>) -> Arc<Self> {
        let mut server = auto::Builder::new(TokioExecutor::new());
        // Small proxied answers: one flattened buffer, one write(2), is
        // cheaper than a writev of head and body.
        server.http1().writev(false);
        Arc::new(Self {
            snapshot,
            registry,
            server,
            synced: AtomicBool::new(false),
            https_port: AtomicU16::new(0),
        })
    }

    /// Tells the redirect where HTTPS is served (see [`crate::serve`]).
    pub fn set_https_port(&self, port: u16) {
        self.https_port.store(port, Ordering::Relaxed);
    }

    /// Whether the first full table was installed (before: every
    /// request is 503).
    pub(crate) fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The HTTPS listener's port (0: none).
    pub(crate) fn https_port(&self) -> u16 {
        self.https_port.load(Ordering::Relaxed)
    }

    /// Installs a new routing table (all requests after this use it).
    pub fn update(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
        self.synced.store(true, Ordering::Release);
    }

    /// Serves plain HTTP (HTTP/1.1, and HTTP/2 with prior knowledge).
    pub async fn serve_http(self: Arc<Self>, listener: TcpListener) {
        self.serve_http_with(listener, Pools::default()).await
    }

    /// Serves HTTPS with the certificates of the live snapshot (SNI).
    pub async fn serve_https(self: Arc<Self>, listener: TcpListener) {
        self.serve_https_with(listener, Pools::default()).await
    }

    /// [`Self::serve_http`] with a worker's upstream pool.
    pub(crate) async fn serve_http_with(self: Arc<Self>, listener: TcpListener, pool: Pools) {
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
            let conn = Conn::new(peer, false, pool.clone());
            tokio::spawn(crate::fast::serve(self.clone(), stream, conn));
        }
    }

    /// [`Self::serve_https`] with a worker's upstream pool.
    pub(crate) async fn serve_https_with(self: Arc<Self>, listener: TcpListener, pool: Pools) {
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
            let conn = Conn::new(peer, true, pool.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        // h2 stays on hyper; HTTP/1.1 (ALPN or none)
                        // takes the fast path like plain connections.
                        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                            proxy.serve_conn(TokioIo::new(tls), conn).await
                        } else {
                            crate::fast::serve(proxy, tls, conn).await
                        }
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    }

    /// Serves a connection with hyper (HTTP/1.1 with upgrades, HTTP/2).
    pub(crate) async fn serve_conn<I>(self: Arc<Self>, io: I, conn: Conn)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let peer = conn.peer;
        let conn = Arc::new(conn);
        let proxy = self.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, &conn).await) }
        });
        if let Err(e) = self.server.serve_connection_with_upgrades(io, svc).await {
            tracing::debug!(%peer, error = %e, "ingress connection ended with an error");
        }
    }

    /// Routes and forwards one request.
    async fn handle(&self, mut req: Request<Incoming>, conn: &Conn) -> Response<RespBody> {
        let (peer, https) = (conn.peer, conn.https);
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
            match snap.route(&host, req.uri().path()) {
                // Plain HTTP to a host served over TLS goes to HTTPS.
                Some(b) if !https && b.ssl_redirect && snap.has_tls(&host) => {
                    let resp = redirect(
                        &host,
                        self.https_port.load(Ordering::Relaxed),
                        req.uri().path_and_query(),
                    );
                    b.stats.observe(308, started.elapsed());
                    access_log_req(&req, peer, &host, 308, None, Some(b), started);
                    return resp;
                }
                b => b.cloned(),
            }
        };
        let Some(backend) = backend else {
            let resp = local(
                StatusCode::NOT_FOUND,
                "no Ingress rule matches this request\n",
            );
            self.registry.unmatched.observe(404, started.elapsed());
            access_log_req(&req, peer, &host, 404, None, None, started);
            return resp;
        };
        // Borrowed from the request, which is taken apart below.
        drop(host);
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
        // The common case (no X-Forwarded-For yet) reuses the
        // connection's value: no formatting per request.
        let xff = match parts
            .headers
            .get(upstream::X_FORWARDED_FOR)
            .map(HeaderValue::as_bytes)
        {
            Some(prev) => {
                let mut v = Vec::with_capacity(prev.len() + 2 + conn.client_ip.len());
                v.extend_from_slice(prev);
                v.extend_from_slice(b", ");
                v.extend_from_slice(conn.client_ip.as_bytes());
                HeaderValue::from_bytes(&v).ok()
            }
            None => Some(conn.client_ip.clone()),
        };
        // Written by the upstream client next to the request's headers
        // rather than inserted into the map (no rehashing, no growth).
        let fwd = upstream::Forwarded {
            host: if parts.headers.contains_key(header::HOST) {
                None
            } else {
                original_host.clone()
            },
            x_forwarded_host: original_host.clone(),
            x_forwarded_for: xff,
            x_forwarded_proto: if https { "https" } else { "http" },
        };
        let attempts = backend.endpoints.len().clamp(1, MAX_ATTEMPTS);
        let start = backend.start();
        let mut up = Request::new(UpBody {
            inner: (!body.is_end_stream()).then_some(body),
        });
        *up.method_mut() = method.clone();
        *up.version_mut() = Version::HTTP_11;
        *up.headers_mut() = std::mem::take(&mut parts.headers);
        let mut pending = Some(up);
        for attempt in 0..attempts {
            let Some((endpoint, authority)) = backend.pick(start, attempt) else {
                break;
            };
            let Some(mut up) = pending.take() else { break };
            // Origin form on the wire.
            *up.uri_mut() = Uri::from(path_and_query.clone());
            let done = Done {
                method: &method,
                pq: &path_and_query,
                peer,
                host: original_host.as_ref(),
                endpoint,
                backend: &backend,
                started,
            };
            if client_upgrade.is_none() {
                match conn.h1.send(endpoint, up, &fwd, authority).await {
                    Ok(resp) => {
                        return done.respond(resp, |b| Either::Left(Either::Left(b)));
                    }
                    Err((e @ upstream::UpstreamError::Connect(..), Some(back)))
                        if attempt + 1 < attempts =>
                    {
                        tracing::debug!(%endpoint, error = %e, "upstream connect failed; trying the next endpoint");
                        pending = Some(back);
                        continue;
                    }
                    Err((e, _)) => {
                        tracing::debug!(%endpoint, error = %e, "upstream request failed");
                        break;
                    }
                }
            }
            fwd.apply(up.headers_mut(), authority);
            match conn.pool.send(endpoint, up).await {
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
                    return done.respond(resp, |b| Either::Left(Either::Right(b)));
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
        access_log(
            method.as_str(),
            path_and_query.as_str(),
            peer,
            log_host(original_host.as_ref()),
            status.as_u16(),
            None,
            Some(&backend),
            started,
        );
        local(status, text)
    }
}

/// What finishing a proxied request needs (both upstream clients).
#[derive(Clone, Copy)]
struct Done<'a> {
    method: &'a http::Method,
    pq: &'a PathAndQuery,
    peer: SocketAddr,
    host: Option<&'a HeaderValue>,
    endpoint: SocketAddr,
    backend: &'a crate::routes::Backend,
    started: Instant,
}

impl Done<'_> {
    /// The upstream's answer to the client: hop-by-hop headers dropped,
    /// counted and logged.
    fn respond<B>(self, resp: Response<B>, wrap: impl FnOnce(B) -> RespBody) -> Response<RespBody> {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let code = parts.status.as_u16();
        self.backend.stats.observe(code, self.started.elapsed());
        access_log(
            self.method.as_str(),
            self.pq.as_str(),
            self.peer,
            log_host(self.host),
            code,
            Some(self.endpoint),
            Some(self.backend),
            self.started,
        );
        Response::from_parts(parts, wrap(body))
    }
}

impl Conn {
    fn new(peer: SocketAddr, https: bool, pools: Pools) -> Self {
        let client_ip = HeaderValue::from_str(&peer.ip().to_string())
            // An IP address is always a valid header value.
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            peer,
            https,
            client_ip,
            pool: pools.upgrades,
            h1: pools.h1,
        }
    }
}

/// The Host as the client sent it, for the access log.
fn log_host(h: Option<&HeaderValue>) -> &str {
    h.and_then(|h| h.to_str().ok()).unwrap_or("-")
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

fn access_log_req(
    req: &Request<Incoming>,
    peer: SocketAddr,
    host: &str,
    code: u16,
    endpoint: Option<SocketAddr>,
    backend: Option<&crate::routes::Backend>,
    started: Instant,
) {
    access_log(
        req.method().as_str(),
        req.uri().path_and_query().map_or("/", PathAndQuery::as_str),
        peer,
        host,
        code,
        endpoint,
        backend,
        started,
    );
}

/// One access-log line (target `skep::ingress::access`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn access_log(
    method: &str,
    pq: &str,
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
        method,
        host,
        path = pq,
        status = code,
        upstream = %endpoint.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
        ingress = backend.map(|b| &*b.ingress).unwrap_or("-"),
        service = backend.map(|b| &*b.service).unwrap_or("-"),
        ms = started.elapsed().as_secs_f64() * 1e3,
        "request"
    );
}
