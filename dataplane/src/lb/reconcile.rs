//! Desired state → maps. The reconcile keeps, per frontend, the ids it
//! allocated and the Maglev row it last wrote, so a delta touches only what
//! changed. Write order keeps the datapath consistent at every instant for
//! the kernel programs reading it concurrently: new backends first, then the
//! Maglev row, then the frontend (its backend count), and removed backends
//! last.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use super::{
    BackendEntry, Datapath, EndpointState, Frontend, FrontendState, Service, ServicePort, maglev,
};
use crate::DataplaneError;

#[derive(Debug)]
struct FrontendRec {
    id: u32,
    /// The Service that owns it (None: adopted from pinned maps and not yet
    /// claimed by a resync).
    service: Option<String>,
    state: FrontendState,
    /// (addr, port) → (backend id, terminating).
    backends: HashMap<(Ipv4Addr, u16), (u32, bool)>,
    /// Backend id per slot as last written; None = unknown (adopted or new
    /// id): the next write covers the whole row.
    table: Option<Vec<u32>>,
    /// Whether the frontend entry is in the map.
    written: bool,
}

/// Id allocator: reuses released ids first (lowest first) so ids stay
/// dense, else hands out the next never-used one; O(log n) per operation.
#[derive(Debug)]
struct Ids {
    used: HashSet<u32>,
    /// Released ids below `next`.
    free: BTreeSet<u32>,
    next: u32,
    /// Exclusive upper bound.
    end: u32,
}

impl Ids {
    fn new(first: u32, end: u32) -> Self {
        Self {
            used: HashSet::new(),
            free: BTreeSet::new(),
            next: first,
            end,
        }
    }

    fn take(&mut self) -> Option<u32> {
        while let Some(id) = self.free.pop_first() {
            if self.used.insert(id) {
                return Some(id);
            }
        }
        while self.next < self.end {
            let id = self.next;
            self.next += 1;
            // Ids reserved by adoption are skipped.
            if self.used.insert(id) {
                return Some(id);
            }
        }
        None
    }

    fn reserve(&mut self, id: u32) {
        self.used.insert(id);
    }

    fn release(&mut self, id: u32) {
        if self.used.remove(&id) && id < self.next {
            self.free.insert(id);
        }
    }

    fn len(&self) -> usize {
        self.used.len()
    }
}

/// The load balancer's control loop state over a [`Datapath`].
#[derive(Debug)]
pub struct LoadBalancer<D: Datapath> {
    dp: D,
    services: BTreeMap<String, Service>,
    /// Frontends programmed for each Service (its ClusterIP ports, and its
    /// NodePorts on every node address).
    service_frontends: HashMap<String, Vec<Frontend>>,
    /// Addresses of this node that NodePorts listen on.
    node_addrs: Vec<Ipv4Addr>,
    frontends: HashMap<Frontend, FrontendRec>,
    frontend_ids: Ids,
    backend_ids: Ids,
}

impl<D: Datapath> LoadBalancer<D> {
    /// Takes over a datapath, adopting whatever it already holds (pinned
    /// maps of a previous agent): ids are kept, so open connections keep
    /// their conntrack entries and backends. Adopted frontends that the
    /// next [`Self::resync`] does not claim are removed then.
    pub fn new(dp: D) -> Result<Self, DataplaneError> {
        let mut lb = Self {
            frontend_ids: Ids::new(0, dp.max_frontends()),
            // Backend id 0 means "empty slot" in the Maglev map.
            backend_ids: Ids::new(1, dp.max_backends().saturating_add(1)),
            dp,
            services: BTreeMap::new(),
            service_frontends: HashMap::new(),
            node_addrs: Vec::new(),
            frontends: HashMap::new(),
        };
        let mut by_id = HashMap::new();
        for (fe, state) in lb.dp.frontends()? {
            lb.frontend_ids.reserve(state.id);
            by_id.insert(state.id, fe);
            lb.frontends.insert(
                fe,
                FrontendRec {
                    id: state.id,
                    service: None,
                    state,
                    backends: HashMap::new(),
                    table: None,
                    written: true,
                },
            );
        }
        for (id, b) in lb.dp.backends()? {
            let owner = by_id
                .get(&b.frontend_id)
                .and_then(|fe| lb.frontends.get_mut(fe));
            match owner {
                Some(rec) => {
                    lb.backend_ids.reserve(id);
                    rec.backends.insert((b.addr, b.port), (id, b.terminating));
                }
                // An orphan (a crash between writes): nothing can use it.
                None => lb.dp.delete_backend(id)?,
            }
        }
        tracing::info!(
            frontends = lb.frontends.len(),
            backends = lb.backend_ids.len(),
            "load balancer adopted the datapath's state"
        );
        Ok(lb)
    }

