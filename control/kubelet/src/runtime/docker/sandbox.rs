//! Pod sandboxes. Docker cannot put a container into a network namespace
//! given by path, so each pod gets a "pause" container that owns the pod's
//! network (and IPC) namespace; its namespace is bind-mounted at the path
//! the pod manager wires the veth into, and app containers join the pause
//! container (`network_mode: container:<id>`).

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use bollard::{
    Docker,
    models::{ContainerCreateBody, HostConfig, RestartPolicy, RestartPolicyNameEnum},
    query_parameters::{
        CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
        RemoveContainerOptionsBuilder,
    },
};
use futures::StreamExt;
use nix::mount::{MntFlags, MsFlags};

use super::{labels, status};
use crate::runtime::{ContainerLabels, RuntimeError};

pub const PAUSE_IMAGE: &str = "skep/pause:3";
/// The statically linked busybox (Debian busybox-static) images are made of.
pub const BUSYBOX: &str = "/bin/busybox";
/// 2^31-1 seconds: the longest sleep busybox accepts.
const FOREVER: &str = "2147483647";
const NETNS_DIR: &str = "/run/netns";

/// Builds an image from the host's static busybox: `/bin/busybox` plus a
/// `/bin/<applet>` symlink for each of `applets`, imported as `reference`
/// (`repo:tag`). Returns the image ID.
pub async fn import_busybox(
    docker: &Docker,
    reference: &str,
    applets: &[&str],
) -> Result<String, RuntimeError> {
    let image_err = |reason: String| RuntimeError::Image {
        image: reference.to_owned(),
        reason,
    };
    let busybox = tokio::fs::read(BUSYBOX).await.map_err(|e| {
        image_err(format!(
            "reading {BUSYBOX} ({e}): install the Debian package busybox-static (cargo xtask setup)"
        ))
    })?;
    let tar = busybox_tar(&busybox, applets)
        .map_err(|e| image_err(format!("building the image tarball: {e}")))?;
    let (repo, tag) = reference.rsplit_once(':').unwrap_or((reference, "latest"));
    let opts = CreateImageOptionsBuilder::new()
        .from_src("-")
        .repo(repo)
        .tag(tag)
        .build();
    let mut s = docker.create_image(Some(opts), Some(bollard::body_full(tar.into())), None);
    while let Some(r) = s.next().await {
        r.map_err(|e| image_err(format!("importing: {e}")))?;
    }
    let i = docker
        .inspect_image(reference)
        .await
        .map_err(|e| image_err(format!("inspecting after import: {e}")))?;
    Ok(i.id.unwrap_or_default())
}

fn busybox_tar(busybox: &[u8], applets: &[&str]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let dir = |path: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_path(path).map(|()| h)
    };
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        let mut h = dir(d)?;
        if d == "tmp" {
            h.set_mode(0o1777);
        }
        h.set_cksum();
        b.append(&h, std::io::empty())?;
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    h.set_path("bin/busybox")?;
    h.set_cksum();
    b.append(&h, busybox)?;
    for a in applets {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_path(format!("bin/{a}"))?;
        h.set_link_name("busybox")?;
        h.set_cksum();
        b.append(&h, std::io::empty())?;
    }
    b.into_inner()
}

async fn ensure_pause_image(docker: &Docker) -> Result<(), RuntimeError> {
    match docker.inspect_image(PAUSE_IMAGE).await {
        Ok(_) => Ok(()),
        Err(e) if status(&e) == Some(404) => import_busybox(docker, PAUSE_IMAGE, &["sleep"])
            .await
            .map(|_| ()),
        Err(e) => Err(RuntimeError::Unavailable(format!(
            "inspecting {PAUSE_IMAGE}: {e}"
        ))),
    }
}

/// A pod's pause containers (normally one): (id, running pid).
async fn find(
    docker: &Docker,
    pod_uid: &str,
) -> Result<Vec<(String, Option<i64>, String)>, RuntimeError> {
    let opts = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&labels::filter(&format!("{}={pod_uid}", labels::POD_UID)))
        .build();
    let list = docker
        .list_containers(Some(opts))
        .await
        .map_err(|e| RuntimeError::Unavailable(format!("listing containers: {e}")))?;
    let mut out = Vec::new();
    for c in list {
        let labels = c.labels.unwrap_or_default();
        let (Some(id), Some(netns)) = (c.id, labels.get(labels::SANDBOX)) else {
            continue;
        };
        let pid = match docker.inspect_container(&id, None).await {
            Ok(i) => i
                .state
                .filter(|s| s.running == Some(true))
                .and_then(|s| s.pid)
                .filter(|&p| p > 0),
            Err(e) if status(&e) == Some(404) => continue,
            Err(e) => {
                return Err(RuntimeError::Unavailable(format!("inspecting {id}: {e}")));
            }
        };
        out.push((id, pid, netns.clone()));
    }
    Ok(out)
}

/// UIDs of the pods with a pause container (running or not).
pub(crate) async fn list(docker: &Docker) -> Result<Vec<String>, RuntimeError> {
    let opts = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&labels::filter(labels::SANDBOX))
        .build();
    let list = docker
        .list_containers(Some(opts))
        .await
        .map_err(|e| RuntimeError::Unavailable(format!("listing containers: {e}")))?;
    let mut uids: Vec<String> = list
        .into_iter()
        .filter_map(|c| c.labels?.get(labels::POD_UID).cloned())
        .collect();
    uids.sort();
    uids.dedup();
    Ok(uids)
}

