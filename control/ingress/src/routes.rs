//! The routing table: Ingresses of the `skep` class, their Services and
//! EndpointSlices, and TLS Secrets turned into one immutable [`Snapshot`]
//! that the proxy reads per request. A change anywhere builds a new
//! snapshot which replaces the old one whole, so a request sees either
//! the old table or the new one, never half of each.
//!
//! Matching follows the Ingress API: a host is exact (`foo.example.com`)
//! or a single-label wildcard (`*.example.com` matches `a.example.com`,
//! not `a.b.example.com` nor `example.com`); rules without a host match
//! every host. Exact hosts win over wildcards, wildcards over host-less
//! rules. Within those, the longest path wins, and at equal length Exact
//! wins over Prefix. Prefix matching is element-wise (`/foo` matches
//! `/foo`, `/foo/` and `/foo/bar`, not `/foobar`); ImplementationSpecific
//! is Prefix. Requests nothing matches go to the default backend (the
//! oldest Ingress's `spec.defaultBackend`), else 404.

use crate::{metrics::Registry, tls::CertTable};
use serde_json::Value;
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

/// The controller name IngressClasses of skep carry (`spec.controller`).
pub const CONTROLLER: &str = "skep.io/ingress-controller";
/// The IngressClass the server creates.
pub const CLASS_NAME: &str = "skep";
/// Marks the cluster's default IngressClass.
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
/// The deprecated way to choose a class, still honoured.
pub const CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
/// Per-Ingress switch of the HTTP→HTTPS redirect (`"false"` turns it
/// off); the skep name, the generic one and ingress-nginx's are read.
pub const SSL_REDIRECT_ANNOTATIONS: [&str; 3] = [
    "skep.io/ssl-redirect",
    "ingress.kubernetes.io/ssl-redirect",
    "nginx.ingress.kubernetes.io/ssl-redirect",
];

/// Where matched requests go: a Service port's ready endpoints.
#[derive(Debug)]
pub struct Backend {
    /// `namespace/name` of the Ingress that routes here.
    pub ingress: Arc<str>,
    pub namespace: Arc<str>,
    /// The Service name.
    pub service: Arc<str>,
    /// Ready endpoints (sorted, so equal inputs give equal tables).
    pub endpoints: Vec<SocketAddr>,
    /// The same as URI authorities, made once per table, not per request.
    pub authorities: Vec<http::uri::Authority>,
    next: AtomicUsize,
    pub stats: Arc<crate::metrics::Stats>,
    /// The owning Ingress allows the HTTP→HTTPS redirect (the default);
    /// it applies to hosts some Ingress lists under `spec.tls`.
    pub ssl_redirect: bool,
}

impl Backend {
    /// The next endpoint round-robin, skipping `skip` positions (retries
    /// after a connect failure take the following ones).
    pub fn pick(
        &self,
        start: usize,
        attempt: usize,
    ) -> Option<(SocketAddr, &http::uri::Authority)> {
        if self.endpoints.is_empty() || self.authorities.len() != self.endpoints.len() {
            return None;
        }
        let i = (start + attempt) % self.endpoints.len();
        Some((self.endpoints[i], &self.authorities[i]))
    }

    /// Where this request's round-robin starts.
    pub fn start(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathKind {
    Exact,
    Prefix,
}

#[derive(Debug)]
pub struct Route {
    /// For Prefix: without the trailing `/` (except the root `/`).
    pub path: String,
    pub kind: PathKind,
    pub backend: Arc<Backend>,
}

impl Route {
    fn matches(&self, path: &str) -> bool {
        match self.kind {
            PathKind::Exact => path == self.path,
            PathKind::Prefix => {
                self.path == "/"
                    || (path.starts_with(self.path.as_str())
                        && (path.len() == self.path.len()
                            || path.as_bytes()[self.path.len()] == b'/'))
            }
        }
    }
}

/// The proxy's whole view of the cluster at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    exact: HashMap<String, Vec<Route>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Vec<Route>>,
    any_host: Vec<Route>,
    default_backend: Option<Arc<Backend>>,
    pub certs: CertTable,
    /// Ingresses of the class, `namespace/name` (for status and logs).
    pub ingresses: Vec<String>,
    /// Hosts listed under some Ingress's `spec.tls` (lower-case); plain
    /// HTTP requests to them are redirected to HTTPS.
    tls_hosts: HashSet<String>,
    /// The same for `*.parent` entries, keyed by the parent.
    tls_wildcards: HashSet<String>,
}

fn first_match<'a>(routes: &'a [Route], path: &str) -> Option<&'a Arc<Backend>> {
    routes.iter().find(|r| r.matches(path)).map(|r| &r.backend)
}

