//! Authentication (service-account JWTs, client certificates) and RBAC
//! authorization, driven with curl and kubectl against a real server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Server;
use serde_json::Value;
use std::{
    process::Command,
    time::{Duration, Instant},
};

fn post(s: &Server, path: &str, body: &str) -> Value {
    let out = s.curl_admin(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        body,
        &s.url(path),
    ]);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn status_with(s: &Server, auth: &[&str], method: &str, path: &str) -> u16 {
    let mut args = auth.to_vec();
    args.extend_from_slice(&["-X", method, "-o", "/dev/null", "-w", "%{http_code}"]);
    let url = s.url(path);
    args.push(&url);
    if method == "POST" {
        args.extend_from_slice(&[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            r#"{"metadata":{"generateName":"x-"}}"#,
        ]);
    }
    String::from_utf8(s.curl(&args).stdout)
        .unwrap()
        .parse()
        .unwrap()
}

/// Polls until `f` holds: RBAC changes reach the authorizer through a watch.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "not within 5 s: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn service_account_tokens_are_authorized_by_rbac() {
    let s = Server::start();
    post(&s, "/api/v1/namespaces", r#"{"metadata":{"name":"other"}}"#);
    post(
        &s,
        "/api/v1/namespaces/default/serviceaccounts",
        r#"{"metadata":{"name":"bot"}}"#,
    );
    let tr = post(
        &s,
        "/api/v1/namespaces/default/serviceaccounts/bot/token",
        r#"{"spec":{"expirationSeconds":3600}}"#,
    );
    let token = tr["status"]["token"].as_str().expect("a token").to_owned();
    let auth = format!("Authorization: Bearer {token}");
    let bearer = ["-H", auth.as_str()];

    // Authenticated, but no role yet: discovery only.
    assert_eq!(
        status_with(&s, &bearer, "GET", "/api"),
        200,
        "system:discovery for everyone authenticated"
    );
    assert_eq!(
        status_with(&s, &bearer, "GET", "/api/v1/namespaces/default/configmaps"),
        403
    );
    let out = s.curl(&["-H", &auth, &s.url("/api/v1/namespaces/default/configmaps")]);
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["reason"], "Forbidden");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("system:serviceaccount:default:bot"),
        "{body}"
    );
    let can = s.kubectl(
        "1.31",
        &["auth", "can-i", "list", "configmaps", "--token", &token],
    );
    assert_eq!(String::from_utf8_lossy(&can.stdout).trim(), "no");

    // Bind the built-in "view" role in default.
    post(
        &s,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings",
        r#"{
        "metadata":{"name":"bot-view"},
        "roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"view"},
        "subjects":[{"kind":"ServiceAccount","name":"bot","namespace":"default"}]}"#,
    );
    eventually("the binding takes effect", || {
        status_with(&s, &bearer, "GET", "/api/v1/namespaces/default/configmaps") == 200
    });
    assert_eq!(
        status_with(&s, &bearer, "POST", "/api/v1/namespaces/default/configmaps"),
        403,
        "view cannot create"
    );
    assert_eq!(
        status_with(&s, &bearer, "GET", "/api/v1/namespaces/other/configmaps"),
        403,
        "a RoleBinding stays in its namespace"
    );
    assert_eq!(
        status_with(&s, &bearer, "GET", "/api/v1/namespaces/default/secrets"),
        403,
        "view does not read secrets"
    );
    let yes = s.kubectl(
        "1.31",
        &[
            "auth",
            "can-i",
            "list",
            "configmaps",
            "-n",
            "default",
            "--token",
            &token,
        ],
    );
    assert_eq!(String::from_utf8_lossy(&yes.stdout).trim(), "yes");
    let no = s.kubectl(
        "1.31",
        &[
            "auth",
            "can-i",
            "create",
            "configmaps",
            "-n",
            "default",
            "--token",
            &token,
        ],
    );
    assert_eq!(String::from_utf8_lossy(&no.stdout).trim(), "no");

    // A Role with resourceNames grants exactly that object.
    post(
        &s,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles",
        r#"{
        "metadata":{"name":"one-secret"},
        "rules":[{"apiGroups":[""],"resources":["secrets"],"verbs":["get"],"resourceNames":["allowed"]}]}"#,
    );
    post(
        &s,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings",
        r#"{
        "metadata":{"name":"bot-secret"},
        "roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"Role","name":"one-secret"},
        "subjects":[{"kind":"ServiceAccount","name":"bot","namespace":"default"}]}"#,
    );
    post(
        &s,
        "/api/v1/namespaces/default/secrets",
        r#"{"metadata":{"name":"allowed"}}"#,
    );
    post(
        &s,
        "/api/v1/namespaces/default/secrets",
        r#"{"metadata":{"name":"denied"}}"#,
    );
    eventually("the role takes effect", || {
        status_with(
            &s,
            &bearer,
            "GET",
            "/api/v1/namespaces/default/secrets/allowed",
        ) == 200
    });
    assert_eq!(
        status_with(
            &s,
            &bearer,
            "GET",
            "/api/v1/namespaces/default/secrets/denied"
        ),
        403
    );

    // Deleting the service account invalidates its tokens.
    let out = s.curl_admin(&[
        "-X",
        "DELETE",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &s.url("/api/v1/namespaces/default/serviceaccounts/bot"),
    ]);
    assert_eq!(out.stdout, b"200");
    assert_eq!(
        status_with(&s, &bearer, "GET", "/api/v1/namespaces/default/configmaps"),
        401
    );
}

#[test]
fn client_certificates_authenticate_as_cn_and_groups() {
    let s = Server::start();
    let dir = s.dir.path();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (package openssl)");
        assert!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "carol.key",
    ]);
    openssl(&[
        "req",
        "-new",
        "-key",
        "carol.key",
        "-subj",
        "/CN=carol/O=devs",
        "-out",
        "carol.csr",
    ]);
    std::fs::write(
        dir.join("client-ext.cnf"),
        "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "carol.csr",
        "-CA",
        "tls/ca.crt",
        "-CAkey",
        "tls/ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "client-ext.cnf",
        "-out",
        "carol.crt",
    ]);
    let crt = dir.join("carol.crt").display().to_string();
    let key = dir.join("carol.key").display().to_string();
    let with_cert = |path: &str| status_with(&s, &["--cert", &crt, "--key", &key], "GET", path);
    assert_eq!(
        with_cert("/api/v1/namespaces/default/pods"),
        403,
        "carol is authenticated but not authorized"
    );
    post(
        &s,
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        r#"{
        "metadata":{"name":"devs-view"},
        "roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"view"},
        "subjects":[{"kind":"Group","name":"devs"}]}"#,
    );
    eventually("the group binding takes effect", || {
        with_cert("/api/v1/namespaces/default/pods") == 200
    });
    // A certificate from another CA is refused during the handshake.
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "rogue.key",
        "-out",
        "rogue.crt",
        "-subj",
        "/CN=admin/O=system:masters",
        "-days",
        "1",
    ]);
    let out = s.curl(&[
        "--cert",
        dir.join("rogue.crt").to_str().unwrap(),
        "--key",
        dir.join("rogue.key").to_str().unwrap(),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &s.url("/api/v1/namespaces"),
    ]);
    assert_ne!(
        out.stdout, b"200",
        "a certificate from an unknown CA must not authenticate"
    );
}
