//! The `skep.flows.v1.Observer` gRPC service, over TLS with the kubelet
//! endpoint's serving certificate and caller rule: a client certificate
//! signed by the cluster CA with CN `skep:apiserver` (the API server's
//! relay) — nobody else reads this node's flows.

// `tonic::Status` is the error type of every gRPC handler.
#![allow(clippy::result_large_err)]

use super::{
    FlowsError,
    enrich::enrich,
    filter::FlowFilter,
    input::Flow,
    metrics::{FlowMetrics, serve_metrics},
    proto::{
        self, GetFlowsRequest, GetFlowsResponse, HistoryEnd, LostEvents,
        get_flows_response::Event,
        observer_server::{Observer, ObserverServer},
    },
    store::FlowStore,
};
use crate::{policy::PolicySnapshot, server::APISERVER_CN};
use futures::Stream;
use std::{
    io,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{broadcast, mpsc, watch},
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;
use tonic::{Request, Response, Status, transport::server::Connected};

/// A TLS handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Flows queued per response stream before the sender waits.
const STREAM_BUFFER: usize = 256;

/// What the observer is started with.
#[derive(Debug, Clone)]
pub struct FlowsConfig {
    /// This node's name (stamped on every flow).
    pub node_name: String,
    /// Where the gRPC service listens (`0.0.0.0:4244`; port 0 picks one).
    pub listen: SocketAddr,
    /// The cluster CA (PEM) that signs the API server's client certificate.
    pub cluster_ca_pem: String,
    /// The agent's data directory, holding the kubelet's serving
    /// certificate (`kubelet-serving.{crt,key}`, made on first use).
    pub data_dir: PathBuf,
    /// Plain-HTTP `GET /metrics` listener; `None`: no listener.
    pub metrics_listen: Option<SocketAddr>,
}

/// The running observer; stops (service, metrics, ingest) when dropped.
#[derive(Debug)]
pub struct FlowObserver {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    store: Arc<FlowStore>,
    metrics: Arc<FlowMetrics>,
    tasks: Vec<JoinHandle<()>>,
}

impl FlowObserver {
    /// The gRPC service's address (the port to advertise).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The metrics listener's address, when it could bind.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn store(&self) -> &Arc<FlowStore> {
        &self.store
    }

    pub fn metrics(&self) -> &Arc<FlowMetrics> {
        &self.metrics
    }
}

impl Drop for FlowObserver {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    /// CN of the verified client certificate; `None` without one.
    pub common_name: Option<String>,
}

/// A TLS connection that tells tonic its peer (see [`PeerInfo`]).
struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Only the API server: a verified certificate with its CN.
fn authorize<T>(req: &Request<T>) -> Result<(), Status> {
    let peer = req.extensions().get::<PeerInfo>();
    let refused = |why: &str| {
        let addr = peer.map(|p| p.addr.to_string()).unwrap_or_default();
        tracing::warn!(peer = %addr, why, "flow observer: request refused");
    };
    match peer.and_then(|p| p.common_name.as_deref()) {
        Some(APISERVER_CN) => Ok(()),
        Some(cn) => {
            refused("client certificate of another CN");
            Err(Status::permission_denied(format!(
                "client certificate {cn:?} may not read flows; only the API server ({APISERVER_CN}) may: use `skep ctl flows`"
            )))
        }
        None => {
            refused("no client certificate");
            Err(Status::unauthenticated(format!(
                "a client certificate from the cluster CA with CN {APISERVER_CN} is required; use `skep ctl flows`"
            )))
        }
    }
}

struct ObserverService {
    store: Arc<FlowStore>,
}

