//! Pod networking on this node: an address from the node's pod CIDR
//! (IPAM, persisted), the pod's namespace and veth (the dataplane's
//! `podnet`), and the service load balancer's hooks on the host-side veth.

use crate::pods::{PodNetInfo, PodNetwork};
use skep_dataplane::{
    lb::{KernelDatapath, LoadBalancer},
    podnet,
};
use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// The load balancer shared by the service sync and pod networking.
pub type SharedLb = Arc<Mutex<LoadBalancer<KernelDatapath>>>;

type AllocReply = tokio::sync::oneshot::Sender<Result<std::net::Ipv4Addr, String>>;

pub struct NodeNetwork {
    ipam: Arc<Mutex<crate::ipam::Ipam>>,
    /// Allocation requests, served in batches by one task (one IPAM write
    /// for all the pods that start together).
    alloc: tokio::sync::mpsc::UnboundedSender<(String, AllocReply)>,
    lb: Option<SharedLb>,
    /// TCX mode (SKEP_TC_ATTACH=tcx): attaches pod hooks without the load
    /// balancer's lock (netlink filters, the default, take ~0.3 ms each
    /// under it).
    hooks: Option<Arc<skep_dataplane::lb::PodHooks>>,
    mtu: u32,
    /// The node address: source of the node's own packets to pods.
    node_ip: Option<std::net::Ipv4Addr>,
}

impl std::fmt::Debug for NodeNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeNetwork")
            .field("mtu", &self.mtu)
            .finish_non_exhaustive()
    }
}

/// Most allocations written together.
const ALLOC_BATCH: usize = 256;

impl NodeNetwork {
    /// Needs a tokio runtime (it starts the allocation task).
    pub fn new(ipam: crate::ipam::Ipam, lb: Option<SharedLb>, mtu: u32) -> Self {
        let ipam = Arc::new(Mutex::new(ipam));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, AllocReply)>();
        let batch_ipam = ipam.clone();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < ALLOC_BATCH {
                    match rx.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                let uids: Vec<String> = batch.iter().map(|(u, _)| u.clone()).collect();
                let ipam = batch_ipam.clone();
                // The write (with fsync) is blocking work.
                let result = tokio::task::spawn_blocking(move || {
                    ipam.lock()
                        .map_err(|_| "the IPAM lock is poisoned".to_string())?
                        .allocate_batch(&uids)
                        .map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
                match result {
                    Ok(ips) => {
                        for ((_, reply), ip) in batch.into_iter().zip(ips) {
                            let _ = reply.send(Ok(ip));
                        }
                    }
                    Err(e) => {
                        for (_, reply) in batch {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        let hooks = lb.as_ref().and_then(|lb| {
            let mut lb = lb.lock().ok()?;
            match lb.datapath_mut().pod_hooks() {
                Ok(h) => h.map(Arc::new),
                Err(e) => {
                    tracing::warn!(error = %e, "pod hooks without the lock are unavailable; attaching one pod at a time");
                    None
                }
            }
        });
        Self {
            ipam,
            alloc: tx,
            lb,
            hooks,
            mtu,
            node_ip: None,
        }
    }

    /// Makes the node's own packets to pods come from `ip` (see
    /// `PodNetSpec::host_src`).
    pub fn with_node_ip(mut self, ip: Option<std::net::Ipv4Addr>) -> Self {
        self.node_ip = ip;
        self
    }

    async fn allocate(&self, pod_uid: &str) -> Result<std::net::Ipv4Addr, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.alloc
            .send((pod_uid.to_owned(), tx))
            .map_err(|_| "the IP allocator stopped".to_string())?;
        rx.await
            .map_err(|_| "the IP allocator stopped".to_string())?
    }

    /// Runs `f` on the IPAM state off the async workers (it writes to disk).
    async fn with_ipam<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut crate::ipam::Ipam) -> Result<T, crate::ipam::IpamError> + Send + 'static,
    ) -> Result<T, String> {
        let ipam = self.ipam.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = ipam
                .lock()
                .map_err(|_| "the IPAM lock is poisoned".to_string())?;
            f(&mut guard).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

#[async_trait::async_trait]
impl PodNetwork for NodeNetwork {
    async fn setup(&self, pod_uid: &str) -> Result<PodNetInfo, String> {
        let ip = self.allocate(pod_uid).await?;
        let t0 = std::time::Instant::now();
        let mut spec = podnet::PodNetSpec::new(pod_uid, ip, self.mtu);
        if let Some(src) = self.node_ip {
            spec = spec.with_host_source(src);
        }
        let net = podnet::setup(&spec).await.map_err(|e| e.to_string())?;
        let t1 = std::time::Instant::now();
        if let Some(hooks) = &self.hooks {
            let (hooks, veth) = (hooks.clone(), net.host_veth.clone());
            tokio::task::spawn_blocking(move || hooks.attach(&veth))
                .await
                .map_err(|e| format!("attaching the service load balancer: {e}"))?
                .map_err(|e| {
                    format!(
                        "attaching the service load balancer to {}: {e}",
                        net.host_veth
                    )
                })?;
        } else if let Some(lb) = &self.lb {
            // TC attachment is blocking netlink/bpf work under the load
            // balancer's lock: keep it off the async workers.
            let (lb, veth) = (lb.clone(), net.host_veth.clone());
            tokio::task::spawn_blocking(move || {
                let mut lb = lb
                    .lock()
                    .map_err(|_| "the load balancer lock is poisoned".to_string())?;
                lb.datapath_mut()
                    .attach_pod(&veth)
                    .map_err(|e| format!("attaching the service load balancer to {veth}: {e}"))
            })
            .await
            .map_err(|e| format!("attaching the service load balancer: {e}"))??;
        }
        tracing::debug!(
            pod_uid,
            podnet_ms = (t1 - t0).as_millis() as u64,
            lb_attach_ms = t1.elapsed().as_millis() as u64,
            "pod network ready"
        );
        Ok(PodNetInfo {
            ip: IpAddr::V4(ip),
            netns: net.netns_path,
        })
    }

    async fn teardown(&self, pod_uid: &str) -> Result<(), String> {
        podnet::teardown(pod_uid).await.map_err(|e| e.to_string())?;
        // The interface is gone; its links' pins go too.
        if let Some(hooks) = &self.hooks {
            hooks.forget(&podnet::host_veth_name(pod_uid));
        }
        let uid = pod_uid.to_owned();
        self.with_ipam(move |ipam| ipam.release(&uid)).await
    }

    async fn reconcile(&self, live: &[String]) -> Result<usize, String> {
        // Only what this node's IPAM recorded is considered: other agents
        // on the same machine (test clusters, several nodes in namespaces)
        // have their own pods, which are not this agent's to remove.
        let live = live.to_vec();
        let stale = self.with_ipam(move |ipam| ipam.reconcile(live)).await?;
        for (uid, ip) in &stale {
            if let Err(e) = podnet::teardown(uid).await {
                tracing::warn!(pod_uid = %uid, %ip, error = %e, "removing a stale pod network failed");
            }
        }
        Ok(stale.len())
    }
}
