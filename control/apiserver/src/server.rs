//! HTTPS serving: TLS (rustls), HTTP/1.1 and HTTP/2 (hyper), authentication,
//! routing to discovery and resource handlers, and response encoding.

use crate::{
    api::{self, Api, PatchType, Query},
    discovery, flows_relay, lifecycle, metrics_api, node_proxy, objects, openapi,
    pki::{self, Credentials},
    prometheus::Metrics,
    rbac, reviews,
    routes::{self, ResourceRoute, Route},
    status::ApiError,
    table::{self, IncludeObject},
    tokens, watch,
};
use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use skep_store::Store;
use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Instant};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Largest request body accepted (kube-apiserver's limit is 3 MiB).
pub const MAX_BODY: usize = 3 * 1024 * 1024;

pub type Body = BoxBody<Bytes, Infallible>;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error(
        "cannot listen on {addr}: {source}; is another server running there? choose another --api-listen"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("bootstrapping the cluster objects failed: {0}")]
    Bootstrap(String),
}

/// What `serve` needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Extra names and addresses for the serving certificate.
    pub extra_sans: Vec<String>,
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    pub local_addr: SocketAddr,
    pub credentials: Credentials,
    pub api: Arc<Api>,
    /// Readiness checks; the binary adds its own (cluster DNS, …).
    pub health: crate::health::HealthChecks,
    /// Resource usage from the kubelets (metrics.k8s.io), for in-process
    /// consumers such as the HPA controller.
    pub metrics_source: Arc<metrics_api::MetricsSource>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Waits until the server stops (it only stops when aborted).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

#[derive(Debug)]
struct State {
    api: Arc<Api>,
    admin_token: String,
    node_token: String,
    metrics: Metrics,
    authorizer: Arc<rbac::Authorizer>,
    signer: Arc<tokens::Signer>,
    openapi: openapi::Cache,
    node_proxy: node_proxy::NodeProxy,
    flows_relay: flows_relay::FlowsRelay,
    health: crate::health::HealthChecks,
    metrics_source: Arc<metrics_api::MetricsSource>,
}

impl State {
    /// Who is calling: a bearer token (admin, node, service account) or,
    /// without one, the client certificate the TLS layer verified.
    async fn authenticate(
        &self,
        req: &Request<Incoming>,
        cert_user: Option<&User>,
    ) -> Option<User> {
        let Some(header) = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
        else {
            return cert_user.cloned();
        };
        let token = header.strip_prefix("Bearer ")?.trim();
        if let Some(claims) = self.signer.verify(token) {
            return self.service_account_user(&claims).await;
        }
        if constant_time_eq(token, &self.admin_token) {
            return Some(User {
                name: "admin".into(),
                groups: vec!["system:masters".into(), "system:authenticated".into()],
            });
        }
        if constant_time_eq(token, &self.node_token) {
            return Some(User {
                name: "system:node".into(),
                groups: vec!["system:nodes".into(), "system:authenticated".into()],
            });
        }
        None
    }

    /// A service-account token is valid while its account exists with the
    /// uid it was issued for.
    async fn service_account_user(&self, claims: &tokens::Claims) -> Option<User> {
        let info = self.api.registry.lookup("", "v1", "serviceaccounts")?;
        let (sa, _) = self
            .api
            .read(&info, Some(&claims.namespace), &claims.name)
            .await
            .ok()?;
        if objects::meta_str(&sa, "uid") != Some(claims.uid.as_str()) {
            return None;
        }
        Some(User {
            name: format!("system:serviceaccount:{}:{}", claims.namespace, claims.name),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{}", claims.namespace),
                "system:authenticated".into(),
            ],
        })
    }
}

/// The user named by a verified client certificate: CN is the user name,
/// O entries are groups (as kube-apiserver reads them).
fn user_from_certificate(der: &[u8]) -> Option<User> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    let mut groups: Vec<String> = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_owned))
        .collect();
    groups.push("system:authenticated".into());
    Some(User { name, groups })
}

