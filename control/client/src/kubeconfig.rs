//! Reading the current context of a kubeconfig: server URL, CA, and the
//! user's token or client certificate (inline `*-data` or file paths
//! relative to the kubeconfig).

use crate::ClientError;
use base64::Engine;
use serde_yaml::Value;
use std::path::{Path, PathBuf};

/// How the client proves who it is.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    Token(String),
    Certificate { cert_pem: Vec<u8>, key_pem: Vec<u8> },
    None,
}

impl std::fmt::Debug for Auth {
    // Never print secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Token(_) => f.write_str("Auth::Token(…)"),
            Auth::Certificate { .. } => f.write_str("Auth::Certificate(…)"),
            Auth::None => f.write_str("Auth::None"),
        }
    }
}

/// What a client needs from a kubeconfig.
#[derive(Debug, Clone)]
pub struct Kubeconfig {
    pub server: String,
    pub ca_pem: Vec<u8>,
    pub auth: Auth,
    /// The context's default namespace.
    pub namespace: String,
}

fn named<'a>(doc: &'a Value, list: &str, name: &str) -> Option<&'a Value> {
    doc.get(list)?
        .as_sequence()?
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
}

impl Kubeconfig {
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let err = |detail: String| ClientError::Kubeconfig {
            path: path.display().to_string(),
            detail,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?;
        let doc: Value =
            serde_yaml::from_str(&text).map_err(|e| err(format!("not valid YAML: {e}")))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let ctx_name = doc
            .get("current-context")
            .and_then(Value::as_str)
            .ok_or_else(|| err("no current-context".into()))?;
        let ctx = named(&doc, "contexts", ctx_name)
            .and_then(|c| c.get("context"))
            .ok_or_else(|| err(format!("context {ctx_name:?} is not defined")))?;
        let cluster_name = ctx.get("cluster").and_then(Value::as_str).unwrap_or("");
        let cluster = named(&doc, "clusters", cluster_name)
            .and_then(|c| c.get("cluster"))
            .ok_or_else(|| err(format!("cluster {cluster_name:?} is not defined")))?;
        let user_name = ctx.get("user").and_then(Value::as_str).unwrap_or("");
        let user = named(&doc, "users", user_name).and_then(|u| u.get("user"));
        let server = cluster
            .get("server")
            .and_then(Value::as_str)
            .ok_or_else(|| err(format!("cluster {cluster_name:?} has no server")))?
            .to_owned();
        let read = |v: &Value, data: &str, file: &str| -> Result<Option<Vec<u8>>, ClientError> {
            if let Some(d) = v.get(data).and_then(Value::as_str) {
                return base64::engine::general_purpose::STANDARD
                    .decode(d.trim())
                    .map(Some)
                    .map_err(|e| err(format!("{data} is not base64: {e}")));
            }
            if let Some(f) = v.get(file).and_then(Value::as_str) {
                let p: PathBuf = if Path::new(f).is_absolute() {
                    f.into()
                } else {
                    dir.join(f)
                };
                return std::fs::read(&p)
                    .map(Some)
                    .map_err(|e| err(format!("{file} {}: {e}", p.display())));
            }
            Ok(None)
        };
        let ca_pem = read(
            cluster,
            "certificate-authority-data",
            "certificate-authority",
        )?
        .ok_or_else(|| err("the cluster has no certificate authority".into()))?;
        let auth = match user {
            None => Auth::None,
            Some(u) => {
                if let Some(t) = u.get("token").and_then(Value::as_str) {
                    Auth::Token(t.to_owned())
                } else if let (Some(cert_pem), Some(key_pem)) = (
                    read(u, "client-certificate-data", "client-certificate")?,
                    read(u, "client-key-data", "client-key")?,
                ) {
                    Auth::Certificate { cert_pem, key_pem }
                } else {
                    Auth::None
                }
            }
        };
        Ok(Self {
            server,
            ca_pem,
            auth,
            namespace: ctx
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_current_context() {
        let dir = std::env::temp_dir().join(format!("skep-kc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: b\nclusters:\n- name: c\n  cluster:\n    server: https://x:1\n    certificate-authority-data: QUJD\nusers:\n- name: u\n  user:\n    token: t0k\ncontexts:\n- name: a\n  context: {cluster: nope, user: u}\n- name: b\n  context: {cluster: c, user: u, namespace: ns}\n",
        )
        .unwrap();
        let kc = Kubeconfig::load(&path).unwrap();
        assert_eq!(kc.server, "https://x:1");
        assert_eq!(kc.ca_pem, b"ABC");
        assert_eq!(kc.auth, Auth::Token("t0k".into()));
        assert_eq!(kc.namespace, "ns");
        std::fs::write(&path, "current-context: zz\n").unwrap();
        assert!(
            Kubeconfig::load(&path)
                .unwrap_err()
                .to_string()
                .contains("\"zz\" is not defined")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
