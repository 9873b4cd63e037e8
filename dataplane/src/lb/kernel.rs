//! The real [`Datapath`]: the load balancer's maps and programs in the
//! kernel, pinned under [`LbSettings::pin_root`]:
//!
//! ```text
//! <root>/maps/<MAP>                      every LB map (re-adopted by the next loader)
//! <root>/progs/from_pod, to_pod          the programs of the last loader
//! <root>/links/<iface>-<ifindex>-ingress TCX links (SKEP_TC_ATTACH=tcx,
//! <root>/links/<iface>-<ifindex>-egress  kernel ≥ 6.6), so they outlive the agent
//! ```
//!
//! By default TC programs attach through netlink cls_bpf filters (see
//! `tcx_supported` for why, even where TCX exists), which the kernel keeps
//! without any pin; skep uses a fixed priority/handle so a new loader
//! replaces its predecessor's filter in place.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapInfo, PerCpuArray},
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use skep_ebpf_common::{
    AffinityKey, AffinityValue, BACKEND_F_REMOTE, BACKEND_F_TERMINATING, BackendValue,
    CFG_F_XDP_LB, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_CLOSING, CT_F_HAIRPIN, CT_F_SNAT, CtKey,
    CtValue, LB_COUNTER_NAMES, LB_COUNTERS, LbConfig, PolicyCtValue, SVC_F_EXTERNAL, ServiceKey,
    ServiceValue, names,
};

use super::{
    BackendEntry, ConntrackEntry, CtGcStats, CtTimeouts, Datapath, Frontend, FrontendState,
    LbCounters, LbSettings, Protocol,
};
use crate::{DataplaneError, object};

/// Netlink (kernel < 6.6) filter priority and handle of skep's programs.
const NL_PRIORITY: u16 = 0x5ce;
const NL_HANDLE: u32 = 0x5ce;

/// Whether TC programs attach as TCX links rather than netlink cls_bpf
/// filters. Netlink is the default on every kernel: a TCX attachment
/// swaps bpf_mprog's a/b entries and waits a full RCU grace period while
/// it holds rtnl_lock, ~24 ms per attachment on the 6.18 test machine
/// against ~0.3 ms for a netlink filter, and every other pod's netlink
/// work (veths, addresses, routes) queues behind that lock: 100 pods
/// created at once spent 3 s getting their networks. `SKEP_TC_ATTACH=tcx`
/// chooses TCX links where the kernel has them (≥ 6.6, the same test aya
/// makes), e.g. to order skep's programs among other TCX users.
fn tcx_supported() -> bool {
    static TCX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TCX.get_or_init(|| {
        let wanted = std::env::var("SKEP_TC_ATTACH").is_ok_and(|v| v == "tcx");
        let kernel = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if wanted && !kernel {
            tracing::warn!("SKEP_TC_ATTACH=tcx needs Linux >= 6.6: attaching by netlink");
        }
        wanted && kernel
    })
}

/// Attaches the pod hooks to pods' interfaces without the datapath: in
/// TCX mode (`SKEP_TC_ATTACH=tcx`) an attachment is one link per hook, made from the
/// programs' fds, so many pods can be attached at once (each attachment
/// waits on the kernel, mostly for RCU) instead of one after another under
/// the load balancer's lock.
#[derive(Debug)]
pub struct PodHooks {
    from_pod: std::os::fd::OwnedFd,
    to_pod: std::os::fd::OwnedFd,
    links: PathBuf,
}

impl PodHooks {
    /// Attaches from_pod (ingress) and to_pod (egress) to `iface`;
    /// idempotent (a pin for this interface index means it is attached).
    pub fn attach(&self, iface: &str) -> Result<(), DataplaneError> {
        use std::os::fd::AsFd as _;
        let ifindex = nix::net::if_::if_nametoindex(iface)
            .map_err(|_| DataplaneError::NoSuchInterface(iface.to_owned()))?;
        for (fd, attach_type, dir, program) in [
            (
                &self.from_pod,
                crate::sys::BPF_TCX_INGRESS,
                "ingress",
                names::PROG_FROM_POD,
            ),
            (
                &self.to_pod,
                crate::sys::BPF_TCX_EGRESS,
                "egress",
                names::PROG_TO_POD,
            ),
        ] {
            let pin = self.links.join(format!("{iface}-{ifindex}-{dir}"));
            if pin.exists() {
                continue;
            }
            let link =
                crate::sys::link_create(fd.as_fd(), ifindex, attach_type, 0).map_err(|e| {
                    DataplaneError::Attach {
                        program,
                        iface: iface.to_owned(),
                        detail: format!("creating the TCX link: {e}"),
                    }
                })?;
            crate::sys::obj_pin(link.as_fd(), &pin).map_err(|e| DataplaneError::Pin {
                path: pin.clone(),
                detail: e.to_string(),
            })?;
        }
        tracing::debug!(iface, ifindex, "pod hooks attached (TCX links)");
        Ok(())
    }

