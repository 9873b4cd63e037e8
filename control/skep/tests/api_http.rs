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

/// `Accept: application/vnd.kubernetes.protobuf` (as client-go sends it):
/// objects, lists, errors and watches of built-in kinds come back as
/// Kubernetes protobuf and decode to the JSON the server gives otherwise;
/// discovery stays JSON.
#[test]
fn protobuf_responses_for_objects_lists_errors_and_watches() {
    use skep_apiserver::protobuf;
    let s = Server::start();
    let dir = s.dir.path();
    let accept = "Accept: application/vnd.kubernetes.protobuf,application/json";
    // GET with an Accept header: (status, Content-Type, body bytes).
    let get = |path: &str, accept: &str| -> (u16, String, Vec<u8>) {
        let body = dir.join("pb-body");
        let headers = dir.join("pb-headers");
        let out = s.curl_admin(&[
            "-H",
            accept,
            "-o",
            body.to_str().unwrap(),
            "-D",
            headers.to_str().unwrap(),
            "-w",
            "%{http_code}",
            &s.url(path),
        ]);
        let code = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        let head = std::fs::read_to_string(&headers).unwrap_or_default();
        let ct = head
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_default();
        (code, ct, std::fs::read(&body).unwrap_or_default())
    };
    let json_get = |path: &str| -> Value {
        let (code, ct, body) = get(path, "Accept: application/json");
        assert_eq!((code, ct.as_str()), (200, "application/json"), "{path}");
        serde_json::from_slice(&body).unwrap()
    };

    let pod = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web","labels":{"app":"web"}},
        "spec":{"containers":[{"name":"c","image":"nginx:1.27","ports":[{"containerPort":80}],
        "resources":{"limits":{"cpu":"500m","memory":"64Mi"}},
        "livenessProbe":{"httpGet":{"path":"/","port":80},"periodSeconds":5}}],
        "volumes":[{"name":"v","emptyDir":{}}]}}"#;
    let out = s.curl_admin(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-H",
        accept,
        "--data-binary",
        pod,
        "-w",
        "\n%{http_code}",
        &s.url("/api/v1/namespaces/default/pods"),
    ]);
    let text = out.stdout;
    assert!(
        text.starts_with(b"k8s\0") && text.ends_with(b"\n201"),
        "create answered in protobuf with 201: {}",
        String::from_utf8_lossy(&text)
    );

    // The server's controllers write in the background (the scheduler
    // marks the node-less pod unschedulable, events, service accounts), so
    // a protobuf answer and the JSON one are compared when both were taken
    // at the same resourceVersion, retrying a few times otherwise.
    let same_revision = |path: &str| -> (Value, Value) {
        for _ in 0..20 {
            let (code, ct, body) = get(path, accept);
            assert_eq!(
                (code, ct.as_str()),
                (200, "application/vnd.kubernetes.protobuf"),
                "{path}"
            );
            assert_eq!(&body[..4], b"k8s\0", "the magic number leads the body");
            let decoded = protobuf::decode(&body).expect("the response decodes");
            let want = json_get(path);
            if decoded["metadata"]["resourceVersion"] == want["metadata"]["resourceVersion"] {
                return (decoded, want);
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        panic!("{path}: no protobuf and JSON answers at the same resourceVersion in 20 tries");
    };

    // One object.
    let (decoded, want) = same_revision("/api/v1/namespaces/default/pods/web");
    assert_eq!(decoded, want, "protobuf and JSON answers agree");

    // A list: items carry no apiVersion/kind in protobuf.
    let (decoded, mut want) = same_revision("/api/v1/namespaces/default/pods");
    for item in want["items"].as_array_mut().unwrap() {
        let o = item.as_object_mut().unwrap();
        o.remove("apiVersion");
        o.remove("kind");
    }
    assert_eq!(decoded["kind"], "PodList");
    assert_eq!(decoded["items"], want["items"]);

    // An error is a protobuf Status.
    let (code, ct, body) = get("/api/v1/namespaces/default/pods/missing", accept);
    assert_eq!(
        (code, ct.as_str()),
        (404, "application/vnd.kubernetes.protobuf")
    );
    let status = protobuf::decode(&body).unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "NotFound");
    assert_eq!(status["code"], 404);

    // A watch: length-prefixed WatchEvent frames.
    let (code, ct, body) = get(
        "/api/v1/namespaces/default/pods?watch=1&timeoutSeconds=1",
        accept,
    );
    assert_eq!(code, 200);
    assert_eq!(ct, "application/vnd.kubernetes.protobuf;stream=watch");
    let mut events = Vec::new();
    let mut rest = body.as_slice();
    while !rest.is_empty() {
        assert!(rest.len() >= 4, "a truncated frame header");
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        assert!(rest.len() >= 4 + len, "a frame runs past the stream");
        events.push(
            protobuf::decode_message(
                "apimachinery.pkg.apis.meta.v1.WatchEvent",
                &rest[4..4 + len],
            )
            .unwrap(),
        );
        rest = &rest[4 + len..];
    }
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(
        events[0]["object"],
        json_get("/api/v1/namespaces/default/pods/web")
    );

    // Discovery stays JSON whatever the client prefers.
    let (code, ct, body) = get("/api/v1", accept);
    assert_eq!((code, ct.as_str()), (200, "application/json"));
    assert!(serde_json::from_slice::<Value>(&body).is_ok());
    // Table requests stay JSON.
    let (code, ct, _) = get(
        "/api/v1/namespaces/default/pods",
        "Accept: application/json;as=Table;v=v1;g=meta.k8s.io,application/vnd.kubernetes.protobuf",
    );
    assert_eq!(code, 200);
    assert!(ct.contains("as=Table"), "{ct}");
}

