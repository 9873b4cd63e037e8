#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Probes against real servers on 127.0.0.1: a small HTTP/1.1 server
//! (plain and TLS), a tonic gRPC health server, closed ports, and exec
//! probes through a test runtime that runs commands on the host.

use serde_json::{Value, json};
use skep_kubelet::probe::{
    ProbeEvent, ProbeKind, ProbeResult, ProbeStatus, ProbeTarget, Prober, probe_once,
};
use skep_kubelet::runtime::{ContainerInfo, ContainerSpec, ExecSession, Runtime, RuntimeError};
use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    sync::{mpsc, watch},
};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A runtime whose `exec` runs the command on the host: exec probes only
/// need a process with stdout, stderr and an exit code.
struct HostRuntime;

#[async_trait::async_trait]
impl Runtime for HostRuntime {
    fn name(&self) -> &'static str {
        "host-test"
    }
    async fn version(&self) -> Result<String, RuntimeError> {
        Ok("host-test://0".into())
    }
    async fn health(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn ensure_image(&self, _image: &str) -> Result<String, RuntimeError> {
        Err(RuntimeError::Unavailable("test runtime".into()))
    }
    async fn start(&self, _spec: &ContainerSpec) -> Result<String, RuntimeError> {
        Err(RuntimeError::Unavailable("test runtime".into()))
    }
    async fn stop(&self, _id: &str, _grace: Duration) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn remove(&self, _id: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn list(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        Ok(Vec::new())
    }
    async fn exec(
        &self,
        _id: &str,
        cmd: &[String],
        _tty: bool,
        _stdin: bool,
    ) -> Result<ExecSession, RuntimeError> {
        let mut child = tokio::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(RuntimeError::io(format!("spawning {cmd:?}")))?;
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (mut tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::select! {
                status = child.wait() => {
                    let _ = tx.send(status.map(|s| s.code().unwrap_or(-1)).unwrap_or(-1));
                }
                // The prober gave up on the session: end the process.
                () = tx.closed() => {
                    let _ = child.kill().await;
                }
            }
        });
        Ok(ExecSession {
            stdin: None,
            stdout: Some(Box::new(stdout)),
            stderr: Some(Box::new(stderr)),
            resize: None,
            exit: rx,
        })
    }
    async fn attach(&self, _id: &str, _stdin: bool) -> Result<ExecSession, RuntimeError> {
        Err(RuntimeError::Unavailable("test runtime".into()))
    }
}

fn target(container: Value) -> ProbeTarget {
    ProbeTarget {
        pod_ip: Some(LOCALHOST),
        host_ip: LOCALHOST,
        container_id: "test-container".into(),
        container,
        runtime: Arc::new(HostRuntime),
    }
}

#[derive(Debug, Clone)]
struct Recorded {
    path: String,
    headers: Vec<(String, String)>,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A tiny HTTP/1.1 server whose answer depends on the path; it records
/// every request it reads.
struct HttpServer {
    port: u16,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl HttpServer {
    async fn start(tls: bool) -> Self {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let acceptor = tls.then(tls_acceptor);
        let seen = requests.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let seen = seen.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(s) = a.accept(stream).await {
                                serve(s, port, seen).await;
                            }
                        }
                        None => serve(stream, port, seen).await,
                    }
                });
            }
        });
        Self { port, requests }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    port: u16,
    seen: Arc<Mutex<Vec<Recorded>>>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    seen.lock().unwrap().push(Recorded {
        path: path.clone(),
        headers,
    });
    let (status, location, body) = match path.as_str() {
        "/ok" => (200, None, "ok".to_string()),
        "/fail" => (500, None, "boom".to_string()),
        "/redirect" => (302, Some("/ok".to_string()), String::new()),
        "/redirect-absolute" => (
            301,
            Some(format!("http://127.0.0.1:{port}/ok")),
            String::new(),
        ),
        "/redirect-to-fail" => (307, Some("/fail".to_string()), String::new()),
        "/away" => (
            302,
            Some("http://elsewhere.invalid/".to_string()),
            String::new(),
        ),
        "/loop" => (302, Some("/loop".to_string()), String::new()),
        "/big" => (200, None, "x".repeat(200 * 1024)),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            (200, None, "late".to_string())
        }
        _ => (404, None, "not found".to_string()),
    };
    let location = location
        .map(|l| format!("Location: {l}\r\n"))
        .unwrap_or_default();
    let response = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n{location}\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn http_probe(server: &HttpServer, path: &str) -> ProbeResult {
    let probe = json!({"httpGet": {"port": server.port, "path": path}});
    probe_once(&probe, &target(json!({}))).await
}

/// A port nothing listens on (bound, then released).
async fn closed_port() -> u16 {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    listener.local_addr().unwrap().port()
}

