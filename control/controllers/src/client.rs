//! Typed-by-name access to the in-process API: every write goes through
//! [`Api`] exactly as a client's request would (validation, defaulting,
//! finalizers, allocators), minus HTTP.

use crate::error::{Error, Result};
use serde_json::{Value, json};
use skep_apiserver::{
    api::{Api, PatchType, Query},
    resources::ResourceInfo,
    routes::ResourceRoute,
};
use std::sync::Arc;

/// A resource by group, version and plural, e.g. `("apps", "v1", "deployments")`.
pub type Gvr = (&'static str, &'static str, &'static str);

pub const PODS: Gvr = ("", "v1", "pods");
pub const NODES: Gvr = ("", "v1", "nodes");
pub const NAMESPACES: Gvr = ("", "v1", "namespaces");
pub const SERVICES: Gvr = ("", "v1", "services");
pub const ENDPOINTS: Gvr = ("", "v1", "endpoints");
pub const SERVICE_ACCOUNTS: Gvr = ("", "v1", "serviceaccounts");
pub const REPLICA_SETS: Gvr = ("apps", "v1", "replicasets");
pub const DEPLOYMENTS: Gvr = ("apps", "v1", "deployments");
pub const ENDPOINT_SLICES: Gvr = ("discovery.k8s.io", "v1", "endpointslices");
pub const LEASES: Gvr = ("coordination.k8s.io", "v1", "leases");

#[derive(Debug, Clone)]
pub struct Client {
    pub api: Arc<Api>,
    /// Where events go; `None` (unit tests) records nothing.
    events: Option<crate::events::Recorder>,
}

impl Client {
    pub fn new(api: Arc<Api>) -> Self {
        Self { api, events: None }
    }

    /// This client with events posted through `recorder`.
    pub fn with_events(mut self, recorder: crate::events::Recorder) -> Self {
        self.events = Some(recorder);
        self
    }

    /// Records an event about `obj` (see [`crate::events`]); never blocks.
    pub fn event(
        &self,
        component: &'static str,
        kind_of: &'static str,
        obj: &Value,
        kind: crate::events::EventType,
        reason: &str,
        message: String,
    ) {
        if let Some(r) = &self.events {
            r.record(component, kind_of, obj, kind, reason, message);
        }
    }

    pub fn info(&self, gvr: Gvr) -> Result<Arc<ResourceInfo>> {
        self.api
            .registry
            .lookup(gvr.0, gvr.1, gvr.2)
            .ok_or_else(|| Error::UnknownResource(format!("{}/{}/{}", gvr.0, gvr.1, gvr.2)))
    }

    fn route(
        info: &Arc<ResourceInfo>,
        ns: Option<&str>,
        name: Option<&str>,
        sub: Option<&str>,
    ) -> ResourceRoute {
        ResourceRoute {
            info: info.clone(),
            namespace: if info.namespaced {
                ns.map(str::to_owned)
            } else {
                None
            },
            name: name.map(str::to_owned),
            subresource: sub.map(str::to_owned),
        }
    }

    pub async fn get_in(
        &self,
        info: &Arc<ResourceInfo>,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Value> {
        Ok(self
            .api
            .get(&Self::route(info, ns, Some(name), None))
            .await?)
    }

    pub async fn get(&self, gvr: Gvr, ns: Option<&str>, name: &str) -> Result<Value> {
        self.get_in(&self.info(gvr)?, ns, name).await
    }

    pub async fn create(&self, gvr: Gvr, ns: Option<&str>, obj: Value) -> Result<Value> {
        let info = self.info(gvr)?;
        Ok(self
            .api
            .create(&Self::route(&info, ns, None, None), obj, &Query::new())
            .await?)
    }

    /// A JSON merge patch, optionally of a subresource (`status`).
    pub async fn patch(
        &self,
        gvr: Gvr,
        ns: Option<&str>,
        name: &str,
        sub: Option<&str>,
        patch: Value,
    ) -> Result<Value> {
        let info = self.info(gvr)?;
        self.patch_in(&info, ns, name, sub, patch).await
    }

    pub async fn patch_in(
        &self,
        info: &Arc<ResourceInfo>,
        ns: Option<&str>,
        name: &str,
        sub: Option<&str>,
        patch: Value,
    ) -> Result<Value> {
        Ok(self
            .api
            .patch(
                &Self::route(info, ns, Some(name), sub),
                patch,
                PatchType::Merge,
                &Query::new(),
            )
            .await?)
    }

    /// A full replacement (PUT); the object's resourceVersion is the
    /// precondition.
    pub async fn update(&self, gvr: Gvr, ns: Option<&str>, obj: Value) -> Result<Value> {
        let info = self.info(gvr)?;
        let name = skep_apiserver::objects::name(&obj).to_owned();
        Ok(self
            .api
            .update(
                &Self::route(&info, ns, Some(&name), None),
                obj,
                &Query::new(),
            )
            .await?)
    }

    /// Deletes with an optional propagation policy and uid precondition
    /// (so a replacement with the same name is never deleted by mistake).
    pub async fn delete_in(
        &self,
        info: &Arc<ResourceInfo>,
        ns: Option<&str>,
        name: &str,
        propagation: Option<&str>,
        uid: Option<&str>,
    ) -> Result<Value> {
        let mut options = json!({});
        if let Some(p) = propagation {
            options["propagationPolicy"] = json!(p);
        }
        if let Some(u) = uid {
            options["preconditions"] = json!({"uid": u});
        }
        Ok(self
            .api
            .delete(
                &Self::route(info, ns, Some(name), None),
                &options,
                &Query::new(),
            )
            .await?)
    }

    pub async fn delete(
        &self,
        gvr: Gvr,
        ns: Option<&str>,
        name: &str,
        uid: Option<&str>,
    ) -> Result<Value> {
        let info = self.info(gvr)?;
        self.delete_in(&info, ns, name, None, uid).await
    }

    /// Deletes at once, without a grace period (`--force --grace-period=0`).
    pub async fn force_delete(
        &self,
        gvr: Gvr,
        ns: Option<&str>,
        name: &str,
        uid: Option<&str>,
    ) -> Result<Value> {
        let info = self.info(gvr)?;
        let mut options = json!({"gracePeriodSeconds": 0});
        if let Some(u) = uid {
            options["preconditions"] = json!({"uid": u});
        }
        Ok(self
            .api
            .delete(
                &Self::route(&info, ns, Some(name), None),
                &options,
                &Query::new(),
            )
            .await?)
    }

    /// `pods/binding`.
    pub async fn bind(&self, ns: &str, pod: &str, node: &str) -> Result<()> {
        let info = self.info(PODS)?;
        let route = Self::route(&info, Some(ns), Some(pod), Some("binding"));
        let binding = json!({"apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": pod, "namespace": ns},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
        skep_apiserver::reviews::bind(&self.api, &route, binding).await?;
        Ok(())
    }
}

/// Treats NotFound as success (the object is already gone).
pub fn ignore_not_found<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}
