//! The resource operations: create, get, update, patch, delete, list. HTTP
//! plumbing lives in `server`; streaming watches in `watch`.

use crate::{
    allocators, crd, defaults, objects,
    resources::{Registry, ResourceInfo},
    routes::ResourceRoute,
    selectors::{FieldSelector, LabelSelector, supported_fields},
    status::{ApiError, Cause, from_store},
    validation,
};
use base64::Engine;
use bytes::Bytes;
use serde_json::{Value, json};
use skep_store::{ListRequest, Store, StoreError};
use std::{collections::HashMap, sync::Arc};

/// Shared state of the API server.
#[derive(Debug)]
pub struct Api {
    pub store: Arc<dyn Store>,
    pub registry: Registry,
    /// Address clients reach the server at (for `/api` discovery).
    pub server_address: String,
    /// The global-default PriorityClass, looked up at most once a second.
    pub(crate) default_priority: crate::pod_admission::DefaultClassCache,
    /// Namespaces known to accept new objects (see `namespace_cache`).
    namespaces: Arc<crate::namespace_cache::NamespaceCache>,
}

/// Query parameters of a request.
pub type Query = HashMap<String, String>;

/// A boolean query parameter: Go clients send `true`/`1`, the Python client
/// `True`.
pub fn flag(query: &Query, name: &str) -> bool {
    query
        .get(name)
        .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Body content types the server decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let base = ct.split(';').next().unwrap_or("").trim();
        match base {
            "application/json-patch+json" => Some(Self::Json),
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Decodes a JSON (or YAML) request body into an object.
pub fn decode_body(body: &[u8], content_type: &str) -> Result<Value, ApiError> {
    let base = content_type.split(';').next().unwrap_or("").trim();
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the request body is empty; an object was expected",
        ));
    }
    match base {
        "application/yaml" | "application/apply-patch+yaml" => {
            serde_yaml::from_slice::<Value>(body).map_err(|e| {
                ApiError::bad_request(format!("the request body is not valid YAML: {e}"))
            })
        }
        crate::protobuf::CONTENT_TYPE => crate::protobuf::decode(body).map_err(|e| {
            ApiError::bad_request(format!(
                "the protobuf request body could not be decoded: {e}"
            ))
        }),
        _ => serde_json::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}"))),
    }
}

fn random_suffix() -> String {
    use rand::Rng;
    // kube's alphabet: no vowels (no words), no confusable characters.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::thread_rng();
    (0..5)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Continue tokens: the list's revision and the next key, opaque to clients.
fn encode_continue(rev: i64, next_key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"rv": rev, "start": next_key}).to_string())
}

fn decode_continue(token: &str) -> Result<(i64, String), ApiError> {
    let bad =
        || ApiError::bad_request("continue key is not valid: it was not issued by this server");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    Ok((
        v.get("rv").and_then(Value::as_i64).ok_or_else(bad)?,
        v.get("start")
            .and_then(Value::as_str)
            .ok_or_else(bad)?
            .to_owned(),
    ))
}

/// Filters parsed from a list/watch request.
#[derive(Debug, Clone)]
pub struct Filters {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filters {
    pub fn from_query(info: &ResourceInfo, q: &Query) -> Result<Self, ApiError> {
        let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
            .map_err(|e| ApiError::bad_request(format!("invalid labelSelector: {e}")))?;
        let fields = FieldSelector::parse(
            q.get("fieldSelector").map_or("", String::as_str),
            supported_fields(&info.group, &info.plural),
        )
        .map_err(|e| ApiError::bad_request(format!("invalid fieldSelector: {e}")))?;
        Ok(Self { labels, fields })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches_object(obj) && self.fields.matches(obj)
    }
}

/// The result of a list.
#[derive(Debug)]
pub struct ListResult {
    pub items: Vec<Value>,
    pub revision: i64,
    pub continue_token: Option<String>,
}

impl Api {
    pub fn new(store: Arc<dyn Store>, server_address: String) -> Self {
        Self {
            store,
            registry: Registry::builtin(),
            server_address,
            default_priority: Default::default(),
            namespaces: Default::default(),
        }
    }

    /// Tells the namespace cache about a write to a namespace.
    fn wrote(&self, info: &ResourceInfo, name: &str, revision: i64) {
        if info.group.is_empty() && info.plural == "namespaces" {
            self.namespaces.wrote(name, revision);
        }
    }

