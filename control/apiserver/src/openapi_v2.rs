//! The OpenAPI v2 document (`/openapi/v2`), generated from the resource
//! registry: JSON, or the gnostic `openapi_v2.Document` protobuf kubectl
//! asks for (`application/com.github.proto-openapi.spec.v2@v1.0+protobuf`).
//!
//! kubectl 1.27 and 1.28 read it before `apply`: when the PATCH operation of
//! the object's kind (found by its `x-kubernetes-group-version-kind`
//! extension) has a `fieldValidation` query parameter, kubectl leaves field
//! validation to the server. No definitions are served, so kubectl computes
//! strategic merge patches from its compiled-in types.

use crate::resources::{Registry, ResourceInfo};
use prost::Message as _;
use serde_json::{Map, Value, json};

/// What kubectl puts in `Accept` to ask for the protobuf form.
pub const PROTOBUF_ACCEPT: &str = "application/com.github.proto-openapi.spec.v2";

/// The content type of the protobuf form.
pub const PROTOBUF_CONTENT_TYPE: &str =
    "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// Whether an `Accept` header asks for the protobuf form.
pub fn wants_protobuf(accept: &str) -> bool {
    accept
        .split(',')
        .any(|a| a.trim().starts_with(PROTOBUF_ACCEPT) && a.contains("protobuf"))
}

