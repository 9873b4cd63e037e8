//! [mesh] kernel side in userspace: the outbound capture `mesh_connect4`
//! and its companion `mesh_getpeername4` on a meshed pod's cgroup v2
//! directory, and the table of local meshed pods (`SKEP_MESH_PODS`: the
//! sidecars' "is the destination meshed" and to_pod's strict-mode
//! refusal).
//!
//! The load balancer's loader loads both programs with the rest of the
//! object (same maps: `mesh_connect4` resolves Services itself, see the
//! program) and pins them at `<root>/progs/<name>`; attaching works from
//! those pins alone and pins each link as
//! `<root>/links/cgroup-<path>-<name>`, so captures outlive an agent
//! restart and a new loader's program replaces the old one in place
//! (BPF_LINK_UPDATE). cgroup links need Linux ≥ 5.7; `mesh_getpeername4`
//! (the app's getpeername() shows the original destination, not the
//! sidecar) needs 5.8 and is left out, with a warning, where the kernel
//! refuses it: the capture works without it.

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData, MapError};
use skep_ebpf_common::{MESH_POD_F_MESHED, MESH_POD_F_STRICT, MeshOrigDst, MeshPod, names};

use crate::{DataplaneError, sys};

const PROGRAM: &str = names::PROG_MESH_CONNECT4;
/// cgroup/getpeername4 of the capture (ebpf/programs/src/mesh_getpeername4.rs).
pub const PROG_MESH_GETPEERNAME4: &str = "mesh_getpeername4";
/// `BPF_CGROUP_INET4_CONNECT` of enum bpf_attach_type.
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
/// `BPF_CGROUP_INET4_GETPEERNAME` of enum bpf_attach_type.
const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;

/// The capture's programs and their attach types; the first is required,
/// the others are attached when their pin exists.
const PROGRAMS: [(&str, u32); 2] = [
    (PROGRAM, BPF_CGROUP_INET4_CONNECT),
    (PROG_MESH_GETPEERNAME4, BPF_CGROUP_INET4_GETPEERNAME),
];

fn load_one(ebpf: &mut aya::Ebpf, root: &Path, name: &'static str) -> Result<(), DataplaneError> {
    let prog: &mut aya::programs::CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::ProgramNotFound(name))?
        .try_into()
        .map_err(
            |e: aya::programs::ProgramError| DataplaneError::ProgramLoad {
                program: name,
                detail: e.to_string(),
            },
        )?;
    prog.load().map_err(|e| DataplaneError::ProgramLoad {
        program: name,
        detail: format!("{e:#}"),
    })?;
    let pin = root.join("progs").join(name);
    if pin.exists() {
        let _ = std::fs::remove_file(&pin);
    }
    prog.pin(&pin).map_err(|e| DataplaneError::Pin {
        path: pin.clone(),
        detail: e.to_string(),
    })
}

/// Loads `mesh_connect4` and `mesh_getpeername4` from the loader's object
/// and pins them at `<root>/progs/<name>`, replacing an older loader's
/// pins. Only `mesh_connect4` is required.
pub(crate) fn load_and_pin(ebpf: &mut aya::Ebpf, root: &Path) -> Result<(), DataplaneError> {
    load_one(ebpf, root, PROGRAM)?;
    if let Err(e) = load_one(ebpf, root, PROG_MESH_GETPEERNAME4) {
        // Linux < 5.8 has no getpeername hook: apps of meshed pods then
        // see the sidecar's address as their peer.
        tracing::warn!(error = %e, "mesh_getpeername4 not loaded: meshed apps' getpeername() will show 127.0.0.1:15001");
        let _ = std::fs::remove_file(root.join("progs").join(PROG_MESH_GETPEERNAME4));
    }
    Ok(())
}

fn link_pin_of(pin_root: &Path, cgroup: &Path, program: &str) -> PathBuf {
    let tag: String = cgroup
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    pin_root
        .join("links")
        .join(format!("cgroup-{tag}-{program}"))
}

/// The link pin of a cgroup directory's capture (`mesh_connect4`).
pub fn link_pin(pin_root: &Path, cgroup: &Path) -> PathBuf {
    link_pin_of(pin_root, cgroup, PROGRAM)
}

/// Attaches the outbound capture to a cgroup v2 directory: every process
/// in it and its descendants has its TCP connects captured (except the
/// sidecar's marked sockets), and getpeername() on a captured socket shows
/// the original destination. Idempotent: an existing attachment is
/// switched to the newest loader's program.
pub fn attach(pin_root: &Path, cgroup: &Path) -> Result<(), DataplaneError> {
    for (i, (program, attach_type)) in PROGRAMS.into_iter().enumerate() {
        let prog_path = pin_root.join("progs").join(program);
        if i > 0 && !prog_path.exists() {
            // Not loaded on this kernel (see load_and_pin).
            continue;
        }
        attach_one(pin_root, cgroup, program, attach_type)?;
    }
    tracing::debug!(cgroup = %cgroup.display(), "mesh capture attached");
    Ok(())
}

