//! kubectl versions that speak to the API server differently from 1.29–1.31:
//! 1.27 and 1.28 read the protobuf OpenAPI v2 document before `apply`;
//! 1.32 and later send typed requests (`create namespace`, `auth can-i`, …)
//! as protobuf. Each test starts its own `skep server --no-agent` and drives
//! the real kubectl binary, then checks the stored objects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const KUBECTL_DIR: &str = "/usr/lib/google-cloud-sdk/bin";

fn kubectl_bin(version: &str) -> PathBuf {
    let p = Path::new(KUBECTL_DIR).join(format!("kubectl.{version}"));
    assert!(
        p.exists(),
        "{} is missing: this test drives the real kubectl {version} (the Google Cloud SDK's kubectl packages install it there)",
        p.display()
    );
    p
}

/// A `skep server` process on a loopback port; killed on drop.
struct Server {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_skep"))
            .args(["server", "--no-agent", "--data-dir"])
            .arg(dir.path())
            .args(["--api-listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting skep server");
        let mut s = Server { dir, port, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if s.dir.path().join("kubeconfig.yaml").exists()
                && s.curl_code("GET", "/readyz", None, &[]) == 200
            {
                return s;
            }
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("skep server exited with {status}: {}", s.log());
            }
            assert!(
                Instant::now() < deadline,
                "skep server not ready in 30 s: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin-token"))
            .map(|t| t.trim().to_owned())
            .unwrap_or_default()
    }

    /// HTTP status of a request made with curl (body from `body`).
    fn curl_code(&self, method: &str, path: &str, body: Option<&Path>, headers: &[&str]) -> u16 {
        let out = self.curl(method, path, body, headers, true);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    fn curl(
        &self,
        method: &str,
        path: &str,
        body: Option<&Path>,
        headers: &[&str],
        code_only: bool,
    ) -> Output {
        let mut cmd = Command::new("curl");
        cmd.args(["-sk", "-X", method])
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", self.token()));
        for h in headers {
            cmd.args(["-H", h]);
        }
        if let Some(b) = body {
            cmd.arg("--data-binary").arg(format!("@{}", b.display()));
        }
        if code_only {
            cmd.args(["-o", "/dev/null", "-w", "%{http_code}"]);
        }
        cmd.arg(format!("https://127.0.0.1:{}{path}", self.port));
        cmd.output()
            .expect("curl (needed by this test) must be installed")
    }

    fn kubectl(&self, version: &str, args: &[&str]) -> Output {
        Command::new(kubectl_bin(version))
            .arg("--kubeconfig")
            .arg(self.dir.path().join("kubeconfig.yaml"))
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs kubectl and fails the test with its output unless it succeeds.
    fn ok(&self, version: &str, args: &[&str]) -> String {
        let out = self.kubectl(version, args);
        assert!(
            out.status.success(),
            "kubectl {version} {args:?} failed ({}):\nstdout: {}\nstderr: {}\nserver log tail: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn get_json(&self, version: &str, args: &[&str]) -> Value {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.ok(version, &a)).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const MULTI_DOC: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: app
  labels: {app: app}
spec:
  replicas: REPLICAS
  selector:
    matchLabels: {app: app}
  template:
    metadata:
      labels: {app: app}
    spec:
      containers:
      - name: web
        image: nginx:1.27
        ports:
        - containerPort: 80
        resources:
          limits: {cpu: 500m, memory: 128Mi}
---
apiVersion: v1
kind: Service
metadata:
  name: app
spec:
  selector: {app: app}
  ports:
  - port: 80
    targetPort: 8080
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: app-config
data:
  key: value
";

/// 1.27/1.28: `apply -f` of a multi-document file, then again with a change.
fn apply_multi_doc(version: &str) {
    let server = Server::start();
    let ns = format!("apply-{}", version.replace('.', "-"));
    server.ok(version, &["create", "namespace", &ns]);
    let file = server.dir.path().join("app.yaml");
    std::fs::write(&file, MULTI_DOC.replace("REPLICAS", "2")).unwrap();
    let out = server.ok(version, &["apply", "-n", &ns, "-f", file.to_str().unwrap()]);
    for created in [
        "deployment.apps/app created",
        "service/app created",
        "configmap/app-config created",
    ] {
        assert!(
            out.contains(created),
            "apply output lacks {created:?}: {out}"
        );
    }
    std::fs::write(&file, MULTI_DOC.replace("REPLICAS", "3")).unwrap();
    let out = server.ok(version, &["apply", "-n", &ns, "-f", file.to_str().unwrap()]);
    assert!(out.contains("deployment.apps/app configured"), "{out}");
    assert!(out.contains("configmap/app-config unchanged"), "{out}");

    let d = server.get_json(version, &["deployment", "app", "-n", &ns]);
    assert_eq!(d["spec"]["replicas"], 3, "{d}");
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "nginx:1.27");
    assert_eq!(c["ports"][0]["containerPort"], 80);
    assert_eq!(c["resources"]["limits"]["cpu"], "500m");
    assert_eq!(c["resources"]["limits"]["memory"], "128Mi");
    let applied = d["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
        .as_str()
        .unwrap_or_default();
    assert!(
        applied.contains("\"replicas\":3"),
        "last-applied: {applied}"
    );
    let s = server.get_json(version, &["service", "app", "-n", &ns]);
    assert_eq!(s["spec"]["ports"][0]["port"], 80, "{s}");
    assert_eq!(s["spec"]["ports"][0]["targetPort"], 8080, "{s}");
    assert_eq!(s["spec"]["selector"]["app"], "app");
    let cm = server.get_json(version, &["configmap", "app-config", "-n", &ns]);
    assert_eq!(cm["data"]["key"], "value", "{cm}");

    // kubectl fetched the OpenAPI v2 document (protobuf) and left field
    // validation to the server.
    let out = server.kubectl(
        version,
        &["apply", "-n", &ns, "-f", file.to_str().unwrap(), "-v=6"],
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("/openapi/v2") && log.contains("200 OK"),
        "{log}"
    );
}

#[test]
fn kubectl_1_27_applies_multi_doc_yaml() {
    apply_multi_doc("1.27");
}

#[test]
fn kubectl_1_28_applies_multi_doc_yaml() {
    apply_multi_doc("1.28");
}

/// 1.32/1.33: typed commands, whose bodies are protobuf.
fn typed_creates(version: &str) {
    let server = Server::start();
    let ns = format!("typed-{}", version.replace('.', "-"));
    // Prove the protobuf path is taken.
    let out = server.kubectl(version, &["create", "namespace", &ns, "-v=8"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "create namespace failed: {log}");
    assert!(
        log.contains("Content-Type: application/vnd.kubernetes.protobuf"),
        "kubectl {version} did not send protobuf: {log}"
    );
    let n = server.get_json(version, &["namespace", &ns]);
    assert_eq!(n["metadata"]["name"], ns.as_str());
    assert_eq!(n["status"]["phase"], "Active", "{n}");

    server.ok(
        version,
        &[
            "create",
            "configmap",
            "cfg",
            "-n",
            &ns,
            "--from-literal=a=1",
            "--from-literal=greeting=hello world",
        ],
    );
    let cm = server.get_json(version, &["configmap", "cfg", "-n", &ns]);
    assert_eq!(
        cm["data"],
        serde_json::json!({"a": "1", "greeting": "hello world"}),
        "{cm}"
    );

    server.ok(
        version,
        &[
            "create",
            "secret",
            "generic",
            "creds",
            "-n",
            &ns,
            "--from-literal=password=s3cr3t",
        ],
    );
    let s = server.get_json(version, &["secret", "creds", "-n", &ns]);
    assert_eq!(s["data"]["password"], "czNjcjN0", "{s}");
    assert_eq!(s["type"], "Opaque");

    server.ok(
        version,
        &[
            "create",
            "deployment",
            "web",
            "-n",
            &ns,
            "--image=nginx:1.27",
            "--replicas=2",
            "--port=80",
        ],
    );
    let d = server.get_json(version, &["deployment", "web", "-n", &ns]);
    assert_eq!(d["spec"]["replicas"], 2, "{d}");
    assert_eq!(d["spec"]["selector"]["matchLabels"]["app"], "web");
    assert_eq!(d["spec"]["template"]["metadata"]["labels"]["app"], "web");
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["name"], "nginx");
    assert_eq!(c["image"], "nginx:1.27");
    assert_eq!(c["ports"][0]["containerPort"], 80);
    assert_eq!(c["resources"], serde_json::json!({}));
    // Zero values Go wrote into the protobuf body do not block the server's
    // defaults, exactly as with a JSON body.
    assert_eq!(c["imagePullPolicy"], "IfNotPresent", "{d}");
    assert_eq!(c["terminationMessagePath"], "/dev/termination-log", "{d}");
    assert!(d["metadata"].get("generateName").is_none(), "{d}");

    server.ok(
        version,
        &[
            "create",
            "job",
            "once",
            "-n",
            &ns,
            "--image=busybox",
            "--",
            "echo",
            "hi",
        ],
    );
    let j = server.get_json(version, &["job", "once", "-n", &ns]);
    let c = &j["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "busybox", "{j}");
    assert_eq!(c["command"], serde_json::json!(["echo", "hi"]));
    assert_eq!(j["spec"]["template"]["spec"]["restartPolicy"], "Never");

    server.ok(
        version,
        &[
            "create",
            "service",
            "clusterip",
            "svc",
            "-n",
            &ns,
            "--tcp=80:8080",
        ],
    );
    let svc = server.get_json(version, &["service", "svc", "-n", &ns]);
    assert_eq!(svc["spec"]["type"], "ClusterIP", "{svc}");
    assert_eq!(svc["spec"]["ports"][0]["port"], 80);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080);
    assert_eq!(svc["spec"]["ports"][0]["name"], "80-8080");
    assert!(
        svc["spec"]["clusterIPs"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{svc}"
    );

    server.ok(
        version,
        &[
            "create",
            "cronjob",
            "cj",
            "-n",
            &ns,
            "--image=busybox",
            "--schedule=*/5 * * * *",
            "--",
            "date",
        ],
    );
    let cj = server.get_json(version, &["cronjob", "cj", "-n", &ns]);
    assert_eq!(cj["spec"]["schedule"], "*/5 * * * *", "{cj}");
    assert_eq!(
        cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"],
        serde_json::json!(["date"])
    );

    server.ok(
        version,
        &[
            "create",
            "role",
            "reader",
            "-n",
            &ns,
            "--verb=get,list",
            "--resource=pods",
        ],
    );
    let role = server.get_json(version, &["role", "reader", "-n", &ns]);
    assert_eq!(
        role["rules"][0]["verbs"],
        serde_json::json!(["get", "list"]),
        "{role}"
    );
    assert_eq!(role["rules"][0]["resources"], serde_json::json!(["pods"]));
    server.ok(
        version,
        &[
            "create",
            "rolebinding",
            "rb",
            "-n",
            &ns,
            "--role=reader",
            "--user=bob",
        ],
    );
    let rb = server.get_json(version, &["rolebinding", "rb", "-n", &ns]);
    assert_eq!(
        rb["roleRef"],
        serde_json::json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"}),
        "{rb}"
    );
    assert_eq!(rb["subjects"][0]["name"], "bob");
    server.ok(
        version,
        &[
            "create",
            "clusterrole",
            "nodes-reader",
            "--verb=list",
            "--resource=nodes",
        ],
    );
    server.ok(
        version,
        &[
            "create",
            "clusterrolebinding",
            "crb",
            "--clusterrole=nodes-reader",
            "--group=ops",
        ],
    );
    let crb = server.get_json(version, &["clusterrolebinding", "crb"]);
    assert_eq!(
        crb["subjects"][0],
        serde_json::json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "ops"}),
        "{crb}"
    );

    server.ok(
        version,
        &[
            "create",
            "quota",
            "q",
            "-n",
            &ns,
            "--hard=pods=10,requests.cpu=2",
        ],
    );
    let q = server.get_json(version, &["resourcequota", "q", "-n", &ns]);
    assert_eq!(
        q["spec"]["hard"],
        serde_json::json!({"pods": "10", "requests.cpu": "2"}),
        "{q}"
    );
    // A zero value that the API requires survives the protobuf round trip.
    server.ok(
        version,
        &[
            "create",
            "priorityclass",
            "zero",
            "--value=0",
            "--description=none",
        ],
    );
    let pc = server.get_json(version, &["priorityclass", "zero"]);
    assert_eq!(pc["value"], 0, "{pc}");
    server.ok(
        version,
        &[
            "create",
            "pdb",
            "pdb",
            "-n",
            &ns,
            "--selector=app=web",
            "--max-unavailable=50%",
        ],
    );
    let pdb = server.get_json(version, &["pdb", "pdb", "-n", &ns]);
    assert_eq!(pdb["spec"]["maxUnavailable"], "50%", "{pdb}");
    server.ok(
        version,
        &[
            "create",
            "ingress",
            "ing",
            "-n",
            &ns,
            "--rule=foo.example/api*=svc:80",
        ],
    );
    let ing = server.get_json(version, &["ingress", "ing", "-n", &ns]);
    let path = &ing["spec"]["rules"][0]["http"]["paths"][0];
    assert_eq!(ing["spec"]["rules"][0]["host"], "foo.example", "{ing}");
    assert_eq!(path["pathType"], "Prefix");
    assert_eq!(
        path["backend"]["service"],
        serde_json::json!({"name": "svc", "port": {"number": 80}})
    );
    server.ok(version, &["create", "serviceaccount", "robot", "-n", &ns]);
    let token = server.ok(
        version,
        &["create", "token", "robot", "-n", &ns, "--duration=10m"],
    );
    assert_eq!(token.trim().split('.').count(), 3, "not a JWT: {token}");

    let yes = server.ok(version, &["auth", "can-i", "create", "pods", "-n", &ns]);
    assert_eq!(yes.trim(), "yes");
    let who: Value =
        serde_json::from_str(&server.ok(version, &["auth", "whoami", "-o", "json"])).unwrap();
    assert_eq!(who["status"]["userInfo"]["username"], "admin", "{who}");
}

#[test]
fn kubectl_1_32_typed_creates_send_protobuf() {
    typed_creates("1.32");
}

#[test]
fn kubectl_1_33_typed_creates_send_protobuf() {
    typed_creates("1.33");
}

#[test]
fn malformed_protobuf_body_is_a_400_naming_the_problem() {
    let server = Server::start();
    let file = server.dir.path().join("body.pb");
    let ct = "Content-Type: application/vnd.kubernetes.protobuf";
    // No magic number.
    std::fs::write(&file, b"{\"kind\":\"Namespace\"}").unwrap();
    let out = server.curl("POST", "/api/v1/namespaces", Some(&file), &[ct], false);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["code"], 400, "{status}");
    assert!(
        status["message"].as_str().unwrap().contains("magic"),
        "{status}"
    );
    // Magic, then an envelope whose raw object is truncated:
    // Unknown{typeMeta{apiVersion "v1", kind "Namespace"}, raw = metadata(len 10) with 2 bytes}.
    let mut body = b"k8s\0".to_vec();
    body.extend([0x0a, 0x0f, 0x0a, 0x02, b'v', b'1', 0x12, 0x09]);
    body.extend(b"Namespace");
    body.extend([0x12, 0x04, 0x0a, 0x0a, 0x0a, 0x01]);
    std::fs::write(&file, &body).unwrap();
    let out = server.curl("POST", "/api/v1/namespaces", Some(&file), &[ct], false);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["code"], 400, "{status}");
    let msg = status["message"].as_str().unwrap();
    assert!(
        msg.contains("protobuf") && msg.contains("Namespace"),
        "{msg}"
    );
    // A kind no schema describes.
    let mut body = b"k8s\0".to_vec();
    body.extend([0x0a, 0x14, 0x0a, 0x0e]);
    body.extend(b"example.com/v1");
    body.extend([0x12, 0x02]);
    body.extend(b"Wx");
    std::fs::write(&file, &body).unwrap();
    let out = server.curl("POST", "/api/v1/namespaces", Some(&file), &[ct], false);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["code"], 400, "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("example.com/v1"),
        "{status}"
    );
}

