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
        ingress_workers: 2,
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

/// A plain-HTTP GET returning the status and the Location header.
async fn get_location(addr: SocketAddr, method: &str, host: &str, path: &str) -> (u16, String) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let location = resp
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (resp.status().as_u16(), location)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_tls_hosts_is_redirected_unless_turned_off() {
    let (proxy, http, https) = start_proxy().await;
    let a = upstream("alpha").await;
    let pki = Pki::new();
    let mut objs = Objects::default();
    class(&mut objs);
    service(&mut objs, "a", &[a]);
    let cert = pki.leaf(&["secure.test", "*.wild.test", "optout.test"]);
    tls_secret(&mut objs, "cert", "1", &cert);
    objs.ingresses.insert(
        "d/secure".into(),
        json!({"metadata": {"name": "secure", "namespace": "d"},
               "spec": {"tls": [{"hosts": ["Secure.test", "*.wild.test"], "secretName": "cert"}],
                        "rules": [{"host": "secure.test", "http": {"paths": [path("/", "a")]}},
                                  {"host": "*.wild.test", "http": {"paths": [path("/", "a")]}},
                                  {"host": "plain.test", "http": {"paths": [path("/", "a")]}}]}}),
    );
    objs.ingresses.insert(
        "d/optout".into(),
        json!({"metadata": {"name": "optout", "namespace": "d",
                            "annotations": {"ingress.kubernetes.io/ssl-redirect": "false"}},
               "spec": {"tls": [{"hosts": ["optout.test"], "secretName": "cert"}],
                        "rules": [{"host": "optout.test", "http": {"paths": [path("/", "a")]}}]}}),
    );
    objs.ingresses.insert(
        "d/optout2".into(),
        json!({"metadata": {"name": "optout2", "namespace": "d",
                            "annotations": {"skep.io/ssl-redirect": "False"}},
               "spec": {"tls": [{"hosts": ["optout2.test"], "secretName": "cert"}],
                        "rules": [{"host": "optout2.test", "http": {"paths": [path("/", "a")]}}]}}),
    );
    let mut certs = CertCache::default();
    build(&proxy, &objs, &mut certs);
    let port = https.port();

    // A host under spec.tls: 308 to the same host and URI over HTTPS.
    assert_eq!(
        get_location(http, "GET", "secure.test", "/x/y?q=1&r=2").await,
        (308, format!("https://secure.test:{port}/x/y?q=1&r=2")),
    );
    assert_eq!(
        get_location(http, "POST", "SECURE.test:80", "/form").await,
        (308, format!("https://secure.test:{port}/form")),
        "any method, host lower-cased, the plain port dropped"
    );
    assert_eq!(
        get_location(http, "GET", "a.wild.test", "/").await,
        (308, format!("https://a.wild.test:{port}/")),
        "a wildcard TLS host"
    );
    // Hosts without TLS, and Ingresses that turned it off, are proxied.
    for host in ["plain.test", "optout.test", "optout2.test"] {
        let (code, body) = get(http, host, "/p").await;
        assert_eq!(
            (code, body.lines().next()),
            (200, Some("alpha")),
            "{host} is not redirected"
        );
    }
    // Unmatched hosts still get 404.
    assert_eq!(get(http, "nothing.test", "/").await.0, 404);
    // Over HTTPS the redirected host is proxied.
    let (code, body, _) = h2_get(https, &pki.ca, "secure.test").await;
    assert_eq!((code, body.lines().next()), (200, Some("alpha")));
    assert!(body.contains("proto=https\n"), "{body}");

    let metrics = proxy.registry.render();
    assert!(
        metrics.contains(
            r#"skep_ingress_requests_total{ingress="d/secure",namespace="d",service="a",code="308"} 3"#
        ),
        "redirects are counted: {metrics}"
    );
}