    /// Removes the pins of `iface`'s links (its hooks detach with them;
    /// a deleted interface's links are already defunct).
    pub fn forget(&self, iface: &str) {
        let prefix = format!("{iface}-");
        for entry in std::fs::read_dir(&self.links)
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The load balancer in the kernel.
pub struct KernelDatapath {
    settings: LbSettings,
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, BackendValue>,
    /// Written through a shared mapping when the map is mmapable, else with
    /// batch updates (see `sys`), hence the raw MapData.
    maglev: MapData,
    /// The Maglev map can be written through a mapping (BPF_F_MMAPABLE);
    /// else batch updates are used.
    maglev_mmapable: bool,
    ct: HashMap<MapData, CtKey, CtValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    counters: PerCpuArray<MapData, u64>,
    /// Swept with the LB conntrack (`gc_conntrack`).
    policy_ct: HashMap<MapData, CtKey, PolicyCtValue>,
    /// The settings the programs read per packet (`attach_external` adds
    /// the external interface's).
    config: Array<MapData, LbConfig>,
}

impl std::fmt::Debug for KernelDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDatapath")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |e| DataplaneError::Map {
        map,
        detail: e.to_string(),
    }
}

fn ip_ne(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn ip_from_ne(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

impl KernelDatapath {
    /// Loads the programs and creates the maps, or re-adopts the maps pinned
    /// under `settings.pin_root` by a previous loader (their contents, and
    /// so every open connection, survive).
    pub fn open(settings: LbSettings) -> Result<Self, DataplaneError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(DataplaneError::NotRoot);
        }
        settings.validate()?;
        let root = &settings.pin_root;
        for dir in ["maps", "progs", "links"] {
            let d = root.join(dir);
            std::fs::create_dir_all(&d).map_err(|e| DataplaneError::Pin {
                path: d.clone(),
                detail: format!(
                    "cannot create the directory ({e}); is bpffs mounted at /sys/fs/bpf? \
                     (`mount -t bpf bpf /sys/fs/bpf`)"
                ),
            })?;
        }
        // Pins only work on bpffs; say so instead of failing at the first pin.
        const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
        // fs_type_t is i64 on x86_64 glibc but narrower elsewhere.
        #[allow(clippy::unnecessary_cast)]
        match nix::sys::statfs::statfs(root.as_path()) {
            Ok(fs) if fs.filesystem_type().0 as i64 == BPF_FS_MAGIC => {}
            Ok(_) => {
                return Err(DataplaneError::Pin {
                    path: root.clone(),
                    detail: "not on a bpf filesystem; mount one (`mount -t bpf bpf /sys/fs/bpf`) \
                             or choose a pin root below it"
                        .into(),
                });
            }
            Err(e) => {
                return Err(DataplaneError::Pin {
                    path: root.clone(),
                    detail: format!("statfs: {e}"),
                });
            }
        }
        // The policy maps are pinned beside the LB maps (same loader, same
        // object), so a restarted agent re-adopts its rules, its policy
        // conntrack and the flow ring buffer with them.
        let sizes: [(&'static str, u32); 17] = [
            (names::MAP_SERVICES, settings.max_frontends),
            (names::MAP_BACKENDS, settings.max_backends),
            (
                names::MAP_MAGLEV,
                settings.max_frontends.saturating_mul(settings.maglev_size),
            ),
            (names::MAP_CT, settings.ct_entries),
            (names::MAP_AFFINITY, settings.affinity_entries),
            (names::MAP_CONFIG, 1),
            (names::MAP_COUNTERS, LB_COUNTERS),
            (names::MAP_SOCK_REVNAT, settings.sock_revnat_entries),
            (names::MAP_IPCACHE, settings.ipcache_entries),
            (names::MAP_ENDPOINTS, settings.endpoint_entries),
            (names::MAP_POLICY, settings.policy_entries),
            (names::MAP_POLICY_CT, settings.policy_ct_entries),
            // A ring buffer's max_entries is its size in bytes.
            (names::MAP_FLOWS, settings.flow_ring_bytes),
            // The policy generation xdp_policy's denial cache checks.
            (names::MAP_POLICY_GEN, 1),
            // The policy conntrack generation, bumped by the pod hooks.
            (names::MAP_POLICY_CT_GEN, 1),
            // [mesh] capture records and local meshed pods.
            (
                names::MAP_MESH_ORIG,
                skep_ebpf_common::DEFAULT_MESH_ORIG_ENTRIES,
            ),
            (
                names::MAP_MESH_PODS,
                skep_ebpf_common::DEFAULT_MESH_POD_ENTRIES,
            ),
        ];
        let mut adopted = false;
        for (name, wanted) in sizes {
            let path = map_pin(root, name);
            if path.exists() {
                let info = MapInfo::from_pin(&path).map_err(|e| DataplaneError::Pin {
                    path: path.clone(),
                    detail: format!("not a readable pinned map: {e}"),
                })?;
                if info.max_entries() != wanted && name == names::MAP_COUNTERS {
                    // A newer object counts more things; the counters are
                    // statistics, not state: start them over.
                    tracing::info!(
                        pinned = info.max_entries(),
                        wanted,
                        "counter map has a different size; replacing it"
                    );
                    std::fs::remove_file(&path).map_err(|e| DataplaneError::Pin {
                        path: path.clone(),
                        detail: format!("cannot replace the counter map: {e}"),
                    })?;
                    continue;
                }
                if let Some((_, value_size)) = VALUE_SIZES.iter().find(|(n, _)| *n == name)
                    && info.value_size() as usize != *value_size
                {
                    // An upgrade changed the layout of a map whose content
                    // a new loader can do without: the config is written
                    // again below (and by the policy side), and conntrack
                    // only costs the open load-balanced connections a
                    // re-balance (Maglev mostly picks the same backend).
                    tracing::warn!(
                        map = name,
                        pinned = info.value_size(),
                        wanted = value_size,
                        "pinned map has another value layout (an upgrade); replacing it"
                    );
                    std::fs::remove_file(&path).map_err(|e| DataplaneError::Pin {
                        path: path.clone(),
                        detail: format!("cannot replace the map: {e}"),
                    })?;
                    continue;
                }
                if info.max_entries() != wanted {
                    return Err(DataplaneError::PinnedMismatch {
                        path,
                        pinned: info.max_entries(),
                        wanted,
                    });
                }
                adopted = true;
            }
        }
        let bytes = object::bytes()?;
        let pins: Vec<(&'static str, PathBuf)> =
            sizes.iter().map(|(n, _)| (*n, map_pin(root, n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, size) in sizes {
            loader.map_max_entries(name, size);
        }
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(&bytes)
            .map_err(|e| DataplaneError::Load(format!("{e:#}")))?;

        for prog in [names::PROG_FROM_POD, names::PROG_TO_POD] {
            let p = classifier(&mut ebpf, prog)?;
            p.load().map_err(|e| DataplaneError::ProgramLoad {
                program: prog,
                detail: format!("{e:#}"),
            })?;
            // The pin names the program of the newest loader; replace it.
            let pin = root.join("progs").join(prog);
            if pin.exists() {
                let _ = std::fs::remove_file(&pin);
            }
            p.pin(&pin).map_err(|e| DataplaneError::Pin {
                path: pin.clone(),
                detail: e.to_string(),
            })?;
        }
        // The XDP early drop of denied traffic shares these maps; it is
        // attached to external interfaces from its pin (`policy::xdp`).
        crate::policy::xdp::load_and_pin(&mut ebpf, root)?;
        // [mesh] outbound capture, attached to meshed pods' cgroups from its pin.
        crate::mesh::load_and_pin(&mut ebpf, root)?;
        for prog in SOCK_PROGRAMS {
            let p = sock_program(&mut ebpf, prog)?;
            p.load().map_err(|e| DataplaneError::ProgramLoad {
                program: prog,
                detail: format!("{e:#}"),
            })?;
        }

        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(DataplaneError::MapNotFound(name));
        let services =
            HashMap::try_from(take(names::MAP_SERVICES)?).map_err(map_err(names::MAP_SERVICES))?;
        let backends =
            HashMap::try_from(take(names::MAP_BACKENDS)?).map_err(map_err(names::MAP_BACKENDS))?;
        let maglev = match take(names::MAP_MAGLEV)? {
            aya::maps::Map::Array(data) => data,
            _ => {
                return Err(DataplaneError::Map {
                    map: names::MAP_MAGLEV,
                    detail: "not an array map (is the object older than this binary?)".into(),
                });
            }
        };
        let ct = HashMap::try_from(take(names::MAP_CT)?).map_err(map_err(names::MAP_CT))?;
        let affinity =
            HashMap::try_from(take(names::MAP_AFFINITY)?).map_err(map_err(names::MAP_AFFINITY))?;
        let mut config: Array<MapData, LbConfig> =
            Array::try_from(take(names::MAP_CONFIG)?).map_err(map_err(names::MAP_CONFIG))?;
        let counters = PerCpuArray::try_from(take(names::MAP_COUNTERS)?)
            .map_err(map_err(names::MAP_COUNTERS))?;
        let policy_ct = HashMap::try_from(take(names::MAP_POLICY_CT)?)
            .map_err(map_err(names::MAP_POLICY_CT))?;
        // The flags belong to whoever programs policy (`KernelPolicy`): a
        // restarted agent must keep enforcing the rules still in the maps.
        // (A config map created just now reads as zeros.)
        // So do the external interface's SNAT settings (`attach_external`).
        let old = config.get(&0, 0).map_err(map_err(names::MAP_CONFIG))?;
        config
            .set(
                0,
                LbConfig {
                    maglev_size: settings.maglev_size,
                    hairpin_addr: ip_ne(settings.hairpin_addr),
                    ready: 1,
                    flags: old.flags,
                    node_addr: old.node_addr,
                    ext_ifindex: old.ext_ifindex,
                    snat_port_min: settings.snat_ports.0,
                    snat_port_max: settings.snat_ports.1,
                    _pad: 0,
                },
                0,
            )
            .map_err(map_err(names::MAP_CONFIG))?;
        tracing::info!(
            root = %root.display(),
            adopted,
            maglev_size = settings.maglev_size,
            maglev_mib = settings.maglev_bytes() / (1 << 20),
            tcx = tcx_supported(),
            "load balancer datapath open"
        );
        let maglev_mmapable = {
            use std::os::fd::AsFd as _;
            match crate::sys::MmapArray::map_window(maglev.fd().as_fd(), 0, 1) {
                Ok(_) => true,
                Err(e) => {
                    // E.g. maps pinned by an older object without the flag.
                    tracing::info!(error = %e, "Maglev map is not mmapable; using batch updates");
                    false
                }
            }
        };
        Ok(Self {
            maglev_mmapable,
            settings,
            ebpf,
            services,
            backends,
            maglev,
            ct,
            affinity,
            counters,
            policy_ct,
            config,
        })
    }

    pub fn settings(&self) -> &LbSettings {
        &self.settings
    }

    /// A handle that attaches the pod hooks without this datapath (TCX
    /// mode); None where attachments go through netlink (the default),
    /// which `attach_pod` handles.
    pub fn pod_hooks(&mut self) -> Result<Option<PodHooks>, DataplaneError> {
        use std::os::fd::AsFd as _;
        if !tcx_supported() {
            return Ok(None);
        }
        let links = self.settings.pin_root.join("links");
        std::fs::create_dir_all(&links).map_err(|e| DataplaneError::Pin {
            path: links.clone(),
            detail: e.to_string(),
        })?;
        let mut fd_of = |prog: &'static str| -> Result<std::os::fd::OwnedFd, DataplaneError> {
            let p = classifier(&mut self.ebpf, prog)?;
            let fd = p.fd().map_err(|e| DataplaneError::ProgramLoad {
                program: prog,
                detail: e.to_string(),
            })?;
            fd.as_fd()
                .try_clone_to_owned()
                .map_err(|e| DataplaneError::ProgramLoad {
                    program: prog,
                    detail: e.to_string(),
                })
        };
        Ok(Some(PodHooks {
            from_pod: fd_of(names::PROG_FROM_POD)?,
            to_pod: fd_of(names::PROG_TO_POD)?,
            links,
        }))
    }

    /// Attaches `from_pod` (ingress) and `to_pod` (egress) to a pod's
    /// host-side interface `iface`, in the calling thread's network
    /// namespace. Idempotent: a previous loader's attachment is replaced in
    /// place (no window without a program).
    pub fn attach_pod(&mut self, iface: &str) -> Result<(), DataplaneError> {
        self.attach_hooks(iface)
    }

    /// Attaches the same hooks to the node's external interface, whose
    /// address is `node_addr`: external frontends (NodePorts, ExternalIPs,
    /// LoadBalancer IPs) are DNATed on the way in and replies get the
    /// frontend back on the way out. Connections to backends on other
    /// nodes leave SNATed to `node_addr` (externalTrafficPolicy Cluster);
    /// local backends see the client's address. `xdp_node`
    /// (`policy::xdp::attach`) does the same work earlier where it can;
    /// these hooks finish what it leaves.
    pub fn attach_external(
        &mut self,
        iface: &str,
        node_addr: Ipv4Addr,
    ) -> Result<(), DataplaneError> {
        let ifindex = nix::net::if_::if_nametoindex(iface)
            .map_err(|_| DataplaneError::NoSuchInterface(iface.to_owned()))?;
        self.attach_hooks(iface)?;
        let mut cfg = self.config.get(&0, 0).map_err(map_err(names::MAP_CONFIG))?;
        cfg.node_addr = ip_ne(node_addr);
        cfg.ext_ifindex = ifindex;
        self.config
            .set(0, cfg, 0)
            .map_err(map_err(names::MAP_CONFIG))?;
        tracing::info!(iface, %node_addr, "external interface hooks attached (NodePort SNAT source)");
        Ok(())
    }

    /// Lets `xdp_node` load-balance external frontends itself (`on`), or
    /// leaves them to the TC hooks. Only for external interfaces whose
    /// packets carry complete checksums (NICs); see `CFG_F_XDP_LB`.
    pub fn set_xdp_lb(&mut self, on: bool) -> Result<(), DataplaneError> {
        let mut cfg = self.config.get(&0, 0).map_err(map_err(names::MAP_CONFIG))?;
        if on {
            cfg.flags |= CFG_F_XDP_LB;
        } else {
            cfg.flags &= !CFG_F_XDP_LB;
        }
        self.config
            .set(0, cfg, 0)
            .map_err(map_err(names::MAP_CONFIG))
    }

    fn attach_hooks(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let ifindex = nix::net::if_::if_nametoindex(iface)
            .map_err(|_| DataplaneError::NoSuchInterface(iface.to_owned()))?;
        if let Err(e) = tc::qdisc_add_clsact(iface)
            && !crate::counter::clsact_exists(&e)
        {
            return Err(DataplaneError::Attach {
                program: names::PROG_FROM_POD,
                iface: iface.to_owned(),
                detail: format!("adding the clsact qdisc: {e}"),
            });
        }
        let tcx = tcx_supported();
        let links = self.settings.pin_root.join("links");
        for (prog, attach_type, dir) in [
            (names::PROG_FROM_POD, TcAttachType::Ingress, "ingress"),
            (names::PROG_TO_POD, TcAttachType::Egress, "egress"),
        ] {
            let attach_err = |detail: String| DataplaneError::Attach {
                program: prog,
                iface: iface.to_owned(),
                detail,
            };
            let p = classifier(&mut self.ebpf, prog)?;
            if tcx {
                let pin = links.join(format!("{iface}-{ifindex}-{dir}"));
                let replaced = match PinnedLink::from_pin(&pin) {
                    Ok(old) => SchedClassifierLink::try_from(FdLink::from(old))
                        .map_err(|e| e.to_string())
                        .and_then(|l| p.attach_to_link(l).map_err(|e| e.to_string()))
                        .and_then(|id| p.take_link(id).map_err(|e| e.to_string())),
                    Err(e) => Err(e.to_string()),
                };
                match replaced {
                    // The pin still refers to the (now updated) link; our
                    // handle is just an extra fd.
                    Ok(link) => {
                        drop(FdLink::try_from(link).map_err(|e| attach_err(e.to_string()))?)
                    }
                    Err(why) => {
                        if pin.exists() {
                            tracing::debug!(%why, pin = %pin.display(), "stale link pin replaced");
                            let _ = std::fs::remove_file(&pin);
                        }
                        let id = p
                            .attach_with_options(
                                iface,
                                attach_type,
                                TcAttachOptions::TcxOrder(LinkOrder::default()),
                            )
                            .map_err(|e| attach_err(format!("{e:#}")))?;
                        let link = p.take_link(id).map_err(|e| attach_err(e.to_string()))?;
                        let fd = FdLink::try_from(link).map_err(|e| attach_err(e.to_string()))?;
                        fd.pin(&pin).map_err(|e| DataplaneError::Pin {
                            path: pin.clone(),
                            detail: e.to_string(),
                        })?;
                    }
                }
            } else {
                let handle = TcHandle::from(NL_HANDLE);
                let id = match SchedClassifierLink::attached(
                    iface,
                    attach_type,
                    NL_PRIORITY,
                    handle,
                    None,
                )
                .map_err(|e| e.to_string())
                .and_then(|l| p.attach_to_link(l).map_err(|e| e.to_string()))
                {
                    Ok(id) => id,
                    Err(_) => p
                        .attach_with_options(
                            iface,
                            attach_type,
                            TcAttachOptions::Netlink(NlOptions {
                                priority: NL_PRIORITY,
                                handle,
                                ..NlOptions::default()
                            }),
                        )
                        .map_err(|e| attach_err(format!("{e:#}")))?,
                };
                let link = p.take_link(id).map_err(|e| attach_err(e.to_string()))?;
                // Dropping a netlink link would delete the filter; the
                // filter must outlive this process.
                std::mem::forget(link);
                // A TCX link of an agent that ran with SKEP_TC_ATTACH=tcx
                // would run the program a second time: now that the filter
                // is in place, drop it.
                let pin = links.join(format!("{iface}-{ifindex}-{dir}"));
                if let Ok(old) = PinnedLink::from_pin(&pin) {
                    let _ = old.unpin();
                }
            }
        }
        if tcx {
            // The netlink filters of an agent that attached by netlink
            // would run the programs a second time.
            detach_netlink_filters(iface);
        }
        tracing::debug!(iface, ifindex, tcx, "pod hooks attached");
        Ok(())
    }

    /// Detaches the hooks from `iface` (no-op for hooks that are gone).
    pub fn detach_pod(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let links = self.settings.pin_root.join("links");
        let prefix = format!("{iface}-");
        if let Ok(dir) = std::fs::read_dir(&links) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix)
                    && let Ok(pinned) = PinnedLink::from_pin(entry.path())
                {
                    // Unpinning drops the last reference: the link detaches.
                    let _ = pinned.unpin();
                }
            }
        }
        // Netlink filters (the default, and what an agent in the other
        // mode may have left).
        detach_netlink_filters(iface);
        Ok(())
    }

    /// Attaches the socket-level LB (connect4, sendmsg4, recvmsg4,
    /// getpeername4) to the cgroup v2 directory `cgroup`: sockets of its
    /// processes (host processes, hostNetwork pods) reach frontends without
    /// any per-packet NAT. The links are pinned (`links/cgroup-<n>-<hook>`),
    /// so they outlive the agent; attaching again replaces them.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), DataplaneError> {
        let dir = std::fs::File::open(cgroup).map_err(|e| DataplaneError::Attach {
            program: names::PROG_SOCK_CONNECT4,
            iface: cgroup.display().to_string(),
            detail: format!("cannot open the cgroup directory: {e}"),
        })?;
        // Pin names from the cgroup path, flattened.
        let tag: String = cgroup
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let links = self.settings.pin_root.join("links");
        for prog in SOCK_PROGRAMS {
            let attach_err = |detail: String| DataplaneError::Attach {
                program: prog,
                iface: cgroup.display().to_string(),
                detail,
            };
            let p = sock_program(&mut self.ebpf, prog)?;
            // "Single" means flags 0, which bpf_link_create (≥ 5.7) requires;
            // cgroup bpf_links coexist with other programs anyway.
            let id = p
                .attach(&dir, aya::programs::CgroupAttachMode::Single)
                .map_err(|e| attach_err(format!("{e:#}")))?;
            let link = p.take_link(id).map_err(|e| attach_err(e.to_string()))?;
            let pin = links.join(format!("cgroup-{tag}-{prog}"));
            // Kernels ≥ 5.7 give a bpf_link (pinnable); older ones a plain
            // attachment that lives until detached.
            match FdLink::try_from(link) {
                Ok(fd) => {
                    if let Ok(old) = PinnedLink::from_pin(&pin) {
                        // The new link is attached: drop the old one.
                        let _ = old.unpin();
                    }
                    fd.pin(&pin).map_err(|e| DataplaneError::Pin {
                        path: pin.clone(),
                        detail: e.to_string(),
                    })?;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cgroup attachment without bpf_link");
                }
            }
        }
        tracing::debug!(cgroup = %cgroup.display(), "socket LB attached");
        Ok(())
    }

    /// Removes link pins of interfaces that are gone (a deleted pod's veth
    /// takes its TCX links down with it, but not their pins). Must run in
    /// the network namespace of the pod interfaces, like `attach_pod`.
    /// Returns how many pins were removed.
    pub fn prune_stale_links(&self) -> Result<usize, DataplaneError> {
        let links = self.settings.pin_root.join("links");
        let dir = std::fs::read_dir(&links).map_err(|e| DataplaneError::Pin {
            path: links.clone(),
            detail: e.to_string(),
        })?;
        let mut removed = 0;
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // <iface>-<ifindex>-<direction>; interface names may hold '-'.
            let mut parts = name.rsplitn(3, '-');
            let (_dir, ifindex, iface) = (parts.next(), parts.next(), parts.next());
            let (Some(ifindex), Some(iface)) = (ifindex.and_then(|i| i.parse::<u32>().ok()), iface)
            else {
                continue;
            };
            if nix::net::if_::if_nametoindex(iface).ok() != Some(ifindex)
                && std::fs::remove_file(entry.path()).is_ok()
            {
                tracing::debug!(pin = %entry.path().display(), "stale link pin removed");
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes every pin under `root` (uninstall, tests): the maps and
    /// programs go away once nothing else references them.
    pub fn remove_pins(root: &Path) -> Result<(), DataplaneError> {
        if !root.exists() {
            return Ok(());
        }
        std::fs::remove_dir_all(root).map_err(|e| DataplaneError::Pin {
            path: root.to_owned(),
            detail: format!("cannot remove: {e}"),
        })
    }

    /// Number of ClientIP affinity records (for `skep ctl svc` and tests).
    pub fn affinity_entries(&self) -> Result<usize, DataplaneError> {
        let mut n = 0;
        for item in self.affinity.keys() {
            item.map_err(map_err(names::MAP_AFFINITY))?;
            n += 1;
        }
        Ok(n)
    }
}

const SOCK_PROGRAMS: [&str; 4] = [
    names::PROG_SOCK_CONNECT4,
    names::PROG_SOCK_SENDMSG4,
    names::PROG_SOCK_RECVMSG4,
    names::PROG_SOCK_GETPEERNAME4,
];

fn sock_program<'a>(
    ebpf: &'a mut Ebpf,
    prog: &'static str,
) -> Result<&'a mut aya::programs::CgroupSockAddr, DataplaneError> {
    ebpf.program_mut(prog)
        .ok_or(DataplaneError::ProgramNotFound(prog))?
        .try_into()
        .map_err(
            |e: aya::programs::ProgramError| DataplaneError::ProgramLoad {
                program: prog,
                detail: e.to_string(),
            },
        )
}

