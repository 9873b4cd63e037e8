//! The container's root filesystem: resolving paths inside an image (for
//! finding the executable before anything starts) and building the root
//! in the container's mount namespace, then pivoting into it.

use super::{
    mounts::{self, bind, do_mount, mkdir},
    state::{ContainerConfig, ROOTFS_DIR, RootfsSource, UPPER_DIR, WORK_DIR},
};
use nix::mount::{MntFlags, MsFlags};
use std::{
    fs,
    os::unix::fs::{PermissionsExt, symlink},
    path::{Component, Path, PathBuf},
};

/// PATH when the container's environment has none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where the `skep` binary appears inside host-image containers.
pub const SKEP_IN_CONTAINER: &str = "/.skep/skep";
/// Top-level host directories a host-image container does not see.
const HOST_SKIP: [&str; 5] = ["proc", "sys", "dev", "run", "tmp"];

/// Maps `path` (absolute, inside the container) to where it is under
/// `root` on the host, following symlinks as the container would see them
/// (absolute targets are relative to `root`, `..` never leaves it).
/// Returns None when a component does not exist.
pub(crate) fn resolve_in_root(root: &Path, path: &str) -> Option<PathBuf> {
    match resolve_partial(root, path)? {
        (found, missing) if missing.is_empty() => Some(found),
        _ => None,
    }
}

/// Like `resolve_in_root`, but stops at the first missing component:
/// returns the host path of what exists and the components still missing
/// below it (where the container would see them created, symlinks
/// included). None for a symlink loop or an unreadable component.
fn resolve_partial(root: &Path, path: &str) -> Option<(PathBuf, Vec<String>)> {
    let mut pending: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .rev()
        .map(str::to_owned)
        .collect();
    let mut current: Vec<String> = Vec::new();
    let mut links = 0;
    let host_of = |parts: &[String]| parts.iter().fold(root.to_path_buf(), |p, c| p.join(c));
    while let Some(part) = pending.pop() {
        match part.as_str() {
            "." => continue,
            ".." => {
                current.pop();
                continue;
            }
            _ => {}
        }
        let host = host_of(&current).join(&part);
        let meta = match fs::symlink_metadata(&host) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // `..` in what is left would refer to directories that do
                // not exist yet: resolve it away lexically.
                let mut missing = vec![part];
                while let Some(p) = pending.pop() {
                    match p.as_str() {
                        "." => {}
                        ".." => {
                            if missing.pop().is_none() {
                                current.pop();
                            }
                        }
                        _ => missing.push(p),
                    }
                }
                return Some((host_of(&current), missing));
            }
            Err(_) => return None,
        };
        if meta.file_type().is_symlink() {
            links += 1;
            if links > 40 {
                return None;
            }
            let target = fs::read_link(&host).ok()?;
            let target = target.to_string_lossy();
            if target.starts_with('/') {
                current.clear();
            }
            pending.extend(
                target
                    .split('/')
                    .filter(|c| !c.is_empty())
                    .rev()
                    .map(str::to_owned),
            );
        } else {
            current.push(part);
        }
    }
    Some((host_of(&current), Vec::new()))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds `name` the way execvp would inside the container whose root is
/// `root` with `mounts` (container path, host path) on top; returns the
/// path inside the container.
pub(crate) fn find_executable(
    root: &Path,
    mounts: &[(String, PathBuf)],
    name: &str,
    path_env: &str,
) -> Option<String> {
    // Where a container path really is: under the deepest mount that
    // covers it, else in the image.
    let host_path = |inside: &str| -> Option<PathBuf> {
        let covering = mounts
            .iter()
            .filter(|(at, _)| {
                let at = at.trim_end_matches('/');
                inside == at || inside.starts_with(&format!("{at}/"))
            })
            .max_by_key(|(at, _)| at.len());
        match covering {
            Some((at, host)) => {
                let rest = &inside[at.trim_end_matches('/').len()..];
                if rest.is_empty() {
                    Some(host.clone())
                } else {
                    resolve_in_root(host, rest)
                }
            }
            None => resolve_in_root(root, inside),
        }
    };
    let usable = |inside: &str| host_path(inside).is_some_and(|p| is_executable(&p));
    if name.contains('/') {
        return usable(name).then(|| name.to_owned());
    }
    path_env
        .split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| format!("{}/{name}", d.trim_end_matches('/')))
        .find(|candidate| usable(candidate))
}

