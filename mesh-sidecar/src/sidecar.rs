//! A running sidecar: the inbound, outbound and admin listeners over one
//! identity, and the graceful drain (stop accepting, let connections
//! finish up to the drain timeout, then close the rest).

use crate::{
    admin::{self, AdminState},
    config::SidecarConfig,
    identity::IdentityStore,
    metrics::Metrics,
    original_dst::{MeshedPeers, OriginalDst},
};
use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The traffic-capture seams (see [`crate::original_dst`]).
#[derive(Debug, Clone)]
pub struct Seams {
    /// Original destinations of the app's captured connections.
    pub outbound_dst: Arc<dyn OriginalDst>,
    /// Which app port an inbound plaintext client wanted, when inbound
    /// traffic is redirected to the sidecar; [`crate::original_dst::LocalAddrDst`]
    /// when it is not.
    pub inbound_dst: Arc<dyn OriginalDst>,
    pub meshed: Arc<dyn MeshedPeers>,
}

/// What every connection task shares.
pub(crate) struct Shared {
    pub config: SidecarConfig,
    pub metrics: Arc<Metrics>,
    pub acceptor: TlsAcceptor,
    pub connector: TlsConnector,
    pub outbound_dst: Arc<dyn OriginalDst>,
    pub inbound_dst: Arc<dyn OriginalDst>,
    pub meshed: Arc<dyn MeshedPeers>,
    /// The sidecar's own ports, never a proxy destination.
    pub own_ports: Vec<u16>,
    pub hard_stop: watch::Receiver<bool>,
}

/// Resolves once `rx` says stop (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, not held across an
    // await by the caller (it is not Send).
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// Open connections, for the drain.
#[derive(Debug, Default)]
struct Active {
    count: AtomicUsize,
    idle: Notify,
}

struct ActiveGuard(Arc<Active>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[derive(Debug)]
pub struct Sidecar {
    inbound_addr: SocketAddr,
    outbound_addr: SocketAddr,
    admin_addr: SocketAddr,
    metrics: Arc<Metrics>,
    identity: Arc<IdentityStore>,
    draining: Arc<AtomicBool>,
    active: Arc<Active>,
    stop: watch::Sender<bool>,
    hard_stop: watch::Sender<bool>,
    drain_timeout: Duration,
    tasks: Vec<JoinHandle<()>>,
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, SidecarError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| SidecarError::Bind { addr, what, source })
}

fn local(
    l: &TcpListener,
    addr: SocketAddr,
    what: &'static str,
) -> Result<SocketAddr, SidecarError> {
    l.local_addr()
        .map_err(|source| SidecarError::Bind { addr, what, source })
}

fn accept_loop<F, Fut>(
    listener: TcpListener,
    shared: Arc<Shared>,
    active: Arc<Active>,
    mut stop: watch::Receiver<bool>,
    handle: F,
) -> JoinHandle<()>
where
    F: Fn(TcpStream, SocketAddr, Arc<Shared>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = crate::sidecar::stopped(&mut stop) => return,
            };
            active.count.fetch_add(1, Ordering::AcqRel);
            let guard = ActiveGuard(active.clone());
            let fut = handle(tcp, peer, shared.clone());
            tokio::spawn(async move {
                fut.await;
                drop(guard);
            });
        }
    })
}

impl Sidecar {
    /// Binds the three listeners and starts serving. Connections are
    /// proxied once `identity` holds a certificate (the renewal loop fills
    /// it); until then mTLS handshakes fail and `/ready` says 503.
    pub async fn start(
        config: SidecarConfig,
        identity: Arc<IdentityStore>,
        seams: Seams,
    ) -> Result<Self, SidecarError> {
        let inbound = bind(config.inbound_listen, "inbound").await?;
        let outbound = bind(config.outbound_listen, "outbound").await?;
        let admin_l = bind(config.admin_listen, "admin").await?;
        let inbound_addr = local(&inbound, config.inbound_listen, "inbound")?;
        let outbound_addr = local(&outbound, config.outbound_listen, "outbound")?;
        let admin_addr = local(&admin_l, config.admin_listen, "admin")?;
        let metrics = Metrics::new();
        let (stop, stop_rx) = watch::channel(false);
        let (hard_stop, hard_rx) = watch::channel(false);
        let draining = Arc::new(AtomicBool::new(false));
        let active = Arc::new(Active::default());
        let drain_timeout = config.drain_timeout;
        let shared = Arc::new(Shared {
            acceptor: TlsAcceptor::from(crate::tls::server_config(
                &identity,
                &config.trust_domain,
            )?),
            connector: TlsConnector::from(crate::tls::client_config(
                &identity,
                &config.trust_domain,
            )?),
            own_ports: vec![inbound_addr.port(), outbound_addr.port(), admin_addr.port()],
            config,
            metrics: metrics.clone(),
            outbound_dst: seams.outbound_dst,
            inbound_dst: seams.inbound_dst,
            meshed: seams.meshed,
            hard_stop: hard_rx,
        });
        let tasks = vec![
            accept_loop(
                inbound,
                shared.clone(),
                active.clone(),
                stop_rx.clone(),
                crate::inbound::handle,
            ),
            accept_loop(
                outbound,
                shared.clone(),
                active.clone(),
                stop_rx.clone(),
                crate::outbound::handle,
            ),
            tokio::spawn(admin::serve(
                admin_l,
                Arc::new(AdminState {
                    identity: identity.clone(),
                    metrics: metrics.clone(),
                    draining: draining.clone(),
                }),
                // The admin port outlives the drain: probes still see 503.
                hard_stop.subscribe(),
            )),
        ];
        tracing::info!(%inbound_addr, %outbound_addr, %admin_addr, "sidecar listening");
        Ok(Self {
            inbound_addr,
            outbound_addr,
            admin_addr,
            metrics,
            identity,
            draining,
            active,
            stop,
            hard_stop,
            drain_timeout,
            tasks,
        })
    }

    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound_addr
    }

    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn identity(&self) -> &Arc<IdentityStore> {
        &self.identity
    }

    /// Connections being proxied now.
    pub fn active_connections(&self) -> usize {
        self.active.count.load(Ordering::Acquire)
    }

    /// Graceful stop: not ready, no new connections, open ones get up to
    /// the drain timeout. Returns how many were cut at the deadline.
    pub async fn drain(self) -> usize {
        self.draining.store(true, Ordering::Relaxed);
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        loop {
            let idle = self.active.idle.notified();
            let open = self.active.count.load(Ordering::Acquire);
            if open == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                break;
            }
        }
        let cut = self.active.count.load(Ordering::Acquire);
        if cut > 0 {
            tracing::info!(connections = cut, "drain timeout: closing open connections");
        }
        let _ = self.hard_stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
        cut
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let _ = self.hard_stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}
