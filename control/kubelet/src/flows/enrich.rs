//! A raw flow plus the names the agent knows → the flow it serves.
//!
//! Enrichment happens when the flow arrives, against the policy snapshot
//! of that moment: a pod deleted since keeps its name in the history.

use super::{
    input::{DropReason, Flow, FlowVerdict, Observation},
    proto,
};
use crate::policy::PolicySnapshot;
use std::{net::Ipv4Addr, time::UNIX_EPOCH};

/// `policy_id` of traffic admitted because it comes from the node itself
/// (ebpf/common's `POLICY_ID_HOST`).
const POLICY_ID_HOST: u32 = u32::MAX;
/// `policy_id` when no policy decided (the endpoint is not isolated).
const POLICY_ID_NONE: u32 = 0;

/// TCP flag bits, in the order `hubble observe` prints them.
const TCP_FLAGS: [(u8, &str); 8] = [
    (0x02, "SYN"),
    (0x10, "ACK"),
    (0x01, "FIN"),
    (0x04, "RST"),
    (0x08, "PSH"),
    (0x20, "URG"),
    (0x40, "ECE"),
    (0x80, "CWR"),
];

const IPPROTO_TCP: u8 = 6;

pub fn tcp_flag_names(flags: u8) -> Vec<String> {
    TCP_FLAGS
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect()
}

fn endpoint(ip: Ipv4Addr, port: u16, identity: u32, snap: &PolicySnapshot) -> proto::Endpoint {
    let pod = snap.pods_by_ip.get(&ip);
    proto::Endpoint {
        ip: ip.to_string(),
        port: u32::from(port),
        namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
        pod: pod.map(|p| p.name.clone()).unwrap_or_default(),
        identity,
        labels: snap.identities.get(&identity).cloned().unwrap_or_default(),
    }
}

pub fn verdict(v: FlowVerdict) -> proto::Verdict {
    match v {
        FlowVerdict::Forwarded => proto::Verdict::Forwarded,
        FlowVerdict::Dropped => proto::Verdict::Dropped,
    }
}

pub fn drop_reason(r: DropReason) -> proto::DropReason {
    match r {
        DropReason::None => proto::DropReason::Unspecified,
        DropReason::PolicyEgress => proto::DropReason::PolicyDeniedEgress,
        DropReason::PolicyIngress => proto::DropReason::PolicyDeniedIngress,
        DropReason::NoBackend => proto::DropReason::NoBackend,
    }
}

pub fn observation(o: Observation) -> proto::Observation {
    match o {
        Observation::FromPod => proto::Observation::FromPod,
        Observation::ToPod => proto::Observation::ToPod,
        Observation::Xdp => proto::Observation::Xdp,
    }
}

/// The served form of `flow`, seen on `node`.
pub fn enrich(flow: &Flow, node: &str, snap: &PolicySnapshot) -> proto::Flow {
    // Before 1970 only with a broken clock: show it as the epoch.
    let nanos = flow
        .time
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let policy_name = match flow.policy_id {
        POLICY_ID_NONE => String::new(),
        POLICY_ID_HOST => "host".to_owned(),
        id => snap
            .policy_names
            .get(&id)
            .cloned()
            // A policy deleted between the kernel's verdict and now.
            .unwrap_or_else(|| format!("policy#{id}")),
    };
    proto::Flow {
        time_unix_nanos: nanos,
        node_name: node.to_owned(),
        verdict: verdict(flow.verdict) as i32,
        drop_reason: drop_reason(flow.drop_reason) as i32,
        observation: observation(flow.observation) as i32,
        protocol: u32::from(flow.proto),
        source: Some(endpoint(flow.src, flow.sport, flow.src_identity, snap)),
        destination: Some(endpoint(flow.dst, flow.dport, flow.dst_identity, snap)),
        tcp_flags: if flow.proto == IPPROTO_TCP {
            tcp_flag_names(flow.tcp_flags)
        } else {
            Vec::new()
        },
        service: flow.service.map(|(ip, port)| proto::ServiceFrontend {
            ip: ip.to_string(),
            port: u32::from(port),
        }),
        policy_name,
        policy_id: flow.policy_id,
        ifindex: flow.ifindex,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_names_follow_hubble_order() {
        assert_eq!(tcp_flag_names(0x12), vec!["SYN", "ACK"]);
        assert_eq!(tcp_flag_names(0x11), vec!["ACK", "FIN"]);
        assert!(tcp_flag_names(0).is_empty());
    }
}