    pub fn datapath(&self) -> &D {
        &self.dp
    }

    pub fn datapath_mut(&mut self) -> &mut D {
        &mut self.dp
    }

    /// The desired Services.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    /// Frontend id of a Service port, if programmed.
    pub fn frontend_id(&self, fe: &Frontend) -> Option<u32> {
        self.frontends.get(fe).map(|r| r.id)
    }

    /// Makes the datapath hold exactly `services` (the full resync at start).
    pub fn resync(&mut self, services: Vec<Service>) -> Result<(), DataplaneError> {
        let wanted: BTreeMap<String, Service> =
            services.into_iter().map(|s| (s.name.clone(), s)).collect();
        let stale: Vec<String> = self
            .services
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in stale {
            self.delete_service(&name)?;
        }
        // Adopted frontends with no owner are claimed by the upserts below
        // or removed afterwards.
        for svc in wanted.into_values() {
            self.upsert_service(svc)?;
        }
        let orphans: Vec<Frontend> = self
            .frontends
            .iter()
            .filter(|(_, r)| r.service.is_none())
            .map(|(fe, _)| *fe)
            .collect();
        for fe in orphans {
            self.remove_frontend(fe)?;
        }
        Ok(())
    }

    /// Sets the node addresses NodePorts answer on (the node's external
    /// interface addresses) and reprograms every Service with NodePorts.
    pub fn set_node_addresses(&mut self, addrs: Vec<Ipv4Addr>) -> Result<(), DataplaneError> {
        self.node_addrs = addrs;
        let with_node_ports: Vec<Service> = self
            .services
            .values()
            .filter(|s| s.ports.iter().any(|p| p.node_port.is_some()))
            .cloned()
            .collect();
        for svc in with_node_ports {
            self.upsert_service(svc)?;
        }
        Ok(())
    }

    /// Adds or updates one Service.
    pub fn upsert_service(&mut self, svc: Service) -> Result<(), DataplaneError> {
        let wanted = frontends_of(&svc, &self.node_addrs);
        let new_fes: BTreeSet<Frontend> = wanted.iter().map(|(fe, _, _)| *fe).collect();
        for fe in &new_fes {
            if let Some(owner) = self.frontends.get(fe).and_then(|r| r.service.as_ref())
                && *owner != svc.name
            {
                return Err(DataplaneError::Config(format!(
                    "service {} wants {}:{}/{:?}, which service {owner} already has",
                    svc.name, fe.vip, fe.port, fe.protocol
                )));
            }
        }
        if let Some(old) = self.service_frontends.get(&svc.name) {
            let gone: Vec<Frontend> = old
                .iter()
                .filter(|fe| !new_fes.contains(fe))
                .copied()
                .collect();
            for fe in gone {
                self.remove_frontend(fe)?;
            }
        }
        for (fe, port, external) in &wanted {
            let local_only = if *external {
                svc.external_traffic_local
            } else {
                svc.internal_traffic_local
            };
            self.apply_frontend(&svc, *fe, port, local_only, *external)?;
        }
        self.service_frontends
            .insert(svc.name.clone(), new_fes.into_iter().collect());
        self.services.insert(svc.name.clone(), svc);
        Ok(())
    }

    /// Removes one Service (unknown names are fine).
    pub fn delete_service(&mut self, name: &str) -> Result<(), DataplaneError> {
        self.services.remove(name);
        for fe in self.service_frontends.remove(name).unwrap_or_default() {
            self.remove_frontend(fe)?;
        }
        Ok(())
    }

