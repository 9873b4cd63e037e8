//! Where the compiled eBPF object comes from: the copy embedded at build
//! time, or a file named by `SKEP_EBPF_OBJECT` (which wins, so a developer
//! can iterate on the kernel programs without relinking the binary).

use crate::DataplaneError;
use std::borrow::Cow;

static EMBEDDED: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/skep-ebpf.o"));

/// True when this binary carries the eBPF object.
pub fn is_embedded() -> bool {
    !EMBEDDED.is_empty()
}

/// The eBPF object's bytes.
pub fn bytes() -> Result<Cow<'static, [u8]>, DataplaneError> {
    if let Some(path) = std::env::var_os("SKEP_EBPF_OBJECT") {
        let path = std::path::PathBuf::from(path);
        return std::fs::read(&path)
            .map(Cow::Owned)
            .map_err(|source| DataplaneError::ObjectRead { path, source });
    }
    if EMBEDDED.is_empty() {
        return Err(DataplaneError::ObjectMissing);
    }
    Ok(Cow::Borrowed(EMBEDDED))
}
