//! skep's dataplane: the userspace half of the eBPF programs in
//! `ebpf/programs`. It finds the compiled object, loads and attaches
//! programs, reads and writes their maps, and provides the network
//! namespace plumbing that pods (and tests) are built from.
//!
//! aya types stay inside this crate; callers see skep's own types.

pub mod counter;
pub mod error;
pub mod flows;
pub mod lb;
pub mod mesh;
pub mod netns;
pub mod object;
pub mod podnet;
pub mod policy;
pub mod status;
pub(crate) mod sys;

pub use counter::{Direction, PacketCounter};
pub use error::DataplaneError;
pub use netns::NetNs;
