//! [mesh] at the node: sidecar injection and the eBPF outbound capture.
//!
//! Pods of namespaces labelled `skep.io/mesh=enabled` (or annotated
//! `skep.io/mesh: enabled`; the pod annotation `disabled` opts out) get the
//! proxy injected by the kubelet (no webhook) as a native sidecar: an init
//! container named [`SIDECAR_NAME`] with `restartPolicy: Always` running
//! `skep sidecar` from the host image, with a startup probe on the
//! sidecar's `/ready`, so the app containers start only once it serves
//! and Jobs complete when their app containers are done (the worker's
//! native-sidecar rules). The injected container lives only in the
//! worker's copy of the pod; the status reports it like any sidecar.
//!
//! Before the first container starts, the pod's cgroup v2 directory
//! (`<cgroup2 root>/<parent>/<pod-uid>`, which the process runtime puts
//! every container of the pod under) gets `mesh_connect4` attached and the
//! pod's address goes into `SKEP_MESH_PODS` (meshed, strict or not). Both
//! go when the pod's sandbox goes.
//!
//! Needs the process runtime (the cgroup layout) and a dataplane (the
//! pinned program and maps); without them meshed pods run unmeshed and a
//! warning in the agent log says why (Docker pods are not meshed).

pub mod peers;

use serde_json::{Value, json};
use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// The injected container's name.
pub const SIDECAR_NAME: &str = "skep-mesh-proxy";
/// Namespace label / pod annotation switching the mesh on (`enabled`) or
/// off (`disabled`, pod only).
pub const MESH_KEY: &str = "skep.io/mesh";
/// Namespace label: `strict` refuses plaintext from unmeshed clients.
pub const MODE_KEY: &str = "skep.io/mesh-mode";
/// Pod annotation: comma-separated SPIFFE IDs allowed in.
pub const ALLOW_KEY: &str = "skep.io/mesh-allow";
/// Where the sidecar sees the dataplane's pinned maps.
pub const MAPS_MOUNT: &str = "/var/run/skep-mesh/maps";
const MAPS_VOLUME: &str = "skep-mesh-bpf-maps";
/// The server's mesh CA port.
pub const CA_PORT: u16 = 6445;
const ADMIN_PORT: u16 = 15020;

/// What the node knows that injection needs (set once by `run`).
#[derive(Clone, Debug)]
pub struct MeshNodeConfig {
    /// The dataplane's pin root (None: no dataplane, no capture).
    pub pin_root: Option<PathBuf>,
    /// The process runtime's cgroup parent (None: another runtime).
    pub cgroup_parent: Option<String>,
    /// host:port of the mesh CA (the API server's host, port 6445).
    pub ca_address: String,
}

static CONFIG: OnceLock<MeshNodeConfig> = OnceLock::new();

/// Called once by the agent before pods run.
pub fn configure(cfg: MeshNodeConfig) {
    let _ = CONFIG.set(cfg);
}

/// The mesh CA address for an API server URL (`https://host:port`): the
/// same host, port 6445; a loopback or unspecified host (the server's own
/// agent) becomes the node address, which pods can reach.
pub fn ca_address_for(server_url: &str, node_ip: &str) -> String {
    let rest = server_url
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(server_url);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let host = match hostport.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => hostport,
    };
    let local = host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified());
    let host = if local && !node_ip.is_empty() {
        node_ip
    } else {
        host
    };
    format!("{host}:{CA_PORT}")
}

/// The cgroup v2 directory holding every container of a pod (process
/// runtime): `/sys/fs/cgroup/<parent>/<uid>` on a cgroup2 host,
/// `/sys/fs/cgroup/unified/<parent>/<uid>` on a hybrid one.
pub fn pod_cgroup_dir(parent: &str, uid: &str) -> PathBuf {
    let root = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        PathBuf::from("/sys/fs/cgroup")
    } else {
        PathBuf::from("/sys/fs/cgroup/unified")
    };
    root.join(parent).join(uid)
}

/// The mesh decision for one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injection {
    pub strict: bool,
    pub allow: Vec<String>,
}

fn str_at<'a>(v: &'a Value, path: &str) -> Option<&'a str> {
    v.pointer(path).and_then(Value::as_str)
}

