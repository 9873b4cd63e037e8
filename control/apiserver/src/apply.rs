//! Server-side apply and field ownership (`metadata.managedFields`), as
//! kube-apiserver does them with structured-merge-diff.
//!
//! Every write records which manager set which fields: non-apply writes
//! (create, PUT, PATCH, subresource writes) an `Update` entry covering the
//! fields they changed, taken away from other managers; an apply an
//! `Apply` entry that is exactly the applied configuration's fields. An
//! apply that would change a field another manager owns is refused with a
//! 409 naming the fields unless forced; fields a manager applied before and
//! no longer applies are removed from the object when nobody else owns
//! them.

use crate::{
    fieldset::{self, Changes, FieldSet, ListKind, Shape},
    objects,
    resources::ResourceInfo,
    status::{ApiError, Cause},
};
use serde_json::{Map, Value, json};

/// The query key under which the HTTP layer passes the manager name derived
/// from the User-Agent (a NUL-prefixed name no client parameter has).
pub const USER_AGENT_MANAGER: &str = "\0userAgentFieldManager";

/// The manager of writes that name none (in-process callers).
pub const DEFAULT_MANAGER: &str = "skep-apiserver";

/// Upstream: the User-Agent up to its first `/`, at most 128 bytes.
pub fn manager_from_user_agent(ua: &str) -> String {
    let prefix = ua.split('/').next().unwrap_or("").trim();
    let mut end = prefix.len().min(128);
    while !prefix.is_char_boundary(end) {
        end -= 1;
    }
    prefix[..end].to_owned()
}

/// The manager of a non-apply write: `fieldManager`, else the User-Agent's
/// product, else [`DEFAULT_MANAGER`].
pub fn update_manager(query: &crate::api::Query) -> String {
    query
        .get("fieldManager")
        .or_else(|| query.get(USER_AGENT_MANAGER))
        .filter(|m| !m.is_empty())
        .cloned()
        .unwrap_or_else(|| DEFAULT_MANAGER.to_owned())
}

/// The type information field sets need for objects of this resource.
pub fn shape_of(info: &ResourceInfo) -> Shape<'_> {
    if info.schema.is_some() {
        Shape::custom(info.schema.as_ref())
    } else {
        Shape::builtin()
    }
}

/// One `managedFields` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    pub api_version: String,
    pub time: Option<String>,
    pub subresource: Option<String>,
    pub fields: FieldSet,
}

impl Entry {
    fn is(&self, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource.as_deref() == subresource
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("manager".into(), json!(self.manager));
        m.insert("operation".into(), json!(self.operation));
        m.insert("apiVersion".into(), json!(self.api_version));
        if let Some(t) = &self.time {
            m.insert("time".into(), json!(t));
        }
        m.insert("fieldsType".into(), json!("FieldsV1"));
        m.insert("fieldsV1".into(), self.fields.to_fields_v1());
        if let Some(s) = &self.subresource {
            m.insert("subresource".into(), json!(s));
        }
        Value::Object(m)
    }

    /// How upstream names a manager in conflict messages.
    fn describe(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if let Some(sub) = &self.subresource {
            s.push_str(&format!(" with subresource {sub:?}"));
        }
        if self.operation == "Update" {
            s.push_str(&format!(" using {}", self.api_version));
        }
        s
    }
}

/// Decodes `metadata.managedFields`; an error names the bad entry.
pub fn decode(v: Option<&Value>) -> Result<Vec<Entry>, String> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list = v.as_array().ok_or("managedFields must be a list")?;
    let mut out = Vec::with_capacity(list.len());
    for (i, e) in list.iter().enumerate() {
        let s = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_owned);
        let operation = s("operation").unwrap_or_default();
        if operation != "Apply" && operation != "Update" {
            return Err(format!(
                "managedFields[{i}].operation must be Apply or Update"
            ));
        }
        if s("fieldsType").as_deref().is_some_and(|t| t != "FieldsV1") {
            return Err(format!("managedFields[{i}].fieldsType must be FieldsV1"));
        }
        let fields = match e.get("fieldsV1") {
            Some(f) => FieldSet::from_fields_v1(f)
                .map_err(|err| format!("managedFields[{i}].fieldsV1: {err}"))?,
            None => FieldSet::new(),
        };
        out.push(Entry {
            manager: s("manager").unwrap_or_default(),
            operation,
            api_version: s("apiVersion").unwrap_or_default(),
            time: s("time"),
            subresource: s("subresource").filter(|s| !s.is_empty()),
            fields,
        });
    }
    Ok(out)
}

