//! A pod's volumes, prepared on the node before its containers start:
//! emptyDir (disk or memory), configMap, secret, hostPath, downwardAPI,
//! projected (service-account token, configMap, secret, downwardAPI),
//! persistentVolumeClaim (the bound volume's directory), and the
//! service-account token volume every pod gets unless it opts out.
//!
//! Files are (re)written on every sync, each through a temporary file and
//! a rename, so a container reading a projected file never sees half of
//! it and updates of the ConfigMap or Secret reach running pods.

use super::{ObjectSource, env};
use crate::json::str_at as s;
use base64::Engine;
use serde_json::Value;
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// Where the service-account token volume is mounted.
pub const SA_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The name under which it appears (what the admission plugin would call
/// it in an upstream cluster).
pub const SA_VOLUME: &str = "kube-api-access-skep";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("volume {volume:?}: {reason}")]
pub struct VolumeError {
    pub volume: String,
    pub reason: String,
}

/// A prepared volume: a host path that containers bind-mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub host_path: PathBuf,
    /// Volumes the kubelet writes must not be written by containers.
    pub read_only: bool,
}

/// Credentials a token volume needs.
#[async_trait::async_trait]
pub trait TokenSource: Send + Sync {
    /// A token for the pod's service account (TokenRequest API).
    async fn token(
        &self,
        namespace: &str,
        service_account: &str,
        pod: &Value,
        audience: Option<&str>,
        expiration_seconds: i64,
    ) -> Result<String, String>;
    /// The cluster CA (PEM) for `ca.crt`.
    fn ca_pem(&self) -> String;
}

fn write_file(dir: &Path, rel: &str, data: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if rel.starts_with('/') || rel.split('/').any(|c| c == "..") {
        return Err(format!(
            "path {rel:?} must be relative and must not contain '..'"
        ));
    }
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    // Unchanged content: leave the file (and its inode) alone.
    if std::fs::read(&path).is_ok_and(|old| old == data) {
        return Ok(());
    }
    let tmp = path.with_file_name(format!(
        ".tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f")
    ));
    std::fs::write(&tmp, data).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| format!("chmod {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("renaming into {}: {e}", path.display()))
}

fn mode_of(v: &Value, default: u32) -> u32 {
    v.get("mode")
        .and_then(Value::as_u64)
        .and_then(|m| u32::try_from(m).ok())
        .unwrap_or(default)
}

/// Keys of a ConfigMap or Secret as raw bytes.
fn object_data(obj: &Value, secret: bool) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let b64 = |v: &Value| {
        v.as_str()
            .and_then(|t| base64::engine::general_purpose::STANDARD.decode(t).ok())
    };
    if secret {
        for (k, v) in obj
            .get("data")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            if let Some(b) = b64(v) {
                out.insert(k.clone(), b);
            }
        }
    } else {
        for (k, v) in obj
            .get("data")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            out.insert(k.clone(), v.as_str().unwrap_or("").as_bytes().to_vec());
        }
        for (k, v) in obj
            .get("binaryData")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            if let Some(b) = b64(v) {
                out.insert(k.clone(), b);
            }
        }
    }
    out
}

/// Writes a ConfigMap's or Secret's keys (or the listed `items`) into `dir`.
async fn project_object(
    dir: &Path,
    src: &Value,
    secret: bool,
    ns: &str,
    default_mode: u32,
    objects: &dyn ObjectSource,
) -> Result<(), String> {
    let name = if secret {
        s(src, "/secretName").or_else(|| s(src, "/name"))
    } else {
        s(src, "/name")
    }
    .unwrap_or("");
    let what = if secret { "secret" } else { "configmap" };
    let optional = src
        .get("optional")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let Some(obj) = objects
        .get(if secret { "secrets" } else { "configmaps" }, ns, name)
        .await
    else {
        if optional {
            return Ok(());
        }
        return Err(format!("{what} {name:?} not found"));
    };
    let data = object_data(&obj, secret);
    let mode = src
        .get("defaultMode")
        .and_then(Value::as_u64)
        .and_then(|m| u32::try_from(m).ok())
        .unwrap_or(default_mode);
    match src.get("items").and_then(Value::as_array) {
        Some(items) if !items.is_empty() => {
            for item in items {
                let key = s(item, "/key").unwrap_or("");
                let Some(bytes) = data.get(key) else {
                    if optional {
                        continue;
                    }
                    return Err(format!("{what} {name:?} has no key {key:?}"));
                };
                write_file(
                    dir,
                    s(item, "/path").unwrap_or(key),
                    bytes,
                    mode_of(item, mode),
                )?;
            }
        }
        _ => {
            for (k, bytes) in &data {
                write_file(dir, k, bytes, mode)?;
            }
        }
    }
    Ok(())
}