/// Whether (and how) a pod is meshed, from its annotations and its
/// namespace's labels.
pub fn decide(pod: &Value, namespace: &Value) -> Option<Injection> {
    if pod
        .pointer("/spec/hostNetwork")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        return None;
    }
    let pod_says = str_at(pod, &format!("/metadata/annotations/{}", escape(MESH_KEY)));
    let ns_says = str_at(namespace, &format!("/metadata/labels/{}", escape(MESH_KEY)));
    let on = match pod_says {
        Some("disabled") => false,
        Some("enabled") => true,
        _ => ns_says == Some("enabled"),
    };
    if !on {
        return None;
    }
    let strict = str_at(namespace, &format!("/metadata/labels/{}", escape(MODE_KEY)))
        == Some("strict")
        || str_at(pod, &format!("/metadata/annotations/{}", escape(MODE_KEY))) == Some("strict");
    let allow = str_at(pod, &format!("/metadata/annotations/{}", escape(ALLOW_KEY)))
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    Some(Injection { strict, allow })
}

/// JSON pointer escaping of a key ("/" → "~1").
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The injected sidecar container.
pub fn sidecar_container(inj: &Injection, ca_address: &str, capture: bool) -> Value {
    let mut args = vec![
        "sidecar".to_owned(),
        "--ca-address".to_owned(),
        ca_address.to_owned(),
        "--mode".to_owned(),
        if inj.strict { "strict" } else { "permissive" }.to_owned(),
    ];
    if capture {
        args.push("--capture-maps".into());
        args.push(MAPS_MOUNT.into());
    }
    if !inj.allow.is_empty() {
        args.push("--allow".into());
        args.push(inj.allow.join(","));
    }
    let probe = |period: u32, failures: u32| {
        json!({"httpGet": {"path": "/ready", "port": ADMIN_PORT},
               "periodSeconds": period, "failureThreshold": failures, "timeoutSeconds": 1})
    };
    let mut c = json!({
        "name": SIDECAR_NAME,
        "image": "host",
        "command": ["skep"],
        "args": args,
        "restartPolicy": "Always",
        "env": [{"name": "RUST_LOG", "value": "info"}],
        // Ready (certificate in hand, listeners up) before the app starts.
        "startupProbe": probe(1, 120),
        "readinessProbe": probe(5, 3),
    });
    if capture {
        c["volumeMounts"] =
            json!([{"name": MAPS_VOLUME, "mountPath": MAPS_MOUNT, "readOnly": true}]);
    }
    c
}

/// Per-pod mesh state kept by the pod's worker.
#[derive(Debug, Default)]
pub(crate) struct PodMesh {
    /// None: not decided yet; Some(None): not meshed.
    decision: Option<Option<Injection>>,
    /// The capture is attached (cgroup dir, pod address).
    attached: Option<(PathBuf, Option<Ipv4Addr>)>,
    /// When the sidecar's identity was last read, and what was published.
    report_at: Option<std::time::Instant>,
    reported: Option<(String, u64)>,
}

/// Pod annotations the kubelet keeps from the sidecar's `/identity`
/// (read by `skep ctl mesh status`).
pub const IDENTITY_ANNOTATION: &str = "skep.io/mesh-identity";
pub const EXPIRY_ANNOTATION: &str = "skep.io/mesh-cert-not-after";
/// How often the sidecar's identity is read once published (it renews at
/// 70 % of 24 h, so this catches a renewal well before expiry).
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// Retry interval while the sidecar has no certificate yet.
const REPORT_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// GET http://ip:15020/identity → (SPIFFE ID, not-after in Unix seconds).
async fn read_identity(ip: IpAddr) -> Result<(String, u64), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect((ip, ADMIN_PORT))
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /identity HTTP/1.0\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.take(64 * 1024)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(buf)
    };
    let buf = tokio::time::timeout(std::time::Duration::from_secs(2), fetch)
        .await
        .map_err(|_| "timed out".to_owned())??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("").to_owned());
    }
    let v: Value = serde_json::from_str(body.trim()).map_err(|e| e.to_string())?;
    let id = str_at(&v, "/spiffeId").ok_or("no spiffeId")?.to_owned();
    let not_after = v
        .get("notAfterUnix")
        .and_then(Value::as_u64)
        .ok_or("no notAfterUnix")?;
    Ok((id, not_after))
}

impl PodMesh {
    pub(crate) fn decided(&self) -> bool {
        self.decision.is_some()
    }

    pub(crate) fn meshed(&self) -> bool {
        matches!(self.decision, Some(Some(_)))
    }