/// Writes the entries with a non-empty set into the object's metadata (or
/// removes `managedFields` when none is left).
fn encode_into(obj: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(Entry::to_json)
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// `[{}]`: the upstream way to strip managedFields from an object.
fn is_reset(v: Option<&Value>) -> bool {
    v.and_then(Value::as_array)
        .is_some_and(|a| a.len() == 1 && a[0].as_object().is_some_and(Map::is_empty))
}

/// Records a non-apply write by `manager` going from `old` (None for a
/// create) to `new`, rewriting `new`'s managedFields.
///
/// managedFields sent by the client are taken when they are valid,
/// non-empty and differ from the live ones (kubectl's client-side →
/// server-side apply migration relies on this); an empty list or invalid
/// entries keep the live ones; `[{}]` strips them.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    subresource: Option<&str>,
    shape: &Shape,
) {
    let live_mf = old.and_then(|o| o.pointer("/metadata/managedFields"));
    let sent_mf = new.pointer("/metadata/managedFields");
    if subresource.is_none() && is_reset(sent_mf) {
        if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
        }
        return;
    }
    let from_request = match (old, sent_mf) {
        (Some(_), Some(sent)) if subresource.is_none() && Some(sent) != live_mf => {
            decode(Some(sent)).ok().filter(|e| !e.is_empty())
        }
        _ => None,
    };
    let mut entries = match from_request {
        Some(e) => e,
        // A live object with unreadable managedFields starts over.
        None => decode(live_mf).unwrap_or_default(),
    };
    let empty = json!({});
    let ch = fieldset::changes(old.unwrap_or(&empty), new, shape);
    if !ch.is_empty() {
        take_ownership(&mut entries, &ch, manager, api_version, subresource);
    }
    encode_into(new, &entries);
}

fn take_ownership(
    entries: &mut Vec<Entry>,
    ch: &Changes,
    manager: &str,
    api_version: &str,
    subresource: Option<&str>,
) {
    let all = ch.all();
    let mut own = None;
    for (i, e) in entries.iter_mut().enumerate() {
        if e.is(manager, "Update", subresource) {
            own = Some(i);
        } else {
            e.fields.subtract(&all);
        }
    }
    let now = Some(objects::now_rfc3339());
    match own {
        Some(i) => {
            let e = &mut entries[i];
            e.fields = e.fields.union(&ch.modified).difference(&ch.removed);
            e.time = now;
            e.api_version = api_version.to_owned();
        }
        None => entries.push(Entry {
            manager: manager.to_owned(),
            operation: "Update".into(),
            api_version: api_version.to_owned(),
            time: now,
            subresource: subresource.map(str::to_owned),
            fields: ch.modified.clone(),
        }),
    }
    entries.retain(|e| !e.fields.is_empty());
}

/// One apply request.
#[derive(Debug)]
pub struct ApplyRequest<'a> {
    pub manager: &'a str,
    pub api_version: String,
    pub force: bool,
    pub shape: Shape<'a>,
    /// The resource has a status subresource: the main resource's apply
    /// neither sets nor owns status.
    pub strip_status: bool,
    /// `status` when applying to the status subresource.
    pub subresource: Option<&'a str>,
}

/// The fields an applied configuration sets, as owned by its manager.
pub fn applied_set(config: &Value, req: &ApplyRequest) -> FieldSet {
    let set = fieldset::of_value(config, &req.shape);
    let status_tree = subtree(&set, "f:status");
    match req.subresource {
        Some("status") => status_tree,
        _ if req.strip_status => set.difference(&status_tree),
        _ => set,
    }
}

fn subtree(set: &FieldSet, top: &str) -> FieldSet {
    let mut out = FieldSet::new();
    for p in set.paths() {
        if p.first().is_some_and(|f| f == top) {
            out.insert(&p);
        }
    }
    out
}

