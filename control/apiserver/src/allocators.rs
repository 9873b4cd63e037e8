//! Cluster IPs (from the service CIDR, 10.43.0.0/16) and node ports
//! (30000–32767) for Services. Each allocation is a key in the store,
//! claimed with a create (so two servers never hand out the same address)
//! and released when the Service goes.

use crate::{
    api::Api,
    resources::ResourceInfo,
    status::{ApiError, Cause},
};
use serde_json::{Value, json};
use std::net::Ipv4Addr;

/// Service CIDR base and size (10.43.0.0/16).
const SERVICE_NET: u32 = u32::from_be_bytes([10, 43, 0, 0]);
const SERVICE_SIZE: u32 = 1 << 16;
const NODE_PORT_MIN: u32 = 30000;
const NODE_PORT_MAX: u32 = 32767;
const IP_PREFIX: &str = "/registry/ranges/serviceips/";
const PORT_PREFIX: &str = "/registry/ranges/servicenodeports/";

/// Pod CIDRs: one /24 per node out of the cluster CIDR 10.42.0.0/16.
const CIDR_PREFIX: &str = "/registry/ranges/podcidrs/";

fn is_node(info: &ResourceInfo) -> bool {
    info.group.is_empty() && info.plural == "nodes"
}

/// Gives a new Node the first free /24 of 10.42.0.0/16 (kept if the node
/// object already names one it can claim).
async fn node_cidr(api: &Api, obj: &mut Value) -> Result<Vec<String>, ApiError> {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let wanted = obj
        .pointer("/spec/podCIDR")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let candidates: Vec<String> = match wanted {
        Some(c) => vec![c],
        None => (0..=255u32).map(|i| format!("10.42.{i}.0/24")).collect(),
    };
    for cidr in candidates {
        let key = format!("{CIDR_PREFIX}{}", cidr.replace('/', "_"));
        if claim(api, &key, &name).await? {
            let spec = obj
                .as_object_mut()
                .ok_or_else(|| ApiError::bad_request("a Node must be an object"))?
                .entry("spec")
                .or_insert_with(|| json!({}));
            spec["podCIDR"] = json!(cidr);
            spec["podCIDRs"] = json!([cidr]);
            return Ok(vec![key]);
        }
    }
    Err(ApiError::internal(
        "no free /24 left in the cluster CIDR 10.42.0.0/16 (256 nodes)",
    ))
}

fn is_service(info: &ResourceInfo) -> bool {
    info.group.is_empty() && info.plural == "services"
}

/// Whether creating an object of this resource allocates something
/// ([`on_create`]) that a failed create must give back.
pub fn allocates(info: &ResourceInfo) -> bool {
    is_node(info) || is_service(info)
}