fn project_downward(
    dir: &Path,
    items: &[Value],
    pod: &Value,
    default_mode: u32,
    node: &env::NodeFacts,
) -> Result<(), String> {
    for item in items {
        let path = s(item, "/path").unwrap_or("");
        let value = if let Some(f) = item.get("fieldRef") {
            env::field_ref(pod, s(f, "/fieldPath").unwrap_or("")).map_err(|e| e.0)?
        } else if let Some(r) = item.get("resourceFieldRef") {
            let cname = s(r, "/containerName").unwrap_or("");
            let c = env::find_container(pod, cname)
                .ok_or_else(|| format!("resourceFieldRef: no container {cname:?} in the pod"))?;
            env::resource_ref(
                &c,
                s(r, "/resource").unwrap_or(""),
                r.get("divisor").and_then(Value::as_str),
                node.cpu_millis,
                node.memory_bytes,
            )
            .map_err(|e| e.0)?
        } else {
            continue;
        };
        write_file(dir, path, value.as_bytes(), mode_of(item, default_mode))?;
    }
    Ok(())
}

async fn write_token(
    dir: &Path,
    rel: &str,
    pod: &Value,
    audience: Option<&str>,
    expiration: i64,
    tokens: &dyn TokenSource,
    mode: u32,
) -> Result<(), String> {
    let path = dir.join(rel);
    // Refresh at 80 % of the lifetime, as the kubelet does.
    let fresh = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age.as_secs_f64() < expiration as f64 * 0.8);
    if fresh {
        return Ok(());
    }
    let ns = s(pod, "/metadata/namespace").unwrap_or("default");
    let sa = s(pod, "/spec/serviceAccountName").unwrap_or("default");
    let t = std::time::Instant::now();
    let token = tokens.token(ns, sa, pod, audience, expiration).await?;
    tracing::debug!(
        token_ms = t.elapsed().as_millis() as u64,
        "service-account token issued"
    );
    write_file(dir, rel, token.as_bytes(), mode)
}

/// Everything `prepare` needs from the node.
#[allow(missing_debug_implementations)]
pub struct VolumeContext<'a> {
    pub pod_dir: &'a Path,
    pub objects: &'a dyn ObjectSource,
    pub tokens: &'a dyn TokenSource,
    pub node: &'a env::NodeFacts,
}

/// Whether the pod gets the service-account token volume.
pub fn automount_token(pod: &Value) -> bool {
    pod.pointer("/spec/automountServiceAccountToken")
        .and_then(Value::as_bool)
        .unwrap_or(true)
}

