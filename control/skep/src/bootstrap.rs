//! Cluster credentials shared by every server on one store (HA).
//!
//! The first server to boot on an empty store creates the CA, the
//! service-account signing key, the kubelet-client certificate and the
//! admin and node tokens in its data directory, then publishes them under
//! one key of the store. A server that boots on an empty data directory
//! adopts them from there, so `skep server --store etcd` on a second
//! machine joins the same cluster with nothing copied by hand. (Like
//! Secrets in etcd, the key is as safe as the store: protect etcd.)
//!
//! A data directory whose credentials differ from the store's belongs to
//! another cluster: the server refuses to start rather than serve two CAs.

use anyhow::{Context, Result, bail};
use skep_store::{Store, StoreError};
use std::{collections::BTreeMap, path::Path};

const KEY: &str = "/skep/bootstrap/credentials";

/// The files that make up the cluster's identity, relative to the data
/// directory (the serving certificate is per server, issued at each boot).
const FILES: [&str; 7] = [
    "tls/ca.crt",
    "tls/ca.key",
    "tls/sa.key",
    "tls/kubelet-client.crt",
    "tls/kubelet-client.key",
    "admin-token",
    "node-token",
];

type Bundle = BTreeMap<String, String>;

async fn published(store: &dyn Store) -> Result<Option<Bundle>> {
    let Some(kv) = store
        .get(KEY)
        .await
        .context("reading the shared credentials")?
    else {
        return Ok(None);
    };
    let bundle: Bundle = serde_json::from_slice(&kv.value)
        .with_context(|| format!("the store's {KEY} is not a credentials bundle"))?;
    Ok(Some(bundle))
}

fn local(dir: &Path) -> Bundle {
    FILES
        .iter()
        .filter_map(|f| {
            std::fs::read_to_string(dir.join(f))
                .ok()
                .map(|s| ((*f).to_owned(), s))
        })
        .collect()
}

/// Writes the store's credentials into `dir` where files are missing;
/// fails if a present file differs. Returns whether the store had any.
fn adopt(dir: &Path, bundle: &Bundle) -> Result<()> {
    let mine = local(dir);
    for (file, content) in bundle {
        match mine.get(file) {
            Some(have) if have == content => {}
            Some(_) => bail!(
                "{} differs from the cluster's credentials in the store: this data directory \
                 belongs to another cluster (use an empty --data-dir to join this one)",
                dir.join(file).display()
            ),
            None => {
                let path = dir.join(file);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("creating {}", parent.display()))?;
                }
                skep_apiserver::pki::write_private(&path, content)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// Before the API server loads its credentials: adopt the cluster's.
pub async fn before_start(store: &dyn Store, dir: &Path) -> Result<()> {
    if let Some(bundle) = published(store).await? {
        adopt(dir, &bundle)?;
        tracing::info!("using the cluster credentials from the store");
    }
    Ok(())
}

/// After the API server has created its credentials: publish them if the
/// store has none yet. Losing a race with another first server is an
/// error for this one (it serves a CA nobody else trusts): it says to
/// restart, which then adopts the winner's.
pub async fn after_start(store: &dyn Store, dir: &Path) -> Result<()> {
    let mine = local(dir);
    if mine.len() != FILES.len() {
        let missing: Vec<&str> = FILES
            .iter()
            .filter(|f| !mine.contains_key(**f))
            .copied()
            .collect();
        bail!(
            "the API server did not create {} in {}",
            missing.join(", "),
            dir.display()
        );
    }
    let value = serde_json::to_vec(&mine).context("encoding the credentials")?;
    match store.create(KEY, bytes::Bytes::from(value)).await {
        Ok(_) => {
            tracing::info!("published the cluster credentials for other servers");
            Ok(())
        }
        Err(StoreError::AlreadyExists { .. }) => match published(store).await? {
            Some(theirs) if theirs == mine => Ok(()),
            _ => bail!(
                "another server initialized this store's cluster at the same time with other \
                 credentials; remove {}/tls, admin-token and node-token and start again to join it",
                dir.display()
            ),
        },
        Err(e) => Err(e).context("publishing the cluster credentials"),
    }
}
