//! Protobuf → JSON, driven by the generated schema.
//!
//! Go's protobuf encoder writes every non-pointer field, zero or not, while
//! its JSON encoder omits zero values of `omitempty` fields. To produce what
//! the JSON path produces, zero scalars are dropped, except for the fields
//! (pointers in the Go types) where zero is a meaningful value. Nested
//! messages are kept when present (Go writes non-pointer structs, and its
//! JSON encoder never omits them either: `resources: {}`).

use super::{
    MAGIC, ProtobufError,
    ctx::Ctx,
    schema::{self, Label, Special, Ty},
    wire::{self, Raw},
};
use base64::Engine;
use serde_json::{Map, Number, Value};

/// Fields whose zero value is meaningful (pointers in the Go types), kept
/// when present even though zero.
const KEEP_ZERO: &[&str] = &[
    "activeDeadlineSeconds",
    "allowPrivilegeEscalation",
    "allowVolumeExpansion",
    "automountServiceAccountToken",
    "backoffLimit",
    "backoffLimitPerIndex",
    "blockOwnerDeletion",
    "completions",
    "controller",
    "defaultMode",
    "deletionGracePeriodSeconds",
    "enableServiceLinks",
    "expirationSeconds",
    "failedJobsHistoryLimit",
    "fsGroup",
    "gracePeriodSeconds",
    "hostUsers",
    "immutable",
    "maxFailedIndexes",
    "minReplicas",
    "mode",
    "optional",
    "orphanDependents",
    "parallelism",
    "priority",
    "privileged",
    "progressDeadlineSeconds",
    "readOnlyRootFilesystem",
    "revisionHistoryLimit",
    "runAsGroup",
    "runAsNonRoot",
    "runAsUser",
    "setHostnameAsFQDN",
    "shareProcessNamespace",
    "startingDeadlineSeconds",
    "storageClassName",
    "successfulJobsHistoryLimit",
    "suspend",
    "terminationGracePeriodSeconds",
    "ttlSecondsAfterFinished",
];

/// (message, field) pairs whose zero is meaningful where the name alone is
/// ambiguous (`replicas` is a pointer in specs, not in statuses).
const KEEP_ZERO_IN: &[(&str, &str)] = &[
    ("DeploymentSpec", "replicas"),
    ("ReplicaSetSpec", "replicas"),
    ("ReplicationControllerSpec", "replicas"),
    ("ScaleSpec", "replicas"),
    ("StatefulSetSpec", "replicas"),
];

/// Decodes a whole body: magic, `runtime.Unknown` envelope, object.
pub fn decode(body: &[u8]) -> Result<Value, ProtobufError> {
    let rest = body.strip_prefix(MAGIC).ok_or(ProtobufError::Magic)?;
    decode_unknown(rest, 0)
}

fn decode_unknown(buf: &[u8], depth: usize) -> Result<Value, ProtobufError> {
    if !schema::available() {
        return Err(ProtobufError::NoSchema);
    }
    let mut ctx = Ctx {
        path: vec!["runtime.Unknown".into()],
        depth,
    };
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    let mut encoding = String::new();
    let mut content_type = String::new();
    for (tag, value) in wire::fields(buf).map_err(|e| ctx.err(e))? {
        match (tag, value) {
            (1, Raw::Len(tm)) => {
                for (t, v) in wire::fields(tm).map_err(|e| ctx.err(format!("typeMeta: {e}")))? {
                    match (t, v) {
                        (1, Raw::Len(s)) => api_version = utf8(s, &ctx)?,
                        (2, Raw::Len(s)) => kind = utf8(s, &ctx)?,
                        _ => {}
                    }
                }
            }
            (2, Raw::Len(r)) => raw = r,
            (3, Raw::Len(s)) => encoding = utf8(s, &ctx)?,
            (4, Raw::Len(s)) => content_type = utf8(s, &ctx)?,
            (1..=4, _) => return Err(ctx.err(format!("field {tag} has the wrong wire type"))),
            _ => {}
        }
    }
    if !encoding.is_empty() {
        return Err(ProtobufError::ContentEncoding(encoding));
    }
    if content_type
        .split(';')
        .next()
        .is_some_and(|c| c.trim() == "application/json")
    {
        return serde_json::from_slice(raw)
            .map_err(|e| ctx.err(format!("raw is not valid JSON: {e}")));
    }
    if kind.is_empty() {
        return Err(ProtobufError::NoType);
    }
    let index =
        schema::for_kind(&api_version, &kind).ok_or_else(|| ProtobufError::UnknownKind {
            api_version: api_version.clone(),
            kind: kind.clone(),
        })?;
    ctx.path = vec![kind.clone()];
    let mut obj = decode_object(index, raw, &mut ctx)?;
    if !api_version.is_empty() {
        obj.insert("apiVersion".into(), Value::String(api_version));
    }
    obj.insert("kind".into(), Value::String(kind));
    Ok(Value::Object(obj))
}