fn attach_one(
    pin_root: &Path,
    cgroup: &Path,
    program: &'static str,
    attach_type: u32,
) -> Result<(), DataplaneError> {
    let attach_err = |detail: String| DataplaneError::Attach {
        program,
        iface: cgroup.display().to_string(),
        detail,
    };
    let prog_path = pin_root.join("progs").join(program);
    let prog = sys::obj_get(&prog_path).map_err(|e| DataplaneError::Pin {
        path: prog_path.clone(),
        detail: format!(
            "cannot open the pinned program ({e}); the load balancer datapath \
             (KernelDatapath::open) loads it and must run first"
        ),
    })?;
    let pin = link_pin_of(pin_root, cgroup, program);
    if pin.exists() {
        if let Ok(link) = sys::obj_get(&pin)
            && sys::link_update(link.as_fd(), prog.as_fd()).is_ok()
        {
            return Ok(());
        }
        // A link whose cgroup is gone (a recreated directory of the same
        // path): replace it.
        let _ = std::fs::remove_file(&pin);
    }
    let dir = std::fs::File::open(cgroup)
        .map_err(|e| attach_err(format!("cannot open the cgroup directory: {e}")))?;
    // The link_create target is the cgroup's fd in the slot TC/XDP links
    // use for the ifindex.
    let link =
        sys::link_create(prog.as_fd(), dir.as_raw_fd() as u32, attach_type, 0).map_err(|e| {
            attach_err(format!(
                "BPF_LINK_CREATE: {e} (cgroup links need Linux ≥ 5.7)"
            ))
        })?;
    sys::obj_pin(link.as_fd(), &pin).map_err(|e| DataplaneError::Pin {
        path: pin.clone(),
        detail: e.to_string(),
    })
}

/// Detaches the capture of a cgroup directory now and removes its pins
/// (nothing to do when it was never attached).
pub fn detach(pin_root: &Path, cgroup: &Path) -> Result<(), DataplaneError> {
    // The reverse of attach's order.
    for (program, _) in PROGRAMS.into_iter().rev() {
        let pin = link_pin_of(pin_root, cgroup, program);
        let Ok(link) = sys::obj_get(&pin) else {
            continue;
        };
        // Best effort: a link of a removed cgroup is already inert.
        let _ = sys::link_detach(link.as_fd());
        std::fs::remove_file(&pin).map_err(|e| DataplaneError::Pin {
            path: pin.clone(),
            detail: format!("cannot remove the link pin: {e}"),
        })?;
    }
    Ok(())
}

/// Whether a cgroup directory has the capture attached (its pin exists).
pub fn is_attached(pin_root: &Path, cgroup: &Path) -> bool {
    link_pin(pin_root, cgroup).exists()
}

/// Whether `mesh_getpeername4` is attached to a cgroup directory.
pub fn getpeername_attached(pin_root: &Path, cgroup: &Path) -> bool {
    link_pin_of(pin_root, cgroup, PROG_MESH_GETPEERNAME4).exists()
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |e| DataplaneError::Map {
        map,
        detail: e.to_string(),
    }
}

fn open_hash<K: aya::Pod, V: aya::Pod>(
    pin_root: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DataplaneError> {
    let path = pin_root.join("maps").join(name);
    let data = MapData::from_pin(&path).map_err(|e| DataplaneError::Pin {
        path: path.clone(),
        detail: format!(
            "cannot open the pinned mesh map ({e}); the load balancer datapath \
             (KernelDatapath::open) creates it and must run first"
        ),
    })?;
    let map = Map::from_map_data(data).map_err(map_err(name))?;
    HashMap::try_from(map).map_err(map_err(name))
}

/// A local meshed pod as the kernel and the sidecars see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshedPod {
    pub addr: Ipv4Addr,
    pub strict: bool,
}

/// The local meshed pods (`SKEP_MESH_PODS`).
pub struct MeshPods {
    map: HashMap<MapData, u32, MeshPod>,
}

impl std::fmt::Debug for MeshPods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshPods")
    }
}

impl MeshPods {
    pub fn open(pin_root: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            map: open_hash(pin_root, names::MAP_MESH_PODS)?,
        })
    }

    /// Adds or updates a pod (strict: only mTLS reaches its app ports).
    pub fn set(&mut self, addr: Ipv4Addr, strict: bool) -> Result<(), DataplaneError> {
        let flags = MESH_POD_F_MESHED | if strict { MESH_POD_F_STRICT } else { 0 };
        self.map
            .insert(u32::from_ne_bytes(addr.octets()), MeshPod { flags }, 0)
            .map_err(map_err(names::MAP_MESH_PODS))
    }

    pub fn remove(&mut self, addr: Ipv4Addr) -> Result<(), DataplaneError> {
        match self.map.remove(&u32::from_ne_bytes(addr.octets())) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::MAP_MESH_PODS)(e)),
        }
    }

    pub fn list(&self) -> Vec<MeshedPod> {
        self.map
            .iter()
            .flatten()
            .map(|(k, v)| MeshedPod {
                addr: Ipv4Addr::from(k.to_ne_bytes()),
                strict: v.flags & MESH_POD_F_STRICT != 0,
            })
            .collect()
    }
}

/// Reads the recorded original destination of an app socket (tests,
/// `skep ctl bpf`); the sidecar reads the map with its own raw calls.
pub fn original_dst(
    pin_root: &Path,
    cookie: u64,
) -> Result<Option<std::net::SocketAddrV4>, DataplaneError> {
    let map: HashMap<MapData, u64, MeshOrigDst> = open_hash(pin_root, names::MAP_MESH_ORIG)?;
    match map.get(&cookie, 0) {
        Ok(v) => Ok(Some(std::net::SocketAddrV4::new(
            Ipv4Addr::from(v.addr.to_ne_bytes()),
            u16::from_be(v.port),
        ))),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(map_err(names::MAP_MESH_ORIG)(e)),
    }
}
