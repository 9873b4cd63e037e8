//! OpenAPI v3 schemas (`components.schemas`) for the built-in kinds,
//! generated from the protobuf schema table (types, JSON names, required
//! fields and the API documentation), for `kubectl explain`.
//!
//! Each schema is named as kube-apiserver names it
//! (`io.k8s.api.apps.v1.Deployment`); the kinds carry
//! `x-kubernetes-group-version-kind`, references use `allOf: [{$ref}]`.

use crate::{
    protobuf::schema::{self, Label, Special, Ty},
    resources::Registry,
};
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;

/// The OpenAPI name of a schema message (`api.apps.v1.Deployment` →
/// `io.k8s.api.apps.v1.Deployment`).
pub fn schema_name(message: &str) -> String {
    let (first, rest) = message.split_once('.').unwrap_or((message, ""));
    format!("io.k8s.{}.{rest}", first.replace('_', "-"))
}

fn reference(index: u16, refs: &mut Vec<u16>) -> Value {
    refs.push(index);
    let name = schema::message(index)
        .map(|m| schema_name(m.name))
        .unwrap_or_default();
    json!({"allOf": [{"$ref": format!("#/components/schemas/{name}")}]})
}

fn type_schema(ty: Ty, refs: &mut Vec<u16>) -> Value {
    match ty {
        Ty::String => json!({"type": "string"}),
        Ty::Bytes => json!({"type": "string", "format": "byte"}),
        Ty::Bool => json!({"type": "boolean"}),
        Ty::Int32 | Ty::Uint32 => json!({"type": "integer", "format": "int32"}),
        Ty::Int64 | Ty::Uint64 => json!({"type": "integer", "format": "int64"}),
        Ty::Double | Ty::Float => json!({"type": "number", "format": "double"}),
        Ty::Message(i) => reference(i, refs),
    }
}

/// Adds a message's fields (and those of the structs it embeds inline) as
/// properties.
fn collect(
    index: u16,
    props: &mut Map<String, Value>,
    required: &mut Vec<String>,
    refs: &mut Vec<u16>,
    depth: usize,
) {
    let Some(msg) = schema::message(index) else {
        return;
    };
    for f in msg.fields {
        if f.json.is_empty() {
            if let Ty::Message(i) = f.ty
                && depth < 8
            {
                collect(i, props, required, refs, depth + 1);
            }
            continue;
        }
        let mut p = match f.label {
            Label::Single => type_schema(f.ty, refs),
            Label::Repeated => json!({"type": "array", "items": type_schema(f.ty, refs)}),
            Label::Map(v) => {
                json!({"type": "object", "additionalProperties": type_schema(v, refs)})
            }
        };
        if !f.doc.is_empty()
            && let Some(o) = p.as_object_mut()
        {
            o.insert("description".into(), json!(f.doc));
        }
        if f.required {
            required.push(f.json.to_owned());
        }
        props.insert(f.json.to_owned(), p);
    }
}

/// One message's schema and the messages it references.
fn message_schema(index: u16) -> (Value, Vec<u16>) {
    let mut refs = Vec::new();
    let Some(msg) = schema::message(index) else {
        return (json!({}), refs);
    };
    let mut s = match msg.special {
        Special::IntOrString => {
            json!({"type": "string", "format": "int-or-string", "x-kubernetes-int-or-string": true})
        }
        Special::Quantity | Special::Duration => json!({"type": "string"}),
        Special::Time | Special::MicroTime => json!({"type": "string", "format": "date-time"}),
        Special::RawJson if msg.name.starts_with("apiextensions_apiserver.") => json!({}),
        Special::RawJson => json!({"type": "object"}),
        Special::StringList => json!({"type": "array", "items": {"type": "string"}}),
        Special::PropsOrArray | Special::PropsOrBool | Special::PropsOrStringArray => json!({}),
        Special::None => {
            let mut props = Map::new();
            let mut required = Vec::new();
            collect(index, &mut props, &mut required, &mut refs, 0);
            let mut s = json!({"type": "object", "properties": props});
            if !required.is_empty() {
                s["required"] = json!(required);
            }
            s
        }
    };
    if !msg.doc.is_empty() {
        s["description"] = json!(msg.doc);
    }
    (s, refs)
}

/// `components.schemas` for the kinds of one group version and every type
/// they reference. Kinds without a built-in schema (custom resources) are
/// left out.
pub fn components(registry: &Registry, group: &str, version: &str) -> Map<String, Value> {
    let mut out = Map::new();
    let mut kinds: Vec<(u16, Value)> = Vec::new();
    for r in registry.in_group_version(group, version) {
        if let Some(i) = schema::for_kind(&r.api_version(), &r.kind) {
            kinds.push((
                i,
                json!({"group": r.group, "version": r.version, "kind": r.kind}),
            ));
        }
    }
    let mut seen = BTreeSet::new();
    let mut stack: Vec<u16> = kinds.iter().map(|(i, _)| *i).collect();
    while let Some(i) = stack.pop() {
        if !seen.insert(i) {
            continue;
        }
        let (s, refs) = message_schema(i);
        if let Some(m) = schema::message(i) {
            out.insert(schema_name(m.name), s);
        }
        stack.extend(refs.into_iter().filter(|r| !seen.contains(r)));
    }
    for (i, gvk) in kinds {
        let Some(m) = schema::message(i) else {
            continue;
        };
        if let Some(Value::Object(s)) = out.get_mut(&schema_name(m.name)) {
            let entry = s
                .entry("x-kubernetes-group-version-kind")
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(a) = entry {
                a.push(gvk);
            }
            if let Some(Value::Object(props)) = s.get_mut("properties") {
                for (field, doc) in [
                    (
                        "apiVersion",
                        "APIVersion defines the versioned schema of this representation of an object.",
                    ),
                    (
                        "kind",
                        "Kind is a string value representing the REST resource this object represents.",
                    ),
                ] {
                    props.insert(field.into(), json!({"type": "string", "description": doc}));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_schema_resolves_to_container_fields() {
        let reg = Registry::builtin();
        let schemas = components(&reg, "apps", "v1");
        let d = &schemas["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            d["x-kubernetes-group-version-kind"][0]["kind"],
            "Deployment"
        );
        assert!(d["description"].as_str().unwrap().contains("Deployment"));
        assert_eq!(
            d["properties"]["spec"]["allOf"][0]["$ref"],
            "#/components/schemas/io.k8s.api.apps.v1.DeploymentSpec"
        );
        let spec = &schemas["io.k8s.api.apps.v1.DeploymentSpec"];
        assert_eq!(spec["properties"]["replicas"]["type"], "integer");
        assert!(
            spec["required"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == "selector")
        );
        let container = &schemas["io.k8s.api.core.v1.Container"];
        assert_eq!(container["properties"]["ports"]["type"], "array");
        // Embedded structs are inlined: Probe has httpGet directly.
        let probe = &schemas["io.k8s.api.core.v1.Probe"];
        assert!(probe["properties"].get("httpGet").is_some());
        let ios = &schemas["io.k8s.apimachinery.pkg.util.intstr.IntOrString"];
        assert_eq!(ios["format"], "int-or-string");
        let core = components(&reg, "", "v1");
        assert_eq!(
            core["io.k8s.api.core.v1.Pod"]["x-kubernetes-group-version-kind"][0]["group"],
            ""
        );
    }
}
