//! `metrics.k8s.io/v1beta1`: NodeMetrics and PodMetrics (what `kubectl
//! top` and the HorizontalPodAutoscaler read), served by the API server
//! itself instead of an aggregated metrics-server.
//!
//! Usage comes from each node's kubelet endpoint, `GET /stats/summary`
//! (see `skep_kubelet::stats`), fetched with the API server's
//! kubelet-client certificate like the node proxy does, all nodes at once,
//! and kept for [`CACHE_TTL`] so `kubectl top` and the HPA do not multiply
//! the requests. A node that does not answer is left out (its pods have no
//! metrics); a pod whose containers do not all have a CPU rate yet (the
//! kubelet needs two readings) is left out, as metrics-server does.
//!
//! Paths: `/apis/metrics.k8s.io[/v1beta1]` (discovery),
//! `/apis/metrics.k8s.io/v1beta1/nodes[/NAME]`,
//! `/apis/metrics.k8s.io/v1beta1/[namespaces/NS/]pods[/NAME]` with
//! `labelSelector` and `fieldSelector=metadata.name=…` on lists. RBAC:
//! resources `nodes` and `pods` in group `metrics.k8s.io`, verbs get/list.

use crate::{
    api::{Api, Query},
    pki::Credentials,
    rbac,
    routes::ResourceRoute,
    selectors::LabelSelector,
    status::ApiError,
};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio_rustls::TlsConnector;

pub const GROUP: &str = "metrics.k8s.io";
pub const VERSION: &str = "v1beta1";
/// How long one node's summary is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(2);
/// How long a kubelet may take to answer.
const KUBELET_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest summary accepted from a kubelet.
const MAX_SUMMARY: usize = 16 * 1024 * 1024;

/// What a metrics.k8s.io path addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsRoute {
    /// `/apis/metrics.k8s.io`
    Group,
    /// `/apis/metrics.k8s.io/v1beta1`
    ResourceList,
    Nodes {
        name: Option<String>,
    },
    Pods {
        namespace: Option<String>,
        name: Option<String>,
    },
}

/// Parses the segments after `/apis/metrics.k8s.io`; `None` = 404.
pub fn parse(rest: &[&str]) -> Option<MetricsRoute> {
    let s = |x: &&str| Some((*x).to_owned());
    match rest {
        [] => Some(MetricsRoute::Group),
        [VERSION] => Some(MetricsRoute::ResourceList),
        [VERSION, "nodes"] => Some(MetricsRoute::Nodes { name: None }),
        [VERSION, "nodes", name] => Some(MetricsRoute::Nodes { name: s(name) }),
        [VERSION, "pods"] => Some(MetricsRoute::Pods {
            namespace: None,
            name: None,
        }),
        [VERSION, "namespaces", ns, "pods"] => Some(MetricsRoute::Pods {
            namespace: s(ns),
            name: None,
        }),
        [VERSION, "namespaces", ns, "pods", name] => Some(MetricsRoute::Pods {
            namespace: s(ns),
            name: s(name),
        }),
        _ => None,
    }
}

/// The RBAC attributes of a request (`None` for discovery documents,
/// which are authorized like `/apis`).
pub fn attributes(route: &MetricsRoute) -> Option<rbac::Attributes> {
    let (resource, namespace, name) = match route {
        MetricsRoute::Group | MetricsRoute::ResourceList => return None,
        MetricsRoute::Nodes { name } => ("nodes", None, name),
        MetricsRoute::Pods { namespace, name } => ("pods", namespace.as_ref(), name),
    };
    Some(rbac::Attributes {
        verb: if name.is_some() { "get" } else { "list" }.into(),
        group: GROUP.into(),
        resource: resource.into(),
        namespace: namespace.cloned().unwrap_or_default(),
        name: name.clone().unwrap_or_default(),
        ..Default::default()
    })
}