/// Decodes the protobuf encoding of one message, named as in the schema
/// (`api.apps.v1.Deployment`), into its JSON form.
pub fn decode_message(message: &str, buf: &[u8]) -> Result<Value, ProtobufError> {
    let (index, mut ctx) = Ctx::for_message(message)?;
    message_value(index, buf, &mut ctx)
}

fn utf8(b: &[u8], ctx: &Ctx) -> Result<String, ProtobufError> {
    String::from_utf8(b.to_vec()).map_err(|_| ctx.err("a string is not valid UTF-8"))
}

fn is_zero(v: &Value) -> bool {
    match v {
        Value::String(s) => s.is_empty(),
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        _ => false,
    }
}

fn keep_zero(message: &str, json: &str) -> bool {
    let short = message.rsplit('.').next().unwrap_or(message);
    KEEP_ZERO.contains(&json) || KEEP_ZERO_IN.iter().any(|(m, f)| *m == short && *f == json)
}

fn decode_object(
    index: u16,
    buf: &[u8],
    ctx: &mut Ctx,
) -> Result<Map<String, Value>, ProtobufError> {
    let msg = schema::message(index).ok_or_else(|| ctx.err("schema index out of range"))?;
    ctx.descend()?;
    let mut out = Map::new();
    for (tag, raw) in wire::fields(buf).map_err(|e| ctx.err(e))? {
        let Ok(fi) = msg.fields.binary_search_by_key(&tag, |f| f.tag) else {
            // Unknown fields are skipped, as Go's decoder does.
            continue;
        };
        let field = &msg.fields[fi];
        ctx.path.push(field.json.to_owned());
        match field.label {
            Label::Single => {
                let v = scalar_or_message(field.ty, raw, ctx)?;
                let message_typed = matches!(field.ty, Ty::Message(_));
                if field.json.is_empty() {
                    // An embedded (inline) struct: its fields are ours.
                    if let Value::Object(m) = v {
                        out.extend(m);
                    }
                } else if message_typed
                    || field.required
                    || !is_zero(&v)
                    || keep_zero(msg.name, field.json)
                {
                    out.insert(field.json.to_owned(), v);
                } else {
                    out.remove(field.json);
                }
            }
            Label::Repeated => {
                let mut values = Vec::new();
                match (field.ty, raw) {
                    // Packed scalars.
                    (ty, Raw::Len(b)) if !matches!(ty, Ty::String | Ty::Bytes | Ty::Message(_)) => {
                        let mut r = wire::Reader::new(b);
                        while !r.is_done() {
                            let v = match ty {
                                Ty::Double => Raw::Fixed64(r.fixed64().map_err(|e| ctx.err(e))?),
                                Ty::Float => Raw::Fixed32(r.fixed32().map_err(|e| ctx.err(e))?),
                                _ => Raw::Varint(r.varint().map_err(|e| ctx.err(e))?),
                            };
                            values.push(scalar_or_message(ty, v, ctx)?);
                        }
                    }
                    (ty, raw) => values.push(scalar_or_message(ty, raw, ctx)?),
                }
                let entry = out
                    .entry(field.json.to_owned())
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(a) = entry {
                    a.extend(values);
                }
            }
            Label::Map(value_ty) => {
                let Raw::Len(b) = raw else {
                    return Err(ctx.err("a map entry is not length-delimited"));
                };
                let mut key = None;
                let mut value = None;
                for (t, v) in wire::fields(b).map_err(|e| ctx.err(e))? {
                    match t {
                        1 => key = Some(scalar_or_message(field.ty, v, ctx)?),
                        2 => value = Some(scalar_or_message(value_ty, v, ctx)?),
                        _ => {}
                    }
                }
                let key = match key {
                    Some(Value::String(s)) => s,
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                let value = match value {
                    Some(v) => v,
                    None => zero_of(value_ty, ctx)?,
                };
                let entry = out
                    .entry(field.json.to_owned())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(m) = entry {
                    m.insert(key, value);
                }
            }
        }
        ctx.path.pop();
    }
    ctx.depth -= 1;
    Ok(out)
}

/// The value of an absent map value.
fn zero_of(ty: Ty, ctx: &mut Ctx) -> Result<Value, ProtobufError> {
    Ok(match ty {
        Ty::String | Ty::Bytes => Value::String(String::new()),
        Ty::Bool => Value::Bool(false),
        Ty::Message(i) => message_value(i, &[], ctx)?,
        _ => Value::Number(0.into()),
    })
}

fn wrong_type(ty: Ty, raw: Raw<'_>, ctx: &Ctx) -> ProtobufError {
    ctx.err(format!(
        "wire type {} does not fit a field of type {ty:?}",
        raw.wire_type()
    ))
}

fn number(f: f64, ctx: &Ctx) -> Result<Value, ProtobufError> {
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| ctx.err("a floating-point value is not finite"))
}