/// Removes skep's netlink cls_bpf filters (both directions) from `iface`;
/// absent filters are not an error.
fn detach_netlink_filters(iface: &str) {
    use aya::programs::links::Link as _;
    for t in [TcAttachType::Ingress, TcAttachType::Egress] {
        if let Ok(l) =
            SchedClassifierLink::attached(iface, t, NL_PRIORITY, TcHandle::from(NL_HANDLE), None)
        {
            let _ = l.detach();
        }
    }
}

fn map_pin(root: &Path, name: &str) -> PathBuf {
    root.join("maps").join(name)
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    prog: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    ebpf.program_mut(prog)
        .ok_or(DataplaneError::ProgramNotFound(prog))?
        .try_into()
        .map_err(
            |e: aya::programs::ProgramError| DataplaneError::ProgramLoad {
                program: prog,
                detail: e.to_string(),
            },
        )
}

fn service_key(fe: Frontend) -> ServiceKey {
    ServiceKey {
        addr: ip_ne(fe.vip),
        port: fe.port.to_be(),
        proto: fe.protocol.number(),
        _pad: 0,
    }
}

impl Datapath for KernelDatapath {
    fn maglev_size(&self) -> u32 {
        self.settings.maglev_size
    }

    fn max_frontends(&self) -> u32 {
        self.settings.max_frontends
    }