fn resources() -> [(&'static str, &'static str, &'static str, bool); 2] {
    [
        ("nodes", "node", "NodeMetrics", false),
        ("pods", "pod", "PodMetrics", true),
    ]
}

/// `APIGroup` for `/apis/metrics.k8s.io`, also an entry of `/apis`.
pub fn group_doc() -> Value {
    let gv = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": GROUP, "versions": [gv], "preferredVersion": gv})
}

/// `APIResourceList` for `/apis/metrics.k8s.io/v1beta1`.
pub fn resource_list() -> Value {
    let list: Vec<Value> = resources()
        .iter()
        .map(|(plural, singular, kind, namespaced)| {
            json!({"name": plural, "singularName": singular, "namespaced": namespaced,
                   "kind": kind, "verbs": ["get", "list"]})
        })
        .collect();
    json!({"kind": "APIResourceList", "apiVersion": "v1",
           "groupVersion": format!("{GROUP}/{VERSION}"), "resources": list})
}

/// The group's entry in aggregated discovery (`APIGroupDiscovery`).
pub fn aggregated_item() -> Value {
    let list: Vec<Value> = resources()
        .iter()
        .map(|(plural, singular, kind, namespaced)| {
            json!({"resource": plural, "singularResource": singular,
                   "responseKind": {"group": GROUP, "version": VERSION, "kind": kind},
                   "scope": if *namespaced { "Namespaced" } else { "Cluster" },
                   "verbs": ["get", "list"]})
        })
        .collect();
    json!({"metadata": {"name": GROUP},
           "versions": [{"version": VERSION, "resources": list, "freshness": "Current"}]})
}

/// CPU and memory of one container (or node).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub cpu_nanocores: u64,
    pub memory_bytes: u64,
}

/// A pod's usage as the kubelet measured it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodUsage {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    /// When the newest reading was taken (RFC 3339).
    pub timestamp: String,
    /// The span the CPU rate covers.
    pub window: Duration,
    pub containers: Vec<(String, Usage)>,
}

/// A node's usage.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeUsage {
    pub name: String,
    pub timestamp: String,
    pub window: Duration,
    pub usage: Usage,
}

/// `(cpu, time, window)` of a Summary API `cpu` object with a rate.
fn rate_of(v: &Value) -> Option<(u64, String, Duration)> {
    let cpu = v.get("cpu")?;
    let nanocores = cpu.get("usageNanoCores")?.as_u64()?;
    let time = cpu.get("time")?.as_str()?.to_owned();
    let window = cpu
        .get("windowSeconds")
        .and_then(Value::as_f64)
        .filter(|w| w.is_finite() && *w > 0.0)
        .map_or(Duration::from_secs(5), Duration::from_secs_f64);
    Some((nanocores, time, window))
}

fn memory_of(v: &Value) -> u64 {
    v.pointer("/memory/workingSetBytes")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// The pods of one node's summary that have complete metrics.
pub fn pods_of_summary(node: &str, summary: &Value) -> Vec<PodUsage> {
    let mut out = Vec::new();
    for p in summary
        .get("pods")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some((_, timestamp, window)) = rate_of(p) else {
            continue;
        };
        let field = |k: &str| {
            p.pointer(&format!("/podRef/{k}"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let containers: Option<Vec<(String, Usage)>> = p
            .get("containers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|c| {
                let (cpu, _, _) = rate_of(c)?;
                let name = c.get("name")?.as_str()?.to_owned();
                Some((
                    name,
                    Usage {
                        cpu_nanocores: cpu,
                        memory_bytes: memory_of(c),
                    },
                ))
            })
            .collect();
        let Some(containers) = containers.filter(|c| !c.is_empty()) else {
            continue;
        };
        out.push(PodUsage {
            namespace: field("namespace"),
            name: field("name"),
            uid: field("uid"),
            node: node.to_owned(),
            timestamp,
            window,
            containers,
        });
    }
    out
}

/// The node's own usage from its summary.
pub fn node_of_summary(node: &str, summary: &Value) -> Option<NodeUsage> {
    let n = summary.get("node")?;
    let (cpu, timestamp, window) = rate_of(n)?;
    Some(NodeUsage {
        name: node.to_owned(),
        timestamp,
        window,
        usage: Usage {
            cpu_nanocores: cpu,
            memory_bytes: memory_of(n),
        },
    })
}

/// Kubernetes quantities as metrics-server writes them.
fn usage_json(u: &Usage) -> Value {
    json!({"cpu": format!("{}n", u.cpu_nanocores), "memory": format!("{}Ki", u.memory_bytes / 1024)})
}

/// A Go duration string (`metav1.Duration`).
fn window_string(w: Duration) -> String {
    format!("{:.3}s", w.as_secs_f64())
}

fn labels_of(obj: &Value) -> Value {
    obj.pointer("/metadata/labels")
        .cloned()
        .unwrap_or(json!({}))
}

/// Reaches kubelets for usage; one per API server.
pub struct MetricsSource {
    connector: TlsConnector,
    cache: Mutex<HashMap<String, (Instant, Arc<Value>)>>,
}

impl std::fmt::Debug for MetricsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsSource").finish_non_exhaustive()
    }
}

