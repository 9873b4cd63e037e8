//! skep's mTLS sidecar (rustls) and its SPIFFE workload identity.
//!
//! * [`ca`], [`ca_server`]: issuing workload certificates (the server's
//!   mesh CA runs these; tests run them in process).
//! * [`identity`], [`ca_client`]: the sidecar's key, CSR, certificate and
//!   renewal over gRPC (`skep.mesh.v1.Identity`).
//! * [`sidecar`]: the inbound ([`inbound`]), outbound ([`outbound`]) and
//!   admin ([`admin`]) listeners; [`tls`] holds the mTLS configurations,
//!   [`header`] the destination-port header, [`detect`] protocol detection,
//!   [`relay`] the byte pump, [`metrics`] the Prometheus counters.
//! * [`original_dst`]: the seams to the traffic capture.
//! * [`cli`]: `skep sidecar`.

mod admin;
pub mod ca;
pub mod ca_client;
pub mod ca_server;
pub mod cli;
pub mod config;
pub mod detect;
pub mod header;
pub mod identity;
mod inbound;
pub mod mem;
pub mod metrics;
pub mod net;
pub mod original_dst;
mod outbound;
pub mod relay;
pub mod sidecar;
pub mod spiffe;
pub mod tls;

/// Generated from `proto/identity.proto`.
pub mod proto {
    #![allow(missing_debug_implementations, clippy::all)]
    tonic::include_proto!("skep.mesh.v1");
}

pub use ca::{Issued, MeshCa};
pub use config::{Mode, SidecarConfig};
pub use identity::{Certifier, IdentityStore};
pub use sidecar::{Seams, Sidecar};
/// The gRPC library of the public API (status codes in errors).
pub use tonic;