    fn max_backends(&self) -> u32 {
        self.settings.max_backends
    }

    fn frontends(&self) -> Result<Vec<(Frontend, FrontendState)>, DataplaneError> {
        read_frontends(&self.services)
    }

    fn backends(&self) -> Result<Vec<(u32, BackendEntry)>, DataplaneError> {
        read_backends(&self.backends)
    }

    fn put_frontend(&mut self, fe: Frontend, state: FrontendState) -> Result<(), DataplaneError> {
        let v = ServiceValue {
            id: state.id,
            backend_count: state.backend_count,
            affinity_timeout_s: state.affinity_timeout_s,
            flags: if state.external { SVC_F_EXTERNAL } else { 0 },
        };
        self.services
            .insert(service_key(fe), v, 0)
            .map_err(map_err(names::MAP_SERVICES))
    }

    fn delete_frontend(&mut self, fe: Frontend) -> Result<(), DataplaneError> {
        match self.services.remove(&service_key(fe)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::MAP_SERVICES)(e)),
        }
    }

    fn put_backend(&mut self, id: u32, b: BackendEntry) -> Result<(), DataplaneError> {
        let v = BackendValue {
            addr: ip_ne(b.addr),
            port: b.port.to_be(),
            flags: if b.terminating {
                BACKEND_F_TERMINATING
            } else {
                0
            } | if b.remote { BACKEND_F_REMOTE } else { 0 },
            _pad: 0,
            service_id: b.frontend_id,
        };
        self.backends
            .insert(id, v, 0)
            .map_err(map_err(names::MAP_BACKENDS))
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        match self.backends.remove(&id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::MAP_BACKENDS)(e)),
        }
    }

    fn write_maglev(
        &mut self,
        frontend_id: u32,
        slots: &[(u32, u32)],
    ) -> Result<(), DataplaneError> {
        use std::os::fd::AsFd as _;
        let base = frontend_id * self.settings.maglev_size;
        if self.maglev_mmapable {
            let mut mmap = crate::sys::MmapArray::map_window(
                self.maglev.fd().as_fd(),
                base,
                self.settings.maglev_size,
            )
            .map_err(|e| DataplaneError::Map {
                map: names::MAP_MAGLEV,
                detail: format!("mapping the table of frontend {frontend_id}: {e}"),
            })?;
            for &(slot, backend) in slots {
                if !mmap.set(base + slot, backend) {
                    return Err(DataplaneError::Map {
                        map: names::MAP_MAGLEV,
                        detail: format!("slot {} of frontend {frontend_id} is out of range", slot),
                    });
                }
            }
            return Ok(());
        }
        let keys: Vec<u32> = slots.iter().map(|(slot, _)| base + slot).collect();
        let values: Vec<u32> = slots.iter().map(|(_, backend)| *backend).collect();
        crate::sys::update_u32s(self.maglev.fd().as_fd(), &keys, &values).map_err(|e| {
            DataplaneError::Map {
                map: names::MAP_MAGLEV,
                detail: e.to_string(),
            }
        })
    }

    fn conntrack(&self) -> Result<Vec<ConntrackEntry>, DataplaneError> {
        read_conntrack(&self.ct)
    }

    fn gc_conntrack(&mut self, timeouts: &CtTimeouts) -> Result<CtGcStats, DataplaneError> {
        let now = now_ns();
        let mut entries = std::collections::HashMap::new();
        for item in self.ct.iter() {
            let (k, v) = item.map_err(map_err(names::MAP_CT))?;
            entries.insert(k, v);
        }
        let timeout = |proto: u8, closing: bool| -> u64 {
            let t = match Protocol::from_number(proto) {
                Some(Protocol::Tcp) if closing => timeouts.tcp_closing,
                Some(Protocol::Tcp) => timeouts.tcp,
                _ => timeouts.other,
            };
            u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)
        };
        let mut stale = Vec::new();
        let mut removed = 0;
        let mut live = 0;
        for (k, v) in &entries {
            // The partner entry of the same connection.
            let partner = ct_partner(k, v);
            let other = entries.get(&partner);
            let last = other.map_or(v.last_seen_ns, |o| o.last_seen_ns.max(v.last_seen_ns));
            let closing = (v.flags | other.map_or(0, |o| o.flags)) & CT_F_CLOSING != 0;
            let expired = now.saturating_sub(last) > timeout(k.proto, closing);
            match (expired, k.dir == CT_DIR_FORWARD) {
                (true, true) => {
                    removed += 1;
                    stale.push(*k);
                }
                (true, false) => stale.push(*k),
                (false, true) => live += 1,
                (false, false) => {}
            }
        }
        for k in stale {
            // Already gone (LRU eviction, a concurrent GC) is fine.
            let _ = self.ct.remove(&k);
        }
        let policy_removed =
            crate::policy::kernel::sweep_policy_ct(&mut self.policy_ct, now, timeout)?;
        if policy_removed > 0 {
            tracing::debug!(
                removed = policy_removed,
                "idle policy conntrack entries swept"
            );
        }
        Ok(CtGcStats {
            removed,
            live,
            capacity: self.settings.ct_entries,
        })
    }

    fn flush_conntrack(&mut self) -> Result<usize, DataplaneError> {
        let mut keys = Vec::new();
        for item in self.ct.keys() {
            keys.push(item.map_err(map_err(names::MAP_CT))?);
        }
        let connections = keys.iter().filter(|k| k.dir == CT_DIR_FORWARD).count();
        for k in keys {
            let _ = self.ct.remove(&k);
        }
        Ok(connections)
    }

    fn counters(&self) -> Result<LbCounters, DataplaneError> {
        read_counters(&self.counters)
    }
}

