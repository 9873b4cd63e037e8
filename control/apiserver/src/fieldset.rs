//! Field sets as server-side apply tracks them (structured-merge-diff's
//! `fieldpath.Set`, serialized as `FieldsV1`).
//!
//! A set is a tree of path elements: `f:<name>` for a field of a struct or
//! map, `k:{"name":"x"}` for an item of a list merged by key(s), `v:<json>`
//! for a value of a set-like list of scalars, and `.` inside a node's
//! children meaning "the node itself". Atomic lists and atomic maps are
//! owned as one leaf.
//!
//! The list shapes come from the object's type: for built-in kinds the same
//! merge-key table strategic merge uses (`patch.rs`), with upstream's
//! composite keys (container ports by containerPort+protocol); for custom
//! resources the CRD schema's `x-kubernetes-list-type` /
//! `x-kubernetes-list-map-keys` / `x-kubernetes-map-type`.

use serde_json::{Map, Value};
use std::{collections::BTreeMap, sync::Arc};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FieldSetError {
    #[error("fieldsV1 must be a JSON object, found {0}")]
    NotAnObject(String),
    #[error("fieldsV1 has an invalid path element {0:?}")]
    BadElement(String),
}

/// A set of field paths. The root node's `this` is unused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSet {
    /// The path leading to this node is itself a member.
    this: bool,
    children: BTreeMap<String, FieldSet>,
}

impl FieldSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// True when no path is a member.
    pub fn is_empty(&self) -> bool {
        self.children.values().all(|c| !c.this && c.is_empty())
    }

    /// Adds one path (a sequence of `f:`/`k:`/`v:` elements).
    pub fn insert(&mut self, path: &[String]) {
        if path.is_empty() {
            return;
        }
        self.node_at(path).this = true;
    }

    /// The node at `path`, created if missing (an element is copied only
    /// when its node is new: this runs for every member of every write).
    fn node_at(&mut self, path: &[String]) -> &mut FieldSet {
        let mut node = self;
        for el in path {
            if !node.children.contains_key(el) {
                node.children.insert(el.clone(), FieldSet::default());
            }
            node = match node.children.get_mut(el) {
                Some(n) => n,
                // Inserted just above.
                None => unreachable!("field set node inserted above"),
            };
        }
        node
    }

    /// Adds the members of `sub` (a subtree built for the value at `path`;
    /// its `this` says whether `path` itself is a member).
    fn insert_subtree(&mut self, path: &[String], sub: FieldSet) {
        if !sub.this && sub.children.is_empty() {
            return;
        }
        let at = if path.is_empty() {
            self
        } else {
            self.node_at(path)
        };
        at.this |= sub.this && !path.is_empty();
        at.merge(sub.children);
    }

    /// Moves `children` in (no copies where a node is new here).
    fn merge(&mut self, children: BTreeMap<String, FieldSet>) {
        if self.children.is_empty() {
            self.children = children;
            return;
        }
        for (k, c) in children {
            match self.children.get_mut(&k) {
                Some(mine) => {
                    mine.this |= c.this;
                    mine.merge(c.children);
                }
                None => {
                    self.children.insert(k, c);
                }
            }
        }
    }

    /// A leaf member: the path leading here, nothing below.
    fn leaf() -> FieldSet {
        FieldSet {
            this: true,
            children: BTreeMap::new(),
        }
    }

    pub fn contains(&self, path: &[String]) -> bool {
        let mut node = self;
        for el in path {
            match node.children.get(el) {
                Some(n) => node = n,
                None => return false,
            }
        }
        !path.is_empty() && node.this
    }

    pub fn union(&self, other: &FieldSet) -> FieldSet {
        let mut out = self.clone();
        out.union_in_place(other);
        out
    }

    fn union_in_place(&mut self, other: &FieldSet) {
        self.this |= other.this;
        for (k, o) in &other.children {
            self.children
                .entry(k.clone())
                .or_default()
                .union_in_place(o);
        }
    }

    pub fn intersection(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet {
            this: self.this && other.this,
            children: BTreeMap::new(),
        };
        for (k, a) in &self.children {
            if let Some(b) = other.children.get(k) {
                let i = a.intersection(b);
                if i.this || !i.children.is_empty() {
                    out.children.insert(k.clone(), i);
                }
            }
        }
        out
    }

    pub fn difference(&self, other: &FieldSet) -> FieldSet {
        let mut out = self.clone();
        out.subtract(other);
        out
    }

    /// Removes `other`'s members from `self`, dropping emptied nodes.
    pub fn subtract(&mut self, other: &FieldSet) {
        if other.this {
            self.this = false;
        }
        for (k, o) in &other.children {
            if let Some(s) = self.children.get_mut(k) {
                s.subtract(o);
                if !s.this && s.children.is_empty() {
                    self.children.remove(k);
                }
            }
        }
    }

    /// Every member path, parents before children.
    pub fn paths(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let mut prefix = Vec::new();
        self.collect_paths(&mut prefix, &mut out);
        out
    }

    fn collect_paths(&self, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        for (k, c) in &self.children {
            prefix.push(k.clone());
            if c.this {
                out.push(prefix.clone());
            }
            c.collect_paths(prefix, out);
            prefix.pop();
        }
    }

    /// The `FieldsV1` JSON form.
    pub fn to_fields_v1(&self) -> Value {
        let mut m = Map::new();
        for (k, c) in &self.children {
            if !c.this && c.is_empty() {
                continue;
            }
            m.insert(k.clone(), c.node_json());
        }
        Value::Object(m)
    }

    fn node_json(&self) -> Value {
        let mut m = Map::new();
        if self.this && !self.children.is_empty() {
            m.insert(".".into(), Value::Object(Map::new()));
        }
        for (k, c) in &self.children {
            if !c.this && c.is_empty() {
                continue;
            }
            m.insert(k.clone(), c.node_json());
        }
        Value::Object(m)
    }

    /// Parses the `FieldsV1` JSON form.
    pub fn from_fields_v1(v: &Value) -> Result<FieldSet, FieldSetError> {
        let Value::Object(m) = v else {
            return Err(FieldSetError::NotAnObject(v.to_string()));
        };
        let mut out = FieldSet::new();
        for (k, c) in m {
            check_element(k)?;
            out.children.insert(k.clone(), Self::parse_node(c)?);
        }
        Ok(out)
    }

    fn parse_node(v: &Value) -> Result<FieldSet, FieldSetError> {
        let Value::Object(m) = v else {
            return Err(FieldSetError::NotAnObject(v.to_string()));
        };
        // `{}` is a leaf member; otherwise membership is spelled `.`.
        let mut node = FieldSet {
            this: m.is_empty() || m.contains_key("."),
            children: BTreeMap::new(),
        };
        for (k, c) in m {
            if k == "." {
                continue;
            }
            check_element(k)?;
            node.children.insert(k.clone(), Self::parse_node(c)?);
        }
        Ok(node)
    }
}

