//! EndpointSlice and Endpoints controller: for each Service with a
//! selector, the pods it selects that have an IP, with conditions
//! (ready: Ready and not terminating; serving: Ready; terminating: being
//! deleted) and ports resolved per pod (a named targetPort is looked up in
//! that pod's containers, so pods may differ). Slices hold at most 100
//! endpoints, carry `kubernetes.io/service-name` and are owned by the
//! Service. The legacy Endpoints object lists ready addresses and
//! not-ready ones (terminating pods are left out, as upstream).
//!
//! `default/kubernetes` has no selector; it points at the API server's own
//! address.

use crate::{
    client::{Client, ENDPOINT_SLICES, ENDPOINTS, PODS, SERVICES},
    error::Result,
    informer::{Change, Informer, Informers},
    meta,
    queue::Queue,
    runner::{Reconciler, Requeue},
};
use serde_json::{Value, json};
use skep_apiserver::selectors::LabelSelector;
use std::{collections::BTreeMap, sync::Arc};

pub const MAX_PER_SLICE: usize = 100;
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

#[derive(Debug)]
pub struct EndpointsController {
    client: Client,
    services: Arc<Informer>,
    pods: Arc<Informer>,
    slices: Arc<Informer>,
    endpoints: Arc<Informer>,
}

/// The selector of a Service; `None` for selector-less Services (their
/// endpoints are someone else's).
fn service_selector(svc: &Value) -> Option<LabelSelector> {
    let sel = svc.pointer("/spec/selector")?.as_object()?;
    if sel.is_empty() {
        return None;
    }
    LabelSelector::from_json(&json!({"matchLabels": sel})).ok()
}

/// A resolved port: (name, port, protocol, appProtocol).
type Port = (String, i64, String, Option<String>);

/// The ports of `svc` as `pod` serves them; a port whose named target the
/// pod lacks is left out.
fn resolve_ports(svc: &Value, pod: &Value) -> Vec<Port> {
    let container_ports: Vec<&Value> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|c| {
            c.get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .collect();
    let mut out = Vec::new();
    for sp in svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = sp
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let protocol = sp
            .get("protocol")
            .and_then(Value::as_str)
            .unwrap_or("TCP")
            .to_owned();
        let app = sp
            .get("appProtocol")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let port = match sp.get("targetPort") {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => match s.parse::<i64>() {
                Ok(n) => Some(n),
                Err(_) => container_ports
                    .iter()
                    .find(|cp| {
                        cp.get("name").and_then(Value::as_str) == Some(s.as_str())
                            && cp.get("protocol").and_then(Value::as_str).unwrap_or("TCP")
                                == protocol
                    })
                    .and_then(|cp| cp.get("containerPort"))
                    .and_then(Value::as_i64),
            },
            _ => sp.get("port").and_then(Value::as_i64),
        };
        if let Some(p) = port {
            out.push((name, p, protocol, app));
        }
    }
    out
}

fn ports_json(ports: &[Port]) -> Value {
    Value::Array(
        ports
            .iter()
            .map(|(name, port, protocol, app)| {
                let mut p = json!({"name": name, "port": port, "protocol": protocol});
                if let Some(a) = app {
                    p["appProtocol"] = json!(a);
                }
                p
            })
            .collect(),
    )
}