/// `Impersonate-User` / `Impersonate-Group` (kubectl `--as`, `--as-group`):
/// the caller must be allowed to impersonate each; the request then runs as
/// the impersonated user.
fn impersonate(state: &State, req: &Request<Incoming>, caller: User) -> Result<User, ApiError> {
    let headers = req.headers();
    let Some(name) = headers
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok())
    else {
        if headers.contains_key("impersonate-group") {
            return Err(ApiError::bad_request(
                "Impersonate-Group requires Impersonate-User",
            ));
        }
        return Ok(caller);
    };
    let groups: Vec<String> = headers
        .get_all("impersonate-group")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    let check = |resource: &str, name: &str, namespace: &str| {
        let a = rbac::Attributes {
            verb: "impersonate".into(),
            resource: resource.into(),
            name: name.into(),
            namespace: namespace.into(),
            ..Default::default()
        };
        if state.authorizer.authorize(&caller, &a).0 {
            Ok(())
        } else {
            Err(forbidden(&caller, &a))
        }
    };
    match name
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
    {
        Some((ns, sa)) => check("serviceaccounts", sa, ns)?,
        None => check("users", name, "")?,
    }
    for g in &groups {
        check("groups", g, "")?;
    }
    let mut all = groups;
    if !all.iter().any(|g| g == "system:authenticated") {
        all.push("system:authenticated".into());
    }
    Ok(User {
        name: name.to_owned(),
        groups: all,
    })
}

fn forbidden(user: &User, a: &rbac::Attributes) -> ApiError {
    let who = format!("User \"{}\"", user.name);
    let message = match &a.path {
        Some(path) => format!("forbidden: {who} cannot {} path \"{path}\"", a.verb),
        None => {
            let resource = if a.subresource.is_empty() {
                a.resource.clone()
            } else {
                format!("{}/{}", a.resource, a.subresource)
            };
            let subject = if a.name.is_empty() {
                resource.clone()
            } else {
                format!("{resource} \"{}\"", a.name)
            };
            let scope = if a.namespace.is_empty() {
                "at the cluster scope".to_string()
            } else {
                format!("in the namespace \"{}\"", a.namespace)
            };
            format!(
                "{subject} is forbidden: {who} cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
                a.verb, a.group
            )
        }
    };
    ApiError::Forbidden { message }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

fn json_response(status: u16, v: &Value, content_type: &str) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, content_type)
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// The response to a large list gives the heap back once it is dropped
/// (heap.rs): by then its values and its buffer are freed.
fn trimmed_after(large: bool, response: Response<Body>) -> Response<Body> {
    if large {
        response.map(|b| crate::heap::TrimWhenDropped::new(b).boxed())
    } else {
        response
    }
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code(), &e.to_status(), "application/json")
}

/// A resource response: Kubernetes protobuf when the client prefers it and
/// the object is of a built-in kind (as kube-apiserver, which serves custom
/// resources in JSON only), JSON otherwise. An object the encoder cannot
/// express goes out as JSON, which every client also accepts.
fn respond(status: u16, v: &Value, proto: bool) -> Response<Body> {
    if proto && crate::protobuf::can_encode(v) {
        match crate::protobuf::encode(v) {
            Ok(body) => {
                return Response::builder()
                    .status(
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    )
                    .header(header::CONTENT_TYPE, crate::protobuf::CONTENT_TYPE)
                    .body(full(body))
                    .unwrap_or_else(|_| Response::new(full(Bytes::new())));
            }
            Err(e) => tracing::debug!(error = %e, "answering in JSON: protobuf encoding failed"),
        }
    }
    json_response(status, v, "application/json")
}

/// An error as a `Status`, in protobuf when the client prefers it.
fn error_response_as(e: &ApiError, proto: bool) -> Response<Body> {
    respond(e.code(), &e.to_status(), proto)
}

/// Whether a resource request is answered in protobuf: the client prefers
/// it, no Table is asked for, and the resource is built in (custom
/// resources have a schema of their own and no protobuf form).
fn protobuf_for(accept: &str, info: &crate::resources::ResourceInfo) -> bool {
    crate::protobuf::preferred(accept)
        && !accept.contains("as=Table")
        && info.schema.is_none()
        && crate::protobuf::schema::for_kind(&info.api_version(), &info.kind).is_some()
}

fn text_response(status: u16, text: impl Into<Bytes>, content_type: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::OK))
        .header(header::CONTENT_TYPE, content_type)
        .body(full(text))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