fn check_element(k: &str) -> Result<(), FieldSetError> {
    let ok = match k.split_at_checked(2) {
        Some(("f:", _)) => true,
        Some(("k:", rest)) => serde_json::from_str::<Map<String, Value>>(rest).is_ok(),
        Some(("v:", rest)) => serde_json::from_str::<Value>(rest).is_ok(),
        Some(("i:", rest)) => rest.parse::<usize>().is_ok(),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(FieldSetError::BadElement(k.to_owned()))
    }
}

/// A path as upstream prints it in conflict messages:
/// `.spec.template.spec.containers[name="web"].image`.
pub fn path_string(path: &[String]) -> String {
    let mut s = String::new();
    for el in path {
        if let Some(f) = el.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = el.strip_prefix("k:") {
            let fields: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push('[');
            s.push_str(&parts.join(","));
            s.push(']');
        } else if let Some(v) = el.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        } else if let Some(i) = el.strip_prefix("i:") {
            s.push_str(&format!("[{i}]"));
        }
    }
    s
}

/// How a list is merged and owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListKind {
    /// Replaced and owned as a whole.
    Atomic,
    /// Items identified by these key fields (with defaults for absent ones).
    Map(Vec<(&'static str, Option<Value>)>),
    /// A set of scalars.
    Set,
}

/// Where in a typed object a value sits: the field names leading to it and,
/// for custom resources, its schema node.
#[derive(Clone, Debug)]
pub struct Shape<'a> {
    /// Custom resources: the schema node of this value (None below an
    /// unknown field). Built-ins: not used.
    schema: Option<&'a Value>,
    custom: bool,
    /// The innermost field name, linked to the ones above it: a child
    /// shape costs one node, not a copy of the whole path.
    path: Option<Arc<PathNode>>,
}

