//! Routes to other nodes' pod CIDRs (native routing on one L2):
//! `PODCIDR via NODEIP proto 83` in the main table of the calling thread's
//! namespace. Only routes with proto [`NODE_ROUTE_PROTO`] are ever changed
//! or deleted, so routes of the admin, DHCP or other agents are safe.

use super::{NODE_ROUTE_PROTO, nl};
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::route::{RouteMessage, RouteProtocol},
};
use std::{collections::BTreeMap, net::Ipv4Addr};

/// One wanted route: `cidr/prefix_len via gateway`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CidrRoute {
    pub cidr: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
}

/// What a sync changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSync {
    /// Routes added or changed (new gateway).
    pub installed: Vec<CidrRoute>,
    /// Routes of ours that are no longer wanted, removed.
    pub removed: Vec<(Ipv4Addr, u8)>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteSyncError {
    #[error("opening a netlink socket for the node routes: {0}")]
    Socket(#[source] std::io::Error),
    #[error("listing the main routing table: {0}")]
    List(#[source] std::io::Error),
    #[error("{} node route change(s) failed: {}", .0.len(), .0.join("; "))]
    Apply(Vec<String>),
}

/// Makes the main table hold exactly `desired` among the routes with proto
/// [`NODE_ROUTE_PROTO`]. Every change is tried; failures (e.g. a gateway
/// that is not on a connected network) are reported together at the end.
pub async fn sync_cidr_routes(desired: &[CidrRoute]) -> Result<RouteSync, RouteSyncError> {
    let nl = nl::Nl::current().map_err(RouteSyncError::Socket)?;
    let h = &nl.handle;
    let mut want: BTreeMap<(Ipv4Addr, u8), Ipv4Addr> = BTreeMap::new();
    for r in desired {
        want.insert((network(r.cidr, r.prefix_len), r.prefix_len), r.gateway);
    }
    let ours: Vec<RouteMessage> = nl::main_ipv4_routes(h)
        .await
        .map_err(RouteSyncError::List)?
        .into_iter()
        .filter(|r| r.header.protocol == RouteProtocol::Other(NODE_ROUTE_PROTO))
        .collect();
    let mut have: BTreeMap<(Ipv4Addr, u8), Option<Ipv4Addr>> = BTreeMap::new();
    let mut report = RouteSync::default();
    let mut failures = Vec::new();
    for r in ours {
        let dst = nl::route_dst(&r);
        if want.contains_key(&dst) {
            have.insert(dst, nl::route_gateway(&r));
            continue;
        }
        match h.route().del(r).execute().await {
            Ok(()) => report.removed.push(dst),
            Err(e) if nl::errno(&e) == Some(libc::ESRCH) => {}
            Err(e) => failures.push(format!("removing {}/{}: {}", dst.0, dst.1, nl::to_io(e))),
        }
    }
    for (&(cidr, prefix_len), &gateway) in &want {
        if have.get(&(cidr, prefix_len)) == Some(&Some(gateway)) {
            continue;
        }
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(cidr, prefix_len)
            .gateway(gateway)
            .protocol(RouteProtocol::Other(NODE_ROUTE_PROTO))
            .build();
        match h.route().add(msg).replace().execute().await {
            Ok(()) => report.installed.push(CidrRoute {
                cidr,
                prefix_len,
                gateway,
            }),
            Err(e) => failures.push(format!(
                "{cidr}/{prefix_len} via {gateway}: {}",
                nl::to_io(e)
            )),
        }
    }
    if !report.installed.is_empty() || !report.removed.is_empty() {
        tracing::info!(installed = ?report.installed, removed = ?report.removed, "node routes changed");
    }
    if failures.is_empty() {
        Ok(report)
    } else {
        Err(RouteSyncError::Apply(failures))
    }
}

/// The network address of `ip/len` (the kernel refuses host bits).
fn network(ip: Ipv4Addr, len: u8) -> Ipv4Addr {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    };
    Ipv4Addr::from(u32::from(ip) & mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_masks_host_bits() {
        assert_eq!(
            network(Ipv4Addr::new(10, 42, 7, 9), 24),
            Ipv4Addr::new(10, 42, 7, 0)
        );
        assert_eq!(
            network(Ipv4Addr::new(10, 42, 7, 9), 0),
            Ipv4Addr::UNSPECIFIED
        );
        assert_eq!(
            network(Ipv4Addr::new(10, 42, 7, 9), 32),
            Ipv4Addr::new(10, 42, 7, 9)
        );
    }
}
