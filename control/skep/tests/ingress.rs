//! The built-in Ingress proxy in a real cluster (the server's node in its
//! own network namespace, tests/cluster): host and path routing to two
//! Deployments, the `skep` IngressClass as the default, status addresses,
//! TLS from a Secret made here (a rustls client verifies it, by SNI), the
//! Secret rotated and served without a restart, 404 for unmatched
//! requests, a default backend, Prometheus metrics, and 2,000 keep-alive
//! requests that all succeed while the Ingresses change under them.
//!
//! Every request is made from a thread that entered the node's network
//! namespace: traffic never leaves the namespaces the test creates.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use bytes::Bytes;
use cluster::Cluster;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::net::TcpStream;

const WORKLOADS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: alpha, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: alpha}}
  template:
    metadata: {labels: {app: alpha}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: host
        command: [skep, tools, serve, --http, "8080"]
        readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: beta, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: beta}}
  template:
    metadata: {labels: {app: beta}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: host
        command: [skep, tools, serve, --http, "9090"]
        readinessProbe: {tcpSocket: {port: 9090}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: alpha, namespace: default}
spec:
  selector: {app: alpha}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: beta, namespace: default}
spec:
  selector: {app: beta}
  ports: [{name: web, port: 8000, targetPort: 9090}]
"#;

/// No ingressClassName: the default class (`skep`) takes it.
const INGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: default}
spec:
  rules:
  - host: web.test
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: alpha, port: {number: 80}}}}
      - {path: /beta, pathType: Prefix, backend: {service: {name: beta, port: {name: web}}}}
      - {path: /exact, pathType: Exact, backend: {service: {name: beta, port: {number: 8000}}}}
  - host: "*.wild.test"
    http:
      paths:
      - {path: /, pathType: ImplementationSpecific, backend: {service: {name: beta, port: {number: 8000}}}}
"#;

/// Runs `f` on a thread inside the network namespace `netns` with a
/// current-thread tokio runtime (sockets belong to the thread's netns).
fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let rc = unsafe {
            use std::os::fd::AsRawFd;
            libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET)
        };
        assert_eq!(
            rc,
            0,
            "setns into {path}: {}",
            std::io::Error::last_os_error()
        );
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

