//! skep's Kubernetes-compatible API server.
//!
//! Objects are JSON documents in the [`skep_store::Store`], under
//! kube-apiserver's keys; the store revision is their resourceVersion.
//! `server` does TLS, authentication and routing; `api` the resource
//! operations; `watch` the streaming watches; `discovery`, `table`,
//! `patch`, `selectors`, `validation` and `defaults` the Kubernetes
//! semantics around them.

pub mod allocators;
pub mod api;
pub mod apply;
pub mod cert_reload;
pub mod console;
pub mod crd;
pub mod defaults;
pub mod discovery;
pub mod fieldset;
pub mod flows_relay;
pub mod health;
pub mod heap;
pub mod lifecycle;
pub mod metrics_api;
pub mod namespace_cache;
pub mod node_proxy;
pub mod objects;
pub mod openapi;
pub mod openapi_schemas;
pub mod openapi_v2;
pub mod patch;
pub mod pki;
pub mod pod_admission;
pub mod prometheus;
pub mod protobuf;
pub mod rbac;
pub mod resources;
pub mod reviews;
pub mod routes;
pub mod selectors;
pub mod server;
pub mod status;
pub mod strict;
pub mod table;
pub mod tokens;
pub mod validation;
pub mod watch;

pub use server::{ServerConfig, ServerHandle, serve};
