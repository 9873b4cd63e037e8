//! Objects as the API stores and serves them: JSON values whose
//! `metadata.resourceVersion` comes from the store's revision (it is never
//! stored inside the value).

use crate::status::ApiError;
use bytes::Bytes;
use serde::de::DeserializeSeed;
use serde_json::{Value, json};
use skep_store::KeyValue;

/// Decodes a stored value and stamps its resourceVersion.
pub fn from_kv(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(format!("stored object {} is not JSON: {e}", kv.key)))?;
    set_resource_version(&mut v, kv.mod_revision);
    Ok(v)
}

/// Like [`from_kv`], without `metadata.managedFields`, which is skipped
/// while parsing rather than built and dropped: caches that never read it
/// (the controllers' informers) decode every watch event, and on a typical
/// object it is the largest part.
pub fn from_kv_without_managed_fields(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(&kv.value);
    let mut v = lean::Top
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| ApiError::internal(format!("stored object {} is not JSON: {e}", kv.key)))?;
    set_resource_version(&mut v, kv.mod_revision);
    Ok(v)
}

/// serde seeds for [`from_kv_without_managed_fields`]: the top-level
/// object, whose `metadata` is read by [`lean::Meta`].
mod lean {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    use serde_json::{Map, Value};
    use std::fmt;

    pub struct Top;
    struct Meta;

    impl<'de> DeserializeSeed<'de> for Top {
        type Value = Value;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Top {
        type Value = Value;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Value, A::Error> {
            let mut out = Map::new();
            while let Some(k) = m.next_key::<String>()? {
                let v = if k == "metadata" {
                    m.next_value_seed(Meta)?
                } else {
                    m.next_value::<Value>()?
                };
                out.insert(k, v);
            }
            Ok(Value::Object(out))
        }
    }

    impl<'de> DeserializeSeed<'de> for Meta {
        type Value = Value;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Meta {
        type Value = Value;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("object metadata")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Value, A::Error> {
            let mut out = Map::new();
            while let Some(k) = m.next_key::<String>()? {
                if k == "managedFields" {
                    m.next_value::<IgnoredAny>()?;
                } else {
                    out.insert(k, m.next_value()?);
                }
            }
            Ok(Value::Object(out))
        }
        // Any other shape is kept as it is (the API never stores one).
        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_str<E>(self, s: &str) -> Result<Value, E> {
            Ok(Value::String(s.to_owned()))
        }
    }
}

pub fn set_resource_version(v: &mut Value, rev: i64) {
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), json!(rev.to_string()));
    }
}

/// The bytes stored for an object (without resourceVersion), with
/// `metadata` first so that [`raw_with_rv`] can add the resourceVersion
/// without parsing.
pub fn to_stored(v: &Value) -> Result<Bytes, ApiError> {
    let err = |e: serde_json::Error| ApiError::internal(format!("encoding object: {e}"));
    let Some(obj) = v.as_object() else {
        return serde_json::to_vec(v).map(Bytes::from).map_err(err);
    };
    let mut meta = obj.get("metadata").cloned().unwrap_or_else(|| json!({}));
    if let Some(m) = meta.as_object_mut() {
        m.remove("resourceVersion");
        m.remove("selfLink");
    }
    let mut out = b"{\"metadata\":".to_vec();
    serde_json::to_writer(&mut out, &meta).map_err(err)?;
    for (k, val) in obj {
        if k == "metadata" {
            continue;
        }
        out.push(b',');
        serde_json::to_writer(&mut out, k).map_err(err)?;
        out.push(b':');
        serde_json::to_writer(&mut out, val).map_err(err)?;
    }
    out.push(b'}');
    Ok(Bytes::from(out))
}

/// The stored bytes with `"resourceVersion":"<rev>"` added to metadata,
/// for values written by [`to_stored`]; `None` for any other layout.
pub fn raw_with_rv(raw: &[u8], rev: i64) -> Option<Bytes> {
    const HEAD: &[u8] = b"{\"metadata\":{";
    let rest = raw.strip_prefix(HEAD)?;
    let rv = format!("\"resourceVersion\":\"{rev}\"");
    let mut out = Vec::with_capacity(raw.len() + rv.len() + 1);
    out.extend_from_slice(HEAD);
    out.extend_from_slice(rv.as_bytes());
    if rest.first() != Some(&b'}') {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(Bytes::from(out))
}

pub fn meta_str<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get("metadata")?.get(field)?.as_str()
}

pub fn name(v: &Value) -> &str {
    meta_str(v, "name").unwrap_or("")
}

pub fn namespace(v: &Value) -> Option<&str> {
    meta_str(v, "namespace")
}

pub fn resource_version(v: &Value) -> Option<i64> {
    meta_str(v, "resourceVersion").and_then(|s| s.parse().ok())
}

/// `metadata` as a mutable map, created if missing.
pub fn metadata_mut(v: &mut Value) -> Result<&mut serde_json::Map<String, Value>, ApiError> {
    let obj = v
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))?;
    let meta = obj.entry("metadata").or_insert_with(|| json!({}));
    if meta.is_null() {
        *meta = json!({});
    }
    meta.as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))
}

pub fn finalizers(v: &Value) -> Vec<String> {
    v.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Everything but metadata and status: a change here bumps `generation`.
pub fn spec_part(v: &Value) -> Value {
    match v.as_object() {
        Some(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "metadata" | "status" | "apiVersion" | "kind")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        None => Value::Null,
    }
}

/// A `PartialObjectMetadata` view of an object (Table rows).
pub fn partial_metadata(v: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": v.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lean_decoding_drops_only_managed_fields() {
        let full = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"managedFields": "kept"},
                         "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]},
            "spec": {"managedFields": [1]}});
        let kv = KeyValue {
            key: "/registry/pods/d/p".into(),
            value: to_stored(&full).unwrap(),
            create_revision: 3,
            mod_revision: 7,
        };
        let mut want = from_kv(&kv).unwrap();
        want["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("managedFields");
        assert_eq!(from_kv_without_managed_fields(&kv).unwrap(), want);
        assert_eq!(want["metadata"]["resourceVersion"], "7");
        let bad = KeyValue {
            value: Bytes::from_static(b"{\"metadata\": {} } x"),
            ..kv
        };
        assert!(from_kv_without_managed_fields(&bad).is_err());
    }

    #[test]
    fn stored_layout_lets_the_revision_be_spliced_in() {
        for obj in [
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "resourceVersion": "9"}, "data": {"x": "{\"metadata\":{"}}),
            json!({"kind": "X", "metadata": {}}),
        ] {
            let stored = to_stored(&obj).unwrap();
            let spliced = raw_with_rv(&stored, 42).unwrap();
            let parsed: Value = serde_json::from_slice(&spliced).unwrap();
            let mut want = obj.clone();
            want["metadata"]["resourceVersion"] = json!("42");
            assert_eq!(parsed, want);
        }
        assert!(raw_with_rv(b"{\"kind\":\"X\"}", 1).is_none());
    }
}
