//! `pods/log`, `pods/exec`, `pods/attach` and `pods/portforward`: served by
//! the kubelet of the pod's node. After authentication and authorization
//! (done by the caller) the request is proxied to the node's kubelet
//! endpoint over TLS with the API server's kubelet-client certificate.
//! Logs stream through; upgrades (SPDY/3.1, WebSocket) are relayed: the
//! request goes to the kubelet with its upgrade headers, the kubelet's 101
//! comes back to the client, and the two upgraded connections are spliced.

use crate::{api::Api, pki::Credentials, routes::ResourceRoute, server::Body, status::ApiError};
use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use skep_client::tls::AnyServerCert;
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};
use tokio_rustls::TlsConnector;

/// How long reaching a kubelet may take before the request fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Request headers that carry an upgrade negotiation to the kubelet.
const UPGRADE_HEADERS: &[&str] = &[
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "x-stream-protocol-version",
];

/// The subresources served by kubelets.
pub fn is_node_subresource(r: &ResourceRoute) -> bool {
    r.info.group.is_empty()
        && r.info.plural == "pods"
        && matches!(
            r.subresource.as_deref(),
            Some("log" | "exec" | "attach" | "portforward")
        )
}

/// The TLS client the API server uses towards kubelets.
#[derive(Clone)]
pub struct NodeProxy {
    connector: TlsConnector,
}

impl std::fmt::Debug for NodeProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProxy").finish_non_exhaustive()
    }
}

/// TLS to kubelets as the API server: the kubelet-client certificate as
/// client identity, any kubelet serving certificate, and `alpn` (HTTP/1.1
/// for upgrades, h2 for gRPC).
///
/// Any kubelet serving certificate: kube-apiserver does the same unless
/// `--kubelet-certificate-authority` is given, since kubelets serve with
/// self-signed certificates. The handshake signatures are still checked,
/// and the kubelet authenticates us by our client certificate.
pub(crate) fn kubelet_client_tls(
    credentials: &Credentials,
    alpn: &[u8],
) -> Result<TlsConnector, String> {
    let certs = rustls_pemfile::certs(&mut credentials.kubelet_client_cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("kubelet-client certificate: {e}"))?;
    let key = rustls_pemfile::private_key(&mut credentials.kubelet_client_key_pem.as_bytes())
        .map_err(|e| format!("kubelet-client key: {e}"))?
        .ok_or("no private key in the kubelet-client key file")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert::new(provider)))
        .with_client_auth_cert(certs, key)
        .map_err(|e| format!("kubelet-client certificate: {e}"))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

impl NodeProxy {
    pub fn new(credentials: &Credentials) -> Result<Self, String> {
        // Upgrades need HTTP/1.1.
        Ok(Self {
            connector: kubelet_client_tls(credentials, b"http/1.1")?,
        })
    }

    /// Proxies a `pods/{log,exec,attach,portforward}` request to the
    /// kubelet of the pod's node.
    pub async fn handle(
        &self,
        api: &Api,
        mut req: Request<Incoming>,
        r: &ResourceRoute,
    ) -> Result<Response<Body>, ApiError> {
        let sub = r.subresource.as_deref().unwrap_or("");
        let ns = r.namespace.as_deref().unwrap_or("default");
        let name = r.name.as_deref().unwrap_or("");
        let upgrading = req.headers().contains_key(header::UPGRADE);
        match (sub, req.method().as_str(), upgrading) {
            ("log", "GET", _) => {}
            ("exec" | "attach" | "portforward", "GET" | "POST", true) => {}
            ("exec" | "attach" | "portforward", "GET" | "POST", false) => {
                return Err(ApiError::bad_request(format!(
                    "pods/{sub} needs an upgrade to SPDY/3.1 or websocket (Upgrade header)"
                )));
            }
            _ => return Err(ApiError::MethodNotAllowed),
        }
        let (pod, _) = api.read(&r.info, Some(ns), name).await?;
        let mut pairs: Vec<(String, String)> = req
            .uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let requested = pairs
            .iter()
            .find(|(k, _)| k == "container")
            .map(|(_, v)| v.clone());
        pairs.retain(|(k, _)| k != "container");
        let path = match sub {
            "portforward" => format!("/portForward/{ns}/{name}"),
            _ => {
                let container = pick_container(&pod, name, requested.as_deref())?;
                let kubelet_sub = if sub == "log" { "containerLogs" } else { sub };
                format!("/{kubelet_sub}/{ns}/{name}/{container}")
            }
        };
        let query = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&pairs)
            .finish();
        let path_and_query = if query.is_empty() {
            path
        } else {
            format!("{path}?{query}")
        };
        let node_name = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                ApiError::bad_request(format!("pod {name} does not have a host assigned"))
            })?;
        let addr = kubelet_address(api, node_name).await?;

        let mut out = Request::builder()
            .method(req.method().clone())
            .uri(path_and_query)
            .header(header::HOST, addr.to_string());
        for h in UPGRADE_HEADERS {
            for v in req.headers().get_all(*h) {
                out = out.header(*h, v.clone());
            }
        }
        let out = out
            .body(Empty::<Bytes>::new())
            .map_err(|e| ApiError::internal(format!("building the kubelet request: {e}")))?;
        let mut sender = self.connect(node_name, addr).await?;
        let mut resp = sender
            .send_request(out)
            .await
            .map_err(|e| ApiError::Unavailable {
                message: format!("error talking to the kubelet of node {node_name} at {addr}: {e}"),
            })?;
        let status = resp.status();
        if status == StatusCode::SWITCHING_PROTOCOLS {
            let client_side = hyper::upgrade::on(&mut req);
            let kubelet_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let (client, kubelet) = match tokio::try_join!(client_side, kubelet_side) {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::debug!(error = %e, "node proxy: an upgrade failed");
                        return;
                    }
                };
                let mut client = TokioIo::new(client);
                let mut kubelet = TokioIo::new(kubelet);
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut kubelet).await {
                    tracing::debug!(error = %e, "node proxy: upgraded connection ended");
                }
            });
            let mut relay = Response::builder().status(status);
            for (k, v) in resp.headers() {
                relay = relay.header(k, v);
            }
            return relay
                .body(Full::new(Bytes::new()).boxed())
                .map_err(|e| ApiError::internal(e.to_string()));
        }
        if upgrading || !status.is_success() {
            return Err(kubelet_error(node_name, resp).await);
        }
        // The log: streamed through as it comes (kubectl logs -f).
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .cloned()
            .unwrap_or(header::HeaderValue::from_static("text/plain"));
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let mut body = resp.into_body();
        tokio::spawn(async move {
            loop {
                // A client that leaves a quiet `logs -f` is noticed here,
                // which drops the kubelet connection too.
                let frame = tokio::select! {
                    f = body.frame() => f,
                    _ = tx.closed() => break,
                };
                match frame {
                    None => break,
                    Some(Ok(f)) => {
                        if let Ok(data) = f.into_data()
                            && tx.send(data).await.is_err()
                        {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "node proxy: the kubelet's log stream broke");
                        break;
                    }
                }
            }
        });
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
                .map(|b| Ok::<_, Infallible>(Frame::data(b)));
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CACHE_CONTROL, "no-cache, private")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    async fn connect(
        &self,
        node: &str,
        addr: SocketAddr,
    ) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, ApiError> {
        let unavailable = |what: String| ApiError::Unavailable {
            message: format!("error dialing the kubelet of node {node} at {addr}: {what}"),
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| unavailable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| unavailable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let server_name = rustls::pki_types::ServerName::from(addr.ip());
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, self.connector.connect(server_name, tcp))
            .await
            .map_err(|_| unavailable("TLS handshake timed out".into()))?
            .map_err(|e| unavailable(format!("TLS: {e}")))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "node proxy: kubelet connection ended");
            }
        });
        Ok(sender)
    }
}

