//! Named network namespaces, compatible with iproute2 (`/run/netns/NAME`), so
//! `ip netns exec` and `ip -n` work on the namespaces skep makes.
//!
//! A namespace stays alive through a bind mount of its nsfs inode; code runs
//! inside it on a dedicated thread that `setns`es, because the network
//! namespace is per thread and must not leak into a tokio worker.

use crate::DataplaneError;
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
};
use std::{
    fs::{self, File, OpenOptions},
    path::{Path, PathBuf},
};

const NETNS_DIR: &str = "/run/netns";

static SHARE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A named network namespace. Dropping it deletes the namespace (and with
/// it every interface inside), so tests clean up even when they panic.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
    owned: bool,
}

impl NetNs {
    /// Creates a new, empty namespace (only `lo`, down) named `name`.
    pub fn create(name: &str) -> Result<Self, DataplaneError> {
        let err = |action: &'static str| {
            let name = name.to_owned();
            move |source: std::io::Error| DataplaneError::NetNs {
                name,
                action,
                source,
            }
        };
        fs::create_dir_all(NETNS_DIR).map_err(err("creating /run/netns"))?;
        {
            // Concurrent creates (a node agent starting many pods at once)
            // must not both turn /run/netns into a mount point: stacked
            // self-bind-mounts hide the namespaces below them.
            let _guard = SHARE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            make_run_dir_shared().map_err(err("making /run/netns a shared mount"))?;
        }
        let path = Path::new(NETNS_DIR).join(name);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(err("creating the mount point"))?;
        let ns = Self {
            name: name.to_owned(),
            path: path.clone(),
            owned: true,
        };
        // unshare() on a short-lived thread so the caller's thread keeps its
        // namespace; the bind mount outlives the thread.
        let bind = std::thread::scope(|s| {
            s.spawn(|| -> std::io::Result<()> {
                unshare(CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(std::io::Error::from)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread panicked")))
        });
        bind.map_err(err("bind-mounting the namespace"))?;
        // Bring up loopback: many tools assume it.
        ns.run(set_loopback_up)?.map_err(err("bringing up lo"))?;
        Ok(ns)
    }

    /// Refers to an existing namespace without taking ownership: dropping the
    /// handle leaves the namespace alone.
    pub fn open(name: &str) -> Result<Self, DataplaneError> {
        let path = Path::new(NETNS_DIR).join(name);
        File::open(&path).map_err(|source| DataplaneError::NetNs {
            name: name.to_owned(),
            action: "opening",
            source,
        })?;
        Ok(Self {
            name: name.to_owned(),
            path,
            owned: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, DataplaneError> {
        let file = File::open(&self.path).map_err(|source| DataplaneError::NetNs {
            name: self.name.clone(),
            action: "opening",
            source,
        })?;
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| DataplaneError::NetNs {
                    name: self.name.clone(),
                    action: "entering (setns)",
                    source: e.into(),
                })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Gives up ownership: dropping the returned handle leaves the namespace
    /// in place (pod namespaces outlive the agent call that made them).
    pub fn keep(mut self) -> Self {
        self.owned = false;
        self
    }

    /// Whether `/run/netns/NAME` is a live namespace (an nsfs bind mount),
    /// not a bare mount point left by a crash between its steps.
    pub fn exists(name: &str) -> bool {
        nix::sys::statfs::statfs(&Path::new(NETNS_DIR).join(name))
            .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
            .unwrap_or(false)
    }

    /// Deletes the namespace called `name` if there is one (also a bare
    /// mount point without a namespace); returns whether anything was there.
    pub fn remove_named(name: &str) -> Result<bool, DataplaneError> {
        let path = Path::new(NETNS_DIR).join(name);
        if !path.exists() {
            return Ok(false);
        }
        match umount2(&path, MntFlags::MNT_DETACH) {
            // EINVAL: not mounted (a half-made namespace); just remove it.
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                return Err(DataplaneError::NetNs {
                    name: name.to_owned(),
                    action: "unmounting",
                    source: e.into(),
                });
            }
        }
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(source) => Err(DataplaneError::NetNs {
                name: name.to_owned(),
                action: "removing the mount point",
                source,
            }),
        }
    }

    /// Names of every namespace in /run/netns (iproute2's list).
    pub fn list_names() -> Result<Vec<String>, DataplaneError> {
        let entries = match fs::read_dir(NETNS_DIR) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(DataplaneError::NetNs {
                    name: NETNS_DIR.to_owned(),
                    action: "listing",
                    source,
                });
            }
        };
        Ok(entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect())
    }

    /// Deletes the namespace now (also done on drop for owned handles).
    pub fn delete(mut self) -> Result<(), DataplaneError> {
        self.owned = false;
        remove(&self.name, &self.path)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.owned
            && let Err(e) = remove(&self.name, &self.path)
        {
            tracing::warn!(netns = %self.name, error = %e, "could not delete network namespace");
        }
    }
}

fn remove(name: &str, path: &Path) -> Result<(), DataplaneError> {
    let err = |action: &'static str| {
        move |source: std::io::Error| DataplaneError::NetNs {
            name: name.to_owned(),
            action,
            source,
        }
    };
    umount2(path, MntFlags::MNT_DETACH)
        .map_err(std::io::Error::from)
        .map_err(err("unmounting"))?;
    fs::remove_file(path).map_err(err("removing the mount point"))
}

/// Makes /run/netns a shared mount point, as `ip netns add` does. Without
/// this, a later `ip netns add` (by anyone) bind-mounts /run/netns over
/// itself: namespaces made before stay mounted underneath, hidden, and can
/// no longer be unmounted or deleted by name (seen here: deletes failed with
/// EBUSY and the namespaces leaked). Doing it first, while no namespace
/// exists below, avoids that; once it is a mount point this only re-asserts
/// the propagation.
fn make_run_dir_shared() -> std::io::Result<()> {
    let shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        // EINVAL: not a mount point yet; make it one, then shared.
        Err(nix::errno::Errno::EINVAL) => {
            mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(std::io::Error::from)?;
            shared().map_err(std::io::Error::from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Sets `lo` up with a SIOCSIFFLAGS ioctl on a socket of the current thread's
/// namespace.
fn set_loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2) call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: fd is a valid socket and req a valid ifreq for these ioctls.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: fd is ours and still open.
    unsafe { libc::close(fd) };
    result
}
