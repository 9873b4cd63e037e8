//! `skep ctl mesh status`: meshed namespaces (mode), and per meshed pod its
//! SPIFFE identity and certificate expiry.
//!
//! The identity comes from the pod's annotations `skep.io/mesh-identity`
//! and `skep.io/mesh-cert-not-after`, which the node's kubelet copies from
//! the sidecar's admin endpoint (`/identity` on port 15020) once it holds a
//! certificate and again after each renewal (the API has no pod proxy to
//! ask the sidecar directly). A pod whose sidecar has not reported yet
//! shows its expected identity from the service account and `pending`.

use anyhow::Result;
use serde_json::Value;
use skep_client::Client;

#[derive(Debug, clap::Subcommand)]
pub enum MeshCommand {
    /// Meshed namespaces and workloads, identities, certificate expiry.
    Status {
        /// Only this namespace (default: every meshed one).
        #[arg(long)]
        only: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

const SIDECAR: &str = "skep-mesh-proxy";

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or("")
}

fn items(v: &Value) -> Vec<Value> {
    v.get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// One meshed pod as reported.
#[derive(Debug, serde::Serialize)]
struct Row {
    namespace: String,
    pod: String,
    workload: String,
    node: String,
    mode: String,
    identity: String,
    cert_not_after: String,
    sidecar_ready: bool,
    sidecar_restarts: u64,
}

/// The owner a pod belongs to (ReplicaSet names lose their hash suffix).
fn workload(pod: &Value) -> String {
    let owner = pod
        .pointer("/metadata/ownerReferences/0")
        .cloned()
        .unwrap_or(Value::Null);
    let kind = s(&owner, "/kind");
    let name = s(&owner, "/name");
    match kind {
        "" => format!("pod/{}", s(pod, "/metadata/name")),
        "ReplicaSet" => match name.rsplit_once('-') {
            Some((deploy, _)) => format!("deployment/{deploy}"),
            None => format!("replicaset/{name}"),
        },
        k => format!("{}/{name}", k.to_lowercase()),
    }
}

pub async fn run(client: &Client, cmd: MeshCommand) -> Result<()> {
    let MeshCommand::Status { only, json } = cmd;
    let namespaces = items(&client.get("/api/v1/namespaces").await?);
    let mut rows = Vec::new();
    let mut meshed_ns = Vec::new();
    for ns in &namespaces {
        let name = s(ns, "/metadata/name").to_owned();
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let mode = match s(ns, "/metadata/labels/skep.io~1mesh-mode") {
            "strict" => "strict",
            _ => "permissive",
        }
        .to_owned();
        let ns_on = s(ns, "/metadata/labels/skep.io~1mesh") == "enabled";
        if ns_on {
            meshed_ns.push((name.clone(), mode.clone()));
        }
        let pods = items(
            &client
                .get(&format!("/api/v1/namespaces/{name}/pods"))
                .await?,
        );
        for pod in pods {
            // Injected pods report the sidecar among their init containers.
            let sidecar = pod
                .pointer("/status/initContainerStatuses")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().find(|c| s(c, "/name") == SIDECAR).cloned());
            let Some(sidecar) = sidecar else { continue };
            let sa = match s(&pod, "/spec/serviceAccountName") {
                "" => "default",
                sa => sa,
            };
            let reported = s(&pod, "/metadata/annotations/skep.io~1mesh-identity");
            let identity = if reported.is_empty() {
                format!("spiffe://cluster.local/ns/{name}/sa/{sa} (pending)")
            } else {
                reported.to_owned()
            };
            let expiry = match s(&pod, "/metadata/annotations/skep.io~1mesh-cert-not-after") {
                "" => "pending".to_owned(),
                e => e.to_owned(),
            };
            rows.push(Row {
                namespace: name.clone(),
                pod: s(&pod, "/metadata/name").to_owned(),
                workload: workload(&pod),
                node: s(&pod, "/spec/nodeName").to_owned(),
                mode: mode.clone(),
                identity,
                cert_not_after: expiry,
                sidecar_ready: sidecar.get("ready").and_then(Value::as_bool) == Some(true),
                sidecar_restarts: sidecar
                    .get("restartCount")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
            });
        }
    }
    if json {
        let namespaces: Vec<Value> = meshed_ns
            .iter()
            .map(|(n, m)| serde_json::json!({"name": n, "mode": m}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "namespaces": namespaces, "pods": rows}))?
        );
        return Ok(());
    }
    if meshed_ns.is_empty() {
        println!("no meshed namespace (label one with skep.io/mesh=enabled)");
    } else {
        println!("NAMESPACE            MODE");
        for (n, m) in &meshed_ns {
            println!("{n:<20} {m}");
        }
    }
    println!();
    if rows.is_empty() {
        println!("no meshed pods");
        return Ok(());
    }
    println!(
        "{:<14} {:<28} {:<24} {:<6} {:<8} {:<52} CERT NOT AFTER",
        "NAMESPACE", "POD", "WORKLOAD", "READY", "RESTARTS", "IDENTITY"
    );
    for r in &rows {
        println!(
            "{:<14} {:<28} {:<24} {:<6} {:<8} {:<52} {}",
            r.namespace,
            r.pod,
            r.workload,
            if r.sidecar_ready { "yes" } else { "no" },
            r.sidecar_restarts,
            r.identity,
            r.cert_not_after
        );
    }
    Ok(())
}