#[derive(Debug)]
struct PathNode {
    name: String,
    up: Option<Arc<PathNode>>,
}

impl<'a> Shape<'a> {
    /// The shape of a built-in object's root.
    pub fn builtin() -> Self {
        Self {
            schema: None,
            custom: false,
            path: None,
        }
    }

    /// The shape of a custom resource's root, from its `openAPIV3Schema`.
    pub fn custom(schema: Option<&'a Value>) -> Self {
        Self {
            schema,
            custom: true,
            path: None,
        }
    }

    /// The shape of field `name` of this object.
    pub fn field(&self, name: &str) -> Shape<'a> {
        let schema = self.schema.and_then(|s| {
            s.get("properties")
                .and_then(|p| p.get(name))
                .or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
        });
        Shape {
            schema,
            custom: self.custom,
            path: Some(Arc::new(PathNode {
                name: name.to_owned(),
                up: self.path.clone(),
            })),
        }
    }

    /// The shape of this list's items.
    pub fn item(&self) -> Shape<'a> {
        Shape {
            schema: self.schema.and_then(|s| s.get("items")),
            custom: self.custom,
            path: self.path.clone(),
        }
    }

    /// Whether this object value is owned as one leaf.
    pub fn atomic_map(&self) -> bool {
        if self.custom {
            return self
                .schema
                .and_then(|s| s.get("x-kubernetes-map-type"))
                .and_then(Value::as_str)
                == Some("atomic");
        }
        // Label selectors are atomic upstream (`f:selector: {}`); so is a
        // Service's selector map (`+mapType=atomic`).
        matches!(
            self.path.as_deref().map(|p| p.name.as_str()),
            Some("selector" | "labelSelector" | "namespaceSelector")
        )
    }

    /// How this list is merged.
    pub fn list_kind(&self) -> ListKind {
        if self.custom {
            return custom_list_kind(self.schema);
        }
        builtin_list_kind(&self.parents())
    }

    /// The field names from the root down to this value.
    fn parents(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut at = self.path.as_deref();
        while let Some(p) = at {
            out.push(p.name.clone());
            at = p.up.as_deref();
        }
        out.reverse();
        out
    }

    /// The shape of field `name` when the shape is needed: objects and
    /// lists. A scalar's shape is never consulted, so it gets a plain one.
    fn field_of(&self, name: &str, values: [Option<&Value>; 2]) -> Shape<'a> {
        if values
            .iter()
            .flatten()
            .any(|v| v.is_object() || v.is_array())
        {
            self.field(name)
        } else {
            Shape {
                schema: None,
                custom: self.custom,
                path: None,
            }
        }
    }
}

fn custom_list_kind(schema: Option<&Value>) -> ListKind {
    let Some(s) = schema else {
        return ListKind::Atomic;
    };
    match s.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => ListKind::Set,
        Some("map") => {
            let keys: Vec<(&'static str, Option<Value>)> = s
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(|k| {
                            let default = s
                                .pointer(&format!("/items/properties/{k}/default"))
                                .cloned();
                            (leak_key(k), default)
                        })
                        .collect()
                })
                .unwrap_or_default();
            if keys.is_empty() {
                ListKind::Atomic
            } else {
                ListKind::Map(keys)
            }
        }
        _ => ListKind::Atomic,
    }
}

/// Map keys of custom resources are few and fixed per CRD version; they
/// are interned so `ListKind` can stay `'static` for the built-in table.
fn leak_key(k: &str) -> &'static str {
    use std::sync::Mutex;
    static KEYS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut keys = match KEYS.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(found) = keys.iter().find(|s| **s == k) {
        return found;
    }
    let leaked: &'static str = Box::leak(k.to_owned().into_boxed_str());
    keys.push(leaked);
    leaked
}

