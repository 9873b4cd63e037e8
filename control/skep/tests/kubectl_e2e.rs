//! Real kubectl binaries against a real `skep server --no-agent`: the
//! workflows a user of any cluster reaches for.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Server;
use std::{process::Command, time::Duration};

const MANIFEST: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: NS
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: NS
  labels: {app: web}
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: host
        command: [skep, tools, serve, --http, \"8080\"]
        ports:
        - {containerPort: 8080, name: http}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: NS
spec:
  selector: {app: web}
  ports:
  - {port: 80, targetPort: http}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: cfg
  namespace: NS
  labels: {tier: config}
data:
  greeting: hello
";

fn manifest(ns: &str) -> String {
    MANIFEST.replace("NS", ns)
}

/// The workflows every kubectl version must handle. `typed` adds the
/// commands that kubectl >= 1.32 sends as protobuf.
fn workflow(s: &Server, v: &str, ns: &str, typed: bool) {
    let m = manifest(ns);
    // create/apply -f of a multi-document file; re-apply is a no-op; a
    // change is "configured".
    let out = s.kubectl_stdin(v, &["apply", "-f", "-"], Some(&m));
    assert!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("namespace/{ns} created")), "{text}");
    assert!(text.contains("deployment.apps/web created"), "{text}");
    let out = s.kubectl_stdin(v, &["apply", "-f", "-"], Some(&m));
    assert!(String::from_utf8_lossy(&out.stdout).contains("deployment.apps/web unchanged"));
    let changed = m.replace("replicas: 3", "replicas: 5");
    let out = s.kubectl_stdin(v, &["apply", "-f", "-"], Some(&changed));
    assert!(String::from_utf8_lossy(&out.stdout).contains("deployment.apps/web configured"));

    // get in every output format.
    let d = s.json(v, &["-n", ns, "get", "deploy", "web"]);
    assert_eq!(d["spec"]["replicas"], 5);
    assert_eq!(d["metadata"]["generation"], 2);
    assert_eq!(
        d["spec"]["strategy"]["type"], "RollingUpdate",
        "defaults applied"
    );
    let yaml = s.k(v, &["-n", ns, "get", "deploy", "web", "-o", "yaml"]);
    assert!(yaml.contains("kind: Deployment") && yaml.contains("replicas: 5"));
    let wide = s.k(v, &["-n", ns, "get", "deploy", "-o", "wide"]);
    assert!(
        wide.contains("CONTAINERS") && wide.contains("app=web"),
        "{wide}"
    );
    assert_eq!(
        s.k(v, &["-n", ns, "get", "svc", "-o", "name"]).trim(),
        "service/web"
    );
    let ip = s.k(
        v,
        &[
            "-n",
            ns,
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
    );
    assert!(ip.starts_with("10.43."), "cluster IP {ip}");
    let labelled = s.k(
        v,
        &["-n", ns, "get", "cm", "-l", "tier=config", "-o", "name"],
    );
    assert_eq!(labelled.trim(), "configmap/cfg");
    let by_field = s.k(
        v,
        &[
            "-n",
            ns,
            "get",
            "cm",
            "--field-selector",
            "metadata.name=cfg",
            "-o",
            "name",
        ],
    );
    assert_eq!(by_field.trim(), "configmap/cfg");
    let all = s.k(v, &["get", "svc", "-A"]);
    assert!(all.contains("kubernetes") && all.contains(ns), "{all}");
    let table = s.k(v, &["-n", ns, "get", "svc"]);
    assert!(
        table.contains("CLUSTER-IP") && table.contains("80/TCP"),
        "{table}"
    );

    // describe
    let desc = s.k(v, &["-n", ns, "describe", "deploy", "web"]);
    assert!(
        desc.contains("Replicas:") && desc.contains("RollingUpdate"),
        "{desc}"
    );

    // label, annotate, scale, the three patch types.
    s.k(v, &["-n", ns, "label", "deploy", "web", "tier=fe"]);
    s.k(v, &["-n", ns, "annotate", "deploy", "web", "owner=team-a"]);
    s.k(v, &["-n", ns, "scale", "deploy", "web", "--replicas=2"]);
    s.k(
        v,
        &[
            "-n",
            ns,
            "patch",
            "deploy",
            "web",
            "-p",
            r#"{"spec":{"template":{"spec":{"containers":[{"name":"side","image":"host"}]}}}}"#,
        ],
    );
    s.k(
        v,
        &[
            "-n",
            ns,
            "patch",
            "deploy",
            "web",
            "--type=merge",
            "-p",
            r#"{"metadata":{"labels":{"merged":"yes"}}}"#,
        ],
    );
    s.k(
        v,
        &[
            "-n",
            ns,
            "patch",
            "deploy",
            "web",
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/spec/replicas","value":4}]"#,
        ],
    );
    let d = s.json(v, &["-n", ns, "get", "deploy", "web"]);
    assert_eq!(d["metadata"]["labels"]["tier"], "fe");
    assert_eq!(d["metadata"]["labels"]["merged"], "yes");
    assert_eq!(d["metadata"]["annotations"]["owner"], "team-a");
    assert_eq!(d["spec"]["replicas"], 4);
    let containers: Vec<&str> = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        containers,
        ["web", "side"],
        "strategic merge keeps and adds by name"
    );

    // edit through an editor script, replace from a file.
    let editor = s.dir.path().join(format!("editor-{ns}.sh"));
    std::fs::write(
        &editor,
        "#!/bin/sh\nsed -i 's/greeting: hello/greeting: edited/' \"$1\"\n",
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&editor)
        .status()
        .unwrap();
    let out = Command::new(common::kubectl_bin(v))
        .args(["--kubeconfig"])
        .arg(s.kubeconfig())
        .args(["-n", ns, "edit", "cm", "cfg"])
        .env("KUBE_EDITOR", &editor)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "edit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        s.k(
            v,
            &[
                "-n",
                ns,
                "get",
                "cm",
                "cfg",
                "-o",
                "jsonpath={.data.greeting}"
            ]
        ),
        "edited"
    );
    let cm = s
        .k(v, &["-n", ns, "get", "cm", "cfg", "-o", "yaml"])
        .replace("greeting: edited", "greeting: replaced");
    let out = s.kubectl_stdin(v, &["replace", "-f", "-"], Some(&cm));
    assert!(
        out.status.success(),
        "replace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        s.k(
            v,
            &[
                "-n",
                ns,
                "get",
                "cm",
                "cfg",
                "-o",
                "jsonpath={.data.greeting}"
            ]
        ),
        "replaced"
    );

    // wait --for on a field.
    s.k(
        v,
        &[
            "-n",
            ns,
            "wait",
            "--for=jsonpath={.spec.replicas}=4",
            "deploy/web",
            "--timeout=10s",
        ],
    );

    // server-side apply
    let ssa = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\n  namespace: {ns}\ndata:\n  k: v\n"
    );
    let out = s.kubectl_stdin(v, &["apply", "--server-side", "-f", "-"], Some(&ssa));
    assert!(
        out.status.success(),
        "server-side apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        s.k(
            v,
            &["-n", ns, "get", "cm", "ssa", "-o", "jsonpath={.data.k}"]
        ),
        "v"
    );

    // get -w sees a create and a delete; delete --wait returns once gone.
    let mut watcher = Command::new(common::kubectl_bin(v))
        .arg("--kubeconfig")
        .arg(s.kubeconfig())
        .args(["-n", ns, "get", "cm", "-w", "--request-timeout=8s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let w =
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: watched\n  namespace: {ns}\n");
    let out = s.kubectl_stdin(v, &["apply", "-f", "-"], Some(&w));
    assert!(out.status.success());
    s.k(v, &["-n", ns, "delete", "cm", "watched", "--wait=true"]);
    std::thread::sleep(Duration::from_millis(500));
    let _ = watcher.kill();
    let out = watcher.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(seen.matches("watched").count() >= 2, "watch output: {seen}");

    // discovery
    let resources = s.k(v, &["api-resources"]);
    for r in [
        "deployments",
        "networkpolicies",
        "endpointslices",
        "customresourcedefinitions",
    ] {
        assert!(resources.contains(r), "api-resources lacks {r}");
    }
    let versions = s.k(v, &["api-versions"]);
    assert!(versions.contains("apps/v1") && versions.contains("networking.k8s.io/v1"));
    // The deployment controller has made revision 1.
    let history = s.k(v, &["-n", ns, "rollout", "history", "deploy/web"]);
    assert!(
        history.contains("REVISION") && history.lines().any(|l| l.starts_with('1')),
        "{history}"
    );

    if typed {
        assert_eq!(s.k(v, &["auth", "can-i", "create", "pods"]).trim(), "yes");
        s.k(
            v,
            &["-n", ns, "create", "configmap", "lit", "--from-literal=a=b"],
        );
        s.k(
            v,
            &[
                "-n",
                ns,
                "create",
                "secret",
                "generic",
                "sec",
                "--from-literal=p=q",
            ],
        );
        s.k(
            v,
            &[
                "-n",
                ns,
                "create",
                "deployment",
                "d2",
                "--image=host",
                "--replicas=2",
            ],
        );
        assert_eq!(
            s.json(v, &["-n", ns, "get", "secret", "sec"])["data"]["p"],
            "cQ=="
        );
        assert_eq!(
            s.json(v, &["-n", ns, "get", "deploy", "d2"])["spec"]["replicas"],
            2
        );
    }

    // Deleting the namespace removes everything in it, then the namespace.
    s.k(
        v,
        &["delete", "namespace", ns, "--wait=true", "--timeout=30s"],
    );
    let out = s.kubectl(v, &["get", "namespace", ns]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("NotFound"));
    let leftovers = s.k(v, &["-n", ns, "get", "cm,deploy,svc", "-o", "name"]);
    assert!(
        leftovers.trim().is_empty(),
        "left in the deleted namespace: {leftovers}"
    );
}

#[test]
fn kubectl_1_30_workflows() {
    let s = Server::start();
    workflow(&s, "1.30", "k130", true);
}

#[test]
fn kubectl_1_31_workflows() {
    let s = Server::start();
    workflow(&s, "1.31", "k131", true);
}

#[test]
fn kubectl_1_33_workflows_over_json() {
    let s = Server::start();
    workflow(&s, "1.33", "k133", false);
}

const CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.example.org
spec:
  group: example.org
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget, shortNames: [gd]}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              replicas: {type: integer, maximum: 3}
              mode: {type: string, default: auto}
