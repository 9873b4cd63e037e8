//! TLS from Secrets: `spec.tls` entries name `kubernetes.io/tls` Secrets
//! in the Ingress's namespace; the certificate is chosen by SNI (exact
//! host, then `*.parent` wildcard, then an entry without hosts or the
//! oldest Ingress's first certificate for clients without SNI). The table
//! lives in the routing snapshot, so a rotated Secret is served from the
//! next handshake on, without a restart and without touching open
//! connections.

use arc_swap::ArcSwap;
use base64::Engine;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde_json::Value;
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

/// Certificates by server name.
#[derive(Debug, Default)]
pub struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    fallback: Option<Arc<CertifiedKey>>,
}

impl CertTable {
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni {
            let name = name.to_ascii_lowercase();
            if let Some(c) = self.exact.get(&name) {
                return Some(c.clone());
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(c) = self.wildcard.get(parent)
            {
                return Some(c.clone());
            }
        }
        self.fallback.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.fallback.is_none()
    }
}

/// Parsed keys by Secret and resourceVersion: a snapshot rebuild (every
/// endpoint change) does not parse PEM again.
#[derive(Debug, Default)]
pub struct CertCache {
    parsed: HashMap<String, (String, Arc<CertifiedKey>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("secret {0} not found")]
    Missing(String),
    #[error("secret {0} has no tls.crt/tls.key (type kubernetes.io/tls expected)")]
    NotTls(String),
    #[error("secret {0}: {1}")]
    Bad(String, String),
}

/// A certified key from PEM certificate chain and private key.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in tls.crt".into());
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("bad key PEM: {e}"))?
        .ok_or("no private key in tls.key")?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("unusable private key: {e}"))?;
    Ok(CertifiedKey::new(certs, signer))
}

fn data(secret: &Value, field: &str) -> Option<Vec<u8>> {
    let b64 = secret.get("data")?.get(field)?.as_str()?;
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

impl CertCache {
    fn get(
        &mut self,
        key: &str,
        secrets: &BTreeMap<String, Value>,
    ) -> Result<Arc<CertifiedKey>, CertError> {
        let secret = secrets
            .get(key)
            .ok_or_else(|| CertError::Missing(key.to_owned()))?;
        let rv = secret
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if let Some((seen, ck)) = self.parsed.get(key)
            && *seen == rv
            && !rv.is_empty()
        {
            return Ok(ck.clone());
        }
        let (Some(crt), Some(k)) = (data(secret, "tls.crt"), data(secret, "tls.key")) else {
            return Err(CertError::NotTls(key.to_owned()));
        };
        let ck = Arc::new(certified_key(&crt, &k).map_err(|e| CertError::Bad(key.to_owned(), e))?);
        self.parsed.insert(key.to_owned(), (rv, ck.clone()));
        Ok(ck)
    }

    /// The table for `entries` (namespace, spec.tls entry) in Ingress age
    /// order: the first entry to name a host keeps it.
    pub fn table(
        &mut self,
        entries: &[(String, Value)],
        secrets: &BTreeMap<String, Value>,
    ) -> CertTable {
        let mut table = CertTable::default();
        let mut hostless = None;
        let mut first = None;
        let mut used = std::collections::HashSet::new();
        for (ns, entry) in entries {
            let Some(name) = entry.get("secretName").and_then(Value::as_str) else {
                continue;
            };
            let key = format!("{ns}/{name}");
            let ck = match self.get(&key, secrets) {
                Ok(ck) => ck,
                Err(e) => {
                    tracing::warn!(error = %e, "TLS entry skipped");
                    continue;
                }
            };
            used.insert(key);
            first.get_or_insert_with(|| ck.clone());
            let hosts: Vec<&str> = entry
                .get("hosts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if hosts.is_empty() {
                hostless.get_or_insert_with(|| ck.clone());
            }
            for h in hosts {
                let h = h.to_ascii_lowercase();
                match h.strip_prefix("*.") {
                    Some(parent) => {
                        table
                            .wildcard
                            .entry(parent.to_owned())
                            .or_insert_with(|| ck.clone());
                    }
                    None => {
                        table.exact.entry(h).or_insert_with(|| ck.clone());
                    }
                }
            }
        }
        table.fallback = hostless.or(first);
        // Secrets no longer referenced are forgotten.
        self.parsed.retain(|k, _| used.contains(k));
        table
    }
}

/// rustls's certificate choice, from the live snapshot at each handshake.
#[derive(Debug)]
pub struct SniResolver(pub Arc<ArcSwap<crate::routes::Snapshot>>);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().certs.lookup(hello.server_name())
    }
}

/// The HTTPS listener's configuration: ALPN h2 and http/1.1.
pub fn server_config(
    snapshot: Arc<ArcSwap<crate::routes::Snapshot>>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(SniResolver(snapshot)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
