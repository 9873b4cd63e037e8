//! Prometheus counters of the node's flows, `skep_flows_total{verdict,
//! reason, observation}`, served as text on a plain-HTTP listener
//! (`GET /metrics`, default 127.0.0.1:9962 as Cilium's agent): the
//! kubelet endpoint and the observer admit only the API server's client
//! certificate, which a Prometheus scraper does not have.

use super::{
    FlowsError,
    input::{DropReason, Flow, FlowVerdict, Observation},
};
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, sync::Mutex};
use tokio::net::TcpListener;

/// Label values, as they appear in the metric.
pub fn verdict_label(v: FlowVerdict) -> &'static str {
    match v {
        FlowVerdict::Forwarded => "forwarded",
        FlowVerdict::Dropped => "dropped",
    }
}

pub fn reason_label(r: DropReason) -> &'static str {
    match r {
        DropReason::None => "none",
        DropReason::PolicyEgress => "policy_denied_egress",
        DropReason::PolicyIngress => "policy_denied_ingress",
        DropReason::NoBackend => "no_backend",
    }
}

pub fn observation_label(o: Observation) -> &'static str {
    match o {
        Observation::FromPod => "from_pod",
        Observation::ToPod => "to_pod",
        Observation::Xdp => "xdp",
    }
}

type Key = (&'static str, &'static str, &'static str);

/// Flow counters by (verdict, reason, observation).
#[derive(Debug, Default)]
pub struct FlowMetrics {
    counts: Mutex<BTreeMap<Key, u64>>,
}

impl FlowMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&self, flow: &Flow) {
        let key = (
            verdict_label(flow.verdict),
            reason_label(flow.drop_reason),
            observation_label(flow.observation),
        );
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *counts.entry(key).or_default() += 1;
    }

    /// The count for one label set (0 when never seen).
    pub fn get(&self, verdict: FlowVerdict, reason: DropReason, observation: Observation) -> u64 {
        let key = (
            verdict_label(verdict),
            reason_label(reason),
            observation_label(observation),
        );
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP skep_flows_total Flows the eBPF dataplane reported on this node, by verdict, drop reason and observation point.\n# TYPE skep_flows_total counter\n",
        );
        let counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ((verdict, reason, observation), n) in counts.iter() {
            out.push_str(&format!(
                "skep_flows_total{{verdict=\"{verdict}\",reason=\"{reason}\",observation=\"{observation}\"}} {n}\n"
            ));
        }
        out
    }
}

/// Serves `GET /metrics` over plain HTTP on `listen`; the task runs until
/// aborted. Returns the bound address.
pub async fn serve_metrics(
    listen: SocketAddr,
    metrics: std::sync::Arc<FlowMetrics>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), FlowsError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| FlowsError::Bind {
            addr: listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| FlowsError::Bind {
        addr: listen,
        source,
    })?;
    tracing::info!(%local, "flow metrics listening (GET /metrics)");
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "flow metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    let metrics = metrics.clone();
                    async move {
                        let (status, body) = if req.uri().path() == "/metrics" {
                            (StatusCode::OK, metrics.render())
                        } else {
                            (
                                StatusCode::NOT_FOUND,
                                "only /metrics is served here\n".into(),
                            )
                        };
                        let mut resp = Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = status;
                        resp.headers_mut().insert(
                            header::CONTENT_TYPE,
                            header::HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok((local, task))
}
