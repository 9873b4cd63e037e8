//! A node's dataplane as an operator wants to see it: which programs are
//! loaded, what is attached, how full each map is, whether policy and flow
//! events are on. Read from the pins alone (nothing is loaded or written),
//! so it tells the truth about the kernel even when the agent is wedged.
//! The agent publishes it on its Node (`skep.io/dataplane`), which is what
//! `skep ctl status` and the console show.

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData, MapType};
use serde::{Deserialize, Serialize};
use skep_ebpf_common::{CFG_F_FLOWS, CFG_F_POLICY, LbConfig, names};

use crate::{DataplaneError, sys};

/// One pinned map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapUsage {
    pub name: String,
    /// The kernel's map type, e.g. `Hash`, `LpmTrie`.
    pub kind: String,
    /// Entries in use; None for maps whose size is fixed (arrays) or not
    /// countable (ring buffers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    pub max: u32,
}

/// Pinned links by attach point.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkCounts {
    /// TC links on pod veths (TCX mode only, SKEP_TC_ATTACH=tcx on Linux
    /// ≥ 6.6; netlink filters, the default, pin nothing).
    pub tc: usize,
    pub xdp: usize,
    pub cgroup: usize,
}

/// Everything at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneStatus {
    /// Pinned programs (the newest loader's).
    pub programs: Vec<String>,
    pub links: LinkCounts,
    /// The programs pass everything until the loader has written its
    /// config: false means the datapath is not doing its job yet.
    pub ready: bool,
    pub policy: bool,
    pub flows: bool,
    pub maps: Vec<MapUsage>,
}

impl DataplaneStatus {
    /// The fullest map (used/max), for one-line summaries.
    pub fn fullest(&self) -> Option<(&MapUsage, f64)> {
        self.maps
            .iter()
            .filter_map(|m| {
                let used = m.used? as f64;
                (m.max > 0).then(|| (m, used / f64::from(m.max)))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }
}

fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn pin_error(path: PathBuf, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Pin {
        path,
        detail: e.to_string(),
    }
}

fn countable(kind: MapType) -> bool {
    matches!(
        kind,
        MapType::Hash
            | MapType::LruHash
            | MapType::PerCpuHash
            | MapType::LruPerCpuHash
            | MapType::LpmTrie
    )
}

/// Reads the status of the dataplane pinned under `pin_root`.
pub fn read(pin_root: &Path) -> Result<DataplaneStatus, DataplaneError> {
    let maps_dir = pin_root.join("maps");
    if !maps_dir.is_dir() {
        return Err(pin_error(
            maps_dir,
            "no pinned maps: the dataplane has not been loaded on this pin root",
        ));
    }
    let mut status = DataplaneStatus {
        programs: list(&pin_root.join("progs")),
        ..Default::default()
    };
    for link in list(&pin_root.join("links")) {
        if link.starts_with("cgroup-") {
            status.links.cgroup += 1;
        } else if link.contains("-xdp") {
            status.links.xdp += 1;
        } else {
            status.links.tc += 1;
        }
    }
    for name in list(&maps_dir) {
        let path = maps_dir.join(&name);
        let data = MapData::from_pin(&path).map_err(|e| pin_error(path.clone(), e))?;
        let info = data.info().map_err(|e| pin_error(path.clone(), e))?;
        let kind = info.map_type().map_err(|e| pin_error(path.clone(), e))?;
        let used = if countable(kind) {
            // A few more than max so that a walk restarted by a concurrent
            // delete still ends.
            let limit = u64::from(info.max_entries()).saturating_mul(2);
            Some(
                sys::count_keys(data.fd().as_fd(), info.key_size(), limit)
                    .map_err(|e| pin_error(path.clone(), e))?
                    .min(u64::from(info.max_entries())),
            )
        } else {
            None
        };
        if name == names::MAP_CONFIG {
            let map = Map::from_map_data(data).map_err(|e| pin_error(path.clone(), e))?;
            let config: Array<MapData, LbConfig> =
                Array::try_from(map).map_err(|e| pin_error(path.clone(), e))?;
            let c = config.get(&0, 0).map_err(|e| pin_error(path.clone(), e))?;
            status.ready = c.ready != 0;
            status.policy = c.flags & CFG_F_POLICY != 0;
            status.flows = c.flags & CFG_F_FLOWS != 0;
        }
        status.maps.push(MapUsage {
            name,
            kind: format!("{kind:?}"),
            used,
            max: info.max_entries(),
        });
    }
    Ok(status)
}