    fn remove_frontend(&mut self, fe: Frontend) -> Result<(), DataplaneError> {
        let Some(rec) = self.frontends.remove(&fe) else {
            return Ok(());
        };
        // Frontend first: no new connection can pick a backend being removed.
        self.dp.delete_frontend(fe)?;
        for (id, _) in rec.backends.values() {
            self.dp.delete_backend(*id)?;
            self.backend_ids.release(*id);
        }
        self.frontend_ids.release(rec.id);
        tracing::debug!(vip = %fe.vip, port = fe.port, "frontend removed");
        Ok(())
    }

    fn apply_frontend(
        &mut self,
        svc: &Service,
        fe: Frontend,
        port: &ServicePort,
        local_only: bool,
        external: bool,
    ) -> Result<(), DataplaneError> {
        if !self.frontends.contains_key(&fe) {
            let id = self
                .frontend_ids
                .take()
                .ok_or_else(|| DataplaneError::Full {
                    what: "frontends (service ports)",
                    limit: self.dp.max_frontends(),
                })?;
            self.frontends.insert(
                fe,
                FrontendRec {
                    id,
                    service: None,
                    state: FrontendState {
                        id,
                        backend_count: 0,
                        affinity_timeout_s: 0,
                        external: false,
                    },
                    backends: HashMap::new(),
                    table: None,
                    written: false,
                },
            );
        }
        let Some(rec) = self.frontends.get_mut(&fe) else {
            // Inserted just above.
            return Ok(());
        };
        rec.service = Some(svc.name.clone());

        // Desired backends; an address listed twice counts once, Ready wins.
        let mut desired: BTreeMap<(Ipv4Addr, u16), bool> = BTreeMap::new();
        let mut remote: BTreeSet<Ipv4Addr> = BTreeSet::new();
        for ep in svc.endpoints.iter().filter(|ep| ep.local || !local_only) {
            let terminating = ep.state == EndpointState::Terminating;
            let e = desired
                .entry((ep.addr, port.target_port))
                .or_insert(terminating);
            *e &= terminating;
            if !ep.local {
                remote.insert(ep.addr);
            }
        }

        // 1. New backends and Terminating → Ready. Ready → Terminating waits
        //    until the Maglev row no longer points at the backend: until then
        //    the kernel would find the slot unusable and refuse.
        let mut newly_terminating = Vec::new();
        for (&(addr, bport), &terminating) in &desired {
            let entry = BackendEntry {
                addr,
                port: bport,
                terminating,
                remote: remote.contains(&addr),
                frontend_id: rec.id,
            };
            match rec.backends.get(&(addr, bport)) {
                Some(&(_, t)) if t == terminating => {}
                Some(&(id, _)) => {
                    if terminating {
                        newly_terminating.push((id, entry));
                    } else {
                        self.dp.put_backend(id, entry)?;
                    }
                    rec.backends.insert((addr, bport), (id, terminating));
                }
                None => {
                    let id = self
                        .backend_ids
                        .take()
                        .ok_or_else(|| DataplaneError::Full {
                            what: "backends",
                            limit: self.dp.max_backends(),
                        })?;
                    self.dp.put_backend(id, entry)?;
                    rec.backends.insert((addr, bport), (id, terminating));
                }
            }
        }

        // 2. The Maglev row over ready backends.
        let ready: Vec<((Ipv4Addr, u16), u32)> = rec
            .backends
            .iter()
            .filter(|(k, (_, terminating))| desired.contains_key(k) && !terminating)
            .map(|(k, (id, _))| (*k, *id))
            .collect();
        let size = self.dp.maglev_size();
        if !ready.is_empty() {
            let names: Vec<String> = ready.iter().map(|((a, p), _)| format!("{a}:{p}")).collect();
            let table: Vec<u32> = maglev::table(&names, size)
                .into_iter()
                .map(|i| ready[i as usize].1)
                .collect();
            let changes: Vec<(u32, u32)> = match &rec.table {
                Some(old) if old.len() == table.len() => table
                    .iter()
                    .zip(old)
                    .enumerate()
                    .filter(|(_, (n, o))| n != o)
                    .map(|(slot, (n, _))| (slot as u32, *n))
                    .collect(),
                _ => table
                    .iter()
                    .enumerate()
                    .map(|(s, b)| (s as u32, *b))
                    .collect(),
            };
            if !changes.is_empty() {
                self.dp.write_maglev(rec.id, &changes)?;
            }
            rec.table = Some(table);
        }

        // 3. The frontend itself.
        let affinity_timeout_s = svc
            .session_affinity
            .map(|t| u32::try_from(t.as_secs().max(1)).unwrap_or(u32::MAX))
            .unwrap_or(0);
        let state = FrontendState {
            id: rec.id,
            backend_count: u32::try_from(ready.len()).unwrap_or(u32::MAX),
            affinity_timeout_s,
            external,
        };
        if state != rec.state || !rec.written {
            self.dp.put_frontend(fe, state)?;
            rec.state = state;
            rec.written = true;
        }

        // 4. Ready → Terminating, then removed backends, last.
        for (id, entry) in newly_terminating {
            self.dp.put_backend(id, entry)?;
        }
        let removed: Vec<((Ipv4Addr, u16), u32)> = rec
            .backends
            .iter()
            .filter(|(k, _)| !desired.contains_key(k))
            .map(|(k, (id, _))| (*k, *id))
            .collect();
        for (k, id) in removed {
            self.dp.delete_backend(id)?;
            self.backend_ids.release(id);
            rec.backends.remove(&k);
        }
        tracing::debug!(
            service = %svc.name, vip = %fe.vip, port = fe.port,
            backends = rec.backends.len(), ready = state.backend_count,
            "frontend programmed"
        );
        Ok(())
    }
}