/// The built-in merge keys: strategic merge's table (`patch.rs`) with
/// upstream's composite list-map keys where strategic merge uses one.
fn builtin_list_kind(parents: &[String]) -> ListKind {
    use crate::patch::{ListStrategy, strategy};
    let Some(field) = parents.last().map(String::as_str) else {
        return ListKind::Atomic;
    };
    let up = &parents[..parents.len() - 1];
    let tcp = || Some(Value::String("TCP".into()));
    match (field, strategy(field, up)) {
        ("ports", ListStrategy::MergeKey(k)) => ListKind::Map(vec![(k, None), ("protocol", tcp())]),
        ("topologySpreadConstraints", ListStrategy::MergeKey(_)) => {
            ListKind::Map(vec![("topologyKey", None), ("whenUnsatisfiable", None)])
        }
        ("taints", ListStrategy::MergeKey(_)) => {
            ListKind::Map(vec![("key", None), ("effect", None)])
        }
        (_, ListStrategy::MergeKey(k)) => ListKind::Map(vec![(k, None)]),
        (_, ListStrategy::PrimitiveMerge) => ListKind::Set,
        (_, ListStrategy::Replace) => ListKind::Atomic,
    }
}

/// The `k:` element of a list item, or None when the item lacks a key
/// (then the list is treated as atomic).
pub fn item_key(item: &Value, keys: &[(&'static str, Option<Value>)]) -> Option<String> {
    let obj = item.as_object()?;
    // Keys sorted by name, as structured-merge-diff serializes them.
    let mut pairs: Vec<(&str, &Value)> = Vec::with_capacity(keys.len());
    for (k, default) in keys {
        let v = obj.get(*k).filter(|v| !v.is_null()).or(default.as_ref())?;
        pairs.push((k, v));
    }
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    let mut s = String::from("k:{");
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&Value::String((*k).to_owned()).to_string());
        s.push(':');
        s.push_str(&v.to_string());
    }
    s.push('}');
    Some(s)
}

/// Keys of every item, or None when one lacks a key or two share one.
pub fn item_keys(items: &[Value], keys: &[(&'static str, Option<Value>)]) -> Option<Vec<String>> {
    let mut out = Vec::with_capacity(items.len());
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    for it in items {
        let k = item_key(it, keys)?;
        if !seen.insert(k.clone()) {
            return None;
        }
        out.push(k);
    }
    Some(out)
}

/// The `v:` element of a set item.
pub fn value_element(v: &Value) -> String {
    format!("v:{v}")
}

/// Whether `key` below `prefix` is a server-owned metadata field.
fn ignored(prefix: &[String], key: &str) -> bool {
    Place::of(prefix).ignores(key)
}

/// The fields a value sets (an applied configuration's set): every leaf,
/// every keyed list item (`.`), every set value; null fields are "not
/// specified".
pub fn of_value(v: &Value, shape: &Shape) -> FieldSet {
    subtree(v, shape, Place::Root)
}

fn collect(v: &Value, shape: &Shape, prefix: &[String], out: &mut FieldSet) {
    out.insert_subtree(prefix, subtree(v, shape, Place::of(prefix)));
}

fn collect_item_fields(item: &Value, shape: &Shape, prefix: &[String], out: &mut FieldSet) {
    out.insert_subtree(prefix, item_fields(item, shape));
}

/// Where a value sits, as far as the server-owned metadata fields care.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Root,
    Metadata,
    Other,
}

impl Place {
    fn of(prefix: &[String]) -> Place {
        match prefix {
            [] => Place::Root,
            [m] if m == "f:metadata" => Place::Metadata,
            _ => Place::Other,
        }
    }

    fn child(self, key: &str) -> Place {
        match (self, key) {
            (Place::Root, "metadata") => Place::Metadata,
            _ => Place::Other,
        }
    }

    /// Metadata fields the server owns; never part of any manager's set
    /// (structured-merge-diff's "strip meta" list).
    fn ignores(self, key: &str) -> bool {
        match self {
            Place::Root => matches!(key, "apiVersion" | "kind"),
            Place::Metadata => matches!(
                key,
                "name"
                    | "namespace"
                    | "creationTimestamp"
                    | "selfLink"
                    | "uid"
                    | "generation"
                    | "managedFields"
                    | "resourceVersion"
                    | "deletionTimestamp"
                    | "deletionGracePeriodSeconds"
            ),
            Place::Other => false,
        }
    }
}

/// The members a value sets, built from the leaves up (every member path
/// element is made once): its `this` says whether the value's own path is
/// a member (a leaf, an atomic value), its children the members below.
fn subtree(v: &Value, shape: &Shape, place: Place) -> FieldSet {
    match v {
        Value::Object(m) if !m.is_empty() && (place == Place::Root || !shape.atomic_map()) => {
            let mut node = FieldSet::new();
            for (k, c) in m {
                if c.is_null() || place.ignores(k) {
                    continue;
                }
                let child = subtree(c, &shape.field_of(k, [Some(c), None]), place.child(k));
                if child.this || !child.children.is_empty() {
                    node.children.insert(format!("f:{k}"), child);
                }
            }
            node
        }
        Value::Array(items) if !items.is_empty() => match shape.list_kind() {
            ListKind::Map(keys) => match item_keys(items, &keys) {
                Some(ks) => {
                    let item_shape = shape.item();
                    let mut node = FieldSet::new();
                    for (it, k) in items.iter().zip(ks) {
                        let mut item = item_fields(it, &item_shape);
                        item.this = true;
                        node.children.insert(k, item);
                    }
                    node
                }
                None => FieldSet::leaf(),
            },
            ListKind::Set => FieldSet {
                this: false,
                children: items
                    .iter()
                    .map(|it| (value_element(it), FieldSet::leaf()))
                    .collect(),
            },
            ListKind::Atomic => FieldSet::leaf(),
        },
        _ if place == Place::Root => FieldSet::new(),
        _ => FieldSet::leaf(),
    }
}

/// The members set by the fields of a keyed list item.
fn item_fields(item: &Value, shape: &Shape) -> FieldSet {
    let mut node = FieldSet::new();
    if let Value::Object(m) = item {
        for (k, c) in m {
            if c.is_null() {
                continue;
            }
            let child = subtree(c, &shape.field_of(k, [Some(c), None]), Place::Other);
            if child.this || !child.children.is_empty() {
                node.children.insert(format!("f:{k}"), child);
            }
        }
    }
    node
}

/// What changed from `old` to `new`: fields added or given another value,
/// and fields removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub modified: FieldSet,
    pub removed: FieldSet,
}

