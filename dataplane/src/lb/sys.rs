//! Raw bpf(2) map updates that aya 0.14 does not expose: BPF_MAP_UPDATE_BATCH
//! writes a whole Maglev row in one syscall instead of one per slot (Linux
//! ≥ 5.6 for arrays), which is what makes programming thousands of services
//! fast. Falls back to one BPF_MAP_UPDATE_ELEM per entry when the kernel
//! refuses the batch command.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
/// Attach types of TCX links (Linux ≥ 6.6).
pub(crate) const BPF_TCX_INGRESS: u32 = 46;
pub(crate) const BPF_TCX_EGRESS: u32 = 47;

/// The `link_create` member of `union bpf_attr`, with its `tcx` part.
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

/// Creates a TCX link of `prog` on `ifindex` (appended after the links
/// already there); the link detaches when its last fd or pin goes.
pub(crate) fn tcx_link_create(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    attach_type: u32,
) -> io::Result<std::os::fd::OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        flags: 0,
        relative_fd: 0,
        _pad: 0,
        expected_revision: 0,
    };
    // SAFETY: `attr` is the link_create prefix of union bpf_attr, valid for
    // the call; on success the kernel returns a new fd that we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &mut attr as *mut LinkCreateAttr,
            std::mem::size_of::<LinkCreateAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(r).map_err(|_| io::Error::other("bpf returned a bad fd"))?;
    // SAFETY: a fresh fd returned by the kernel, owned by nobody else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Pins a BPF object (here: a link) at `path` on bpffs.
pub(crate) fn obj_pin(fd: BorrowedFd<'_>, path: &std::path::Path) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::other("pin path contains NUL"))?;
    let mut attr = ObjPinAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr)
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

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
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
        Ok(())
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
        Ok(()) => return Ok(()),
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
