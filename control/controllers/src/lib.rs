//! skep's controller manager: the control loops that converge the cluster
//! to the desired state stored through the API.
//!
//! The runtime is client-go's shape, in process: [`informer`]s list and
//! watch the store and keep a shared cache per resource, [`queue`]s hold
//! de-duplicated keys with rate-limited retries, and [`runner`] drives
//! level-triggered, idempotent reconcile functions. Every write goes through
//! [`skep_apiserver::api::Api`] (via [`client`]), so controllers get the
//! same validation and defaulting as any client. [`leader`] elects one
//! active controller manager per cluster with a Lease.

pub mod adoption;
pub mod client;
pub mod cron;
pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpoints;
pub mod enqueue;
pub mod error;
pub mod events;
pub mod gc;
pub mod hpa;
pub mod identity;
pub mod informer;
pub mod interpod;
pub mod job;
pub mod leader;
pub mod manager;
pub mod meta;
pub mod nodelifecycle;
pub mod own_writes;
pub mod podgc;
pub mod preemption;
pub mod pv_binder;
pub mod quantity;
pub mod queue;
pub mod replicaset;
pub mod revisions;
pub mod runner;
pub mod scheduler;
pub mod serviceaccount;
pub mod statefulset;
pub mod topology_spread;
pub mod volume_scheduling;

pub use error::Error;
pub use manager::{Manager, ManagerOptions};