    fn not_found(info: &ResourceInfo, name: &str) -> ApiError {
        ApiError::NotFound {
            resource: info.group_resource(),
            name: name.to_owned(),
        }
    }

    /// Reads one object with its store revision.
    pub async fn read(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
    ) -> Result<(Value, i64), ApiError> {
        let key = info.key(ns, name);
        let kv = self
            .store
            .get(&key)
            .await
            .map_err(|e| from_store(e, &info.group_resource(), name))?
            .ok_or_else(|| Self::not_found(info, name))?;
        Ok((objects::from_kv(&kv)?, kv.mod_revision))
    }

    pub async fn get(&self, r: &ResourceRoute) -> Result<Value, ApiError> {
        let name = r.name.as_deref().unwrap_or("");
        let (obj, _) = self.read(&r.info, r.namespace.as_deref(), name).await?;
        match r.subresource.as_deref() {
            Some("scale") => Ok(scale_of(&r.info, &obj)),
            _ => Ok(obj),
        }
    }

    async fn namespace_must_accept(&self, ns: &str) -> Result<(), ApiError> {
        if self.namespaces.accepts(&self.store, ns) {
            return Ok(());
        }
        let Some(nsinfo) = self.registry.lookup("", "v1", "namespaces") else {
            return Ok(());
        };
        match self.read(&nsinfo, None, ns).await {
            Ok((obj, _)) => {
                if obj
                    .pointer("/metadata/deletionTimestamp")
                    .is_some_and(|v| !v.is_null())
                {
                    return Err(ApiError::Forbidden {
                        message: format!(
                            "unable to create new content in namespace {ns} because it is being terminated"
                        ),
                    });
                }
                Ok(())
            }
            Err(ApiError::NotFound { .. }) => Err(ApiError::NotFound {
                resource: "namespaces".into(),
                name: ns.to_owned(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Checks apiVersion/kind of a body against the resource, filling them
    /// in when absent.
    fn check_type(info: &ResourceInfo, obj: &mut Value) -> Result<(), ApiError> {
        let m = obj
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))?;
        let want_av = info.api_version();
        match m.get("kind").and_then(Value::as_str) {
            None | Some("") => {
                m.insert("kind".into(), json!(info.kind));
            }
            Some(k) if k == info.kind => {}
            Some(k) => {
                return Err(ApiError::bad_request(format!(
                    "the body of the request was of kind {k:?}, but the URL addresses {} ({})",
                    info.plural, info.kind
                )));
            }
        }
        match m.get("apiVersion").and_then(Value::as_str) {
            None | Some("") => {
                m.insert("apiVersion".into(), json!(want_av));
            }
            Some(av) if av == want_av => {}
            // Another version of the same group (autoscaling/v1 vs v2):
            // served as the URL's version.
            Some(av) if av.split('/').next() == want_av.split('/').next() && av.contains('/') => {
                m.insert("apiVersion".into(), json!(want_av));
            }
            Some(av) => {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({av}) does not match the expected API version ({want_av})"
                )));
            }
        }
        Ok(())
    }

