//! The server's credentials, created on first boot and reused afterwards:
//! a cluster CA, a serving certificate signed by it, the admin token, the
//! node join token, and an admin kubeconfig.
//!
//! Layout of the data directory:
//! ```text
//! tls/ca.crt tls/ca.key          cluster CA (ECDSA P-256)
//! tls/server.crt tls/server.key  serving certificate, re-issued at each start
//! tls/kubelet-client.{crt,key}   the API server's client certificate for
//!                                kubelets (CN skep:apiserver), made once
//! admin-token                    bearer token of the admin user
//! node-token                     join token for agents
//! kubeconfig.yaml                admin kubeconfig
//! ```

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::{
    fs,
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate error ({context}): {source}")]
    Cert {
        context: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{path} is not a usable {what}: {detail}; move it away to have a new one generated")]
    Invalid {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
}

/// Credentials loaded or created in the data directory.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub ca_cert_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    /// The certificate the API server presents to kubelets (logs, exec,
    /// attach, port-forward); CN [`KUBELET_CLIENT_CN`], no groups.
    pub kubelet_client_cert_pem: String,
    pub kubelet_client_key_pem: String,
    pub admin_token: String,
    pub node_token: String,
    pub kubeconfig_path: PathBuf,
}

/// CN of the API server's kubelet-client certificate; kubelets accept only
/// this caller.
pub const KUBELET_CLIENT_CN: &str = "skep:apiserver";

fn read_or_create(
    path: &Path,
    make: impl FnOnce() -> Result<String, PkiError>,
) -> Result<String, PkiError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let s = make()?;
            write_private(path, &s)?;
            Ok(s)
        }
        Err(source) => Err(PkiError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes a file readable by its owner only (keys and tokens).
pub fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    let io = |action| {
        let path = path.to_owned();
        move |source| PkiError::Io {
            action,
            path,
            source,
        }
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io("create the directory of"))?;
    }
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, contents).map_err(io("write"))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io("chmod"))?;
    fs::rename(&tmp, path).map_err(io("rename into place"))
}

pub fn random_token() -> String {
    use rand::Rng;
    let bytes: [u8; 24] = rand::thread_rng().r#gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn cert_err(context: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Cert { context, source }
}

