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
