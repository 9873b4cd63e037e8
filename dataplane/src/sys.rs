//! The bpf(2) commands aya 0.14 does not expose, in one place for the load
//! balancer, the XDP policy hook and the status reader:
//! - BPF_MAP_UPDATE_BATCH writes a whole Maglev row in one syscall instead
//!   of one per slot (Linux ≥ 5.6 for arrays), which is what makes
//!   programming thousands of services fast (falls back to one
//!   BPF_MAP_UPDATE_ELEM per entry when the kernel refuses the batch);
//! - links: create (TCX ≥ 6.6, XDP ≥ 5.9), update in place, detach now,
//!   pin and open pins;
//! - an mmap window on an array map, and a key walk that counts entries.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
/// Attach type of XDP links (Linux ≥ 5.9) and the mode flags.
pub(crate) const BPF_XDP: u32 = 37;
pub(crate) const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
pub(crate) const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// Attach types of TCX links (Linux ≥ 6.6).
pub(crate) const BPF_TCX_INGRESS: u32 = 46;
pub(crate) const BPF_TCX_EGRESS: u32 = 47;

/// The `link_create` member of `union bpf_attr`; the tail is the `tcx`
/// part (zero for XDP links, whose extra part is empty).
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

/// The `obj_pin` member of `union bpf_attr`.
#[repr(C)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Creates a link of `prog` on `ifindex` with `attach_type` (TCX links are
/// appended after the ones already there; XDP takes `XDP_FLAGS_*`); the
/// link detaches when its last fd or pin goes.
pub(crate) fn link_create(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    attach_type: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        flags,
        relative_fd: 0,
        _pad: 0,
        expected_revision: 0,
    };
    owned(bpf(BPF_LINK_CREATE, &mut attr)?)
}

/// `link_update` of union bpf_attr.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Points an existing link at another program, atomically.
pub(crate) fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// `link_detach` of union bpf_attr.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// Detaches a link from its hook now (Linux ≥ 5.9), instead of when its
/// last reference goes (for a pin: after an RCU grace period).
pub(crate) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf returned a bad fd"))?;
    // SAFETY: a fresh fd the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::other("pin path contains NUL"))
}

/// Opens the BPF object pinned at `path`.
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = ObjPinAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    owned(bpf(BPF_OBJ_GET, &mut attr)?)
}

/// Pins a BPF object (here: a link) at `path` on bpffs.
pub(crate) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut attr = ObjPinAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `elem` member of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// bpf(2); the kernel's non-negative answer (an fd for the commands that
/// make one, else 0).
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a #[repr(C)] prefix of union bpf_attr for `cmd`,
    // valid for the duration of the call; the kernel reads (and for batch
    // writes `count` back into) exactly size_of::<T>() bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Writes `values[i]` at `keys[i]` of a map with u32 keys and values.
pub(crate) fn update_u32s(map: BorrowedFd<'_>, keys: &[u32], values: &[u32]) -> io::Result<()> {
    if keys.len() != values.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "keys and values differ in length",
        ));
    }
    if keys.is_empty() {
        return Ok(());
    }
    let fd =
        u32::try_from(map.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(keys.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        map_fd: fd,
        elem_flags: 0,
        flags: 0,
    };
    match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
        Ok(_) => return Ok(()),
        // Old kernel or map type without batch support: per element.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL) | Some(524) | Some(libc::ENOSYS)
            ) =>
        {
            tracing::debug!(error = %e, "BPF_MAP_UPDATE_BATCH unavailable; updating per element");
        }
        Err(e) => return Err(e),
    }
    for (k, v) in keys.iter().zip(values) {
        let mut attr = ElemAttr {
            map_fd: fd,
            _pad: 0,
            key: k as *const u32 as u64,
            value: v as *const u32 as u64,
            flags: 0,
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr)?;
    }
    Ok(())
}

/// A shared mapping of a window of a BPF_F_MMAPABLE array map: writes are
/// plain stores into the map's memory, visible to the programs at once.
/// Array elements are `round_up(value_size, 8)` bytes apart.
///
/// Only the window being written is mapped, and only while it is written:
/// the kernel maps an array's pages eagerly, so a mapping of the whole
/// Maglev map would put all of it (max_frontends × table size × 8 bytes,
/// over 100 MiB by default) in the agent's resident set for nothing.
pub(crate) struct MmapArray {
    base: std::ptr::NonNull<u8>,
    bytes: usize,
    /// Index of the first element of the window (the mapping starts at
    /// the page holding it).
    first: u32,
    /// Byte offset of element `first` from the start of the mapping.
    skew: usize,
    /// Elements in the window.
    entries: u32,
}

// SAFETY: the mapping is owned by this value and only written through
// `&mut self`; moving it to another thread is fine.
unsafe impl Send for MmapArray {}
// SAFETY: `&self` methods do not touch the mapping.
unsafe impl Sync for MmapArray {}

const U32_ELEM_STRIDE: usize = 8;

impl MmapArray {
    /// Maps the elements `first .. first + count` of an array map of u32
    /// values.
    pub(crate) fn map_window(map: BorrowedFd<'_>, first: u32, count: u32) -> io::Result<Self> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::Error::other("page size unknown"))?;
        let start_byte = first as usize * U32_ELEM_STRIDE;
        let end_byte = (first as usize + count as usize) * U32_ELEM_STRIDE;
        let offset = start_byte / page * page;
        let bytes = end_byte.div_ceil(page) * page - offset;
        let file_offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::other("map offset out of range"))?;
        // SAFETY: a fresh shared mapping of the map's fd at a page-aligned
        // offset; the kernel checks offset + length against the map and
        // fails for non-mmapable maps.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                file_offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = std::ptr::NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self {
            base,
            bytes,
            first,
            skew: start_byte - offset,
            entries: count,
        })
    }

    /// Stores `value` at (absolute) `index`; false if outside the window.
    pub(crate) fn set(&mut self, index: u32, value: u32) -> bool {
        let Some(rel) = index.checked_sub(self.first).filter(|r| *r < self.entries) else {
            return false;
        };
        // SAFETY: rel < entries, so the 4 bytes at skew + rel * stride lie
        // inside the mapping; the offset is 8-aligned. A volatile aligned
        // 32-bit store is atomic on the platforms BPF runs on, so a program
        // never sees a torn backend id.
        unsafe {
            self.base
                .as_ptr()
                .add(self.skew + rel as usize * U32_ELEM_STRIDE)
                .cast::<u32>()
                .write_volatile(value);
        }
        true
    }
}

impl Drop for MmapArray {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// Counts the keys of a hash-like map by walking BPF_MAP_GET_NEXT_KEY with
/// raw key bytes (the caller does not need the key type). Stops after
/// `limit` keys: a map being rewritten during the walk can restart it, and
/// the count is a gauge, not an invariant.
pub(crate) fn count_keys(map: BorrowedFd<'_>, key_size: u32, limit: u64) -> io::Result<u64> {
    let size = key_size as usize;
    let mut current = vec![0u8; size];
    let mut next = vec![0u8; size];
    let mut have_current = false;
    let mut n = 0u64;
    while n < limit {
        let mut attr = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            // A null key asks for the first key.
            key: if have_current {
                current.as_ptr() as u64
            } else {
                0
            },
            value: next.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                n += 1;
                std::mem::swap(&mut current, &mut next);
                have_current = true;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