";

#[test]
fn custom_resources_are_served_and_validated() {
    let s = Server::start();
    for v in ["1.31", "1.33"] {
        let out = s.kubectl_stdin(v, &["apply", "-f", "-"], Some(CRD));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        s.k(
            v,
            &[
                "wait",
                "--for",
                "condition=established",
                "crd/gadgets.example.org",
                "--timeout=10s",
            ],
        );
        let g = "apiVersion: example.org/v1\nkind: Gadget\nmetadata: {name: g1, namespace: default}\nspec: {replicas: 2}\n";
        let out = s.kubectl_stdin(v, &["apply", "-f", "-"], Some(g));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(s.k(v, &["get", "gd"]).contains("g1"), "short name works");
        assert_eq!(
            s.json(v, &["get", "gadget", "g1"])["spec"]["mode"],
            "auto",
            "schema default applied"
        );
        // kubectl asks for strict field validation: out-of-range values and
        // unknown fields are both reported.
        let bad = "apiVersion: example.org/v1\nkind: Gadget\nmetadata: {name: g2, namespace: default}\nspec: {replicas: 9, bogus: 1}\n";
        let out = s.kubectl_stdin(v, &["apply", "-f", "-"], Some(bad));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("spec.replicas") && err.contains("spec.bogus"),
            "{err}"
        );
        s.k(v, &["delete", "crd", "gadgets.example.org"]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while s.kubectl(v, &["get", "gadgets"]).status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "gadgets still served after the CRD was deleted"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn explain_impersonation_and_strict_field_validation() {
    let s = Server::start();
    for v in ["1.27", "1.33"] {
        let out = s.k(v, &["explain", "deployment.spec.replicas"]);
        assert!(
            out.contains("replicas <integer>"),
            "kubectl {v} explain: {out}"
        );
        let out = s.k(v, &["explain", "pods.spec.containers.ports"]);
        assert!(
            out.contains("ports <[]ContainerPort>"),
            "kubectl {v} explain: {out}"
        );
    }
    // --as: the admin may impersonate; bob himself has no rights.
    let no = s.kubectl("1.31", &["auth", "can-i", "list", "namespaces", "--as=bob"]);
    assert_eq!(
        String::from_utf8_lossy(&no.stdout).trim(),
        "no",
        "can-i exits 1 with \"no\""
    );
    let out = s.kubectl("1.31", &["get", "namespaces", "--as=bob"]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("User \"bob\" cannot list resource \"namespaces\"")
    );
    assert_eq!(
        s.k(
            "1.31",
            &[
                "auth",
                "can-i",
                "list",
                "namespaces",
                "--as=bob",
                "--as-group=system:masters"
            ]
        )
        .trim(),
        "yes"
    );
    // kubectl asks for strict field validation: a typo in a built-in kind is
    // an error naming the field, not silently dropped.
    let typo = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: typo, namespace: default}\ndata: {a: b}\nbogus: 1\n";
    let out = s.kubectl_stdin("1.33", &["apply", "-f", "-"], Some(typo));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown field \"bogus\""),
        "{err}"
    );
    let ok = typo.replace("bogus: 1\n", "");
    let out = s.kubectl_stdin("1.33", &["apply", "-f", "-"], Some(&ok));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s.kubectl_stdin(
        "1.33",
        &["apply", "--validate=false", "-f", "-"],
        Some(&typo.replace("typo", "lax")),
    );
    assert!(
        out.status.success(),
        "without strict validation unknown fields are dropped"
    );
}