fn pod_ip(p: &Value) -> Option<&str> {
    p.pointer("/status/podIP")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn target_ref(p: &Value) -> Value {
    json!({"kind": "Pod", "namespace": meta::namespace(p), "name": meta::name(p), "uid": meta::uid(p)})
}

fn endpoint_of(p: &Value) -> Value {
    let ready = meta::pod_ready(p);
    let terminating = meta::is_deleting(p);
    let mut e = json!({
        "addresses": [pod_ip(p)],
        "conditions": {"ready": ready && !terminating, "serving": ready, "terminating": terminating},
        "targetRef": target_ref(p),
    });
    if !meta::node_name(p).is_empty() {
        e["nodeName"] = json!(meta::node_name(p));
    }
    if let Some(h) = p.pointer("/spec/hostname").and_then(Value::as_str) {
        e["hostname"] = json!(h);
    }
    e
}

impl EndpointsController {
    pub fn start(
        client: &Client,
        informers: &Informers,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let queue = Queue::new();
        let c = Arc::new(Self {
            client: client.clone(),
            services: informers.get_or_create(client.info(SERVICES)?),
            pods: informers.get_or_create(client.info(PODS)?),
            slices: informers.get_or_create(client.info(ENDPOINT_SLICES)?),
            endpoints: informers.get_or_create(client.info(ENDPOINTS)?),
        });
        c.services.on_change(crate::enqueue::own_key(&queue));
        let q = queue.clone();
        let services = c.services.clone();
        c.pods.on_change(Arc::new(move |ch: &Change| {
            // Only changes that can alter an endpoint matter.
            if let (Some(o), Some(n)) = (&ch.old, &ch.new) {
                let same = pod_ip(o) == pod_ip(n)
                    && meta::pod_ready(o) == meta::pod_ready(n)
                    && meta::is_deleting(o) == meta::is_deleting(n)
                    && meta::labels(o) == meta::labels(n)
                    && meta::node_name(o) == meta::node_name(n);
                if same {
                    return;
                }
            }
            let Some(ns) = ch.object().and_then(|p| meta::namespace(p)) else {
                return;
            };
            let label_sets: Vec<_> = [&ch.old, &ch.new]
                .into_iter()
                .flatten()
                .map(|p| meta::labels(p))
                .collect();
            for svc in services.list_ns(ns) {
                if let Some(sel) = service_selector(&svc)
                    && label_sets.iter().any(|l| sel.matches(l))
                {
                    q.add(meta::key(&svc));
                }
            }
        }));
        for inf in [&c.slices, &c.endpoints] {
            let q = queue.clone();
            inf.on_change(Arc::new(move |ch: &Change| {
                // Someone else changed or removed what we maintain.
                let Some(o) = ch.object() else { return };
                let Some(ns) = meta::namespace(o) else { return };
                let svc = meta::labels(o)
                    .get(SERVICE_NAME_LABEL)
                    .cloned()
                    .unwrap_or_else(|| meta::name(o).to_owned());
                q.add(format!("{ns}/{svc}"));
            }));
        }
        Ok(crate::runner::spawn(c, queue, 2))
    }

    fn owned_slices(&self, ns: &str, svc: &str) -> Vec<Arc<Value>> {
        self.slices
            .list_ns(ns)
            .into_iter()
            .filter(|s| {
                let l = meta::labels(s);
                l.get(SERVICE_NAME_LABEL).map(String::as_str) == Some(svc)
                    && l.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
            })
            .collect()
    }

    /// Makes the Service's slices hold exactly `desired` (ports, endpoints)
    /// groups, updating existing slices in place where possible.
    async fn sync_slices(
        &self,
        svc: &Value,
        desired: Vec<(Vec<Port>, Vec<Value>)>,
        fixed_name: Option<&str>,
    ) -> Result<()> {
        let ns = meta::namespace(svc).unwrap_or("default");
        let name = meta::name(svc);
        let mut existing = self.owned_slices(ns, name);
        existing.sort_by_key(|s| meta::name(s).to_owned());
        let mut existing = existing.into_iter();
        for (ports, endpoints) in desired {
            let body = |base: Value| {
                let mut s = base;
                s["addressType"] = json!("IPv4");
                s["ports"] = ports_json(&ports);
                s["endpoints"] = json!(endpoints);
                s
            };
            match existing.next() {
                Some(cur) => {
                    let next = body((*cur).clone());
                    if next != *cur {
                        self.client.update(ENDPOINT_SLICES, Some(ns), next).await?;
                    }
                }
                None => {
                    let mut metadata = json!({
                        "namespace": ns,
                        "labels": {SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY},
                        "ownerReferences": [meta::controller_ref(svc, "v1", "Service")],
                    });
                    match fixed_name {
                        Some(n) => metadata["name"] = json!(n),
                        None => metadata["generateName"] = json!(format!("{name}-")),
                    }
                    let s = body(json!({"apiVersion": "discovery.k8s.io/v1",
                                        "kind": "EndpointSlice", "metadata": metadata}));
                    match self.client.create(ENDPOINT_SLICES, Some(ns), s).await {
                        Ok(_) => {}
                        Err(e) if e.is_already_exists() => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        for extra in existing {
            crate::client::ignore_not_found(
                self.client
                    .delete(
                        ENDPOINT_SLICES,
                        Some(ns),
                        meta::name(&extra),
                        Some(meta::uid(&extra)),
                    )
                    .await,
            )?;
        }
        Ok(())
    }

    async fn sync_endpoints(&self, svc: &Value, subsets: Vec<Value>) -> Result<()> {
        let ns = meta::namespace(svc).unwrap_or("default");
        let name = meta::name(svc);
        let mut labels = svc
            .pointer("/metadata/labels")
            .cloned()
            .unwrap_or(json!({}));
        labels[SERVICE_NAME_LABEL] = json!(name);
        match self.endpoints.get(&format!("{ns}/{name}")) {
            Some(cur) => {
                let mut next = (*cur).clone();
                next["subsets"] = json!(subsets);
                next["metadata"]["labels"] = labels;
                if next != *cur {
                    self.client.update(ENDPOINTS, Some(ns), next).await?;
                }
            }
            None => {
                let ep = json!({"apiVersion": "v1", "kind": "Endpoints",
                    "metadata": {"name": name, "namespace": ns, "labels": labels},
                    "subsets": subsets});
                match self.client.create(ENDPOINTS, Some(ns), ep).await {
                    Ok(_) => {}
                    Err(e) if e.is_already_exists() => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// `default/kubernetes`: the API server itself.
    async fn sync_apiserver(&self, svc: &Value) -> Result<()> {
        let addr = &self.client.api.server_address;
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr.as_str(), "6443"));
        let port: i64 = port.parse().unwrap_or(6443);
        let ports = vec![("https".to_owned(), port, "TCP".to_owned(), None)];
        let endpoint = json!({"addresses": [host], "conditions": {"ready": true, "serving": true, "terminating": false}});
        self.sync_slices(
            svc,
            vec![(ports.clone(), vec![endpoint])],
            Some("kubernetes"),
        )
        .await?;
        self.sync_endpoints(
            svc,
            vec![json!({"addresses": [{"ip": host}], "ports": ports_json(&ports)})],
        )
        .await
    }
}

#[async_trait::async_trait]
impl Reconciler for EndpointsController {
    fn name(&self) -> &'static str {
        "endpointslice"
    }

    async fn reconcile(&self, key: &str) -> Result<Requeue> {
        let Some(svc) = self.services.get(key) else {
            // Slices go with their owner (garbage collector); the
            // ownerless Endpoints object is ours to remove.
            let (ns, name) = meta::split_key(key);
            if let Some(ep) = self.endpoints.get(key) {
                crate::client::ignore_not_found(
                    self.client
                        .delete(ENDPOINTS, ns, name, Some(meta::uid(&ep)))
                        .await,
                )?;
            }
            return Ok(Requeue::No);
        };
        if meta::is_deleting(&svc) {
            return Ok(Requeue::No);
        }
        if key == "default/kubernetes" {
            self.sync_apiserver(&svc).await?;
            return Ok(Requeue::No);
        }
        let Some(selector) = service_selector(&svc) else {
            return Ok(Requeue::No);
        };
        let ns = meta::namespace(&svc).unwrap_or("default").to_owned();
        let publish_not_ready = svc
            .pointer("/spec/publishNotReadyAddresses")
            .and_then(Value::as_bool)
            == Some(true);
        let mut pods: Vec<Arc<Value>> = self
            .pods
            .list_ns(&ns)
            .into_iter()
            .filter(|p| {
                pod_ip(p).is_some() && !meta::pod_terminal(p) && selector.matches(&meta::labels(p))
            })
            .collect();
        pods.sort_by_key(|p| meta::name(p).to_owned());

        // Group by resolved ports: pods that resolve a named port
        // differently land in different slices.
        let mut groups: BTreeMap<Vec<Port>, Vec<Arc<Value>>> = BTreeMap::new();
        for p in &pods {
            groups
                .entry(resolve_ports(&svc, p))
                .or_default()
                .push(p.clone());
        }
        let mut desired = Vec::new();
        let mut subsets = Vec::new();
        for (ports, group) in &groups {
            let endpoints: Vec<Value> = group.iter().map(|p| endpoint_of(p)).collect();
            for chunk in endpoints.chunks(MAX_PER_SLICE) {
                desired.push((ports.clone(), chunk.to_vec()));
            }
            if ports.is_empty() {
                continue;
            }
            let mut ready = Vec::new();
            let mut not_ready = Vec::new();
            for p in group {
                if meta::is_deleting(p) && !publish_not_ready {
                    continue;
                }
                let mut a = json!({"ip": pod_ip(p), "targetRef": target_ref(p)});
                if !meta::node_name(p).is_empty() {
                    a["nodeName"] = json!(meta::node_name(p));
                }
                if meta::pod_ready(p) || publish_not_ready {
                    ready.push(a);
                } else {
                    not_ready.push(a);
                }
            }
            if ready.is_empty() && not_ready.is_empty() {
                continue;
            }
            let mut subset = json!({"ports": ports_json(ports)});
            if !ready.is_empty() {
                subset["addresses"] = json!(ready);
            }
            if !not_ready.is_empty() {
                subset["notReadyAddresses"] = json!(not_ready);
            }
            subsets.push(subset);
        }
        if desired.is_empty() {
            // An empty slice still tells consumers the Service has no
            // endpoints (rather than not being processed yet).
            let ports: Vec<Port> = Vec::new();
            desired.push((ports, Vec::new()));
        }
        self.sync_slices(&svc, desired, None).await?;
        self.sync_endpoints(&svc, subsets).await?;
        Ok(Requeue::No)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_target_ports_resolve_per_pod() {
        let svc = json!({"spec": {"ports": [
            {"name": "web", "port": 80, "targetPort": "http", "protocol": "TCP"},
            {"name": "raw", "port": 81, "targetPort": 9000, "protocol": "TCP"}]}});
        let a = json!({"spec": {"containers": [{"ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]}});
        let b =
            json!({"spec": {"containers": [{"ports": [{"name": "http", "containerPort": 8081}]}]}});
        let c = json!({"spec": {"containers": [{}]}});
        assert_eq!(resolve_ports(&svc, &a)[0].1, 8080);
        assert_eq!(resolve_ports(&svc, &b)[0].1, 8081);
        assert_eq!(resolve_ports(&svc, &c).len(), 1);
        assert_eq!(resolve_ports(&svc, &c)[0].1, 9000);
    }

    #[test]
    fn conditions_follow_readiness_and_deletion() {
        let p = json!({"metadata": {"name": "p", "deletionTimestamp": "2024-01-01T00:00:00Z"},
            "status": {"podIP": "10.42.0.5", "conditions": [{"type": "Ready", "status": "True"}]}});
        let e = endpoint_of(&p);
        assert_eq!(
            e["conditions"],
            json!({"ready": false, "serving": true, "terminating": true})
        );
    }
}