impl Snapshot {
    /// The backend for a request; `host` lower-case without the port.
    pub fn route(&self, host: &str, path: &str) -> Option<&Arc<Backend>> {
        if let Some(b) = self.exact.get(host).and_then(|r| first_match(r, path)) {
            return Some(b);
        }
        if let Some((_, parent)) = host.split_once('.')
            && let Some(b) = self.wildcard.get(parent).and_then(|r| first_match(r, path))
        {
            return Some(b);
        }
        first_match(&self.any_host, path).or(self.default_backend.as_ref())
    }

    /// Whether some Ingress serves `host` (lower-case, no port) over TLS.
    pub fn has_tls(&self, host: &str) -> bool {
        if self.tls_hosts.is_empty() && self.tls_wildcards.is_empty() {
            return false;
        }
        self.tls_hosts.contains(host)
            || host
                .split_once('.')
                .is_some_and(|(_, parent)| self.tls_wildcards.contains(parent))
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty()
            && self.wildcard.is_empty()
            && self.any_host.is_empty()
            && self.default_backend.is_none()
    }
}

/// The API objects a snapshot is built from, keyed `namespace/name`.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub ingresses: BTreeMap<String, Value>,
    pub classes: BTreeMap<String, Value>,
    pub services: BTreeMap<String, Value>,
    pub slices: BTreeMap<String, Value>,
    pub secrets: BTreeMap<String, Value>,
}

fn s<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str)
}

pub fn key(obj: &Value) -> String {
    match s(obj, "/metadata/namespace") {
        Some(ns) if !ns.is_empty() => {
            format!("{ns}/{}", s(obj, "/metadata/name").unwrap_or(""))
        }
        _ => s(obj, "/metadata/name").unwrap_or("").to_owned(),
    }
}

/// Whether an Ingress belongs to skep: its class (spec.ingressClassName,
/// else the deprecated annotation) is an IngressClass whose controller is
/// skep's (or is named `skep` when that class does not exist yet), and
/// Ingresses without a class belong to skep when a skep IngressClass is
/// the cluster default.
pub fn is_ours(ingress: &Value, classes: &BTreeMap<String, Value>) -> bool {
    let class = s(ingress, "/spec/ingressClassName").or_else(|| {
        s(
            ingress,
            "/metadata/annotations/kubernetes.io~1ingress.class",
        )
    });
    let ours = |c: &Value| s(c, "/spec/controller") == Some(CONTROLLER);
    match class {
        Some(name) => match classes.get(name) {
            Some(c) => ours(c),
            None => name == CLASS_NAME,
        },
        None => classes.values().any(|c| {
            ours(c)
                && s(
                    c,
                    "/metadata/annotations/ingressclass.kubernetes.io~1is-default-class",
                ) == Some("true")
        }),
    }
}

/// Whether an Ingress leaves the HTTP→HTTPS redirect on (anything but
/// `"false"` in its annotation does).
fn ssl_redirect(ingress: &Value) -> bool {
    let Some(annotations) = ingress
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    else {
        return true;
    };
    !SSL_REDIRECT_ANNOTATIONS.iter().any(|a| {
        annotations
            .get(*a)
            .and_then(Value::as_str)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
    })
}

/// Ingress age order: oldest first, then by name, for conflicts.
fn age_key(ing: &Value) -> (String, String) {
    (
        s(ing, "/metadata/creationTimestamp")
            .unwrap_or("")
            .to_owned(),
        key(ing),
    )
}

