//! Generates the protobuf schema table the request decoder walks
//! (`src/protobuf/schema.rs` includes it).
//!
//! The Kubernetes protobuf messages (field numbers and wire types) are read
//! from the prost-generated sources of the `k8s-pb` crate, the exact JSON
//! field names from the serde impls of the `k8s-openapi` crate. Both are
//! located through `cargo metadata` on the workspace lockfile; neither is
//! compiled into the server. Without them (no source at hand) the table is
//! empty and protobuf request bodies are refused with a clear error.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into()));
    if let Some(lock) = manifest_dir
        .ancestors()
        .map(|d| d.join("Cargo.lock"))
        .find(|p| p.exists())
    {
        println!("cargo:rerun-if-changed={}", lock.display());
    }
    let code = match sources(&manifest_dir) {
        Ok((pb, openapi)) => generate(&pb, &openapi),
        Err(e) => {
            println!("cargo:warning=protobuf request bodies will be refused: {e}");
            // A path that never exists: cargo runs this script again on the
            // next build, so a passing problem (a manifest being edited, no
            // network) does not leave the schema empty for good.
            println!(
                "cargo:rerun-if-changed={}",
                out_dir.join("schema-missing-retry").display()
            );
            Err(e)
        }
    };
    let code = code.unwrap_or_else(|e| {
        format!("// schema unavailable: {}\npub(super) static MESSAGES: &[Message] = &[];\npub(super) static KINDS: &[(&str, &str, u16)] = &[];\npub(super) static GROUPS: &[(&str, &str)] = &[];\n", e.replace('\n', " "))
    });
    if let Err(e) = fs::write(out_dir.join("k8s_schema.rs"), code) {
        println!("cargo:warning=writing the protobuf schema failed: {e}");
    }
}