async fn send(send: &mut Sender, host: &str, path: &str) -> Result<(u16, String), String> {
    let req = hyper::Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let fut = async {
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let code = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((code, String::from_utf8_lossy(&body).trim().to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| "request timed out".to_string())?
}

/// One plain-HTTP request on a new connection, from the node's netns.
fn get(c: &Cluster, host: &str, path: &str) -> Result<(u16, String), String> {
    let addr: SocketAddr = format!("{}:80", c.nodes[0].ip).parse().unwrap();
    let (host, path) = (host.to_owned(), path.to_owned());
    in_netns(&c.nodes[0].netns, move || {
        Box::pin(async move {
            let mut s = connect(addr).await?;
            send(&mut s, &host, &path).await
        })
    })
    .join()
    .unwrap()
}

/// Polls until `host` + `path` answers `code` with a body starting with
/// `prefix`.
fn wait_route(c: &Cluster, host: &str, path: &str, code: u16, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last;
    loop {
        last = get(c, host, path);
        if matches!(&last, Ok((got, body)) if *got == code && body.starts_with(prefix)) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "http://{host}{path}: wanted {code} from {prefix}*, last answer {last:?}\nserver log:\n{}",
                tail(&c.nodes[0].log(), 80)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

struct Pki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Self {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "skep ingress test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = p.self_signed(&ca_key).unwrap();
        Self { ca, ca_key }
    }

    /// (certificate PEM, key PEM, certificate DER) for `name`.
    fn leaf(&self, name: &str) -> (String, String, Vec<u8>) {
        let p = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

fn tls_secret_yaml(name: &str, crt: &str, key: &str) -> String {
    let b64 = |s: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new("base64")
            .arg("-w0")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: default}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b64(crt),
        b64(key)
    )
}

/// An HTTPS GET over TLS verified against `ca` with SNI `host`; returns
/// the status, body and the leaf certificate the proxy presented.
fn https_get(c: &Cluster, ca_der: Vec<u8>, host: &str) -> Result<(u16, String, Vec<u8>), String> {
    let addr: SocketAddr = format!("{}:443", c.nodes[0].ip).parse().unwrap();
    let host = host.to_owned();
    in_netns(&c.nodes[0].netns, move || {
        Box::pin(async move {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca_der.into()).map_err(|e| e.to_string())?;
            let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
            cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let name =
                rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            let leaf = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec())
                .unwrap_or_default();
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            if !h2 {
                return Err("the proxy did not negotiate h2".into());
            }
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = hyper::Request::get(format!("https://{host}/"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
            let code = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((code, String::from_utf8_lossy(&body).trim().to_owned(), leaf))
        })
    })
    .join()
    .unwrap()
}

#[test]
fn ingress_routes_terminates_tls_rotates_and_reloads_without_dropping_requests() {
    let c = Cluster::start(0);
    // The server installs the default class.
    c.wait_for("IngressClass skep", Duration::from_secs(30), |c| {
        c.jsonpath(
            "default",
            "ingressclass/skep",
            "{.metadata.annotations.ingressclass\\.kubernetes\\.io/is-default-class}",
        ) == "true"
    });
    c.apply(WORKLOADS);
    c.wait_for("alpha and beta ready", Duration::from_secs(90), |c| {
        c.jsonpath("default", "deployment/alpha", "{.status.readyReplicas}") == "2"
            && c.jsonpath("default", "deployment/beta", "{.status.readyReplicas}") == "1"
    });
    c.apply(INGRESS);

    // Host and path routing (the echo servers answer with their pod name).
    wait_route(&c, "web.test", "/", 200, "alpha-");
    wait_route(&c, "web.test", "/anything/else", 200, "alpha-");
    wait_route(&c, "web.test", "/beta", 200, "beta-");
    wait_route(&c, "web.test", "/beta/x", 200, "beta-");
    wait_route(&c, "web.test", "/betamax", 200, "alpha-");
    wait_route(&c, "web.test", "/exact", 200, "beta-");
    wait_route(&c, "web.test", "/exact/no", 200, "alpha-");
    wait_route(&c, "a.wild.test", "/", 200, "beta-");
    wait_route(&c, "unknown.test", "/", 404, "");
    // Round-robin reaches both alpha pods.
    let mut alphas = std::collections::BTreeSet::new();
    for _ in 0..10 {
        if let Ok((200, body)) = get(&c, "web.test", "/") {
            alphas.insert(body);
        }
    }
    assert_eq!(alphas.len(), 2, "both alpha pods answer: {alphas:?}");

    // The status lists the node's address.
    let node_ip = c.nodes[0].ip.clone();
    c.wait_for("ingress status address", Duration::from_secs(30), |c| {
        c.jsonpath(
            "default",
            "ingress/web",
            "{.status.loadBalancer.ingress[0].ip}",
        ) == node_ip
    });
    // The status writer follows watches (no polling): new Ingresses get
    // the address within a watch round-trip, well under the old 3 s pass.
    for probe in ["status-probe-1", "status-probe-2"] {
        c.apply(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {probe}, namespace: default}}\nspec:\n  rules: [{{host: {probe}.test, http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: beta, port: {{number: 8000}}}}}}}}]}}}}]\n"
        ));
        c.wait_for(
            &format!("{probe} status within 1.5 s"),
            Duration::from_millis(1500),
            |c| {
                c.jsonpath(
                    "default",
                    &format!("ingress/{probe}"),
                    "{.status.loadBalancer.ingress[0].ip}",
                ) == node_ip
            },
        );
        let out = c.kubectl(&["-n", "default", "delete", "ingress", probe]);
        assert!(out.status.success(), "delete {probe}");
    }

    // TLS from a Secret, chosen by SNI and verified by the client.
    let pki = Pki::new();
    let ca_der = pki.ca.der().to_vec();
    let (crt1, key1, der1) = pki.leaf("secure.test");
    c.apply(&tls_secret_yaml("secure-tls", &crt1, &key1));
    c.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: secure, namespace: default}
