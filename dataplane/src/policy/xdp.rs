//! The XDP early drop on a node's external interface (`xdp_policy` in the
//! eBPF object): traffic from outside to a local pod whose ingress policy
//! denies it is dropped before the kernel builds a socket buffer; all else
//! goes on to the pod hooks, which make the full decision.
//!
//! The load balancer's loader loads the program with the object it loads
//! anyway (same maps) and pins it at `<root>/progs/xdp_policy`; attaching
//! works from that pin alone and pins the link as
//! `<root>/links/<iface>-<ifindex>-xdp` (`-xdpgeneric` in generic mode),
//! like the pod hooks' TCX links, so the attachment outlives the agent and
//! a new loader's program replaces the old one in place. XDP links need
//! Linux ≥ 5.9.
//!
//! aya 0.14 cannot open a pinned XDP program without a type it does not
//! export, so the pin is opened and linked with the raw calls in
//! `crate::sys`.

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use skep_ebpf_common::names;

use crate::{DataplaneError, sys};

const PROGRAM: &str = names::PROG_XDP_NODE;

/// How the program runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver, before any socket buffer exists (veth, most NICs).
    Native,
    /// In the stack's generic hook (drivers without XDP support): still
    /// before the IP layer and netfilter, but after the skb is built.
    Generic,
}

/// Loads `xdp_policy` from the loader's object and pins it at
/// `<root>/progs/xdp_policy`, replacing an older loader's pin.
pub(crate) fn load_and_pin(ebpf: &mut aya::Ebpf, root: &Path) -> Result<(), DataplaneError> {
    let prog: &mut aya::programs::Xdp = ebpf
        .program_mut(PROGRAM)
        .ok_or(DataplaneError::ProgramNotFound(PROGRAM))?
        .try_into()
        .map_err(
            |e: aya::programs::ProgramError| DataplaneError::ProgramLoad {
                program: PROGRAM,
                detail: e.to_string(),
            },
        )?;
    prog.load().map_err(|e| DataplaneError::ProgramLoad {
        program: PROGRAM,
        detail: format!("{e:#}"),
    })?;
    let pin = program_pin(root);
    if pin.exists() {
        let _ = std::fs::remove_file(&pin);
    }
    prog.pin(&pin).map_err(|e| DataplaneError::Pin {
        path: pin.clone(),
        detail: e.to_string(),
    })
}

fn program_pin(root: &Path) -> PathBuf {
    root.join("progs").join(PROGRAM)
}

impl XdpMode {
    /// Last part of the link pin's name (the mode of an attachment is not
    /// in the kernel's link info, so the pin records it).
    fn pin_suffix(self) -> &'static str {
        match self {
            Self::Native => "xdp",
            Self::Generic => "xdpgeneric",
        }
    }

    fn flags(self) -> u32 {
        match self {
            Self::Native => sys::XDP_FLAGS_DRV_MODE,
            Self::Generic => sys::XDP_FLAGS_SKB_MODE,
        }
    }
}

const MODES: [XdpMode; 2] = [XdpMode::Native, XdpMode::Generic];

fn link_pin(root: &Path, iface: &str, ifindex: u32, mode: XdpMode) -> PathBuf {
    root.join("links")
        .join(format!("{iface}-{ifindex}-{}", mode.pin_suffix()))
}

/// Attaches the early drop to `iface` in the calling thread's network
/// namespace: natively where the driver supports XDP, else in generic
/// mode. Idempotent; an existing attachment is switched to the program
/// pinned now (the newest loader's) without a gap.
pub fn attach(pin_root: &Path, iface: &str) -> Result<XdpMode, DataplaneError> {
    let ifindex = nix::net::if_::if_nametoindex(iface)
        .map_err(|_| DataplaneError::NoSuchInterface(iface.to_owned()))?;
    let attach_err = |detail: String| DataplaneError::Attach {
        program: PROGRAM,
        iface: iface.to_owned(),
        detail,
    };
    let prog_path = program_pin(pin_root);
    let prog = sys::obj_get(&prog_path).map_err(|e| DataplaneError::Pin {
        path: prog_path.clone(),
        detail: format!(
            "cannot open the pinned program ({e}); the load balancer datapath \
             (KernelDatapath::open) loads it and must run first"
        ),
    })?;
    for mode in MODES {
        let pin = link_pin(pin_root, iface, ifindex, mode);
        if !pin.exists() {
            continue;
        }
        let updated =
            sys::obj_get(&pin).and_then(|link| sys::link_update(link.as_fd(), prog.as_fd()));
        match updated {
            Ok(()) => return Ok(mode),
            Err(why) => {
                tracing::debug!(%why, pin = %pin.display(), "stale XDP link pin replaced");
                let _ = std::fs::remove_file(&pin);
            }
        }
    }
    let (link, mode) =
        match sys::link_create(prog.as_fd(), ifindex, sys::BPF_XDP, XdpMode::Native.flags()) {
            Ok(link) => (link, XdpMode::Native),
            Err(native) => {
                let link = sys::link_create(
                    prog.as_fd(),
                    ifindex,
                    sys::BPF_XDP,
                    XdpMode::Generic.flags(),
                )
                .map_err(|generic| {
                    attach_err(format!(
                        "creating the XDP link: native mode: {native}; generic mode: {generic} \
                         (XDP links need Linux ≥ 5.9; another XDP program may own the interface)"
                    ))
                })?;
                tracing::debug!(iface, %native, "no native XDP; attached in generic mode");
                (link, XdpMode::Generic)
            }
        };
    let pin = link_pin(pin_root, iface, ifindex, mode);
    std::fs::create_dir_all(pin_root.join("links")).map_err(|e| DataplaneError::Pin {
        path: pin_root.join("links"),
        detail: e.to_string(),
    })?;
    sys::obj_pin(link.as_fd(), &pin).map_err(|e| DataplaneError::Pin {
        path: pin.clone(),
        detail: e.to_string(),
    })?;
    tracing::info!(iface, ifindex, ?mode, "XDP policy early drop attached");
    Ok(mode)
}

/// Detaches the early drop from `iface` by removing its link pins (the
/// only reference to the link; works also when the interface is gone).
/// Returns whether there was one.
pub fn detach(pin_root: &Path, iface: &str) -> Result<bool, DataplaneError> {
    let links = pin_root.join("links");
    let prefix = format!("{iface}-");
    let Ok(dir) = std::fs::read_dir(&links) else {
        return Ok(false);
    };
    let mut found = false;
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // <iface>-<ifindex>-xdp[generic] (interface names may hold '-').
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let Some(index) = MODES
            .iter()
            .find_map(|m| rest.strip_suffix(&format!("-{}", m.pin_suffix())))
        else {
            continue;
        };
        if index.parse::<u32>().is_err() {
            continue;
        }
        // Detach at once (the pin's own release would only detach after
        // an RCU grace period); then the pin, the last reference, goes.
        if let Ok(link) = sys::obj_get(&entry.path())
            && let Err(e) = sys::link_detach(link.as_fd())
        {
            tracing::debug!(error = %e, "BPF_LINK_DETACH failed; the pin's removal detaches it");
        }
        std::fs::remove_file(entry.path()).map_err(|e| DataplaneError::Pin {
            path: entry.path(),
            detail: format!("cannot remove the XDP link pin: {e}"),
        })?;
        found = true;
    }
    Ok(found)
}
