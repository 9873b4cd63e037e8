//! The official Python `kubernetes` client against a real server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Server;
use std::process::Command;

#[test]
fn python_kubernetes_client_works_unchanged() {
    common::require_python_kubernetes();
    let s = Server::start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/client_smoke.py");
    let out = Command::new("timeout")
        .args(["120", "python3", script])
        .arg(s.kubeconfig())
        .arg("pyclient")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python client checks failed:\n{}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.log()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("all checks passed"));
}