/// A configuration applied to a missing object: the object to create, with
/// the manager's Apply entry.
pub fn apply_create(config: &Value, req: &ApplyRequest) -> Value {
    let mut obj = strip_nulls(config);
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    let entry = Entry {
        manager: req.manager.to_owned(),
        operation: "Apply".into(),
        api_version: req.api_version.clone(),
        time: Some(objects::now_rfc3339()),
        subresource: req.subresource.map(str::to_owned),
        fields: applied_set(config, req),
    };
    if obj.get("metadata").is_none_or(|m| !m.is_object())
        && let Some(o) = obj.as_object_mut()
    {
        o.insert("metadata".into(), json!({}));
    }
    encode_into(&mut obj, &[entry]);
    obj
}

/// Applies `config` over the live object: conflicts (409 unless forced),
/// merge, removal of fields the manager stopped applying, new ownership.
pub fn apply(live: &Value, config: &Value, req: &ApplyRequest) -> Result<Value, ApiError> {
    // An apply to /status changes (and can conflict on) status only.
    let status_only;
    let config = if req.subresource == Some("status") {
        let mut c = Map::new();
        for k in ["apiVersion", "kind", "status"] {
            if let Some(v) = config.get(k) {
                c.insert(k.into(), v.clone());
            }
        }
        status_only = Value::Object(c);
        &status_only
    } else {
        config
    };
    let applied = applied_set(config, req);
    let mut merged = live.clone();
    merge_object(&mut merged, config, &req.shape, true, req.strip_status);
    let mut entries = decode(live.pointer("/metadata/managedFields")).unwrap_or_default();
    let ch = fieldset::changes(live, &merged, &req.shape);
    let changed = ch.all();

    // (a) Fields whose value changes and that another manager owns.
    let mut conflicts: Vec<(usize, Vec<Vec<String>>)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.is(req.manager, "Apply", req.subresource) {
            continue;
        }
        let c = e.fields.intersection(&changed);
        if !c.is_empty() {
            conflicts.push((i, c.paths()));
        }
    }
    if !conflicts.is_empty() {
        let allowed = if req.force {
            true
        } else {
            // kubectl's own server-side apply over an object last written by
            // its client-side apply: conflicts on fields still holding the
            // value recorded in the last-applied annotation are forced
            // (upstream's lastAppliedManager), so switching to
            // `--server-side` does not trip over kubectl's own old writes.
            let upgradable = last_applied_unchanged(live, req);
            if let Some(ok) = &upgradable {
                for (_, paths) in &mut conflicts {
                    paths.retain(|p| !ok.contains(p));
                }
                conflicts.retain(|(_, paths)| !paths.is_empty());
            }
            upgradable.is_some() && conflicts.is_empty()
        };
        if !allowed {
            return Err(conflict_error(&entries, &conflicts));
        }
        // Forced: the changed fields leave every other manager (only the
        // conflicting ones owned any of them).
        for e in entries.iter_mut() {
            if !e.is(req.manager, "Apply", req.subresource) {
                e.fields.subtract(&changed);
            }
        }
    }

    // (b) Fields this manager applied before and no longer applies are
    // removed unless another manager still owns them.
    let own = entries
        .iter()
        .position(|e| e.is(req.manager, "Apply", req.subresource));
    if let Some(i) = own {
        let gone = entries[i].fields.difference(&applied);
        for path in gone.paths() {
            let kept = entries
                .iter()
                .enumerate()
                .any(|(j, e)| j != i && owns_at_or_under(&e.fields, &path));
            if !kept {
                remove_path(&mut merged, &path);
            }
        }
    }

    // Ownership: the Apply entry is exactly the applied set.
    let unchanged = own.is_some_and(|i| entries[i].fields == applied)
        && strip_managed(&merged) == strip_managed(live);
    let time = match own {
        Some(i) if unchanged => entries[i].time.clone(),
        _ => Some(objects::now_rfc3339()),
    };
    let entry = Entry {
        manager: req.manager.to_owned(),
        operation: "Apply".into(),
        api_version: req.api_version.clone(),
        time,
        subresource: req.subresource.map(str::to_owned),
        fields: applied,
    };
    match own {
        Some(i) => entries[i] = entry,
        None => entries.push(entry),
    }
    if req.manager == KUBECTL && req.subresource.is_none() {
        sync_last_applied(&mut merged, config);
    }
    encode_into(&mut merged, &entries);
    Ok(merged)
}

