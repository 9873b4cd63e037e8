//! The per-interface packet counter (`tc_count`): the first program of the
//! dataplane, used to prove the toolchain end to end (build, embed, load,
//! attach, read back). The load balancer replaces it as the from-pod hook.

use crate::{DataplaneError, object};
use aya::{
    Ebpf,
    maps::PerCpuHashMap,
    programs::{SchedClassifier, TcAttachType, tc},
};
use skep_ebpf_common::{IfaceStats, names};

/// Which way through an interface the classifier sees packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

impl From<Direction> for TcAttachType {
    fn from(d: Direction) -> Self {
        match d {
            Direction::Ingress => TcAttachType::Ingress,
            Direction::Egress => TcAttachType::Egress,
        }
    }
}

/// A loaded `tc_count` program and its map. Dropping it detaches the program
/// from every interface it was attached to.
#[derive(Debug)]
pub struct PacketCounter {
    ebpf: Ebpf,
}

impl PacketCounter {
    /// Loads the object and the `tc_count` program into the kernel.
    pub fn load() -> Result<Self, DataplaneError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(DataplaneError::NotRoot);
        }
        let bytes = object::bytes()?;
        let mut ebpf = Ebpf::load(&bytes).map_err(|e| DataplaneError::Load(e.to_string()))?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(names::PROG_TC_COUNT)
            .ok_or(DataplaneError::ProgramNotFound(names::PROG_TC_COUNT))?
            .try_into()
            .map_err(
                |e: aya::programs::ProgramError| DataplaneError::ProgramLoad {
                    program: names::PROG_TC_COUNT,
                    detail: e.to_string(),
                },
            )?;
        program.load().map_err(|e| DataplaneError::ProgramLoad {
            program: names::PROG_TC_COUNT,
            detail: verifier_detail(&e),
        })?;
        Ok(Self { ebpf })
    }

    /// Attaches the counter to `iface` in the calling thread's network
    /// namespace.
    pub fn attach(&mut self, iface: &str, direction: Direction) -> Result<(), DataplaneError> {
        if nix::net::if_::if_nametoindex(iface).is_err() {
            return Err(DataplaneError::NoSuchInterface(iface.to_owned()));
        }
        // Below 6.6 aya attaches through netlink and needs the clsact qdisc;
        // from 6.6 it uses TCX and the qdisc is harmless. An existing qdisc
        // (EEXIST) is fine either way.
        if let Err(e) = tc::qdisc_add_clsact(iface)
            && !clsact_exists(&e)
        {
            return Err(DataplaneError::Attach {
                program: names::PROG_TC_COUNT,
                iface: iface.to_owned(),
                detail: format!("adding the clsact qdisc: {e}"),
            });
        }
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(names::PROG_TC_COUNT)
            .ok_or(DataplaneError::ProgramNotFound(names::PROG_TC_COUNT))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| DataplaneError::Attach {
                program: names::PROG_TC_COUNT,
                iface: iface.to_owned(),
                detail: e.to_string(),
            })?;
        program
            .attach(iface, direction.into())
            .map_err(|e| DataplaneError::Attach {
                program: names::PROG_TC_COUNT,
                iface: iface.to_owned(),
                detail: e.to_string(),
            })?;
        tracing::debug!(iface, ?direction, "tc_count attached");
        Ok(())
    }

    /// Counters of one interface, summed over CPUs; `None` if the program
    /// has not seen a packet there.
    pub fn stats(&self, ifindex: u32) -> Result<Option<IfaceStats>, DataplaneError> {
        let map = self.map()?;
        match map.get(&ifindex, 0) {
            Ok(per_cpu) => Ok(Some(per_cpu.iter().fold(
                IfaceStats::default(),
                |acc, s| IfaceStats {
                    packets: acc.packets + s.packets,
                    bytes: acc.bytes + s.bytes,
                },
            ))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(DataplaneError::Map {
                map: names::MAP_IFACE_STATS,
                detail: e.to_string(),
            }),
        }
    }

    fn map(&self) -> Result<PerCpuHashMap<&aya::maps::MapData, u32, IfaceStats>, DataplaneError> {
        let raw = self
            .ebpf
            .map(names::MAP_IFACE_STATS)
            .ok_or(DataplaneError::MapNotFound(names::MAP_IFACE_STATS))?;
        PerCpuHashMap::try_from(raw).map_err(|e| DataplaneError::Map {
            map: names::MAP_IFACE_STATS,
            detail: e.to_string(),
        })
    }
}

pub(crate) fn clsact_exists(e: &tc::TcError) -> bool {
    match e {
        tc::TcError::AlreadyAttached => true,
        tc::TcError::NetlinkError(n) => n.raw_os_error() == Some(libc::EEXIST),
        tc::TcError::IoError(io) => io.raw_os_error() == Some(libc::EEXIST),
        _ => false,
    }
}

/// The verifier's log is the useful part of a load failure; aya puts it in
/// the error's alternate Display.
fn verifier_detail(e: &aya::programs::ProgramError) -> String {
    format!("{e:#}")
}
