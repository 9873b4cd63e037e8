//! `tcpSocket` probes: success when a TCP connection opens within the
//! timeout (the connection is closed right away, nothing is sent).

use super::{ProbeResult, ProbeTarget, connect, resolve_port};
use serde_json::Value;
use std::time::Duration;

pub(super) async fn probe(spec: &Value, target: &ProbeTarget, timeout: Duration) -> ProbeResult {
    let port = match resolve_port(spec.get("port"), &target.container) {
        Ok(p) => p,
        Err(e) => return ProbeResult::Failure(e),
    };
    let host = match spec.get("host").and_then(Value::as_str) {
        Some(h) if !h.is_empty() => h.to_string(),
        _ => target.default_host().to_string(),
    };
    match connect(&host, port, timeout).await {
        Ok(stream) => {
            drop(stream);
            ProbeResult::Success
        }
        Err(e) => ProbeResult::Failure(e),
    }
}
