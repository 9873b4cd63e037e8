//! The CA's side of `skep.mesh.v1.Identity`, independent of how tokens are
//! checked: `skep server` plugs in the API server's service-account token
//! verifier ([`Authenticator`]) and serves this over its own TLS.

use crate::{
    ca::{CaError, MeshCa},
    proto::{
        CertifyRequest, CertifyResponse,
        certify_request::Csr,
        identity_server::{Identity, IdentityServer},
    },
};
use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::TlsAcceptor;
use tonic::{Request, Response, Status, transport::server::Connected};

/// For implementing [`Authenticator`] without a dependency of one's own.
pub use async_trait::async_trait;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whom a service-account token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub namespace: String,
    pub service_account: String,
}

/// Checks a token: `None` when it is invalid, expired, or its account (or
/// bound object) is gone.
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, token: &str) -> Option<Account>;
}

pub struct IdentityService<A> {
    ca: Arc<MeshCa>,
    auth: A,
}

impl<A> std::fmt::Debug for IdentityService<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService")
            .field("ca", &self.ca)
            .finish()
    }
}

impl<A: Authenticator> IdentityService<A> {
    pub fn new(ca: Arc<MeshCa>, auth: A) -> Self {
        Self { ca, auth }
    }
}

#[tonic::async_trait]
impl<A: Authenticator> Identity for IdentityService<A> {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let req = request.into_inner();
        let Some(account) = self.auth.authenticate(req.token.trim()).await else {
            return Err(Status::unauthenticated(
                "the service-account token is invalid or expired, or its service account no longer exists",
            ));
        };
        let der = match req.csr {
            Some(Csr::CsrDer(d)) => d,
            Some(Csr::CsrPem(p)) => {
                crate::ca::csr_from_pem(&p).map_err(|e| Status::invalid_argument(e.to_string()))?
            }
            None => return Err(Status::invalid_argument("the request carries no CSR")),
        };
        let issued = self
            .ca
            .issue(&der, &account.namespace, &account.service_account)
            .map_err(|e| match e {
                CaError::BadCsr(_) => Status::invalid_argument(e.to_string()),
                other => Status::internal(other.to_string()),
            })?;
        tracing::info!(id = %issued.spiffe_id, not_after = issued.not_after_unix, "issued a workload certificate");
        Ok(Response::new(CertifyResponse {
            cert_chain_pem: issued.cert_chain_pem,
            trust_bundle_pem: issued.trust_bundle_pem,
            not_after_unix: issued.not_after_unix,
            spiffe_id: issued.spiffe_id,
        }))
    }
}

/// A TLS connection handed to tonic.
struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for TlsConn {
    type ConnectInfo = ();

    fn connect_info(&self) {}
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Serves the identity service on `listener` with `tls` (its ALPN should
/// offer `h2`) until the task is aborted.
pub fn serve<A: Authenticator>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: IdentityService<A>,
) -> tokio::task::JoinHandle<()> {
    let acceptor = TlsAcceptor::from(tls);
    let (tx, rx) = mpsc::channel::<Result<TlsConn, io::Error>>(64);
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "mesh CA: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsConn(tls))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "mesh CA: TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(%peer, "mesh CA: TLS handshake timed out"),
                }
            });
        }
    });
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
        let result = tonic::transport::Server::builder()
            .add_service(IdentityServer::new(service))
            .serve_with_incoming(incoming)
            .await;
        accept.abort();
        if let Err(e) = result {
            tracing::error!(error = %e, "the mesh CA stopped");
        }
    })
}