spec:
  ingressClassName: skep
  tls: [{hosts: [secure.test], secretName: secure-tls}]
  rules:
  - host: secure.test
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: beta, port: {number: 8000}}}}
"#,
    );
    let wait_leaf = |want: &[u8], what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = https_get(&c, ca_der.clone(), "secure.test");
            match &got {
                Ok((200, body, leaf)) if leaf == want && body.starts_with("beta-") => return,
                _ if Instant::now() > deadline => panic!(
                    "{what}: last answer {:?}\nserver log:\n{}",
                    got.map(|(c, b, l)| (c, b, l.len())),
                    tail(&c.nodes[0].log(), 60)
                ),
                _ => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    };
    wait_leaf(&der1, "the Secret's certificate over h2");
    // Plain HTTP to a host listed under spec.tls is redirected to HTTPS.
    wait_route(&c, "secure.test", "/x?y=1", 308, "redirecting to HTTPS");
    // Rotation: a new certificate in the same Secret, no restart.
    let (crt2, key2, der2) = pki.leaf("secure.test");
    assert_ne!(der1, der2);
    c.apply(&tls_secret_yaml("secure-tls", &crt2, &key2));
    wait_leaf(&der2, "the rotated certificate");

    // A default backend for what no rule matches.
    c.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: fallback, namespace: default}
spec:
  defaultBackend: {service: {name: beta, port: {number: 8000}}}
"#,
    );
    wait_route(&c, "unknown.test", "/", 200, "beta-");

    // 2,000 requests over 4 keep-alive connections while Ingresses change:
    // every one must be answered 200 by an alpha pod.
    let addr: SocketAddr = format!("{}:80", c.nodes[0].ip).parse().unwrap();
    let load = in_netns(&c.nodes[0].netns, move || {
        Box::pin(async move {
            let mut tasks = Vec::new();
            for conn in 0..4 {
                tasks.push(tokio::spawn(async move {
                    let mut failures = Vec::new();
                    let mut s = connect(addr).await.unwrap();
                    for i in 0..500 {
                        // The connection is kept; only a failure reopens it.
                        match send(&mut s, "web.test", "/").await {
                            Ok((200, body)) if body.starts_with("alpha-") => {}
                            other => {
                                failures.push(format!("conn {conn} request {i}: {other:?}"));
                                s = connect(addr).await.unwrap();
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    failures
                }));
            }
            let mut failures = Vec::new();
            for t in tasks {
                failures.extend(t.await.unwrap());
            }
            failures
        })
    });
    let started = Instant::now();
    let mut changes = 0;
    while !load.is_finished() && started.elapsed() < Duration::from_secs(60) {
        // Add and remove a rule, and move /beta between ports by name and
        // number: each is a new routing table swapped under the load.
        let port = if changes % 2 == 0 {
            "{name: web}"
        } else {
            "{number: 8000}"
        };
        let extra = if changes % 2 == 0 {
            "\n  - host: extra.test\n    http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: beta, port: {number: 8000}}}}"
        } else {
            ""
        };
        let yaml = INGRESS.replace(
            "backend: {service: {name: beta, port: {name: web}}}}",
            &format!("backend: {{service: {{name: beta, port: {port}}}}}}}"),
        ) + extra;
        c.apply(&yaml);
        changes += 1;
        std::thread::sleep(Duration::from_millis(150));
    }
    let failures = load.join().unwrap();
    assert!(
        changes >= 3,
        "only {changes} Ingress changes during the load"
    );
    assert!(
        failures.is_empty(),
        "{} of 2000 requests failed during {changes} Ingress changes:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Prometheus metrics on the node.
    let out = c.in_node(
        0,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://127.0.0.1:9964/metrics",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let served: u64 = text
        .lines()
        .filter(|l| {
            l.starts_with("skep_ingress_requests_total{")
                && l.contains("ingress=\"default/web\"")
                && l.contains("service=\"alpha\"")
                && l.contains("code=\"200\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        served >= 2000,
        "requests counted for default/web → alpha: {served}\n{text}"
    );
    assert!(
        text.contains("skep_ingress_request_duration_seconds_bucket{ingress=\"default/web\""),
        "{text}"
    );
    // The access log goes through tracing.
    assert!(
        c.nodes[0].log().contains("skep::ingress::access"),
        "no access log lines in the server log"
    );
}