fn parse_query(q: Option<&str>) -> Query {
    q.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// The Table flavour asked for in `Accept`, if any.
fn wants_table(accept: &str, query: &Query) -> Option<IncludeObject> {
    accept
        .split(',')
        .any(|p| p.contains("as=Table") && p.contains("g=meta.k8s.io"))
        .then(|| IncludeObject::parse(query.get("includeObject").map(String::as_str)))
}

const TABLE_CT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

/// Creates the objects every cluster has: the system namespaces and the
/// `kubernetes` Service.
async fn bootstrap(api: &Api) -> Result<(), ApiError> {
    let ns_info = api
        .registry
        .lookup("", "v1", "namespaces")
        .ok_or_else(|| ApiError::internal("namespaces are not registered"))?;
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let route = ResourceRoute {
            info: ns_info.clone(),
            namespace: None,
            name: None,
            subresource: None,
        };
        match api
            .create(&route, json!({"metadata": {"name": ns}}), &Query::new())
            .await
        {
            Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let svc_info = api
        .registry
        .lookup("", "v1", "services")
        .ok_or_else(|| ApiError::internal("services are not registered"))?;
    let route = ResourceRoute {
        info: svc_info,
        namespace: Some("default".into()),
        name: None,
        subresource: None,
    };
    let kubernetes = json!({
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"clusterIP": "10.43.0.1", "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]},
    });
    match api.create(&route, kubernetes, &Query::new()).await {
        Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e),
    }
    // The system priority classes.
    let pc_info = api
        .registry
        .lookup("scheduling.k8s.io", "v1", "priorityclasses")
        .ok_or_else(|| ApiError::internal("priorityclasses are not registered"))?;
    for class in crate::pod_admission::system_class_objects() {
        let route = ResourceRoute {
            info: pc_info.clone(),
            namespace: None,
            name: None,
            subresource: None,
        };
        match api.create(&route, class, &Query::new()).await {
            Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    // Default RBAC roles and bindings; existing ones (possibly edited by
    // the operator) are left alone.
    for (plural, obj) in rbac::bootstrap_objects() {
        let info = api
            .registry
            .lookup("rbac.authorization.k8s.io", "v1", plural)
            .ok_or_else(|| ApiError::internal("RBAC resources are not registered"))?;
        let route = ResourceRoute {
            info,
            namespace: None,
            name: None,
            subresource: None,
        };
        match api.create(&route, obj, &Query::new()).await {
            Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Client certificates are optional; when presented they must be signed by
/// the cluster CA.
fn client_verifier(
    ca_pem: &str,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, ServeError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| ServeError::Tls(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| ServeError::Tls(e.to_string()))
}

/// Starts serving the API on `config.listen` over `store`.
pub async fn serve(
    config: ServerConfig,
    store: Arc<dyn Store>,
) -> Result<ServerHandle, ServeError> {
    crate::heap::start();
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;
    let client_host = if local_addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        local_addr.ip().to_string()
    };
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default.svc.cluster.local".to_string(),
        "10.43.0.1".to_string(),
    ];
    if !local_addr.ip().is_unspecified() {
        sans.push(local_addr.ip().to_string());
    }
    sans.extend(config.extra_sans.iter().cloned());
    let server_url = format!("https://{client_host}:{}", local_addr.port());
    let credentials = pki::load_or_create(&config.data_dir, &sans, &server_url)?;

    // The serving certificate is read again on SIGHUP and when its files
    // change (an operator's rotation), without a restart.
    let serving = crate::cert_reload::ReloadingCert::new(
        config.data_dir.join("tls/server.crt"),
        config.data_dir.join("tls/server.key"),
        credentials.server_cert_pem.as_bytes(),
        credentials.server_key_pem.as_bytes(),
    )
    .map_err(ServeError::Tls)?;
    serving.spawn_watcher();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ServeError::Tls(e.to_string()))?
    .with_client_cert_verifier(client_verifier(&credentials.ca_cert_pem)?)
    .with_cert_resolver(serving);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));

    let api = Arc::new(Api::new(
        store,
        format!("{client_host}:{}", local_addr.port()),
    ));
    bootstrap(&api)
        .await
        .map_err(|e| ServeError::Bootstrap(e.to_string()))?;
    lifecycle::spawn_namespace_finalizer(api.clone());
    crate::crd::spawn_registry_sync(api.clone());
    let authorizer = Arc::new(rbac::Authorizer::default());
    rbac::initial_load(&api, &authorizer)
        .await
        .map_err(|e| ServeError::Bootstrap(format!("loading RBAC: {e}")))?;
    tokio::spawn(rbac::sync(api.clone(), authorizer.clone()));
    let signer = Arc::new(
        tokens::Signer::load_or_create(&config.data_dir)
            .map_err(|e| ServeError::Tls(e.to_string()))?,
    );

    let health = crate::health::HealthChecks::default();
    // metrics.k8s.io; the in-process HPA controller gets the same source
    // (and cache) through `ServerHandle::metrics_source`.
    let metrics_source =
        Arc::new(metrics_api::MetricsSource::new(&credentials).map_err(ServeError::Tls)?);
    let state = Arc::new(State {
        api: api.clone(),
        admin_token: credentials.admin_token.clone(),
        node_token: credentials.node_token.clone(),
        metrics: Metrics::default(),
        authorizer,
        signer,
        openapi: openapi::Cache::default(),
        node_proxy: node_proxy::NodeProxy::new(&credentials).map_err(ServeError::Tls)?,
        flows_relay: flows_relay::FlowsRelay::new(&credentials).map_err(ServeError::Tls)?,
        health: health.clone(),
        metrics_source: metrics_source.clone(),
    });
    tracing::info!(%local_addr, kubeconfig = %credentials.kubeconfig_path.display(), "API server listening");
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let state = state.clone();
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                };
                let cert_user = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|c| user_from_certificate(c.as_ref()))
                    .map(Arc::new);
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    let cert_user = cert_user.clone();
                    async move { Ok::<_, Infallible>(handle(state, req, cert_user.as_deref()).await) }
                });
                if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), service)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
    });
    Ok(ServerHandle {
        local_addr,
        credentials,
        api,
        health,
        metrics_source,
        task,
    })
}

