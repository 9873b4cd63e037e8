//! The default StorageClass `local-path`: directories on the node that
//! runs the consuming pod (the node agent's `skep.io/local-path`
//! provisioner), created once a pod is scheduled (WaitForFirstConsumer),
//! deleted with their claim (reclaimPolicy Delete). k3s ships the same
//! class with its local-path-provisioner.
//!
//! Written into `DATA_DIR/manifests/` at each start, like the `kube-dns`
//! add-on, and applied by the manifests loop.

use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::path::Path;

/// The add-on's file in the manifests directory.
pub const MANIFEST: &str = "skep-local-storage.json";

pub fn manifest() -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "local-path",
                     "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": "skep.io/local-path",
        "volumeBindingMode": "WaitForFirstConsumer",
        "reclaimPolicy": "Delete",
    })
}

/// Writes the manifest into `dir` (the server's manifests directory).
pub fn write(dir: &Path) -> Result<()> {
    let file = dir.join(MANIFEST);
    std::fs::write(&file, serde_json::to_vec_pretty(&manifest())?)
        .with_context(|| format!("writing {}", file.display()))
}
