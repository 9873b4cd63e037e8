use std::path::PathBuf;

/// Everything that can go wrong in the dataplane, with enough context for
/// the user to act on it.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "the eBPF object is not embedded in this binary and SKEP_EBPF_OBJECT is not set; \
         run `cargo xtask build-ebpf` and rebuild (or point SKEP_EBPF_OBJECT at the object)"
    )]
    ObjectMissing,
    #[error("cannot read eBPF object {path}: {source}")]
    ObjectRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF object failed: {0}")]
    Load(String),
    #[error("program `{0}` is not in the eBPF object (is the object older than this binary?)")]
    ProgramNotFound(&'static str),
    #[error("map `{0}` is not in the eBPF object (is the object older than this binary?)")]
    MapNotFound(&'static str),
    #[error("program `{program}` failed the verifier or could not be loaded: {detail}")]
    ProgramLoad {
        program: &'static str,
        detail: String,
    },
    #[error("attaching `{program}` to {iface} failed: {detail}")]
    Attach {
        program: &'static str,
        iface: String,
        detail: String,
    },
    #[error("interface `{0}` does not exist in this network namespace")]
    NoSuchInterface(String),
    #[error("map `{map}` operation failed: {detail}")]
    Map { map: &'static str, detail: String },
    #[error("network namespace `{name}`: {action} failed: {source}")]
    NetNs {
        name: String,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid load balancer configuration: {0}")]
    Config(String),
    #[error(
        "no room for more {what} (limit {limit}); raise the limit in the load balancer settings"
    )]
    Full { what: &'static str, limit: u32 },
    #[error("bpffs pin {path}: {detail}")]
    Pin { path: PathBuf, detail: String },
    #[error(
        "pinned map {path} has {pinned} entries but the settings ask for {wanted}; \
         either use the old settings or remove {path} (existing connections through it will break)"
    )]
    PinnedMismatch {
        path: PathBuf,
        pinned: u32,
        wanted: u32,
    },
    #[error("this needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF); run it as root")]
    NotRoot,
}