/// The `src` directories of k8s-pb and k8s-openapi.
fn sources(manifest_dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut last_err = String::new();
    // Offline first (the sources are normally in the registry cache already);
    // then let cargo fetch what the lockfile names.
    for offline in [true, false] {
        let mut cmd = Command::new(&cargo);
        cmd.args(["metadata", "--format-version", "1", "--locked"])
            .current_dir(manifest_dir);
        if offline {
            cmd.arg("--offline");
        }
        let out = match cmd.output() {
            Ok(o) => o,
            Err(e) => {
                last_err = format!("running cargo metadata failed: {e}");
                continue;
            }
        };
        if !out.status.success() {
            last_err = format!(
                "cargo metadata failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut pb = None;
        let mut openapi = None;
        for piece in text.split("\"manifest_path\":\"").skip(1) {
            let Some(end) = piece.find('"') else { continue };
            let path = PathBuf::from(piece[..end].replace("\\\\", "\\"));
            let Some(dir) = path.parent() else { continue };
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("k8s-pb-") && dir.join("src").is_dir() {
                pb = Some(dir.join("src"));
            } else if name.starts_with("k8s-openapi-") && dir.join("src").is_dir() {
                openapi = Some(dir.join("src"));
            }
        }
        match (pb, openapi) {
            (Some(p), Some(o)) => return Ok((p, o)),
            _ => {
                last_err =
                    "the sources of k8s-pb and k8s-openapi were not found in cargo metadata".into()
            }
        }
    }
    Err(last_err)
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn norm(s: &str) -> String {
    s.trim_start_matches("r#")
        .chars()
        .filter(|c| !matches!(c, '_' | '-' | '$'))
        .flat_map(char::to_lowercase)
        .collect()
}

/// Marks a required field's entry in [`JsonNames`].
const REQUIRED: &str = "required:";

/// `io.k8s.api.apps.v1.DeploymentSpec` → JSON names by normalized name (and
/// `required:<json name>` entries for required fields).
type JsonNames = HashMap<String, HashMap<String, String>>;

fn openapi_names(src: &Path) -> (JsonNames, HashMap<String, String>) {
    let mut per_type: JsonNames = HashMap::new();
    let mut global = HashMap::new();
    let mut versions: Vec<PathBuf> = fs::read_dir(src)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    // Oldest first, so the newest version's names win.
    versions.sort();
    for v in versions {
        let mut files = Vec::new();
        rs_files(&v, &mut files);
        for f in files {
            let Ok(text) = fs::read_to_string(&f) else {
                continue;
            };
            let Some(ty) = text
                .split("\"io.k8s.")
                .nth(1)
                .and_then(|s| s.split('"').next())
            else {
                continue;
            };
            let key = ty.replace('-', "_");
            let entry = per_type.entry(key).or_default();
            for line in text.lines() {
                let line = line.trim();
                let Some(rest) = line.strip_prefix('"') else {
                    continue;
                };
                let Some((json, tail)) = rest.split_once('"') else {
                    continue;
                };
                let Some(field) = tail.trim().strip_prefix("=> Field::Key_") else {
                    continue;
                };
                let field = field.trim_end_matches(',');
                entry.insert(norm(field), json.to_owned());
                entry.insert(norm(json), json.to_owned());
                global.insert(norm(json), json.to_owned());
            }
            // Fields serialized unconditionally (`&self.x`, not `Option`) are
            // required: Go's JSON has no `omitempty` on them and keeps zeros.
            for line in text.lines() {
                let Some(rest) = line.trim().strip_prefix(
                    "crate::serde::ser::SerializeStruct::serialize_field(&mut state, \"",
                ) else {
                    continue;
                };
                if let Some((json, tail)) = rest.split_once('"')
                    && tail.trim_start_matches(',').trim().starts_with("&self.")
                {
                    entry.insert(format!("{REQUIRED}{json}"), String::new());
                }
            }
        }
    }
    (per_type, global)
}

#[derive(Debug)]
struct PbField {
    tag: u32,
    name: String,
    kind: String,
    label: &'static str,
    map_value: Option<String>,
    type_text: String,
    doc: String,
}

#[derive(Debug, Default)]
struct PbMessage {
    fields: Vec<PbField>,
    doc: String,
}

/// A doc comment as an OpenAPI description: `+marker` lines dropped, lines
/// of a paragraph joined with spaces, `<url>` links unwrapped.
fn description(lines: &[String]) -> String {
    let mut paragraphs: Vec<String> = vec![String::new()];
    for l in lines {
        let l = l.trim();
        if l.starts_with('+') {
            continue;
        }
        if l.is_empty() {
            if paragraphs.last().is_some_and(|p| !p.is_empty()) {
                paragraphs.push(String::new());
            }
            continue;
        }
        if let Some(p) = paragraphs.last_mut() {
            if !p.is_empty() {
                p.push(' ');
            }
            p.push_str(l);
        }
    }
    let text = paragraphs
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join("\n\n");
    // prost wraps bare URLs in angle brackets.
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(start) = rest.find("<http") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('>') {
            Some(end) => {
                out.push_str(&after[..end]);
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(after);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Splits `a, b = "c, d", e` at top-level commas.
fn split_args(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => {
                out.push(cur.trim().to_owned());
                cur.clear();
            }
            _ => cur.push(c),
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_owned());
    }
    out
}

/// (apiVersion, kind, message) of each resource.
type Resources = Vec<(String, String, String)>;

fn parse_pb(src: &Path) -> (BTreeMap<String, PbMessage>, Resources) {
    let mut messages = BTreeMap::new();
    let mut resources = Vec::new();
    let mut files = Vec::new();
    rs_files(src, &mut files);
    for f in files {
        let Ok(rel) = f.strip_prefix(src) else {
            continue;
        };
        if rel.file_name().is_none_or(|n| n != "mod.rs") {
            continue;
        }
        let module: Vec<String> = rel
            .parent()
            .map(|p| {
                p.components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        let mut current: Option<(String, PbMessage)> = None;
        let mut pending_attr: Option<String> = None;
        let mut doc: Vec<String> = Vec::new();
        let mut field_doc = String::new();
        while i < lines.len() {
            let line = lines[i].trim();
            if let Some(d) = line.strip_prefix("///") {
                doc.push(d.strip_prefix(' ').unwrap_or(d).to_owned());
                i += 1;
                continue;
            }
            if let Some(rest) = line.strip_prefix("pub struct ")
                && let Some(name) = rest.strip_suffix("{}")
            {
                // A message without fields.
                let mut full = module.clone();
                full.push(name.trim().to_owned());
                let msg = PbMessage {
                    fields: Vec::new(),
                    doc: description(&doc),
                };
                messages.insert(full.join("."), msg);
                doc.clear();
            } else if let Some(rest) = line.strip_prefix("pub struct ")
                && rest.ends_with('{')
            {
                let name = rest.trim_end_matches('{').trim().to_owned();
                let msg = PbMessage {
                    fields: Vec::new(),
                    doc: description(&doc),
                };
                current = Some((name, msg));
                doc.clear();
            } else if line == "}" && lines[i].starts_with('}') {
                doc.clear();
                if let Some((name, msg)) = current.take() {
                    let mut full = module.clone();
                    full.push(name);
                    messages.insert(full.join("."), msg);
                }
            } else if let Some(rest) = line.strip_prefix("impl crate::Resource for ") {
                let name = rest.trim_end_matches('{').trim();
                let mut api_version = None;
                let mut kind = None;
                for l in lines.iter().skip(i + 1).take(8) {
                    let l = l.trim();
                    let value = || l.split('"').nth(1).map(str::to_owned);
                    if l.starts_with("const API_VERSION") {
                        api_version = value();
                    } else if l.starts_with("const KIND") {
                        kind = value();
                    }
                }
                if let (Some(av), Some(k)) = (api_version, kind) {
                    let mut full = module.clone();
                    full.push(name.to_owned());
                    resources.push((av, k, full.join(".")));
                }
            } else if line.starts_with("#[prost(") && current.is_some() {
                let mut attr = line.to_owned();
                while !attr.ends_with(")]") && i + 1 < lines.len() {
                    i += 1;
                    attr.push(' ');
                    attr.push_str(lines[i].trim());
                }
                pending_attr = Some(attr);
                field_doc = description(&doc);
                doc.clear();
            } else if let (Some(rest), Some(attr)) =
                (line.strip_prefix("pub "), pending_attr.as_ref())
            {
                let mut decl = rest.to_owned();
                let balanced = |d: &str| d.matches('<').count() == d.matches('>').count();
                while !(decl.ends_with(',') && balanced(&decl)) && i + 1 < lines.len() {
                    i += 1;
                    decl.push_str(lines[i].trim());
                }
                if let Some((name, ty)) = decl.split_once(':')
                    && let Some(mut field) =
                        pb_field(attr, name.trim(), ty.trim().trim_end_matches(','))
                    && let Some((_, msg)) = current.as_mut()
                {
                    field.doc = std::mem::take(&mut field_doc);
                    msg.fields.push(field);
                }
                pending_attr = None;
            }
            i += 1;
        }
    }
    (messages, resources)
}

fn pb_field(attr: &str, name: &str, ty: &str) -> Option<PbField> {
    let inner = attr.strip_prefix("#[prost(")?.strip_suffix(")]")?;
    let args = split_args(inner);
    let mut kind = None;
    let mut label = "single";
    let mut tag = None;
    let mut map_value = None;
    for a in &args {
        let (k, v) = match a.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().trim_matches('"'))),
            None => (a.as_str(), None),
        };
        match (k, v) {
            ("tag", Some(v)) => tag = v.parse().ok(),
            ("repeated", None) => label = "repeated",
            ("optional" | "required" | "boxed", None) => {}
            ("btree_map" | "map" | "hash_map", Some(v)) => {
                let (key, value) = v.split_once(',')?;
                kind = Some(key.trim().to_owned());
                map_value = Some(value.trim().to_owned());
                label = "map";
            }
            (k, _) if kind.is_none() => kind = Some(k.to_owned()),
            _ => {}
        }
    }
    Some(PbField {
        tag: tag?,
        name: name.to_owned(),
        kind: kind?,
        label,
        map_value,
        type_text: ty.replace(' ', ""),
        doc: String::new(),
    })
}

/// The message a field's Rust type names, as a dotted full name.
fn message_type(module: &[String], ty: &str) -> Option<String> {
    let mut t = ty;
    // The innermost (last) type argument.
    loop {
        // rustfmt leaves a trailing comma after wrapped type arguments.
        t = t.trim_end_matches(',');
        let unwrapped = [
            "::core::option::Option<",
            "::prost::alloc::vec::Vec<",
            "::prost::alloc::boxed::Box<",
        ]
        .iter()
        .find_map(|w| t.strip_prefix(w).and_then(|r| r.strip_suffix('>')));
        if let Some(u) = unwrapped {
            t = u;
            continue;
        }
        if let Some(r) = t
            .strip_prefix("::prost::alloc::collections::BTreeMap<")
            .and_then(|r| r.strip_suffix('>'))
        {
            // The key is always a string (no nested commas).
            t = r.split_once(',').map(|(_, v)| v)?;
            continue;
        }
        break;
    }
    let mut path: Vec<String> = module.to_vec();
    let mut segs: Vec<&str> = t.split("::").collect();
    while segs.first() == Some(&"super") {
        path.pop();
        segs.remove(0);
    }
    if segs.first() == Some(&"crate") {
        path.clear();
        segs.remove(0);
    }
    path.extend(segs.iter().map(|s| s.to_string()));
    Some(path.join("."))
}

fn scalar(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "string" => "Ty::String",
        "bytes" => "Ty::Bytes",
        "bool" => "Ty::Bool",
        "int32" | "sint32" | "sfixed32" => "Ty::Int32",
        "int64" | "sint64" | "sfixed64" => "Ty::Int64",
        "uint32" | "fixed32" => "Ty::Uint32",
        "uint64" | "fixed64" => "Ty::Uint64",
        "double" => "Ty::Double",
        "float" => "Ty::Float",
        _ => return None,
    })
}

fn special(name: &str) -> &'static str {
    let short = name.rsplit('.').next().unwrap_or("");
    match name {
        "apimachinery.pkg.util.intstr.IntOrString" => "Special::IntOrString",
        "apimachinery.pkg.api.resource.Quantity" => "Special::Quantity",
        "apimachinery.pkg.apis.meta.v1.Time" => "Special::Time",
        "apimachinery.pkg.apis.meta.v1.MicroTime" => "Special::MicroTime",
        "apimachinery.pkg.apis.meta.v1.Duration" => "Special::Duration",
        "apimachinery.pkg.apis.meta.v1.FieldsV1" | "apimachinery.pkg.runtime.RawExtension" => {
            "Special::RawJson"
        }
        "apimachinery.pkg.apis.meta.v1.Verbs" => "Special::StringList",
        _ if name.starts_with("apiextensions_apiserver.") => match short {
            "Json" => "Special::RawJson",
            "JsonSchemaPropsOrArray" => "Special::PropsOrArray",
            "JsonSchemaPropsOrBool" => "Special::PropsOrBool",
            "JsonSchemaPropsOrStringArray" => "Special::PropsOrStringArray",
            _ => "Special::None",
        },
        _ if short == "ExtraValue" => "Special::StringList",
        _ => "Special::None",
    }
}