/// fieldValidation: Warn (also the default) drops unknown and duplicate
/// fields with a `Warning` header each; Strict refuses them; Ignore drops
/// them silently.
#[test]
fn field_validation_warn_strict_and_ignore() {
    let s = Server::start();
    let post = |query: &str, body: &str| -> (u16, String, Value) {
        let headers = s.dir.path().join("fv-headers");
        let out = s.curl_admin(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
            "-D",
            headers.to_str().unwrap(),
            "-w",
            "\n%{http_code}",
            &s.url(&format!("/api/v1/namespaces/default/configmaps{query}")),
        ]);
        let (code, json) = code_and_body(out);
        (
            code,
            std::fs::read_to_string(&headers).unwrap_or_default(),
            json,
        )
    };
    let warnings = |head: &str| -> Vec<String> {
        head.lines()
            .filter_map(|l| {
                l.strip_prefix("warning: ")
                    .or_else(|| l.strip_prefix("Warning: "))
            })
            .map(|l| l.trim().to_owned())
            .collect()
    };
    let body = |name: &str| {
        format!(
            r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"{name}","labelz":{{"a":"b"}}}},"data":{{"k":"1"}},"data":{{"k":"2"}},"spec":{{}}}}"#
        )
    };
    for (query, name) in [("", "default"), ("?fieldValidation=Warn", "warn")] {
        let (code, head, obj) = post(query, &body(name));
        assert_eq!(code, 201, "{obj}");
        let mut w = warnings(&head);
        w.sort();
        assert_eq!(
            w,
            [
                r#"299 - "duplicate field \"data\"""#,
                r#"299 - "unknown field \"metadata.labelz\"""#,
                r#"299 - "unknown field \"spec\"""#,
            ],
            "{head}"
        );
        assert_eq!(obj["data"]["k"], "2", "the last duplicate wins");
        assert!(
            obj.get("spec").is_none() && obj["metadata"].get("labelz").is_none(),
            "{obj}"
        );
    }
    let (code, head, obj) = post("?fieldValidation=Ignore", &body("ignore"));
    assert_eq!(code, 201, "{obj}");
    assert!(warnings(&head).is_empty(), "{head}");
    assert!(obj.get("spec").is_none(), "{obj}");
    let (code, _, obj) = post("?fieldValidation=Strict", &body("strict"));
    assert_eq!(code, 400, "{obj}");
    let msg = obj["message"].as_str().unwrap();
    assert!(
        msg.contains("strict decoding error") && msg.contains(r#"duplicate field "data""#),
        "{msg}"
    );
    let (code, _, obj) = post(
        "?fieldValidation=Strict",
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"strict2"},"spec":{}}"#,
    );
    assert_eq!(code, 400, "{obj}");
    assert!(
        obj["message"]
            .as_str()
            .unwrap()
            .contains(r#"unknown field "spec""#),
        "{obj}"
    );
}
