//! Services → the eBPF load balancer: the agent watches Services and
//! EndpointSlices and keeps the dataplane's maps equal to what they say
//! (a full resync at start, then a resync after every batch of changes; the
//! dataplane applies only the differences).

use crate::json::str_at as s;
use futures::StreamExt;
use serde_json::Value;
use skep_client::{Client, WatchStream};
use skep_dataplane::lb::{Endpoint, EndpointState, Protocol, Service, ServicePort};
use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

/// Default ClientIP affinity timeout (Kubernetes': 3 hours).
const DEFAULT_AFFINITY: Duration = Duration::from_secs(10_800);
/// Changes arriving within this window are programmed together.
const BATCH: Duration = Duration::from_millis(20);

fn key(obj: &Value) -> String {
    format!(
        "{}/{}",
        s(obj, "/metadata/namespace").unwrap_or(""),
        s(obj, "/metadata/name").unwrap_or("")
    )
}

/// The dataplane form of a Service and its EndpointSlices; `None` for
/// services the load balancer does not handle (headless, ExternalName,
/// IPv6).
pub fn convert(svc: &Value, slices: &[&Value], node: &str) -> Option<Service> {
    let spec = svc.get("spec")?;
    if spec.get("type").and_then(Value::as_str) == Some("ExternalName") {
        return None;
    }
    let vip: Ipv4Addr = s(svc, "/spec/clusterIP")?.parse().ok()?;
    // Endpoint ports by name ("" for the unnamed port).
    let mut slice_ports: BTreeMap<String, u16> = BTreeMap::new();
    let mut endpoints: BTreeMap<Ipv4Addr, Endpoint> = BTreeMap::new();
    for slice in slices {
        if slice.get("addressType").and_then(Value::as_str) != Some("IPv4") {
            continue;
        }
        for p in slice
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(port) = p
                .get("port")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok())
            {
                slice_ports
                    .entry(
                        p.get("name")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                    )
                    .or_insert(port);
            }
        }
        for e in slice
            .get("endpoints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(addr) = e
                .pointer("/addresses/0")
                .and_then(Value::as_str)
                .and_then(|a| a.parse().ok())
            else {
                continue;
            };
            let cond = |c: &str| {
                e.pointer(&format!("/conditions/{c}"))
                    .and_then(Value::as_bool)
            };
            // Kubernetes: ready unset means ready; terminating endpoints that
            // still serve keep their connections.
            let state = if cond("terminating") == Some(true) {
                if cond("serving") == Some(false) {
                    continue;
                }
                EndpointState::Terminating
            } else if cond("ready") == Some(false) {
                continue;
            } else {
                EndpointState::Ready
            };
            endpoints.insert(
                addr,
                Endpoint {
                    addr,
                    state,
                    local: s(e, "/nodeName") == Some(node),
                },
            );
        }
    }
    let mut ports = Vec::new();
    for p in spec
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let protocol = match p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            _ => continue,
        };
        let port = u16::try_from(p.get("port").and_then(Value::as_u64)?).ok()?;
        let name = p.get("name").and_then(Value::as_str).unwrap_or("");
        // The endpoints' port of this service port: EndpointSlices name
        // their ports after the service ports, with named targetPorts
        // already resolved per pod.
        let target_port = slice_ports
            .get(name)
            .copied()
            .or_else(|| {
                p.get("targetPort")
                    .and_then(Value::as_u64)
                    .and_then(|n| u16::try_from(n).ok())
            })
            .unwrap_or(port);
        ports.push(ServicePort {
            port,
            protocol,
            target_port,
            node_port: p
                .get("nodePort")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok()),
        });
    }
    let session_affinity =
        (spec.get("sessionAffinity").and_then(Value::as_str) == Some("ClientIP")).then(|| {
            spec.pointer("/sessionAffinityConfig/clientIP/timeoutSeconds")
                .and_then(Value::as_u64)
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_AFFINITY)
        });
    let mut external_ips: Vec<Ipv4Addr> = spec
        .get("externalIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().and_then(|a| a.parse().ok()))
        .collect();
    external_ips.extend(
        svc.pointer("/status/loadBalancer/ingress")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|i| {
                i.get("ip")
                    .and_then(Value::as_str)
                    .and_then(|a| a.parse::<Ipv4Addr>().ok())
            }),
    );
    Some(Service {
        name: key(svc),
        vip,
        ports,
        endpoints: endpoints.into_values().collect(),
        session_affinity,
        internal_traffic_local: spec.get("internalTrafficPolicy").and_then(Value::as_str)
            == Some("Local"),
        external_traffic_local: spec.get("externalTrafficPolicy").and_then(Value::as_str)
            == Some("Local"),
        external_ips,
    })
}

/// The objects a resync is computed from.
#[derive(Default)]
struct Cache {
    services: BTreeMap<String, Value>,
    slices: BTreeMap<String, Value>,
}

impl Cache {
    fn apply(map: &mut BTreeMap<String, Value>, kind: &str, obj: Value) {
        match kind {
            "ADDED" | "MODIFIED" => {
                map.insert(key(&obj), obj);
            }
            "DELETED" => {
                map.remove(&key(&obj));
            }
            _ => {}
        }
    }

