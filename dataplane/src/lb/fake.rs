//! An in-memory [`Datapath`] for unit tests of the reconcile logic: it keeps
//! exactly what the kernel maps would hold and counts the writes.

use std::collections::{BTreeMap, HashMap};

use super::{
    BackendEntry, ConntrackEntry, CtGcStats, CtTimeouts, Datapath, Frontend, FrontendState,
    LbCounters,
};
use crate::DataplaneError;

#[derive(Debug, Default)]
pub struct FakeDatapath {
    pub maglev_size: u32,
    pub max_frontends: u32,
    pub max_backends: u32,
    pub frontends: BTreeMap<Frontend, FrontendState>,
    pub backends: BTreeMap<u32, BackendEntry>,
    /// frontend id → row.
    pub maglev: HashMap<u32, Vec<u32>>,
    /// Number of Maglev slots written so far (to test incremental updates).
    pub maglev_writes: usize,
    /// Every write, in order (to test the write order).
    pub log: Vec<FakeOp>,
}

/// A write recorded by [`FakeDatapath`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeOp {
    PutFrontend(Frontend, FrontendState),
    DeleteFrontend(Frontend),
    PutBackend(u32, BackendEntry),
    DeleteBackend(u32),
    /// Frontend id and number of slots.
    WriteMaglev(u32, usize),
}

impl FakeDatapath {
    pub fn new(maglev_size: u32, max_frontends: u32, max_backends: u32) -> Self {
        Self {
            maglev_size,
            max_frontends,
            max_backends,
            ..Self::default()
        }
    }

    /// The backend a slot of a frontend points at, as the kernel would
    /// resolve it.
    pub fn lookup(&self, fe: &Frontend, slot: u32) -> Option<BackendEntry> {
        let state = self.frontends.get(fe)?;
        if state.backend_count == 0 {
            return None;
        }
        let id = *self.maglev.get(&state.id)?.get(slot as usize)?;
        let b = self.backends.get(&id)?;
        (b.frontend_id == state.id && !b.terminating).then_some(*b)
    }
}

impl Datapath for FakeDatapath {
    fn maglev_size(&self) -> u32 {
        self.maglev_size
    }
    fn max_frontends(&self) -> u32 {
        self.max_frontends
    }
    fn max_backends(&self) -> u32 {
        self.max_backends
    }
    fn frontends(&self) -> Result<Vec<(Frontend, FrontendState)>, DataplaneError> {
        Ok(self.frontends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backends(&self) -> Result<Vec<(u32, BackendEntry)>, DataplaneError> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_frontend(&mut self, fe: Frontend, state: FrontendState) -> Result<(), DataplaneError> {
        self.frontends.insert(fe, state);
        self.log.push(FakeOp::PutFrontend(fe, state));
        Ok(())
    }
    fn delete_frontend(&mut self, fe: Frontend) -> Result<(), DataplaneError> {
        self.frontends.remove(&fe);
        self.log.push(FakeOp::DeleteFrontend(fe));
        Ok(())
    }
    fn put_backend(&mut self, id: u32, backend: BackendEntry) -> Result<(), DataplaneError> {
        self.backends.insert(id, backend);
        self.log.push(FakeOp::PutBackend(id, backend));
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.backends.remove(&id);
        self.log.push(FakeOp::DeleteBackend(id));
        Ok(())
    }
    fn write_maglev(
        &mut self,
        frontend_id: u32,
        slots: &[(u32, u32)],
    ) -> Result<(), DataplaneError> {
        let size = self.maglev_size as usize;
        let row = self
            .maglev
            .entry(frontend_id)
            .or_insert_with(|| vec![0; size]);
        for &(slot, id) in slots {
            if let Some(s) = row.get_mut(slot as usize) {
                *s = id;
            }
        }
        self.maglev_writes += slots.len();
        self.log.push(FakeOp::WriteMaglev(frontend_id, slots.len()));
        Ok(())
    }
    fn conntrack(&self) -> Result<Vec<ConntrackEntry>, DataplaneError> {
        Ok(Vec::new())
    }
    fn gc_conntrack(&mut self, _timeouts: &CtTimeouts) -> Result<CtGcStats, DataplaneError> {
        Ok(CtGcStats::default())
    }
    fn flush_conntrack(&mut self) -> Result<usize, DataplaneError> {
        Ok(0)
    }
    fn counters(&self) -> Result<LbCounters, DataplaneError> {
        Ok(LbCounters::default())
    }
}