/// A node's kubelet endpoint: InternalIP (else ExternalIP) and the port in
/// `status.daemonEndpoints`.
fn kubelet_address(node: &Value) -> Option<SocketAddr> {
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)?;
    let addresses = node.pointer("/status/addresses")?.as_array()?;
    ["InternalIP", "ExternalIP"].iter().find_map(|t| {
        addresses
            .iter()
            .filter(|a| a.get("type").and_then(Value::as_str) == Some(t))
            .find_map(|a| a.get("address")?.as_str()?.parse().ok())
            .map(|ip| SocketAddr::new(ip, port))
    })
}

fn list_route(api: &Api, plural: &str, namespace: Option<&str>) -> Result<ResourceRoute, ApiError> {
    let info = api
        .registry
        .lookup("", "v1", plural)
        .ok_or_else(|| ApiError::internal(format!("{plural} are not registered")))?;
    Ok(ResourceRoute {
        info,
        namespace: namespace.map(str::to_owned),
        name: None,
        subresource: None,
    })
}

impl MetricsSource {
    pub fn new(credentials: &Credentials) -> Result<Self, String> {
        Ok(Self {
            connector: crate::node_proxy::kubelet_client_tls(credentials, b"http/1.1")?,
            cache: Mutex::new(HashMap::new()),
        })
    }

