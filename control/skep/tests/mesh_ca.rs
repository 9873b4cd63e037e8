//! The server's mesh CA over gRPC: a real `skep server`, a real
//! service-account token from `kubectl create token`, certificates checked
//! with rustls' own path validation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use rustls::pki_types::{CertificateDer, UnixTime};
use skep_mesh_sidecar::{
    ca::pem_certs,
    ca_client::{CaClient, TokenSource},
    identity::{self, Certifier, IdentityError},
    proto::{CertifyRequest, certify_request::Csr},
};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const V: &str = "1.31";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, server: &common::Server) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the mesh CA never listened on 127.0.0.1:{port}: {}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn client(server: &common::Server, port: u16, token: &str) -> CaClient {
    let ca = std::fs::read(server.dir.path().join("tls/ca.crt")).unwrap();
    CaClient::new(
        &format!("127.0.0.1:{port}"),
        &ca,
        "localhost",
        TokenSource::Literal(token.to_owned()),
    )
    .unwrap()
}

fn rejected_code(
    r: Result<skep_mesh_sidecar::Issued, IdentityError>,
) -> skep_mesh_sidecar::tonic::Code {
    match r {
        Err(IdentityError::Rejected { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The leaf chains to the trust bundle (rustls' webpki path building).
fn assert_chains(issued: &skep_mesh_sidecar::Issued) {
    let chain = pem_certs(&issued.cert_chain_pem).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for r in pem_certs(&issued.trust_bundle_pem).unwrap() {
        roots.add(CertificateDer::from(r)).unwrap();
    }
    let leaf = CertificateDer::from(chain[0].clone());
    let intermediates: Vec<_> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &rustls::server::ParsedCertificate::try_from(&leaf).unwrap(),
        &roots,
        &intermediates,
        UnixTime::now(),
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all,
    )
    .expect("the workload certificate chains to the trust bundle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issues_spiffe_certificates_to_service_account_tokens_only() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = common::Server::start_with(&["--no-agent", "--mesh-ca-listen", &listen]);
    wait_for_port(port, &server);
    server.k(V, &["create", "namespace", "shop"]);
    server.k(V, &["create", "serviceaccount", "web", "-n", "shop"]);
    let token = server
        .k(V, &["create", "token", "web", "-n", "shop"])
        .trim()
        .to_owned();

    // A valid token: a 24 h leaf naming the account, whatever the CSR says.
    let key = identity::new_key_and_csr().unwrap();
    let issued = client(&server, port, &token)
        .certify(key.csr_der.clone())
        .await
        .expect("a valid token gets a certificate");
    assert_eq!(issued.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
    let chain = pem_certs(&issued.cert_chain_pem).unwrap();
    let id = skep_mesh_sidecar::spiffe::from_certificate(&chain[0]).expect("a SPIFFE URI SAN");
    assert_eq!(id.to_string(), issued.spiffe_id);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let lifetime = issued.not_after_unix - now;
    assert!(
        (24 * 3600 - 120..=24 * 3600 + 5).contains(&lifetime),
        "lifetime {lifetime} s is not 24 h"
    );
    assert_chains(&issued);
    // The certificate is for the CSR's key (install checks the pairing).
    let store = skep_mesh_sidecar::IdentityStore::new();
    store
        .install(&key, &issued)
        .expect("the leaf matches our key");

    // The CSR may come as PEM too.
    let pem_csr = {
        let kp = csr_pem();
        let mut c = client(&server, port, &token).connect().await.unwrap();
        c.certify(CertifyRequest {
            token: token.clone(),
            csr: Some(Csr::CsrPem(kp)),
        })
        .await
    };
    assert!(pem_csr.is_ok(), "{pem_csr:?}");

    // A broken CSR: InvalidArgument.
    let mut raw = client(&server, port, &token).connect().await.unwrap();
    let bad = raw
        .certify(CertifyRequest {
            token: token.clone(),
            csr: Some(Csr::CsrDer(b"not a CSR".to_vec())),
        })
        .await
        .unwrap_err();
    assert_eq!(
        bad.code(),
        skep_mesh_sidecar::tonic::Code::InvalidArgument,
        "{bad:?}"
    );

    // Bad tokens: Unauthenticated.
    let csr = identity::new_key_and_csr().unwrap().csr_der;
    assert_eq!(
        rejected_code(client(&server, port, "garbage").certify(csr.clone()).await),
        skep_mesh_sidecar::tonic::Code::Unauthenticated
    );
    let mut forged = token.clone();
    let n = forged.len();
    forged.replace_range(n - 6.., "AAAAAA");
    assert_eq!(
        rejected_code(client(&server, port, &forged).certify(csr.clone()).await),
        skep_mesh_sidecar::tonic::Code::Unauthenticated
    );
    // The admin token is no service-account token.
    assert_eq!(
        rejected_code(
            client(&server, port, &server.token())
                .certify(csr.clone())
                .await
        ),
        skep_mesh_sidecar::tonic::Code::Unauthenticated
    );
    // A deleted account's token stops working.
    server.k(V, &["delete", "serviceaccount", "web", "-n", "shop"]);
    assert_eq!(
        rejected_code(client(&server, port, &token).certify(csr.clone()).await),
        skep_mesh_sidecar::tonic::Code::Unauthenticated
    );

    // The mesh root is persisted: after a restart the bundle is the same.
    let bundle = issued.trust_bundle_pem.clone();
    server.restart();
    wait_for_port(port, &server);
    server.k(V, &["create", "serviceaccount", "api", "-n", "shop"]);
    let token = server
        .k(V, &["create", "token", "api", "-n", "shop"])
        .trim()
        .to_owned();
    let again = client(&server, port, &token).certify(csr).await.unwrap();
    assert_eq!(
        again.trust_bundle_pem, bundle,
        "the mesh root changed on restart"
    );
    assert_eq!(again.spiffe_id, "spiffe://cluster.local/ns/shop/sa/api");
}

/// A CSR in PEM.
fn csr_pem() -> String {
    let der = identity::new_key_and_csr().unwrap().csr_der;
    skep_mesh_sidecar::ca::pem_block("CERTIFICATE REQUEST", &der)
}

/// Kills the child on drop (a failed assertion must not leave it running).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn skep_sidecar_gets_its_identity_from_the_server_and_drains_on_sigterm() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = common::Server::start_with(&["--no-agent", "--mesh-ca-listen", &listen]);
    wait_for_port(port, &server);
    server.k(V, &["create", "serviceaccount", "web"]);
    let token = server.k(V, &["create", "token", "web"]);
    let token_file = server.dir.path().join("sidecar-token");
    std::fs::write(&token_file, token.trim()).unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let log = server.dir.path().join("sidecar.log");
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_skep"))
            .arg("sidecar")
            .args(["--ca-address", &listen, "--ca-server-name", "localhost"])
            .arg("--cluster-ca")
            .arg(server.dir.path().join("tls/ca.crt"))
            .arg("--token")
            .arg(&token_file)
            .args(["--inbound-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--outbound-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin-listen", &admin, "--drain-timeout-secs", "2"])
            .env("SKEP_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start skep sidecar"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if http_get(&admin, "/ready").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            break;
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!(
                "skep sidecar exited with {status}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar never became ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = http_get(&admin, "/metrics").unwrap();
    assert!(
        metrics.contains("skep_mesh_tls_handshake_failures_total"),
        "{metrics}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("spiffe://cluster.local/ns/default/sa/web"),
        "the sidecar did not log its identity: {text}"
    );
    // SIGTERM: drains (nothing open) and exits cleanly.
    // SAFETY: signalling our own child process by its pid.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the sidecar ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
}

#[test]
fn an_operator_supplied_mesh_ca_is_used_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = skep_mesh_sidecar::ca::generate_root("example.org").unwrap();
    let (cert_path, key_path) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
    std::fs::write(&cert_path, &cert).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = common::Server::start_with(&[
        "--no-agent",
        "--mesh-ca-listen",
        &listen,
        "--mesh-trust-domain",
        "example.org",
        "--mesh-ca-cert",
        cert_path.to_str().unwrap(),
        "--mesh-ca-key",
        key_path.to_str().unwrap(),
    ]);
    wait_for_port(port, &server);
    server.k(V, &["create", "serviceaccount", "batch"]);
    let token = server.k(V, &["create", "token", "batch"]).trim().to_owned();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let issued = rt
        .block_on(
            client(&server, port, &token).certify(identity::new_key_and_csr().unwrap().csr_der),
        )
        .unwrap();
    assert_eq!(issued.spiffe_id, "spiffe://example.org/ns/default/sa/batch");
    assert_eq!(
        pem_certs(&issued.trust_bundle_pem).unwrap(),
        pem_certs(&cert).unwrap(),
        "the bundle is the operator's CA"
    );
    assert_chains(&issued);
    assert!(
        !server.dir.path().join("tls/mesh-ca.key").exists(),
        "no root of its own is generated when the operator supplies one"
    );
}