/// lowerCamelCase of a snake_case name: the last resort for a JSON name.
fn camel(name: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in name.trim_start_matches("r#").chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn generate(pb_src: &Path, openapi_src: &Path) -> Result<String, String> {
    let (messages, resources) = parse_pb(pb_src);
    if messages.is_empty() {
        return Err(format!("no messages found in {}", pb_src.display()));
    }
    let (per_type, global) = openapi_names(openapi_src);
    let index: HashMap<&str, usize> = messages
        .keys()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i))
        .collect();
    let mut code =
        String::from("// @generated by build.rs from the k8s-pb and k8s-openapi sources.\n");
    code.push_str("pub(super) static MESSAGES: &[Message] = &[\n");
    for (name, msg) in &messages {
        let module: Vec<String> = name.split('.').map(str::to_owned).collect();
        let module = &module[..module.len().saturating_sub(1)];
        let names = per_type.get(name.as_str());
        let mut fields: Vec<&PbField> = msg.fields.iter().collect();
        fields.sort_by_key(|f| f.tag);
        let _ = write!(
            code,
            "    Message {{ name: {name:?}, special: {}, doc: {:?}, fields: &[",
            special(name),
            msg.doc
        );
        for f in fields {
            let n = norm(&f.name);
            // A message field the type's JSON form does not name is a Go
            // struct embedded inline (Probe.ProbeHandler, Volume.VolumeSource):
            // its fields are the parent's. An empty JSON name marks it.
            let inline =
                f.kind == "message" && names.is_some_and(|m| !m.contains_key(&n) && !m.is_empty());
            let json = if inline {
                String::new()
            } else {
                names
                    .and_then(|m| m.get(&n))
                    .or_else(|| global.get(&n))
                    .cloned()
                    .unwrap_or_else(|| camel(&f.name))
            };
            let resolve = |kind: &str| -> Option<String> {
                if let Some(s) = scalar(kind) {
                    return Some(s.to_owned());
                }
                if kind == "message" {
                    let target = message_type(module, &f.type_text)?;
                    return index
                        .get(target.as_str())
                        .map(|i| format!("Ty::Message({i})"));
                }
                None
            };
            let (ty, label) = match f.label {
                "map" => {
                    let Some(key) = resolve(&f.kind) else {
                        continue;
                    };
                    let Some(value) = f.map_value.as_deref().and_then(resolve) else {
                        continue;
                    };
                    (key, format!("Label::Map({value})"))
                }
                "repeated" => match resolve(&f.kind) {
                    Some(t) => (t, "Label::Repeated".to_owned()),
                    None => continue,
                },
                _ => match resolve(&f.kind) {
                    Some(t) => (t, "Label::Single".to_owned()),
                    None => continue,
                },
            };
            let required = names.is_some_and(|m| m.contains_key(&format!("{REQUIRED}{json}")));
            let _ = write!(
                code,
                "Field {{ tag: {}, json: {json:?}, ty: {ty}, label: {label}, required: {required}, doc: {:?} }}, ",
                f.tag, f.doc
            );
        }
        code.push_str("] },\n");
    }
    code.push_str("];\n");
    let mut kinds: Vec<(String, String, usize)> = resources
        .iter()
        .filter_map(|(av, k, m)| index.get(m.as_str()).map(|i| (av.clone(), k.clone(), *i)))
        .collect();
    kinds.sort();
    kinds.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    code.push_str("pub(super) static KINDS: &[(&str, &str, u16)] = &[\n");
    for (av, k, i) in &kinds {
        let _ = writeln!(code, "    ({av:?}, {k:?}, {i}),");
    }
    code.push_str("];\n");
    // API group → the module holding its versions.
    let mut groups: BTreeMap<String, String> = BTreeMap::new();
    for (av, _, m) in &resources {
        let group = av.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        let parts: Vec<&str> = m.split('.').collect();
        if parts.len() >= 2 {
            groups
                .entry(group.to_owned())
                .or_insert_with(|| parts[..parts.len() - 2].join("."));
        }
    }
    groups
        .entry(String::new())
        .or_insert_with(|| "api.core".into());
    code.push_str("pub(super) static GROUPS: &[(&str, &str)] = &[\n");
    for (g, m) in &groups {
        let _ = writeln!(code, "    ({g:?}, {m:?}),");
    }
    code.push_str("];\n");
    Ok(code)
}