fn scalar_or_message(ty: Ty, raw: Raw<'_>, ctx: &mut Ctx) -> Result<Value, ProtobufError> {
    Ok(match (ty, raw) {
        (Ty::String, Raw::Len(b)) => Value::String(utf8(b, ctx)?),
        (Ty::Bytes, Raw::Len(b)) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        (Ty::Bool, Raw::Varint(v)) => Value::Bool(v != 0),
        // int32 values are sign-extended to 64 bits on the wire.
        (Ty::Int32, Raw::Varint(v)) => Value::Number((v as i64 as i32).into()),
        (Ty::Int64, Raw::Varint(v)) => Value::Number((v as i64).into()),
        (Ty::Uint32, Raw::Varint(v)) => Value::Number((v as u32).into()),
        (Ty::Uint32, Raw::Fixed32(v)) => Value::Number(v.into()),
        (Ty::Uint64, Raw::Varint(v) | Raw::Fixed64(v)) => Value::Number(v.into()),
        (Ty::Int32, Raw::Fixed32(v)) => Value::Number((v as i32).into()),
        (Ty::Int64, Raw::Fixed64(v)) => Value::Number((v as i64).into()),
        (Ty::Double, Raw::Fixed64(v)) => number(f64::from_bits(v), ctx)?,
        (Ty::Float, Raw::Fixed32(v)) => number(f64::from(f32::from_bits(v)), ctx)?,
        (Ty::Message(i), Raw::Len(b)) => message_value(i, b, ctx)?,
        (ty, raw) => return Err(wrong_type(ty, raw, ctx)),
    })
}