fn hash(s: &str) -> u32 {
    // FNV-1a: stable across restarts, spreads names over the range.
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

async fn claim(api: &Api, key: &str, owner: &str) -> Result<bool, ApiError> {
    match api
        .store
        .create(key, bytes::Bytes::from(owner.to_owned()))
        .await
    {
        Ok(_) => Ok(true),
        Err(skep_store::StoreError::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(ApiError::internal(format!("allocating {key}: {e}"))),
    }
}

/// Allocates what a new object needs; returns the claimed keys (released
/// again if the create fails).
pub async fn on_create(
    api: &Api,
    info: &ResourceInfo,
    obj: &mut Value,
) -> Result<Vec<String>, ApiError> {
    if is_node(info) {
        return node_cidr(api, obj).await;
    }
    if !is_service(info) {
        return Ok(Vec::new());
    }
    let owner = format!(
        "{}/{}",
        obj.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or(""),
        obj.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
    );
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let ty = obj
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_owned();
    let mut claimed = Vec::new();
    if ty != "ExternalName" {
        let requested = obj
            .pointer("/spec/clusterIP")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let ip = if requested == "None" {
            None
        } else if !requested.is_empty() {
            let ip: Ipv4Addr = requested.parse().map_err(|_| {
                ApiError::invalid(
                    "Service",
                    &name,
                    vec![Cause::invalid(
                        "spec.clusterIP",
                        format!("Invalid value: {requested:?}: must be a valid IP address"),
                    )],
                )
            })?;
            let n = u32::from(ip);
            if !(SERVICE_NET..SERVICE_NET + SERVICE_SIZE).contains(&n) {
                return Err(ApiError::invalid(
                    "Service",
                    &name,
                    vec![Cause::invalid(
                        "spec.clusterIP",
                        format!(
                            "Invalid value: {requested:?}: provided IP is not in the valid range. The range of valid IPs is 10.43.0.0/16"
                        ),
                    )],
                ));
            }
            let key = format!("{IP_PREFIX}{ip}");
            if !claim(api, &key, &owner).await? {
                return Err(ApiError::invalid(
                    "Service",
                    &name,
                    vec![Cause::invalid(
                        "spec.clusterIP",
                        format!("Invalid value: {requested:?}: provided IP is already allocated"),
                    )],
                ));
            }
            claimed.push(key);
            Some(ip)
        } else {
            // Skip .0 (network), .1 (kubernetes) and .10 (kube-dns), which
            // are only handed out when asked for explicitly.
            let start = hash(&owner) % SERVICE_SIZE;
            let mut found = None;
            for i in 0..SERVICE_SIZE {
                let off = (start + i) % SERVICE_SIZE;
                if matches!(off, 0 | 1 | 10) || off == SERVICE_SIZE - 1 {
                    continue;
                }
                let ip = Ipv4Addr::from(SERVICE_NET + off);
                let key = format!("{IP_PREFIX}{ip}");
                if claim(api, &key, &owner).await? {
                    claimed.push(key);
                    found = Some(ip);
                    break;
                }
            }
            Some(
                found.ok_or_else(|| {
                    ApiError::internal("the service IP range 10.43.0.0/16 is full")
                })?,
            )
        };
        let spec = obj.get_mut("spec").and_then(Value::as_object_mut);
        if let Some(spec) = spec {
            match ip {
                Some(ip) => {
                    spec.insert("clusterIP".into(), json!(ip.to_string()));
                    spec.insert("clusterIPs".into(), json!([ip.to_string()]));
                }
                None => {
                    spec.insert("clusterIPs".into(), json!(["None"]));
                }
            }
        }
    }
    if matches!(ty.as_str(), "NodePort" | "LoadBalancer") {
        let ports = obj.pointer_mut("/spec/ports").and_then(Value::as_array_mut);
        for (i, p) in ports.into_iter().flatten().enumerate() {
            let wanted = p.get("nodePort").and_then(Value::as_u64).map(|n| n as u32);
            let port = match wanted {
                Some(n) => {
                    if !(NODE_PORT_MIN..=NODE_PORT_MAX).contains(&n) {
                        release(api, &claimed).await;
                        return Err(ApiError::invalid(
                            "Service",
                            &name,
                            vec![Cause::invalid(
                                format!("spec.ports[{i}].nodePort"),
                                format!(
                                    "Invalid value: {n}: provided port is not in the valid range. The range of valid ports is 30000-32767"
                                ),
                            )],
                        ));
                    }
                    let key = format!("{PORT_PREFIX}{n}");
                    if !claim(api, &key, &owner).await? {
                        release(api, &claimed).await;
                        return Err(ApiError::invalid(
                            "Service",
                            &name,
                            vec![Cause::invalid(
                                format!("spec.ports[{i}].nodePort"),
                                format!("Invalid value: {n}: provided port is already allocated"),
                            )],
                        ));
                    }
                    claimed.push(key);
                    n
                }
                None => {
                    let span = NODE_PORT_MAX - NODE_PORT_MIN + 1;
                    let start = hash(&format!("{owner}/{i}")) % span;
                    let mut got = None;
                    for k in 0..span {
                        let n = NODE_PORT_MIN + (start + k) % span;
                        let key = format!("{PORT_PREFIX}{n}");
                        if claim(api, &key, &owner).await? {
                            claimed.push(key);
                            got = Some(n);
                            break;
                        }
                    }
                    match got {
                        Some(n) => n,
                        None => {
                            release(api, &claimed).await;
                            return Err(ApiError::internal(
                                "the node port range 30000-32767 is full",
                            ));
                        }
                    }
                }
            };
            p["nodePort"] = json!(port);
        }
    }
    Ok(claimed)
}

/// Keeps allocated fields stable across updates.
pub fn on_update(info: &ResourceInfo, current: &Value, next: &mut Value) -> Result<(), ApiError> {
    if is_node(info) {
        // The pod CIDR is assigned once and never moves.
        for f in ["podCIDR", "podCIDRs"] {
            if let Some(v) = current.pointer(&format!("/spec/{f}")) {
                next["spec"][f] = v.clone();
            }
        }
        return Ok(());
    }
    if !is_service(info) {
        return Ok(());
    }
    let name = current
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let cur_ip = current.pointer("/spec/clusterIP").cloned();
    match (cur_ip, next.pointer("/spec/clusterIP").cloned()) {
        (Some(c), None) | (Some(c), Some(Value::Null)) => {
            next["spec"]["clusterIP"] = c;
            if let Some(ips) = current.pointer("/spec/clusterIPs") {
                next["spec"]["clusterIPs"] = ips.clone();
            }
        }
        (Some(c), Some(n)) if c != n && n != json!("") => {
            return Err(ApiError::invalid(
                "Service",
                name,
                vec![Cause::invalid(
                    "spec.clusterIP",
                    format!("Invalid value: {n}: field is immutable"),
                )],
            ));
        }
        (Some(c), Some(_)) => {
            next["spec"]["clusterIP"] = c;
            if let Some(ips) = current.pointer("/spec/clusterIPs") {
                next["spec"]["clusterIPs"] = ips.clone();
            }
        }
        _ => {}
    }
    // Node ports of ports that stay keep their numbers.
    let cur_ports: Vec<Value> = current
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if let Some(ports) = next
        .pointer_mut("/spec/ports")
        .and_then(Value::as_array_mut)
    {
        for p in ports {
            if p.get("nodePort").is_none()
                && let Some(old) = cur_ports.iter().find(|o| {
                    o.get("port") == p.get("port") && o.get("protocol") == p.get("protocol")
                })
                && let Some(np) = old.get("nodePort")
            {
                p["nodePort"] = np.clone();
            }
        }
    }
    Ok(())
}

/// Releases what a deleted object held.
pub async fn on_delete(api: &Api, info: &ResourceInfo, obj: &Value) {
    if is_node(info) {
        if let Some(cidr) = obj.pointer("/spec/podCIDR").and_then(Value::as_str) {
            release(api, &[format!("{CIDR_PREFIX}{}", cidr.replace('/', "_"))]).await;
        }
        return;
    }
    if !is_service(info) {
        return;
    }
    let mut keys = Vec::new();
    if let Some(ip) = obj.pointer("/spec/clusterIP").and_then(Value::as_str)
        && ip != "None"
        && !ip.is_empty()
    {
        keys.push(format!("{IP_PREFIX}{ip}"));
    }
    for p in obj
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(n) = p.get("nodePort").and_then(Value::as_u64) {
            keys.push(format!("{PORT_PREFIX}{n}"));
        }
    }
    release(api, &keys).await;
}

pub async fn release(api: &Api, keys: &[String]) {
    for key in keys {
        if let Err(e) = api.store.delete(key, None).await
            && !matches!(e, skep_store::StoreError::NotFound { .. })
        {
            tracing::warn!(%key, error = %e, "could not release an allocation");
        }
    }
}