/// An upstream exercising HTTP/1.1 framing: chunked answers with
/// trailers, a large fixed-length body, 204, HEAD, `Connection: close`,
/// and an echo of the request body with its framing headers.
async fn framing_upstream() -> SocketAddr {
    use http_body_util::{BodyExt as _, StreamBody, combinators::BoxBody};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    type B = BoxBody<Bytes, Infallible>;
                    let full =
                        |b: Vec<u8>| -> B { http_body_util::Full::new(Bytes::from(b)).boxed() };
                    let resp = match req.uri().path() {
                        "/chunked" => {
                            let frames: Vec<Result<hyper::body::Frame<Bytes>, Infallible>> = vec![
                                Ok(hyper::body::Frame::data(Bytes::from_static(b"one,"))),
                                Ok(hyper::body::Frame::data(Bytes::from(vec![b'x'; 70_000]))),
                                Ok(hyper::body::Frame::data(Bytes::from_static(b",three"))),
                                Ok(hyper::body::Frame::trailers({
                                    let mut t = http::HeaderMap::new();
                                    t.insert("x-trailer", "t".parse().unwrap());
                                    t
                                })),
                            ];
                            hyper::Response::new(
                                StreamBody::new(futures::stream::iter(frames)).boxed(),
                            )
                        }
                        "/big" => hyper::Response::new(full(vec![b'b'; 1 << 20])),
                        "/nothing" => hyper::Response::builder()
                            .status(204)
                            .body(full(Vec::new()))
                            .unwrap(),
                        "/close" => hyper::Response::builder()
                            .header("connection", "close")
                            .body(full(b"closing".to_vec()))
                            .unwrap(),
                        _ => {
                            let h = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .map(|v| v.to_str().unwrap().to_owned())
                                    .unwrap_or_default()
                            };
                            let head = format!(
                                "{} te={} cl={} body=",
                                req.method(),
                                h("transfer-encoding"),
                                h("content-length")
                            );
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let mut out = head.into_bytes();
                            out.extend_from_slice(&body);
                            hyper::Response::new(full(out))
                        }
                    };
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// An upstream that answers one request per connection and then closes
/// it without saying so: pooled connections go stale under the proxy.
async fn one_shot_upstream() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nshot")
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_framing_and_stale_connections() {
    let (proxy, http, _) = start_proxy().await;
    let (f, shot) = (framing_upstream().await, one_shot_upstream().await);
    let mut objs = Objects::default();
    class(&mut objs);
    service(&mut objs, "f", &[f]);
    service(&mut objs, "shot", &[shot]);
    objs.ingresses.insert(
        "d/web".into(),
        json!({"metadata": {"name": "web", "namespace": "d"},
               "spec": {"rules": [{"host": "f.test", "http": {"paths": [path("/", "f")]}},
                                  {"host": "shot.test", "http": {"paths": [path("/", "shot")]}}]}}),
    );
    build(&proxy, &objs, &mut CertCache::default());

    // Several requests on one client connection (and so on pooled
    // upstream connections), each framing in turn.
    let s = TcpStream::connect(http).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    for round in 0..3 {
        let req = |method: &str, path: &str| {
            Request::builder()
                .method(method)
                .uri(path)
                .header("host", "f.test")
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap()
        };
        send.ready().await.unwrap();
        let resp = send.send_request(req("GET", "/chunked")).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            body.len(),
            4 + 70_000 + 6,
            "round {round}: chunked body whole"
        );
        assert!(body.starts_with(b"one,x") && body.ends_with(b"x,three"));

        send.ready().await.unwrap();
        let resp = send.send_request(req("GET", "/big")).await.unwrap();
        assert_eq!(resp.headers()["content-length"], "1048576");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(body.len() == 1 << 20 && body.iter().all(|b| *b == b'b'));

        send.ready().await.unwrap();
        let resp = send.send_request(req("HEAD", "/big")).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-length"],
            "1048576",
            "HEAD keeps the length"
        );
        assert!(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .is_empty()
        );

        send.ready().await.unwrap();
        let resp = send.send_request(req("GET", "/nothing")).await.unwrap();
        assert_eq!(resp.status(), 204);

        send.ready().await.unwrap();
        let resp = send.send_request(req("GET", "/close")).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"closing");

        send.ready().await.unwrap();
        let resp = send
            .send_request(
                Request::post("/echo")
                    .header("host", "f.test")
                    .body(http_body_util::Full::new(Bytes::from_static(b"fixed body")))
                    .unwrap(),
            )
            .await
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"POST te= cl=10 body=fixed body");
    }

    // A body of unknown length (the client streams it) goes chunked.
    let s = TcpStream::connect(http).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let frames: Vec<Result<hyper::body::Frame<Bytes>, Infallible>> = vec![
        Ok(hyper::body::Frame::data(Bytes::from_static(b"streamed "))),
        Ok(hyper::body::Frame::data(Bytes::from_static(b"body"))),
    ];
    let resp = send
        .send_request(
            Request::post("/echo")
                .header("host", "f.test")
                .body(http_body_util::StreamBody::new(futures::stream::iter(
                    frames,
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"POST te=chunked cl= body=streamed body");

    // Every pooled connection to this upstream is dead by the next
    // request: each must still be answered (a fresh connection).
    for i in 0..10 {
        let (code, body) = get(http, "shot.test", "/").await;
        assert_eq!((code, body.as_str()), (200, "shot"), "request {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_rejection_does_not_wait_for_the_request_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Reads the head, answers 413 and stops reading (keeps the socket).
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig")
                    .await;
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            });
        }
    });
    let (proxy, http, _) = start_proxy().await;
    let mut objs = Objects::default();
    class(&mut objs);
    service(&mut objs, "up", &[up]);
    objs.ingresses.insert(
        "d/web".into(),
        json!({"metadata": {"name": "web", "namespace": "d"},
               "spec": {"rules": [{"http": {"paths": [path("/", "up")]}}]}}),
    );
    build(&proxy, &objs, &mut CertCache::default());
    // A raw client: it keeps sending the 32 MiB body while it reads, and a
    // write failing once the proxy gives up on the body is not a failure
    // (a hyper client would report the broken pipe instead of the answer).
    let s = TcpStream::connect(http).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let size = 32usize << 20;
    let writer = tokio::spawn(async move {
        let head =
            format!("POST /upload HTTP/1.1\r\nhost: x.test\r\ncontent-length: {size}\r\n\r\n");
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![b'u'; 64 << 10];
        for _ in 0..size / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let head = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if rd.read(&mut b).await.unwrap_or(0) == 0 {
                break;
            }
            head.push(b[0]);
        }
        head
    })
    .await
    .expect("the 413 arrives while the body is still unsent");
    assert!(
        head.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_is_not_shared_between_proxies() {
    // The workers' SO_REUSEPORT listeners must not let a second proxy
    // join a port another proxy (or anything else) already serves.
    let (_a, http, https) = start_proxy().await;
    let args = skep_ingress::IngressArgs {
        no_ingress: false,
        ingress_http_listen: skep_ingress::Listen(Some(http)),
        ingress_https_listen: skep_ingress::Listen(Some(https)),
        ingress_metrics_listen: "off".parse().unwrap(),
        ingress_workers: 2,
    };
    let bound = skep_ingress::serve(skep_ingress::new_proxy(), &args).await;
    assert_eq!(
        (bound.http, bound.https),
        (None, None),
        "the second proxy must fail to bind"
    );
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let args = skep_ingress::IngressArgs {
        ingress_http_listen: skep_ingress::Listen(Some(other.local_addr().unwrap())),
        ingress_https_listen: "off".parse().unwrap(),
        ..args
    };
    let bound = skep_ingress::serve(skep_ingress::new_proxy(), &args).await;
    assert_eq!(bound.http, None, "a port held by another socket");
}

// ---------------------------------------------------------------------
// The HTTP/1.1 fast path (control/ingress/src/fast.rs), spoken to with raw
// bytes so what goes over the wire is what is asserted.

/// A response read off a raw connection: status, headers (names
/// lower-case), the body decoded from its framing, and whether the
/// framing was chunked.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    chunked: bool,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads more of `s` into `buf`: the byte count (0 at its end), or an
/// error after 10 s.
async fn more(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, tokio::time::error::Elapsed> {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 16384];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut b)).await?;
    let n = n.unwrap();
    buf.extend_from_slice(&b[..n]);
    Ok(n)
}