    /// Reads the pod's namespace and decides; an API error leaves it
    /// undecided (the worker retries at its next sync).
    pub(crate) async fn decide(
        &mut self,
        client: &skep_client::Client,
        pod: &Value,
    ) -> Result<(), String> {
        let ns = str_at(pod, "/metadata/namespace").unwrap_or("default");
        let namespace = client
            .get(&format!("/api/v1/namespaces/{ns}"))
            .await
            .map_err(|e| format!("reading namespace {ns}: {e}"))?;
        let mut d = decide(pod, &namespace);
        let capable = CONFIG
            .get()
            .is_some_and(|c| c.pin_root.is_some() && c.cgroup_parent.is_some());
        if d.is_some() && !capable {
            // The sidecar runs from the host image and relies on the eBPF
            // capture: the process runtime and a dataplane are needed.
            tracing::warn!(
                pod = str_at(pod, "/metadata/name").unwrap_or(""),
                namespace = ns,
                "meshed namespace, but this node has no process runtime with a \
                 dataplane (--bpf-root): the pod runs without a sidecar"
            );
            d = None;
        }
        if d.is_some() {
            tracing::info!(
                pod = str_at(pod, "/metadata/name").unwrap_or(""),
                namespace = ns,
                "meshed pod: injecting the sidecar"
            );
        }
        self.decision = Some(d);
        Ok(())
    }

