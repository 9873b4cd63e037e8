//! The server's readiness check for cluster DNS: one A query for
//! `kubernetes.default.svc.<zone>` to its own DNS listener, which must
//! answer NOERROR with at least one record. That proves the server is up
//! and that its view of Services (through the store) is live.

use std::{net::SocketAddr, time::Duration};

use tokio::net::UdpSocket;

/// The wire form of a recursion-desired A/IN query for `name` with `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    // RD set; one question.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        // Labels here are ours (a Service name and the zone): ≤ 63 bytes.
        q.push(label.len().min(63) as u8);
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.push(0);
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

/// Checks an answer to `query(id, …)`: the id, the response bit, rcode 0
/// and a non-empty answer section.
fn judge(id: u16, answer: &[u8]) -> Result<(), String> {
    if answer.len() < 12 {
        return Err(format!("short DNS answer ({} bytes)", answer.len()));
    }
    if u16::from_be_bytes([answer[0], answer[1]]) != id || answer[2] & 0x80 == 0 {
        return Err("the DNS answer does not match the query".into());
    }
    let rcode = answer[3] & 0x0f;
    if rcode != 0 {
        return Err(format!("DNS answered rcode {rcode}"));
    }
    if u16::from_be_bytes([answer[6], answer[7]]) == 0 {
        return Err("DNS answered without records".into());
    }
    Ok(())
}

/// Runs the check against the listener at `addr` (an unspecified address
/// means loopback).
pub async fn check(addr: SocketAddr, zone: &str) -> Result<(), String> {
    let target = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let name = format!("kubernetes.default.svc.{zone}");
    let sock = UdpSocket::bind(("0.0.0.0", 0))
        .await
        .map_err(|e| format!("binding a UDP socket: {e}"))?;
    // Differs per check, so a late answer to an earlier one is not taken.
    let id = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        & 0xffff) as u16;
    sock.send_to(&query(id, &name), target)
        .await
        .map_err(|e| format!("sending to {target}: {e}"))?;
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf))
        .await
        .map_err(|_| format!("no answer from {target} for {name} within 1 s"))?
        .map_err(|e| format!("receiving from {target}: {e}"))?;
    judge(id, &buf[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_well_formed() {
        let q = query(0x1234, "kubernetes.default.svc.cluster.local");
        assert_eq!(&q[..2], &[0x12, 0x34]);
        assert_eq!(q[12], 10);
        assert_eq!(&q[13..23], b"kubernetes");
        assert_eq!(&q[q.len() - 5..], &[0, 0, 1, 0, 1]);
    }

    #[test]
    fn answers_are_judged() {
        let mut a = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        assert_eq!(judge(0x1234, &a), Ok(()));
        assert!(judge(0x1235, &a).is_err());
        a[3] = 0x83; // NXDOMAIN
        assert!(judge(0x1234, &a).unwrap_err().contains("rcode 3"));
        a[3] = 0x80;
        a[7] = 0;
        assert!(judge(0x1234, &a).is_err());
        assert!(judge(0x1234, &a[..5]).is_err());
    }
}