fn failure(result: ProbeResult) -> String {
    match result {
        ProbeResult::Failure(message) => message,
        ProbeResult::Success => panic!("expected the probe to fail"),
    }
}

#[tokio::test]
async fn http_200_succeeds_and_sends_kube_probe_headers() {
    let server = HttpServer::start(false).await;
    assert_eq!(http_probe(&server, "/ok").await, ProbeResult::Success);
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].path, "/ok");
    assert_eq!(requests[0].header("user-agent"), Some("kube-probe/1.31"));
    assert_eq!(requests[0].header("accept"), Some("*/*"));
    assert_eq!(
        requests[0].header("host"),
        Some(format!("127.0.0.1:{}", server.port).as_str())
    );
}

#[tokio::test]
async fn http_500_fails_with_the_status_code() {
    let server = HttpServer::start(false).await;
    let message = failure(http_probe(&server, "/fail").await);
    assert_eq!(message, "HTTP probe failed with statuscode: 500");
    let message = failure(http_probe(&server, "/missing").await);
    assert_eq!(message, "HTTP probe failed with statuscode: 404");
}

#[tokio::test]
async fn http_redirects_on_the_same_host_are_followed() {
    let server = HttpServer::start(false).await;
    assert_eq!(http_probe(&server, "/redirect").await, ProbeResult::Success);
    assert_eq!(
        http_probe(&server, "/redirect-absolute").await,
        ProbeResult::Success
    );
    let paths: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/redirect", "/ok", "/redirect-absolute", "/ok"]);

    // The verdict is the final response's.
    let message = failure(http_probe(&server, "/redirect-to-fail").await);
    assert_eq!(message, "HTTP probe failed with statuscode: 500");
}

#[tokio::test]
async fn http_redirect_elsewhere_is_success_without_following() {
    let server = HttpServer::start(false).await;
    assert_eq!(http_probe(&server, "/away").await, ProbeResult::Success);
    assert_eq!(server.count(), 1);
}

#[tokio::test]
async fn http_redirect_loop_stops_after_ten() {
    let server = HttpServer::start(false).await;
    let message = failure(http_probe(&server, "/loop").await);
    assert!(message.contains("stopped after 10 redirects"), "{message}");
    assert_eq!(server.count(), 11);
}

#[tokio::test]
async fn http_named_port_and_custom_headers() {
    let server = HttpServer::start(false).await;
    let container = json!({"name": "app", "ports": [
        {"name": "metrics", "containerPort": 1},
        {"name": "http", "containerPort": server.port},
    ]});
    let probe = json!({"httpGet": {"port": "http", "path": "ok", "httpHeaders": [
        {"name": "X-Probe", "value": "yes"},
        {"name": "User-Agent", "value": "custom-agent"},
        {"name": "Host", "value": "app.example"},
    ]}});
    assert_eq!(
        probe_once(&probe, &target(container.clone())).await,
        ProbeResult::Success
    );
    let requests = server.requests();
    assert_eq!(requests[0].path, "/ok");
    assert_eq!(requests[0].header("x-probe"), Some("yes"));
    assert_eq!(requests[0].header("user-agent"), Some("custom-agent"));
    assert_eq!(requests[0].header("host"), Some("app.example"));

    let probe = json!({"httpGet": {"port": "nope", "path": "/ok"}});
    let message = failure(probe_once(&probe, &target(container)).await);
    assert!(message.contains("couldn't find port: nope"), "{message}");
}

#[tokio::test]
async fn http_large_body_is_fine() {
    let server = HttpServer::start(false).await;
    assert_eq!(http_probe(&server, "/big").await, ProbeResult::Success);
}

#[tokio::test]
async fn http_connection_refused_reads_like_the_kubelet() {
    let port = closed_port().await;
    let probe = json!({"httpGet": {"port": port, "path": "/"}});
    let message = failure(probe_once(&probe, &target(json!({}))).await);
    assert_eq!(
        message,
        format!(
            "Get \"http://127.0.0.1:{port}/\": dial tcp 127.0.0.1:{port}: connect: connection refused"
        )
    );
}

#[tokio::test]
async fn http_timeout_is_enforced() {
    let server = HttpServer::start(false).await;
    let probe = json!({"httpGet": {"port": server.port, "path": "/slow"}, "timeoutSeconds": 1});
    let started = Instant::now();
    let message = failure(probe_once(&probe, &target(json!({}))).await);
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert!(message.contains("Client.Timeout exceeded"), "{message}");
}

#[tokio::test]
async fn https_skips_certificate_verification() {
    let server = HttpServer::start(true).await;
    let probe = json!({"httpGet": {"port": server.port, "path": "/ok", "scheme": "HTTPS"}});
    assert_eq!(
        probe_once(&probe, &target(json!({}))).await,
        ProbeResult::Success
    );
    let probe = json!({"httpGet": {"port": server.port, "path": "/fail", "scheme": "HTTPS"}});
    let message = failure(probe_once(&probe, &target(json!({}))).await);
    assert_eq!(message, "HTTP probe failed with statuscode: 500");
}

