//! Container probes (startup, liveness, readiness) the way the kubelet runs
//! them: one handler per probe (`exec`, `httpGet`, `tcpSocket`, `grpc`),
//! each bounded by `timeoutSeconds`, and a [`Prober`] that repeats it on
//! `periodSeconds` and turns single results into a verdict with the
//! success/failure thresholds.
//!
//! `probe_once` never returns an error: anything that keeps a probe from
//! running (no handler, a named port the container does not declare, no pod
//! IP) is a failure with a message, so the pod shows why in its events.

mod exec;
mod grpc;
mod http;
mod prober;
mod tcp;

pub use prober::{ProbeEvent, ProbeStatus, ProbeTiming, Prober};

use serde_json::Value;
use std::{net::IpAddr, sync::Arc, time::Duration};

/// The User-Agent (and gRPC user agent) probes identify themselves with;
/// applications match on it to exclude probes from their access logs.
pub const USER_AGENT: &str = "kube-probe/1.31";

/// How much of a response body or command output a probe keeps.
const MAX_OUTPUT: usize = 10 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

impl ProbeKind {
    /// The name the kubelet uses in events ("Liveness probe failed: …").
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "Startup",
            Self::Liveness => "Liveness",
            Self::Readiness => "Readiness",
        }
    }

    /// The message of the `Unhealthy` event the kubelet posts for a failed
    /// probe.
    pub fn unhealthy_message(self, output: &str) -> String {
        format!("{} probe failed: {output}", self.as_str())
    }
}

impl std::fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one probe run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    Success,
    /// A human message for events, e.g. `HTTP probe failed with statuscode:
    /// 500` or `Get "http://10.42.0.5:8080/": dial tcp 10.42.0.5:8080:
    /// connect: connection refused`.
    Failure(String),
}

impl ProbeResult {
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Success)
    }
}

/// Where the probe goes.
#[derive(Clone)]
pub struct ProbeTarget {
    /// None until the pod has one.
    pub pod_ip: Option<IpAddr>,
    /// The host httpGet/tcpSocket/grpc probes go to when the pod has no IP;
    /// for hostNetwork pods the caller passes the node's IP as `pod_ip` too.
    pub host_ip: IpAddr,
    /// The container exec probes run in.
    pub container_id: String,
    /// The container spec JSON, to resolve named ports (`ports[].name` →
    /// `containerPort`).
    pub container: Value,
    pub runtime: Arc<dyn crate::runtime::Runtime>,
}

impl std::fmt::Debug for ProbeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeTarget")
            .field("pod_ip", &self.pod_ip)
            .field("host_ip", &self.host_ip)
            .field("container_id", &self.container_id)
            .field("runtime", &self.runtime.name())
            .finish()
    }
}

impl ProbeTarget {
    /// The host network probes use when the probe names none.
    fn default_host(&self) -> IpAddr {
        self.pod_ip.unwrap_or(self.host_ip)
    }
}

/// Runs `probe` (a Kubernetes `Probe` object) once against `target`, bounded
/// by its `timeoutSeconds` (default 1).
pub async fn probe_once(probe: &Value, target: &ProbeTarget) -> ProbeResult {
    let timeout = ProbeTiming::timeout_of(probe);
    if let Some(spec) = probe.get("exec").filter(|v| v.is_object()) {
        exec::probe(spec, target, timeout).await
    } else if let Some(spec) = probe.get("httpGet").filter(|v| v.is_object()) {
        http::probe(spec, target, timeout).await
    } else if let Some(spec) = probe.get("tcpSocket").filter(|v| v.is_object()) {
        tcp::probe(spec, target, timeout).await
    } else if let Some(spec) = probe.get("grpc").filter(|v| v.is_object()) {
        grpc::probe(spec, target, timeout).await
    } else {
        ProbeResult::Failure("missing probe handler (exec, httpGet, tcpSocket or grpc)".into())
    }
}

/// Resolves a probe's `port` (an int or a name from the container's
/// `ports`) the way the kubelet does: a name that no port has is tried as a
/// number last.
fn resolve_port(port: Option<&Value>, container: &Value) -> Result<u16, String> {
    let number = match port {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(-1),
        Some(Value::String(name)) => {
            let named = container
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name.as_str()))
                .and_then(|p| p.get("containerPort"))
                .and_then(Value::as_i64);
            match named {
                Some(n) => n,
                None => name
                    .parse::<i64>()
                    .map_err(|_| format!("couldn't find port: {name} in the container's ports"))?,
            }
        }
        Some(other) => return Err(format!("invalid port {other}")),
        None => return Err("the probe has no port".into()),
    };
    u16::try_from(number)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("invalid port number: {number}"))
}

/// Go's rendering of a failed dial (`dial tcp ADDR: connect: connection
/// refused`), which is what users know from kubelet events.
fn dial_error(addr: &str, e: &std::io::Error) -> String {
    format!("dial tcp {addr}: connect: {}", io_reason(e))
}

/// An io::Error's reason without Rust's " (os error N)" suffix, lower-cased
/// like Go's syscall errors.
fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

/// Opens a TCP connection to `host:port` (an IP or a DNS name) within
/// `timeout`; errors read like Go's, as in kubelet events.
async fn connect(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, String> {
    let hp = host_port(host, port);
    let work = async {
        let addr = match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => std::net::SocketAddr::new(ip, port),
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| format!("dial tcp: lookup {host}: {}", io_reason(&e)))?
                .next()
                .ok_or_else(|| format!("dial tcp: lookup {host}: no such host"))?,
        };
        tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| dial_error(&addr.to_string(), &e))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(format!("dial tcp {hp}: i/o timeout")),
    }
}

/// `host:port` with IPv6 addresses bracketed.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ports_resolve_by_number_name_or_numeric_string() {
        let c = json!({"ports": [{"name": "http", "containerPort": 8080}]});
        assert_eq!(resolve_port(Some(&json!(80)), &c), Ok(80));
        assert_eq!(resolve_port(Some(&json!("http")), &c), Ok(8080));
        assert_eq!(resolve_port(Some(&json!("9090")), &c), Ok(9090));
        assert!(resolve_port(Some(&json!("metrics")), &c).is_err());
        assert!(resolve_port(Some(&json!(0)), &c).is_err());
        assert!(resolve_port(Some(&json!(70000)), &c).is_err());
        assert!(resolve_port(None, &c).is_err());
    }

    #[test]
    fn dial_errors_read_like_go() {
        let e = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(
            dial_error("10.42.0.5:8080", &e),
            "dial tcp 10.42.0.5:8080: connect: connection refused"
        );
        assert_eq!(host_port("fd00::1", 80), "[fd00::1]:80");
        assert_eq!(host_port("10.0.0.1", 80), "10.0.0.1:80");
    }
}