/// `kubectl apply --validate=warn` of a manifest with a typo succeeds and
/// kubectl prints the server's warning; `--validate=strict` fails naming
/// the field; the stored object has no trace of the typo.
#[test]
fn validate_warn_prints_unknown_fields_and_strict_refuses_them() {
    let s = Server::start();
    let typo = "apiVersion: apps/v1
kind: Deployment
metadata: {name: typo, namespace: default}
spec:
  replica: 2
  selector: {matchLabels: {app: typo}}
  template:
    metadata: {labels: {app: typo}}
    spec:
      containers:
      - {name: c, image: nginx, imagePullPolize: Always}
";
    for v in ["1.31", "1.33"] {
        let name = format!("typo-{}", v.replace('.', "-"));
        let manifest = typo.replace("name: typo,", &format!("name: {name},"));
        let out = s.kubectl_stdin(v, &["apply", "--validate=warn", "-f", "-"], Some(&manifest));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "kubectl {v} apply --validate=warn: {err}"
        );
        assert!(
            err.contains("Warning: unknown field \"spec.replica\"")
                && err.contains(
                    "Warning: unknown field \"spec.template.spec.containers[0].imagePullPolize\""
                ),
            "kubectl {v} prints the server's warnings: {err}"
        );
        let d = s.json(v, &["get", "deployment", &name, "-n", "default"]);
        assert!(d["spec"].get("replica").is_none(), "{d}");
        assert_eq!(
            d["spec"]["replicas"], 1,
            "the typo did not set replicas: {d}"
        );

        let out = s.kubectl_stdin(
            v,
            &["apply", "--validate=strict", "-f", "-"],
            Some(&manifest.replace(&name, &format!("{name}-strict"))),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("unknown field \"spec.replica\""),
            "kubectl {v} apply --validate=strict: {err}"
        );
    }
    // Custom resources: the CRD schema prunes, the server warns.
    let v = "1.33";
    let out = s.kubectl_stdin(v, &["apply", "-f", "-"], Some(CRD));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.k(
        v,
        &[
            "wait",
            "--for",
            "condition=established",
            "crd/gadgets.example.org",
            "--timeout=10s",
        ],
    );
    let g = "apiVersion: example.org/v1\nkind: Gadget\nmetadata: {name: w1, namespace: default}\nspec: {replicas: 2, bogus: 1}\n";
    let out = s.kubectl_stdin(v, &["apply", "--validate=warn", "-f", "-"], Some(g));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("Warning: unknown field \"spec.bogus\""),
        "custom resource under --validate=warn: {err}"
    );
    let obj = s.json(v, &["get", "gadget", "w1"]);
    assert!(obj["spec"].get("bogus").is_none(), "{obj}");
}

