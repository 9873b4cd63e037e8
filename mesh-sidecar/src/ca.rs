//! Issuing workload certificates: the code the server's mesh CA runs (and
//! tests run in process). A leaf gets the caller's SPIFFE ID as its only
//! name, whatever the CSR asked for, ECDSA P-256, server and client auth.

use crate::spiffe::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lifetime of a workload certificate.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Backdating absorbs clock skew between the server and the nodes.
const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of a root the server generates itself.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the certificate signing request is invalid: {0}")]
    BadCsr(String),
    #[error("the mesh CA is unusable: {0}")]
    BadCa(String),
    #[error("issuing the certificate failed: {0}")]
    Issue(String),
}

/// A certificate issued to a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The leaf, then the CA's certificates.
    pub cert_chain_pem: String,
    pub trust_bundle_pem: String,
    pub not_after_unix: i64,
    pub spiffe_id: String,
}

/// The issuing CA.
pub struct MeshCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// Every certificate of the CA file (the issuer first), appended to
    /// each leaf so peers can build the path to the root.
    chain_pem: String,
    bundle_pem: String,
    trust_domain: String,
    lifetime: Duration,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// A new self-signed mesh root: `(cert_pem, key_pem)`.
pub fn generate_root(trust_domain: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(|e| CaError::Issue(e.to_string()))?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("skep mesh root ({trust_domain})"),
    );
    dn.push(DnType::OrganizationName, "skep");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    p.not_before = (now - BACKDATE).into();
    p.not_after = (now + ROOT_LIFETIME).into();
    p.serial_number = Some(random_serial());
    let cert = p
        .self_signed(&key)
        .map_err(|e| CaError::Issue(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte: a 16-byte DER INTEGER.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn der_to_pem(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

/// One PEM block.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The certificates in a PEM text, DER.
pub fn pem_certs(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .map(|c| c.map(|c| c.as_ref().to_vec()).map_err(|e| e.to_string()))
        .collect()
}

/// The DER of the first CSR in a PEM text.
pub fn csr_from_pem(pem: &str) -> Result<Vec<u8>, CaError> {
    match rustls_pemfile::csr(&mut pem.as_bytes()) {
        Ok(Some(c)) => Ok(c.as_ref().to_vec()),
        Ok(None) => Err(CaError::BadCsr(
            "no CERTIFICATE REQUEST in the PEM text".into(),
        )),
        Err(e) => Err(CaError::BadCsr(e.to_string())),
    }
}

impl MeshCa {
    /// A CA from its certificate file (the issuing certificate first, then
    /// any parents up to the root) and its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str, trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| CaError::BadCa(format!("the key is not usable: {e}")))?;
        let certs = pem_certs(cert_pem).map_err(CaError::BadCa)?;
        let (Some(issuer), Some(root)) = (certs.first(), certs.last()) else {
            return Err(CaError::BadCa(
                "the certificate file holds no certificate".into(),
            ));
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(issuer)
            .map_err(|e| CaError::BadCa(format!("the certificate does not parse: {e}")))?;
        if parsed.tbs_certificate.subject_pki.raw != key.public_key_der().as_slice() {
            return Err(CaError::BadCa(
                "the key does not belong to the (first) certificate".into(),
            ));
        }
        if !parsed.is_ca() {
            return Err(CaError::BadCa("the certificate is not a CA".into()));
        }
        // rcgen signs with an issuer object: the same subject and key
        // identifier as the file's certificate, so leaves chain to it.
        let params = CertificateParams::from_ca_cert_der(&issuer.clone().into())
            .map_err(|e| CaError::BadCa(e.to_string()))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::BadCa(e.to_string()))?;
        Ok(Self {
            cert,
            key,
            chain_pem: certs.iter().map(|c| der_to_pem(c)).collect(),
            bundle_pem: der_to_pem(root),
            trust_domain: trust_domain.to_owned(),
            lifetime: DEFAULT_LIFETIME,
        })
    }

    /// Issues leaves valid for `lifetime` instead of 24 h (tests renew
    /// within seconds).
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// Adds roots to the trust bundle handed out with every leaf: during a
    /// root rotation, the other root (the new one before switching to it,
    /// the old one after), so workloads holding either kind of leaf trust
    /// each other and no connection has to fail.
    pub fn with_extra_roots(mut self, pem: &str) -> Result<Self, CaError> {
        for der in pem_certs(pem).map_err(CaError::BadCa)? {
            x509_parser::parse_x509_certificate(&der)
                .map_err(|e| CaError::BadCa(format!("an extra trust root does not parse: {e}")))?;
            let block = der_to_pem(&der);
            if !self.bundle_pem.contains(&block) {
                self.bundle_pem.push_str(&block);
            }
        }
        Ok(self)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn trust_bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// A leaf for `csr_der`'s key naming `namespace`/`service_account`.
    /// The CSR's signature is checked (the caller holds the key); its
    /// subject, names and extensions are ignored.
    pub fn issue(
        &self,
        csr_der: &[u8],
        namespace: &str,
        service_account: &str,
    ) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::BadCsr("the key must be ECDSA P-256".into()));
        }
        let id = SpiffeId::new(&self.trust_domain, namespace, service_account);
        let uri = rcgen::Ia5String::try_from(id.to_string())
            .map_err(|e| CaError::BadCsr(format!("{id} is not a valid URI: {e}")))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(uri)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial());
        let now = SystemTime::now();
        let not_after = now + self.lifetime;
        p.not_before = (now - BACKDATE).into();
        p.not_after = not_after.into();
        let leaf = p
            .signed_by(&csr.public_key, &self.cert, &self.key)
            .map_err(|e| CaError::Issue(e.to_string()))?;
        let not_after_unix = not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Ok(Issued {
            cert_chain_pem: format!("{}{}", leaf.pem(), self.chain_pem),
            trust_bundle_pem: self.bundle_pem.clone(),
            not_after_unix,
            spiffe_id: id.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_a_spiffe_leaf_ignoring_the_csr_names() {
        let (cert, key) = generate_root("example.org").unwrap();
        let ca = MeshCa::from_pem(&cert, &key, "example.org").unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(vec!["evil.example".to_string()])
            .unwrap()
            .serialize_request(&leaf_key)
            .unwrap();
        let issued = ca.issue(csr.der(), "prod", "web").unwrap();
        assert_eq!(issued.spiffe_id, "spiffe://example.org/ns/prod/sa/web");
        let chain = pem_certs(&issued.cert_chain_pem).unwrap();
        assert_eq!(chain.len(), 2);
        let id = crate::spiffe::from_certificate(&chain[0]).unwrap();
        assert_eq!(id.to_string(), issued.spiffe_id);
        let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        assert!(!format!("{:?}", parsed.subject_alternative_name()).contains("evil"));
        assert_eq!(
            pem_certs(&issued.trust_bundle_pem).unwrap(),
            vec![chain[1].clone()]
        );
        assert!(matches!(
            ca.issue(b"garbage", "a", "b"),
            Err(CaError::BadCsr(_))
        ));
        // A key that is not the certificate's is refused.
        let (_, other_key) = generate_root("example.org").unwrap();
        assert!(MeshCa::from_pem(&cert, &other_key, "example.org").is_err());
    }
}
