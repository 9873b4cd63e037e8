//! The `skep.io/local-path` volumes of one node, as decisions over API
//! objects (what to provision, what to delete) and the directory work.
//!
//! A volume is `DATA/storage/<pv name>` on the node that provisioned it,
//! named `pvc-<claim uid>` like upstream's provisioners, exposed as a
//! hostPath PersistentVolume pinned to the node by required node affinity
//! on `kubernetes.io/hostname`.

use crate::json::{str_at as s, strings_at};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

pub const PROVISIONER: &str = "skep.io/local-path";
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
pub const ANN_STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
/// Written by the binder: the class's reclaim policy (the node need not
/// read StorageClasses).
pub const ANN_RECLAIM_POLICY: &str = "local-path.skep.io/reclaim-policy";
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// The volume name for a claim.
pub fn volume_name(pvc: &Value) -> Option<String> {
    s(pvc, "/metadata/uid")
        .filter(|u| !u.is_empty())
        .map(|u| format!("pvc-{u}"))
}

/// The claim asks this node for a local-path volume: annotated for this
/// provisioner and this node, not bound, not being deleted.
pub fn wants_volume(pvc: &Value, node: &str) -> bool {
    let ann = |k: &str| {
        pvc.pointer("/metadata/annotations")
            .and_then(|a| a.get(k))
            .and_then(Value::as_str)
    };
    ann(ANN_STORAGE_PROVISIONER) == Some(PROVISIONER)
        && ann(ANN_SELECTED_NODE) == Some(node)
        && s(pvc, "/spec/volumeName").unwrap_or("").is_empty()
        && pvc
            .pointer("/metadata/deletionTimestamp")
            .is_none_or(Value::is_null)
}

/// The PersistentVolume for `pvc` on `node`, its directory at `dir`,
/// pre-bound to the claim (the binder completes the bind).
pub fn volume_for(pvc: &Value, node: &str, dir: &Path) -> Result<Value, String> {
    let name = volume_name(pvc).ok_or("the claim has no uid")?;
    let storage = pvc
        .pointer("/spec/resources/requests/storage")
        .cloned()
        .ok_or("the claim requests no storage (spec.resources.requests.storage)")?;
    let mut modes = strings_at(pvc, "/spec/accessModes");
    if modes.is_empty() {
        modes.push("ReadWriteOnce".into());
    }
    let reclaim = pvc
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(ANN_RECLAIM_POLICY))
        .and_then(Value::as_str)
        .unwrap_or("Delete");
    Ok(json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name, "annotations": {ANN_PROVISIONED_BY: PROVISIONER}},
        "spec": {
            "capacity": {"storage": storage},
            "accessModes": modes,
            "persistentVolumeReclaimPolicy": reclaim,
            "storageClassName": s(pvc, "/spec/storageClassName").unwrap_or(""),
            "volumeMode": s(pvc, "/spec/volumeMode").unwrap_or("Filesystem"),
            "hostPath": {"path": dir.display().to_string(), "type": "DirectoryOrCreate"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": HOSTNAME_LABEL, "operator": "In", "values": [node]}]}]}},
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "namespace": s(pvc, "/metadata/namespace").unwrap_or("default"),
                "name": s(pvc, "/metadata/name").unwrap_or(""),
                "uid": s(pvc, "/metadata/uid").unwrap_or("")},
        },
    }))
}

/// The node a local-path volume lives on (from its node affinity).
pub fn volume_node(pv: &Value) -> Option<&str> {
    pv.pointer("/spec/nodeAffinity/required/nodeSelectorTerms/0/matchExpressions")?
        .as_array()?
        .iter()
        .find(|e| s(e, "/key") == Some(HOSTNAME_LABEL) && s(e, "/operator") == Some("In"))?
        .pointer("/values/0")?
        .as_str()
}

/// The directory to remove and the volume to delete: a local-path volume
/// of this node, Released, with reclaim policy Delete, whose path is the
/// one this node gave it under `root` (nothing else is ever removed).
pub fn to_delete(pv: &Value, node: &str, root: &Path) -> Option<PathBuf> {
    let name = s(pv, "/metadata/name")?;
    let ours = pv
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(ANN_PROVISIONED_BY))
        .and_then(Value::as_str)
        == Some(PROVISIONER);
    let dir = root.join(name);
    (ours
        && volume_node(pv) == Some(node)
        && s(pv, "/status/phase") == Some("Released")
        && s(pv, "/spec/persistentVolumeReclaimPolicy") == Some("Delete")
        && s(pv, "/spec/hostPath/path") == Some(dir.to_string_lossy().as_ref())
        && !name.is_empty()
        && !name.contains('/'))
    .then_some(dir)
}

/// Creates the volume's directory, writable by any container user (as
/// upstream's local-path provisioner does: 0777).
pub fn make_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))
}

/// Removes the volume's directory and everything in it (gone already is
/// fine).
pub fn remove_dir(dir: &Path) -> Result<(), String> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn claim(node: &str) -> Value {
        json!({"metadata": {"name": "data", "namespace": "ns", "uid": "1234",
            "annotations": {ANN_STORAGE_PROVISIONER: PROVISIONER, ANN_SELECTED_NODE: node,
                            ANN_RECLAIM_POLICY: "Retain"}},
            "spec": {"storageClassName": "local-path", "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}}})
    }

    #[test]
    fn claims_for_this_node_become_pinned_prebound_volumes() {
        let c = claim("n1");
        assert!(wants_volume(&c, "n1"));
        assert!(!wants_volume(&c, "n2"));
        let mut bound = c.clone();
        bound["spec"]["volumeName"] = json!("pvc-1234");
        assert!(!wants_volume(&bound, "n1"));
        let root = Path::new("/data/storage");
        let pv = volume_for(&c, "n1", &root.join("pvc-1234")).unwrap();
        assert_eq!(pv["metadata"]["name"], "pvc-1234");
        assert_eq!(pv["spec"]["capacity"]["storage"], "1Gi");
        assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Retain");
        assert_eq!(pv["spec"]["claimRef"]["uid"], "1234");
        assert_eq!(pv["spec"]["hostPath"]["path"], "/data/storage/pvc-1234");
        assert_eq!(volume_node(&pv), Some("n1"));
    }

    #[test]
    fn only_released_delete_volumes_of_this_node_under_the_root_are_deleted() {
        let root = Path::new("/data/storage");
        let mut c = claim("n1");
        c["metadata"]["annotations"][ANN_RECLAIM_POLICY] = json!("Delete");
        let mut pv = volume_for(&c, "n1", &root.join("pvc-1234")).unwrap();
        assert_eq!(to_delete(&pv, "n1", root), None, "not released");
        pv["status"] = json!({"phase": "Released"});
        assert_eq!(to_delete(&pv, "n1", root), Some(root.join("pvc-1234")));
        assert_eq!(to_delete(&pv, "n2", root), None, "another node's");
        let mut elsewhere = pv.clone();
        elsewhere["spec"]["hostPath"]["path"] = json!("/etc");
        assert_eq!(to_delete(&elsewhere, "n1", root), None, "outside the root");
        let mut retain = pv.clone();
        retain["spec"]["persistentVolumeReclaimPolicy"] = json!("Retain");
        assert_eq!(to_delete(&retain, "n1", root), None, "Retain");
    }
}
