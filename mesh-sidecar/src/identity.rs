//! The workload's own identity: a fresh key and CSR per certificate, the
//! current certificate behind an `ArcSwap` (new handshakes pick up a renewed
//! certificate, established connections keep theirs), and the renewal loop
//! (at 70 % of the lifetime, ±10 % jitter, old certificate kept until the
//! new one arrives).

use crate::{ca::Issued, spiffe::SpiffeId};
use arc_swap::ArcSwapOption;
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("generating the workload key or CSR failed: {0}")]
    Key(String),
    #[error("cannot read the service-account token {path}: {source}")]
    Token {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the mesh CA at {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("the mesh CA refused the request ({code:?}): {message}")]
    Rejected { code: tonic::Code, message: String },
    #[error("the mesh CA's answer is unusable: {0}")]
    BadResponse(String),
}

/// Something that turns a CSR into a certificate: the server's CA over
/// gRPC ([`crate::ca_client::CaClient`]) or, in tests, a CA in process.
#[async_trait::async_trait]
pub trait Certifier: Send + Sync + std::fmt::Debug {
    async fn certify(&self, csr_der: Vec<u8>) -> Result<Issued, IdentityError>;
}

/// The certificate in use and what peers are verified against.
#[derive(Debug)]
pub struct Current {
    pub spiffe_id: SpiffeId,
    pub certified: Arc<CertifiedKey>,
    pub roots: Arc<RootCertStore>,
    pub not_after: SystemTime,
}

/// The workload identity shared by every listener.
#[derive(Debug)]
pub struct IdentityStore {
    current: ArcSwapOption<Current>,
    generation: watch::Sender<u64>,
}

/// A key pair and a CSR for it (ECDSA P-256). The CSR names nothing: the CA
/// takes the identity from the token.
#[derive(Debug)]
pub struct KeyAndCsr {
    pub key_pkcs8_der: Vec<u8>,
    pub csr_der: Vec<u8>,
}

pub fn new_key_and_csr() -> Result<KeyAndCsr, IdentityError> {
    let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Key(e.to_string()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| IdentityError::Key(e.to_string()))?;
    Ok(KeyAndCsr {
        key_pkcs8_der: key.serialize_der(),
        csr_der: csr.der().to_vec(),
    })
}

fn certs_of(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::BadResponse(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(IdentityError::BadResponse(format!(
            "{what} holds no certificate"
        )));
    }
    Ok(certs)
}

impl IdentityStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwapOption::empty(),
            generation: watch::channel(0).0,
        })
    }

    pub fn current(&self) -> Option<Arc<Current>> {
        self.current.load_full()
    }

    /// Ready once a certificate is installed.
    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    /// Counts installed certificates; changes on every install.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Installs an issued certificate for `key`; later handshakes use it.
    pub fn install(&self, key: &KeyAndCsr, issued: &Issued) -> Result<Arc<Current>, IdentityError> {
        let chain = certs_of(&issued.cert_chain_pem, "the certificate chain")?;
        let leaf_id = chain
            .first()
            .and_then(|c| crate::spiffe::from_certificate(c.as_ref()))
            .ok_or_else(|| IdentityError::BadResponse("the leaf has no SPIFFE ID".into()))?;
        let mut roots = RootCertStore::empty();
        for root in certs_of(&issued.trust_bundle_pem, "the trust bundle")? {
            roots
                .add(root)
                .map_err(|e| IdentityError::BadResponse(format!("a trust-bundle root: {e}")))?;
        }
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.key_pkcs8_der.clone()));
        let signing = rustls::crypto::ring::sign::any_ecdsa_type(&der)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signing);
        certified
            .keys_match()
            .map_err(|e| IdentityError::BadResponse(format!("the leaf is not for our key: {e}")))?;
        let current = Arc::new(Current {
            spiffe_id: leaf_id,
            certified: Arc::new(certified),
            roots: Arc::new(roots),
            not_after: UNIX_EPOCH + Duration::from_secs(issued.not_after_unix.max(0) as u64),
        });
        self.current.store(Some(current.clone()));
        self.generation.send_modify(|g| *g += 1);
        tracing::info!(id = %current.spiffe_id, not_after = issued.not_after_unix, "workload certificate installed");
        Ok(current)
    }
}

/// One round: new key, CSR, certificate, install.
pub async fn obtain(
    store: &IdentityStore,
    certifier: &dyn Certifier,
) -> Result<Arc<Current>, IdentityError> {
    let key = new_key_and_csr()?;
    let issued = certifier.certify(key.csr_der.clone()).await?;
    store.install(&key, &issued)
}

/// When to renew a certificate that has `remaining` left: 70 % of it,
/// spread ±10 % so a fleet started together does not renew together.
pub fn renew_delay(remaining: Duration) -> Duration {
    let fraction = 0.7 * (1.0 + rand::random::<f64>() * 0.2 - 0.1);
    remaining.mul_f64(fraction)
}

/// Obtains the first certificate and renews it forever. Failures are
/// retried with backoff (1 s doubling to 30 s) while the current
/// certificate stays in use.
pub fn spawn_renewal(
    store: Arc<IdentityStore>,
    certifier: Arc<dyn Certifier>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_secs(1);
        loop {
            match obtain(&store, certifier.as_ref()).await {
                Ok(current) => {
                    backoff = Duration::from_secs(1);
                    let remaining = current
                        .not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    let delay = renew_delay(remaining);
                    tracing::debug!(?delay, "next certificate renewal");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "getting a workload certificate failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_lands_between_63_and_77_percent() {
        for _ in 0..1000 {
            let d = renew_delay(Duration::from_secs(1000)).as_secs_f64();
            assert!((630.0..=770.0).contains(&d), "{d}");
        }
    }
}