/// The running pause container of a pod, if it has one.
pub(crate) async fn pause_of(
    docker: &Docker,
    pod_uid: &str,
) -> Result<Option<String>, RuntimeError> {
    Ok(find(docker, pod_uid)
        .await?
        .into_iter()
        .find(|(_, pid, _)| pid.is_some())
        .map(|(id, _, _)| id))
}

async fn force_remove(docker: &Docker, id: &str) -> Result<(), RuntimeError> {
    let opts = RemoveContainerOptionsBuilder::new().force(true).build();
    match docker.remove_container(id, Some(opts)).await {
        Ok(()) => Ok(()),
        Err(e) if status(&e) == Some(404) => Ok(()),
        Err(e) => Err(RuntimeError::Unavailable(format!("removing {id}: {e}"))),
    }
}

pub(crate) async fn create(
    docker: &Docker,
    pod_uid: &str,
    pod: &ContainerLabels,
    netns_path: &Path,
) -> Result<(), RuntimeError> {
    let mut pid = None;
    for (id, running, _) in find(docker, pod_uid).await? {
        match running {
            Some(p) if pid.is_none() => pid = Some(p),
            // A pause container that died took its namespace with it (an
            // app container in it would have none): start over.
            _ => force_remove(docker, &id).await?,
        }
    }
    let pid = match pid {
        Some(p) => p,
        None => start_pause(docker, pod_uid, pod, netns_path).await?,
    };
    let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let path = netns_path.to_owned();
    tokio::task::spawn_blocking(move || bind_netns(&ns, &path))
        .await
        .map_err(|e| RuntimeError::Start(format!("mounting the pod network namespace: {e}")))?
        .map_err(RuntimeError::io(format!(
            "bind-mounting the pause container's network namespace at {}",
            netns_path.display()
        )))
}

async fn start_pause(
    docker: &Docker,
    pod_uid: &str,
    pod: &ContainerLabels,
    netns_path: &Path,
) -> Result<i64, RuntimeError> {
    ensure_pause_image(docker).await?;
    let mut l = labels::pod_labels(&ContainerLabels {
        pod_uid: pod_uid.to_owned(),
        ..pod.clone()
    });
    l.insert(
        labels::SANDBOX.to_owned(),
        netns_path.to_string_lossy().into_owned(),
    );
    let body = ContainerCreateBody {
        image: Some(PAUSE_IMAGE.to_owned()),
        entrypoint: Some(vec![
            BUSYBOX.to_owned(),
            "sleep".to_owned(),
            FOREVER.to_owned(),
        ]),
        // App containers inherit it: docker refuses a hostname with
        // `network_mode: container:…`.
        hostname: Some(pod.pod_name.clone()),
        labels: Some(l),
        host_config: Some(HostConfig {
            network_mode: Some("none".into()),
            ipc_mode: Some("shareable".into()),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let name = labels::sandbox_name(&ContainerLabels {
        pod_uid: pod_uid.to_owned(),
        ..pod.clone()
    });
    // A leftover of the same name (an earlier, interrupted attempt).
    force_remove(docker, &name).await?;
    let opts = CreateContainerOptionsBuilder::new().name(&name).build();
    let created = docker
        .create_container(Some(opts), body)
        .await
        .map_err(|e| RuntimeError::Start(format!("creating the pause container: {e}")))?;
    if let Err(e) = docker.start_container(&created.id, None).await {
        let _ = force_remove(docker, &created.id).await;
        return Err(RuntimeError::Start(format!(
            "starting the pause container: {e}"
        )));
    }
    let pid = docker
        .inspect_container(&created.id, None)
        .await
        .ok()
        .and_then(|i| i.state)
        .and_then(|s| s.pid)
        .filter(|&p| p > 0);
    match pid {
        Some(p) => Ok(p),
        None => {
            let _ = force_remove(docker, &created.id).await;
            Err(RuntimeError::Start(
                "the pause container exited right after starting".into(),
            ))
        }
    }
}

pub(crate) async fn remove(docker: &Docker, pod_uid: &str) -> Result<(), RuntimeError> {
    for (id, _, netns) in find(docker, pod_uid).await? {
        force_remove(docker, &id).await?;
        let path = PathBuf::from(netns);
        tokio::task::spawn_blocking(move || unmount_netns(&path))
            .await
            .map_err(|e| RuntimeError::Start(format!("unmounting the pod network namespace: {e}")))?
            .map_err(RuntimeError::io("removing the pod network namespace mount"))?;
    }
    Ok(())
}

/// Whether `path` is the namespace `ns` (same nsfs inode).
fn same_ns(path: &Path, ns: &Path) -> bool {
    match (std::fs::metadata(path), std::fs::metadata(ns)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn bind_netns(ns: &Path, path: &Path) -> std::io::Result<()> {
    if same_ns(path, ns) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        if dir == Path::new(NETNS_DIR) {
            make_shared(dir)?;
        }
    }
    // Whatever namespace was mounted there is not the pod's any more.
    unmount_netns(path)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    nix::mount::mount(Some(ns), path, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
    Ok(())
}

/// Unmounts and deletes a namespace mount point; absent is fine.
fn unmount_netns(path: &Path) -> std::io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes /run/netns a shared mount as `ip netns add` does, so a later
/// `ip netns add` does not bind /run/netns over itself and hide the
/// namespaces mounted below (the dataplane's NetNs does the same).
fn make_shared(dir: &Path) -> std::io::Result<()> {
    let shared = || {
        nix::mount::mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        // Not a mount point yet: make it one first.
        Err(nix::errno::Errno::EINVAL) => {
            nix::mount::mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            shared().map_err(Into::into)
        }
        Err(e) => Err(e.into()),
    }
}
