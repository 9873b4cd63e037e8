//! The endpoint's TLS: a self-signed serving certificate the kubelet makes
//! once and keeps in its data directory (the API server does not verify it,
//! as kube-apiserver without `--kubelet-certificate-authority`), and client
//! certificates checked against the cluster CA.

use super::ServerError;
use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

const CERT_FILE: &str = "kubelet-serving.crt";
const KEY_FILE: &str = "kubelet-serving.key";

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ServerError {
    let path: PathBuf = path.to_owned();
    move |source| ServerError::Io {
        action,
        path,
        source,
    }
}

/// Loads the serving certificate from `data_dir`, creating it on first use.
fn serving_cert(data_dir: &Path, listen: SocketAddr) -> Result<(String, String), ServerError> {
    let cert_path = data_dir.join(CERT_FILE);
    let key_path = data_dir.join(KEY_FILE);
    if let (Ok(cert), Ok(key)) = (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
    ) {
        return Ok((cert, key));
    }
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    let certified = rcgen::generate_simple_self_signed(names)
        .map_err(|e| ServerError::Tls(format!("making the serving certificate: {e}")))?;
    let cert = certified.cert.pem();
    let key = certified.key_pair.serialize_pem();
    std::fs::create_dir_all(data_dir).map_err(io_err("create", data_dir))?;
    for (path, contents) in [(&key_path, &key), (&cert_path, &cert)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, contents).map_err(io_err("write", &tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
    }
    Ok((cert, key))
}

pub(super) fn server_config(
    cluster_ca_pem: &[u8],
    data_dir: &Path,
    listen: SocketAddr,
) -> Result<rustls::ServerConfig, ServerError> {
    let tls_err = |e: &dyn std::fmt::Display| ServerError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &cluster_ca_pem[..]) {
        roots
            .add(cert.map_err(|e| tls_err(&e))?)
            .map_err(|e| tls_err(&e))?;
    }
    if roots.is_empty() {
        return Err(ServerError::Tls(
            "the cluster CA PEM holds no certificate".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Unauthenticated connections are let through the handshake so they get
    // a readable 401 instead of a TLS alert; `handle` refuses them.
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| tls_err(&e))?;
    let (cert_pem, key_pem) = serving_cert(data_dir, listen)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(&e))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| tls_err(&e))?
        .ok_or_else(|| ServerError::Tls(format!("no private key in {KEY_FILE}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| tls_err(&e))?;
    // Upgrades (SPDY, WebSocket) need HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The subject CN of a (verified) client certificate.
pub(super) fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_serving_certificate_survives_restarts() {
        let dir = std::env::temp_dir().join(format!("skep-kubelet-tls-{}", std::process::id()));
        let listen: SocketAddr = "127.0.0.1:10250".parse().unwrap();
        let first = serving_cert(&dir, listen).unwrap();
        let again = serving_cert(&dir, listen).unwrap();
        assert_eq!(first, again);
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