/// A Service port's ready endpoints, from the Service's EndpointSlices.
fn endpoints(
    objs: &Objects,
    slices_by_service: &HashMap<String, Vec<&Value>>,
    ns: &str,
    backend: &Value,
) -> (String, Vec<SocketAddr>) {
    let name = s(backend, "/service/name").unwrap_or("");
    let svc_key = format!("{ns}/{name}");
    let Some(svc) = objs.services.get(&svc_key) else {
        return (name.to_owned(), Vec::new());
    };
    let wanted_number = backend
        .pointer("/service/port/number")
        .and_then(Value::as_u64);
    let wanted_name = s(backend, "/service/port/name");
    let ports = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let port = ports.iter().find(|p| {
        (wanted_number.is_some() && p.get("port").and_then(Value::as_u64) == wanted_number)
            || (wanted_name.is_some() && s(p, "/name") == wanted_name)
    });
    let Some(port) = port else {
        return (name.to_owned(), Vec::new());
    };
    // EndpointSlice ports carry the Service port's name ("" when unnamed).
    let port_name = s(port, "/name").unwrap_or("");
    let mut out = Vec::new();
    for slice in slices_by_service.get(&svc_key).into_iter().flatten() {
        let Some(target) = slice
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|p| s(p, "/name").unwrap_or("") == port_name)
            .and_then(|p| p.get("port").and_then(Value::as_u64))
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for ep in slice
            .get("endpoints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            // Unset readiness means ready (the API's convention).
            if ep.pointer("/conditions/ready").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            for addr in ep
                .get("addresses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if let Ok(ip) = addr.parse::<IpAddr>() {
                    out.push(SocketAddr::new(ip, target));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    (name.to_owned(), out)
}

/// What building a snapshot needs besides the objects.
#[derive(Debug)]
pub struct BuildContext<'a> {
    pub registry: &'a Registry,
    pub certs: &'a mut crate::tls::CertCache,
}

/// Builds the routing table from the API objects.
pub fn build(objs: &Objects, ctx: BuildContext<'_>) -> Snapshot {
    let mut slices_by_service: HashMap<String, Vec<&Value>> = HashMap::new();
    for slice in objs.slices.values() {
        if let Some(svc) = s(slice, "/metadata/labels/kubernetes.io~1service-name") {
            let ns = s(slice, "/metadata/namespace").unwrap_or("");
            slices_by_service
                .entry(format!("{ns}/{svc}"))
                .or_default()
                .push(slice);
        }
    }
    let mut ours: Vec<&Value> = objs
        .ingresses
        .values()
        .filter(|i| is_ours(i, &objs.classes))
        .filter(|i| i.pointer("/metadata/deletionTimestamp").is_none())
        .collect();
    ours.sort_by_key(|i| age_key(i));

    let mut snap = Snapshot::default();
    // (host tier, host, path, kind) taken: the oldest Ingress keeps it.
    let mut taken: std::collections::HashSet<(u8, String, String, PathKind)> = Default::default();
    let mut tls_entries = Vec::new();
    for ing in &ours {
        let ns = s(ing, "/metadata/namespace").unwrap_or("default");
        let ing_key: Arc<str> = Arc::from(key(ing));
        let ns_arc: Arc<str> = Arc::from(ns);
        let redirect = ssl_redirect(ing);
        let make_backend = |b: &Value| -> Option<Arc<Backend>> {
            b.get("service")?;
            let (service, endpoints) = endpoints(objs, &slices_by_service, ns, b);
            let stats = ctx.registry.stats(&ing_key, ns, &service);
            let authorities = endpoints
                .iter()
                .filter_map(|e| http::uri::Authority::try_from(e.to_string()).ok())
                .collect();
            Some(Arc::new(Backend {
                ingress: ing_key.clone(),
                namespace: ns_arc.clone(),
                service: Arc::from(service.as_str()),
                endpoints,
                authorities,
                next: AtomicUsize::new(0),
                stats,
                ssl_redirect: redirect,
            }))
        };
        if snap.default_backend.is_none()
            && let Some(b) = ing.pointer("/spec/defaultBackend")
        {
            snap.default_backend = make_backend(b);
        }
        for rule in ing
            .pointer("/spec/rules")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let host = s(rule, "/host").unwrap_or("").to_ascii_lowercase();
            for p in rule
                .pointer("/http/paths")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let kind = match s(p, "/pathType") {
                    Some("Exact") => PathKind::Exact,
                    _ => PathKind::Prefix,
                };
                let raw = s(p, "/path").unwrap_or("/");
                let path = if kind == PathKind::Prefix && raw.len() > 1 {
                    raw.trim_end_matches('/').to_owned()
                } else {
                    raw.to_owned()
                };
                let path = if path.is_empty() {
                    "/".to_owned()
                } else {
                    path
                };
                let Some(backend) = p.get("backend").and_then(make_backend) else {
                    tracing::debug!(ingress = %ing_key, "a path without a service backend is ignored");
                    continue;
                };
                let (tier, list) = if host.is_empty() {
                    (2, &mut snap.any_host)
                } else if let Some(parent) = host.strip_prefix("*.") {
                    (1, snap.wildcard.entry(parent.to_owned()).or_default())
                } else {
                    (0, snap.exact.entry(host.clone()).or_default())
                };
                if !taken.insert((tier, host.clone(), path.clone(), kind)) {
                    continue;
                }
                list.push(Route {
                    path,
                    kind,
                    backend,
                });
            }
        }
        for t in ing
            .pointer("/spec/tls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for h in t
                .get("hosts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                let h = h.to_ascii_lowercase();
                match h.strip_prefix("*.") {
                    Some(parent) => snap.tls_wildcards.insert(parent.to_owned()),
                    None => snap.tls_hosts.insert(h),
                };
            }
            tls_entries.push((ns.to_owned(), t.clone()));
        }
        snap.ingresses.push(ing_key.to_string());
    }
    let order = |routes: &mut Vec<Route>| {
        routes.sort_by(|a, b| {
            b.path
                .len()
                .cmp(&a.path.len())
                .then((a.kind == PathKind::Prefix).cmp(&(b.kind == PathKind::Prefix)))
        })
    };
    snap.exact.values_mut().for_each(order);
    snap.wildcard.values_mut().for_each(order);
    order(&mut snap.any_host);
    snap.certs = ctx.certs.table(&tls_entries, &objs.secrets);
    snap
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn objects() -> Objects {
        let mut o = Objects::default();
        o.classes.insert(
            "skep".into(),
            json!({"metadata": {"name": "skep", "annotations": {DEFAULT_CLASS_ANNOTATION: "true"}},
                   "spec": {"controller": CONTROLLER}}),
        );
        for (name, port, ip) in [("a", 8080, "10.42.0.5"), ("b", 9090, "10.42.0.6")] {
            o.services.insert(
                format!("d/{name}"),
                json!({"metadata": {"name": name, "namespace": "d"},
                       "spec": {"ports": [{"name": "http", "port": 80, "targetPort": port}]}}),
            );
            o.slices.insert(
                format!("d/{name}-x"),
                json!({"metadata": {"name": format!("{name}-x"), "namespace": "d",
                                    "labels": {"kubernetes.io/service-name": name}},
                       "ports": [{"name": "http", "port": port}],
                       "endpoints": [{"addresses": [ip], "conditions": {"ready": true}},
                                     {"addresses": ["10.42.9.9"], "conditions": {"ready": false}}]}),
            );
        }
        o
    }

    fn ingress(name: &str, ts: &str, spec: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "d", "creationTimestamp": ts}, "spec": spec})
    }

    fn build_it(o: &Objects) -> Snapshot {
        let registry = Registry::default();
        let mut certs = crate::tls::CertCache::default();
        build(
            o,
            BuildContext {
                registry: &registry,
                certs: &mut certs,
            },
        )
    }

    fn svc(snap: &Snapshot, host: &str, path: &str) -> Option<String> {
        snap.route(host, path).map(|b| b.service.to_string())
    }

    #[test]
    fn hosts_paths_and_precedence() {
        let mut o = objects();
        let p = |path: &str, t: &str, svc: &str| {
            json!({"path": path, "pathType": t,
            "backend": {"service": {"name": svc, "port": {"number": 80}}}})
        };
        o.ingresses.insert(
            "d/one".into(),
            ingress(
                "one",
                "2024-01-01T00:00:00Z",
                json!({"rules": [
                    {"host": "foo.test", "http": {"paths": [p("/", "Prefix", "a"), p("/api/", "Prefix", "b"), p("/exact", "Exact", "b")]}},
                    {"host": "*.wild.test", "http": {"paths": [p("/", "ImplementationSpecific", "b")]}},
                    {"http": {"paths": [p("/any", "Prefix", "a")]}},
                ]}),
            ),
        );
        let snap = build_it(&o);
        assert_eq!(svc(&snap, "foo.test", "/"), Some("a".into()));
        assert_eq!(svc(&snap, "foo.test", "/api"), Some("b".into()));
        assert_eq!(svc(&snap, "foo.test", "/api/v1"), Some("b".into()));
        assert_eq!(
            svc(&snap, "foo.test", "/apiv1"),
            Some("a".into()),
            "element-wise prefix"
        );
        assert_eq!(svc(&snap, "foo.test", "/exact"), Some("b".into()));
        assert_eq!(svc(&snap, "foo.test", "/exact/"), Some("a".into()));
        assert_eq!(svc(&snap, "x.wild.test", "/z"), Some("b".into()));
        assert_eq!(svc(&snap, "y.x.wild.test", "/z"), None, "one label only");
        assert_eq!(svc(&snap, "wild.test", "/z"), None);
        assert_eq!(svc(&snap, "other.test", "/any/thing"), Some("a".into()));
        assert_eq!(
            svc(&snap, "foo.test", "/any"),
            Some("a".into()),
            "host-less rules apply to every host"
        );
        assert_eq!(svc(&snap, "other.test", "/"), None);
        let b = snap.route("foo.test", "/").unwrap();
        assert_eq!(
            b.endpoints,
            vec!["10.42.0.5:8080".parse().unwrap()],
            "unready left out"
        );
    }

    #[test]
    fn classes_default_backend_and_conflicts() {
        let mut o = objects();
        let rule = |svc: &str| {
            json!([{"host": "h.test", "http": {"paths": [{"path": "/", "pathType": "Prefix",
            "backend": {"service": {"name": svc, "port": {"name": "http"}}}}]}}])
        };
        o.ingresses.insert(
            "d/new".into(),
            ingress(
                "new",
                "2024-02-01T00:00:00Z",
                json!({"rules": rule("b"),
            "defaultBackend": {"service": {"name": "b", "port": {"number": 80}}}}),
            ),
        );
        o.ingresses.insert(
            "d/old".into(),
            ingress(
                "old",
                "2024-01-01T00:00:00Z",
                json!({"rules": rule("a"),
            "defaultBackend": {"service": {"name": "a", "port": {"number": 80}}}}),
            ),
        );
        o.ingresses.insert(
            "d/other".into(),
            ingress(
                "other",
                "2023-01-01T00:00:00Z",
                json!({"ingressClassName": "nginx",
            "rules": rule("b")}),
            ),
        );
        let snap = build_it(&o);
        assert_eq!(
            svc(&snap, "h.test", "/"),
            Some("a".into()),
            "the oldest Ingress wins"
        );
        assert_eq!(
            svc(&snap, "nothing.test", "/"),
            Some("a".into()),
            "default backend"
        );
        assert_eq!(
            snap.ingresses,
            vec!["d/old".to_string(), "d/new".to_string()]
        );
        // Without a default skep class, class-less Ingresses are not ours.
        o.classes.clear();
        assert!(build_it(&o).is_empty());
    }
}
