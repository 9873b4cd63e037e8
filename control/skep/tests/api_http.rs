//! HTTP-level behaviour: authentication, bad input, limits, restart
//! durability and watch resumption.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Server;
use serde_json::Value;

fn code_and_body(out: std::process::Output) -> (u16, Value) {
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[test]
fn anonymous_requests_get_401_and_health_is_public() {
    let s = Server::start();
    let (code, body) =
        code_and_body(s.curl(&["-w", "\n%{http_code}", &s.url("/api/v1/namespaces")]));
    assert_eq!(code, 401);
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["reason"], "Unauthorized");
    let out = s.curl(&[
        "-H",
        "Authorization: Bearer wrong",
        "-w",
        "\n%{http_code}",
        &s.url("/api/v1/namespaces"),
    ]);
    assert_eq!(code_and_body(out).0, 401);
    let out = s.curl(&["-w", "%{http_code}", "-o", "/dev/null", &s.url("/healthz")]);
    assert_eq!(out.stdout, b"200");
    // Named checks, as Kubernetes lists them.
    let out = s.curl(&["-w", "\n%{http_code}", &s.url("/readyz?verbose")]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("[+]ping ok\n[+]store ok\n"), "{text}");
    assert!(
        text.contains("readyz check passed\n") && text.ends_with("\n200"),
        "{text}"
    );
    let out = s.curl(&["-w", "\n%{http_code}", &s.url("/readyz/store")]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with("[+]store ok\n") && text.ends_with("200"),
        "{text}"
    );
    let out = s.curl(&["-w", "\n%{http_code}", &s.url("/readyz/no-such-check")]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.ends_with("404"), "{text}");
}

