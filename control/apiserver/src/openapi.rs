//! OpenAPI v3 documents generated from the resource registry: the root
//! index (`/openapi/v3`) and one document per group version.
//!
//! kubectl reads them to learn that the server validates fields itself
//! (`fieldValidation` on the PATCH operation of each kind), after which it
//! skips client-side schema validation. The strategic-merge content type is
//! deliberately not listed: kubectl then computes apply patches from its
//! compiled-in types, which carry the exact patch merge keys.

use crate::resources::{Registry, ResourceInfo};
use serde_json::{Map, Value, json};

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn hash(s: &str) -> String {
    let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{h:016X}")
}

/// Built-in schemas (for `kubectl explain`) plus each custom resource's
/// `openAPIV3Schema`.
fn schemas(registry: &Registry, group: &str, version: &str) -> Map<String, Value> {
    let mut out = crate::openapi_schemas::components(registry, group, version);
    for r in registry.in_group_version(group, version) {
        if let Some(schema) = &r.schema {
            let mut s = schema.clone();
            s["x-kubernetes-group-version-kind"] =
                json!([{"group": r.group, "version": r.version, "kind": r.kind}]);
            out.insert(
                format!(
                    "{}.{}.{}",
                    r.group.split('.').rev().collect::<Vec<_>>().join("."),
                    r.version,
                    r.kind
                ),
                s,
            );
        }
    }
    out
}

/// `/openapi/v3`: where each group version's document is.
pub fn index(registry: &Registry) -> Value {
    let mut paths = Map::new();
    for g in registry.groups() {
        for v in &g.versions {
            let path = gv_path(&g.group, v);
            let doc = group_version(registry, &g.group, v).to_string();
            paths.insert(
                path.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={}", hash(&doc))}),
            );
        }
    }
    json!({"paths": paths})
}

/// The OpenAPI documents, encoded once per registry generation (building
/// them with every built-in schema costs far more than serving them).
#[derive(Debug, Default)]
pub struct Cache {
    inner: std::sync::Mutex<(u64, std::collections::HashMap<String, bytes::Bytes>)>,
}

impl Cache {
    /// The encoded document for `key` ("" for the index, else the group
    /// version path), built by `make` when missing or stale.
    pub fn get(
        &self,
        registry: &Registry,
        key: &str,
        make: impl FnOnce() -> Value,
    ) -> bytes::Bytes {
        let generation = registry.generation();
        if let Ok(guard) = self.inner.lock()
            && guard.0 == generation
            && let Some(doc) = guard.1.get(key)
        {
            return doc.clone();
        }
        let doc = bytes::Bytes::from(make().to_string());
        if let Ok(mut guard) = self.inner.lock() {
            if guard.0 != generation {
                *guard = (generation, Default::default());
            }
            guard.1.insert(key.to_owned(), doc.clone());
        }
        doc
    }
}

fn param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": "string", "uniqueItems": true}})
}

fn operation(info: &ResourceInfo, action: &str, id: &str, write: bool) -> Value {
    let mut params = vec![param(
        "pretty",
        "If 'true', then the output is pretty printed.",
    )];
    if write {
        params.push(param(
            "dryRun",
            "When present, indicates that modifications should not be persisted.",
        ));
        params.push(param("fieldManager", "fieldManager is a name associated with the actor or entity that is making these changes."));
        params.push(param(
            "fieldValidation",
            "fieldValidation instructs the server on how to handle objects in the request containing unknown or duplicate fields. Valid values are: Ignore, Warn, Strict.",
        ));
    }
    let mut op = json!({
        "operationId": id,
        "parameters": params,
        "responses": {"200": {"description": "OK"}, "401": {"description": "Unauthorized"}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": info.group, "version": info.version, "kind": info.kind},
    });
    if action == "patch" {
        op["requestBody"] = json!({"content": {
            "application/json-patch+json": {"schema": {"type": "object"}},
            "application/merge-patch+json": {"schema": {"type": "object"}},
            "application/apply-patch+yaml": {"schema": {"type": "object"}},
        }});
    } else if write && action != "delete" {
        op["requestBody"] = json!({"content": {"*/*": {"schema": {"type": "object"}}}});
    }
    op
}

/// The document of one group version.
pub fn group_version(registry: &Registry, group: &str, version: &str) -> Value {
    let base = format!("/{}", gv_path(group, version));
    let mut paths = Map::new();
    for r in registry.in_group_version(group, version) {
        let id = format!("{}{}", r.plural, r.version);
        if r.is_virtual() {
            paths.insert(
                format!("{base}/{}", r.plural),
                json!({"post": operation(&r, "post", &format!("create{id}"), true)}),
            );
            continue;
        }
        let collection = if r.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}", r.plural)
        } else {
            format!("{base}/{}", r.plural)
        };
        paths.insert(
            collection.clone(),
            json!({
                "get": operation(&r, "list", &format!("list{id}"), false),
                "post": operation(&r, "post", &format!("create{id}"), true),
                "delete": operation(&r, "deletecollection", &format!("deletecollection{id}"), true),
            }),
        );
        let item = format!("{collection}/{{name}}");
        paths.insert(
            item.clone(),
            json!({
                "get": operation(&r, "get", &format!("read{id}"), false),
                "put": operation(&r, "put", &format!("replace{id}"), true),
                "patch": operation(&r, "patch", &format!("patch{id}"), true),
                "delete": operation(&r, "delete", &format!("delete{id}"), true),
            }),
        );
        for sub in &r.subresources {
            if matches!(sub.as_str(), "status" | "scale") {
                paths.insert(
                    format!("{item}/{sub}"),
                    json!({
                        "get": operation(&r, "get", &format!("read{id}{sub}"), false),
                        "put": operation(&r, "put", &format!("replace{id}{sub}"), true),
                        "patch": operation(&r, "patch", &format!("patch{id}{sub}"), true),
                    }),
                );
            }
        }
        if r.namespaced {
            paths.insert(
                format!("{base}/{}", r.plural),
                json!({"get": operation(&r, "list", &format!("list{id}AllNamespaces"), false)}),
            );
        }
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.31.0"},
        "paths": paths,
        "components": {"schemas": schemas(registry, group, version)},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_operations_advertise_field_validation() {
        let reg = Registry::builtin();
        let doc = group_version(&reg, "apps", "v1");
        let patch =
            &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "Deployment"
        );
        assert!(
            patch["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation")
        );
        let idx = index(&reg);
        assert!(
            idx["paths"]["apis/apps/v1"]["serverRelativeURL"]
                .as_str()
                .unwrap()
                .starts_with("/openapi/v3/apis/apps/v1?hash=")
        );
    }
}
