//! The proxy on loopback with real upstream servers: routing, forwarded
//! headers, HTTP/2 over TLS with SNI, certificate rotation, retries on a
//! dead endpoint, answers before the first sync. The routing table is
//! built from API objects exactly as the node's watches build it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use skep_ingress::{Objects, Proxy, routes, tls::CertCache};
use std::{convert::Infallible, net::SocketAddr, sync::Arc};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that answers with its name and the headers the proxy set.
async fn upstream(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    let h = |n: &str| {
                        req.headers()
                            .get(n)
                            .map(|v| v.to_str().unwrap_or("").to_owned())
                            .unwrap_or_default()
                    };
                    let text = format!(
                        "{name}\nhost={}\nxff={}\nproto={}\nxfh={}\npath={}\n",
                        h("host"),
                        h("x-forwarded-for"),
                        h("x-forwarded-proto"),
                        h("x-forwarded-host"),
                        req.uri()
                    );
                    Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                        Bytes::from(text),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn service(objs: &mut Objects, name: &str, eps: &[SocketAddr]) {
    objs.services.insert(
        format!("d/{name}"),
        json!({"metadata": {"name": name, "namespace": "d"},
               "spec": {"ports": [{"name": "web", "port": 80}]}}),
    );
    let mut by_port: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
    for e in eps {
        by_port
            .entry(e.port())
            .or_default()
            .push(e.ip().to_string());
    }
    // One slice per target port, as the API allows.
    for (i, (port, ips)) in by_port.into_iter().enumerate() {
        objs.slices.insert(
            format!("d/{name}-{i}"),
            json!({"metadata": {"name": format!("{name}-{i}"), "namespace": "d",
                                "labels": {"kubernetes.io/service-name": name}},
                   "ports": [{"name": "web", "port": port}],
                   "endpoints": [{"addresses": ips, "conditions": {"ready": true}}]}),
        );
    }
}

fn path(p: &str, svc: &str) -> Value {
    json!({"path": p, "pathType": "Prefix", "backend": {"service": {"name": svc, "port": {"name": "web"}}}})
}

fn build(proxy: &Proxy, objs: &Objects, certs: &mut CertCache) {
    let snap = routes::build(
        objs,
        routes::BuildContext {
            registry: &proxy.registry,
            certs,
        },
    );
    proxy.update(snap);
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", host)
        .header("x-forwarded-for", "192.0.2.1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

async fn start_proxy() -> (Arc<Proxy>, SocketAddr, SocketAddr) {
    let proxy = skep_ingress::new_proxy();
    let args = skep_ingress::IngressArgs {
        no_ingress: false,
        ingress_http_listen: "127.0.0.1:0".parse().unwrap(),
        ingress_https_listen: "127.0.0.1:0".parse().unwrap(),
        ingress_metrics_listen: "off".parse().unwrap(),
    };
    let bound = skep_ingress::serve(proxy.clone(), &args).await;
    (proxy, bound.http.unwrap(), bound.https.unwrap())
}

fn class(objs: &mut Objects) {
    objs.classes
        .insert("skep".into(), skep_ingress::class_manifest());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_path_with_forwarded_headers() {
    let (proxy, http, _) = start_proxy().await;
    let (code, _) = get(http, "a.test", "/").await;
    assert_eq!(code, 503, "before the first table every request is 503");

    let (a, b) = (upstream("alpha").await, upstream("beta").await);
    let mut objs = Objects::default();
    class(&mut objs);
    service(&mut objs, "a", &[a]);
    service(&mut objs, "b", &[b]);
    objs.ingresses.insert(
        "d/web".into(),
        json!({"metadata": {"name": "web", "namespace": "d", "creationTimestamp": "2024-01-01T00:00:00Z"},
               "spec": {"rules": [{"host": "a.test", "http": {"paths": [path("/", "a"), path("/b", "b")]}}]}}),
    );
    let mut certs = CertCache::default();
    build(&proxy, &objs, &mut certs);

    let (code, body) = get(http, "a.test", "/x?q=1").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("alpha\n"), "{body}");
    assert!(body.contains("host=a.test\n"), "Host kept: {body}");
    assert!(
        body.contains("xff=192.0.2.1, 127.0.0.1\n"),
        "X-Forwarded-For appended: {body}"
    );
    assert!(body.contains("proto=http\n"), "{body}");
    assert!(body.contains("xfh=a.test\n"), "{body}");
    assert!(body.contains("path=/x?q=1\n"), "{body}");
    let (_, body) = get(http, "A.TEST:80", "/b/c").await;
    assert!(
        body.starts_with("beta\n"),
        "host case and port ignored: {body}"
    );
    let (code, body) = get(http, "other.test", "/").await;
    assert_eq!(code, 404, "{body}");

    // A default backend catches the rest.
    objs.ingresses.insert(
        "d/fallback".into(),
        json!({"metadata": {"name": "fallback", "namespace": "d", "creationTimestamp": "2024-02-01T00:00:00Z"},
               "spec": {"defaultBackend": {"service": {"name": "b", "port": {"number": 80}}}}}),
    );
    build(&proxy, &objs, &mut certs);
    let (code, body) = get(http, "other.test", "/").await;
    assert_eq!((code, body.lines().next()), (200, Some("beta")));

    let metrics = proxy.registry.render();
    assert!(
        metrics.contains(
            r#"skep_ingress_requests_total{ingress="d/web",namespace="d",service="a",code="200"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"code="404"} 1"#), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_skipped() {
    let (proxy, http, _) = start_proxy().await;
    let live = upstream("live").await;
    // A port that refuses: bound then closed.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut objs = Objects::default();
    class(&mut objs);
    service(&mut objs, "a", &[dead, live]);
    objs.ingresses.insert(
        "d/web".into(),
        json!({"metadata": {"name": "web", "namespace": "d"},
               "spec": {"rules": [{"http": {"paths": [path("/", "a")]}}]}}),
    );
    build(&proxy, &objs, &mut CertCache::default());
    for i in 0..20 {
        let (code, body) = get(http, "x.test", "/").await;
        assert_eq!(
            (code, body.lines().next()),
            (200, Some("live")),
            "request {i}"
        );
    }
    // A POST body survives the failed attempt too.
    for i in 0..6 {
        let s = TcpStream::connect(http).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::post("/")
            .header("host", "x.test")
            .body(http_body_util::Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "POST {i}");
    }
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
            .push(rcgen::DnType::CommonName, "ingress test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = p.self_signed(&ca_key).unwrap();
        Self { ca, ca_key }
    }

    /// (cert PEM, key PEM) for `names`.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn tls_secret(objs: &mut Objects, name: &str, rv: &str, (crt, key): &(String, String)) {
    use base64::Engine;
    let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    objs.secrets.insert(
        format!("d/{name}"),
        json!({"metadata": {"name": name, "namespace": "d", "resourceVersion": rv},
               "type": "kubernetes.io/tls", "data": {"tls.crt": b(crt), "tls.key": b(key)}}),
    );
}

/// An HTTPS request over HTTP/2 (ALPN) verifying against `ca`; returns
/// the status, body and the server's leaf certificate.
async fn h2_get(addr: SocketAddr, ca: &rcgen::Certificate, sni: &str) -> (u16, String, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (_, conn) = tls.get_ref();
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
    let leaf = conn.peer_certificates().unwrap()[0].to_vec();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("https://{sni}/"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned(), leaf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_by_sni_over_h2_and_rotation() {
    let (proxy, _, https) = start_proxy().await;
    let (a, b) = (upstream("alpha").await, upstream("beta").await);
    let pki = Pki::new();
    let mut objs = Objects::default();
    class(&mut objs);
    service(&mut objs, "a", &[a]);
    service(&mut objs, "b", &[b]);
    let (one, two) = (pki.leaf(&["one.test"]), pki.leaf(&["*.two.test"]));
    tls_secret(&mut objs, "one", "1", &one);
    tls_secret(&mut objs, "two", "1", &two);
    objs.ingresses.insert(
        "d/web".into(),
        json!({"metadata": {"name": "web", "namespace": "d"},
               "spec": {"tls": [{"hosts": ["one.test"], "secretName": "one"},
                                {"hosts": ["*.two.test"], "secretName": "two"}],
                        "rules": [{"host": "one.test", "http": {"paths": [path("/", "a")]}},
                                  {"host": "*.two.test", "http": {"paths": [path("/", "b")]}}]}}),
    );
    let mut certs = CertCache::default();
    build(&proxy, &objs, &mut certs);
    let pem_der = |pem: &str| {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    };
    let (code, body, leaf) = h2_get(https, &pki.ca, "one.test").await;
    assert_eq!((code, body.lines().next()), (200, Some("alpha")));
    assert!(
        body.contains("proto=https\n") && body.contains("host=one.test\n"),
        "{body}"
    );
    assert_eq!(leaf, pem_der(&one.0), "the one.test certificate");
    let (code, body, leaf) = h2_get(https, &pki.ca, "x.two.test").await;
    assert_eq!((code, body.lines().next()), (200, Some("beta")));
    assert_eq!(leaf, pem_der(&two.0), "the wildcard certificate by SNI");

    // Rotation: the Secret changes, the next handshake gets the new one.
    let rotated = pki.leaf(&["one.test"]);
    tls_secret(&mut objs, "one", "2", &rotated);
    build(&proxy, &objs, &mut certs);
    let (code, _, leaf) = h2_get(https, &pki.ca, "one.test").await;
    assert_eq!(code, 200);
    assert_eq!(
        leaf,
        pem_der(&rotated.0),
        "the rotated certificate is served"
    );
}

/// An upstream that switches to a byte echo on `Upgrade: echo`.
async fn upgrade_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(move |mut req: Request<Incoming>| async move {
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(io) = on.await {
                            let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        }
                    });
                    let resp = hyper::Response::builder()
                        .status(101)
                        .header("connection", "upgrade")
                        .header("upgrade", "echo")
                        .body(http_body_util::Full::new(Bytes::new()))
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_spliced() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (proxy, http, _) = start_proxy().await;
    let up = upgrade_upstream().await;
    let mut objs = Objects::default();
    class(&mut objs);
    service(&mut objs, "ws", &[up]);
    objs.ingresses.insert(
        "d/ws".into(),
        json!({"metadata": {"name": "ws", "namespace": "d"},
               "spec": {"rules": [{"host": "ws.test", "http": {"paths": [path("/", "ws")]}}]}}),
    );
    build(&proxy, &objs, &mut CertCache::default());
    let mut s = TcpStream::connect(http).await.unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(
            s.read(&mut b).await.unwrap(),
            1,
            "connection closed in the head: {head:?}"
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    s.write_all(b"ping over the upgraded connection")
        .await
        .unwrap();
    let mut buf = [0u8; 33];
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("echo within 5 s")
        .unwrap();
    assert_eq!(&buf, b"ping over the upgraded connection");
}
