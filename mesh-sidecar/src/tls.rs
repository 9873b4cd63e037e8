//! rustls configurations for the mesh hop: TLS 1.3 only, both sides
//! present the current workload certificate (read from the identity store
//! at each handshake) and verify the peer against the current trust bundle
//! and trust domain. Names in certificates other than the SPIFFE ID play no
//! part.

use crate::{identity::IdentityStore, spiffe};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ClientHello, ParsedCertificate, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use std::sync::Arc;

/// ALPN of the sidecar-to-sidecar hop.
pub const ALPN: &[u8] = b"skep-mesh/1";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Presents the current workload certificate.
#[derive(Debug)]
struct Resolver(Arc<IdentityStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|c| c.certified.clone())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|c| c.certified.clone())
    }

    fn has_certs(&self) -> bool {
        self.0.is_ready()
    }
}

/// Chain to the current bundle, then the SPIFFE ID's trust domain.
#[derive(Debug)]
struct PeerVerifier {
    store: Arc<IdentityStore>,
    trust_domain: String,
    algs: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        client: bool,
    ) -> Result<(), Error> {
        let current = self
            .store
            .current()
            .ok_or_else(|| Error::General("no workload certificate yet".into()))?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        if client {
            // The client-auth usage check needs webpki's client path; the
            // server path checks the same chain with the server-auth usage,
            // which every mesh leaf carries along with client auth.
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                current.roots.clone(),
                provider(),
            )
            .build()
            .map_err(|e| Error::General(e.to_string()))?
            .verify_client_cert(end_entity, intermediates, now)?;
        } else {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &current.roots,
                intermediates,
                now,
                self.algs.all,
            )?;
        }
        match spiffe::from_certificate(end_entity.as_ref()) {
            Some(id) if id.trust_domain() == self.trust_domain => Ok(()),
            _ => Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.verify(end_entity, intermediates, now, false)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("TLS 1.2 is not used on the mesh".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.verify(end_entity, intermediates, now, true)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("TLS 1.2 is not used on the mesh".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn verifier(store: &Arc<IdentityStore>, trust_domain: &str) -> Arc<PeerVerifier> {
    Arc::new(PeerVerifier {
        store: store.clone(),
        trust_domain: trust_domain.to_owned(),
        algs: provider().signature_verification_algorithms,
    })
}

/// The inbound side: client certificates are mandatory.
pub fn server_config(
    store: &Arc<IdentityStore>,
    trust_domain: &str,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier(store, trust_domain))
        .with_cert_resolver(Arc::new(Resolver(store.clone())));
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The outbound side.
pub fn client_config(
    store: &Arc<IdentityStore>,
    trust_domain: &str,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier(store, trust_domain))
        .with_client_cert_resolver(Arc::new(Resolver(store.clone())));
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The peer's SPIFFE ID after a handshake.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<spiffe::SpiffeId> {
    certs
        .and_then(|c| c.first())
        .and_then(|c| spiffe::from_certificate(c.as_ref()))
}