/// The container a request is for: the named one (app, init or
/// ephemeral), or the pod's only container.
fn pick_container(
    pod: &Value,
    pod_name: &str,
    requested: Option<&str>,
) -> Result<String, ApiError> {
    let names = |field: &str| -> Vec<String> {
        pod.pointer(&format!("/spec/{field}"))
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let containers = names("containers");
    let init = names("initContainers");
    let ephemeral = names("ephemeralContainers");
    match requested.filter(|c| !c.is_empty()) {
        Some(c) => {
            if containers
                .iter()
                .chain(&init)
                .chain(&ephemeral)
                .any(|n| n == c)
            {
                Ok(c.to_owned())
            } else {
                Err(ApiError::bad_request(format!(
                    "container {c} is not valid for pod {pod_name}"
                )))
            }
        }
        None if containers.len() == 1 => Ok(containers[0].clone()),
        None => {
            let mut msg = format!(
                "a container name must be specified for pod {pod_name}, choose one of: [{}]",
                containers.join(" ")
            );
            if !init.is_empty() {
                msg.push_str(&format!(
                    " or one of the init containers: [{}]",
                    init.join(" ")
                ));
            }
            Err(ApiError::bad_request(msg))
        }
    }
}

/// The node's kubelet endpoint: its InternalIP (else any address) and
/// `status.daemonEndpoints.kubeletEndpoint.Port`.
async fn kubelet_address(api: &Api, node_name: &str) -> Result<SocketAddr, ApiError> {
    let info = api
        .registry
        .lookup("", "v1", "nodes")
        .ok_or_else(|| ApiError::internal("nodes are not registered"))?;
    let (node, _) = api.read(&info, None, node_name).await?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiError::Unavailable {
            message: format!(
                "node {node_name} does not report a kubelet endpoint (status.daemonEndpoints.kubeletEndpoint.Port)"
            ),
        })?;
    let addresses: Vec<(String, String)> = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| {
                    Some((
                        x.get("type")?.as_str()?.to_owned(),
                        x.get("address")?.as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let ip = ["InternalIP", "ExternalIP"]
        .iter()
        .find_map(|t| {
            addresses
                .iter()
                .filter(|(kind, _)| kind == t)
                .find_map(|(_, a)| a.parse::<std::net::IpAddr>().ok())
        })
        .ok_or_else(|| ApiError::Unavailable {
            message: format!("node {node_name} has no InternalIP or ExternalIP address"),
        })?;
    Ok(SocketAddr::new(ip, port))
}

/// A kubelet's refusal as a Status error (its body is plain text).
async fn kubelet_error(node: &str, resp: Response<Incoming>) -> ApiError {
    let status = resp.status();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body[..body.len().min(64 * 1024)])
        .trim()
        .to_owned();
    let message = if text.is_empty() {
        format!("the kubelet of node {node} answered {status}")
    } else {
        text
    };
    match status.as_u16() {
        400 | 404 => ApiError::bad_request(message),
        401 | 403 => ApiError::Forbidden {
            message: format!("the kubelet of node {node} refused the API server: {message}"),
        },
        503 => ApiError::Unavailable { message },
        _ => ApiError::internal(message),
    }
}
