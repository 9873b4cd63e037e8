//! A read-only view of a running load balancer, straight from its pinned
//! maps (no program is loaded, nothing is written): what `skep ctl svc`
//! shows, and what an operator can trust even when the agent is down.

use std::{collections::HashMap as StdHashMap, net::Ipv4Addr, path::Path};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use skep_ebpf_common::{BackendValue, CtKey, CtValue, ServiceKey, ServiceValue, names};

use super::{
    Frontend, LbCounters,
    kernel::{read_backends, read_conntrack, read_counters, read_frontends},
};
use crate::DataplaneError;

/// The pinned maps of a load balancer, opened read-only.
pub struct PinnedLb {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, BackendValue>,
    ct: HashMap<MapData, CtKey, CtValue>,
    counters: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for PinnedLb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedLb").finish_non_exhaustive()
    }
}

/// A backend as `skep ctl svc` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendView {
    pub id: u32,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub terminating: bool,
    /// Tracked connections currently on it.
    pub connections: usize,
}

/// A frontend with its backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendView {
    pub frontend: Frontend,
    pub id: u32,
    /// Backends that take new connections.
    pub ready: u32,
    pub affinity_timeout_s: u32,
    pub backends: Vec<BackendView>,
    pub connections: usize,
}

/// Everything at once, frontends sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbSnapshot {
    pub frontends: Vec<FrontendView>,
    pub counters: LbCounters,
    /// Tracked connections in total.
    pub connections: usize,
}

fn open<T>(
    root: &Path,
    name: &'static str,
    convert: impl FnOnce(Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, DataplaneError> {
    let path = root.join("maps").join(name);
    let data = MapData::from_pin(&path).map_err(|e| DataplaneError::Pin {
        path: path.clone(),
        detail: format!(
            "cannot open the pinned map ({e}); is the skep agent's dataplane set up here?"
        ),
    })?;
    let map = Map::from_map_data(data).map_err(|e| DataplaneError::Map {
        map: name,
        detail: e.to_string(),
    })?;
    convert(map).map_err(|e| DataplaneError::Map {
        map: name,
        detail: e.to_string(),
    })
}

impl PinnedLb {
    /// Opens the maps pinned under `root` (`LbSettings::pin_root`).
    pub fn open(root: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            services: open(root, names::MAP_SERVICES, HashMap::try_from)?,
            backends: open(root, names::MAP_BACKENDS, HashMap::try_from)?,
            ct: open(root, names::MAP_CT, HashMap::try_from)?,
            counters: open(root, names::MAP_COUNTERS, PerCpuArray::try_from)?,
        })
    }

    pub fn snapshot(&self) -> Result<LbSnapshot, DataplaneError> {
        let ct = read_conntrack(&self.ct)?;
        let mut per_backend: StdHashMap<u32, usize> = StdHashMap::new();
        let mut per_frontend: StdHashMap<(Ipv4Addr, u16, super::Protocol), usize> =
            StdHashMap::new();
        for e in &ct {
            *per_backend.entry(e.backend_id).or_default() += 1;
            *per_frontend
                .entry((e.frontend.0, e.frontend.1, e.protocol))
                .or_default() += 1;
        }
        let mut backends_of: StdHashMap<u32, Vec<BackendView>> = StdHashMap::new();
        for (id, b) in read_backends(&self.backends)? {
            backends_of
                .entry(b.frontend_id)
                .or_default()
                .push(BackendView {
                    id,
                    addr: b.addr,
                    port: b.port,
                    terminating: b.terminating,
                    connections: per_backend.get(&id).copied().unwrap_or(0),
                });
        }
        let mut frontends: Vec<FrontendView> = read_frontends(&self.services)?
            .into_iter()
            .map(|(fe, state)| {
                let mut backends = backends_of.remove(&state.id).unwrap_or_default();
                backends.sort_by_key(|b| (b.addr, b.port));
                FrontendView {
                    frontend: fe,
                    id: state.id,
                    ready: state.backend_count,
                    affinity_timeout_s: state.affinity_timeout_s,
                    backends,
                    connections: per_frontend
                        .get(&(fe.vip, fe.port, fe.protocol))
                        .copied()
                        .unwrap_or(0),
                }
            })
            .collect();
        frontends.sort_by_key(|f| f.frontend);
        Ok(LbSnapshot {
            frontends,
            counters: read_counters(&self.counters)?,
            connections: ct.len(),
        })
    }
}
