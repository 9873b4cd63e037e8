//! Source NAT of pods' traffic that leaves the cluster: packets from this
//! node's pod CIDR to anything outside the cluster's pod range go out with
//! the node's address (iptables MASQUERADE in the nat table, as flannel and
//! Cilium's iptables masquerading do), so replies find their way back
//! without the outside network knowing the pod range. Pod-to-pod traffic,
//! on this node or another, keeps the pod's address (NetworkPolicy and
//! servers see the real client).
//!
//! The rule lives in a chain of skep's own, `SKEP-MASQ`, jumped to from
//! POSTROUTING; installing is idempotent (the chain is flushed and
//! rewritten), so a restarted agent or a changed pod CIDR leaves exactly
//! one rule.

use std::{net::Ipv4Addr, process::Command};

const CHAIN: &str = "SKEP-MASQ";

/// The whole pod range of the cluster (every node's /24 is inside it).
pub const CLUSTER_POD_CIDR: &str = "10.42.0.0/16";

#[derive(Debug, thiserror::Error)]
#[error("pod egress masquerading: `iptables {args}` failed: {detail}")]
pub struct MasqueradeError {
    args: String,
    detail: String,
}

fn iptables(args: &[&str]) -> Result<(), MasqueradeError> {
    let fail = |detail: String| MasqueradeError {
        args: args.join(" "),
        detail,
    };
    let out = Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .output()
        .map_err(|e| fail(format!("{e} (is iptables installed?)")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

fn has_jump() -> bool {
    Command::new("iptables")
        .args(["-w", "5", "-t", "nat", "-C", "POSTROUTING", "-j", CHAIN])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Makes pods of `pod_cidr` leave the cluster with the node's address.
pub fn install(pod_cidr: (Ipv4Addr, u8)) -> Result<(), MasqueradeError> {
    let source = format!("{}/{}", pod_cidr.0, pod_cidr.1);
    // -N fails when the chain exists; -F then empties it either way.
    let _ = iptables(&["-t", "nat", "-N", CHAIN]);
    iptables(&["-t", "nat", "-F", CHAIN])?;
    iptables(&[
        "-t",
        "nat",
        "-A",
        CHAIN,
        "-s",
        &source,
        "!",
        "-d",
        CLUSTER_POD_CIDR,
        "-m",
        "comment",
        "--comment",
        "skep: pods leaving the cluster use the node address",
        "-j",
        "MASQUERADE",
    ])?;
    if !has_jump() {
        iptables(&["-t", "nat", "-A", "POSTROUTING", "-j", CHAIN])?;
    }
    Ok(())
}