#[test]
fn client_mistakes_are_clear_4xx_statuses() {
    let s = Server::start();
    let cms = s.url("/api/v1/namespaces/default/configmaps");
    let post = |body: &str, ct: &str| {
        code_and_body(s.curl_admin(&[
            "-X",
            "POST",
            "-H",
            &format!("Content-Type: {ct}"),
            "--data-binary",
            body,
            "-w",
            "\n%{http_code}",
            &cms,
        ]))
    };
    let (code, body) = post("{not json", "application/json");
    assert_eq!(code, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("not valid JSON"));

    let (code, body) = post(r#"{"metadata":{"name":"Bad_Name"}}"#, "application/json");
    assert_eq!(code, 422);
    assert_eq!(body["reason"], "Invalid");
    assert_eq!(body["details"]["causes"][0]["field"], "metadata.name");

    let (code, _) = post(r#"{"metadata":{}}"#, "application/json");
    assert_eq!(code, 422, "a name or generateName is required");

    let (code, body) = post(
        r#"{"kind":"Secret","apiVersion":"v1","metadata":{"name":"x"}}"#,
        "application/json",
    );
    assert_eq!(code, 400, "kind mismatch: {body}");

    let (code, body) = post(
        r#"{"metadata":{"generateName":"gen-"}}"#,
        "application/json",
    );
    assert_eq!(code, 201);
    assert!(
        body["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("gen-")
    );

    let (code, body) = post(r#"{"metadata":{"name":"dup"}}"#, "application/json");
    assert_eq!(code, 201, "{body}");
    let (code, body) = post(r#"{"metadata":{"name":"dup"}}"#, "application/json");
    assert_eq!(
        (code, body["reason"].as_str()),
        (409, Some("AlreadyExists"))
    );

    // Stale resourceVersion on update: 409 Conflict.
    let (code, body) = code_and_body(s.curl_admin(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        r#"{"metadata":{"name":"dup","resourceVersion":"1"},"data":{"a":"b"}}"#,
        "-w",
        "\n%{http_code}",
        &format!("{cms}/dup"),
    ]));
    assert_eq!(
        (code, body["reason"].as_str()),
        (409, Some("Conflict")),
        "{body}"
    );

    // Unknown patch type: 415.
    let (code, _) = code_and_body(s.curl_admin(&[
        "-X",
        "PATCH",
        "-H",
        "Content-Type: text/plain",
        "--data-binary",
        "x",
        "-w",
        "\n%{http_code}",
        &format!("{cms}/dup"),
    ]));
    assert_eq!(code, 415);

    // A body over 3 MiB: 413, and the server is fine afterwards.
    let big = s.dir.path().join("big.json");
    let payload = format!(
        r#"{{"metadata":{{"name":"big"}},"data":{{"x":"{}"}}}}"#,
        "a".repeat(4 * 1024 * 1024)
    );
    std::fs::write(&big, payload).unwrap();
    let (code, _) = code_and_body(s.curl_admin(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &format!("@{}", big.display()),
        "-w",
        "\n%{http_code}",
        &cms,
    ]));
    assert_eq!(code, 413);

    // Bad selectors: 400, never 500.
    let (code, _) = code_and_body(s.curl_admin(&[
        "-w",
        "\n%{http_code}",
        &format!("{cms}?labelSelector=a%20in%20b"),
    ]));
    assert_eq!(code, 400);
    let (code, _) = code_and_body(s.curl_admin(&[
        "-w",
        "\n%{http_code}",
        &format!("{cms}?fieldSelector=spec.bogus%3D1"),
    ]));
    assert_eq!(code, 400);
    let (code, _) =
        code_and_body(s.curl_admin(&["-w", "\n%{http_code}", &format!("{cms}?continue=garbage")]));
    assert_eq!(code, 400);
    let (code, _) = code_and_body(s.curl_admin(&[
        "-w",
        "\n%{http_code}",
        &s.url("/api/v1/namespaces/default/nothings"),
    ]));
    assert_eq!(code, 404);
}

#[test]
fn objects_survive_a_restart_and_watches_resume_from_their_resource_version() {
    let mut s = Server::start();
    let cms = s.url("/api/v1/namespaces/default/configmaps");
    for i in 0..5 {
        let out = s.curl_admin(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &format!(r#"{{"metadata":{{"name":"before-{i}"}},"data":{{"i":"{i}"}}}}"#),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &cms,
        ]);
        assert_eq!(out.stdout, b"201");
    }
    let list: Value = serde_json::from_slice(&s.curl_admin(&[&cms]).stdout).unwrap();
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = s.token();

    // SIGKILL and restart on the same data directory.
    s.restart();
    assert_eq!(s.token(), token, "credentials survive restarts");
    let out = s.curl_admin(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        r#"{"metadata":{"name":"after"}}"#,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &cms,
    ]);
    assert_eq!(out.stdout, b"201");
    let list: Value = serde_json::from_slice(&s.curl_admin(&[&cms]).stdout).unwrap();
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    for i in 0..5 {
        assert!(names.contains(&format!("before-{i}").as_str()), "{names:?}");
    }
    // A watch from the pre-restart resourceVersion replays exactly what
    // happened since.
    let out = s.curl_admin(&[&format!(
        "{cms}?watch=1&resourceVersion={rv}&timeoutSeconds=2"
    )]);
    let events: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["metadata"]["name"], "after");
}

#[test]
fn watch_lists_bookmarks_and_label_transitions() {
    let s = Server::start();
    let cms = s.url("/api/v1/namespaces/default/configmaps");
    let post = |name: &str, labels: &str| {
        s.curl_admin(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &format!(r#"{{"metadata":{{"name":"{name}","labels":{labels}}}}}"#),
            "-o",
            "/dev/null",
            &cms,
        ]);
    };
    post("a", r#"{"app":"x"}"#);
    post("b", r#"{"app":"y"}"#);
    let list: Value = serde_json::from_slice(&s.curl_admin(&[&cms]).stdout).unwrap();
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    // sendInitialEvents: ADDED for current objects, then the bookmark
    // marking the end of the initial state.
    let out = s.curl_admin(&[&format!("{cms}?watch=1&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&labelSelector=app%3Dx&timeoutSeconds=1")]);
    let events: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["metadata"]["name"], "a");
    assert_eq!(events[1]["type"], "BOOKMARK");
    assert_eq!(
        events[1]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    // Relabelling b into the selector is ADDED for that watch; a out of it
    // is DELETED.
    for (name, app) in [("b", "x"), ("a", "z")] {
        let out = s.curl_admin(&[
            "-X",
            "PATCH",
            "-H",
            "Content-Type: application/merge-patch+json",
            "--data-binary",
            &format!(r#"{{"metadata":{{"labels":{{"app":"{app}"}}}}}}"#),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{cms}/{name}"),
        ]);
        assert_eq!(out.stdout, b"200");
    }
    let out = s.curl_admin(&[&format!(
        "{cms}?watch=1&resourceVersion={rv}&labelSelector=app%3Dx&timeoutSeconds=1"
    )]);
    let events: Vec<(String, String)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["type"].as_str().unwrap().to_owned(),
                v["object"]["metadata"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            ("ADDED".to_string(), "b".to_string()),
            ("DELETED".to_string(), "a".to_string())
        ]
    );
}

/// openssl, with a clear message when it is missing.
fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_serving_certificate_is_reloaded_on_sighup_without_a_restart() {
    let s = Server::start();
    let tls = s.dir.path().join("tls");
    let name = "rotated.skep.test";
    let resolve = format!("{name}:{}:127.0.0.1", s.port);
    let url = format!("https://{name}:{}/readyz", s.port);
    let by_name = || s.curl(&["--resolve", &resolve, &url]);
    let out = by_name();
    assert!(
        !out.status.success(),
        "the first certificate does not carry {name}"
    );
    // A new pair from the cluster CA, for the new name only, written next
    // to the live files and renamed over them (as a rotation tool does).
    let t = |f: &str| tls.join(f).display().to_string();
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &t("new.key"),
        "-subj",
        "/CN=rotated",
        "-addext",
        &format!("subjectAltName=DNS:{name}"),
        "-out",
        &t("new.csr"),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &t("new.csr"),
        "-CA",
        &t("ca.crt"),
        "-CAkey",
        &t("ca.key"),
        "-CAcreateserial",
        "-days",
        "1",
        "-copy_extensions",
        "copy",
        "-out",
        &t("new.crt"),
    ]);
    std::fs::rename(tls.join("new.key"), tls.join("server.key")).unwrap();
    std::fs::rename(tls.join("new.crt"), tls.join("server.crt")).unwrap();
    let pid = s.pid().unwrap() as i32;
    // SAFETY: plain syscall on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = by_name();
        if out.status.success() {
            assert_eq!(out.stdout, b"ok");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was not served: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            s.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The same process still serves (SIGHUP did not end it), and the old
    // name is no longer in the certificate.
    assert_eq!(s.pid(), Some(pid as u32));
    let old = s.curl(&[&s.url("/readyz")]);
    assert!(
        !old.status.success(),
        "127.0.0.1 is not in the new certificate"
    );
    assert!(
        s.log().contains("serving certificate reloaded"),
        "{}",
        s.log()
    );
}