/// Reads one response from `s`; `buf` keeps what was read beyond it (the
/// next pipelined answer). Panics on a malformed answer or after 10 s.
async fn read_raw(s: &mut TcpStream, buf: &mut Vec<u8>) -> Raw {
    read_raw_to(s, buf, false).await
}

/// [`read_raw`] for an answer to HEAD (`head`: no body whatever the
/// headers say).
async fn read_raw_to(s: &mut TcpStream, buf: &mut Vec<u8>, head: bool) -> Raw {
    let (status, headers, len) = loop {
        let mut storage = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut storage);
        if let httparse::Status::Complete(len) = resp.parse(buf).unwrap() {
            let headers = resp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect::<Vec<_>>();
            break (resp.code.unwrap(), headers, len);
        }
        let n = more(s, buf).await.expect("a response head within 10 s");
        assert!(n > 0, "closed before a full head: {buf:?}");
    };
    buf.drain(..len);
    let mut raw = Raw {
        status,
        headers,
        body: Vec::new(),
        chunked: false,
    };
    if head {
        return raw;
    }
    if let Some(l) = raw.header("content-length") {
        let l: usize = l.parse().unwrap();
        while buf.len() < l {
            let n = more(s, buf).await.expect("the body within 10 s");
            assert!(n > 0, "closed mid-body");
        }
        raw.body = buf.drain(..l).collect();
    } else if raw.header("transfer-encoding") == Some("chunked") {
        raw.chunked = true;
        loop {
            let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
                let n = more(s, buf).await.expect("a chunk within 10 s");
                assert!(n > 0, "closed mid-chunk");
                continue;
            };
            let size = usize::from_str_radix(std::str::from_utf8(&buf[..eol]).unwrap(), 16)
                .expect("the proxy's chunk sizes are plain hex");
            while buf.len() < eol + 2 + size + 2 {
                let n = more(s, buf).await.expect("chunk data within 10 s");
                assert!(n > 0, "closed mid-chunk");
            }
            raw.body.extend_from_slice(&buf[eol + 2..eol + 2 + size]);
            assert_eq!(&buf[eol + 2 + size..eol + 4 + size], b"\r\n");
            buf.drain(..eol + 4 + size);
            if size == 0 {
                break;
            }
        }
    }
    raw
}