    async fn fetch(&self, addr: SocketAddr) -> Result<Value, String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(rustls::pki_types::ServerName::from(addr.ip()), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get("/stats/summary")
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(format!(
                "answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(512)]).trim()
            ));
        }
        if body.len() > MAX_SUMMARY {
            return Err(format!("summary of {} bytes is too large", body.len()));
        }
        serde_json::from_slice(&body).map_err(|e| format!("summary is not JSON: {e}"))
    }

    /// One node's summary, from the cache when fresh.
    async fn summary(&self, node: &Value) -> Option<Arc<Value>> {
        let name = crate::objects::name(node).to_owned();
        if let Some((at, v)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            && at.elapsed() < CACHE_TTL
        {
            return Some(v.clone());
        }
        let Some(addr) = kubelet_address(node) else {
            tracing::debug!(node = %name, "metrics: node reports no kubelet endpoint");
            return None;
        };
        match tokio::time::timeout(KUBELET_TIMEOUT, self.fetch(addr)).await {
            Ok(Ok(v)) => {
                let v = Arc::new(v);
                self.cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name, (Instant::now(), v.clone()));
                Some(v)
            }
            Ok(Err(e)) => {
                tracing::debug!(node = %name, %addr, error = %e, "metrics: kubelet summary failed");
                None
            }
            Err(_) => {
                tracing::debug!(node = %name, %addr, "metrics: kubelet summary timed out");
                None
            }
        }
    }

    /// Every node (or the named one) with its summary, when it answered.
    async fn summaries(
        &self,
        api: &Api,
        only: Option<&str>,
    ) -> Result<Vec<(Value, Arc<Value>)>, ApiError> {
        let nodes = match only {
            Some(name) => {
                let route = list_route(api, "nodes", None)?;
                vec![api.read(&route.info, None, name).await?.0]
            }
            None => {
                api.list(&list_route(api, "nodes", None)?, &Query::new())
                    .await?
                    .items
            }
        };
        let fetched = futures::future::join_all(nodes.iter().map(|n| self.summary(n))).await;
        Ok(nodes
            .into_iter()
            .zip(fetched)
            .filter_map(|(n, s)| Some((n, s?)))
            .collect())
    }

    /// Usage of every node (or the named one) that reports it.
    pub async fn node_usage(
        &self,
        api: &Api,
        only: Option<&str>,
    ) -> Result<Vec<(Value, NodeUsage)>, ApiError> {
        Ok(self
            .summaries(api, only)
            .await?
            .into_iter()
            .filter_map(|(node, s)| {
                let u = node_of_summary(crate::objects::name(&node), &s)?;
                Some((node, u))
            })
            .collect())
    }

    /// Usage of the pods (of `namespace`, or all) that have complete
    /// metrics; pods the store no longer has (or has under another uid)
    /// are left out.
    pub async fn pod_usage(
        &self,
        api: &Api,
        namespace: Option<&str>,
    ) -> Result<Vec<(Value, PodUsage)>, ApiError> {
        let pods = api
            .list(&list_route(api, "pods", namespace)?, &Query::new())
            .await?
            .items;
        let by_uid: HashMap<&str, &Value> = pods
            .iter()
            .filter_map(|p| Some((p.pointer("/metadata/uid")?.as_str()?, p)))
            .collect();
        let mut out = Vec::new();
        for (node, summary) in self.summaries(api, None).await? {
            for u in pods_of_summary(crate::objects::name(&node), &summary) {
                if let Some(pod) = by_uid.get(u.uid.as_str()) {
                    out.push(((*pod).clone(), u));
                }
            }
        }
        out.sort_by(|a, b| (&a.1.namespace, &a.1.name).cmp(&(&b.1.namespace, &b.1.name)));
        Ok(out)
    }

    /// Serves a metrics.k8s.io request (authorized by the caller).
    pub async fn handle(
        &self,
        api: &Api,
        route: &MetricsRoute,
        query: &Query,
    ) -> Result<Value, ApiError> {
        let selector = match query.get("labelSelector") {
            Some(s) => LabelSelector::parse(s).map_err(|e| ApiError::bad_request(e.to_string()))?,
            None => LabelSelector::default(),
        };
        // kubectl top pod NAME lists with metadata.name=NAME.
        let field_name = query.get("fieldSelector").and_then(|f| {
            f.split(',')
                .find_map(|t| t.strip_prefix("metadata.name=").map(str::to_owned))
        });
        let now = crate::objects::now_rfc3339();
        match route {
            MetricsRoute::Group => Ok(group_doc()),
            MetricsRoute::ResourceList => Ok(resource_list()),
            MetricsRoute::Nodes { name } => {
                let items: Vec<Value> = self
                    .node_usage(api, name.as_deref())
                    .await?
                    .into_iter()
                    .filter(|(n, _)| selector.matches_object(n))
                    .filter(|(n, _)| {
                        field_name
                            .as_deref()
                            .is_none_or(|f| crate::objects::name(n) == f)
                    })
                    .map(|(n, u)| {
                        json!({"kind": "NodeMetrics", "apiVersion": format!("{GROUP}/{VERSION}"),
                               "metadata": {"name": u.name, "creationTimestamp": now, "labels": labels_of(&n)},
                               "timestamp": u.timestamp, "window": window_string(u.window),
                               "usage": usage_json(&u.usage)})
                    })
                    .collect();
                single_or_list(name.as_deref(), "nodes", "NodeMetricsList", items)
            }
            MetricsRoute::Pods { namespace, name } => {
                let items: Vec<Value> = self
                    .pod_usage(api, namespace.as_deref())
                    .await?
                    .into_iter()
                    .filter(|(p, _)| selector.matches_object(p))
                    .filter(|(_, u)| {
                        name.as_deref()
                            .or(field_name.as_deref())
                            .is_none_or(|n| u.name == n)
                    })
                    .map(|(p, u)| {
                        let containers: Vec<Value> = u
                            .containers
                            .iter()
                            .map(|(c, usage)| json!({"name": c, "usage": usage_json(usage)}))
                            .collect();
                        json!({"kind": "PodMetrics", "apiVersion": format!("{GROUP}/{VERSION}"),
                               "metadata": {"name": u.name, "namespace": u.namespace,
                                            "creationTimestamp": now, "labels": labels_of(&p)},
                               "timestamp": u.timestamp, "window": window_string(u.window),
                               "containers": containers})
                    })
                    .collect();
                single_or_list(name.as_deref(), "pods", "PodMetricsList", items)
            }
        }
    }
}