    /// Puts the sidecar (and its volume) into the worker's copy of the pod;
    /// true when it was not there.
    pub(crate) fn apply(&self, pod: &mut Value) -> bool {
        let Some(Some(inj)) = &self.decision else {
            return false;
        };
        let has = pod
            .pointer("/spec/initContainers")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|c| str_at(c, "/name") == Some(SIDECAR_NAME)));
        if has {
            return false;
        }
        let cfg = CONFIG.get();
        let capture = cfg.is_some_and(|c| c.pin_root.is_some() && c.cgroup_parent.is_some());
        let ca = cfg
            .map(|c| c.ca_address.clone())
            .unwrap_or_else(|| format!("127.0.0.1:{CA_PORT}"));
        let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
            return false;
        };
        let inits = spec.entry("initContainers").or_insert_with(|| json!([]));
        if !inits.is_array() {
            *inits = json!([]);
        }
        if let Some(a) = inits.as_array_mut() {
            a.insert(0, sidecar_container(inj, &ca, capture));
        }
        if capture && let Some(root) = cfg.and_then(|c| c.pin_root.as_ref()) {
            let vols = spec.entry("volumes").or_insert_with(|| json!([]));
            if !vols.is_array() {
                *vols = json!([]);
            }
            if let Some(a) = vols.as_array_mut()
                && !a.iter().any(|v| str_at(v, "/name") == Some(MAPS_VOLUME))
            {
                a.push(json!({"name": MAPS_VOLUME,
                              "hostPath": {"path": root.join("maps").to_string_lossy(),
                                           "type": "Directory"}}));
            }
        }
        true
    }

    /// Publishes the sidecar's identity and certificate expiry as pod
    /// annotations when they change (rate-limited; failures are retried).
    pub(crate) async fn report(
        &mut self,
        client: &skep_client::Client,
        pod: &Value,
        ip: Option<IpAddr>,
    ) {
        if !self.meshed() {
            return;
        }
        let Some(ip) = ip else { return };
        let every = if self.reported.is_some() {
            REPORT_EVERY
        } else {
            REPORT_RETRY
        };
        if self.report_at.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.report_at = Some(std::time::Instant::now());
        let Ok((id, not_after)) = read_identity(ip).await else {
            return;
        };
        if self.reported.as_ref() == Some(&(id.clone(), not_after)) {
            return;
        }
        let ns = str_at(pod, "/metadata/namespace").unwrap_or("default");
        let name = str_at(pod, "/metadata/name").unwrap_or("");
        let expiry = chrono::DateTime::from_timestamp(not_after as i64, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        let patch = json!({"metadata": {"annotations": {
            IDENTITY_ANNOTATION: id, EXPIRY_ANNOTATION: expiry}}});
        match client
            .merge_patch(&format!("/api/v1/namespaces/{ns}/pods/{name}"), &patch)
            .await
        {
            Ok(_) => self.reported = Some((id, not_after)),
            Err(e) => {
                tracing::debug!(pod = name, error = %e, "publishing the mesh identity failed")
            }
        }
    }

    /// Attaches the capture to the pod's cgroup and records the pod as
    /// meshed (idempotent; a no-op for unmeshed pods).
    pub(crate) fn set_up(&mut self, uid: &str, ip: Option<IpAddr>) -> Result<(), String> {
        let Some(Some(inj)) = &self.decision else {
            return Ok(());
        };
        if self.attached.is_some() {
            return Ok(());
        }
        let Some(cfg) = CONFIG.get() else {
            return Ok(());
        };
        let (Some(root), Some(parent)) = (&cfg.pin_root, &cfg.cgroup_parent) else {
            return Err(
                "the mesh capture needs the process runtime and a dataplane \
                        (--bpf-root); the sidecar runs without outbound capture"
                    .into(),
            );
        };
        let dir = pod_cgroup_dir(parent, uid);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("creating the pod's cgroup {}: {e}", dir.display()))?;
        skep_dataplane::mesh::attach(root, &dir).map_err(|e| e.to_string())?;
        let v4 = match ip {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        };
        if let Some(a) = v4 {
            skep_dataplane::mesh::MeshPods::open(root)
                .and_then(|mut m| m.set(a, inj.strict))
                .map_err(|e| e.to_string())?;
        }
        tracing::info!(uid, cgroup = %dir.display(), ip = ?v4, strict = inj.strict, "mesh capture attached");
        self.attached = Some((dir, v4));
        Ok(())
    }

    /// Detaches the capture and forgets the pod's address (the runtime
    /// removes the cgroup directory with the last container; an empty one
    /// left behind is removed here).
    pub(crate) fn tear_down(&mut self) {
        let Some((dir, ip)) = self.attached.take() else {
            return;
        };
        let Some(root) = CONFIG.get().and_then(|c| c.pin_root.as_ref()) else {
            return;
        };
        if let Err(e) = skep_dataplane::mesh::detach(root, &dir) {
            tracing::warn!(error = %e, "detaching the mesh capture failed");
        }
        if let Some(a) = ip
            && let Err(e) = skep_dataplane::mesh::MeshPods::open(root).and_then(|mut m| m.remove(a))
        {
            tracing::warn!(error = %e, "removing the meshed pod entry failed");
        }
        let _ = std::fs::remove_dir(&dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_label_and_pod_annotation() {
        let ns_on = json!({"metadata": {"labels": {"skep.io/mesh": "enabled", "skep.io/mesh-mode": "strict"}}});
        let ns_off = json!({"metadata": {}});
        let pod = json!({"metadata": {"annotations": {"skep.io/mesh-allow": "spiffe://a/ns/x/sa/y, spiffe://b"}}, "spec": {}});
        let d = decide(&pod, &ns_on).unwrap();
        assert!(d.strict);
        assert_eq!(d.allow, vec!["spiffe://a/ns/x/sa/y", "spiffe://b"]);
        assert!(decide(&pod, &ns_off).is_none());
        let opt_in = json!({"metadata": {"annotations": {"skep.io/mesh": "enabled"}}, "spec": {}});
        assert_eq!(
            decide(&opt_in, &ns_off),
            Some(Injection {
                strict: false,
                allow: vec![]
            })
        );
        let opt_out =
            json!({"metadata": {"annotations": {"skep.io/mesh": "disabled"}}, "spec": {}});
        assert!(decide(&opt_out, &ns_on).is_none());
        let host = json!({"metadata": {}, "spec": {"hostNetwork": true}});
        assert!(decide(&host, &ns_on).is_none());
    }

    #[test]
    fn injection_adds_a_native_sidecar_once() {
        let mut m = PodMesh {
            decision: Some(Some(Injection {
                strict: false,
                allow: vec![],
            })),
            ..Default::default()
        };
        let mut pod = json!({"spec": {"containers": [{"name": "app"}]}});
        assert!(m.apply(&mut pod));
        assert!(!m.apply(&mut pod));
        let c = &pod["spec"]["initContainers"][0];
        assert_eq!(c["name"], SIDECAR_NAME);
        assert_eq!(c["restartPolicy"], "Always");
        assert_eq!(c["command"][0], "skep");
        m.decision = Some(None);
        let mut plain = json!({"spec": {"containers": [{"name": "app"}]}});
        assert!(!m.apply(&mut plain));
    }

    #[test]
    fn ca_address_from_server_url() {
        assert_eq!(
            ca_address_for("https://10.0.0.1:6443", "10.9.9.9"),
            "10.0.0.1:6445"
        );
        assert_eq!(
            ca_address_for("https://example.com", ""),
            "example.com:6445"
        );
        assert_eq!(
            ca_address_for("https://127.0.0.1:6443", "10.9.9.9"),
            "10.9.9.9:6445"
        );
    }
}
