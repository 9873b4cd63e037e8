//! The NetworkPolicy early drop at XDP on the node's external interface
//! (the one holding the node IP): traffic from outside that a local pod's
//! ingress policy denies is dropped before the kernel builds a socket
//! buffer for it. Only an optimisation: the pod hooks enforce the same
//! policy, so a failure here is a warning, never a reason to stop.

use std::{net::Ipv4Addr, path::Path};

/// The interface in this network namespace that holds `addr`.
pub fn interface_of(addr: Ipv4Addr) -> Option<String> {
    nix::ifaddrs::getifaddrs()
        .ok()?
        .find(|a| {
            a.address
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .is_some_and(|s| s.ip() == addr)
        })
        .map(|a| a.interface_name)
}

/// Whether `iface` is an Ethernet link (xdp_policy parses an Ethernet
/// header; an L3 device such as a tunnel or WireGuard starts at the IP
/// header). Read from its AF_PACKET address, which, unlike sysfs, belongs
/// to this network namespace.
fn is_ethernet(iface: &str) -> bool {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return false;
    };
    addrs
        .filter(|a| a.interface_name == iface)
        .filter_map(|a| a.address.and_then(|s| s.as_link_addr().map(|l| l.hatype())))
        .any(|t| t == libc::ARPHRD_ETHER)
}

/// Attaches `xdp_policy` (loaded and pinned under `pin_root` by the load
/// balancer's loader) to the interface holding `node_ip`. Logs what it did
/// and returns the interface and mode when attached.
pub fn attach_external(
    pin_root: &Path,
    node_ip: &str,
) -> Option<(String, skep_dataplane::policy::xdp::XdpMode)> {
    let Ok(addr) = node_ip.parse::<Ipv4Addr>() else {
        tracing::warn!(
            node_ip,
            "XDP policy early drop not attached: the node IP is not IPv4 (the pod hooks still enforce policy)"
        );
        return None;
    };
    let Some(iface) = interface_of(addr) else {
        tracing::warn!(
            node_ip,
            "XDP policy early drop not attached: no interface holds the node IP (the pod hooks still enforce policy)"
        );
        return None;
    };
    // Loopback carries no traffic from outside the node.
    if addr.is_loopback() || iface == "lo" {
        tracing::info!(
            node_ip,
            iface,
            "XDP policy early drop not attached: the node IP is on loopback"
        );
        return None;
    }
    if !is_ethernet(&iface) {
        tracing::warn!(
            node_ip,
            iface,
            "XDP policy early drop not attached: the interface is not Ethernet (the pod hooks still enforce policy)"
        );
        return None;
    }
    match skep_dataplane::policy::xdp::attach(pin_root, &iface) {
        Ok(mode) => {
            let mode_name = match mode {
                skep_dataplane::policy::xdp::XdpMode::Native => "native",
                skep_dataplane::policy::xdp::XdpMode::Generic => "generic",
            };
            tracing::info!(
                iface,
                mode = mode_name,
                "XDP policy early drop attached to the external interface"
            );
            Some((iface, mode))
        }
        Err(e) => {
            tracing::warn!(
                iface,
                error = %e,
                "XDP policy early drop could not be attached (the pod hooks still enforce policy)"
            );
            None
        }
    }
}

/// Removes an attachment an earlier run left on the interface holding
/// `node_ip` (the link is pinned and outlives the agent), for a node whose
/// early drop is now disabled.
pub fn detach_external(pin_root: &Path, node_ip: &str) {
    let Some(iface) = node_ip.parse::<Ipv4Addr>().ok().and_then(interface_of) else {
        return;
    };
    match skep_dataplane::policy::xdp::detach(pin_root, &iface) {
        Ok(true) => tracing::info!(iface, "XDP policy early drop disabled: detached"),
        Ok(false) => {}
        Err(e) => tracing::warn!(iface, error = %e, "cannot detach the XDP policy early drop"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_loopback_address_is_found_on_lo_and_lo_is_not_ethernet() {
        assert_eq!(interface_of(Ipv4Addr::LOCALHOST).as_deref(), Some("lo"));
        assert!(!is_ethernet("lo"));
        // TEST-NET-3: held by no interface of a test machine.
        assert_eq!(interface_of(Ipv4Addr::new(203, 0, 113, 254)), None);
        assert!(attach_external(Path::new("/nonexistent"), "127.0.0.1").is_none());
        assert!(attach_external(Path::new("/nonexistent"), "fd00::1").is_none());
    }
}
