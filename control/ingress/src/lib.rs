//! skep's built-in Ingress controller (networking.k8s.io/v1, class
//! `skep`): every node agent runs [`spawn`], an HTTP/1.1 + HTTP/2 reverse
//! proxy on the node's ports 80 and 443 routing by host and path to
//! Services' ready endpoints, with TLS certificates from Secrets chosen by
//! SNI. Routes and certificates come from API watches and are swapped
//! atomically (see [`routes`], [`watch`]). The server writes the
//! IngressClass (see [`class_manifest`]) and the Ingresses' status (see
//! [`status`]).

pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod routes;
pub mod status;
pub mod tls;
pub mod watch;

use arc_swap::ArcSwap;
use serde_json::{Value, json};
use skep_client::Client;
use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

pub use proxy::Proxy;
pub use routes::{CLASS_NAME, CONTROLLER, Objects, Snapshot};

/// Node annotation naming the ports this node's proxy serves
/// (`http=80,https=443`); the status writer lists the nodes that have it.
pub const PORTS_ANNOTATION: &str = "ingress.skep.io/ports";

/// A listen flag: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        s.parse()
            .map(|a| Self(Some(a)))
            .map_err(|_| format!("{s:?} is not an address with a port (0.0.0.0:80) or \"off\""))
    }
}

/// The node flags of the ingress proxy.
#[derive(Debug, Clone, clap::Args)]
pub struct IngressArgs {
    /// Do not run the Ingress proxy on this node.
    #[arg(long, env = "SKEP_NO_INGRESS")]
    pub no_ingress: bool,
    /// Plain-HTTP listener of the Ingress proxy (`off` for none).
    #[arg(long, env = "SKEP_INGRESS_HTTP_LISTEN", default_value = "0.0.0.0:80")]
    pub ingress_http_listen: Listen,
    /// HTTPS listener of the Ingress proxy (certificates from the
    /// Ingresses' TLS Secrets; `off` for none).
    #[arg(long, env = "SKEP_INGRESS_HTTPS_LISTEN", default_value = "0.0.0.0:443")]
    pub ingress_https_listen: Listen,
    /// The Ingress proxy's Prometheus metrics (`GET /metrics`; `off`).
    #[arg(
        long,
        env = "SKEP_INGRESS_METRICS_LISTEN",
        default_value = "127.0.0.1:9964"
    )]
    pub ingress_metrics_listen: Listen,
}

/// The running proxy's bound addresses.
#[derive(Debug, Clone, Default)]
pub struct Bound {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
}

/// A fresh proxy with an empty table (fed by [`watch::run`] or, in the
/// benchmark and tests, by [`Proxy::update`]).
pub fn new_proxy() -> Arc<Proxy> {
    Proxy::new(
        Arc::new(ArcSwap::from_pointee(Snapshot::default())),
        Arc::new(metrics::Registry::default()),
    )
}

/// Binds the listeners and serves them with `proxy`. A listener that
/// cannot be bound (port taken) is reported and left out; the others run.
pub async fn serve(proxy: Arc<Proxy>, args: &IngressArgs) -> Bound {
    let mut bound = Bound::default();
    for (listen, https) in [
        (args.ingress_http_listen.0, false),
        (args.ingress_https_listen.0, true),
    ] {
        let Some(addr) = listen else { continue };
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let local = l.local_addr().ok();
                tracing::info!(listen = ?local, https, "ingress proxy listening");
                if https {
                    bound.https = local;
                    tokio::spawn(proxy.clone().serve_https(l));
                } else {
                    bound.http = local;
                    tokio::spawn(proxy.clone().serve_http(l));
                }
            }
            Err(e) => tracing::error!(
                %addr, error = %e,
                "the ingress proxy cannot listen here; free the port or choose another with --ingress-http-listen/--ingress-https-listen"
            ),
        }
    }
    if let Some(addr) = args.ingress_metrics_listen.0 {
        match metrics::serve(addr, proxy.registry.clone()).await {
            Ok((a, _task)) => bound.metrics = Some(a),
            Err(e) => {
                tracing::warn!(%addr, error = %e, "ingress metrics are not served; choose another --ingress-metrics-listen")
            }
        }
    }
    bound
}

/// The node's side, run by every agent: the proxy fed from the API, and
/// the Node annotation that tells the status writer this node serves
/// Ingress traffic (removed when the proxy is off).
pub fn spawn(client: Client, args: &IngressArgs, node_name: String) -> tokio::task::JoinHandle<()> {
    let args = args.clone();
    tokio::spawn(async move {
        if args.no_ingress {
            annotate_node(&client, &node_name, None).await;
            return;
        }
        let proxy = new_proxy();
        let bound = serve(proxy.clone(), &args).await;
        let ports: Vec<String> = [("http", bound.http), ("https", bound.https)]
            .iter()
            .filter_map(|(n, a)| a.map(|a| format!("{n}={}", a.port())))
            .collect();
        let watcher = tokio::spawn(watch::run(client.clone(), proxy));
        annotate_node(
            &client,
            &node_name,
            (!ports.is_empty()).then(|| ports.join(",")),
        )
        .await;
        let _ = watcher.await;
    })
}

/// Sets (or removes) the ports annotation on this node, waiting for the
/// Node to be registered.
async fn annotate_node(client: &Client, node: &str, value: Option<String>) {
    let patch = json!({"metadata": {"annotations": {PORTS_ANNOTATION: value}}});
    let path = format!("/api/v1/nodes/{node}");
    for attempt in 0u32.. {
        match client.merge_patch(&path, &patch).await {
            Ok(_) => return,
            Err(e) => {
                if attempt % 30 == 5 {
                    tracing::warn!(node, error = %e, "cannot annotate the Node for the ingress status yet; retrying");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The IngressClass the server installs: `skep`, the cluster default.
pub fn class_manifest() -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": CLASS_NAME,
                     "annotations": {routes::DEFAULT_CLASS_ANNOTATION: "true"}},
        "spec": {"controller": CONTROLLER},
    })
}

/// The add-on's file in the server's manifests directory.
pub const CLASS_MANIFEST: &str = "skep-ingress-class.json";

/// Writes the IngressClass into the server's manifests directory (applied
/// by its manifests loop, like the other add-ons).
pub fn write_class_manifest(dir: &Path) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(&class_manifest()).map_err(std::io::Error::other)?;
    std::fs::write(dir.join(CLASS_MANIFEST), text)
}