/// Reads until the proxy closes the connection (false after 5 s).
async fn closes(s: &mut TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 1024];
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// An upstream that reads a request head (and a Content-Length body) and
/// answers `reply` verbatim, then closes the connection.
async fn scripted_upstream(reply: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn fast_proxy(services: &[(&str, SocketAddr)]) -> (Arc<Proxy>, SocketAddr) {
    let (proxy, http, _) = start_proxy().await;
    let mut objs = Objects::default();
    class(&mut objs);
    let mut rules = Vec::new();
    for (name, addr) in services {
        service(&mut objs, name, &[*addr]);
        rules.push(json!({"host": format!("{name}.test"), "http": {"paths": [path("/", name)]}}));
    }
    objs.ingresses.insert(
        "d/fast".into(),
        json!({"metadata": {"name": "fast", "namespace": "d"}, "spec": {"rules": rules}}),
    );
    build(&proxy, &objs, &mut CertCache::default());
    (proxy, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_pipelining_split_heads_and_closes() {
    use tokio::io::AsyncWriteExt;
    let (_proxy, http) = fast_proxy(&[("f", framing_upstream().await)]).await;

    // Three pipelined requests in one write, one with a body: three
    // answers in order on the same connection.
    let mut s = TcpStream::connect(http).await.unwrap();
    s.write_all(
        b"GET /chunked HTTP/1.1\r\nHost: f.test\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: f.test\r\nContent-Length: 5\r\n\r\nhello\
          HEAD /big HTTP/1.1\r\nHost: f.test\r\n\r\n\
          GET /nothing HTTP/1.1\r\nHost: f.test\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let r = read_raw(&mut s, &mut buf).await;
    assert_eq!(r.status, 200);
    assert!(r.chunked, "a chunked answer stays chunked: {:?}", r.headers);
    assert_eq!(r.body.len(), 4 + 70_000 + 6);
    assert!(r.body.starts_with(b"one,x") && r.body.ends_with(b"x,three"));
    let r = read_raw(&mut s, &mut buf).await;
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"POST te= cl=5 body=hello"[..])
    );
    let r = read_raw_to(&mut s, &mut buf, true).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("1048576"));
    let r = read_raw(&mut s, &mut buf).await;
    assert_eq!(r.status, 204);
    assert!(buf.is_empty(), "nothing after the fourth answer: {buf:?}");

    // A head split across reads (one write per piece, with pauses).
    let pieces: [&[u8]; 5] = [
        b"GE",
        b"T /echo?split=1 HT",
        b"TP/1.1\r\nHo",
        b"st: f.test\r\nX-A: 1\r",
        b"\n\r\n",
    ];
    for p in pieces {
        s.write_all(p).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    let r = read_raw(&mut s, &mut buf).await;
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"GET te= cl= body="[..])
    );

    // The upstream's `Connection: close` ends only the upstream
    // connection: the client's goes on, without being told to close.
    s.write_all(b"GET /close HTTP/1.1\r\nHost: f.test\r\n\r\n")
        .await
        .unwrap();
    let r = read_raw(&mut s, &mut buf).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"closing"[..]));
    assert_eq!(r.header("connection"), None, "{:?}", r.headers);
    // The client's `Connection: close`: answered with it, then closed.
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: f.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let r = read_raw(&mut s, &mut buf).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        closes(&mut s).await,
        "the proxy closes after Connection: close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_chunked_bodies_and_close_delimited_answers() {
    use tokio::io::AsyncWriteExt;
    let f = framing_upstream().await;
    let eof = scripted_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the upstream closes",
    )
    .await;
    let (_proxy, http) = fast_proxy(&[("f", f), ("eof", eof)]).await;
    let mut s = TcpStream::connect(http).await.unwrap();
    let mut buf = Vec::new();

    // A chunked request body with an extension and a trailer, its chunks
    // spread over several writes: decoded and sent upstream re-chunked.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: f.test\r\nTransfer-Encoding: chunked\r\n\r\n5;name=v\r\nhello\r\n")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    s.write_all(b"7\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n")
        .await
        .unwrap();
    let r = read_raw(&mut s, &mut buf).await;
    assert_eq!(
        (r.status, String::from_utf8_lossy(&r.body).as_ref()),
        (200, "POST te=chunked cl= body=hello, world")
    );

    // A large Content-Length body, most of it sent after the head.
    let big = vec![b'z'; 300_000];
    s.write_all(
        format!(
            "PUT /echo HTTP/1.1\r\nHost: f.test\r\nContent-Length: {}\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&big).await.unwrap();
    let r = read_raw(&mut s, &mut buf).await;
    let prefix = format!("PUT te= cl={} body=", big.len());
    assert_eq!(r.status, 200);
    assert!(
        r.body.starts_with(prefix.as_bytes())
            && r.body.len() == prefix.len() + big.len()
            && r.body[prefix.len()..].iter().all(|b| *b == b'z'),
        "the whole body went through"
    );

    // An answer without length, ended by the upstream's close: the client
    // gets it chunked and its connection stays usable.
    for round in 0..2 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: eof.test\r\n\r\n")
            .await
            .unwrap();
        let r = read_raw(&mut s, &mut buf).await;
        assert_eq!(r.status, 200, "round {round}");
        assert!(r.chunked, "re-framed as chunked: {:?}", r.headers);
        assert_eq!(r.body, b"until the upstream closes", "round {round}");
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert!(r.header("date").is_some(), "a Date is added when missing");
    }

    // A malformed chunked body: 400 and the connection closes.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: f.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
        .await
        .unwrap();
    let r = read_raw(&mut s, &mut buf).await;
    assert_eq!(r.status, 400);
    assert!(closes(&mut s).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_hands_what_it_does_not_serve_to_hyper() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (f, ws) = (framing_upstream().await, upgrade_upstream().await);
    let (_proxy, http) = fast_proxy(&[("f", f), ("ws", ws)]).await;

    // A plain request first (fast path), then an Upgrade on the same
    // connection: hyper takes over with the bytes already read and
    // splices the upgraded connection.
    let mut buf = Vec::new();
    let mut s = TcpStream::connect(http).await.unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: f.test\r\n\r\n")
        .await
        .unwrap();
    let r = read_raw(&mut s, &mut buf).await;
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"GET te= cl= body="[..])
    );
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let r = read_raw(&mut s, &mut buf).await;
    assert_eq!(r.status, 101);
    assert_eq!(r.header("upgrade"), Some("echo"));
    s.write_all(b"spliced after a fast-path request")
        .await
        .unwrap();
    let mut echoed = buf.clone();
    while echoed.len() < 33 {
        let mut b = [0u8; 64];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("echo within 5 s")
            .unwrap();
        assert!(n > 0, "closed before the echo");
        echoed.extend_from_slice(&b[..n]);
    }
    assert_eq!(echoed, b"spliced after a fast-path request");

    // HTTP/1.0 goes to hyper, which answers it too.
    let mut s = TcpStream::connect(http).await.unwrap();
    s.write_all(b"GET /echo HTTP/1.0\r\nHost: f.test\r\n\r\n")
        .await
        .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .expect("HTTP/1.0 answered and closed")
        .unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    assert!(text.ends_with("GET te= cl= body="), "{text}");

    // h2c with prior knowledge on the plain port: hyper's HTTP/2.
    let tcp = TcpStream::connect(http).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get("http://f.test/echo")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"GET te= cl= body=");

    // Garbage: hyper answers 400.
    let mut s = TcpStream::connect(http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost f.test\r\n\r\n")
        .await
        .unwrap();
    let r = read_raw(&mut s, &mut Vec::new()).await;
    assert_eq!(r.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_refuses_oversize_heads_with_431() {
    use tokio::io::AsyncWriteExt;
    let (_proxy, http) = fast_proxy(&[("f", framing_upstream().await)]).await;
    // One 70 KiB header (the limit is 64 KiB).
    let mut s = TcpStream::connect(http).await.unwrap();
    let head = format!(
        "GET / HTTP/1.1\r\nHost: f.test\r\nX-Big: {}\r\n\r\n",
        "v".repeat(70 * 1024)
    );
    // The proxy may close before it has read everything: a failed write
    // is expected then, the answer is what counts.
    let _ = s.write_all(head.as_bytes()).await;
    let r = read_raw(&mut s, &mut Vec::new()).await;
    assert_eq!(r.status, 431);
    assert_eq!(
        r.body, b"request header fields too large\n",
        "answered by the fast path itself"
    );
    assert_eq!(r.header("connection"), Some("close"));
    assert!(closes(&mut s).await);
    // More than 100 headers.
    let mut s = TcpStream::connect(http).await.unwrap();
    let mut head = String::from("GET / HTTP/1.1\r\nHost: f.test\r\n");
    for i in 0..120 {
        head.push_str(&format!("X-H{i}: {i}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let r = read_raw(&mut s, &mut Vec::new()).await;
    assert_eq!(r.status, 431);
    // A head just under the limit is served.
    let mut s = TcpStream::connect(http).await.unwrap();
    let head = format!(
        "GET /echo HTTP/1.1\r\nHost: f.test\r\nX-Big: {}\r\n\r\n",
        "v".repeat(60 * 1024)
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let r = read_raw(&mut s, &mut Vec::new()).await;
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"GET te= cl= body="[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_alpn_http11_takes_the_fast_path() {
    let (proxy, _, https) = start_proxy().await;
    let f = framing_upstream().await;
    let a = upstream("alpha").await;
    let pki = Pki::new();
    let mut objs = Objects::default();
    class(&mut objs);
    service(&mut objs, "f", &[f]);
    service(&mut objs, "a", &[a]);
    let cert = pki.leaf(&["f.test"]);
    tls_secret(&mut objs, "cert", "1", &cert);
    objs.ingresses.insert(
        "d/tls".into(),
        json!({"metadata": {"name": "tls", "namespace": "d"},
               "spec": {"tls": [{"hosts": ["f.test"], "secretName": "cert"}],
                        "rules": [{"host": "f.test", "http": {"paths": [path("/", "f"), path("/who", "a")]}}]}}),
    );
    build(&proxy, &objs, &mut CertCache::default());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(https).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("f.test".to_owned()).unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    // Several requests on the one TLS connection: forwarded headers say
    // https, bodies both ways.
    for i in 0..3 {
        send.ready().await.unwrap();
        let resp = send
            .send_request(
                Request::get("/who")
                    .header("host", "f.test")
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.starts_with("alpha\n") && body.contains("proto=https\n"),
            "request {i}: {body}"
        );
        send.ready().await.unwrap();
        let resp = send
            .send_request(
                Request::post("/echo")
                    .header("host", "f.test")
                    .body(http_body_util::Full::new(Bytes::from(format!(
                        "tls body {i}"
                    ))))
                    .unwrap(),
            )
            .await
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("POST te= cl=10 body=tls body {i}"));
        send.ready().await.unwrap();
        let resp = send
            .send_request(
                Request::get("/chunked")
                    .header("host", "f.test")
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 4 + 70_000 + 6, "request {i}");
    }
}
