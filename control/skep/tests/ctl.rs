//! `skep ctl` against a real server: status, apply (server-side), get in
//! each output, delete.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Server;
use std::process::Command;

fn ctl(s: &Server, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_skep"))
        .arg("ctl")
        .arg("--kubeconfig")
        .arg(s.kubeconfig())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const MANIFEST: &str = "apiVersion: v1
kind: Namespace
metadata: {name: ctl}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: ctl, labels: {app: demo}}
data: {color: blue}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ctl}
spec:
  selector: {app: web}
  ports: [{port: 80}]
";

#[test]
fn ctl_applies_gets_and_deletes() {
    let s = Server::start();
    let file = s.dir.path().join("m.yaml");
    std::fs::write(&file, MANIFEST).unwrap();
    let f = file.to_str().unwrap();

    let (ok, out, err) = ctl(&s, &["status"]);
    assert!(ok, "{err}");
    assert!(out.contains("control plane  ready"), "{out}");
    assert!(out.contains("[+]store ok"), "{out}");
    assert!(out.contains("DNS  not served"), "{out}");
    assert!(out.trim_end().ends_with("healthy"), "{out}");

    let (ok, out, err) = ctl(&s, &["apply", "-f", f]);
    assert!(ok, "{err}");
    assert!(
        out.contains("configmap/settings applied") && out.contains("service/web applied"),
        "{out}"
    );
    // Applying again is idempotent; a change is applied.
    let (ok, _, err) = ctl(&s, &["apply", "-f", f]);
    assert!(ok, "{err}");
    std::fs::write(&file, MANIFEST.replace("color: blue", "color: red")).unwrap();
    let (ok, _, err) = ctl(&s, &["apply", "-f", f]);
    assert!(ok, "{err}");

    let (ok, out, _) = ctl(&s, &["-n", "ctl", "get", "cm", "settings", "-o", "json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["data"]["color"], "red");
    let (_, out, _) = ctl(
        &s,
        &[
            "-n",
            "ctl",
            "get",
            "configmaps",
            "-l",
            "app=demo",
            "-o",
            "name",
        ],
    );
    assert_eq!(out.trim(), "configmap/settings");
    let (_, out, _) = ctl(&s, &["get", "svc", "-A"]);
    assert!(
        out.contains("NAMESPACE")
            && out.contains("CLUSTER-IP")
            && out.contains("ctl")
            && out.contains("kubernetes"),
        "{out}"
    );
    let (_, out, _) = ctl(&s, &["-n", "ctl", "get", "service", "web", "-o", "yaml"]);
    assert!(out.contains("clusterIP: 10.43."), "{out}");
    let (ok, _, err) = ctl(&s, &["get", "widgets"]);
    assert!(
        !ok && err.contains("doesn't have a resource type \"widgets\""),
        "{err}"
    );

    let (ok, out, err) = ctl(&s, &["delete", "-f", f]);
    assert!(ok, "{err}");
    assert!(out.contains("namespace/ctl deleted"), "{out}");
    let (ok, _, _) = ctl(&s, &["-n", "ctl", "get", "cm", "settings"]);
    assert!(!ok, "the object is gone");
}

/// Files in DATA_DIR/manifests are applied at start and when they change;
/// a broken file is reported in the log and does not stop the others.
#[test]
fn manifests_directory_is_applied_at_start_and_on_change() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("10-app.yaml"), MANIFEST).unwrap();
    std::fs::write(manifests.join("20-broken.yaml"), "kind: [unclosed").unwrap();
    std::fs::write(manifests.join("notes.txt"), "not a manifest").unwrap();
    let s = Server::start_in(dir, &["--no-agent"]);
    let get = |what: &str| {
        s.kubectl(
            "1.33",
            &["-n", "ctl", "get", what, "-o", "jsonpath={.data.color}"],
        )
    };
    let wait = |want: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let out = get("configmap/settings");
            if String::from_utf8_lossy(&out.stdout) == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "configmap color never became {want:?}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                s.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    wait("blue");
    assert!(
        s.k(
            "1.33",
            &["-n", "ctl", "get", "service", "web", "-o", "name"]
        )
        .contains("service/web"),
        "every object of the file is applied"
    );
    // A change to the file is applied again.
    std::fs::write(
        s.dir.path().join("manifests/10-app.yaml"),
        MANIFEST.replace("color: blue", "color: green"),
    )
    .unwrap();
    wait("green");
    let log = s.log();
    assert!(
        log.contains("20-broken.yaml") && log.contains("not applied"),
        "the broken file is named in the log:\n{log}"
    );
}