/// Maps whose value layout a newer object may change, with the size this
/// binary's object uses; a pin with another size is replaced on open.
const VALUE_SIZES: [(&str, usize); 2] = [
    (names::MAP_CT, std::mem::size_of::<CtValue>()),
    (names::MAP_CONFIG, std::mem::size_of::<LbConfig>()),
];

/// The other entry of the connection `k` belongs to. Without SNAT the reply
/// goes backend → client; with it, backend → (node address, SNAT port),
/// and the reply entry holds the client in `snat_*`.
fn ct_partner(k: &CtKey, v: &CtValue) -> CtKey {
    let snat = v.flags & CT_F_SNAT != 0;
    if k.dir == CT_DIR_FORWARD {
        let (daddr, dport) = if snat {
            (v.snat_addr, v.snat_port)
        } else {
            (k.saddr, k.sport)
        };
        CtKey {
            saddr: v.nat_addr,
            daddr,
            sport: v.nat_port,
            dport,
            proto: k.proto,
            dir: CT_DIR_REPLY,
            _pad: 0,
        }
    } else {
        let (saddr, sport) = if snat {
            (v.snat_addr, v.snat_port)
        } else {
            (k.daddr, k.dport)
        };
        CtKey {
            saddr,
            daddr: v.nat_addr,
            sport,
            dport: v.nat_port,
            proto: k.proto,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        }
    }
}