const SSA_DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: NAME
  namespace: NS
  labels: {app: NAME, tier: front}
spec:
  replicas: 2
  selector:
    matchLabels: {app: NAME}
  template:
    metadata:
      labels: {app: NAME}
    spec:
      containers:
      - name: web
        image: host
        command: [skep, tools, serve, --http, \"8080\"]
        env:
        - {name: A, value: \"1\"}
        - {name: B, value: \"2\"}
";

fn ssa_deployment(ns: &str, name: &str) -> String {
    SSA_DEPLOYMENT.replace("NS", ns).replace("NAME", name)
}

/// The managedFields entry of `manager` with `operation`, if any.
fn managed_entry<'a>(
    obj: &'a serde_json::Value,
    manager: &str,
    operation: &str,
) -> Option<&'a serde_json::Value> {
    obj["metadata"]["managedFields"]
        .as_array()?
        .iter()
        .find(|e| e["manager"] == manager && e["operation"] == operation)
}

fn assert_ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Server-side apply as a real cluster does it: field ownership, conflicts
/// and --force-conflicts, removal of fields no longer applied, several
/// managers on one object, and the client-side → server-side switch.
fn server_side_apply(s: &Server, v: &str, ns: &str) {
    s.k(v, &["create", "namespace", ns]);
    let dep = ssa_deployment(ns, "web");
    let ssa = ["apply", "--server-side", "-f", "-"];

    // Create through apply: kubectl owns what it applied.
    let out = assert_ok(&s.kubectl_stdin(v, &ssa, Some(&dep)), "apply --server-side");
    assert!(
        out.contains("deployment.apps/web serverside-applied"),
        "{out}"
    );
    let yaml = s.k(
        v,
        &[
            "-n",
            ns,
            "get",
            "deploy",
            "web",
            "-o",
            "yaml",
            "--show-managed-fields",
        ],
    );
    assert!(
        yaml.contains("manager: kubectl")
            && yaml.contains("operation: Apply")
            && yaml.contains("f:replicas: {}"),
        "{yaml}"
    );
    let plain = s.k(v, &["-n", ns, "get", "deploy", "web", "-o", "yaml"]);
    assert!(
        !plain.contains("managedFields"),
        "hidden by default: {plain}"
    );
    let d = s.json(
        v,
        &["-n", ns, "get", "deploy", "web", "--show-managed-fields"],
    );
    let applied = managed_entry(&d, "kubectl", "Apply").expect("kubectl's Apply entry");
    assert_eq!(applied["fieldsType"], "FieldsV1");
    assert_eq!(applied["apiVersion"], "apps/v1");
    assert!(
        applied["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"]
            ["k:{\"name\":\"web\"}"]
            .get(".")
            .is_some(),
        "containers are owned by key: {applied}"
    );

    // A re-apply of the same file changes nothing (same resourceVersion).
    // The deployment controller writes status meanwhile: wait until the
    // object is quiet first (bounded).
    let mut rv = d["metadata"]["resourceVersion"].clone();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(750));
        let now =
            s.json(v, &["-n", ns, "get", "deploy", "web"])["metadata"]["resourceVersion"].clone();
        if now == rv {
            break;
        }
        rv = now;
    }
    assert_ok(&s.kubectl_stdin(v, &ssa, Some(&dep)), "re-apply");
    let d = s.json(v, &["-n", ns, "get", "deploy", "web"]);
    assert_eq!(d["metadata"]["resourceVersion"], rv, "no-op apply wrote");

    // Another manager takes replicas; applying 2 again conflicts.
    s.k(v, &["-n", ns, "scale", "deploy", "web", "--replicas=5"]);
    let out = s.kubectl_stdin(v, &ssa, Some(&dep));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "conflicting apply succeeded");
    assert!(
        err.contains("Apply failed with 1 conflict: conflict with")
            && err.contains(": .spec.replicas")
            && err.contains("force-conflicts"),
        "{err}"
    );
    let d = s.json(v, &["-n", ns, "get", "deploy", "web"]);
    assert_eq!(
        d["spec"]["replicas"], 5,
        "a refused apply changed the object"
    );

    // --force-conflicts wins and moves ownership.
    assert_ok(
        &s.kubectl_stdin(
            v,
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&dep),
        ),
        "apply --force-conflicts",
    );
    let d = s.json(
        v,
        &["-n", ns, "get", "deploy", "web", "--show-managed-fields"],
    );
    assert_eq!(d["spec"]["replicas"], 2);
    for e in d["metadata"]["managedFields"].as_array().unwrap() {
        let owns = e["fieldsV1"]["f:spec"].get("f:replicas").is_some();
        let is_applier = e["manager"] == "kubectl" && e["operation"] == "Apply";
        assert_eq!(owns, is_applier, "replicas ownership after force: {e}");
    }

    // A label set by `kubectl label` (another manager) survives; the label
    // and env var removed from the file are removed from the object.
    s.k(v, &["-n", ns, "label", "deploy", "web", "extra=yes"]);
    let smaller = dep
        .replace(", tier: front", "")
        .replace("        - {name: B, value: \"2\"}\n", "");
    assert_ok(&s.kubectl_stdin(v, &ssa, Some(&smaller)), "apply smaller");
    let d = s.json(v, &["-n", ns, "get", "deploy", "web"]);
    assert_eq!(
        d["metadata"]["labels"],
        serde_json::json!({"app": "web", "extra": "yes"})
    );
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["env"],
        serde_json::json!([{"name": "A", "value": "1"}])
    );

    // dry-run=server shows the result and stores nothing.
    let out = assert_ok(
        &s.kubectl_stdin(
            v,
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "-o",
                "json",
                "-f",
                "-",
            ],
            Some(&smaller.replace("replicas: 2", "replicas: 3")),
        ),
        "dry-run apply",
    );
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["spec"]["replicas"], 3);
    let d = s.json(v, &["-n", ns, "get", "deploy", "web"]);
    assert_eq!(d["spec"]["replicas"], 2);

    // Two managers on one ConfigMap: disjoint fields are kept, the same
    // field with another value conflicts.
    let cm = |data: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shared\n  namespace: {ns}\ndata:\n{data}"
        )
    };
    let mgr = |m: &'static str| ["apply", "--server-side", m, "-f", "-"];
    assert_ok(
        &s.kubectl_stdin(v, &mgr("--field-manager=a"), Some(&cm("  first: \"1\"\n"))),
        "apply as a",
    );
    assert_ok(
        &s.kubectl_stdin(v, &mgr("--field-manager=b"), Some(&cm("  second: \"2\"\n"))),
        "apply as b",
    );
    assert_ok(
        &s.kubectl_stdin(v, &mgr("--field-manager=a"), Some(&cm("  first: \"3\"\n"))),
        "re-apply as a",
    );
    let c = s.json(v, &["-n", ns, "get", "cm", "shared"]);
    assert_eq!(c["data"], serde_json::json!({"first": "3", "second": "2"}));
    let out = s.kubectl_stdin(
        v,
        &mgr("--field-manager=b"),
        Some(&cm("  first: \"4\"\n  second: \"2\"\n")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("Apply failed with 1 conflict: conflict with \"a\": .data.first"),
        "{err}"
    );

    // Client-side apply, then server-side apply with a changed field the
    // client-side apply set. kubectl >= 1.26 first moves
    // kubectl-client-side-apply's ownership to its own apply entry (a JSON
    // patch of managedFields), so, as on a real cluster, the switch
    // succeeds and the CSA manager is gone.
    let csa = ssa_deployment(ns, "legacy");
    assert_ok(
        &s.kubectl_stdin(v, &["apply", "-f", "-"], Some(&csa)),
        "CSA",
    );
    let d = s.json(
        v,
        &["-n", ns, "get", "deploy", "legacy", "--show-managed-fields"],
    );
    assert!(
        managed_entry(&d, "kubectl-client-side-apply", "Update").is_some(),
        "CSA's Update entry: {}",
        d["metadata"]["managedFields"]
    );
    // Another server-side manager meets CSA's ownership as a conflict.
    let changed = csa.replace("replicas: 2", "replicas: 4");
    let out = s.kubectl_stdin(
        v,
        &["apply", "--server-side", "--field-manager=other", "-f", "-"],
        Some(&changed),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(
                "conflict with \"kubectl-client-side-apply\" using apps/v1: .spec.replicas"
            ),
        "{err}"
    );
    assert_ok(&s.kubectl_stdin(v, &ssa, Some(&changed)), "CSA -> SSA");
    let d = s.json(
        v,
        &["-n", ns, "get", "deploy", "legacy", "--show-managed-fields"],
    );
    assert_eq!(d["spec"]["replicas"], 4);
    assert!(
        managed_entry(&d, "kubectl-client-side-apply", "Update").is_none()
            && managed_entry(&d, "kubectl", "Apply").is_some(),
        "ownership after the switch: {}",
        d["metadata"]["managedFields"]
    );
}

