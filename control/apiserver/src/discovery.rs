//! API discovery: the legacy documents (`/api`, `/apis`, `/apis/<g>`,
//! `/api/v1`, `/apis/<g>/<v>`) and aggregated discovery
//! (`apidiscovery.k8s.io` v2 and v2beta1 `APIGroupDiscoveryList`, which
//! kubectl 1.27+ asks for first and which saves it one request per group).

use crate::resources::{Registry, ResourceInfo};
use serde_json::{Value, json};

fn subresource_verbs(sub: &str) -> &'static [&'static str] {
    match sub {
        "status" | "scale" | "ephemeralcontainers" => &["get", "patch", "update"],
        "finalize" => &["update"],
        "binding" | "eviction" | "token" => &["create"],
        "log" => &["get"],
        "exec" | "attach" | "portforward" | "proxy" => &["create", "get"],
        _ => &["get"],
    }
}

fn subresource_kind(info: &ResourceInfo, sub: &str) -> (String, String, String) {
    match sub {
        "scale" => ("autoscaling".into(), "v1".into(), "Scale".into()),
        "binding" => (String::new(), "v1".into(), "Binding".into()),
        "eviction" => ("policy".into(), "v1".into(), "Eviction".into()),
        "token" => (
            "authentication.k8s.io".into(),
            "v1".into(),
            "TokenRequest".into(),
        ),
        "log" | "exec" | "attach" | "portforward" | "proxy" => (
            String::new(),
            "v1".into(),
            match sub {
                "exec" => "PodExecOptions",
                "attach" => "PodAttachOptions",
                "portforward" => "PodPortForwardOptions",
                "proxy" => {
                    if info.plural == "nodes" {
                        "NodeProxyOptions"
                    } else {
                        "ServiceProxyOptions"
                    }
                }
                _ => info.kind.as_str(),
            }
            .into(),
        ),
        _ => (info.group.clone(), info.version.clone(), info.kind.clone()),
    }
}

/// `APIResourceList` of one group version.
pub fn resource_list(registry: &Registry, group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for r in registry.in_group_version(group, version) {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": r.verbs,
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            entry["categories"] = json!(r.categories);
        }
        resources.push(entry);
        for sub in &r.subresources {
            let (g, v, k) = subresource_kind(&r, sub);
            let mut e = json!({
                "name": format!("{}/{}", r.plural, sub),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": k,
                "verbs": subresource_verbs(sub),
            });
            if g != r.group || v != r.version {
                e["group"] = json!(g);
                e["version"] = json!(v);
            }
            resources.push(e);
        }
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    })
}

/// `/api`
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_doc(group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": vs,
        "preferredVersion": vs.first().cloned().unwrap_or(Value::Null),
    })
}

/// `/apis`
pub fn groups(registry: &Registry) -> Value {
    let groups: Vec<Value> = registry
        .groups()
        .iter()
        .filter(|g| !g.group.is_empty())
        .map(|g| group_doc(&g.group, &g.versions))
        .chain(std::iter::once(crate::metrics_api::group_doc()))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`
pub fn group(registry: &Registry, group: &str) -> Option<Value> {
    let g = registry
        .groups()
        .into_iter()
        .find(|g| g.group == group && !group.is_empty())?;
    let mut doc = group_doc(&g.group, &g.versions);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

/// Which aggregated discovery version the client accepts, if any
/// (`v2` or `v2beta1`), in the client's order of preference.
pub fn aggregated_version(accept: &str) -> Option<&'static str> {
    for part in accept.split(',') {
        if !part.contains("as=APIGroupDiscoveryList") || !part.contains("g=apidiscovery.k8s.io") {
            continue;
        }
        if part.contains("v=v2beta1") {
            return Some("v2beta1");
        }
        if part.contains("v=v2") {
            return Some("v2");
        }
    }
    None
}

/// Aggregated discovery for the core group (`core == true`, `/api`) or for
/// every other group (`/apis`).
pub fn aggregated(registry: &Registry, core: bool, version: &str) -> Value {
    let mut items = Vec::new();
    for g in registry.groups() {
        if g.group.is_empty() != core {
            continue;
        }
        let versions: Vec<Value> = g
            .versions
            .iter()
            .map(|v| {
                let resources: Vec<Value> = registry
                    .in_group_version(&g.group, v)
                    .iter()
                    .map(|r| {
                        let subs: Vec<Value> = r
                            .subresources
                            .iter()
                            .map(|sub| {
                                let (sg, sv, sk) = subresource_kind(r, sub);
                                json!({
                                    "subresource": sub,
                                    "responseKind": {"group": sg, "version": sv, "kind": sk},
                                    "verbs": subresource_verbs(sub),
                                })
                            })
                            .collect();
                        let mut e = json!({
                            "resource": r.plural,
                            "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
                            "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                            "singularResource": r.singular,
                            "verbs": r.verbs,
                        });
                        if !r.short_names.is_empty() {
                            e["shortNames"] = json!(r.short_names);
                        }
                        if !r.categories.is_empty() {
                            e["categories"] = json!(r.categories);
                        }
                        if !subs.is_empty() {
                            e["subresources"] = json!(subs);
                        }
                        e
                    })
                    .collect();
                json!({"version": v, "resources": resources, "freshness": "Current"})
            })
            .collect();
        items.push(json!({"metadata": {"name": g.group}, "versions": versions}));
    }
    // metrics.k8s.io is served by `metrics_api`, outside the registry.
    if !core {
        items.push(crate::metrics_api::aggregated_item());
    }
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{version}"),
        "metadata": {},
        "items": items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregated_accept_parsing() {
        let kubectl_127 = "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(aggregated_version(kubectl_127), Some("v2beta1"));
        let kubectl_133 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(aggregated_version(kubectl_133), Some("v2"));
        assert_eq!(aggregated_version("application/json"), None);
    }

    #[test]
    fn resource_lists_include_subresources() {
        let reg = Registry::builtin();
        let l = resource_list(&reg, "apps", "v1");
        let names: Vec<&str> = l["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"deployments"));
        assert!(names.contains(&"deployments/scale"));
        let agg = aggregated(&reg, true, "v2");
        assert_eq!(agg["items"][0]["metadata"]["name"], "");
    }
}