/// Current CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns().
pub(crate) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

pub(crate) fn read_frontends(
    services: &HashMap<MapData, ServiceKey, ServiceValue>,
) -> Result<Vec<(Frontend, FrontendState)>, DataplaneError> {
    let mut out = Vec::new();
    for item in services.iter() {
        let (k, v) = item.map_err(map_err(names::MAP_SERVICES))?;
        let Some(protocol) = Protocol::from_number(k.proto) else {
            continue;
        };
        out.push((
            Frontend {
                vip: ip_from_ne(k.addr),
                port: u16::from_be(k.port),
                protocol,
            },
            FrontendState {
                id: v.id,
                backend_count: v.backend_count,
                affinity_timeout_s: v.affinity_timeout_s,
                external: v.flags & SVC_F_EXTERNAL != 0,
            },
        ));
    }
    Ok(out)
}

pub(crate) fn read_backends(
    backends: &HashMap<MapData, u32, BackendValue>,
) -> Result<Vec<(u32, BackendEntry)>, DataplaneError> {
    let mut out = Vec::new();
    for item in backends.iter() {
        let (id, v) = item.map_err(map_err(names::MAP_BACKENDS))?;
        out.push((
            id,
            BackendEntry {
                addr: ip_from_ne(v.addr),
                port: u16::from_be(v.port),
                terminating: v.flags & BACKEND_F_TERMINATING != 0,
                remote: v.flags & BACKEND_F_REMOTE != 0,
                frontend_id: v.service_id,
            },
        ));
    }
    Ok(out)
}