#[tokio::test]
async fn tcp_open_and_closed_ports() {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let open = listener.local_addr().unwrap().port();
    let container = json!({"ports": [{"name": "svc", "containerPort": open}]});
    let probe = json!({"tcpSocket": {"port": "svc"}});
    assert_eq!(
        probe_once(&probe, &target(container)).await,
        ProbeResult::Success
    );

    let closed = closed_port().await;
    let probe = json!({"tcpSocket": {"port": closed}});
    let message = failure(probe_once(&probe, &target(json!({}))).await);
    assert_eq!(
        message,
        format!("dial tcp 127.0.0.1:{closed}: connect: connection refused")
    );
}

async fn grpc_health_server() -> u16 {
    let (mut reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("up", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("down", tonic_health::ServingStatus::NotServing)
        .await;
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await.map(|(stream, _)| stream);
        Some((next, listener))
    });
    tokio::spawn(async move {
        // Keep the reporter (and so the statuses) alive with the server.
        let _reporter = reporter;
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    port
}

#[tokio::test]
async fn grpc_serving_and_not_serving() {
    let port = grpc_health_server().await;
    let t = target(json!({}));
    let probe = json!({"grpc": {"port": port, "service": "up"}});
    assert_eq!(probe_once(&probe, &t).await, ProbeResult::Success);
    // The empty service name is the server's overall health.
    let probe = json!({"grpc": {"port": port}});
    assert_eq!(probe_once(&probe, &t).await, ProbeResult::Success);

    let probe = json!({"grpc": {"port": port, "service": "down"}});
    let message = failure(probe_once(&probe, &t).await);
    assert_eq!(
        message,
        "service unhealthy (responded with \"NOT_SERVING\")"
    );

    let probe = json!({"grpc": {"port": port, "service": "unknown"}});
    let message = failure(probe_once(&probe, &t).await);
    assert!(
        message.starts_with("error: health rpc probe failed"),
        "{message}"
    );

    let closed = closed_port().await;
    let probe = json!({"grpc": {"port": closed}});
    let message = failure(probe_once(&probe, &t).await);
    assert!(message.contains("failed to connect service"), "{message}");
}

#[tokio::test]
async fn exec_exit_codes_output_and_timeout() {
    let t = target(json!({}));
    let exec = |cmd: &[&str]| json!({"exec": {"command": cmd}, "timeoutSeconds": 1});
    assert_eq!(probe_once(&exec(&["true"]), &t).await, ProbeResult::Success);
    let message = failure(probe_once(&exec(&["false"]), &t).await);
    assert!(message.contains("exited with 1"), "{message}");
    let message = failure(
        probe_once(
            &exec(&["sh", "-c", "echo not ready; echo why >&2; exit 3"]),
            &t,
        )
        .await,
    );
    assert_eq!(message, "not ready\nwhy");

    let started = Instant::now();
    let message = failure(probe_once(&exec(&["sleep", "5"]), &t).await);
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert!(message.contains("timed out"), "{message}");

    let message = failure(probe_once(&exec(&["/nonexistent/probe"]), &t).await);
    assert!(message.contains("/nonexistent/probe"), "{message}");
}

#[tokio::test]
async fn probe_without_handler_fails() {
    let message = failure(probe_once(&json!({"periodSeconds": 1}), &target(json!({}))).await);
    assert!(message.contains("missing probe handler"), "{message}");
}

/// Waits for a status matching `pred`, with a deadline.
async fn wait_for(
    rx: &mut watch::Receiver<ProbeStatus>,
    within: Duration,
    pred: impl Fn(&ProbeStatus) -> bool,
) -> ProbeStatus {
    tokio::time::timeout(within, rx.wait_for(|s| pred(s)))
        .await
        .expect("the status did not come in time")
        .expect("the prober ended")
        .clone()
}

async fn next_event(rx: &mut mpsc::Receiver<ProbeEvent>) -> ProbeEvent {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no probe event in time")
        .expect("the event channel closed")
}

#[tokio::test]
async fn readiness_needs_success_threshold_successes() {
    let server = HttpServer::start(false).await;
    let probe = json!({"httpGet": {"port": server.port, "path": "/ok"},
        "periodSeconds": 1, "successThreshold": 2});
    let started = Instant::now();
    let (_prober, mut status, _events) =
        Prober::spawn(ProbeKind::Readiness, probe, target(json!({})));
    assert!(!status.borrow().ready, "readiness starts not ready");

    // The first probe runs at once and is not enough.
    let first = wait_for(&mut status, Duration::from_secs(2), |s| s.ran).await;
    assert!(!first.ready);
    assert_eq!(server.count(), 1);

    wait_for(&mut status, Duration::from_secs(3), |s| s.ready).await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(server.count(), 2);
}

#[tokio::test]
async fn readiness_turns_not_ready_after_failure_threshold() {
    let server = HttpServer::start(false).await;
    let probe = json!({"httpGet": {"port": server.port, "path": "/fail"},
        "periodSeconds": 1, "failureThreshold": 1});
    let (_prober, mut status, mut events) =
        Prober::spawn(ProbeKind::Readiness, probe, target(json!({})));
    let failed = next_event(&mut events).await;
    assert_eq!(
        failed,
        ProbeEvent::Failed {
            kind: ProbeKind::Readiness,
            message: "HTTP probe failed with statuscode: 500".into()
        }
    );
    assert!(matches!(
        next_event(&mut events).await,
        ProbeEvent::ThresholdReached {
            kind: ProbeKind::Readiness,
            ..
        }
    ));
    let s = wait_for(&mut status, Duration::from_secs(2), |s| s.ran).await;
    assert!(!s.ready);
    assert_eq!(
        s.last_failure.as_deref(),
        Some("HTTP probe failed with statuscode: 500")
    );
    // Readiness keeps probing.
    wait_for(&mut status, Duration::from_secs(3), |s| {
        s.consecutive_failures >= 2
    })
    .await;
}

#[tokio::test]
async fn liveness_threshold_fires_after_failure_threshold_failures() {
    let server = HttpServer::start(false).await;
    let probe = json!({"httpGet": {"port": server.port, "path": "/fail"},
        "periodSeconds": 1, "failureThreshold": 2});
    let started = Instant::now();
    let (prober, mut status, mut events) =
        Prober::spawn(ProbeKind::Liveness, probe, target(json!({})));
    assert!(status.borrow().ready, "liveness starts alive");

    let one = wait_for(&mut status, Duration::from_secs(2), |s| s.ran).await;
    assert!(one.ready, "one failure is below the threshold");
    assert_eq!(one.consecutive_failures, 1);

    assert!(matches!(
        next_event(&mut events).await,
        ProbeEvent::Failed { .. }
    ));
    assert!(matches!(
        next_event(&mut events).await,
        ProbeEvent::Failed { .. }
    ));
    match next_event(&mut events).await {
        ProbeEvent::ThresholdReached { kind, message } => {
            assert_eq!(kind, ProbeKind::Liveness);
            assert_eq!(message, "HTTP probe failed with statuscode: 500");
        }
        other => panic!("expected ThresholdReached, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(900));
    let s = status.borrow().clone();
    assert!(!s.ready);
    assert_eq!(s.consecutive_failures, 2);

    // Probing stops until the container is replaced.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(server.count(), 2);
    assert!(prober.is_finished());
}

#[tokio::test]
async fn startup_stops_probing_once_it_succeeds() {
    let server = HttpServer::start(false).await;
    let probe = json!({"httpGet": {"port": server.port, "path": "/ok"}, "periodSeconds": 1});
    let (_prober, mut status, _events) =
        Prober::spawn(ProbeKind::Startup, probe, target(json!({})));
    assert!(!status.borrow().ready, "startup starts not started");
    wait_for(&mut status, Duration::from_secs(2), |s| s.ready).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(server.count(), 1);
}

#[tokio::test]
async fn initial_delay_is_respected() {
    let server = HttpServer::start(false).await;
    let probe = json!({"httpGet": {"port": server.port, "path": "/ok"},
        "initialDelaySeconds": 2, "periodSeconds": 1});
    let started = Instant::now();
    let (_prober, mut status, _events) =
        Prober::spawn(ProbeKind::Readiness, probe, target(json!({})));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(server.count(), 0, "probed before initialDelaySeconds");
    assert!(!status.borrow().ran);
    wait_for(&mut status, Duration::from_secs(2), |s| s.ready).await;
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(server.count(), 1);
}

#[tokio::test]
async fn dropping_the_prober_stops_it() {
    let server = HttpServer::start(false).await;
    let probe = json!({"httpGet": {"port": server.port, "path": "/ok"}, "periodSeconds": 1});
    let (prober, mut status, _events) =
        Prober::spawn(ProbeKind::Readiness, probe, target(json!({})));
    wait_for(&mut status, Duration::from_secs(2), |s| s.ran).await;
    drop(prober);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(server.count(), 1);
}

#[tokio::test]
async fn exec_prober_uses_the_runtime() {
    let probe = json!({"exec": {"command": ["true"]}, "periodSeconds": 1});
    let (_prober, mut status, _events) =
        Prober::spawn(ProbeKind::Readiness, probe, target(json!({})));
    wait_for(&mut status, Duration::from_secs(3), |s| s.ready).await;
}