fn verb_of(method: &Method, r: &ResourceRoute, query: &Query) -> &'static str {
    // Streaming into a pod is `create` whatever the method (WebSocket
    // clients use GET): a reader of pods must not get a shell.
    if matches!(
        r.subresource.as_deref(),
        Some("exec" | "attach" | "portforward")
    ) {
        return "create";
    }
    let watch = crate::api::flag(query, "watch");
    match *method {
        Method::GET if watch => "watch",
        Method::GET if r.name.is_none() => "list",
        Method::GET => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if r.name.is_none() => "deletecollection",
        Method::DELETE => "delete",
        _ => "unknown",
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    cert_user: Option<&User>,
) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let _inflight = state.metrics.inflight(!matches!(
        method,
        Method::GET | Method::HEAD | Method::OPTIONS
    ));
    let path = req.uri().path().to_owned();
    let mut query = parse_query(req.uri().query());
    // Writes without a fieldManager are recorded under the User-Agent's
    // product name, as upstream (server-side apply's managedFields).
    if matches!(method, Method::POST | Method::PUT | Method::PATCH)
        && !query.contains_key("fieldManager")
        && let Some(ua) = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
    {
        query.insert(
            crate::apply::USER_AGENT_MANAGER.to_owned(),
            crate::apply::manager_from_user_agent(ua),
        );
    }
    let route = routes::parse(&path, &state.api.registry);
    // The console's assets hold no data: the page fetches everything with
    // the user's token.
    let public = matches!(
        route,
        Some(Route::Health(_)) | Some(Route::Version) | Some(Route::Console(_))
    );
    let user = match state.authenticate(&req, cert_user).await {
        Some(u) => match impersonate(&state, &req, u) {
            Ok(u) => Some(u),
            Err(e) => {
                state
                    .metrics
                    .record("impersonate", "", e.code(), started.elapsed());
                return error_response(&e);
            }
        },
        None => None,
    };
    let (response, verb, resource) = if user.is_none() && !public {
        (
            error_response(&ApiError::Unauthorized),
            "unknown",
            String::new(),
        )
    } else {
        match route {
            None => (error_response(&ApiError::NoRoute), "get", String::new()),
            Some(Route::Resource(r)) => {
                let verb = verb_of(&method, &r, &query);
                let resource = r.info.plural.clone();
                let user = user.unwrap_or(User {
                    name: "system:anonymous".into(),
                    groups: vec!["system:unauthenticated".into()],
                });
                let attrs = rbac::Attributes {
                    verb: verb.to_owned(),
                    group: r.info.group.clone(),
                    resource: r.info.plural.clone(),
                    subresource: r.subresource.clone().unwrap_or_default(),
                    namespace: r.namespace.clone().unwrap_or_default(),
                    name: r.name.clone().unwrap_or_default(),
                    path: None,
                };
                let proto = protobuf_for(
                    req.headers()
                        .get(header::ACCEPT)
                        .and_then(|a| a.to_str().ok())
                        .unwrap_or(""),
                    &r.info,
                );
                let resp = if !state.authorizer.authorize(&user, &attrs).0 {
                    error_response_as(&forbidden(&user, &attrs), proto)
                } else if node_proxy::is_node_subresource(&r) {
                    match state.node_proxy.handle(&state.api, req, &r).await {
                        Ok(resp) => resp,
                        Err(e) => error_response(&e),
                    }
                } else {
                    // Warnings (fieldValidation=Warn) raised while handling
                    // go out as `Warning` headers, on errors too.
                    let (result, warnings) = crate::strict::collect_warnings(resource_request(
                        &state, req, &r, &query, &user, proto,
                    ))
                    .await;
                    let mut resp = match result {
                        Ok(resp) => resp,
                        Err(e) => error_response_as(&e, proto),
                    };
                    crate::strict::add_warning_headers(resp.headers_mut(), &warnings);
                    resp
                };
                (resp, verb, resource)
            }
            Some(Route::Console(asset)) => (
                crate::console::respond(&method, &asset).map(full),
                "get",
                String::new(),
            ),
            Some(Route::MetricsApi(m)) => {
                let user = user.unwrap_or(User {
                    name: "system:anonymous".into(),
                    groups: vec!["system:unauthenticated".into()],
                });
                // Discovery documents are authorized by path, like /apis.
                let attrs = metrics_api::attributes(&m).unwrap_or(rbac::Attributes {
                    verb: "get".into(),
                    path: Some(path.clone()),
                    ..Default::default()
                });
                let verb = if attrs.verb == "list" { "list" } else { "get" };
                let resource = attrs.resource.clone();
                let resp = if method != Method::GET {
                    error_response(&ApiError::MethodNotAllowed)
                } else if !state.authorizer.authorize(&user, &attrs).0 {
                    error_response(&forbidden(&user, &attrs))
                } else {
                    match state.metrics_source.handle(&state.api, &m, &query).await {
                        Ok(v) => json_response(200, &v, "application/json"),
                        Err(e) => error_response(&e),
                    }
                };
                (resp, verb, resource)
            }
            Some(other) => {
                let user = user.unwrap_or(User {
                    name: "system:anonymous".into(),
                    groups: vec!["system:unauthenticated".into()],
                });
                let attrs = rbac::Attributes {
                    verb: "get".into(),
                    path: Some(path.clone()),
                    ..Default::default()
                };
                let resp = if !public && !state.authorizer.authorize(&user, &attrs).0 {
                    error_response(&forbidden(&user, &attrs))
                } else if let Route::Health(endpoint) = other {
                    health_response(&state, endpoint, &path, &query).await
                } else if matches!(other, Route::Flows) {
                    match state.flows_relay.handle(&state.api, &query).await {
                        Ok(resp) => resp,
                        Err(e) => error_response(&e),
                    }
                } else {
                    non_resource(&state, &req, other)
                };
                (resp, "get", String::new())
            }
        }
    };
    let code = response.status().as_u16();
    state
        .metrics
        .record(verb, &resource, code, started.elapsed());
    tracing::debug!(%method, %path, code, latency_ms = started.elapsed().as_secs_f64() * 1e3, "request");
    response
}

