//! The `kube-dns` Service: the cluster DNS at 10.43.0.10:53 for pods.
//!
//! The DNS server runs inside `skep server` on the host network, so the
//! Service has no selector; its EndpointSlice points at the server's node
//! address and DNS port. Both are an add-on manifest the server writes
//! into `DATA_DIR/manifests/` at each start (so a new node address or port
//! is applied over the old one), applied like any user manifest.

use serde_json::{Value, json};
use std::net::IpAddr;

const NS: &str = "kube-system";
const SLICE: &str = "kube-dns-skep";
/// The add-on's file in the manifests directory.
pub const MANIFEST: &str = "skep-kube-dns.json";

/// The Service and its EndpointSlice for a DNS server at `node_ip:port`.
pub fn manifest(node_ip: &str, port: u16, cluster_ip: IpAddr) -> Value {
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": NS,
                     "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS", "kubernetes.io/cluster-service": "true"}},
        "spec": {"clusterIP": cluster_ip.to_string(), "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": port},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": port}]},
    });
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": SLICE, "namespace": NS,
                     "labels": {"kubernetes.io/service-name": "kube-dns",
                                "endpointslice.kubernetes.io/managed-by": "skep-server"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [node_ip], "conditions": {"ready": true, "serving": true, "terminating": false}}],
        "ports": [{"name": "dns", "port": port, "protocol": "UDP"}, {"name": "dns-tcp", "port": port, "protocol": "TCP"}],
    });
    json!({"apiVersion": "v1", "kind": "List", "items": [svc, slice]})
}
