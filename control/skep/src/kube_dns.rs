//! The `kube-dns` Service: the cluster DNS at 10.43.0.10:53 for pods.
//!
//! The DNS server runs inside `skep server` on the host network, so the
//! Service has no selector; the server keeps its EndpointSlice pointing at
//! its own node address and DNS port. Pods reach it through the eBPF load
//! balancer like any other Service.

use anyhow::Result;
use serde_json::json;
use skep_controllers::client::{Client, ENDPOINT_SLICES, SERVICES};
use std::{net::IpAddr, sync::Arc};

const NS: &str = "kube-system";
const SLICE: &str = "kube-dns-skep";

/// Creates the Service and its EndpointSlice, or updates the slice to the
/// current node address and port.
pub async fn ensure(
    api: &Arc<skep_apiserver::api::Api>,
    node_ip: &str,
    port: u16,
    cluster_ip: IpAddr,
) -> Result<()> {
    let client = Client::new(api.clone());
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": NS,
                     "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS", "kubernetes.io/cluster-service": "true"}},
        "spec": {"clusterIP": cluster_ip.to_string(), "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": port},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": port}]},
    });
    match client.create(SERVICES, Some(NS), svc).await {
        Ok(_) => {}
        Err(e) if e.is_already_exists() => {}
        Err(e) => return Err(e.into()),
    }
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": SLICE, "namespace": NS,
                     "labels": {"kubernetes.io/service-name": "kube-dns",
                                "endpointslice.kubernetes.io/managed-by": "skep-server"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [node_ip], "conditions": {"ready": true, "serving": true, "terminating": false}}],
        "ports": [{"name": "dns", "port": port, "protocol": "UDP"}, {"name": "dns-tcp", "port": port, "protocol": "TCP"}],
    });
    match client
        .create(ENDPOINT_SLICES, Some(NS), slice.clone())
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.is_already_exists() => {
            let patch = json!({"endpoints": slice["endpoints"], "ports": slice["ports"]});
            client
                .patch(ENDPOINT_SLICES, Some(NS), SLICE, None, patch)
                .await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