    fn desired(&self, node: &str) -> Vec<Service> {
        let mut by_service: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
        for slice in self.slices.values() {
            if let Some(svc) = s(slice, "/metadata/labels/kubernetes.io~1service-name") {
                let ns = s(slice, "/metadata/namespace").unwrap_or("");
                by_service
                    .entry(format!("{ns}/{svc}"))
                    .or_default()
                    .push(slice);
            }
        }
        self.services
            .iter()
            .filter_map(|(k, svc)| {
                convert(
                    svc,
                    by_service.get(k).map(Vec::as_slice).unwrap_or(&[]),
                    node,
                )
            })
            .collect()
    }
}

async fn list(
    client: &Client,
    path: &str,
    into: &mut BTreeMap<String, Value>,
) -> Result<String, skep_client::ClientError> {
    let list = client.get(path).await?;
    into.clear();
    for item in list
        .get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        into.insert(key(item), item.clone());
    }
    Ok(list
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("0")
        .to_owned())
}

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";

/// Keeps `lb` programmed from the API until the client fails for good;
/// every failure restarts from a full list.
pub async fn run(client: Client, lb: crate::network::SharedLb, node: String) {
    loop {
        if let Err(e) = sync(&client, &lb, &node).await {
            tracing::warn!(error = %e, "service sync failed; relisting");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Programs the dataplane (the lock is held only for the map updates).
fn resync(lb: &crate::network::SharedLb, services: Vec<Service>) -> Result<(), String> {
    let mut lb = lb
        .lock()
        .map_err(|_| "the load balancer lock is poisoned".to_string())?;
    lb.resync(services).map_err(|e| e.to_string())
}

async fn sync(client: &Client, lb: &crate::network::SharedLb, node: &str) -> Result<(), String> {
    let mut cache = Cache::default();
    let svc_rv = list(client, SERVICES, &mut cache.services)
        .await
        .map_err(|e| e.to_string())?;
    let slice_rv = list(client, SLICES, &mut cache.slices)
        .await
        .map_err(|e| e.to_string())?;
    resync(lb, cache.desired(node))?;
    tracing::info!(services = cache.services.len(), "services programmed");
    let mut services: WatchStream = client
        .watch(&format!(
            "{SERVICES}?resourceVersion={svc_rv}&allowWatchBookmarks=true"
        ))
        .await
        .map_err(|e| e.to_string())?;
    let mut slices: WatchStream = client
        .watch(&format!(
            "{SLICES}?resourceVersion={slice_rv}&allowWatchBookmarks=true"
        ))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let first = tokio::select! {
            e = services.next() => (true, e),
            e = slices.next() => (false, e),
        };
        let mut events = vec![first];
        // Whatever else arrives within the batch window goes along.
        let deadline = tokio::time::Instant::now() + BATCH;
        loop {
            let next = tokio::select! {
                e = services.next() => (true, e),
                e = slices.next() => (false, e),
                _ = tokio::time::sleep_until(deadline) => break,
            };
            events.push(next);
        }
        for (is_service, event) in events {
            let event = match event {
                None => return Err("the API server ended a watch".into()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(ev)) => ev,
            };
            if event.kind == "ERROR" {
                return Err(format!("watch error: {}", event.object));
            }
            let map = if is_service {
                &mut cache.services
            } else {
                &mut cache.slices
            };
            Cache::apply(map, &event.kind, event.object);
        }
        resync(lb, cache.desired(node))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn services_and_slices_become_dataplane_services() {
        let svc = json!({"metadata": {"name": "web", "namespace": "d"},
            "spec": {"clusterIP": "10.43.0.20", "sessionAffinity": "ClientIP",
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                               {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]}});
        let slice = json!({"metadata": {"name": "web-x", "namespace": "d", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.42.0.5"], "conditions": {"ready": true}, "nodeName": "n1"},
                {"addresses": ["10.42.1.5"], "conditions": {"ready": false, "serving": true, "terminating": true}, "nodeName": "n2"},
                {"addresses": ["10.42.1.6"], "conditions": {"ready": false}, "nodeName": "n2"}]});
        let s = convert(&svc, &[&slice], "n1").unwrap();
        assert_eq!(s.vip, Ipv4Addr::new(10, 43, 0, 20));
        assert_eq!(
            s.ports[0].target_port, 8080,
            "named targetPort resolved through the slice"
        );
        assert_eq!(s.ports[1].protocol, Protocol::Udp);
        assert_eq!(s.session_affinity, Some(DEFAULT_AFFINITY));
        assert_eq!(s.endpoints.len(), 2, "unready endpoints are left out");
        assert!(s.endpoints[0].local && s.endpoints[0].state == EndpointState::Ready);
        assert_eq!(s.endpoints[1].state, EndpointState::Terminating);
        let headless = json!({"metadata": {"name": "h", "namespace": "d"}, "spec": {"clusterIP": "None", "ports": []}});
        assert!(convert(&headless, &[], "n1").is_none());
    }
}