/// Every frontend of a Service, with whether it is external: (VIP, port)
/// per port; (external IP, port) per port and ExternalIP/LoadBalancer IP;
/// (node address, NodePort) per port with a NodePort and node address.
fn frontends_of<'a>(
    svc: &'a Service,
    node_addrs: &[Ipv4Addr],
) -> Vec<(Frontend, &'a ServicePort, bool)> {
    let mut out = Vec::new();
    for p in &svc.ports {
        out.push((
            Frontend {
                vip: svc.vip,
                port: p.port,
                protocol: p.protocol,
            },
            p,
            false,
        ));
        for &addr in &svc.external_ips {
            out.push((
                Frontend {
                    vip: addr,
                    port: p.port,
                    protocol: p.protocol,
                },
                p,
                true,
            ));
        }
        if let Some(node_port) = p.node_port {
            for &addr in node_addrs {
                out.push((
                    Frontend {
                        vip: addr,
                        port: node_port,
                        protocol: p.protocol,
                    },
                    p,
                    true,
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::lb::{Endpoint, FakeDatapath, Protocol};
    use std::time::Duration;

    const M: u32 = 251;

    fn svc(name: &str, vip: u8, ports: &[u16], eps: &[(u8, EndpointState)]) -> Service {
        Service {
            name: name.into(),
            vip: Ipv4Addr::new(10, 43, 0, vip),
            ports: ports
                .iter()
                .map(|&p| ServicePort {
                    port: p,
                    protocol: Protocol::Tcp,
                    target_port: p + 8000,
                    node_port: None,
                })
                .collect(),
            endpoints: eps
                .iter()
                .map(|&(i, state)| Endpoint {
                    addr: Ipv4Addr::new(10, 42, 0, i),
                    state,
                    local: true,
                })
                .collect(),
            session_affinity: None,
            internal_traffic_local: false,
            external_traffic_local: false,
            external_ips: Vec::new(),
        }
    }

    fn fe(vip: u8, port: u16) -> Frontend {
        Frontend {
            vip: Ipv4Addr::new(10, 43, 0, vip),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn backends_of(dp: &FakeDatapath, f: &Frontend) -> BTreeSet<Ipv4Addr> {
        (0..M)
            .filter_map(|s| dp.lookup(f, s))
            .map(|b| b.addr)
            .collect()
    }

    use EndpointState::{Ready, Terminating};

    #[test]
    fn resync_programs_every_port_and_backend() {
        let mut lb = LoadBalancer::new(FakeDatapath::new(M, 16, 64)).unwrap();
        lb.resync(vec![
            svc("a", 1, &[80, 443], &[(10, Ready), (11, Ready)]),
            svc("b", 2, &[53], &[(12, Ready)]),
        ])
        .unwrap();
        let dp = lb.datapath();
        assert_eq!(dp.frontends.len(), 3);
        assert_eq!(dp.backends.len(), 5, "one backend per frontend × endpoint");
        assert_eq!(backends_of(dp, &fe(1, 80)).len(), 2);
        assert_eq!(backends_of(dp, &fe(2, 53)).len(), 1);
        let b = dp.lookup(&fe(1, 443), 0).unwrap();
        assert_eq!(b.port, 8443);
        // Resync drops what is no longer desired.
        lb.resync(vec![svc("b", 2, &[53], &[(12, Ready)])]).unwrap();
        assert_eq!(lb.datapath().frontends.len(), 1);
        assert_eq!(lb.datapath().backends.len(), 1);
    }

    #[test]
    fn deltas_touch_only_what_changed() {
        let mut lb = LoadBalancer::new(FakeDatapath::new(M, 16, 64)).unwrap();
        lb.upsert_service(svc("a", 1, &[80], &[(10, Ready), (11, Ready), (12, Ready)]))
            .unwrap();
        let writes = lb.datapath().maglev_writes;
        assert_eq!(writes, M as usize);
        // Same state again: nothing written.
        lb.upsert_service(svc("a", 1, &[80], &[(10, Ready), (11, Ready), (12, Ready)]))
            .unwrap();
        assert_eq!(lb.datapath().maglev_writes, writes);
        // Removing one of three backends rewrites ≈ 1/3 of the row.
        lb.upsert_service(svc("a", 1, &[80], &[(10, Ready), (11, Ready)]))
            .unwrap();
        let delta = lb.datapath().maglev_writes - writes;
        assert!(delta < M as usize / 2, "rewrote {delta} of {M} slots");
        assert_eq!(lb.datapath().backends.len(), 2);
        lb.delete_service("a").unwrap();
        assert!(lb.datapath().frontends.is_empty() && lb.datapath().backends.is_empty());
    }

    #[test]
    fn terminating_backends_stay_but_leave_the_table() {
        let mut lb = LoadBalancer::new(FakeDatapath::new(M, 16, 64)).unwrap();
        lb.upsert_service(svc("a", 1, &[80], &[(10, Ready), (11, Terminating)]))
            .unwrap();
        let dp = lb.datapath();
        assert_eq!(dp.backends.len(), 2, "existing connections still need it");
        assert_eq!(dp.frontends[&fe(1, 80)].backend_count, 1);
        assert_eq!(
            backends_of(dp, &fe(1, 80)),
            [Ipv4Addr::new(10, 42, 0, 10)].into()
        );
        lb.upsert_service(svc("a", 1, &[80], &[(11, Terminating)]))
            .unwrap();
        assert_eq!(
            lb.datapath().frontends[&fe(1, 80)].backend_count,
            0,
            "refused"
        );
    }

    #[test]
    fn writes_are_ordered_so_the_kernel_never_sees_a_dangling_slot() {
        use crate::lb::FakeOp;
        let mut lb = LoadBalancer::new(FakeDatapath::new(M, 16, 64)).unwrap();
        lb.upsert_service(svc("a", 1, &[80], &[(10, Ready), (11, Ready)]))
            .unwrap();
        // Adding: backend before the row, row before the frontend.
        let kinds: Vec<&str> = lb
            .datapath()
            .log
            .iter()
            .map(|op| match op {
                FakeOp::PutBackend(..) => "backend",
                FakeOp::WriteMaglev(..) => "row",
                FakeOp::PutFrontend(..) => "frontend",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["backend", "backend", "row", "frontend"]);
        // Ready → Terminating: the row drops it before the flag is set.
        lb.datapath_mut().log.clear();
        lb.upsert_service(svc("a", 1, &[80], &[(10, Ready), (11, Terminating)]))
            .unwrap();
        let log = &lb.datapath().log;
        let row = log
            .iter()
            .position(|op| matches!(op, FakeOp::WriteMaglev(..)))
            .unwrap();
        let flag = log
            .iter()
            .position(|op| matches!(op, FakeOp::PutBackend(_, b) if b.terminating))
            .unwrap();
        assert!(row < flag, "{log:?}");
        // Removal: the row and frontend change before the backend goes.
        lb.datapath_mut().log.clear();
        lb.upsert_service(svc("a", 1, &[80], &[(10, Ready)]))
            .unwrap();
        let log = &lb.datapath().log;
        assert!(
            matches!(log.last(), Some(FakeOp::DeleteBackend(_))),
            "{log:?}"
        );
    }

    #[test]
    fn node_ports_answer_on_every_node_address() {
        let mut lb = LoadBalancer::new(FakeDatapath::new(M, 16, 64)).unwrap();
        let mut s = svc("a", 1, &[80], &[(10, Ready)]);
        s.ports[0].node_port = Some(30080);
        lb.upsert_service(s.clone()).unwrap();
        assert_eq!(lb.datapath().frontends.len(), 1, "no node address yet");
        let node = |i| Ipv4Addr::new(192, 168, 50, i);
        lb.set_node_addresses(vec![node(1), node(2)]).unwrap();
        let np = |i| Frontend {
            vip: node(i),
            port: 30080,
            protocol: Protocol::Tcp,
        };
        assert_eq!(lb.datapath().frontends.len(), 3);
        assert_eq!(lb.datapath().lookup(&np(2), 0).unwrap().port, 8080);
        // A node address goes away: its NodePort frontends go with it.
        lb.set_node_addresses(vec![node(1)]).unwrap();
        assert!(lb.datapath().frontends.contains_key(&np(1)));
        assert!(!lb.datapath().frontends.contains_key(&np(2)));
        s.ports[0].node_port = None;
        lb.upsert_service(s).unwrap();
        assert_eq!(lb.datapath().frontends.len(), 1);
        lb.delete_service("a").unwrap();
        assert!(lb.datapath().frontends.is_empty() && lb.datapath().backends.is_empty());
    }

    #[test]
    fn traffic_policies_local_use_only_this_nodes_endpoints() {
        let mut lb = LoadBalancer::new(FakeDatapath::new(M, 16, 64)).unwrap();
        lb.set_node_addresses(vec![Ipv4Addr::new(192, 168, 50, 1)])
            .unwrap();
        let mut s = svc("a", 1, &[80], &[(10, Ready), (11, Ready)]);
        s.endpoints[1].local = false;
        s.ports[0].node_port = Some(30080);
        let cluster_ip = fe(1, 80);
        let node_port = Frontend {
            vip: Ipv4Addr::new(192, 168, 50, 1),
            port: 30080,
            protocol: Protocol::Tcp,
        };
        lb.upsert_service(s.clone()).unwrap();
        assert_eq!(backends_of(lb.datapath(), &cluster_ip).len(), 2);
        assert_eq!(backends_of(lb.datapath(), &node_port).len(), 2);
        s.external_traffic_local = true;
        lb.upsert_service(s.clone()).unwrap();
        assert_eq!(backends_of(lb.datapath(), &cluster_ip).len(), 2);
        assert_eq!(
            backends_of(lb.datapath(), &node_port),
            [Ipv4Addr::new(10, 42, 0, 10)].into()
        );
        s.internal_traffic_local = true;
        s.endpoints[0].local = false;
        lb.upsert_service(s).unwrap();
        let dp = lb.datapath();
        assert_eq!(
            dp.frontends[&cluster_ip].backend_count, 0,
            "no local endpoint: refused"
        );
        assert_eq!(dp.frontends[&node_port].backend_count, 0);
    }

    #[test]
    fn external_ips_are_frontends_with_the_external_policy() {
        let mut lb = LoadBalancer::new(FakeDatapath::new(M, 16, 64)).unwrap();
        let mut s = svc("a", 1, &[80, 443], &[(10, Ready), (11, Ready)]);
        s.endpoints[1].local = false;
        s.external_traffic_local = true;
        let lb_ip = Ipv4Addr::new(192, 168, 60, 7);
        s.external_ips = vec![lb_ip];
        lb.upsert_service(s.clone()).unwrap();
        let ext = |port| Frontend {
            vip: lb_ip,
            port,
            protocol: Protocol::Tcp,
        };
        assert_eq!(lb.datapath().frontends.len(), 4);
        assert_eq!(
            backends_of(lb.datapath(), &ext(443)),
            [Ipv4Addr::new(10, 42, 0, 10)].into()
        );
        assert_eq!(
            backends_of(lb.datapath(), &fe(1, 443)).len(),
            2,
            "ClusterIP: all"
        );
        s.external_ips.clear();
        lb.upsert_service(s).unwrap();
        assert_eq!(lb.datapath().frontends.len(), 2);
    }

    #[test]
    fn a_service_without_endpoints_is_programmed_to_refuse() {
        let mut lb = LoadBalancer::new(FakeDatapath::new(M, 16, 64)).unwrap();
        lb.upsert_service(svc("a", 1, &[80], &[])).unwrap();
        assert_eq!(lb.datapath().frontends[&fe(1, 80)].backend_count, 0);
    }

    #[test]
    fn affinity_timeout_is_programmed() {
        let mut lb = LoadBalancer::new(FakeDatapath::new(M, 16, 64)).unwrap();
        let mut s = svc("a", 1, &[80], &[(10, Ready)]);
        s.session_affinity = Some(Duration::from_secs(10800));
        lb.upsert_service(s).unwrap();
        assert_eq!(
            lb.datapath().frontends[&fe(1, 80)].affinity_timeout_s,
            10800
        );
    }

    #[test]
    fn a_new_loadbalancer_adopts_existing_state_and_keeps_ids() {
        let mut lb = LoadBalancer::new(FakeDatapath::new(M, 16, 64)).unwrap();
        let services = vec![
            svc("a", 1, &[80], &[(10, Ready), (11, Ready)]),
            svc("b", 2, &[80], &[(12, Ready)]),
        ];
        lb.resync(services.clone()).unwrap();
        let before_fe = lb.datapath().frontends.clone();
        let before_be = lb.datapath().backends.clone();
        let writes = lb.datapath().maglev_writes;
        // "Restart": a new LoadBalancer over the same datapath.
        let dp = std::mem::take(lb.datapath_mut());
        let mut lb = LoadBalancer::new(FakeDatapath {
            maglev_writes: 0,
            ..dp
        })
        .unwrap();
        lb.resync(services).unwrap();
        assert_eq!(lb.datapath().frontends, before_fe, "frontend ids kept");
        assert_eq!(lb.datapath().backends, before_be, "backend ids kept");
        // Tables are rewritten in full once (their content is unknown after
        // adoption) with identical values.
        assert_eq!(lb.datapath().maglev_writes, writes);
        // Adopted frontends nobody claims are removed.
        lb.resync(vec![]).unwrap();
        assert!(lb.datapath().frontends.is_empty());
    }

    #[test]
    fn two_services_cannot_share_a_frontend() {
        let mut lb = LoadBalancer::new(FakeDatapath::new(M, 16, 64)).unwrap();
        lb.upsert_service(svc("a", 1, &[80], &[(10, Ready)]))
            .unwrap();
        let err = lb
            .upsert_service(svc("b", 1, &[80], &[(11, Ready)]))
            .unwrap_err();
        assert!(err.to_string().contains("already has"), "{err}");
    }

    #[test]
    fn limits_are_reported() {
        let mut lb = LoadBalancer::new(FakeDatapath::new(M, 1, 64)).unwrap();
        lb.upsert_service(svc("a", 1, &[80], &[(10, Ready)]))
            .unwrap();
        let err = lb
            .upsert_service(svc("b", 2, &[80], &[(11, Ready)]))
            .unwrap_err();
        assert!(matches!(err, DataplaneError::Full { .. }), "{err}");
    }
}
