//! Server-side field validation for built-in kinds
//! (`fieldValidation=Strict`, which kubectl sends by default): fields the
//! kind does not have are reported, as kube-apiserver's strict decoding
//! does, using the schema table the protobuf decoder is generated from.
//!
//! Under `fieldValidation=Warn` (kube-apiserver's default when the
//! parameter is absent) unknown fields are dropped and each is reported in
//! a `Warning` response header; duplicate JSON fields likewise (the last
//! one wins). `Ignore` drops them silently. Warnings are gathered per
//! request in a task-local list ([`collect_warnings`], [`warn`]).

use crate::protobuf::schema::{self, Label, Special, Ty};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::{cell::RefCell, fmt, future::Future};

/// What a request asked for in `fieldValidation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ignore,
    Warn,
    Strict,
}

impl Mode {
    /// The request's mode; absent (or unrecognised) is Warn, as in
    /// kube-apiserver.
    pub fn of(query: &crate::api::Query) -> Self {
        match query.get("fieldValidation").map(String::as_str) {
            Some("Strict") => Self::Strict,
            Some("Ignore") => Self::Ignore,
            _ => Self::Warn,
        }
    }
}

/// At most this many warnings per response (kube-apiserver also bounds
/// them); the rest are summarised in one.
const MAX_WARNINGS: usize = 50;

tokio::task_local! {
    static WARNINGS: RefCell<Vec<String>>;
}

/// Runs `f` with a fresh warning list and returns the warnings it raised.
pub async fn collect_warnings<F: Future>(f: F) -> (F::Output, Vec<String>) {
    WARNINGS
        .scope(RefCell::new(Vec::new()), async move {
            let out = f.await;
            let warnings = WARNINGS.with(|w| w.take());
            (out, warnings)
        })
        .await
}

/// Adds a warning to the current request's response (ignored outside a
/// request, e.g. for the server's own bootstrap writes).
pub fn warn(message: String) {
    let _ = WARNINGS.try_with(|w| w.borrow_mut().push(message));
}

