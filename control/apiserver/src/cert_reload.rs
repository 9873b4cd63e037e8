//! The serving certificate, reloadable without a restart: the TLS acceptor
//! asks [`ReloadingCert`] for the certificate at every handshake, and the
//! files (`tls/server.crt`, `tls/server.key`) are read again on SIGHUP and
//! whenever their modification time changes (checked every 10 s). A pair
//! that does not load (half-written, key not matching the certificate) is
//! refused with a log line and the old one stays in service: a botched
//! rotation never takes the API down. Connections already open keep the
//! certificate they negotiated.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// How often the files' modification times are compared.
const POLL: Duration = Duration::from_secs(10);

/// The current serving certificate and where it comes from.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

/// Reads and checks a certificate chain and its key.
pub fn load_pair(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("reading the certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("reading the key: {e}"))?
        .ok_or_else(|| "no private key in the file".to_string())?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("loading the key: {e}"))?;
    let ck = CertifiedKey::new(certs, signing);
    // Refuses a key that is not the certificate's (a rotation that
    // replaced one file but not yet the other).
    ck.keys_match()
        .map_err(|e| format!("the key does not belong to the certificate: {e}"))?;
    Ok(ck)
}

fn mtimes(paths: [&Path; 2]) -> [Option<SystemTime>; 2] {
    paths.map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

impl ReloadingCert {
    /// Starts from the given PEM pair (what the server just wrote or read).
    pub fn new(
        cert_path: PathBuf,
        key_path: PathBuf,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Arc<Self>, String> {
        let ck = load_pair(cert_pem, key_pem)?;
        Ok(Arc::new(Self {
            cert_path,
            key_path,
            current: ArcSwap::from_pointee(ck),
        }))
    }

    /// Reads the files again; on success new handshakes use them.
    pub fn reload(&self) -> Result<(), String> {
        let cert = std::fs::read(&self.cert_path)
            .map_err(|e| format!("reading {}: {e}", self.cert_path.display()))?;
        let key = std::fs::read(&self.key_path)
            .map_err(|e| format!("reading {}: {e}", self.key_path.display()))?;
        let ck = load_pair(&cert, &key)?;
        self.current.store(Arc::new(ck));
        Ok(())
    }

    /// Reloads on SIGHUP and when the files change, until the runtime
    /// stops.
    pub fn spawn_watcher(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut hup = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "no SIGHUP handler; certificates reload on file change only");
                    None
                }
            };
            let mut seen = mtimes([&this.cert_path, &this.key_path]);
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let why = tokio::select! {
                    _ = tick.tick() => {
                        let now = mtimes([&this.cert_path, &this.key_path]);
                        if now == seen {
                            continue;
                        }
                        seen = now;
                        "the files changed"
                    }
                    Some(()) = async {
                        match hup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => "SIGHUP",
                };
                match this.reload() {
                    Ok(()) => {
                        tracing::info!(cert = %this.cert_path.display(), why, "serving certificate reloaded")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, why, "serving certificate not reloaded; keeping the current one")
                    }
                }
            }
        });
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_mismatched_or_broken_pair_is_refused_and_the_old_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = pair("one.example");
        let (c2, k2) = pair("two.example");
        let (cp, kp) = (dir.path().join("s.crt"), dir.path().join("s.key"));
        std::fs::write(&cp, &c1).unwrap();
        std::fs::write(&kp, &k1).unwrap();
        let r = ReloadingCert::new(cp.clone(), kp.clone(), c1.as_bytes(), k1.as_bytes()).unwrap();
        let first = r.current.load_full();
        // Only the certificate rotated so far: refused.
        std::fs::write(&cp, &c2).unwrap();
        let err = r.reload().unwrap_err();
        assert!(err.contains("does not belong"), "{err}");
        assert!(Arc::ptr_eq(&first, &r.current.load_full()));
        // Garbage: refused.
        std::fs::write(&kp, "not a key").unwrap();
        assert!(r.reload().unwrap_err().contains("no private key"));
        // Both rotated: taken.
        std::fs::write(&kp, &k2).unwrap();
        r.reload().unwrap();
        let der: Vec<_> = rustls_pemfile::certs(&mut c2.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(r.current.load().cert[0].as_ref(), der[0].as_ref());
    }
}
