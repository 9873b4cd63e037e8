//! The sidecar's side of `skep.mesh.v1.Identity`: gRPC over TLS to the
//! server's mesh CA, verified with the cluster CA, authenticated by the
//! pod's service-account token (re-read at each call: the kubelet rotates
//! projected tokens).

use crate::{
    ca::Issued,
    identity::{Certifier, IdentityError},
    proto::{CertifyRequest, certify_request::Csr, identity_client::IdentityClient},
};
use rustls::pki_types::ServerName;
use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// A projected token file (read at every call).
    File(PathBuf),
    Literal(String),
}

impl TokenSource {
    fn read(&self) -> Result<String, IdentityError> {
        match self {
            TokenSource::Literal(t) => Ok(t.clone()),
            TokenSource::File(p) => std::fs::read_to_string(p)
                .map(|t| t.trim().to_owned())
                .map_err(|source| IdentityError::Token {
                    path: p.display().to_string(),
                    source,
                }),
        }
    }
}

#[derive(Clone)]
pub struct CaClient {
    addr: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    token: TokenSource,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl CaClient {
    /// `addr`: host:port of the mesh CA; `cluster_ca_pem`: the CA its
    /// serving certificate chains to; `server_name`: a name that
    /// certificate carries (e.g. `kubernetes.default.svc`).
    pub fn new(
        addr: &str,
        cluster_ca_pem: &[u8],
        server_name: &str,
        token: TokenSource,
    ) -> Result<Self, IdentityError> {
        let bad = |e: String| IdentityError::Connect {
            addr: addr.to_owned(),
            detail: e,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &cluster_ca_pem[..]) {
            roots
                .add(cert.map_err(|e| bad(format!("the cluster CA: {e}")))?)
                .map_err(|e| bad(format!("the cluster CA: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad("the cluster CA file holds no certificate".into()));
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| bad(format!("server name {server_name:?}: {e}")))?;
        Ok(Self {
            addr: addr.to_owned(),
            server_name,
            connector: TlsConnector::from(Arc::new(config)),
            token,
        })
    }

    /// A gRPC client on a fresh connection.
    pub async fn connect(&self) -> Result<IdentityClient<Channel>, IdentityError> {
        let channel = Endpoint::from_static("http://mesh-ca.invalid")
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect_with_connector(Dial(self.clone()))
            .await
            .map_err(|e| IdentityError::Connect {
                addr: self.addr.clone(),
                detail: e.to_string(),
            })?;
        Ok(IdentityClient::new(channel))
    }
}

/// Dials the CA with the sidecar's mark (exempt from capture) and TLS.
#[derive(Clone)]
struct Dial(CaClient);

type Conn = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower_service::Service<http::Uri> for Dial {
    type Response = Conn;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let c = self.0.clone();
        Box::pin(async move {
            let addr = tokio::net::lookup_host(&c.addr)
                .await?
                .next()
                .ok_or_else(|| std::io::Error::other(format!("{} does not resolve", c.addr)))?;
            let tcp = crate::net::connect_marked(addr, CONNECT_TIMEOUT).await?;
            let tls = c.connector.connect(c.server_name.clone(), tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

#[async_trait::async_trait]
impl Certifier for CaClient {
    async fn certify(&self, csr_der: Vec<u8>) -> Result<Issued, IdentityError> {
        let token = self.token.read()?;
        let mut client = self.connect().await?;
        let response = client
            .certify(CertifyRequest {
                token,
                csr: Some(Csr::CsrDer(csr_der)),
            })
            .await
            .map_err(|s| IdentityError::Rejected {
                code: s.code(),
                message: s.message().to_owned(),
            })?
            .into_inner();
        Ok(Issued {
            cert_chain_pem: response.cert_chain_pem,
            trust_bundle_pem: response.trust_bundle_pem,
            not_after_unix: response.not_after_unix,
            spiffe_id: response.spiffe_id,
        })
    }
}
