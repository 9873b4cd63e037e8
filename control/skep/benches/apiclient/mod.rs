//! What the benchmarks that drive a real `skep server --no-agent` over
//! HTTPS share: starting it on a loopback port and keep-alive TLS
//! connections to it (bearer token, the server's CA).

// Benchmark harness: a failed expect aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, client::conn::http1};
use serde_json::Value;
use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub token: String,
    pub ca: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `skep server --no-agent` on a free loopback port, with `env` added
/// to its environment.
pub fn start_server_with(env: &[(&str, &str)]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_skep"))
        .args(["server", "--no-agent", "--data-dir"])
        .arg(dir.path())
        .args(["--api-listen", &format!("127.0.0.1:{port}")])
        .env("SKEP_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start skep server");
    let token_path = dir.path().join("admin-token");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(token_path.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()) {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    Server {
        child,
        port,
        token: std::fs::read_to_string(&token_path)
            .unwrap()
            .trim()
            .to_owned(),
        ca: std::fs::read_to_string(dir.path().join("tls/ca.crt")).unwrap(),
        _dir: dir,
    }
}

pub fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// (anonymous, file-backed) parts of a process's RSS in MB: the heap, and
/// mapped files (the binary, the SQLite database's mmap).
pub fn rss_parts_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("RssAnon:"), field("RssFile:") + field("RssShmem:"))
}

/// One HTTP/1.1 keep-alive connection over TLS.
pub struct Conn {
    send: http1::SendRequest<Full<Bytes>>,
    token: String,
}

pub async fn connect(s: &Server) -> Conn {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut s.ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (send, conn) = http1::handshake(hyper_util_io(tls)).await.unwrap();
    tokio::spawn(conn);
    Conn {
        send,
        token: s.token.clone(),
    }
}

fn hyper_util_io<T>(io: T) -> TokioIo<T> {
    TokioIo(io)
}

/// Minimal tokio ↔ hyper IO adapter (hyper-util's lives behind features
/// the benchmark does not otherwise need).
struct TokioIo<T>(T);

impl<T: tokio::io::AsyncRead + Unpin> hyper::rt::Read for TokioIo<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // SAFETY: the bytes tokio writes into the unfilled part are
        // initialised before `advance` reports them.
        let n = unsafe {
            let mut tbuf = tokio::io::ReadBuf::uninit(buf.as_mut());
            match tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut self.0), cx, &mut tbuf) {
                std::task::Poll::Ready(Ok(())) => tbuf.filled().len(),
                other => return other,
            }
        };
        // SAFETY: n bytes were just initialised above.
        unsafe { buf.advance(n) };
        std::task::Poll::Ready(Ok(()))
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> hyper::rt::Write for TokioIo<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.0), cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.0), cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(&mut self.0), cx)
    }
}

impl Conn {
    /// A GET whose body is read as it arrives (watches).
    pub async fn stream(&mut self, path: &str) -> hyper::body::Incoming {
        let req = Request::builder()
            .uri(path)
            .header("host", "localhost")
            .header("authorization", format!("Bearer {}", self.token))
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.send.ready().await.unwrap();
        self.send.send_request(req).await.unwrap().into_body()
    }

    /// A JSON request with the body's content type `content_type`
    /// (patches: `application/merge-patch+json`, …).
    pub async fn call_with(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        content_type: &str,
    ) -> (u16, Bytes) {
        self.request(method, path, body, content_type, "application/json")
            .await
    }

    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        accept: &str,
    ) -> (u16, Bytes) {
        self.request(method, path, body, "application/json", accept)
            .await
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        content_type: &str,
        accept: &str,
    ) -> (u16, Bytes) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", content_type)
            .header("accept", accept)
            .body(Full::new(
                body.map(|b| Bytes::from(b.to_string())).unwrap_or_default(),
            ))
            .unwrap();
        self.send.ready().await.unwrap();
        let resp = self.send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }
}

pub fn start_server() -> Server {
    start_server_with(&[])
}