/// The matching part of the history, `first`/`last` applied.
fn select_history(
    history: Vec<Arc<proto::Flow>>,
    since: i64,
    filter: &FlowFilter,
    first: usize,
    last: usize,
) -> Vec<Arc<proto::Flow>> {
    let mut picked: Vec<Arc<proto::Flow>> = history
        .into_iter()
        .filter(|f| f.time_unix_nanos >= since && filter.matches(f))
        .collect();
    // The ring is in arrival order; several CPUs' events may interleave.
    picked.sort_by_key(|f| f.time_unix_nanos);
    if first > 0 {
        picked.truncate(first);
    }
    if last > 0 && picked.len() > last {
        picked.drain(..picked.len() - last);
    }
    picked
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<GetFlowsResponse, Status>> + Send>>;

fn event(e: Event) -> Result<GetFlowsResponse, Status> {
    Ok(GetFlowsResponse { event: Some(e) })
}

#[tonic::async_trait]
impl Observer for ObserverService {
    type GetFlowsStream = FlowStream;

    async fn get_flows(
        &self,
        req: Request<GetFlowsRequest>,
    ) -> Result<Response<FlowStream>, Status> {
        authorize(&req)?;
        let r = req.into_inner();
        let filter = FlowFilter::parse(&r.filter.unwrap_or_default())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.first > 0 && r.last > 0 {
            return Err(Status::invalid_argument(
                "first and last exclude each other",
            ));
        }
        let since = r.since_unix_nanos;
        let (history, live) = if r.follow {
            let (h, rx) = self.store.history_and_follow();
            (h, Some(rx))
        } else {
            (self.store.history(), None)
        };
        let history = select_history(history, since, &filter, r.first as usize, r.last as usize);
        let (tx, rx) = mpsc::channel::<Result<GetFlowsResponse, Status>>(STREAM_BUFFER);
        tokio::spawn(async move {
            for f in history {
                if tx.send(event(Event::Flow((*f).clone()))).await.is_err() {
                    return;
                }
            }
            if tx
                .send(event(Event::HistoryEnd(HistoryEnd {})))
                .await
                .is_err()
            {
                return;
            }
            let Some(mut live) = live else { return };
            loop {
                // A follower that left while nothing happens is noticed
                // here, not only at the next flow.
                let next = tokio::select! {
                    n = live.recv() => n,
                    _ = tx.closed() => return,
                };
                match next {
                    Ok(f) => {
                        if f.time_unix_nanos >= since
                            && filter.matches(&f)
                            && tx.send(event(Event::Flow((*f).clone()))).await.is_err()
                        {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            missed = n,
                            "a flow follower fell behind; flows were skipped"
                        );
                        let lost = Event::LostEvents(LostEvents { count: n });
                        if tx.send(event(lost)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Takes raw flows from `input` until it closes: counts, enriches with
/// the current snapshot, stores.
async fn ingest(
    mut input: mpsc::Receiver<Flow>,
    snapshot: watch::Receiver<Arc<PolicySnapshot>>,
    node: String,
    store: Arc<FlowStore>,
    metrics: Arc<FlowMetrics>,
) {
    while let Some(flow) = input.recv().await {
        metrics.record(&flow);
        let snap = snapshot.borrow().clone();
        store.push(enrich(&flow, &node, &snap));
    }
    tracing::info!("the flow source closed; the observer keeps serving its history");
}

/// Accepts TCP connections, completes TLS handshakes concurrently (a slow
/// client does not hold up others) and hands the connections to tonic.
fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    conns: mpsc::Sender<Result<TlsConn, io::Error>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "flow observer: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let conns = conns.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "flow observer: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%addr, "flow observer: TLS handshake timed out");
                        return;
                    }
                };
                let common_name = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|c| crate::server::client_common_name(c.as_ref()));
                let conn = TlsConn {
                    inner: tls,
                    peer: PeerInfo { addr, common_name },
                };
                let _ = conns.send(Ok(conn)).await;
            });
        }
    })
}

/// Starts the observer: the ingest loop over `input`, the gRPC service on
/// `cfg.listen` and, when configured, the metrics listener (a metrics
/// address already in use is logged, not fatal).
pub async fn serve(
    cfg: FlowsConfig,
    input: mpsc::Receiver<Flow>,
    snapshot: watch::Receiver<Arc<PolicySnapshot>>,
) -> Result<FlowObserver, FlowsError> {
    let tls = crate::server::tls_config(
        cfg.cluster_ca_pem.as_bytes(),
        &cfg.data_dir,
        cfg.listen,
        &[b"h2"],
    )
    .map_err(|e| FlowsError::Tls(e.to_string()))?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| FlowsError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| FlowsError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let store = Arc::new(FlowStore::new());
    let metrics = Arc::new(FlowMetrics::new());
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(ingest(
        input,
        snapshot,
        cfg.node_name.clone(),
        store.clone(),
        metrics.clone(),
    )));
    let (conn_tx, conn_rx) = mpsc::channel(64);
    tasks.push(accept_loop(
        listener,
        TlsAcceptor::from(Arc::new(tls)),
        conn_tx,
    ));
    let service = ObserverServer::new(ObserverService {
        store: store.clone(),
    });
    tasks.push(tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
        if let Err(e) = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(error = %e, "the flow observer stopped");
        }
    }));
    tracing::info!(%local_addr, "flow observer listening (gRPC skep.flows.v1.Observer)");
    let mut metrics_addr = None;
    if let Some(listen) = cfg.metrics_listen {
        match serve_metrics(listen, metrics.clone()).await {
            Ok((addr, task)) => {
                metrics_addr = Some(addr);
                tasks.push(task);
            }
            Err(e) => {
                tracing::warn!(error = %e, "flow metrics are not served; choose another --metrics-listen")
            }
        }
    }
    Ok(FlowObserver {
        local_addr,
        metrics_addr,
        store,
        metrics,
        tasks,
    })
}
