//! `grpc` probes: `grpc.health.v1.Health/Check` over plaintext HTTP/2 to
//! the pod IP, success when the answer is SERVING. Messages follow the
//! kubelet's so events read the same.

use super::{ProbeResult, ProbeTarget, USER_AGENT, host_port};
use serde_json::Value;
use std::time::Duration;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

pub(super) async fn probe(spec: &Value, target: &ProbeTarget, timeout: Duration) -> ProbeResult {
    // The API only allows a number here (gRPC probes have no named ports).
    let port = match spec.get("port").and_then(Value::as_i64) {
        Some(p) => match u16::try_from(p).ok().filter(|p| *p > 0) {
            Some(p) => p,
            None => return ProbeResult::Failure(format!("invalid port number: {p}")),
        },
        None => return ProbeResult::Failure("the gRPC probe has no port".into()),
    };
    let service = spec
        .get("service")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let addr = host_port(&target.default_host().to_string(), port);
    let secs = timeout.as_secs_f64();

    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .and_then(|e| e.user_agent(USER_AGENT))
    {
        Ok(e) => e.connect_timeout(timeout).timeout(timeout),
        Err(e) => return ProbeResult::Failure(format!("invalid gRPC address {addr}: {e}")),
    };
    let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(e)) => {
            return ProbeResult::Failure(format!(
                "timeout: failed to connect service {addr:?} within {secs}s: {}",
                error_chain(&e)
            ));
        }
        Err(_) => {
            return ProbeResult::Failure(format!(
                "timeout: failed to connect service {addr:?} within {secs}s: context deadline exceeded"
            ));
        }
    };
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest { service });
    let response = match tokio::time::timeout(timeout, check).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(status)) => {
            return ProbeResult::Failure(match status.code() {
                tonic::Code::Unimplemented => format!(
                    "this server does not implement the grpc health protocol (grpc.health.v1.Health): {}",
                    status.message()
                ),
                tonic::Code::DeadlineExceeded => {
                    format!("timeout: health rpc did not complete within {secs}s")
                }
                code => format!(
                    "error: health rpc probe failed: rpc error: code = {code:?} desc = {}",
                    status.message()
                ),
            });
        }
        Err(_) => {
            return ProbeResult::Failure(format!(
                "timeout: health rpc did not complete within {secs}s"
            ));
        }
    };
    match ServingStatus::try_from(response.status) {
        Ok(ServingStatus::Serving) => ProbeResult::Success,
        Ok(other) => ProbeResult::Failure(format!(
            "service unhealthy (responded with {:?})",
            other.as_str_name()
        )),
        Err(_) => ProbeResult::Failure(format!(
            "service unhealthy (responded with unknown status {})",
            response.status
        )),
    }
}

/// tonic's transport error says only "transport error"; the cause is in
/// its sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