fn single_or_list(
    name: Option<&str>,
    plural: &str,
    list_kind: &str,
    mut items: Vec<Value>,
) -> Result<Value, ApiError> {
    match name {
        Some(n) => {
            if items.is_empty() {
                return Err(ApiError::NotFound {
                    resource: format!("{plural}.{GROUP}"),
                    name: n.to_owned(),
                });
            }
            Ok(items.swap_remove(0))
        }
        None => Ok(
            json!({"kind": list_kind, "apiVersion": format!("{GROUP}/{VERSION}"),
                          "metadata": {}, "items": items}),
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(parse(&[]), Some(MetricsRoute::Group));
        assert_eq!(
            parse(&["v1beta1", "namespaces", "a", "pods", "p"]),
            Some(MetricsRoute::Pods {
                namespace: Some("a".into()),
                name: Some("p".into())
            })
        );
        assert_eq!(
            parse(&["v1beta1", "nodes"]),
            Some(MetricsRoute::Nodes { name: None })
        );
        assert_eq!(parse(&["v1", "nodes"]), None);
        let a = attributes(&MetricsRoute::Pods {
            namespace: Some("a".into()),
            name: None,
        })
        .unwrap();
        assert_eq!(
            (a.verb.as_str(), a.resource.as_str(), a.group.as_str()),
            ("list", "pods", GROUP)
        );
    }

    #[test]
    fn summaries_become_usage() {
        let s = json!({"node": {"cpu": {"time": "2026-01-01T00:00:00Z", "usageNanoCores": 5, "windowSeconds": 5.0},
                                "memory": {"workingSetBytes": 2048}},
                       "pods": [
                         {"podRef": {"name": "a", "namespace": "d", "uid": "u1"},
                          "cpu": {"time": "2026-01-01T00:00:00Z", "usageNanoCores": 300},
                          "containers": [{"name": "c", "cpu": {"time": "t", "usageNanoCores": 300}, "memory": {"workingSetBytes": 10}}]},
                         {"podRef": {"name": "b", "namespace": "d", "uid": "u2"},
                          "cpu": {"time": "t"}, "containers": [{"name": "c", "cpu": {"time": "t"}}]}]});
        let pods = pods_of_summary("n", &s);
        assert_eq!(pods.len(), 1, "a pod without a rate is left out");
        assert_eq!(pods[0].containers[0].1.cpu_nanocores, 300);
        assert_eq!(pods[0].window, Duration::from_secs(5));
        let n = node_of_summary("n", &s).unwrap();
        assert_eq!(n.usage.memory_bytes, 2048);
        assert_eq!(usage_json(&n.usage), json!({"cpu": "5n", "memory": "2Ki"}));
        assert_eq!(window_string(Duration::from_millis(5012)), "5.012s");
    }
}