/// The `Content-Type` of every response kubectl logged at `-v=8`.
fn response_content_types(log: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_response = false;
    for line in log.lines() {
        if line.contains("\"Response\"") {
            in_response = true;
        } else if line.contains("\"Request\"") {
            in_response = false;
        } else if in_response && let Some(ct) = line.trim().strip_prefix("Content-Type: ") {
            out.push(ct.trim().to_owned());
        }
    }
    out
}

/// kubectl 1.33's typed commands accept protobuf and the server answers in
/// it: kubectl decodes the objects (and a protobuf Status error) the
/// server encoded, and prints what it would print against kube-apiserver.
#[test]
fn kubectl_1_33_reads_protobuf_responses() {
    let v = "1.33";
    let server = Server::start();
    let proto = "application/vnd.kubernetes.protobuf";
    let run = |args: &[&str]| -> (String, String) {
        let mut all = args.to_vec();
        all.push("-v=8");
        let out = server.kubectl(v, &all);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "kubectl {args:?} failed: {log}");
        assert!(
            log.contains(&format!("Accept: {proto},application/json")),
            "kubectl {args:?} did not ask for protobuf: {log}"
        );
        assert!(
            response_content_types(&log).iter().any(|c| c == proto),
            "kubectl {args:?} got no protobuf response: {:?}\n{log}",
            response_content_types(&log)
        );
        (String::from_utf8_lossy(&out.stdout).into_owned(), log)
    };
    let (out, _) = run(&["create", "namespace", "pb"]);
    assert_eq!(out.trim(), "namespace/pb created");
    let (out, _) = run(&[
        "create",
        "configmap",
        "cfg",
        "-n",
        "pb",
        "--from-literal=a=1",
    ]);
    assert_eq!(out.trim(), "configmap/cfg created");
    let (out, _) = run(&[
        "create",
        "deployment",
        "web",
        "-n",
        "pb",
        "--image=nginx:1.27",
        "--replicas=2",
        "--port=80",
    ]);
    assert_eq!(out.trim(), "deployment.apps/web created");
    let (out, _) = run(&[
        "create",
        "service",
        "clusterip",
        "web",
        "-n",
        "pb",
        "--tcp=80:8080",
    ]);
    assert_eq!(out.trim(), "service/web created");
    // -o json prints the object kubectl decoded from protobuf.
    let (out, _) = run(&[
        "create",
        "configmap",
        "echo",
        "-n",
        "pb",
        "--from-literal=k=v",
        "-o",
        "json",
    ]);
    let cm: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cm["data"]["k"], "v", "{cm}");
    assert_eq!(cm["metadata"]["namespace"], "pb", "{cm}");
    assert!(
        cm["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty()),
        "{cm}"
    );
    let (out, _) = run(&["create", "token", "default", "-n", "pb"]);
    assert_eq!(out.trim().split('.').count(), 3, "not a JWT: {out}");
    let (out, _) = run(&["auth", "can-i", "create", "pods", "-n", "pb"]);
    assert_eq!(out.trim(), "yes");
    let (out, _) = run(&["auth", "whoami"]);
    assert!(out.contains("admin"), "{out}");
    // The decoded objects match what the JSON path stores.
    let d = server.get_json(v, &["deployment", "web", "-n", "pb"]);
    assert_eq!(d["spec"]["replicas"], 2, "{d}");
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"],
        80
    );
    // An error comes back as a protobuf Status kubectl understands.
    let out = server.kubectl(v, &["create", "namespace", "pb", "-v=8"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        log.contains("Error from server (AlreadyExists): namespaces \"pb\" already exists"),
        "{log}"
    );
    assert!(
        response_content_types(&log).iter().any(|c| c == proto),
        "the Status was not protobuf: {log}"
    );
}