/// The subset of gnostic's `openapi_v2` messages (OpenAPIv2.proto) the
/// document uses, with their field numbers.
mod gnostic {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Document {
        #[prost(string, tag = "1")]
        pub swagger: String,
        #[prost(message, optional, tag = "2")]
        pub info: Option<Info>,
        #[prost(message, optional, tag = "8")]
        pub paths: Option<Paths>,
        #[prost(message, optional, tag = "9")]
        pub definitions: Option<Definitions>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Info {
        #[prost(string, tag = "1")]
        pub title: String,
        #[prost(string, tag = "2")]
        pub version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Definitions {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Paths {
        #[prost(message, repeated, tag = "2")]
        pub path: Vec<NamedPathItem>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NamedPathItem {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<PathItem>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PathItem {
        #[prost(message, optional, tag = "2")]
        pub get: Option<Operation>,
        #[prost(message, optional, tag = "3")]
        pub put: Option<Operation>,
        #[prost(message, optional, tag = "4")]
        pub post: Option<Operation>,
        #[prost(message, optional, tag = "5")]
        pub delete: Option<Operation>,
        #[prost(message, optional, tag = "8")]
        pub patch: Option<Operation>,
        #[prost(message, repeated, tag = "9")]
        pub parameters: Vec<ParametersItem>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Operation {
        #[prost(string, repeated, tag = "1")]
        pub tags: Vec<String>,
        #[prost(string, tag = "3")]
        pub description: String,
        #[prost(string, tag = "5")]
        pub operation_id: String,
        #[prost(string, repeated, tag = "6")]
        pub produces: Vec<String>,
        #[prost(string, repeated, tag = "7")]
        pub consumes: Vec<String>,
        #[prost(message, repeated, tag = "8")]
        pub parameters: Vec<ParametersItem>,
        #[prost(message, optional, tag = "9")]
        pub responses: Option<Responses>,
        #[prost(string, repeated, tag = "10")]
        pub schemes: Vec<String>,
        #[prost(message, repeated, tag = "13")]
        pub vendor_extension: Vec<NamedAny>,
    }

    /// `oneof { Parameter parameter = 1; JsonReference json_reference = 2; }`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ParametersItem {
        #[prost(message, optional, tag = "1")]
        pub parameter: Option<Parameter>,
    }

    /// `oneof { BodyParameter body_parameter = 1; NonBodyParameter non_body_parameter = 2; }`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Parameter {
        #[prost(message, optional, tag = "2")]
        pub non_body_parameter: Option<NonBodyParameter>,
    }

    /// `oneof { ... QueryParameterSubSchema query_parameter_sub_schema = 3;
    /// PathParameterSubSchema path_parameter_sub_schema = 4; }`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NonBodyParameter {
        #[prost(message, optional, tag = "3")]
        pub query_parameter_sub_schema: Option<QueryParameterSubSchema>,
        #[prost(message, optional, tag = "4")]
        pub path_parameter_sub_schema: Option<PathParameterSubSchema>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueryParameterSubSchema {
        #[prost(bool, tag = "1")]
        pub required: bool,
        #[prost(string, tag = "2")]
        pub r#in: String,
        #[prost(string, tag = "3")]
        pub description: String,
        #[prost(string, tag = "4")]
        pub name: String,
        #[prost(string, tag = "6")]
        pub r#type: String,
        #[prost(bool, tag = "20")]
        pub unique_items: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PathParameterSubSchema {
        #[prost(bool, tag = "1")]
        pub required: bool,
        #[prost(string, tag = "2")]
        pub r#in: String,
        #[prost(string, tag = "3")]
        pub description: String,
        #[prost(string, tag = "4")]
        pub name: String,
        #[prost(string, tag = "5")]
        pub r#type: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Responses {
        #[prost(message, repeated, tag = "1")]
        pub response_code: Vec<NamedResponseValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NamedResponseValue {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<ResponseValue>,
    }

    /// `oneof { Response response = 1; JsonReference json_reference = 2; }`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseValue {
        #[prost(message, optional, tag = "1")]
        pub response: Option<Response>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Response {
        #[prost(string, tag = "1")]
        pub description: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NamedAny {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<Any>,
    }

    /// gnostic's `Any`: `google.protobuf.Any value = 1; string yaml = 2;`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "2")]
        pub yaml: String,
    }
}

/// One operation, before rendering.
#[derive(Debug, Clone)]
struct Op {
    method: &'static str,
    id: String,
    action: &'static str,
    write: bool,
    group: String,
    version: String,
    kind: String,
}

/// One path, before rendering.
#[derive(Debug, Clone)]
struct PathSpec {
    path: String,
    params: Vec<&'static str>,
    ops: Vec<Op>,
}

const QUERY_PARAMS: &[(&str, &str, bool)] = &[
    (
        "pretty",
        "If 'true', then the output is pretty printed.",
        false,
    ),
    (
        "dryRun",
        "When present, indicates that modifications should not be persisted.",
        true,
    ),
    (
        "fieldManager",
        "fieldManager is a name associated with the actor or entity that is making these changes.",
        true,
    ),
    (
        "fieldValidation",
        "fieldValidation instructs the server on how to handle objects in the request containing unknown or duplicate fields. Valid values are: Ignore, Warn, Strict.",
        true,
    ),
];

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    }
}

fn paths(registry: &Registry) -> Vec<PathSpec> {
    let mut out = Vec::new();
    for r in registry.all() {
        let base = gv_path(&r.group, &r.version);
        let id = format!("{}{}", r.plural, r.version);
        let op = |method: &'static str,
                  action: &'static str,
                  id: String,
                  write: bool,
                  r: &ResourceInfo| Op {
            method,
            id,
            action,
            write,
            group: r.group.clone(),
            version: r.version.clone(),
            kind: r.kind.clone(),
        };
        if r.is_virtual() {
            out.push(PathSpec {
                path: format!("{base}/{}", r.plural),
                params: vec![],
                ops: vec![op("post", "post", format!("create{id}"), true, &r)],
            });
            continue;
        }
        let (collection, ns_param) = if r.namespaced {
            (
                format!("{base}/namespaces/{{namespace}}/{}", r.plural),
                vec!["namespace"],
            )
        } else {
            (format!("{base}/{}", r.plural), vec![])
        };
        out.push(PathSpec {
            path: collection.clone(),
            params: ns_param.clone(),
            ops: vec![
                op("get", "list", format!("list{id}"), false, &r),
                op("post", "post", format!("create{id}"), true, &r),
                op(
                    "delete",
                    "deletecollection",
                    format!("deletecollection{id}"),
                    true,
                    &r,
                ),
            ],
        });
        let item = format!("{collection}/{{name}}");
        let mut item_params = ns_param.clone();
        item_params.push("name");
        out.push(PathSpec {
            path: item.clone(),
            params: item_params.clone(),
            ops: vec![
                op("get", "get", format!("read{id}"), false, &r),
                op("put", "put", format!("replace{id}"), true, &r),
                op("patch", "patch", format!("patch{id}"), true, &r),
                op("delete", "delete", format!("delete{id}"), true, &r),
            ],
        });
        for sub in &r.subresources {
            if matches!(sub.as_str(), "status" | "scale") {
                out.push(PathSpec {
                    path: format!("{item}/{sub}"),
                    params: item_params.clone(),
                    ops: vec![
                        op("get", "get", format!("read{id}{sub}"), false, &r),
                        op("put", "put", format!("replace{id}{sub}"), true, &r),
                        op("patch", "patch", format!("patch{id}{sub}"), true, &r),
                    ],
                });
            }
        }
        if r.namespaced {
            out.push(PathSpec {
                path: format!("{base}/{}", r.plural),
                params: vec![],
                ops: vec![op(
                    "get",
                    "list",
                    format!("list{id}AllNamespaces"),
                    false,
                    &r,
                )],
            });
        }
    }
    out
}

fn gvk_yaml(op: &Op) -> String {
    format!(
        "group: {:?}\nkind: {}\nversion: {}\n",
        op.group, op.kind, op.version
    )
}

/// The JSON form.
pub fn document_json(registry: &Registry) -> Value {
    let mut out = Map::new();
    for p in paths(registry) {
        let mut item = Map::new();
        for op in &p.ops {
            let params: Vec<Value> = QUERY_PARAMS
                .iter()
                .filter(|(_, _, write)| !write || op.write)
                .map(|(name, desc, _)| json!({"name": name, "in": "query", "description": desc, "type": "string", "uniqueItems": true}))
                .collect();
            item.insert(
                op.method.into(),
                json!({
                    "operationId": op.id,
                    "consumes": ["*/*"],
                    "produces": ["application/json", "application/yaml"],
                    "schemes": ["https"],
                    "parameters": params,
                    "responses": {"200": {"description": "OK"}, "401": {"description": "Unauthorized"}},
                    "x-kubernetes-action": op.action,
                    "x-kubernetes-group-version-kind": {"group": op.group, "version": op.version, "kind": op.kind},
                }),
            );
        }
        let params: Vec<Value> = p
            .params
            .iter()
            .map(|n| json!({"name": n, "in": "path", "required": true, "type": "string", "uniqueItems": true}))
            .collect();
        if !params.is_empty() {
            item.insert("parameters".into(), Value::Array(params));
        }
        out.insert(p.path, Value::Object(item));
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "v1.31.0"},
        "paths": out,
        "definitions": {},
    })
}

fn query_param(name: &str, description: &str) -> gnostic::ParametersItem {
    gnostic::ParametersItem {
        parameter: Some(gnostic::Parameter {
            non_body_parameter: Some(gnostic::NonBodyParameter {
                query_parameter_sub_schema: Some(gnostic::QueryParameterSubSchema {
                    required: false,
                    r#in: "query".into(),
                    description: description.into(),
                    name: name.into(),
                    r#type: "string".into(),
                    unique_items: true,
                }),
                path_parameter_sub_schema: None,
            }),
        }),
    }
}

fn path_param(name: &str) -> gnostic::ParametersItem {
    gnostic::ParametersItem {
        parameter: Some(gnostic::Parameter {
            non_body_parameter: Some(gnostic::NonBodyParameter {
                query_parameter_sub_schema: None,
                path_parameter_sub_schema: Some(gnostic::PathParameterSubSchema {
                    required: true,
                    r#in: "path".into(),
                    description: format!("name of the {name}"),
                    name: name.into(),
                    r#type: "string".into(),
                }),
            }),
        }),
    }
}

fn response(code: &str, description: &str) -> gnostic::NamedResponseValue {
    gnostic::NamedResponseValue {
        name: code.into(),
        value: Some(gnostic::ResponseValue {
            response: Some(gnostic::Response {
                description: description.into(),
            }),
        }),
    }
}

fn extension(name: &str, yaml: String) -> gnostic::NamedAny {
    gnostic::NamedAny {
        name: name.into(),
        value: Some(gnostic::Any { yaml }),
    }
}

/// The gnostic protobuf form.
pub fn document_protobuf(registry: &Registry) -> Vec<u8> {
    let mut items = Vec::new();
    for p in paths(registry) {
        let mut item = gnostic::PathItem {
            parameters: p.params.iter().map(|n| path_param(n)).collect(),
            ..Default::default()
        };
        for op in &p.ops {
            let operation = gnostic::Operation {
                operation_id: op.id.clone(),
                consumes: vec!["*/*".into()],
                produces: vec!["application/json".into(), "application/yaml".into()],
                schemes: vec!["https".into()],
                parameters: QUERY_PARAMS
                    .iter()
                    .filter(|(_, _, write)| !write || op.write)
                    .map(|(name, desc, _)| query_param(name, desc))
                    .collect(),
                responses: Some(gnostic::Responses {
                    response_code: vec![response("200", "OK"), response("401", "Unauthorized")],
                }),
                vendor_extension: vec![
                    extension("x-kubernetes-action", format!("{}\n", op.action)),
                    extension("x-kubernetes-group-version-kind", gvk_yaml(op)),
                ],
                ..Default::default()
            };
            let slot = match op.method {
                "get" => &mut item.get,
                "put" => &mut item.put,
                "post" => &mut item.post,
                "delete" => &mut item.delete,
                _ => &mut item.patch,
            };
            *slot = Some(operation);
        }
        items.push(gnostic::NamedPathItem {
            name: p.path,
            value: Some(item),
        });
    }
    gnostic::Document {
        swagger: "2.0".into(),
        info: Some(gnostic::Info {
            title: "Kubernetes".into(),
            version: "v1.31.0".into(),
        }),
        paths: Some(gnostic::Paths { path: items }),
        definitions: Some(gnostic::Definitions {}),
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protobuf_document_has_patch_operations_with_field_validation() {
        let reg = Registry::builtin();
        let bytes = document_protobuf(&reg);
        let doc = gnostic::Document::decode(bytes.as_slice()).unwrap();
        assert_eq!(doc.swagger, "2.0");
        let paths = doc.paths.unwrap().path;
        let deploy = paths
            .iter()
            .find(|p| p.name == "/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
            .unwrap();
        let patch = deploy.value.as_ref().unwrap().patch.as_ref().unwrap();
        let gvk = patch
            .vendor_extension
            .iter()
            .find(|e| e.name == "x-kubernetes-group-version-kind")
            .unwrap();
        let v: std::collections::BTreeMap<String, String> =
            serde_yaml::from_str(&gvk.value.as_ref().unwrap().yaml).unwrap();
        assert_eq!(v["group"], "apps");
        assert_eq!(v["kind"], "Deployment");
        assert_eq!(v["version"], "v1");
        assert!(patch.parameters.iter().any(|p| {
            p.parameter
                .as_ref()
                .and_then(|p| p.non_body_parameter.as_ref())
                .and_then(|n| n.query_parameter_sub_schema.as_ref())
                .is_some_and(|q| q.name == "fieldValidation")
        }));
        // The core group's kinds have an empty group.
        let cm = paths
            .iter()
            .find(|p| p.name == "/api/v1/namespaces/{namespace}/configmaps/{name}")
            .unwrap();
        let ext = &cm
            .value
            .as_ref()
            .unwrap()
            .patch
            .as_ref()
            .unwrap()
            .vendor_extension[1];
        let v: std::collections::BTreeMap<String, String> =
            serde_yaml::from_str(&ext.value.as_ref().unwrap().yaml).unwrap();
        assert_eq!(v["group"], "");
        assert_eq!(v["kind"], "ConfigMap");
    }

    #[test]
    fn json_document_and_accept_negotiation() {
        let doc = document_json(&Registry::builtin());
        let patch =
            &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "Deployment"
        );
        assert!(wants_protobuf(
            "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"
        ));
        assert!(wants_protobuf(
            "application/json;q=0.5, application/com.github.proto-openapi.spec.v2@v1.0+protobuf"
        ));
        assert!(!wants_protobuf("application/json"));
    }
}
