//! JSON → protobuf, driven by the same generated schema as decode.rs, for
//! responses to clients that prefer `application/vnd.kubernetes.protobuf`.
//!
//! The encoder writes the fields the JSON object has (absent and `null`
//! fields are left out, which Go reads as the zero value, the same thing
//! their absence means in JSON), in tag order, repeated scalars unpacked and
//! map entries in key order, as Go's generated marshallers do. A value whose
//! JSON type does not fit its field is an error naming the path: the caller
//! then answers in JSON instead.

use super::{
    MAGIC, ProtobufError,
    ctx::Ctx,
    schema::{self, Label, Special, Ty},
};
use base64::Engine;
use serde_json::{Map, Value};

/// Wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, tag: u32, wire: u8) {
    put_varint(out, (u64::from(tag) << 3) | u64::from(wire));
}

fn put_len(out: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    put_key(out, tag, LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The whole body for `obj`: magic and a `runtime.Unknown` envelope whose
/// `raw` is the object's encoding. The object's `apiVersion`/`kind` pick
/// the schema.
pub fn encode(obj: &Value) -> Result<Vec<u8>, ProtobufError> {
    let mut out = MAGIC.to_vec();
    out.extend(encode_unknown(obj, 0)?);
    Ok(out)
}

/// Whether `encode` knows the type of `obj` (a built-in kind).
pub fn can_encode(obj: &Value) -> bool {
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    !kind.is_empty() && schema::for_kind(api_version, kind).is_some()
}

fn encode_unknown(obj: &Value, depth: usize) -> Result<Vec<u8>, ProtobufError> {
    if !schema::available() {
        return Err(ProtobufError::NoSchema);
    }
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind.is_empty() {
        return Err(ProtobufError::NoType);
    }
    let index = schema::for_kind(api_version, kind).ok_or_else(|| ProtobufError::UnknownKind {
        api_version: api_version.to_owned(),
        kind: kind.to_owned(),
    })?;
    let mut ctx = Ctx {
        path: vec![kind.to_owned()],
        depth,
    };
    let raw = message_bytes(index, obj, &mut ctx)?;
    let mut type_meta = Vec::new();
    put_len(&mut type_meta, 1, api_version.as_bytes());
    put_len(&mut type_meta, 2, kind.as_bytes());
    let mut out = Vec::with_capacity(raw.len() + type_meta.len() + 16);
    put_len(&mut out, 1, &type_meta);
    put_len(&mut out, 2, &raw);
    // contentEncoding and contentType: empty, written as Go does.
    put_len(&mut out, 3, b"");
    put_len(&mut out, 4, b"");
    Ok(out)
}

/// The protobuf encoding of one message, named as in the schema
/// (`api.core.v1.Pod`), from its JSON form: no envelope.
pub fn encode_message(message: &str, value: &Value) -> Result<Vec<u8>, ProtobufError> {
    let (index, mut ctx) = Ctx::for_message(message)?;
    message_bytes(index, value, &mut ctx)
}

/// A frame of a protobuf watch stream: 4-byte big-endian length, then a
/// `metav1.WatchEvent` whose object is the enveloped object.
pub fn watch_frame(event_type: &str, obj: &Value) -> Result<Vec<u8>, ProtobufError> {
    let inner = encode(obj)?;
    let mut raw_ext = Vec::with_capacity(inner.len() + 8);
    put_len(&mut raw_ext, 1, &inner);
    let mut event = Vec::with_capacity(raw_ext.len() + event_type.len() + 16);
    put_len(&mut event, 1, event_type.as_bytes());
    put_len(&mut event, 2, &raw_ext);
    let len = u32::try_from(event.len()).map_err(|_| ProtobufError::Malformed {
        path: "WatchEvent".into(),
        message: "the event is larger than 4 GiB".into(),
    })?;
    let mut frame = Vec::with_capacity(event.len() + 4);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend(event);
    Ok(frame)
}

/// The encoding of message `index` from `v` (special JSON forms included).
fn message_bytes(index: u16, v: &Value, ctx: &mut Ctx) -> Result<Vec<u8>, ProtobufError> {
    let msg = schema::message(index).ok_or_else(|| ctx.err("schema index out of range"))?;
    ctx.descend()?;
    let mut out = Vec::new();
    match msg.special {
        Special::None => {
            let map = v
                .as_object()
                .ok_or_else(|| ctx.err(format!("expected an object, found {}", type_name(v))))?;
            object_fields(index, map, ctx, &mut out)?;
        }
        Special::IntOrString => match v {
            Value::String(s) => {
                put_key(&mut out, 1, VARINT);
                put_varint(&mut out, 1);
                put_key(&mut out, 2, VARINT);
                put_varint(&mut out, 0);
                put_len(&mut out, 3, s.as_bytes());
            }
            Value::Number(_) => {
                let i = int_value(v, ctx)?;
                let i = i32::try_from(i)
                    .map_err(|_| ctx.err(format!("{i} does not fit an int-or-string")))?;
                put_key(&mut out, 1, VARINT);
                put_varint(&mut out, 0);
                put_key(&mut out, 2, VARINT);
                put_varint(&mut out, i64::from(i) as u64);
                put_len(&mut out, 3, b"");
            }
            other => {
                return Err(ctx.err(format!(
                    "expected an integer or a string, found {}",
                    type_name(other)
                )));
            }
        },
        Special::Quantity => {
            let s = quantity_string(v, ctx)?;
            put_len(&mut out, 1, s.as_bytes());
        }
        Special::Time | Special::MicroTime => match v {
            Value::Null => {}
            Value::String(s) => {
                let t = chrono::DateTime::parse_from_rfc3339(s)
                    .map_err(|e| ctx.err(format!("{s:?} is not an RFC 3339 time: {e}")))?;
                put_key(&mut out, 1, VARINT);
                put_varint(&mut out, t.timestamp() as u64);
                let nanos = if msg.special == Special::Time {
                    // Time has seconds precision in JSON and in protobuf.
                    0
                } else {
                    t.timestamp_subsec_nanos()
                };
                put_key(&mut out, 2, VARINT);
                put_varint(&mut out, u64::from(nanos));
            }
            other => {
                return Err(ctx.err(format!("expected a time, found {}", type_name(other))));
            }
        },
        Special::Duration => {
            let s = v
                .as_str()
                .ok_or_else(|| ctx.err(format!("expected a duration, found {}", type_name(v))))?;
            let ns =
                parse_go_duration(s).ok_or_else(|| ctx.err(format!("{s:?} is not a duration")))?;
            put_key(&mut out, 1, VARINT);
            put_varint(&mut out, ns as u64);
        }
        Special::RawJson => {
            if !v.is_null() {
                let raw = serde_json::to_vec(v).map_err(|e| ctx.err(e.to_string()))?;
                put_len(&mut out, 1, &raw);
            }
        }
        Special::StringList => {
            let items = v
                .as_array()
                .ok_or_else(|| ctx.err(format!("expected a list, found {}", type_name(v))))?;
            for item in items {
                let s = item.as_str().ok_or_else(|| {
                    ctx.err(format!("expected a string, found {}", type_name(item)))
                })?;
                put_len(&mut out, 1, s.as_bytes());
            }
        }
        Special::PropsOrArray | Special::PropsOrBool | Special::PropsOrStringArray => {
            let schema_tag = if msg.special == Special::PropsOrBool {
                2
            } else {
                1
            };
            let schema_ty = msg
                .fields
                .iter()
                .find(|f| f.tag == schema_tag)
                .map(|f| f.ty);
            let Some(Ty::Message(props)) = schema_ty else {
                return Err(ctx.err("the schema table lacks the JSONSchemaProps field"));
            };
            match (msg.special, v) {
                (Special::PropsOrBool, Value::Bool(b)) => {
                    put_key(&mut out, 1, VARINT);
                    put_varint(&mut out, u64::from(*b));
                }
                (Special::PropsOrBool, Value::Object(_)) => {
                    put_key(&mut out, 1, VARINT);
                    put_varint(&mut out, 1);
                    let b = message_bytes(props, v, ctx)?;
                    put_len(&mut out, 2, &b);
                }
                (Special::PropsOrArray, Value::Array(items)) => {
                    for item in items {
                        let b = message_bytes(props, item, ctx)?;
                        put_len(&mut out, 2, &b);
                    }
                }
                (Special::PropsOrStringArray, Value::Array(items)) => {
                    for item in items {
                        let s = item.as_str().ok_or_else(|| {
                            ctx.err(format!("expected a string, found {}", type_name(item)))
                        })?;
                        put_len(&mut out, 2, s.as_bytes());
                    }
                }
                (Special::PropsOrArray | Special::PropsOrStringArray, Value::Object(_)) => {
                    let b = message_bytes(props, v, ctx)?;
                    put_len(&mut out, 1, &b);
                }
                (_, Value::Null) => {}
                (_, other) => {
                    return Err(ctx.err(format!(
                        "{} does not fit a schema-or-list field",
                        type_name(other)
                    )));
                }
            }
        }
    }
    ctx.depth -= 1;
    Ok(out)
}

/// The fields of a plain message, in tag order; embedded (inline) structs
/// take their fields from the same JSON object.
fn object_fields(
    index: u16,
    map: &Map<String, Value>,
    ctx: &mut Ctx,
    out: &mut Vec<u8>,
) -> Result<(), ProtobufError> {
    let msg = schema::message(index).ok_or_else(|| ctx.err("schema index out of range"))?;
    for field in msg.fields {
        if field.json.is_empty() {
            if let Ty::Message(i) = field.ty {
                let b = message_bytes(i, &Value::Object(map.clone()), ctx)?;
                put_len(out, field.tag, &b);
            }
            continue;
        }
        let Some(v) = map.get(field.json) else {
            continue;
        };
        if v.is_null() {
            // A zero metav1.Time is written as an empty message (Go's
            // ObjectMeta always writes creationTimestamp); it reads back
            // as null.
            if field.label == Label::Single
                && let Ty::Message(i) = field.ty
                && schema::message(i)
                    .is_some_and(|m| matches!(m.special, Special::Time | Special::MicroTime))
            {
                put_len(out, field.tag, b"");
            }
            continue;
        }
        ctx.path.push(field.json.to_owned());
        match field.label {
            Label::Single => single(field.tag, field.ty, v, ctx, out)?,
            Label::Repeated => {
                let items = v
                    .as_array()
                    .ok_or_else(|| ctx.err(format!("expected a list, found {}", type_name(v))))?;
                for item in items {
                    single(field.tag, field.ty, item, ctx, out)?;
                }
            }
            Label::Map(value_ty) => {
                let entries = v.as_object().ok_or_else(|| {
                    ctx.err(format!("expected an object, found {}", type_name(v)))
                })?;
                for (key, value) in entries {
                    let mut entry = Vec::new();
                    single(1, field.ty, &map_key(field.ty, key, ctx)?, ctx, &mut entry)?;
                    if !value.is_null() {
                        single(2, value_ty, value, ctx, &mut entry)?;
                    }
                    put_len(out, field.tag, &entry);
                }
            }
        }
        ctx.path.pop();
    }
    Ok(())
}

/// A map key as the JSON value of its type (keys are strings in JSON).
fn map_key(ty: Ty, key: &str, ctx: &Ctx) -> Result<Value, ProtobufError> {
    Ok(match ty {
        Ty::String | Ty::Bytes => Value::String(key.to_owned()),
        Ty::Bool => Value::Bool(key == "true"),
        _ => Value::Number(
            key.parse::<i64>()
                .map_err(|_| ctx.err(format!("map key {key:?} is not a number")))?
                .into(),
        ),
    })
}

/// One field's value (a single field, one item of a repeated field, or a
/// map entry's key or value).
fn single(
    tag: u32,
    ty: Ty,
    v: &Value,
    ctx: &mut Ctx,
    out: &mut Vec<u8>,
) -> Result<(), ProtobufError> {
    match ty {
        Ty::String => {
            let s = v
                .as_str()
                .ok_or_else(|| ctx.err(format!("expected a string, found {}", type_name(v))))?;
            put_len(out, tag, s.as_bytes());
        }
        Ty::Bytes => {
            let s = v
                .as_str()
                .ok_or_else(|| ctx.err(format!("expected base64 bytes, found {}", type_name(v))))?;
            let b = base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| ctx.err(format!("bytes are not valid base64: {e}")))?;
            put_len(out, tag, &b);
        }
        Ty::Bool => {
            let b = v
                .as_bool()
                .ok_or_else(|| ctx.err(format!("expected a boolean, found {}", type_name(v))))?;
            put_key(out, tag, VARINT);
            put_varint(out, u64::from(b));
        }
        Ty::Int32 => {
            let i = int_value(v, ctx)?;
            let i = i32::try_from(i).map_err(|_| ctx.err(format!("{i} does not fit int32")))?;
            put_key(out, tag, VARINT);
            // Negative int32 values are sign-extended to 64 bits.
            put_varint(out, i64::from(i) as u64);
        }
        Ty::Int64 => {
            let i = int_value(v, ctx)?;
            put_key(out, tag, VARINT);
            put_varint(out, i as u64);
        }
        Ty::Uint32 | Ty::Uint64 => {
            let u = v
                .as_u64()
                .ok_or_else(|| ctx.err(format!("expected an unsigned integer, found {v}")))?;
            if ty == Ty::Uint32 && u > u64::from(u32::MAX) {
                return Err(ctx.err(format!("{u} does not fit uint32")));
            }
            put_key(out, tag, VARINT);
            put_varint(out, u);
        }
        Ty::Double => {
            let f = v
                .as_f64()
                .ok_or_else(|| ctx.err(format!("expected a number, found {}", type_name(v))))?;
            put_key(out, tag, FIXED64);
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Ty::Float => {
            let f = v
                .as_f64()
                .ok_or_else(|| ctx.err(format!("expected a number, found {}", type_name(v))))?;
            put_key(out, tag, FIXED32);
            out.extend_from_slice(&(f as f32).to_bits().to_le_bytes());
        }
        Ty::Message(i) => {
            let b = message_bytes(i, v, ctx)?;
            put_len(out, tag, &b);
        }
    }
    Ok(())
}

fn int_value(v: &Value, ctx: &Ctx) -> Result<i64, ProtobufError> {
    if let Some(i) = v.as_i64() {
        return Ok(i);
    }
    // A whole number written as a float (1.0) is still an integer to Go.
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Ok(f as i64),
        _ => Err(ctx.err(format!("expected an integer, found {v}"))),
    }
}

fn quantity_string(v: &Value, ctx: &Ctx) -> Result<String, ProtobufError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        // Go's Quantity accepts bare JSON numbers too.
        Value::Number(n) => Ok(n.to_string()),
        other => Err(ctx.err(format!("expected a quantity, found {}", type_name(other)))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Go's `time.ParseDuration` (`1h2m3.5s`, `300ms`, `-1.5h`): nanoseconds.
pub fn parse_go_duration(s: &str) -> Option<i64> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += n * unit;
    }
    if total > 9.2e18 {
        return None;
    }
    let ns = total.round() as i64;
    Some(if neg { -ns } else { ns })
}
