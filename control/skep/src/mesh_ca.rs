//! The server's mesh CA: gRPC `skep.mesh.v1.Identity` over TLS (the API
//! serving certificate), issuing SPIFFE workload certificates to callers
//! with a valid service-account token (checked exactly as the API server
//! checks bearer tokens).
//!
//! The mesh root is the cluster's, like the bootstrap credentials: the
//! first server generates it (`DATA_DIR/tls/mesh-ca.{crt,key}`) and
//! publishes it under the store key [`KEY`]; a server with an empty data
//! directory adopts it; a data directory with another root is refused.
//! With `--mesh-ca-cert/--mesh-ca-key` the operator's CA is used instead
//! (each server is given the same files; nothing is published).

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use skep_apiserver::{ServerHandle, api::Api, tokens::Signer};
use skep_mesh_sidecar::{
    MeshCa,
    ca_server::{Account, Authenticator, IdentityService},
};
use skep_store::{Store, StoreError};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

/// Store key of the cluster's mesh root.
pub const KEY: &str = "/skep/mesh/ca";
const CERT_FILE: &str = "tls/mesh-ca.crt";
const KEY_FILE: &str = "tls/mesh-ca.key";

#[derive(Debug, Clone, clap::Args)]
pub struct MeshCaArgs {
    /// Address of the mesh CA (gRPC skep.mesh.v1.Identity over TLS). If it
    /// is taken, the server keeps retrying in the background.
    #[arg(long, env = "SKEP_MESH_CA_LISTEN", default_value = "0.0.0.0:6445")]
    pub mesh_ca_listen: SocketAddr,
    /// Trust domain of workload identities
    /// (spiffe://<trust-domain>/ns/<ns>/sa/<sa>).
    #[arg(long, env = "SKEP_MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub mesh_trust_domain: String,
    /// An operator-supplied mesh CA certificate (PEM: the issuing
    /// certificate first, then its parents up to the root).
    #[arg(long, env = "SKEP_MESH_CA_CERT", requires = "mesh_ca_key")]
    pub mesh_ca_cert: Option<PathBuf>,
    /// The key of --mesh-ca-cert (PEM).
    #[arg(long, env = "SKEP_MESH_CA_KEY", requires = "mesh_ca_cert")]
    pub mesh_ca_key: Option<PathBuf>,
    /// More roots for the trust bundle sent with every certificate (PEM):
    /// for a root rotation, the new root before switching the CA to it,
    /// then the old one until every workload has renewed.
    #[arg(long, env = "SKEP_MESH_TRUST_BUNDLE")]
    pub mesh_trust_bundle: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Root {
    cert_pem: String,
    key_pem: String,
}

fn read_local(dir: &Path) -> Result<Option<Root>> {
    let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    match (cert.exists(), key.exists()) {
        (false, false) => Ok(None),
        (true, true) => Ok(Some(Root {
            cert_pem: std::fs::read_to_string(&cert)
                .with_context(|| format!("reading {}", cert.display()))?,
            key_pem: std::fs::read_to_string(&key)
                .with_context(|| format!("reading {}", key.display()))?,
        })),
        _ => bail!(
            "only one of {} and {} exists; restore the other or remove both",
            cert.display(),
            key.display()
        ),
    }
}

fn write_local(dir: &Path, root: &Root) -> Result<()> {
    for (file, text) in [(CERT_FILE, &root.cert_pem), (KEY_FILE, &root.key_pem)] {
        let path = dir.join(file);
        skep_apiserver::pki::write_private(&path, text)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn published(store: &dyn Store) -> Result<Option<Root>> {
    let Some(kv) = store.get(KEY).await.context("reading the mesh root")? else {
        return Ok(None);
    };
    Ok(Some(serde_json::from_slice(&kv.value).with_context(
        || format!("the store's {KEY} is not a mesh root"),
    )?))
}

fn other_cluster(dir: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{} differs from the cluster's mesh root in the store: this data directory belongs to \
         another cluster (remove {} and {} to adopt the cluster's)",
        dir.join(CERT_FILE).display(),
        dir.join(CERT_FILE).display(),
        dir.join(KEY_FILE).display()
    )
}

/// The cluster's mesh root: adopted from the store, or this server's
/// (existing or new) published for the others.
async fn cluster_root(store: &dyn Store, dir: &Path, trust_domain: &str) -> Result<Root> {
    let local = read_local(dir)?;
    if let Some(theirs) = published(store).await? {
        return match local {
            Some(mine) if mine != theirs => Err(other_cluster(dir)),
            Some(mine) => Ok(mine),
            None => {
                write_local(dir, &theirs)?;
                tracing::info!("using the cluster's mesh root from the store");
                Ok(theirs)
            }
        };
    }
    let had_local = local.is_some();
    let mine = match local {
        Some(r) => r,
        None => {
            let (cert_pem, key_pem) = skep_mesh_sidecar::ca::generate_root(trust_domain)
                .context("generating the mesh root")?;
            Root { cert_pem, key_pem }
        }
    };
    let value = serde_json::to_vec(&mine).context("encoding the mesh root")?;
    match store.create(KEY, bytes::Bytes::from(value)).await {
        Ok(_) => {
            write_local(dir, &mine)?;
            tracing::info!("published the mesh root for other servers");
            Ok(mine)
        }
        Err(StoreError::AlreadyExists { .. }) => match published(store).await? {
            // Another server won the race; a root of our own that nobody
            // used yet is replaced by the winner's.
            Some(theirs) if theirs == mine => Ok(mine),
            Some(theirs) if !had_local => {
                write_local(dir, &theirs)?;
                Ok(theirs)
            }
            _ => Err(other_cluster(dir)),
        },
        Err(e) => Err(e).context("publishing the mesh root"),
    }
}

/// Service-account tokens checked as the API server checks them.
struct ApiTokens {
    signer: Signer,
    api: Arc<Api>,
}

#[skep_mesh_sidecar::ca_server::async_trait]
impl Authenticator for ApiTokens {
    async fn authenticate(&self, token: &str) -> Option<Account> {
        let claims = skep_apiserver::tokens::verify_current(&self.signer, &self.api, token).await?;
        Some(Account {
            namespace: claims.namespace,
            service_account: claims.name,
        })
    }
}

fn tls_config(handle: &ServerHandle) -> Result<Arc<rustls::ServerConfig>> {
    let creds = &handle.credentials;
    let certs: Vec<_> = rustls_pemfile::certs(&mut creds.server_cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("the serving certificate")?;
    let key = rustls_pemfile::private_key(&mut creds.server_key_pem.as_bytes())
        .context("the serving key")?
        .context("no private key in the serving key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Loads (or creates and publishes) the mesh root and serves the CA in
/// the background. Call after the API server has made its credentials.
pub async fn start(
    args: &MeshCaArgs,
    store: &dyn Store,
    data_dir: &Path,
    handle: &ServerHandle,
) -> Result<tokio::task::JoinHandle<()>> {
    let td = &args.mesh_trust_domain;
    let ca = match (&args.mesh_ca_cert, &args.mesh_ca_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            MeshCa::from_pem(&read(cert)?, &read(key)?, td)
                .with_context(|| format!("the mesh CA in {}", cert.display()))?
        }
        _ => {
            let root = cluster_root(store, data_dir, td).await?;
            MeshCa::from_pem(&root.cert_pem, &root.key_pem, td).with_context(|| {
                format!("the mesh root in {}", data_dir.join(CERT_FILE).display())
            })?
        }
    };
    let ca = match &args.mesh_trust_bundle {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            ca.with_extra_roots(&pem)
                .with_context(|| format!("the trust bundle {}", path.display()))?
        }
        None => ca,
    };
    let signer = Signer::load_or_create(data_dir)?;
    let service = IdentityService::new(
        Arc::new(ca),
        ApiTokens {
            signer,
            api: handle.api.clone(),
        },
    );
    let tls = tls_config(handle)?;
    let addr = args.mesh_ca_listen;
    Ok(tokio::spawn(async move {
        let mut warned = false;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) => {
                    if !warned {
                        tracing::warn!(%addr, error = %e, "the mesh CA cannot listen yet (choose another --mesh-ca-listen); retrying every 5 s");
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        tracing::info!(%addr, "mesh CA listening (gRPC skep.mesh.v1.Identity)");
        let _ = skep_mesh_sidecar::ca_server::serve(listener, tls, service).await;
    }))
}
