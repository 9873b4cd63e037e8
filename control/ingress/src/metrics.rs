//! Prometheus metrics of the proxy: requests by Ingress, Service and
//! status code, and a latency histogram (request in → response headers
//! out), served as text on `GET /metrics`.
//!
//! Counters are plain atomics owned by each backend's [`Stats`], so the
//! request path never takes a lock; the registry (keyed by Ingress and
//! Service) only hands out the same `Stats` again when a routing snapshot
//! is rebuilt, so counts survive reloads.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// Histogram bucket bounds, seconds (Prometheus's defaults, finer at the
/// bottom where a proxy's latency lives).
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Counters of one (Ingress, Service) pair.
#[derive(Debug)]
pub struct Stats {
    /// Index = status code - 100 (100..=599).
    codes: Box<[AtomicU64]>,
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            codes: (0..500).map(|_| AtomicU64::new(0)).collect(),
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Stats {
    pub fn observe(&self, code: u16, elapsed: Duration) {
        if let Some(c) = self.codes.get(usize::from(code).wrapping_sub(100)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        // Buckets are stored non-cumulative; rendering adds them up.
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// Every backend's stats, by (ingress, namespace, service).
#[derive(Debug, Default)]
pub struct Registry {
    stats: Mutex<BTreeMap<(String, String, String), Arc<Stats>>>,
    /// Requests no rule matched (answered 404 or 503).
    pub unmatched: Arc<Stats>,
}

impl Registry {
    pub fn stats(&self, ingress: &str, namespace: &str, service: &str) -> Arc<Stats> {
        let mut map = match self.stats.lock() {
            Ok(m) => m,
            // A panic while holding the lock left plain counters: usable.
            Err(p) => p.into_inner(),
        };
        map.entry((ingress.to_owned(), namespace.to_owned(), service.to_owned()))
            .or_default()
            .clone()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let map = match self.stats.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let mut out = String::new();
        let mut all: Vec<((String, String, String), Arc<Stats>)> = map.into_iter().collect();
        all.push((Default::default(), self.unmatched.clone()));
        out.push_str("# HELP skep_ingress_requests_total Requests through the ingress proxy by Ingress, Service and status code.\n# TYPE skep_ingress_requests_total counter\n");
        for ((ing, ns, svc), st) in &all {
            for (i, c) in st.codes.iter().enumerate() {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "skep_ingress_requests_total{{ingress=\"{ing}\",namespace=\"{ns}\",service=\"{svc}\",code=\"{}\"}} {n}",
                        i + 100
                    );
                }
            }
        }
        out.push_str("# HELP skep_ingress_request_duration_seconds Time from a request's arrival to its response headers.\n# TYPE skep_ingress_request_duration_seconds histogram\n");
        for ((ing, ns, svc), st) in &all {
            let count = st.count.load(Ordering::Relaxed);
            if count == 0 {
                continue;
            }
            let labels = format!("ingress=\"{ing}\",namespace=\"{ns}\",service=\"{svc}\"");
            let mut cumulative = 0;
            for (b, bound) in st.buckets.iter().zip(BUCKETS) {
                cumulative += b.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "skep_ingress_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "skep_ingress_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "skep_ingress_request_duration_seconds_sum{{{labels}}} {}",
                st.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "skep_ingress_request_duration_seconds_count{{{labels}}} {count}"
            );
        }
        out
    }
}

/// Serves `GET /metrics` on `listen`; returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    registry: Arc<Registry>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let registry = registry.clone();
                    async move {
                        if req.uri().path() == "/metrics" {
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(registry.render())))
                        } else {
                            Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from_static(b"try /metrics\n")))
                        }
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, task))
}
