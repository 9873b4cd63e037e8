//! Parsing request paths into what they address.

use crate::resources::{Registry, ResourceInfo};
use std::sync::Arc;

/// What a request path addresses.
#[derive(Debug, Clone)]
pub enum Route {
    Health(&'static str),
    Version,
    Metrics,
    /// `/api`
    CoreVersions,
    /// `/apis`
    Groups,
    /// `/apis/<group>`
    Group(String),
    /// `/api/v1`, `/apis/<group>/<version>`
    ResourceList {
        group: String,
        version: String,
    },
    OpenApiV2,
    OpenApiV3(Option<String>),
    /// `/skep/v1/flows`: the flow relay (`flows_relay`).
    Flows,
    /// `/apis/metrics.k8s.io/…`: served by `metrics_api`, not the store.
    MetricsApi(crate::metrics_api::MetricsRoute),
    Resource(ResourceRoute),
    /// `/ui/…`: the web console's static assets (`console`); the path
    /// below `/ui`.
    Console(String),
}

#[derive(Debug, Clone)]
pub struct ResourceRoute {
    pub info: Arc<ResourceInfo>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

/// `None` for paths that address nothing served (404).
pub fn parse(path: &str, registry: &Registry) -> Option<Route> {
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match segments.as_slice() {
        ["healthz"] | ["healthz", ..] => return Some(Route::Health("healthz")),
        ["livez"] | ["livez", ..] => return Some(Route::Health("livez")),
        ["readyz"] | ["readyz", ..] => return Some(Route::Health("readyz")),
        ["version"] => return Some(Route::Version),
        ["metrics"] => return Some(Route::Metrics),
        ["skep", "v1", "flows"] => return Some(Route::Flows),
        ["ui", rest @ ..] => return Some(Route::Console(rest.join("/"))),
        ["openapi", "v2"] => return Some(Route::OpenApiV2),
        ["openapi", "v3"] => return Some(Route::OpenApiV3(None)),
        ["openapi", "v3", rest @ ..] => return Some(Route::OpenApiV3(Some(rest.join("/")))),
        ["api"] => return Some(Route::CoreVersions),
        ["apis"] => return Some(Route::Groups),
        ["apis", crate::metrics_api::GROUP, rest @ ..] => {
            return crate::metrics_api::parse(rest).map(Route::MetricsApi);
        }
        ["apis", group] => return Some(Route::Group((*group).to_owned())),
        _ => {}
    }
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    if rest.is_empty() {
        if registry.in_group_version(group, version).is_empty() {
            return None;
        }
        return Some(Route::ResourceList {
            group: group.to_owned(),
            version: version.to_owned(),
        });
    }
    let lookup = |plural: &str| registry.lookup(group, version, plural);
    let route = |info, namespace: Option<&str>, name: Option<&str>, sub: Option<&str>| {
        Some(Route::Resource(ResourceRoute {
            info,
            namespace: namespace.map(str::to_owned),
            name: name.map(str::to_owned),
            subresource: sub.map(str::to_owned),
        }))
    };
    match rest {
        // /namespaces/<ns>/<resource>[/<name>[/<sub>]]
        ["namespaces", ns, plural, tail @ ..] if lookup(plural).is_some_and(|i| i.namespaced) => {
            let info = lookup(plural)?;
            match tail {
                [] => route(info, Some(ns), None, None),
                [name] => route(info, Some(ns), Some(name), None),
                [name, sub] if info.has_subresource(sub) => {
                    route(info, Some(ns), Some(name), Some(sub))
                }
                _ => None,
            }
        }
        // /<resource>[/<name>[/<sub>]] (cluster-scoped, or all namespaces)
        [plural, tail @ ..] => {
            let info = lookup(plural)?;
            match tail {
                [] => route(info, None, None, None),
                [name] if !info.namespaced => route(info, None, Some(name), None),
                [name, sub] if !info.namespaced && info.has_subresource(sub) => {
                    route(info, None, Some(name), Some(sub))
                }
                _ => None,
            }
        }
        [] => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(path: &str) -> ResourceRoute {
        match parse(path, &Registry::builtin()) {
            Some(Route::Resource(r)) => r,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn paths() {
        let r = res("/api/v1/namespaces/default/pods/web/status");
        assert_eq!(
            (
                r.info.plural.as_str(),
                r.namespace.as_deref(),
                r.name.as_deref(),
                r.subresource.as_deref()
            ),
            ("pods", Some("default"), Some("web"), Some("status"))
        );
        let r = res("/api/v1/namespaces/kube-system");
        assert_eq!(
            (r.info.plural.as_str(), r.name.as_deref()),
            ("namespaces", Some("kube-system"))
        );
        let r = res("/api/v1/namespaces/x/status");
        assert_eq!(
            (
                r.info.plural.as_str(),
                r.name.as_deref(),
                r.subresource.as_deref()
            ),
            ("namespaces", Some("x"), Some("status"))
        );
        let r = res("/apis/apps/v1/deployments");
        assert_eq!((r.info.plural.as_str(), r.namespace), ("deployments", None));
        let r = res("/api/v1/nodes/n1");
        assert_eq!(r.name.as_deref(), Some("n1"));
        assert!(parse("/api/v1/pods/x", &Registry::builtin()).is_none());
        assert!(parse("/apis/nope/v1/things", &Registry::builtin()).is_none());
        assert!(matches!(
            parse("/apis/apps/v1", &Registry::builtin()),
            Some(Route::ResourceList { .. })
        ));
    }
}