/// /healthz, /livez, /readyz (optionally /readyz/<check>), with
/// `verbose` and `exclude` as Kubernetes takes them.
async fn health_response(
    state: &State,
    endpoint: &str,
    path: &str,
    query: &Query,
) -> Response<Body> {
    let only = path
        .trim_matches('/')
        .split('/')
        .nth(1)
        .filter(|s| !s.is_empty());
    let verbose = query.contains_key("verbose") || only.is_some();
    // (Repeated `exclude` parameters collapse to the last one in this
    // server's query map; a comma-separated list is taken too.)
    let exclude: Vec<String> = query
        .get("exclude")
        .map(|e| e.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let outcomes = crate::health::run(&state.api, &state.health, endpoint, only, &exclude).await;
    if let Some(name) = only
        && outcomes.is_empty()
    {
        return text_response(
            404,
            format!("no such check: {name}\n"),
            "text/plain; charset=utf-8",
        );
    }
    let (code, body) = crate::health::render(endpoint, &outcomes, verbose);
    text_response(code, body, "text/plain; charset=utf-8")
}

fn non_resource(state: &State, req: &Request<Incoming>, route: Route) -> Response<Body> {
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let registry = &state.api.registry;
    match route {
        Route::Health(_) => text_response(200, "ok", "text/plain; charset=utf-8"),
        Route::Version => json_response(
            200,
            &json!({
                "major": "1", "minor": "31", "gitVersion": "v1.31.0-skep",
                "gitCommit": env!("CARGO_PKG_VERSION"), "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z", "goVersion": "rust",
                "compiler": "rustc", "platform": "linux/amd64",
            }),
            "application/json",
        ),
        Route::Metrics => text_response(200, state.metrics.render(), "text/plain; version=0.0.4"),
        Route::CoreVersions | Route::Groups => {
            let core = matches!(route, Route::CoreVersions);
            match discovery::aggregated_version(&accept) {
                Some(v) => json_response(
                    200,
                    &discovery::aggregated(registry, core, v),
                    &format!(
                        "application/json;g=apidiscovery.k8s.io;v={v};as=APIGroupDiscoveryList"
                    ),
                ),
                None if core => json_response(
                    200,
                    &discovery::core_versions(&state.api.server_address),
                    "application/json",
                ),
                None => json_response(200, &discovery::groups(registry), "application/json"),
            }
        }
        Route::Group(g) => match discovery::group(registry, &g) {
            Some(doc) => json_response(200, &doc, "application/json"),
            None => error_response(&ApiError::NoRoute),
        },
        Route::ResourceList { group, version } => json_response(
            200,
            &discovery::resource_list(registry, &group, &version),
            "application/json",
        ),
        Route::OpenApiV3(None) => text_response(
            200,
            state.openapi.get(registry, "", || openapi::index(registry)),
            "application/json",
        ),
        Route::OpenApiV3(Some(gv)) => {
            let parts: Vec<&str> = gv.split('/').collect();
            let (group, version) = match parts.as_slice() {
                ["api", v] => ("", *v),
                ["apis", g, v] => (*g, *v),
                _ => return error_response(&ApiError::NoRoute),
            };
            if registry.in_group_version(group, version).is_empty() {
                return error_response(&ApiError::NoRoute);
            }
            text_response(
                200,
                state.openapi.get(registry, &gv, || {
                    openapi::group_version(registry, group, version)
                }),
                "application/json",
            )
        }
        Route::OpenApiV2 if crate::openapi_v2::wants_protobuf(&accept) => text_response(
            200,
            crate::openapi_v2::document_protobuf(registry),
            crate::openapi_v2::PROTOBUF_CONTENT_TYPE,
        ),
        Route::OpenApiV2 => json_response(
            200,
            &crate::openapi_v2::document_json(registry),
            "application/json",
        ),
        Route::Resource(_) | Route::Flows | Route::MetricsApi(_) => {
            error_response(&ApiError::NoRoute)
        }
        Route::Console(_) => error_response(&ApiError::NoRoute),
    }
}

/// Reads at most [`MAX_BODY`] bytes. A larger body is answered with 413
/// after reading (and discarding) what the client still sends, up to a
/// bound: over HTTP/2 a stream reset before the body ends reaches clients
/// as a transport error instead of the 413.
async fn read_body(req: Request<Incoming>) -> Result<(http::request::Parts, Bytes), ApiError> {
    const DRAIN_LIMIT: usize = 64 * 1024 * 1024;
    let (parts, mut body) = req.into_parts();
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    let drain = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::bad_request(format!("reading the request body failed: {e}"))
            })?;
            if let Ok(data) = frame.into_data() {
                seen += data.len();
                if seen <= MAX_BODY {
                    buf.extend_from_slice(&data);
                } else if seen > DRAIN_LIMIT {
                    break;
                }
            }
        }
        Ok::<_, ApiError>(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), drain)
        .await
        .map_err(|_| ApiError::bad_request("the request body did not arrive within 30 s"))??;
    if seen > MAX_BODY {
        return Err(ApiError::TooLarge { limit: MAX_BODY });
    }
    Ok((parts, buf.freeze()))
}