    fn validate(info: &ResourceInfo, obj: &Value, name: &str) -> Result<(), ApiError> {
        let mut causes = Vec::new();
        validation::metadata(info, obj, &mut causes);
        validation::spec(info, obj, &mut causes);
        if causes.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(&info.kind, name, causes))
        }
    }

    /// CRDs get their status; custom objects are validated, pruned and
    /// defaulted against their schema (`fieldValidation=Strict` turns
    /// unknown fields into errors instead of pruning them).
    fn custom_checks(
        info: &ResourceInfo,
        obj: &mut Value,
        name: &str,
        query: &Query,
    ) -> Result<(), ApiError> {
        if crd::is_crd(info) {
            let mut causes = Vec::new();
            crd::validate_definition(obj, &mut causes);
            if !causes.is_empty() {
                return Err(ApiError::invalid(
                    "CustomResourceDefinition.apiextensions.k8s.io",
                    name,
                    causes,
                ));
            }
            crd::set_status(obj);
            return Ok(());
        }
        let mode = crate::strict::Mode::of(query);
        let Some(schema) = &info.schema else {
            let av = obj
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            if let Err(unknown) = crate::strict::check_built_in(&av, &info.kind, obj, mode) {
                let list: Vec<String> = unknown
                    .iter()
                    .map(|f| format!("unknown field \"{f}\""))
                    .collect();
                return Err(ApiError::bad_request(format!(
                    "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
                    info.kind,
                    info.api_version(),
                    info.kind,
                    list.join(", ")
                )));
            }
            return Ok(());
        };
        let unknown = if mode == crate::strict::Mode::Strict {
            crd::Unknown::Strict
        } else {
            crd::Unknown::Prune
        };
        let mut causes = Vec::new();
        let pruned = crd::validate_object(schema, obj, unknown, &mut causes);
        if !pruned.is_empty() {
            tracing::debug!(kind = %info.kind, %name, ?pruned, "unknown fields pruned");
            if mode == crate::strict::Mode::Warn {
                for p in &pruned {
                    crate::strict::warn(format!("unknown field \"{p}\""));
                }
            }
        }
        if causes.is_empty() {
            Ok(())
        } else {
            Err(crd::invalid(info, name, causes))
        }
    }

    pub async fn create(
        &self,
        r: &ResourceRoute,
        obj: Value,
        query: &Query,
    ) -> Result<Value, ApiError> {
        self.create_tracked(r, obj, query, true).await
    }

    /// A create; `track` records the creator's `Update` managedFields entry
    /// (false when a server-side apply has already set its own).
    async fn create_tracked(
        &self,
        r: &ResourceRoute,
        mut obj: Value,
        query: &Query,
        track: bool,
    ) -> Result<Value, ApiError> {
        let info = &r.info;
        Self::check_type(info, &mut obj)?;
        let ns = if info.namespaced {
            let url_ns = r.namespace.clone().ok_or_else(|| {
                ApiError::bad_request(format!("{} must be created in a namespace", info.plural))
            })?;
            let meta = objects::metadata_mut(&mut obj)?;
            match meta.get("namespace").and_then(Value::as_str) {
                Some(n) if !n.is_empty() && n != url_ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {
                    meta.insert("namespace".into(), json!(url_ns));
                }
            }
            Some(url_ns)
        } else {
            objects::metadata_mut(&mut obj)?.remove("namespace");
            None
        };
        let meta = objects::metadata_mut(&mut obj)?;
        let given_name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let generate = meta
            .get("generateName")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if given_name.is_empty() && generate.is_empty() {
            return Err(ApiError::invalid(
                &info.kind,
                "",
                vec![Cause::required("metadata.name")],
            ));
        }
        // Server-managed fields a client cannot set.
        meta.remove("resourceVersion");
        meta.remove("deletionTimestamp");
        meta.remove("deletionGracePeriodSeconds");
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert("creationTimestamp".into(), json!(objects::now_rfc3339()));
        if obj.get("spec").is_some() {
            objects::metadata_mut(&mut obj)?.insert("generation".into(), json!(1));
        }
        defaults::apply(&info.group, &info.plural, &mut obj);

        if let Some(ns) = &ns {
            self.namespace_must_accept(ns).await?;
        }
        if info.group.is_empty() && info.plural == "pods" {
            crate::pod_admission::admit(self, &mut obj).await?;
        }
        let dry_run = query.get("dryRun").is_some_and(|v| v == "All");

        for _attempt in 0..8 {
            let name = if given_name.is_empty() {
                format!("{generate}{}", random_suffix())
            } else {
                given_name.clone()
            };
            let mut candidate = obj.clone();
            objects::metadata_mut(&mut candidate)?.insert("name".into(), json!(name));
            Self::custom_checks(info, &mut candidate, &name, query)?;
            if track {
                crate::apply::record_update(
                    None,
                    &mut candidate,
                    &crate::apply::update_manager(query),
                    &info.api_version(),
                    None,
                    &crate::apply::shape_of(info),
                );
            }
            Self::validate(info, &candidate, &name)?;
            let key = info.key(ns.as_deref(), &name);
            // An existing name is reported as such before anything is
            // allocated for the new object (the create below stays the
            // atomic check, and the only one where nothing is allocated:
            // a read before every pod or event create would cost a store
            // round trip each).
            if !given_name.is_empty()
                && allocators::allocates(info)
                && self
                    .store
                    .get(&key)
                    .await
                    .map_err(|e| from_store(e, &info.group_resource(), &name))?
                    .is_some()
            {
                return Err(ApiError::AlreadyExists {
                    resource: info.group_resource(),
                    name,
                });
            }
            let allocated = if !dry_run {
                allocators::on_create(self, info, &mut candidate).await?
            } else {
                Vec::new()
            };
            if dry_run {
                return Ok(candidate);
            }
            match self
                .store
                .create(&key, objects::to_stored(&candidate)?)
                .await
            {
                Ok(kv) => {
                    objects::set_resource_version(&mut candidate, kv.mod_revision);
                    if crd::is_crd(info) {
                        crd::install(self, &candidate);
                    }
                    tracing::debug!(resource = %info.group_resource(), %name, "created");
                    return Ok(candidate);
                }
                Err(StoreError::AlreadyExists { .. }) => {
                    allocators::release(self, &allocated).await;
                    if given_name.is_empty() {
                        continue;
                    }
                    return Err(ApiError::AlreadyExists {
                        resource: info.group_resource(),
                        name,
                    });
                }
                Err(e) => {
                    allocators::release(self, &allocated).await;
                    return Err(from_store(e, &info.group_resource(), &name));
                }
            }
        }
        Err(ApiError::AlreadyExists {
            resource: info.group_resource(),
            name: generate,
        })
    }

    /// Replaces an object (PUT), honouring the status/scale subresources.
    pub async fn update(
        &self,
        r: &ResourceRoute,
        body: Value,
        query: &Query,
    ) -> Result<Value, ApiError> {
        let name = r.name.clone().unwrap_or_default();
        let precondition = objects::resource_version(&body);
        let manager = Some(crate::apply::update_manager(query));
        self.write_update(r, &name, query, precondition, manager, move |_current| {
            Ok(body.clone())
        })
        .await
    }

    /// Applies a PATCH body.
    pub async fn patch(
        &self,
        r: &ResourceRoute,
        patch: Value,
        kind: PatchType,
        query: &Query,
    ) -> Result<Value, ApiError> {
        let name = r.name.clone().unwrap_or_default();
        if kind == PatchType::Apply {
            return self.apply(r, &name, patch, query).await;
        }
        let precondition = patch
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok());
        let scale = r.subresource.as_deref() == Some("scale");
        let info = r.info.clone();
        let manager = Some(crate::apply::update_manager(query));
        self.write_update(r, &name, query, precondition, manager, move |current| {
            let mut target = if scale {
                scale_of(&info, current)
            } else {
                current.clone()
            };
            match kind {
                PatchType::Json => crate::patch::json_patch(&mut target, &patch).map_err(|e| {
                    ApiError::invalid(
                        &info.kind,
                        objects::name(current),
                        vec![Cause::invalid("", e.to_string())],
                    )
                })?,
                PatchType::Merge => crate::patch::merge_patch(&mut target, &patch),
                PatchType::Strategic => crate::patch::strategic_merge(&mut target, &patch)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?,
                PatchType::Apply => {}
            }
            Ok(target)
        })
        .await
    }

    /// Server-side apply (see `apply.rs`): creates the object when missing,
    /// else merges the applied configuration with field ownership,
    /// conflicts (409 unless `force=true`) and removal of fields the
    /// manager no longer applies.
    async fn apply(
        &self,
        r: &ResourceRoute,
        name: &str,
        config: Value,
        query: &Query,
    ) -> Result<Value, ApiError> {
        let manager = query
            .get("fieldManager")
            .filter(|m| !m.is_empty())
            .cloned()
            .ok_or_else(|| {
                ApiError::bad_request(
                    "PATCH with apply-patch requires a fieldManager query parameter",
                )
            })?;
        if !config.is_object() {
            return Err(ApiError::bad_request(
                "the applied configuration must be an object",
            ));
        }
        if let Some(n) = config.pointer("/metadata/name").and_then(Value::as_str)
            && n != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        let info = &r.info;
        let sub = r.subresource.as_deref();
        if sub.is_some_and(|s| s != "status") {
            return Err(ApiError::MethodNotAllowed);
        }
        let req = crate::apply::ApplyRequest {
            manager: &manager,
            api_version: info.api_version(),
            force: flag(query, "force"),
            shape: crate::apply::shape_of(info),
            strip_status: sub.is_none() && info.has_subresource("status"),
            subresource: sub,
        };
        for _attempt in 0..2 {
            match self.read(info, r.namespace.as_deref(), name).await {
                Err(ApiError::NotFound { .. }) if sub.is_none() => {
                    let mut obj = crate::apply::apply_create(&config, &req);
                    objects::metadata_mut(&mut obj)?.insert("name".into(), json!(name));
                    match self.create_tracked(r, obj, query, false).await {
                        // Created by someone else meanwhile: apply over it.
                        Err(ApiError::AlreadyExists { .. }) => continue,
                        other => return other,
                    }
                }
                Err(e) => return Err(e),
                Ok(_) => {
                    let precondition = objects::resource_version(&config);
                    return self
                        .write_update(r, name, query, precondition, None, |current| {
                            crate::apply::apply(current, &config, &req)
                        })
                        .await;
                }
            }
        }
        Err(ApiError::Conflict {
            resource: info.group_resource(),
            name: name.to_owned(),
            detail: "the object was created and deleted concurrently; try again".into(),
        })
    }

    /// The shared read-modify-write loop of PUT and PATCH: `change` maps the
    /// current object to the requested one; the write is a compare-and-swap
    /// on the revision read, retried when someone else wrote in between
    /// (unless the client pinned a resourceVersion).
    /// Read-modify-write of one object with retries on conflict: `change`
    /// gets the current object and returns the next one (or refuses).
    pub async fn update_with<F>(&self, r: &ResourceRoute, change: F) -> Result<Value, ApiError>
    where
        F: Fn(&Value) -> Result<Value, ApiError>,
    {
        let name = r.name.clone().unwrap_or_default();
        let manager = Some(crate::apply::DEFAULT_MANAGER.to_owned());
        self.write_update(r, &name, &Query::new(), None, manager, change)
            .await
    }

    async fn write_update<F>(
        &self,
        r: &ResourceRoute,
        name: &str,
        query: &Query,
        precondition: Option<i64>,
        manager: Option<String>,
        change: F,
    ) -> Result<Value, ApiError>
    where
        F: Fn(&Value) -> Result<Value, ApiError>,
    {
        let info = &r.info;
        let ns = r.namespace.as_deref();
        let sub = r.subresource.as_deref();
        let dry_run = query.get("dryRun").is_some_and(|v| v == "All");
        for _attempt in 0..16 {
            let (current, rev) = self.read(info, ns, name).await?;
            if let Some(p) = precondition
                && p != rev
            {
                return Err(ApiError::Conflict {
                    resource: info.group_resource(),
                    name: name.to_owned(),
                    detail: "the object has been modified; please apply your changes to the latest version and try again".into(),
                });
            }
            let requested = change(&current)?;
            let mut next = match sub {
                Some("status") => {
                    // Only status changes through /status.
                    let mut n = current.clone();
                    n["status"] = requested.get("status").cloned().unwrap_or(Value::Null);
                    // A status apply brings its own managedFields.
                    if manager.is_none()
                        && let Some(mf) = requested.pointer("/metadata/managedFields")
                    {
                        n["metadata"]["managedFields"] = mf.clone();
                    }
                    n
                }
                Some("scale") => {
                    let replicas = requested
                        .pointer("/spec/replicas")
                        .and_then(Value::as_i64)
                        .ok_or_else(|| {
                            ApiError::invalid("Scale", name, vec![Cause::required("spec.replicas")])
                        })?;
                    if replicas < 0 {
                        return Err(ApiError::invalid(
                            "Scale",
                            name,
                            vec![Cause::invalid(
                                "spec.replicas",
                                "must be greater than or equal to 0",
                            )],
                        ));
                    }
                    let mut n = current.clone();
                    n["spec"]["replicas"] = json!(replicas);
                    n
                }
                _ => {
                    let mut n = requested;
                    Self::check_type(info, &mut n)?;
                    // The main resource cannot change status when a status
                    // subresource exists.
                    if info.has_subresource("status") {
                        match current.get("status") {
                            Some(s) => n["status"] = s.clone(),
                            None => {
                                if let Some(m) = n.as_object_mut() {
                                    m.remove("status");
                                }
                            }
                        }
                    }
                    n
                }
            };
            if objects::name(&next) != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({}) does not match the name on the URL ({name})",
                    objects::name(&next)
                )));
            }
            // Immutable and server-managed metadata.
            {
                let cur_meta = current
                    .get("metadata")
                    .cloned()
                    .unwrap_or_else(|| json!({}));
                let meta = objects::metadata_mut(&mut next)?;
                for f in [
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "namespace",
                ] {
                    match cur_meta.get(f) {
                        Some(v) => {
                            meta.insert(f.into(), v.clone());
                        }
                        None => {
                            meta.remove(f);
                        }
                    }
                }
                meta.remove("resourceVersion");
                let generation = cur_meta.get("generation").and_then(Value::as_i64);
                match generation {
                    Some(g) => {
                        meta.insert("generation".into(), json!(g));
                    }
                    None => {
                        meta.remove("generation");
                    }
                }
            }
            defaults::apply(&info.group, &info.plural, &mut next);
            if objects::spec_part(&next) != objects::spec_part(&current) {
                let g = current
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                objects::metadata_mut(&mut next)?.insert("generation".into(), json!(g + 1));
            }
            Self::custom_checks(info, &mut next, name, query)?;
            // `None`: a server-side apply computed managedFields itself.
            if let Some(manager) = &manager {
                crate::apply::record_update(
                    Some(&current),
                    &mut next,
                    manager,
                    &info.api_version(),
                    sub,
                    &crate::apply::shape_of(info),
                );
            }
            Self::validate(info, &next, name)?;
            allocators::on_update(info, &current, &mut next)?;
            if dry_run {
                objects::set_resource_version(&mut next, rev);
                return Ok(next);
            }
            let key = info.key(ns, name);
            // Removing the last finalizer of an object being deleted
            // completes its deletion.
            let deleting = next
                .pointer("/metadata/deletionTimestamp")
                .is_some_and(|v| !v.is_null());
            if deleting && objects::finalizers(&next).is_empty() {
                match self.store.delete(&key, Some(rev)).await {
                    Ok(d) => {
                        self.wrote(info, name, d.revision);
                        objects::set_resource_version(&mut next, d.revision);
                        allocators::on_delete(self, info, &current).await;
                        return Ok(next);
                    }
                    Err(StoreError::Conflict { .. }) if precondition.is_none() => continue,
                    Err(e) => return Err(from_store(e, &info.group_resource(), name)),
                }
            }
            // A write that changes nothing is not stored (no new
            // resourceVersion, no watch event), as upstream: a re-apply of
            // the same configuration is a no-op. `current` carries its
            // resourceVersion, `next` had it removed above.
            objects::set_resource_version(&mut next, rev);
            if next == current {
                return Ok(current);
            }
            match self
                .store
                .update(&key, objects::to_stored(&next)?, rev)
                .await
            {
                Ok(kv) => {
                    self.wrote(info, name, kv.mod_revision);
                    objects::set_resource_version(&mut next, kv.mod_revision);
                    if crd::is_crd(info) {
                        crd::install(self, &next);
                    }
                    return Ok(if sub == Some("scale") {
                        scale_of(info, &next)
                    } else {
                        next
                    });
                }
                Err(StoreError::Conflict { .. }) if precondition.is_none() => continue,
                Err(e) => return Err(from_store(e, &info.group_resource(), name)),
            }
        }
        Err(ApiError::Conflict {
            resource: info.group_resource(),
            name: name.to_owned(),
            detail: "too many concurrent writers; try again".into(),
        })
    }

    /// DELETE of one object. Returns the object as last seen (with
    /// deletionTimestamp set when finalizers or graceful deletion keep it).
    pub async fn delete(
        &self,
        r: &ResourceRoute,
        options: &Value,
        query: &Query,
    ) -> Result<Value, ApiError> {
        let info = &r.info;
        let ns = r.namespace.as_deref();
        let name = r.name.clone().unwrap_or_default();
        let dry_run = query.get("dryRun").is_some_and(|v| v == "All")
            || options
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|v| v == "All"));
        let propagation = query.get("propagationPolicy").cloned().or_else(|| {
            options
                .get("propagationPolicy")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        let grace = query
            .get("gracePeriodSeconds")
            .and_then(|g| g.parse::<i64>().ok())
            .or_else(|| options.get("gracePeriodSeconds").and_then(Value::as_i64));
        for _attempt in 0..16 {
            let (mut obj, rev) = self.read(info, ns, &name).await?;
            if let Some(pre) = options.get("preconditions") {
                let uid_ok = pre
                    .get("uid")
                    .and_then(Value::as_str)
                    .is_none_or(|u| Some(u) == objects::meta_str(&obj, "uid"));
                let rv_ok = pre
                    .get("resourceVersion")
                    .and_then(Value::as_str)
                    .is_none_or(|v| v == rev.to_string());
                if !uid_ok || !rv_ok {
                    return Err(ApiError::Conflict {
                        resource: info.group_resource(),
                        name,
                        detail: "Precondition failed: the UID or resourceVersion in the precondition does not match".into(),
                    });
                }
            }
            let mut finalizers = objects::finalizers(&obj);
            match propagation.as_deref() {
                Some("Foreground") if !finalizers.iter().any(|f| f == "foregroundDeletion") => {
                    finalizers.push("foregroundDeletion".into())
                }
                Some("Orphan") if !finalizers.iter().any(|f| f == "orphan") => {
                    finalizers.push("orphan".into())
                }
                Some("Foreground" | "Orphan" | "Background") | None => {}
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "propagationPolicy {other:?} is not one of Foreground, Background, Orphan"
                    )));
                }
            }
            let already = obj
                .pointer("/metadata/deletionTimestamp")
                .is_some_and(|v| !v.is_null());
            // Pods on a node terminate gracefully: the kubelet finishes the
            // deletion once the containers are gone.
            let pod_grace = if info.group.is_empty() && info.plural == "pods" {
                let on_node = obj
                    .pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .is_some_and(|n| !n.is_empty());
                let terminal = matches!(
                    obj.pointer("/status/phase").and_then(Value::as_str),
                    Some("Succeeded" | "Failed")
                );
                let g = grace.unwrap_or_else(|| {
                    obj.pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                        .unwrap_or(30)
                });
                (on_node && !terminal && g > 0).then_some(g)
            } else {
                None
            };
            let keep = !finalizers.is_empty()
                || pod_grace.is_some()
                || (info.group.is_empty() && info.plural == "namespaces");
            if dry_run {
                return Ok(obj);
            }
            let key = info.key(ns, &name);
            if keep {
                if already && objects::finalizers(&obj) == finalizers && pod_grace.is_none() {
                    return Ok(obj);
                }
                let meta = objects::metadata_mut(&mut obj)?;
                if !already {
                    let when =
                        chrono::Utc::now() + chrono::Duration::seconds(pod_grace.unwrap_or(0));
                    meta.insert(
                        "deletionTimestamp".into(),
                        json!(when.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                    );
                    meta.insert(
                        "deletionGracePeriodSeconds".into(),
                        json!(pod_grace.unwrap_or(0)),
                    );
                }
                meta.insert("finalizers".into(), json!(finalizers));
                if info.plural == "namespaces" && info.group.is_empty() {
                    obj["status"]["phase"] = json!("Terminating");
                }
                match self
                    .store
                    .update(&key, objects::to_stored(&obj)?, rev)
                    .await
                {
                    Ok(kv) => {
                        self.wrote(info, &name, kv.mod_revision);
                        objects::set_resource_version(&mut obj, kv.mod_revision);
                        return Ok(obj);
                    }
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(from_store(e, &info.group_resource(), &name)),
                }
            }
            match self.store.delete(&key, Some(rev)).await {
                Ok(d) => {
                    self.wrote(info, &name, d.revision);
                    objects::set_resource_version(&mut obj, d.revision);
                    allocators::on_delete(self, info, &obj).await;
                    return Ok(obj);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(from_store(e, &info.group_resource(), &name)),
            }
        }
        Err(ApiError::Conflict {
            resource: info.group_resource(),
            name,
            detail: "too many concurrent writers; try again".into(),
        })
    }

    /// LIST with selectors and pagination. `limit` 0 means everything.
    pub async fn list(&self, r: &ResourceRoute, query: &Query) -> Result<ListResult, ApiError> {
        let filters = Filters::from_query(&r.info, query)?;
        let (items, revision, continue_token) = self
            .list_with(r, query, |kv| {
                let obj = objects::from_kv(kv)?;
                Ok(filters.matches(&obj).then_some(obj))
            })
            .await?;
        Ok(ListResult {
            items,
            revision,
            continue_token,
        })
    }

    /// A LIST without selectors, encoded straight from the stored bytes
    /// (no JSON tree per object): the `items` array's elements, the
    /// revision and the continue token. `None` when the request has
    /// selectors (then [`Api::list`] applies them).
    pub async fn list_encoded(
        &self,
        r: &ResourceRoute,
        query: &Query,
    ) -> Result<Option<(Vec<Bytes>, i64, Option<String>)>, ApiError> {
        let filters = Filters::from_query(&r.info, query)?;
        if !filters.labels.is_empty() || !filters.fields.is_empty() {
            return Ok(None);
        }
        let (items, revision, token) = self
            .list_with(r, query, |kv| {
                match objects::raw_with_rv(&kv.value, kv.mod_revision) {
                    Some(b) => Ok(Some(b)),
                    None => {
                        let obj = objects::from_kv(kv)?;
                        serde_json::to_vec(&obj)
                            .map(|v| Some(Bytes::from(v)))
                            .map_err(|e| ApiError::internal(e.to_string()))
                    }
                }
            })
            .await?;
        Ok(Some((items, revision, token)))
    }

    /// The paging loop shared by list flavours: `accept` maps a stored
    /// key-value to an item, or `None` to skip it.
    async fn list_with<T>(
        &self,
        r: &ResourceRoute,
        query: &Query,
        mut accept: impl FnMut(&skep_store::KeyValue) -> Result<Option<T>, ApiError>,
    ) -> Result<(Vec<T>, i64, Option<String>), ApiError> {
        let info = &r.info;
        let limit: usize = match query.get("limit") {
            Some(l) => l
                .parse()
                .map_err(|_| ApiError::bad_request(format!("limit {l:?} is not a number")))?,
            None => 0,
        };
        let prefix = info.prefix_in(r.namespace.as_deref());
        let (mut revision, mut start) = match query.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => {
                let (rev, start) = decode_continue(token)?;
                if !start.starts_with(&prefix) {
                    return Err(ApiError::bad_request(
                        "continue key does not belong to this list",
                    ));
                }
                (Some(rev), Some(start))
            }
            None => {
                let rv = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse::<i64>().ok())
                    .filter(|v| *v > 0);
                let exact = query.get("resourceVersionMatch").map(String::as_str) == Some("Exact");
                (if exact { rv } else { None }, None)
            }
        };
        let mut items = Vec::new();
        let page_size = if limit == 0 { 0 } else { (limit * 2).max(100) };
        let mut continue_token = None;
        loop {
            let page = self
                .store
                .list(ListRequest {
                    prefix: &prefix,
                    start: start.as_deref(),
                    limit: page_size,
                    revision,
                })
                .await
                .map_err(|e| match e {
                    StoreError::Compacted { .. } if query.contains_key("continue") => ApiError::Expired {
                        message: "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into(),
                    },
                    other => from_store(other, &info.group_resource(), ""),
                })?;
            revision = Some(page.revision);
            let mut stopped_at = None;
            for (i, kv) in page.items.iter().enumerate() {
                if let Some(item) = accept(kv)? {
                    items.push(item);
                    if limit != 0 && items.len() == limit {
                        stopped_at = Some(i);
                        break;
                    }
                }
            }
            if let Some(i) = stopped_at {
                let more_here = i + 1 < page.items.len();
                if more_here || page.more {
                    continue_token = Some(encode_continue(
                        page.revision,
                        &format!("{}\0", page.items[i].key),
                    ));
                }
                break;
            }
            match page.next_start() {
                Some(next) => start = Some(next),
                None => break,
            }
        }
        Ok((items, revision.unwrap_or(0), continue_token))
    }

    /// DELETE on a collection: deletes every object the selectors match.
    pub async fn delete_collection(
        &self,
        r: &ResourceRoute,
        options: &Value,
        query: &Query,
    ) -> Result<Vec<Value>, ApiError> {
        let listed = self.list(r, query).await?;
        let mut deleted = Vec::new();
        for obj in listed.items {
            let one = ResourceRoute {
                info: r.info.clone(),
                namespace: objects::namespace(&obj).map(str::to_owned),
                name: Some(objects::name(&obj).to_owned()),
                subresource: None,
            };
            match self.delete(&one, options, query).await {
                Ok(o) => deleted.push(o),
                Err(ApiError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }
}

/// The `autoscaling/v1 Scale` view of a workload.
pub fn scale_of(info: &ResourceInfo, obj: &Value) -> Value {
    let selector = obj
        .pointer("/spec/selector")
        .map(|s| crate::table::selector_string(Some(s)))
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": objects::name(obj),
            "namespace": objects::namespace(obj),
            "uid": objects::meta_str(obj, "uid"),
            "resourceVersion": objects::meta_str(obj, "resourceVersion"),
            "creationTimestamp": objects::meta_str(obj, "creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(if info.plural == "deployments" { 1 } else { 0 })},
        "status": {
            "replicas": obj.pointer("/status/replicas").and_then(Value::as_i64).unwrap_or(0),
            "selector": selector,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let t = encode_continue(42, "/registry/pods/default/b\0");
        assert_eq!(
            decode_continue(&t).unwrap(),
            (42, "/registry/pods/default/b\0".to_string())
        );
        assert!(decode_continue("not-a-token!").is_err());
    }

    #[test]
    fn patch_types() {
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchType::Merge)
        );
        assert_eq!(PatchType::from_content_type("application/json"), None);
    }
}
