//! The admin port: `/metrics` (Prometheus text), `/ready` (a certificate
//! is installed and the sidecar is not draining), `/live`. A deliberately
//! tiny HTTP/1.1 responder: one request per connection.

use crate::{identity::IdentityStore, metrics::Metrics};
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

const MAX_REQUEST: usize = 8 * 1024;

#[derive(Debug)]
pub(crate) struct AdminState {
    pub identity: Arc<IdentityStore>,
    pub metrics: Arc<Metrics>,
    pub draining: Arc<AtomicBool>,
}

pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = crate::sidecar::stopped(&mut stop) => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(10), answer(tcp, &state)).await;
        });
    }
}

async fn answer(mut tcp: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/live") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/ready") => {
            if state.draining.load(Ordering::Relaxed) {
                ("503 Service Unavailable", "text/plain", "draining\n".into())
            } else if state.identity.is_ready() {
                ("200 OK", "text/plain", "ready\n".into())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "no workload certificate yet\n".into(),
                )
            }
        }
        // [mesh] the workload identity in use (the kubelet copies it into
        // pod annotations for `skep ctl mesh status`).
        ("GET", "/identity") => match state.identity.current() {
            Some(c) => {
                let not_after = c
                    .not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                (
                    "200 OK",
                    "application/json",
                    format!(
                        "{{\"spiffeId\":\"{}\",\"notAfterUnix\":{not_after}}}\n",
                        c.spiffe_id
                    ),
                )
            }
            None => (
                "503 Service Unavailable",
                "text/plain",
                "no workload certificate yet\n".into(),
            ),
        },
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            state.metrics.render(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(response.as_bytes()).await?;
    tcp.shutdown().await
}