/// kubectl's server-side field manager; the only one whose applies are
/// reconciled with client-side apply's annotation (as upstream).
const KUBECTL: &str = "kubectl";
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// For kubectl's apply over an object with a last-applied annotation: the
/// fields of that annotation whose live value still equals it.
fn last_applied_unchanged(live: &Value, req: &ApplyRequest) -> Option<FieldSet> {
    if req.manager != KUBECTL {
        return None;
    }
    let raw = live
        .pointer("/metadata/annotations")?
        .get(LAST_APPLIED)?
        .as_str()?;
    let last: Value = serde_json::from_str(raw).ok()?;
    let mut out = FieldSet::new();
    for p in fieldset::of_value(&last, &req.shape).paths() {
        let (a, b) = (value_at(live, &p), value_at(&last, &p));
        if a.is_some() && a == b {
            out.insert(&p);
        }
    }
    Some(out)
}

/// Keeps the client-side apply annotation in step with kubectl's
/// server-side applies, so going back to client-side apply still works.
fn sync_last_applied(obj: &mut Value, config: &Value) {
    let has = obj
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(LAST_APPLIED))
        .is_some();
    if !has {
        return;
    }
    let mut last = strip_nulls(config);
    if let Some(meta) = last.get_mut("metadata").and_then(Value::as_object_mut) {
        let now_empty = meta
            .get_mut("annotations")
            .and_then(Value::as_object_mut)
            .map(|a| {
                a.remove(LAST_APPLIED);
                a.is_empty()
            });
        if now_empty == Some(true) {
            meta.remove("annotations");
        }
    }
    if let Some(a) = obj
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        a.insert(LAST_APPLIED.into(), Value::String(last.to_string()));
    }
}

/// The value at a member path, if present.
fn value_at<'v>(v: &'v Value, path: &[String]) -> Option<&'v Value> {
    let mut cur = v;
    for el in path {
        cur = match el.strip_prefix("f:") {
            Some(f) => cur.as_object()?.get(f)?,
            None => cur
                .as_array()?
                .iter()
                .find(|item| matches_element(item, el))?,
        };
    }
    Some(cur)
}

fn strip_managed(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    v
}

fn owns_at_or_under(set: &FieldSet, path: &[String]) -> bool {
    set.contains(path)
        || set
            .paths()
            .iter()
            .any(|p| p.len() > path.len() && p.starts_with(path))
}

/// The 409 upstream answers: `Apply failed with 1 conflict: conflict with
/// "kubectl-client-side-apply" using apps/v1: .spec.replicas`.
fn conflict_error(entries: &[Entry], conflicts: &[(usize, Vec<Vec<String>>)]) -> ApiError {
    let mut causes = Vec::new();
    let mut by_manager: Vec<(String, Vec<String>)> = Vec::new();
    for (i, paths) in conflicts {
        let who = entries[*i].describe();
        let strs: Vec<String> = paths.iter().map(|p| fieldset::path_string(p)).collect();
        for p in &strs {
            causes.push(Cause {
                reason: "FieldManagerConflict",
                field: p.clone(),
                message: format!("conflict with {who}"),
            });
        }
        by_manager.push((who, strs));
    }
    by_manager.sort();
    let message = if causes.len() == 1 {
        format!(
            "Apply failed with 1 conflict: {}: {}",
            causes[0].message, causes[0].field
        )
    } else {
        let mut lines = Vec::new();
        for (who, paths) in &by_manager {
            lines.push(format!("conflicts with {who}:"));
            lines.extend(paths.iter().map(|p| format!("- {p}")));
        }
        format!(
            "Apply failed with {} conflicts: {}",
            causes.len(),
            lines.join("\n")
        )
    };
    ApiError::ApplyConflict { message, causes }
}

/// A copy without null fields (null in an applied configuration means
/// "not specified").
fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_nulls).collect()),
        other => other.clone(),
    }
}

/// Merges an applied configuration into an object: maps field by field,
/// keyed lists item by item, sets as unions; scalars and atomic values
/// replaced.
fn merge_object(target: &mut Value, cfg: &Value, shape: &Shape, root: bool, strip_status: bool) {
    let (Some(t), Value::Object(c)) = (target.as_object_mut(), cfg) else {
        *target = strip_nulls(cfg);
        return;
    };
    if !root && shape.atomic_map() {
        *target = strip_nulls(cfg);
        return;
    }
    for (k, v) in c {
        if v.is_null() || (root && strip_status && k == "status") {
            continue;
        }
        if root && k == "metadata" {
            // Server-managed metadata is not the configuration's to set.
            if let (Some(tm), Value::Object(cm)) = (t.get_mut("metadata"), v) {
                let mut cm = cm.clone();
                for f in [
                    "managedFields",
                    "resourceVersion",
                    "uid",
                    "creationTimestamp",
                    "generation",
                ] {
                    cm.remove(f);
                }
                merge_object(tm, &Value::Object(cm), &shape.field(k), false, false);
                continue;
            }
        }
        let fs = shape.field(k);
        match t.get_mut(k) {
            Some(existing) => merge_value(existing, v, &fs),
            None => {
                t.insert(k.clone(), strip_nulls(v));
            }
        }
    }
}