impl Changes {
    pub fn all(&self) -> FieldSet {
        self.modified.union(&self.removed)
    }

    pub fn is_empty(&self) -> bool {
        self.modified.is_empty() && self.removed.is_empty()
    }
}

/// Compares two versions of an object field by field. Linear in the size of
/// the objects (keyed lists are matched through a map of their keys).
pub fn changes(old: &Value, new: &Value, shape: &Shape) -> Changes {
    let mut ch = Changes::default();
    let mut prefix = Vec::new();
    diff(Some(old), Some(new), shape, &mut prefix, &mut ch);
    ch
}

fn diff(
    old: Option<&Value>,
    new: Option<&Value>,
    shape: &Shape,
    prefix: &mut Vec<String>,
    ch: &mut Changes,
) {
    let old = old.filter(|v| !v.is_null());
    let new = new.filter(|v| !v.is_null());
    match (old, new) {
        (None, None) => {}
        (None, Some(n)) => collect(n, shape, prefix, &mut ch.modified),
        (Some(o), None) => collect(o, shape, prefix, &mut ch.removed),
        (Some(o), Some(n)) if o == n => {}
        (Some(Value::Object(om)), Some(Value::Object(nm)))
            if !om.is_empty() && !nm.is_empty() && (prefix.is_empty() || !shape.atomic_map()) =>
        {
            diff_fields(om, nm, shape, prefix, ch);
        }
        (Some(Value::Array(oa)), Some(Value::Array(na))) if !oa.is_empty() && !na.is_empty() => {
            match shape.list_kind() {
                ListKind::Map(keys) => match (item_keys(oa, &keys), item_keys(na, &keys)) {
                    (Some(ok), Some(nk)) => {
                        let item_shape = shape.item();
                        let old_by_key: std::collections::HashMap<&str, &Value> =
                            ok.iter().map(String::as_str).zip(oa.iter()).collect();
                        for (k, nv) in nk.iter().zip(na) {
                            prefix.push(k.clone());
                            match old_by_key.get(k.as_str()) {
                                Some(ov) => diff_item(ov, nv, &item_shape, prefix, ch),
                                None => {
                                    ch.modified.insert(prefix);
                                    collect_item_fields(nv, &item_shape, prefix, &mut ch.modified);
                                }
                            }
                            prefix.pop();
                        }
                        let new_keys: std::collections::HashSet<&str> =
                            nk.iter().map(String::as_str).collect();
                        for (k, ov) in ok.iter().zip(oa) {
                            if new_keys.contains(k.as_str()) {
                                continue;
                            }
                            prefix.push(k.clone());
                            ch.removed.insert(prefix);
                            collect_item_fields(ov, &item_shape, prefix, &mut ch.removed);
                            prefix.pop();
                        }
                    }
                    _ => ch.modified.insert(prefix),
                },
                ListKind::Set => {
                    for nv in na {
                        if !oa.contains(nv) {
                            prefix.push(value_element(nv));
                            ch.modified.insert(prefix);
                            prefix.pop();
                        }
                    }
                    for ov in oa {
                        if !na.contains(ov) {
                            prefix.push(value_element(ov));
                            ch.removed.insert(prefix);
                            prefix.pop();
                        }
                    }
                }
                ListKind::Atomic => ch.modified.insert(prefix),
            }
        }
        (Some(o), Some(n)) => {
            // A value of another type (or an atomic one) changed: the path
            // itself is modified; what only the old value had is removed.
            let mut old_set = FieldSet::new();
            collect(o, shape, prefix, &mut old_set);
            collect(n, shape, prefix, &mut ch.modified);
            if !prefix.is_empty() {
                ch.modified.insert(prefix);
            }
            ch.removed.union_in_place(&old_set.difference(&ch.modified));
        }
    }
}