const SSA_CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.org
spec:
  group: example.org
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer}
              parts:
                type: array
                x-kubernetes-list-type: map
                x-kubernetes-list-map-keys: [name]
                items:
                  type: object
                  properties:
                    name: {type: string}
                    count: {type: integer}
";

/// Custom resources: list-type map items are owned by key, and two managers
/// applying different items of one list both keep theirs.
fn server_side_apply_custom_resource(s: &Server, v: &str) {
    assert_ok(
        &s.kubectl_stdin(v, &["apply", "--server-side", "-f", "-"], Some(SSA_CRD)),
        "apply CRD",
    );
    s.k(
        v,
        &[
            "wait",
            "--for",
            "condition=established",
            "crd/widgets.example.org",
            "--timeout=10s",
        ],
    );
    let w = |parts: &str| {
        format!(
            "apiVersion: example.org/v1\nkind: Widget\nmetadata: {{name: w1, namespace: default}}\nspec:\n  parts:\n{parts}"
        )
    };
    let as_mgr = |m: &'static str| ["apply", "--server-side", m, "-f", "-"];
    assert_ok(
        &s.kubectl_stdin(
            v,
            &as_mgr("--field-manager=a"),
            Some(&w("  - {name: wheel, count: 4}\n")),
        ),
        "apply widget as a",
    );
    assert_ok(
        &s.kubectl_stdin(
            v,
            &as_mgr("--field-manager=b"),
            Some(&w("  - {name: seat, count: 1}\n")),
        ),
        "apply widget as b",
    );
    let obj = s.json(v, &["get", "widget", "w1", "--show-managed-fields"]);
    assert_eq!(
        obj["spec"]["parts"],
        serde_json::json!([{"name": "wheel", "count": 4}, {"name": "seat", "count": 1}])
    );
    let a = managed_entry(&obj, "a", "Apply").expect("a's entry");
    assert!(
        a["fieldsV1"]["f:spec"]["f:parts"]
            .get("k:{\"name\":\"wheel\"}")
            .is_some(),
        "keyed by name: {a}"
    );
    let out = s.kubectl_stdin(
        v,
        &as_mgr("--field-manager=b"),
        Some(&w(
            "  - {name: seat, count: 1}\n  - {name: wheel, count: 3}\n",
        )),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(".spec.parts[name=\"wheel\"].count"),
        "{err}"
    );
    // a stops applying its item: it goes, b's stays.
    assert_ok(
        &s.kubectl_stdin(v, &as_mgr("--field-manager=a"), Some(&w("    []\n"))),
        "apply widget as a without parts",
    );
    let obj = s.json(v, &["get", "widget", "w1"]);
    assert_eq!(
        obj["spec"]["parts"],
        serde_json::json!([{"name": "seat", "count": 1}])
    );
}

