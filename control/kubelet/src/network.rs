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

pub struct NodeNetwork {
    ipam: tokio::sync::Mutex<crate::ipam::Ipam>,
    lb: Option<SharedLb>,
    mtu: u32,
}

impl std::fmt::Debug for NodeNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeNetwork")
            .field("mtu", &self.mtu)
            .finish_non_exhaustive()
    }
}

impl NodeNetwork {
    pub fn new(ipam: crate::ipam::Ipam, lb: Option<SharedLb>, mtu: u32) -> Self {
        Self {
            ipam: tokio::sync::Mutex::new(ipam),
            lb,
            mtu,
        }
    }
}

#[async_trait::async_trait]
impl PodNetwork for NodeNetwork {
    async fn setup(&self, pod_uid: &str) -> Result<PodNetInfo, String> {
        let ip = self
            .ipam
            .lock()
            .await
            .allocate(pod_uid)
            .map_err(|e| e.to_string())?;
        let net = podnet::setup(&podnet::PodNetSpec::new(pod_uid, ip, self.mtu))
            .await
            .map_err(|e| e.to_string())?;
        if let Some(lb) = &self.lb {
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
        Ok(PodNetInfo {
            ip: IpAddr::V4(ip),
            netns: net.netns_path,
        })
    }

    async fn teardown(&self, pod_uid: &str) -> Result<(), String> {
        podnet::teardown(pod_uid).await.map_err(|e| e.to_string())?;
        self.ipam
            .lock()
            .await
            .release(pod_uid)
            .map_err(|e| e.to_string())
    }

    async fn reconcile(&self, live: &[String]) -> Result<usize, String> {
        // Only what this node's IPAM recorded is considered: other agents
        // on the same machine (test clusters, several nodes in namespaces)
        // have their own pods, which are not this agent's to remove.
        let mut ipam = self.ipam.lock().await;
        let stale = ipam
            .reconcile(live.iter().cloned())
            .map_err(|e| e.to_string())?;
        drop(ipam);
        for (uid, ip) in &stale {
            if let Err(e) = podnet::teardown(uid).await {
                tracing::warn!(pod_uid = %uid, %ip, error = %e, "removing a stale pod network failed");
            }
        }
        Ok(stale.len())
    }
}