/// Builds the root under `dir/rootfs`, mounts /proc, /dev, /sys and the
/// pod's mounts, and pivots into it. Runs in the container's fresh mount
/// namespace (so nothing here is visible on the host).
pub(crate) fn build_and_enter(cfg: &ContainerConfig, dir: &Path) -> Result<(), String> {
    // Nothing we mount may propagate back to the host.
    do_mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    let root = dir.join(ROOTFS_DIR);
    match &cfg.rootfs {
        RootfsSource::Host => build_host_root(&root, &cfg.shim_exe)?,
        RootfsSource::Overlay { lower } => {
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                dir.join(UPPER_DIR).display(),
                dir.join(WORK_DIR).display()
            );
            do_mount(
                Some("overlay"),
                &root,
                Some("overlay"),
                MsFlags::empty(),
                Some(&opts),
            )?;
        }
    }
    mounts::setup_proc_sys(&root)?;
    mounts::setup_dev(&root)?;
    for m in &cfg.spec.mounts {
        user_mount(&root, &m.host_path, &m.container_path, m.read_only)?;
    }
    if cfg.rootfs == RootfsSource::Host {
        // The new root itself (a tmpfs holding the mount points) is
        // read-only too: the host image is read-only except /tmp and /run.
        do_mount(
            None,
            &root,
            None,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None,
        )?;
    }
    enter(&root)
}

/// The host image: a tmpfs root with read-only binds of the host's
/// top-level directories, fresh /tmp and /run, and the skep binary.
fn build_host_root(root: &Path, shim_exe: &Path) -> Result<(), String> {
    do_mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=755,size=1m"),
    )?;
    // Unbindable: the recursive binds below must not copy the new root
    // into itself (it lives below a host directory we bind).
    do_mount(None, root, None, MsFlags::MS_UNBINDABLE, None)?;
    let entries = fs::read_dir("/").map_err(|e| format!("reading /: {e}"))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name_str) = name.to_str() else {
            continue;
        };
        if HOST_SKIP.contains(&name_str) {
            continue;
        }
        let host = Path::new("/").join(&name);
        let target = root.join(&name);
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_symlink() {
            // /bin -> usr/bin and friends stay symlinks.
            let to = fs::read_link(&host).map_err(|e| format!("reading {host:?}: {e}"))?;
            symlink(&to, &target).map_err(|e| format!("creating {target:?}: {e}"))?;
        } else if ft.is_dir() {
            mkdir(&target)?;
            bind(&host, &target)?;
            mounts::make_readonly_recursive(&target)?;
        } else if ft.is_file() {
            mounts::touch(&target)?;
            bind(&host, &target)?;
            mounts::remount_readonly(&target)?;
        }
    }
    for (name, mode) in [("tmp", "1777"), ("run", "755")] {
        let target = root.join(name);
        mkdir(&target)?;
        do_mount(
            Some("tmpfs"),
            &target,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(&format!("mode={mode}")),
        )?;
    }
    let skep_dir = root.join(".skep");
    mkdir(&skep_dir)?;
    let skep = skep_dir.join("skep");
    mounts::touch(&skep)?;
    bind(shim_exe, &skep)?;
    mounts::remount_readonly(&skep)
}

/// A pod mount: the mount point is created when missing (possible when
/// the root is writable), else the error says why it cannot be.
fn user_mount(
    root: &Path,
    host: &Path,
    container_path: &str,
    read_only: bool,
) -> Result<(), String> {
    if !container_path.starts_with('/')
        || Path::new(container_path)
            .components()
            .any(|c| c == Component::ParentDir)
    {
        return Err(format!(
            "mount path {container_path:?} must be absolute without .."
        ));
    }
    let meta = fs::metadata(host).map_err(|e| format!("mount source {}: {e}", host.display()))?;
    let (mut target, missing) = resolve_partial(root, container_path)
        .ok_or_else(|| format!("mount path {container_path:?}: cannot resolve it in the image"))?;
    // Create what is missing (directories, then the mount point itself),
    // where the container would see it: through symlinks.
    for (i, part) in missing.iter().enumerate() {
        target.push(part);
        let last = i + 1 == missing.len();
        create_mount_point(&target, !last || meta.is_dir(), container_path)?;
    }
    if !target.starts_with(root) {
        return Err(format!("mount path {container_path:?} escapes the root"));
    }
    bind(host, &target)?;
    if read_only {
        mounts::make_readonly_recursive(&target)?;
    }
    Ok(())
}

fn create_mount_point(path: &Path, dir: bool, container_path: &str) -> Result<(), String> {
    let result = if dir {
        fs::create_dir(path)
    } else {
        fs::File::create(path).map(drop)
    };
    result.map_err(|e| {
        if e.raw_os_error() == Some(libc::EROFS) {
            format!(
                "cannot mount at {container_path:?}: it does not exist in the image and the image is read-only there"
            )
        } else {
            format!("creating mount point {container_path:?}: {e}")
        }
    })
}

/// pivot_root into `root` and drop the old root.
fn enter(root: &Path) -> Result<(), String> {
    nix::unistd::chdir(root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    // pivot_root(".", "."): the old root ends up on top of the new one
    // and is unmounted right away, no directory needed for it.
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    nix::mount::umount2(".", MntFlags::MNT_DETACH)
        .map_err(|e| format!("detaching the old root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))
}