/// Loads the credentials in `dir`, creating what is missing. The serving
/// certificate is issued afresh with `sans` (DNS names and IPs) each time.
pub fn load_or_create(
    dir: &Path,
    sans: &[String],
    server_url: &str,
) -> Result<Credentials, PkiError> {
    let tls = dir.join("tls");
    let ca_key_path = tls.join("ca.key");
    let ca_cert_path = tls.join("ca.crt");

    let ca_key_pem = read_or_create(&ca_key_path, || {
        KeyPair::generate()
            .map(|k| k.serialize_pem())
            .map_err(cert_err("generating the CA key"))
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::Invalid {
        path: ca_key_path.clone(),
        what: "CA key",
        detail: e.to_string(),
    })?;
    let ca_params = match fs::read_to_string(&ca_cert_path) {
        Ok(pem) => CertificateParams::from_ca_cert_pem(&pem).map_err(|e| PkiError::Invalid {
            path: ca_cert_path.clone(),
            what: "CA certificate",
            detail: e.to_string(),
        })?,
        Err(_) => {
            let mut p =
                CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA parameters"))?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "skep-ca");
            dn.push(DnType::OrganizationName, "skep");
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            p
        }
    };
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(cert_err("self-signing the CA"))?;
    let ca_cert_pem = match fs::read_to_string(&ca_cert_path) {
        Ok(pem) => pem,
        Err(_) => {
            let pem = ca_cert.pem();
            write_private(&ca_cert_path, &pem)?;
            pem
        }
    };

    // Serving certificate: new key and certificate at every start, so the
    // SANs always match the current addresses.
    let server_key = KeyPair::generate().map_err(cert_err("generating the serving key"))?;
    let mut sp =
        CertificateParams::new(Vec::<String>::new()).map_err(cert_err("serving parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kube-apiserver");
    sp.distinguished_name = dn;
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sp.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    for san in sans {
        let entry = match san.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                san.clone()
                    .try_into()
                    .map_err(cert_err("a DNS name in the serving certificate"))?,
            ),
        };
        if !sp.subject_alt_names.contains(&entry) {
            sp.subject_alt_names.push(entry);
        }
    }
    let server_cert = sp
        .signed_by(&server_key, &ca_cert, &ca_key)
        .map_err(cert_err("signing the serving certificate"))?;
    let server_cert_pem = server_cert.pem();
    let server_key_pem = server_key.serialize_pem();
    write_private(&tls.join("server.crt"), &server_cert_pem)?;
    write_private(&tls.join("server.key"), &server_key_pem)?;

    // The kubelet-client certificate is kept across restarts (kubelets
    // only check that it chains to the CA and names the API server). It
    // carries no organization: presented to this API server it would be a
    // user without any RBAC grant.
    let kubelet_client_key_pem = read_or_create(&tls.join("kubelet-client.key"), || {
        KeyPair::generate()
            .map(|k| k.serialize_pem())
            .map_err(cert_err("generating the kubelet-client key"))
    })?;
    let kubelet_client_cert_pem = read_or_create(&tls.join("kubelet-client.crt"), || {
        let key = KeyPair::from_pem(&kubelet_client_key_pem)
            .map_err(cert_err("reading the kubelet-client key"))?;
        let mut p = CertificateParams::new(Vec::<String>::new())
            .map_err(cert_err("kubelet-client parameters"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, KUBELET_CLIENT_CN);
        p.distinguished_name = dn;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.signed_by(&key, &ca_cert, &ca_key)
            .map(|c| c.pem())
            .map_err(cert_err("signing the kubelet-client certificate"))
    })?;

    let admin_token = read_or_create(&dir.join("admin-token"), || Ok(random_token()))?
        .trim()
        .to_owned();
    let node_token = read_or_create(&dir.join("node-token"), || Ok(random_token()))?
        .trim()
        .to_owned();

    let kubeconfig_path = dir.join("kubeconfig.yaml");
    write_private(
        &kubeconfig_path,
        &kubeconfig(server_url, &ca_cert_pem, &admin_token),
    )?;

    Ok(Credentials {
        ca_cert_pem,
        server_cert_pem,
        server_key_pem,
        kubelet_client_cert_pem,
        kubelet_client_key_pem,
        admin_token,
        node_token,
        kubeconfig_path,
    })
}

/// An admin kubeconfig for `server_url`.
pub fn kubeconfig(server_url: &str, ca_pem: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: skep
  cluster:
    server: {server_url}
    certificate-authority-data: {ca}
users:
- name: skep-admin
  user:
    token: {token}
contexts:
- name: skep
  context:
    cluster: skep
    user: skep-admin
    namespace: default
current-context: skep
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let a = load_or_create(dir.path(), &sans, "https://127.0.0.1:6443").unwrap();
        let b = load_or_create(dir.path(), &sans, "https://127.0.0.1:6443").unwrap();
        assert_eq!(a.ca_cert_pem, b.ca_cert_pem);
        assert_eq!(a.admin_token, b.admin_token);
        assert_eq!(a.kubelet_client_cert_pem, b.kubelet_client_cert_pem);
        assert!(a.kubelet_client_cert_pem.contains("BEGIN CERTIFICATE"));
        assert_ne!(a.admin_token, a.node_token);
        let kc = fs::read_to_string(&a.kubeconfig_path).unwrap();
        assert!(kc.contains(&a.admin_token));
        let mode = fs::metadata(dir.path().join("tls/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_damaged_ca_key_is_reported_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tls")).unwrap();
        fs::write(dir.path().join("tls/ca.key"), "garbage").unwrap();
        let err = load_or_create(dir.path(), &[], "https://x").unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
        assert_eq!(
            fs::read_to_string(dir.path().join("tls/ca.key")).unwrap(),
            "garbage"
        );
    }
}
