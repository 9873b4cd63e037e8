//! skep's built-in Ingress controller (networking.k8s.io/v1, class
//! `skep`): every node agent runs [`spawn`], an HTTP/1.1 + HTTP/2 reverse
//! proxy on the node's ports 80 and 443 routing by host and path to
//! Services' ready endpoints, with TLS certificates from Secrets chosen by
//! SNI. Routes and certificates come from API watches and are swapped
//! atomically (see [`routes`], [`watch`]). The server writes the
//! IngressClass (see [`class_manifest`]) and the Ingresses' status (see
//! [`status`]).

pub mod fast;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod routes;
pub mod status;
pub mod tls;
pub mod upstream;
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
    /// Worker threads of the Ingress proxy, each with its own event loop
    /// and listening sockets (SO_REUSEPORT, as nginx's workers); 0 = one
    /// per CPU.
    #[arg(long, env = "SKEP_INGRESS_WORKERS", default_value_t = 0)]
    pub ingress_workers: usize,
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

/// One listening socket of a worker; all workers bind the same address
/// with SO_REUSEPORT and the kernel spreads connections between them.
fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    // Taken out of this runtime: the worker's own runtime registers it.
    socket.listen(1024)?.into_std()
}

/// Fails when something already listens on `addr`. SO_REUSEPORT alone
/// would let a second proxy (another skep on this host, a leftover
/// process of the same user) share the port silently; a plain bind first
/// keeps "port taken" an error, as without workers.
fn probe_exclusive(addr: SocketAddr) -> std::io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)
}

/// The worker count `--ingress-workers` asks for.
fn worker_count(asked: usize) -> usize {
    if asked > 0 {
        return asked;
    }
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Binds the listeners and serves them with `proxy` on
/// `--ingress-workers` threads, each a single-threaded tokio runtime with
/// its own listeners and upstream pool: a connection lives on one thread
/// from accept to close, with no work stealing or cross-thread wakeups,
/// as nginx's workers (with [`upstream`] this took the benchmark's CPU
/// per plain request from ~26 µs to ~12–14 µs, nginx's level). A
/// listener that cannot be bound (port taken) is reported and left out;
/// the others run.
pub async fn serve(proxy: Arc<Proxy>, args: &IngressArgs) -> Bound {
    let mut bound = Bound::default();
    let workers = worker_count(args.ingress_workers);
    // Per worker: (http, https) listeners.
    let mut sockets: Vec<[Option<std::net::TcpListener>; 2]> =
        (0..workers).map(|_| [None, None]).collect();
    for (listen, https) in [
        (args.ingress_http_listen.0, false),
        (args.ingress_https_listen.0, true),
    ] {
        let Some(mut addr) = listen else { continue };
        for (w, slot) in sockets.iter_mut().enumerate() {
            let bound_one = if w == 0 {
                probe_exclusive(addr).and_then(|()| bind_reuseport(addr))
            } else {
                bind_reuseport(addr)
            };
            match bound_one {
                Ok(l) => {
                    // Port 0: the other workers join the port the first got.
                    if let Ok(local) = l.local_addr() {
                        addr = local;
                    }
                    if w == 0 {
                        tracing::info!(listen = %addr, https, workers, "ingress proxy listening");
                        if https {
                            bound.https = Some(addr);
                            proxy.set_https_port(addr.port());
                        } else {
                            bound.http = Some(addr);
                        }
                    }
                    slot[usize::from(https)] = Some(l);
                }
                Err(e) => {
                    tracing::error!(
                        %addr, error = %e,
                        "the ingress proxy cannot listen here; free the port or choose another with --ingress-http-listen/--ingress-https-listen"
                    );
                    break;
                }
            }
        }
    }
    for (w, [http, https]) in sockets.into_iter().enumerate() {
        if http.is_none() && https.is_none() {
            continue;
        }
        let proxy = proxy.clone();
        let started = std::thread::Builder::new()
            .name(format!("skep-ingress-{w}"))
            .spawn(move || run_worker(proxy, http, https));
        if let Err(e) = started {
            tracing::error!(worker = w, error = %e, "cannot start an ingress worker thread");
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

/// One worker thread: its listeners served on a single-threaded runtime
/// until the process ends.
fn run_worker(
    proxy: Arc<Proxy>,
    http: Option<std::net::TcpListener>,
    https: Option<std::net::TcpListener>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start an ingress worker runtime");
            return;
        }
    };
    rt.block_on(async move {
        let pool = proxy::Pools::default();
        let mut tasks = Vec::new();
        for (l, is_https) in [(http, false), (https, true)] {
            let Some(l) = l else { continue };
            let l = match l
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(l))
            {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "an ingress listener cannot be registered");
                    continue;
                }
            };
            let proxy = proxy.clone();
            tasks.push(if is_https {
                tokio::spawn(proxy.serve_https_with(l, pool.clone()))
            } else {
                tokio::spawn(proxy.serve_http_with(l, pool.clone()))
            });
        }
        for t in tasks {
            let _ = t.await;
        }
    });
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