async fn resource_request(
    state: &Arc<State>,
    req: Request<Incoming>,
    r: &ResourceRoute,
    query: &Query,
    user: &User,
    proto: bool,
) -> Result<Response<Body>, ApiError> {
    let api = &state.api;
    let method = req.method().clone();
    let (parts, body) = read_body(req).await?;
    let header_str = |h: header::HeaderName| {
        parts
            .headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let accept = header_str(header::ACCEPT);
    let content_type = header_str(header::CONTENT_TYPE);
    let table = wants_table(&accept, query);
    let info = &r.info;
    if !info.verbs.iter().any(|v| v == verb_of(&method, r, query)) && r.subresource.is_none() {
        return Err(ApiError::MethodNotAllowed);
    }
    let streaming = matches!(
        r.subresource.as_deref(),
        Some("log" | "exec" | "attach" | "portforward" | "proxy")
    );
    if streaming {
        return Err(ApiError::Unavailable {
            message: format!(
                "{}/{} is served by the node's kubelet, and no node runs on this server yet",
                info.plural,
                r.subresource.as_deref().unwrap_or("")
            ),
        });
    }
    match method {
        Method::GET => {
            if r.name.is_none() {
                let watching = crate::api::flag(query, "watch");
                if watching {
                    let rx =
                        watch::start(api.clone(), r.clone(), query.clone(), table, proto).await?;
                    let stream = tokio_stream_from(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
                    let body = BodyExt::boxed(StreamBody::new(stream));
                    return Response::builder()
                        .status(200)
                        .header(
                            header::CONTENT_TYPE,
                            if table.is_some() {
                                TABLE_CT
                            } else if proto {
                                crate::protobuf::STREAM_CONTENT_TYPE
                            } else {
                                "application/json"
                            },
                        )
                        .header(header::CACHE_CONTROL, "no-cache, private")
                        .body(body)
                        .map_err(|e| ApiError::internal(e.to_string()));
                }
                if table.is_none()
                    && !proto
                    && let Some((items, revision, token)) = api.list_encoded(r, query).await?
                {
                    let large = items.len() >= crate::heap::LARGE_LIST;
                    return Ok(trimmed_after(
                        large,
                        encoded_list(info, items, revision, token),
                    ));
                }
                let listed = api.list(r, query).await?;
                let large = listed.items.len() >= crate::heap::LARGE_LIST;
                let mut meta = json!({"resourceVersion": listed.revision.to_string()});
                if let Some(c) = &listed.continue_token {
                    meta["continue"] = json!(c);
                }
                if let Some(include) = table {
                    return Ok(trimmed_after(
                        large,
                        json_response(
                            200,
                            &table::table(info, &listed.items, meta, include),
                            TABLE_CT,
                        ),
                    ));
                }
                let list = json!({
                    "kind": info.list_kind(),
                    "apiVersion": info.api_version(),
                    "metadata": meta,
                    "items": listed.items,
                });
                return Ok(trimmed_after(large, respond(200, &list, proto)));
            }
            let obj = api.get(r).await?;
            if let Some(include) = table
                && r.subresource.is_none()
            {
                let meta = json!({"resourceVersion": objects::meta_str(&obj, "resourceVersion")});
                return Ok(json_response(
                    200,
                    &table::table(info, &[obj], meta, include),
                    TABLE_CT,
                ));
            }
            Ok(respond(200, &obj, proto))
        }
        Method::POST => {
            let obj = api::decode_body(&body, &content_type)?;
            duplicate_fields(&body, &content_type, query, info)?;
            if info.is_virtual() {
                return Ok(respond(
                    201,
                    &reviews::review(&state.authorizer, info, obj, user)?,
                    proto,
                ));
            }
            match (r.name.as_deref(), r.subresource.as_deref()) {
                (None, None) => Ok(respond(201, &api.create(r, obj, query).await?, proto)),
                (Some(_), Some("binding")) => {
                    Ok(respond(201, &reviews::bind(api, r, obj).await?, proto))
                }
                (Some(_), Some("eviction")) => {
                    Ok(respond(201, &reviews::evict(api, r, obj).await?, proto))
                }
                (Some(_), Some("token")) => Ok(respond(
                    201,
                    &reviews::token_request(api, &state.signer, r, obj).await?,
                    proto,
                )),
                _ => Err(ApiError::MethodNotAllowed),
            }
        }
        Method::PUT => {
            let obj = api::decode_body(&body, &content_type)?;
            duplicate_fields(&body, &content_type, query, info)?;
            if r.name.is_none() {
                return Err(ApiError::MethodNotAllowed);
            }
            Ok(respond(200, &api.update(r, obj, query).await?, proto))
        }
        Method::PATCH => {
            let kind = PatchType::from_content_type(&content_type).ok_or_else(|| ApiError::UnsupportedMediaType {
                message: format!(
                    "the patch content type {content_type:?} is not supported; use application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json or application/apply-patch+yaml"
                ),
            })?;
            if r.name.is_none() {
                return Err(ApiError::MethodNotAllowed);
            }
            let patch = api::decode_body(&body, &content_type)?;
            Ok(respond(
                200,
                &api.patch(r, patch, kind, query).await?,
                proto,
            ))
        }
        Method::DELETE => {
            let options: Value = if body.is_empty() {
                json!({})
            } else if content_type.starts_with(crate::protobuf::CONTENT_TYPE) {
                api::decode_body(&body, &content_type)?
            } else {
                serde_json::from_slice(&body).map_err(|e| {
                    ApiError::bad_request(format!("DeleteOptions is not valid JSON: {e}"))
                })?
            };
            match r.name {
                Some(_) => Ok(respond(200, &api.delete(r, &options, query).await?, proto)),
                None => {
                    let items = api.delete_collection(r, &options, query).await?;
                    let list = json!({"kind": info.list_kind(), "apiVersion": info.api_version(), "metadata": {}, "items": items});
                    Ok(respond(200, &list, proto))
                }
            }
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// Duplicate fields of a JSON body under the request's `fieldValidation`:
/// a strict decoding error, a warning each, or nothing.
fn duplicate_fields(
    body: &[u8],
    content_type: &str,
    query: &Query,
    info: &crate::resources::ResourceInfo,
) -> Result<(), ApiError> {
    let base = content_type.split(';').next().unwrap_or("").trim();
    if !(base.is_empty() || base == "application/json") {
        return Ok(());
    }
    let mode = crate::strict::Mode::of(query);
    if mode == crate::strict::Mode::Ignore {
        return Ok(());
    }
    let dups = crate::strict::duplicate_fields(body);
    if dups.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = dups
        .iter()
        .map(|d| format!("duplicate field \"{d}\""))
        .collect();
    if mode == crate::strict::Mode::Strict {
        return Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
            info.kind,
            info.api_version(),
            info.kind,
            list.join(", ")
        )));
    }
    for w in list {
        crate::strict::warn(w);
    }
    Ok(())
}

/// A list response assembled from already-encoded items.
fn encoded_list(
    info: &crate::resources::ResourceInfo,
    items: Vec<Bytes>,
    revision: i64,
    token: Option<String>,
) -> Response<Body> {
    let mut meta = json!({"resourceVersion": revision.to_string()});
    if let Some(c) = token {
        meta["continue"] = json!(c);
    }
    let head =
        json!({"kind": info.list_kind(), "apiVersion": info.api_version(), "metadata": meta})
            .to_string();
    let total: usize = items.iter().map(|i| i.len() + 1).sum();
    let mut out = Vec::with_capacity(head.len() + total + 16);
    out.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
    out.extend_from_slice(b",\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.extend_from_slice(b"]}");
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(out))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

fn tokio_stream_from(rx: tokio::sync::mpsc::Receiver<Bytes>) -> impl futures::Stream<Item = Bytes> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
}
