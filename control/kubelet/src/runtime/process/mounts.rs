//! Mount helpers for the container's setup (run in the container's own
//! mount namespace, by its single-threaded init before exec). Errors are
//! strings that name the path: they end up in the container's status.

use nix::mount::{MsFlags, mount};
use std::{
    fs,
    os::unix::fs::{OpenOptionsExt, symlink},
    path::Path,
};

pub(crate) fn do_mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    mount(source, target, fstype, flags, data).map_err(|e| {
        format!(
            "mounting {} on {}: {e}",
            source.or(fstype).unwrap_or("(remount)"),
            target.display()
        )
    })
}

pub(crate) fn bind(source: &Path, target: &Path) -> Result<(), String> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| {
        format!(
            "bind-mounting {} on {}: {e}",
            source.display(),
            target.display()
        )
    })
}

/// The kernel's `struct mount_attr` for mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// Makes the mount at `target` and every mount below it read-only.
pub(crate) fn make_readonly_recursive(target: &Path) -> Result<(), String> {
    let c_path = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: path contains NUL", target.display()))?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: valid NUL-terminated path and a mount_attr of the size given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // Kernels before 5.12: remount each mount below `target` one by one.
    let below = mounts_under(target);
    for m in std::iter::once(target.to_path_buf()).chain(below) {
        remount_readonly(&m)?;
    }
    Ok(())
}

/// Remounts one bind mount read-only.
pub(crate) fn remount_readonly(target: &Path) -> Result<(), String> {
    // Keep the flags the mount has: a remount replaces them all.
    let keep = nix::sys::statvfs::statvfs(target)
        .map(|s| {
            let f = s.flags();
            let mut out = MsFlags::empty();
            use nix::sys::statvfs::FsFlags;
            for (from, to) in [
                (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
                (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
                (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            ] {
                if f.contains(from) {
                    out |= to;
                }
            }
            out
        })
        .unwrap_or(MsFlags::empty());
    do_mount(
        None,
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | keep,
        None,
    )
}

/// Mount points strictly below `dir`, from /proc/self/mountinfo.
fn mounts_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| std::path::PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p != dir && p.starts_with(dir))
        .collect()
}

/// Creates `path` as an empty file (a mount point for a file).
pub(crate) fn touch(path: &Path) -> Result<(), String> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map(drop)
        .map_err(|e| format!("creating {}: {e}", path.display()))
}

pub(crate) fn mkdir(path: &Path) -> Result<(), String> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("creating {}: {e}", path.display())),
    }
}

/// /dev: a tmpfs with the harmless host devices bind-mounted, a private
/// devpts instance and a tmpfs /dev/shm.
pub(crate) fn setup_dev(root: &Path) -> Result<(), String> {
    let dev = root.join("dev");
    mkdir(&dev)?;
    do_mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        touch(&target)?;
        bind(&Path::new("/dev").join(name), &target)?;
    }
    let pts = dev.join("pts");
    mkdir(&pts)?;
    do_mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    let shm = dev.join("shm");
    mkdir(&shm)?;
    do_mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(to, dev.join(link)).map_err(|e| format!("creating /dev/{link}: {e}"))?;
    }
    Ok(())
}

/// /proc for the new pid namespace and a read-only /sys (showing the
/// container's network namespace).
pub(crate) fn setup_proc_sys(root: &Path) -> Result<(), String> {
    let proc_dir = root.join("proc");
    mkdir(&proc_dir)?;
    do_mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    let sys = root.join("sys");
    mkdir(&sys)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY;
    if do_mount(Some("sysfs"), &sys, Some("sysfs"), flags, None).is_err() {
        // Without a network namespace of our own the kernel may refuse a
        // new sysfs; the host's, read-only, is the fallback.
        bind(Path::new("/sys"), &sys)?;
        make_readonly_recursive(&sys)?;
    }
    Ok(())
}