fn merge_value(target: &mut Value, cfg: &Value, shape: &Shape) {
    match cfg {
        Value::Object(_) => merge_object(target, cfg, shape, false, false),
        Value::Array(items) => {
            let Some(current) = target.as_array_mut() else {
                *target = strip_nulls(cfg);
                return;
            };
            match shape.list_kind() {
                ListKind::Map(keys) => {
                    let (Some(ck), Some(lk)) = (
                        fieldset::item_keys(items, &keys),
                        fieldset::item_keys(current, &keys),
                    ) else {
                        *target = strip_nulls(cfg);
                        return;
                    };
                    let item_shape = shape.item();
                    for (item, k) in items.iter().zip(ck) {
                        match lk.iter().position(|x| *x == k) {
                            Some(i) => {
                                merge_object(&mut current[i], item, &item_shape, true, false)
                            }
                            None => current.push(strip_nulls(item)),
                        }
                    }
                }
                ListKind::Set => {
                    for item in items {
                        if !current.contains(item) {
                            current.push(item.clone());
                        }
                    }
                }
                ListKind::Atomic => *target = strip_nulls(cfg),
            }
        }
        other => *target = other.clone(),
    }
}

/// Removes one member path from an object (a field, a keyed list item or a
/// set value); a missing path is left alone.
fn remove_path(obj: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for el in parents {
        let next = match locate(cur, el) {
            Some(n) => n,
            None => return,
        };
        cur = next;
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(list) = cur.as_array_mut() {
        list.retain(|item| !matches_element(item, last));
    }
}

fn locate<'v>(v: &'v mut Value, el: &str) -> Option<&'v mut Value> {
    if let Some(f) = el.strip_prefix("f:") {
        return v.as_object_mut()?.get_mut(f);
    }
    let list = v.as_array_mut()?;
    list.iter_mut().find(|item| matches_element(item, el))
}