/// `Warning: 299 - "<text>"` headers (RFC 7234 warn-code 299, agent `-`),
/// the form kube-apiserver sends and kubectl prints as `Warning: <text>`.
pub fn add_warning_headers(headers: &mut http::HeaderMap, warnings: &[String]) {
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<&String> = warnings.iter().filter(|w| seen.insert(*w)).collect();
    for (i, w) in unique.iter().enumerate() {
        let text = if i == MAX_WARNINGS {
            format!("{} more warnings were dropped", unique.len() - MAX_WARNINGS)
        } else {
            (*w).clone()
        };
        let escaped: String = text
            .chars()
            .filter(|c| !c.is_control())
            .flat_map(|c| match c {
                '"' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        if let Ok(v) = http::HeaderValue::from_str(&format!("299 - \"{escaped}\"")) {
            headers.append(http::header::WARNING, v);
        }
        if i == MAX_WARNINGS {
            break;
        }
    }
}

/// Applies the request's mode to the unknown fields of a built-in object:
/// Strict fails naming them, Warn drops them with a warning each, Ignore
/// drops them. `Ok(false)` when the kind has no built-in schema.
pub fn check_built_in(
    api_version: &str,
    kind: &str,
    obj: &mut Value,
    mode: Mode,
) -> Result<bool, Vec<String>> {
    let Some(index) = schema::for_kind(api_version, kind) else {
        return Ok(false);
    };
    let mut unknown = Vec::new();
    walk(
        index,
        obj,
        &mut String::new(),
        true,
        &mut unknown,
        0,
        mode != Mode::Strict,
    );
    match mode {
        Mode::Strict if !unknown.is_empty() => Err(unknown),
        Mode::Warn => {
            for f in unknown {
                warn(format!("unknown field \"{f}\""));
            }
            Ok(true)
        }
        _ => Ok(true),
    }
}

/// The paths of fields in `obj` unknown to its kind; `None` when the kind
/// has no built-in schema (custom resources have their own).
pub fn unknown_fields(api_version: &str, kind: &str, obj: &Value) -> Option<Vec<String>> {
    let index = schema::for_kind(api_version, kind)?;
    let mut out = Vec::new();
    let mut copy = obj.clone();
    walk(
        index,
        &mut copy,
        &mut String::new(),
        true,
        &mut out,
        0,
        false,
    );
    Some(out)
}

/// The paths of object keys that occur more than once in a JSON document
/// (`spec.replicas`, `spec.containers[0].name`), in document order; empty
/// when the document is not valid JSON (its parse error is reported
/// elsewhere).
pub fn duplicate_fields(body: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut path = String::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let seed = Dups {
        path: &mut path,
        out: &mut out,
        depth: 0,
    };
    if seed.deserialize(&mut de).is_err() {
        return Vec::new();
    }
    out
}

/// Walks any JSON value, recording repeated keys of its objects. Every
/// request body passes through here, so the path of the value being read
/// is one buffer that grows and shrinks as the walk descends and returns
/// (it is copied only for a repeated key).
struct Dups<'a> {
    path: &'a mut String,
    out: &'a mut Vec<String>,
    depth: usize,
}

/// The keys seen so far in one object: a short list while the object is
/// small (most are), a hash set once it is not, so that a body with a
/// huge object stays linear.
enum SeenKeys {
    Few(Vec<String>),
    Many(std::collections::HashSet<String>),
}

impl SeenKeys {
    const FEW: usize = 16;

    /// Records `key`; false when it was seen before.
    fn insert(&mut self, key: String) -> bool {
        match self {
            SeenKeys::Few(keys) => {
                if keys.contains(&key) {
                    return false;
                }
                keys.push(key);
                if keys.len() > Self::FEW {
                    *self = SeenKeys::Many(std::mem::take(keys).into_iter().collect());
                }
                true
            }
            SeenKeys::Many(keys) => keys.insert(key),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Dups<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Dups<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth > 128 {
            return Err(de::Error::custom("nested too deeply"));
        }
        let base = self.path.len();
        let mut i = 0usize;
        loop {
            self.path.truncate(base);
            push_index(self.path, i);
            let seed = Dups {
                path: &mut *self.path,
                out: &mut *self.out,
                depth: self.depth + 1,
            };
            if seq.next_element_seed(seed)?.is_none() {
                self.path.truncate(base);
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.depth > 128 {
            return Err(de::Error::custom("nested too deeply"));
        }
        let base = self.path.len();
        let mut keys = SeenKeys::Few(Vec::new());
        while let Some(key) = map.next_key::<String>()? {
            self.path.truncate(base);
            push_field(self.path, &key);
            if !keys.insert(key) {
                self.out.push(self.path.clone());
            }
            map.next_value_seed(Dups {
                path: &mut *self.path,
                out: &mut *self.out,
                depth: self.depth + 1,
            })?;
        }
        self.path.truncate(base);
        Ok(())
    }
}

/// Appends `.name` to a field path (just `name` at the top).
fn push_field(path: &mut String, name: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(name);
}

/// Appends `[i]` to a field path.
fn push_index(path: &mut String, i: usize) {
    use std::fmt::Write as _;
    // Writing to a String cannot fail.
    let _ = write!(path, "[{i}]");
}

/// Appends `[key]` to a field path.
fn push_key(path: &mut String, key: &str) {
    path.push('[');
    path.push_str(key);
    path.push(']');
}

/// Looks `name` up among a message's fields, including those of structs it
/// embeds inline (empty JSON name in the table).
fn find(index: u16, name: &str, depth: usize) -> Option<&'static schema::Field> {
    let msg = schema::message(index)?;
    for f in msg.fields {
        if f.json == name {
            return Some(f);
        }
        if f.json.is_empty()
            && depth < 8
            && let Ty::Message(i) = f.ty
            && let Some(found) = find(i, name, depth + 1)
        {
            return Some(found);
        }
    }
    None
}

fn plain_message(ty: Ty) -> Option<u16> {
    match ty {
        Ty::Message(i) if schema::message(i).is_some_and(|m| m.special == Special::None) => Some(i),
        _ => None,
    }
}

/// Records the unknown fields under `v` (and removes them with `prune`).
/// `path` is the path of `v`; it is extended while the walk is below a
/// field and restored before returning (copied only for an unknown field).
fn walk(
    index: u16,
    v: &mut Value,
    path: &mut String,
    top: bool,
    out: &mut Vec<String>,
    depth: usize,
    prune: bool,
) {
    let Some(map) = v.as_object_mut() else { return };
    if depth > 64 {
        return;
    }
    let base = path.len();
    let mut drop = Vec::new();
    for (k, child) in map.iter_mut() {
        if top && (k == "apiVersion" || k == "kind") {
            continue;
        }
        path.truncate(base);
        push_field(path, k);
        let Some(field) = find(index, k, 0) else {
            out.push(path.clone());
            drop.push(k.clone());
            continue;
        };
        match field.label {
            Label::Single => {
                if let Some(i) = plain_message(field.ty) {
                    walk(i, child, path, false, out, depth + 1, prune);
                }
            }
            Label::Repeated => {
                if let (Some(i), Some(items)) = (plain_message(field.ty), child.as_array_mut()) {
                    let here = path.len();
                    for (n, item) in items.iter_mut().enumerate() {
                        path.truncate(here);
                        push_index(path, n);
                        walk(i, item, path, false, out, depth + 1, prune);
                    }
                }
            }
            Label::Map(value_ty) => {
                if let (Some(i), Some(entries)) = (plain_message(value_ty), child.as_object_mut()) {
                    let here = path.len();
                    for (key, item) in entries.iter_mut() {
                        path.truncate(here);
                        push_key(path, key);
                        walk(i, item, path, false, out, depth + 1, prune);
                    }
                }
            }
        }
    }
    path.truncate(base);
    if prune {
        for k in drop {
            map.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_are_found_at_any_depth() {
        if !schema::available() {
            panic!(
                "the protobuf schema table was not generated (build.rs could not read k8s-pb/k8s-openapi)"
            );
        }
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "x", "labels": {"a": "b"}, "bogusMeta": 1},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"a": "b"}},
                     "template": {"spec": {"containers": [{"name": "c", "image": "i", "imagePullPolicy": "Always",
                        "livenessProbe": {"httpGet": {"port": 80}, "periodSeconds": 3},
                        "resources": {"limits": {"cpu": "1"}}, "typo": true}],
                        "volumes": [{"name": "v", "emptyDir": {}}]}},
                     "strategy": {"type": "Recreate"}, "extra": 1}});
        let mut unknown = unknown_fields("apps/v1", "Deployment", &d).unwrap();
        unknown.sort();
        assert_eq!(
            unknown,
            [
                "metadata.bogusMeta",
                "spec.extra",
                "spec.template.spec.containers[0].typo"
            ]
        );
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"k": "v"}});
        assert_eq!(
            unknown_fields("v1", "ConfigMap", &cm).unwrap(),
            Vec::<String>::new()
        );
        assert!(unknown_fields("example.com/v1", "Widget", &cm).is_none());
    }

    #[test]
    fn duplicates_in_large_objects_and_after_arrays_keep_their_paths() {
        // 40 distinct keys, then a repeat of the third: past the short
        // list, in the hash set.
        let mut labels: Vec<String> = (0..40).map(|i| format!("\"k{i}\":\"v\"")).collect();
        labels.push("\"k2\":\"again\"".into());
        let body = format!(
            r#"{{"metadata":{{"labels":{{{}}}}},"spec":{{"containers":[{{"name":"a"}},{{"name":"b","ports":[{{"containerPort":1,"containerPort":2}}]}}],"x":1,"x":2}}}}"#,
            labels.join(",")
        );
        assert_eq!(
            duplicate_fields(body.as_bytes()),
            [
                "metadata.labels.k2",
                "spec.containers[1].ports[0].containerPort",
                "spec.x"
            ]
        );
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "a", "image": "i"}, {"name": "b", "image": "i", "bogus": 1}],
                     "nodeSelector": {"a": "b"}, "typo": 2}});
        assert_eq!(
            unknown_fields("v1", "Pod", &pod).unwrap(),
            ["spec.containers[1].bogus", "spec.typo"]
        );
    }

    #[test]
    fn duplicate_fields_are_found_with_their_paths() {
        let body = br#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"a","name":"b"},
            "spec":{"replicas":1,"template":{"spec":{"containers":[{"name":"c","image":"i","image":"j"}]}},"replicas":2}}"#;
        assert_eq!(
            duplicate_fields(body),
            [
                "metadata.name",
                "spec.template.spec.containers[0].image",
                "spec.replicas"
            ]
        );
        assert!(duplicate_fields(br#"{"a":{"b":1},"c":{"b":2}}"#).is_empty());
        assert!(duplicate_fields(b"not json").is_empty());
        // Bounded recursion on hostile nesting.
        let deep = "[".repeat(10_000);
        assert!(duplicate_fields(deep.as_bytes()).is_empty());
    }

    #[tokio::test]
    async fn warn_prunes_and_reports_strict_fails_ignore_prunes_silently() {
        assert!(
            schema::available(),
            "the protobuf schema table was not generated"
        );
        let obj = json!({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "x", "bogus": 1}, "data": {"k": "v"}, "extra": true});
        let (res, warnings) = collect_warnings(async {
            let mut o = obj.clone();
            let r = check_built_in("v1", "ConfigMap", &mut o, Mode::Warn);
            (r, o)
        })
        .await;
        let (r, pruned) = res;
        assert_eq!(r, Ok(true));
        assert_eq!(
            pruned,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"k": "v"}})
        );
        assert_eq!(
            warnings,
            [
                "unknown field \"extra\"",
                "unknown field \"metadata.bogus\""
            ]
        );

        let mut o = obj.clone();
        let err = check_built_in("v1", "ConfigMap", &mut o, Mode::Strict).unwrap_err();
        assert_eq!(err, ["extra", "metadata.bogus"]);
        assert_eq!(o, obj, "strict leaves the object alone");

        let (_, warnings) = collect_warnings(async {
            let mut o = obj.clone();
            check_built_in("v1", "ConfigMap", &mut o, Mode::Ignore).unwrap();
            assert!(o.get("extra").is_none());
        })
        .await;
        assert!(warnings.is_empty());
        assert_eq!(
            check_built_in("example.com/v1", "Widget", &mut obj.clone(), Mode::Warn),
            Ok(false)
        );
        // Outside a request, warnings go nowhere (no panic).
        warn("dropped".into());
    }

    #[test]
    fn warning_headers_use_the_kubernetes_form() {
        let mut h = http::HeaderMap::new();
        add_warning_headers(
            &mut h,
            &[
                "unknown field \"spec.replica\"".into(),
                "unknown field \"spec.replica\"".into(),
                "duplicate field \"a\\b\"".into(),
            ],
        );
        let got: Vec<&str> = h
            .get_all(http::header::WARNING)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            got,
            [
                r#"299 - "unknown field \"spec.replica\"""#,
                r#"299 - "duplicate field \"a\\b\"""#
            ]
        );
        let many: Vec<String> = (0..60).map(|i| format!("w{i}")).collect();
        let mut h = http::HeaderMap::new();
        add_warning_headers(&mut h, &many);
        let all: Vec<_> = h.get_all(http::header::WARNING).iter().collect();
        assert_eq!(all.len(), MAX_WARNINGS + 1);
        assert_eq!(
            all[MAX_WARNINGS].to_str().unwrap(),
            r#"299 - "10 more warnings were dropped""#
        );
    }
}