pub(crate) fn read_conntrack(
    ct: &HashMap<MapData, CtKey, CtValue>,
) -> Result<Vec<ConntrackEntry>, DataplaneError> {
    let now = now_ns();
    let mut out = Vec::new();
    for item in ct.iter() {
        let (k, v) = item.map_err(map_err(names::MAP_CT))?;
        if k.dir != CT_DIR_FORWARD {
            continue;
        }
        let Some(protocol) = Protocol::from_number(k.proto) else {
            continue;
        };
        out.push(ConntrackEntry {
            client: (ip_from_ne(k.saddr), u16::from_be(k.sport)),
            frontend: (ip_from_ne(k.daddr), u16::from_be(k.dport)),
            protocol,
            backend: (ip_from_ne(v.nat_addr), u16::from_be(v.nat_port)),
            backend_id: v.backend_id,
            hairpin: v.flags & CT_F_HAIRPIN != 0,
            snat: (v.flags & CT_F_SNAT != 0)
                .then(|| (ip_from_ne(v.snat_addr), u16::from_be(v.snat_port))),
            closing: v.flags & CT_F_CLOSING != 0,
            packets: v.packets,
            idle_ns: now.saturating_sub(v.last_seen_ns),
        });
    }
    Ok(out)
}

pub(crate) fn read_counters(
    counters: &PerCpuArray<MapData, u64>,
) -> Result<LbCounters, DataplaneError> {
    let mut out = LbCounters::default();
    for (counter, name) in LB_COUNTER_NAMES {
        let per_cpu = counters
            .get(&(counter as u32), 0)
            .map_err(map_err(names::MAP_COUNTERS))?;
        out.0.insert(name, per_cpu.iter().sum());
    }
    Ok(out)
}
