//! The node's external interface (the one holding the node IP):
//!
//! * the load balancer's TC hooks, which serve NodePorts, ExternalIPs and
//!   LoadBalancer IPs (with SNAT to backends on other nodes);
//! * `xdp_node`: the same load balancing earlier, where the interface
//!   allows it, and the NetworkPolicy early drop (traffic from outside
//!   that a local pod's ingress policy denies is dropped before the kernel
//!   builds a socket buffer for it).
//!
//! XDP is only an optimisation: the TC hooks and the pod hooks do the same
//! work, so a failure there is a warning, never a reason to stop.

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

/// Programs NodePort frontends on the node address and attaches the load
/// balancer's TC hooks to its interface (SNAT source: the node address).
/// Without an IPv4 node address on an Ethernet interface, NodePorts still
/// answer host processes through the socket LB.
pub fn attach_lb_external(
    lb: &mut skep_dataplane::lb::LoadBalancer<skep_dataplane::lb::KernelDatapath>,
    node_ip: &str,
) {
    let Ok(addr) = node_ip.parse::<Ipv4Addr>() else {
        tracing::warn!(
            node_ip,
            "NodePorts not served from outside: the node IP is not IPv4"
        );
        return;
    };
    if let Err(e) = lb.set_node_addresses(vec![addr]) {
        tracing::warn!(error = %e, "cannot program NodePorts on the node address");
    }
    let Some(iface) = interface_of(addr) else {
        tracing::warn!(
            node_ip,
            "NodePorts not served from outside: no interface holds the node IP"
        );
        return;
    };
    if addr.is_loopback() || iface == "lo" || !is_ethernet(&iface) {
        tracing::info!(
            iface,
            "NodePorts not served from outside: the node IP's interface is loopback or not Ethernet"
        );
        return;
    }
    match lb.datapath_mut().attach_external(&iface, addr) {
        Ok(()) => tracing::info!(iface, %addr, "NodePorts served on the external interface"),
        Err(e) => tracing::warn!(iface, error = %e, "cannot attach the external interface hooks"),
    }
}

/// Turns on XDP load balancing when `xdp_node` is attached to `iface` and
/// the interface is not a veth (`SKEP_XDP_LB=on|off` overrides). Packets
/// a local socket sent over a veth may still need their checksum
/// completed, which XDP can neither see nor do; NICs hand XDP complete
/// packets. Off, the TC hooks do the same work.
pub fn choose_xdp_lb(lb: &crate::network::SharedLb, iface: Option<&str>) {
    let wanted = match (iface, std::env::var("SKEP_XDP_LB").ok().as_deref()) {
        (None, _) => false,
        (Some(_), Some("on")) => true,
        (Some(_), Some("off")) => false,
        (Some(i), _) => driver_of(i).as_deref() != Some("veth"),
    };
    let Ok(mut guard) = lb.lock() else {
        return;
    };
    match guard.datapath_mut().set_xdp_lb(wanted) {
        Ok(()) => tracing::info!(
            iface = iface.unwrap_or("-"),
            xdp_lb = wanted,
            "external frontends are load-balanced at {}",
            if wanted { "XDP" } else { "TC" }
        ),
        Err(e) => tracing::warn!(error = %e, "cannot switch XDP load balancing"),
    }
}

/// The driver of `iface` in this network namespace (ETHTOOL_GDRVINFO).
fn driver_of(iface: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    // struct ethtool_drvinfo: cmd, then driver[32], and more we ignore.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        _pad: [0; 16],
    };
    for (d, s) in req
        .name
        .iter_mut()
        .zip(iface.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    // SAFETY: plain socket/ioctl/close calls; `req` and `info` live across
    // them and are laid out as the kernel's ifreq and ethtool_drvinfo
    // (196 bytes).
    let ok = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL, &mut req);
        libc::close(fd);
        rc == 0
    };
    if !ok {
        return None;
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
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