#[test]
fn server_side_apply_kubectl_1_27_and_1_33() {
    let s = Server::start();
    server_side_apply(&s, "1.27", "ssa127");
    server_side_apply(&s, "1.33", "ssa133");
    server_side_apply_custom_resource(&s, "1.33");
}

/// Server-side apply through the official Python client: create,
/// ownership, a conflict with another manager, and force.
const PY_SSA: &str = r#"
import json, sys
from kubernetes import client, config
config.load_kube_config(sys.argv[1])
v1 = client.CoreV1Api()
ns = sys.argv[2]
v1.create_namespace({"metadata": {"name": ns}})
api = client.ApiClient()


# This client version has no `_content_type` on patch_*: the generic
# call sends the apply content type itself.
def ssa(body, manager, force=False):
    query = [("fieldManager", manager)] + ([("force", "true")] if force else [])
    return api.call_api(
        "/api/v1/namespaces/{namespace}/configmaps/{name}", "PATCH",
        {"namespace": ns, "name": "py"}, query,
        {"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
        body=body, response_type="V1ConfigMap", auth_settings=["BearerToken"],
        _return_http_data_only=True)


body = {"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "py", "namespace": ns}, "data": {"k": "v"}}
cm = ssa(body, "py-ssa")
assert cm.data == {"k": "v"}, cm.data
entries = [(e.manager, e.operation) for e in cm.metadata.managed_fields]
assert entries == [("py-ssa", "Apply")], entries
assert "f:k" in json.dumps(cm.metadata.managed_fields[0].fields_v1), cm.metadata.managed_fields
body["data"] = {"k": "w"}
try:
    ssa(body, "other")
    sys.exit("an apply changing another manager's field succeeded")
except client.ApiException as e:
    status = json.loads(e.body)
    assert e.status == 409 and status["reason"] == "Conflict", e.body
    cause = status["details"]["causes"][0]
    assert cause["reason"] == "FieldManagerConflict" and cause["field"] == ".data.k", e.body
cm = ssa(body, "other", force=True)
assert cm.data == {"k": "w"}, cm.data
assert [e.manager for e in cm.metadata.managed_fields] == ["other"], cm.metadata.managed_fields
# The typed client reads it back with its managedFields.
got = v1.read_namespaced_config_map("py", ns)
assert got.metadata.managed_fields[0].operation == "Apply", got.metadata.managed_fields
print("server-side apply ok")
"#;

#[test]
fn python_client_server_side_apply() {
    common::require_python_kubernetes();
    let s = Server::start();
    let out = Command::new("timeout")
        .args(["120", "python3", "-c", PY_SSA])
        .arg(s.kubeconfig())
        .arg("pyssa")
        .output()
        .unwrap();
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("server-side apply ok"),
        "python server-side apply failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