/// Prepares every volume of `pod` (idempotent; called on each sync).
/// Returns the prepared volumes by name.
pub async fn prepare(
    pod: &Value,
    cx: &VolumeContext<'_>,
) -> Result<BTreeMap<String, Prepared>, VolumeError> {
    let ns = s(pod, "/metadata/namespace").unwrap_or("default");
    let mut out = BTreeMap::new();
    let root = cx.pod_dir.join("volumes");
    let mut volumes: Vec<Value> = pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if automount_token(pod) {
        volumes.push(serde_json::json!({"name": SA_VOLUME, "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}));
    }
    for v in &volumes {
        let name = s(v, "/name").unwrap_or("").to_owned();
        let err = |reason: String| VolumeError {
            volume: name.clone(),
            reason,
        };
        let dir = root.join(&name);
        let prepared = if let Some(e) = v.get("emptyDir") {
            std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
            if s(e, "/medium") == Some("Memory") {
                mount_tmpfs(&dir, e.get("sizeLimit").and_then(Value::as_str)).map_err(err)?;
            }
            Prepared {
                host_path: dir,
                read_only: false,
            }
        } else if let Some(h) = v.get("hostPath") {
            Prepared {
                host_path: host_path(h).map_err(err)?,
                read_only: false,
            }
        } else if let Some((c, secret)) = v
            .get("configMap")
            .map(|c| (c, false))
            .or_else(|| v.get("secret").map(|c| (c, true)))
        {
            std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
            project_object(&dir, c, secret, ns, 0o644, cx.objects)
                .await
                .map_err(err)?;
            Prepared {
                host_path: dir,
                read_only: true,
            }
        } else if let Some(d) = v.get("downwardAPI") {
            std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
            let mode = d
                .get("defaultMode")
                .and_then(Value::as_u64)
                .unwrap_or(0o644) as u32;
            let items = d
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            project_downward(&dir, &items, pod, mode, cx.node).map_err(err)?;
            Prepared {
                host_path: dir,
                read_only: true,
            }
        } else if let Some(p) = v.get("projected") {
            std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
            let mode = p
                .get("defaultMode")
                .and_then(Value::as_u64)
                .unwrap_or(0o644) as u32;
            for src in p
                .get("sources")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(t) = src.get("serviceAccountToken") {
                    write_token(
                        &dir,
                        s(t, "/path").unwrap_or("token"),
                        pod,
                        s(t, "/audience"),
                        t.get("expirationSeconds")
                            .and_then(Value::as_i64)
                            .unwrap_or(3600),
                        cx.tokens,
                        0o644,
                    )
                    .await
                    .map_err(err)?;
                } else if let Some(c) = src.get("configMap") {
                    if s(c, "/name") == Some("kube-root-ca.crt") {
                        // Served by the node itself: the CA it trusts.
                        write_file(&dir, "ca.crt", cx.tokens.ca_pem().as_bytes(), mode)
                            .map_err(err)?;
                    } else {
                        project_object(&dir, c, false, ns, mode, cx.objects)
                            .await
                            .map_err(err)?;
                    }
                } else if let Some(c) = src.get("secret") {
                    project_object(&dir, c, true, ns, mode, cx.objects)
                        .await
                        .map_err(err)?;
                } else if let Some(d) = src.get("downwardAPI") {
                    let items = d
                        .get("items")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    project_downward(&dir, &items, pod, mode, cx.node).map_err(err)?;
                }
            }
            Prepared {
                host_path: dir,
                read_only: true,
            }
        } else if let Some(c) = v.get("persistentVolumeClaim") {
            Prepared {
                host_path: claim_path(c, ns, cx.objects).await.map_err(err)?,
                read_only: c.get("readOnly").and_then(Value::as_bool).unwrap_or(false),
            }
        } else {
            let kinds: Vec<&String> = v
                .as_object()
                .map(|o| o.keys().filter(|k| k.as_str() != "name").collect())
                .unwrap_or_default();
            return Err(err(format!("unsupported volume source {kinds:?}")));
        };
        out.insert(name, prepared);
    }
    Ok(out)
}

/// The directory behind a `persistentVolumeClaim` volume: the bound
/// PersistentVolume's hostPath (type checks as for a hostPath volume) or
/// local path. Until the claim is bound the error says so, and the pod
/// waits (FailedMount, retried on every sync).
async fn claim_path(c: &Value, ns: &str, objects: &dyn ObjectSource) -> Result<PathBuf, String> {
    let claim = s(c, "/claimName").unwrap_or("");
    let Some(pvc) = objects.get("persistentvolumeclaims", ns, claim).await else {
        return Err(format!("persistentvolumeclaim {claim:?} not found"));
    };
    let volume = s(&pvc, "/spec/volumeName").unwrap_or("");
    if volume.is_empty() || s(&pvc, "/status/phase") != Some("Bound") {
        return Err(format!(
            "persistentvolumeclaim {claim:?} is not bound yet (waiting for a PersistentVolume)"
        ));
    }
    let Some(pv) = objects.get("persistentvolumes", "", volume).await else {
        return Err(format!(
            "persistentvolume {volume:?} (bound to claim {claim:?}) not found"
        ));
    };
    let uid = s(&pv, "/spec/claimRef/uid").unwrap_or("");
    if !uid.is_empty() && Some(uid) != s(&pvc, "/metadata/uid") {
        return Err(format!(
            "persistentvolume {volume:?} is bound to another claim than {claim:?}"
        ));
    }
    if let Some(h) = pv.pointer("/spec/hostPath") {
        host_path(h)
    } else if let Some(path) = s(&pv, "/spec/local/path") {
        let path = PathBuf::from(path);
        if !path.exists() {
            return Err(format!(
                "the local volume {volume:?} has no {} on this node",
                path.display()
            ));
        }
        Ok(path)
    } else {
        Err(format!(
            "persistentvolume {volume:?}: only hostPath and local volumes can be mounted by this node"
        ))
    }
}

fn host_path(h: &Value) -> Result<PathBuf, String> {
    use std::os::unix::fs::FileTypeExt;
    let path = PathBuf::from(s(h, "/path").unwrap_or(""));
    if !path.is_absolute() {
        return Err(format!("hostPath {:?} must be absolute", path.display()));
    }
    let meta = std::fs::metadata(&path);
    let kind = s(h, "/type").unwrap_or("");
    let missing = || {
        format!(
            "hostPath type check failed: {} does not exist",
            path.display()
        )
    };
    match kind {
        "" => {}
        "DirectoryOrCreate" => std::fs::create_dir_all(&path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?,
        "FileOrCreate" => {
            if meta.is_err() {
                if let Some(p) = path.parent() {
                    std::fs::create_dir_all(p).map_err(|e| e.to_string())?;
                }
                std::fs::write(&path, b"")
                    .map_err(|e| format!("creating {}: {e}", path.display()))?;
            }
        }
        "Directory" => {
            if !meta.map_err(|_| missing())?.is_dir() {
                return Err(format!(
                    "hostPath type check failed: {} is not a directory",
                    path.display()
                ));
            }
        }
        "File" => {
            if !meta.map_err(|_| missing())?.is_file() {
                return Err(format!(
                    "hostPath type check failed: {} is not a file",
                    path.display()
                ));
            }
        }
        "Socket" => {
            if !meta.map_err(|_| missing())?.file_type().is_socket() {
                return Err(format!(
                    "hostPath type check failed: {} is not a socket",
                    path.display()
                ));
            }
        }
        "CharDevice" | "BlockDevice" => {
            meta.map_err(|_| missing())?;
        }
        other => return Err(format!("unknown hostPath type {other:?}")),
    }
    Ok(path)
}

fn mount_tmpfs(dir: &Path, size: Option<&str>) -> Result<(), String> {
    if is_mountpoint(dir) {
        return Ok(());
    }
    let mut opts = String::from("mode=0777");
    if let Some(bytes) = size.and_then(env::bytes) {
        opts.push_str(&format!(",size={bytes}"));
    }
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|e| format!("mounting a tmpfs on {}: {e}", dir.display()))
}

fn is_mountpoint(dir: &Path) -> bool {
    let target = dir.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(target.as_ref()))
}

/// Unmounts what `prepare` mounted under the pod directory and removes
/// it. Best effort: every failure is logged and the rest still goes.
pub fn cleanup(pod_dir: &Path) {
    let prefix = pod_dir.to_string_lossy().to_string();
    let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    for m in mounts.iter().rev() {
        if let Err(e) = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(mount = %m, error = %e, "unmounting a pod volume failed");
        }
    }
    if let Err(e) = std::fs::remove_dir_all(pod_dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %pod_dir.display(), error = %e, "removing the pod directory failed");
    }
}