/// Whether a list item is the one a `k:`/`v:` element names. Key fields a
/// `k:` element has but the item lacks match their defaults (protocol TCP).
fn matches_element(item: &Value, el: &str) -> bool {
    if let Some(v) = el.strip_prefix("v:") {
        return serde_json::from_str::<Value>(v).is_ok_and(|want| &want == item);
    }
    let Some(k) = el.strip_prefix("k:") else {
        return false;
    };
    let Ok(want) = serde_json::from_str::<Map<String, Value>>(k) else {
        return false;
    };
    want.iter().all(|(f, wv)| match item.get(f) {
        Some(v) => v == wv,
        None => f == "protocol" && wv == "TCP",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(manager: &str, force: bool) -> ApplyRequest<'static> {
        ApplyRequest {
            manager: Box::leak(manager.to_owned().into_boxed_str()),
            api_version: "apps/v1".into(),
            force,
            shape: Shape::builtin(),
            strip_status: true,
            subresource: None,
        }
    }

    fn config(replicas: i64, labels: Value, env: Value) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": labels},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c", "image": "i", "env": env}]}}}
        })
    }

    fn managers(obj: &Value) -> Vec<(String, String)> {
        decode(obj.pointer("/metadata/managedFields"))
            .unwrap()
            .into_iter()
            .map(|e| (e.manager, e.operation))
            .collect()
    }

    #[test]
    fn user_agent_manager() {
        assert_eq!(
            manager_from_user_agent("kubectl/v1.27.3 (linux/amd64) kubernetes/25b4e43"),
            "kubectl"
        );
        assert_eq!(
            manager_from_user_agent("OpenAPI-Generator/31.0.0/python"),
            "OpenAPI-Generator"
        );
        assert_eq!(manager_from_user_agent(&"x".repeat(300)).len(), 128);
    }

    #[test]
    fn apply_create_then_update_conflicts_and_force_moves_ownership() {
        let cfg = config(
            2,
            json!({"app": "web"}),
            json!([{"name": "A", "value": "1"}]),
        );
        let live = apply_create(&cfg, &req("kubectl", false));
        assert_eq!(managers(&live), vec![("kubectl".into(), "Apply".into())]);
        let fv1 = &live["metadata"]["managedFields"][0]["fieldsV1"];
        assert_eq!(fv1["f:spec"]["f:replicas"], json!({}));
        assert!(
            fv1["f:metadata"].get("f:name").is_none(),
            "name is stripped"
        );

        // Another manager scales to 5 through an update.
        let mut scaled = live.clone();
        scaled["spec"]["replicas"] = json!(5);
        record_update(
            Some(&live),
            &mut scaled,
            "kubectl-scale",
            "apps/v1",
            Some("scale"),
            &Shape::builtin(),
        );
        let entries = decode(scaled.pointer("/metadata/managedFields")).unwrap();
        assert_eq!(entries.len(), 2);
        assert!(
            !entries[0]
                .fields
                .contains(&["f:spec".into(), "f:replicas".into()])
        );
        assert!(
            entries[1]
                .fields
                .contains(&["f:spec".into(), "f:replicas".into()])
        );

        // Re-applying replicas 2 conflicts.
        let err = apply(&scaled, &cfg, &req("kubectl", false)).unwrap_err();
        let msg = err.to_string();
        assert_eq!(
            msg,
            "Apply failed with 1 conflict: conflict with \"kubectl-scale\" with subresource \"scale\" using apps/v1: .spec.replicas"
        );
        let status = err.to_status();
        assert_eq!(status["code"], 409);
        assert_eq!(status["reason"], "Conflict");
        assert_eq!(
            status["details"]["causes"][0]["reason"],
            "FieldManagerConflict"
        );
        assert_eq!(status["details"]["causes"][0]["field"], ".spec.replicas");

        // The same value is no conflict: shared ownership.
        let mut same = cfg.clone();
        same["spec"]["replicas"] = json!(5);
        let shared = apply(&scaled, &same, &req("kubectl", false)).unwrap();
        let e = decode(shared.pointer("/metadata/managedFields")).unwrap();
        assert!(
            e.iter()
                .all(|e| e.fields.contains(&["f:spec".into(), "f:replicas".into()]))
        );

        // Force: value back to 2, the scaler loses the field (and its entry).
        let forced = apply(&scaled, &cfg, &req("kubectl", true)).unwrap();
        assert_eq!(forced["spec"]["replicas"], 2);
        assert_eq!(managers(&forced), vec![("kubectl".into(), "Apply".into())]);
    }

    #[test]
    fn fields_no_longer_applied_are_removed_unless_owned_elsewhere() {
        let cfg = config(
            2,
            json!({"app": "web", "tier": "x"}),
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]),
        );
        let live = apply_create(&cfg, &req("kubectl", false));
        // kubectl label adds a label through a patch (another manager).
        let mut labelled = live.clone();
        labelled["metadata"]["labels"]["extra"] = json!("yes");
        record_update(
            Some(&live),
            &mut labelled,
            "kubectl-label",
            "apps/v1",
            None,
            &Shape::builtin(),
        );
        let smaller = config(
            2,
            json!({"app": "web"}),
            json!([{"name": "A", "value": "1"}]),
        );
        let out = apply(&labelled, &smaller, &req("kubectl", false)).unwrap();
        assert_eq!(
            out["metadata"]["labels"],
            json!({"app": "web", "extra": "yes"})
        );
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][0]["env"],
            json!([{"name": "A", "value": "1"}])
        );
    }

    #[test]
    fn disjoint_managers_keep_their_fields_and_same_field_conflicts() {
        let cm = |data: Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": data});
        let mut r = req("a", false);
        r.api_version = "v1".into();
        let live = apply_create(&cm(json!({"x": "1"})), &r);
        let mut rb = req("b", false);
        rb.api_version = "v1".into();
        let both = apply(&live, &cm(json!({"y": "2"})), &rb).unwrap();
        assert_eq!(both["data"], json!({"x": "1", "y": "2"}));
        // a re-applies its own field only: b's stays.
        let again = apply(&both, &cm(json!({"x": "3"})), &r).unwrap();
        assert_eq!(again["data"], json!({"x": "3", "y": "2"}));
        let err = apply(&again, &cm(json!({"x": "4"})), &rb).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 1 conflict: conflict with \"a\": .data.x"
        );
        // An identical re-apply keeps the entry's time (no spurious write).
        let same = apply(&again, &cm(json!({"x": "3"})), &r).unwrap();
        assert_eq!(same, again);
    }

    #[test]
    fn client_sent_managed_fields_are_taken_when_valid_and_reset_by_an_empty_entry() {
        let cfg = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"x": "1"}});
        let mut r = req("a", false);
        r.api_version = "v1".into();
        let live = apply_create(&cfg, &r);
        // Rewriting ownership (what kubectl's CSA→SSA migration does).
        let mut moved = live.clone();
        moved["metadata"]["managedFields"][0]["manager"] = json!("b");
        record_update(
            Some(&live),
            &mut moved,
            "kubectl",
            "v1",
            None,
            &Shape::builtin(),
        );
        assert_eq!(managers(&moved), vec![("b".into(), "Apply".into())]);
        // Invalid ones are ignored.
        let mut bad = live.clone();
        bad["metadata"]["managedFields"] = json!([{"manager": "z", "operation": "Bogus"}]);
        record_update(
            Some(&live),
            &mut bad,
            "kubectl",
            "v1",
            None,
            &Shape::builtin(),
        );
        assert_eq!(managers(&bad), vec![("a".into(), "Apply".into())]);
        // `[]` keeps them, `[{}]` strips them.
        let mut empty = live.clone();
        empty["metadata"]["managedFields"] = json!([]);
        record_update(
            Some(&live),
            &mut empty,
            "kubectl",
            "v1",
            None,
            &Shape::builtin(),
        );
        assert_eq!(managers(&empty), vec![("a".into(), "Apply".into())]);
        let mut reset = live.clone();
        reset["metadata"]["managedFields"] = json!([{}]);
        record_update(
            Some(&live),
            &mut reset,
            "kubectl",
            "v1",
            None,
            &Shape::builtin(),
        );
        assert!(reset["metadata"].get("managedFields").is_none());
    }

    #[test]
    fn kubectl_apply_over_client_side_apply_forces_unchanged_last_applied_fields() {
        let mut r = req("kubectl", false);
        r.api_version = "v1".into();
        let last = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"x": "1", "y": "1"}});
        let mut live = last.clone();
        live["metadata"]["annotations"] = json!({LAST_APPLIED: last.to_string()});
        let before = json!({"metadata": {}});
        record_update(
            Some(&before),
            &mut live,
            "kubectl-client-side-apply",
            "v1",
            None,
            &Shape::builtin(),
        );
        // x still has its last-applied value: kubectl takes it over.
        let cfg = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"x": "2", "y": "1"}});
        let out = apply(&live, &cfg, &r).unwrap();
        assert_eq!(out["data"]["x"], "2");
        let synced: Value = serde_json::from_str(
            out["metadata"]["annotations"][LAST_APPLIED]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(synced["data"]["x"], "2", "annotation follows the apply");
        // Another manager name gets the conflict.
        let other = req("other", false);
        let err = apply(&live, &cfg, &other).unwrap_err();
        assert!(
            err.to_string()
                .contains("conflict with \"kubectl-client-side-apply\" using v1: .data.x"),
            "{err}"
        );
        // A value changed out of band since the client-side apply conflicts.
        let mut drifted = live.clone();
        drifted["data"]["x"] = json!("9");
        record_update(
            Some(&live),
            &mut drifted,
            "kubectl-client-side-apply",
            "v1",
            None,
            &Shape::builtin(),
        );
        assert!(apply(&drifted, &cfg, &r).is_err());
    }

    #[test]
    fn a_status_apply_touches_and_owns_status_only() {
        let live = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"nodeName": "a"}, "status": {"phase": "Pending"}});
        let mut r = req("kubelet", false);
        r.api_version = "v1".into();
        r.strip_status = false;
        r.subresource = Some("status");
        let cfg = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"nodeName": "b"}, "status": {"phase": "Running"}});
        let out = apply(&live, &cfg, &r).unwrap();
        assert_eq!(out["spec"]["nodeName"], "a");
        assert_eq!(out["status"]["phase"], "Running");
        let e = &out["metadata"]["managedFields"][0];
        assert_eq!(e["subresource"], "status");
        assert_eq!(e["fieldsV1"], json!({"f:status": {"f:phase": {}}}));
    }
}