/// A message's JSON value, with the special forms.
fn message_value(index: u16, buf: &[u8], ctx: &mut Ctx) -> Result<Value, ProtobufError> {
    let msg = schema::message(index).ok_or_else(|| ctx.err("schema index out of range"))?;
    match msg.special {
        Special::None => Ok(Value::Object(decode_object(index, buf, ctx)?)),
        Special::IntOrString => {
            let (mut ty, mut int, mut s) = (0u64, 0i64, String::new());
            for (t, v) in wire::fields(buf).map_err(|e| ctx.err(e))? {
                match (t, v) {
                    (1, Raw::Varint(v)) => ty = v,
                    (2, Raw::Varint(v)) => int = i64::from(v as i64 as i32),
                    (3, Raw::Len(b)) => s = utf8(b, ctx)?,
                    _ => {}
                }
            }
            Ok(if ty == 1 {
                Value::String(s)
            } else {
                Value::Number(int.into())
            })
        }
        Special::Quantity => {
            let mut s = String::new();
            for (t, v) in wire::fields(buf).map_err(|e| ctx.err(e))? {
                if let (1, Raw::Len(b)) = (t, v) {
                    s = utf8(b, ctx)?;
                }
            }
            Ok(Value::String(s))
        }
        Special::Time | Special::MicroTime => {
            if buf.is_empty() {
                return Ok(Value::Null);
            }
            let (mut secs, mut nanos) = (0i64, 0u32);
            for (t, v) in wire::fields(buf).map_err(|e| ctx.err(e))? {
                match (t, v) {
                    (1, Raw::Varint(v)) => secs = v as i64,
                    (2, Raw::Varint(v)) => {
                        nanos = u32::try_from(v as i64).unwrap_or(0).min(999_999_999)
                    }
                    _ => {}
                }
            }
            let t = chrono::DateTime::from_timestamp(secs, nanos)
                .ok_or_else(|| ctx.err(format!("time {secs}s is out of range")))?;
            let format = if msg.special == Special::Time {
                chrono::SecondsFormat::Secs
            } else {
                chrono::SecondsFormat::Micros
            };
            Ok(Value::String(t.to_rfc3339_opts(format, true)))
        }
        Special::Duration => {
            let mut ns = 0i64;
            for (t, v) in wire::fields(buf).map_err(|e| ctx.err(e))? {
                if let (1, Raw::Varint(v)) = (t, v) {
                    ns = v as i64;
                }
            }
            Ok(Value::String(go_duration(ns)))
        }
        Special::RawJson => {
            let mut raw: &[u8] = &[];
            for (t, v) in wire::fields(buf).map_err(|e| ctx.err(e))? {
                if let (1, Raw::Len(b)) = (t, v) {
                    raw = b;
                }
            }
            if raw.is_empty() {
                return Ok(Value::Null);
            }
            if let Some(rest) = raw.strip_prefix(MAGIC) {
                return decode_unknown(rest, ctx.depth + 1);
            }
            serde_json::from_slice(raw)
                .map_err(|e| ctx.err(format!("embedded raw object is not valid JSON: {e}")))
        }
        Special::StringList => {
            let mut items = Vec::new();
            for (t, v) in wire::fields(buf).map_err(|e| ctx.err(e))? {
                if let (1, Raw::Len(b)) = (t, v) {
                    items.push(Value::String(utf8(b, ctx)?));
                }
            }
            Ok(Value::Array(items))
        }
        Special::PropsOrArray | Special::PropsOrBool | Special::PropsOrStringArray => {
            // OrArray {schema 1, jSONSchemas 2}; OrBool {allows 1, schema 2};
            // OrStringArray {schema 1, property 2}.
            let schema_tag = if msg.special == Special::PropsOrBool {
                2
            } else {
                1
            };
            let schema_field = msg.fields.iter().find(|f| f.tag == schema_tag);
            let mut schema = None;
            let mut list = Vec::new();
            let mut allows = false;
            for (t, v) in wire::fields(buf).map_err(|e| ctx.err(e))? {
                match (msg.special, t, v) {
                    (_, t, Raw::Len(b)) if t == schema_tag => {
                        if let Some(Ty::Message(i)) = schema_field.map(|f| f.ty) {
                            schema = Some(message_value(i, b, ctx)?);
                        }
                    }
                    (Special::PropsOrArray, 2, Raw::Len(b)) => {
                        if let Some(Ty::Message(i)) = schema_field.map(|f| f.ty) {
                            list.push(message_value(i, b, ctx)?);
                        }
                    }
                    (Special::PropsOrStringArray, 2, Raw::Len(b)) => {
                        list.push(Value::String(utf8(b, ctx)?))
                    }
                    (Special::PropsOrBool, 1, Raw::Varint(v)) => allows = v != 0,
                    _ => {}
                }
            }
            Ok(match msg.special {
                Special::PropsOrBool => schema.unwrap_or(Value::Bool(allows)),
                _ if !list.is_empty() => Value::Array(list),
                _ => schema.unwrap_or(Value::Null),
            })
        }
    }
}

/// Go's `time.Duration.String()`.
pub fn go_duration(ns: i64) -> String {
    fn frac(v: u64, unit: u64) -> String {
        let whole = v / unit;
        let rest = v % unit;
        if rest == 0 {
            return whole.to_string();
        }
        let digits = unit.ilog10() as usize;
        let f = format!("{rest:0digits$}");
        format!("{whole}.{}", f.trim_end_matches('0'))
    }
    let sign = if ns < 0 { "-" } else { "" };
    let u = ns.unsigned_abs();
    let body = if u == 0 {
        "0s".to_owned()
    } else if u < 1_000 {
        format!("{u}ns")
    } else if u < 1_000_000 {
        format!("{}µs", frac(u, 1_000))
    } else if u < 1_000_000_000 {
        format!("{}ms", frac(u, 1_000_000))
    } else {
        let secs = u / 1_000_000_000;
        let s = frac(u % 60_000_000_000, 1_000_000_000);
        let (h, m) = (secs / 3600, (secs / 60) % 60);
        if h > 0 {
            format!("{h}h{m}m{s}s")
        } else if m > 0 {
            format!("{m}m{s}s")
        } else {
            format!("{s}s")
        }
    };
    format!("{sign}{body}")
}
