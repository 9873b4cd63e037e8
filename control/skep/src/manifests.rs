//! Auto-applied manifests, as k3s does: every `*.yaml`, `*.yml` or `*.json`
//! file in `DATA_DIR/manifests/` is server-side applied when the server
//! starts and again whenever the file changes (checked every 2 s, by
//! content). Removing a file leaves its objects in place (delete them with
//! kubectl), so a mistaken `rm` never takes a workload down.
//!
//! The server installs its own add-ons the same way: it writes them into
//! the directory (`skep-*.yaml`, rewritten at each start) and this loop
//! applies them.

use serde_json::Value;
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

const POLL: Duration = Duration::from_secs(2);

/// A file's content fingerprint: applied again only when it changes (or
/// after a failure).
fn fingerprint(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

fn manifest_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// Applies one file; `Ok` only when every object in it was applied.
async fn apply_file(
    client: &skep_client::Client,
    path: &Path,
    text: &str,
) -> anyhow::Result<usize> {
    let source = path.display().to_string();
    let docs: Vec<Value> = crate::ctl::parse_docs(text, &source)?;
    let resources = crate::ctl::discover(client).await?;
    let n = docs.len();
    let mut failures = Vec::new();
    for (what, result) in crate::ctl::apply_docs(client, &resources, docs, "default").await {
        if let Err(e) = result {
            failures.push(format!("{what}: {e:#}"));
        }
    }
    if failures.is_empty() {
        Ok(n)
    } else {
        anyhow::bail!("{}", failures.join("; "))
    }
}

/// Watches `dir` forever, applying changed files through `client`.
pub fn spawn(client: skep_client::Client, dir: PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut applied: BTreeMap<PathBuf, u64> = BTreeMap::new();
        loop {
            for path in manifest_files(&dir) {
                let Ok(bytes) = tokio::fs::read(&path).await else {
                    continue;
                };
                let fp = fingerprint(&bytes);
                if applied.get(&path) == Some(&fp) {
                    continue;
                }
                let text = String::from_utf8_lossy(&bytes);
                match apply_file(&client, &path, &text).await {
                    Ok(n) => {
                        tracing::info!(file = %path.display(), objects = n, "manifest applied");
                        applied.insert(path, fp);
                    }
                    // Retried at the next poll: an object may wait for a
                    // CRD or namespace another file creates.
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %format!("{e:#}"), "manifest not applied; retrying")
                    }
                }
            }
            applied.retain(|p, _| p.exists());
            tokio::time::sleep(POLL).await;
        }
    })
}