fn diff_item(old: &Value, new: &Value, shape: &Shape, prefix: &mut Vec<String>, ch: &mut Changes) {
    let empty = Map::new();
    diff_fields(
        old.as_object().unwrap_or(&empty),
        new.as_object().unwrap_or(&empty),
        shape,
        prefix,
        ch,
    );
}

/// The fields of two versions of an object (server-owned metadata fields
/// skipped), each compared with [`diff`].
fn diff_fields(
    om: &Map<String, Value>,
    nm: &Map<String, Value>,
    shape: &Shape,
    prefix: &mut Vec<String>,
    ch: &mut Changes,
) {
    for (k, nv) in nm {
        if ignored(prefix, k) {
            continue;
        }
        prefix.push(format!("f:{k}"));
        diff(
            om.get(k),
            Some(nv),
            &shape.field_of(k, [om.get(k), Some(nv)]),
            prefix,
            ch,
        );
        prefix.pop();
    }
    for (k, ov) in om {
        if nm.contains_key(k) || ignored(prefix, k) {
            continue;
        }
        prefix.push(format!("f:{k}"));
        diff(
            Some(ov),
            None,
            &shape.field_of(k, [Some(ov), None]),
            prefix,
            ch,
        );
        prefix.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(replicas: i64, image: &str) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "d", "uid": "u", "labels": {"app": "web"}},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{
                        "name": "nginx", "image": image,
                        "ports": [{"containerPort": 80}],
                        "env": [{"name": "A", "value": "1"}]
                    }]}
                }
            }
        })
    }

    #[test]
    fn applied_config_set_has_upstream_shape() {
        let set = of_value(&deployment(2, "nginx"), &Shape::builtin());
        assert_eq!(
            set.to_fields_v1(),
            json!({
                "f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {
                    "f:replicas": {},
                    "f:selector": {},
                    "f:template": {
                        "f:metadata": {"f:labels": {"f:app": {}}},
                        "f:spec": {"f:containers": {"k:{\"name\":\"nginx\"}": {
                            ".": {},
                            "f:env": {"k:{\"name\":\"A\"}": {".": {}, "f:name": {}, "f:value": {}}},
                            "f:image": {},
                            "f:name": {},
                            "f:ports": {"k:{\"containerPort\":80,\"protocol\":\"TCP\"}": {".": {}, "f:containerPort": {}}}
                        }}}
                    }
                }
            })
        );
    }

    #[test]
    fn fields_v1_round_trips_and_rejects_garbage() {
        let v = json!({"f:metadata": {"f:finalizers": {"v:\"a\"": {}, ".": {}}},
            "f:spec": {"f:containers": {"k:{\"name\":\"x\"}": {".": {}, "f:image": {}}}}});
        let s = FieldSet::from_fields_v1(&v).unwrap();
        assert_eq!(s.to_fields_v1(), v);
        assert!(s.contains(&["f:metadata".into(), "f:finalizers".into()]));
        assert!(s.contains(&["f:metadata".into(), "f:finalizers".into(), "v:\"a\"".into()]));
        assert!(!s.contains(&["f:spec".into()]));
        assert!(FieldSet::from_fields_v1(&json!({"x:y": {}})).is_err());
        assert!(FieldSet::from_fields_v1(&json!({"k:notjson": {}})).is_err());
        assert!(FieldSet::from_fields_v1(&json!([])).is_err());
    }

    #[test]
    fn set_algebra() {
        let p = |s: &str| -> Vec<String> { s.split('/').map(str::to_owned).collect() };
        let mut a = FieldSet::new();
        a.insert(&p("f:spec/f:replicas"));
        a.insert(&p("f:spec/f:paused"));
        let mut b = FieldSet::new();
        b.insert(&p("f:spec/f:replicas"));
        b.insert(&p("f:metadata/f:labels/f:x"));
        assert_eq!(a.intersection(&b).paths(), vec![p("f:spec/f:replicas")]);
        assert_eq!(a.difference(&b).paths(), vec![p("f:spec/f:paused")]);
        assert_eq!(a.union(&b).paths().len(), 3);
        assert!(a.difference(&a).is_empty());
        assert!(a.difference(&a).to_fields_v1() == json!({}));
        assert_eq!(
            path_string(&p("f:spec/f:containers/k:{\"name\":\"x\"}/f:image")),
            ".spec.containers[name=\"x\"].image"
        );
        assert_eq!(
            path_string(&p("f:metadata/f:finalizers/v:\"a\"")),
            ".metadata.finalizers[=\"a\"]"
        );
    }

    #[test]
    fn changes_are_per_field_and_by_key() {
        let old = deployment(2, "nginx");
        let mut new = deployment(5, "nginx:2");
        new["spec"]["template"]["spec"]["containers"][0]["env"] =
            json!([{"name": "B", "value": "2"}]);
        new["metadata"]["finalizers"] = json!(["f1"]);
        new["metadata"]["uid"] = json!("other");
        let ch = changes(&old, &new, &Shape::builtin());
        let c = r#"k:{"name":"nginx"}"#;
        assert_eq!(
            ch.modified.to_fields_v1(),
            json!({
                "f:metadata": {"f:finalizers": {"v:\"f1\"": {}}},
                "f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {c: {
                    "f:env": {"k:{\"name\":\"B\"}": {".": {}, "f:name": {}, "f:value": {}}},
                    "f:image": {}
                }}}}}
            })
        );
        assert_eq!(
            ch.removed.to_fields_v1(),
            json!({"f:spec": {"f:template": {"f:spec": {"f:containers": {c: {
                "f:env": {"k:{\"name\":\"A\"}": {".": {}, "f:name": {}, "f:value": {}}}
            }}}}}})
        );
        assert!(changes(&old, &old, &Shape::builtin()).is_empty());
    }

    #[test]
    fn atomic_lists_and_custom_list_types() {
        let old = json!({"spec": {"tolerations": [{"key": "a"}], "items": [{"id": 1, "v": "x"}], "tags": ["a"]}});
        let new = json!({"spec": {"tolerations": [{"key": "b"}], "items": [{"id": 1, "v": "y"}], "tags": ["a", "b"]}});
        let ch = changes(&old, &new, &Shape::builtin());
        // Built-in: tolerations and unknown lists are atomic.
        assert_eq!(
            ch.modified.to_fields_v1(),
            json!({"f:spec": {"f:items": {}, "f:tags": {}, "f:tolerations": {}}})
        );
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "items": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["id"],
                      "items": {"type": "object", "properties": {"id": {"type": "integer"}, "v": {"type": "string"}}}},
            "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
            "tolerations": {"type": "array", "items": {"type": "object"}}
        }}}});
        let ch = changes(&old, &new, &Shape::custom(Some(&schema)));
        assert_eq!(
            ch.modified.to_fields_v1(),
            json!({"f:spec": {"f:items": {"k:{\"id\":1}": {"f:v": {}}}, "f:tags": {"v:\"b\"": {}}, "f:tolerations": {}}})
        );
    }
}
