//! The systemd units and install script under control/skep/dist: the
//! script installs binary, units and settings (into a prefix here), the
//! units pass `systemd-analyze verify`, bad arguments are refused, and the
//! server unit's command line, run as systemd would run it, starts a
//! working server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const DIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dist");

fn install(prefix: &Path, args: &[&str]) -> std::process::Output {
    Command::new("sh")
        .arg(format!("{DIST}/install.sh"))
        .args(args)
        .env("SKEP_PREFIX", prefix)
        .env("SKEP_BIN", env!("CARGO_BIN_EXE_skep"))
        .output()
        .unwrap()
}

/// KEY=VALUE lines of an environment file.
fn env_file(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn exec_start(unit: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart")
        .to_owned()
}

#[test]
fn install_script_and_units_work() {
    let root = tempfile::tempdir().unwrap();
    let prefix = root.path().join("root");

    let out = install(&prefix, &["server", "--no-agent"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = prefix.join("usr/local/bin/skep");
    assert!(bin.is_file(), "binary installed");
    let unit_path = prefix.join("etc/systemd/system/skep-server.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    assert!(
        unit.contains("KillMode=process"),
        "containers outlive restarts"
    );
    let env = env_file(&prefix.join("etc/default/skep-server"));
    assert!(
        env.contains(&("SKEP_SERVER_ARGS".into(), "--no-agent".into())),
        "{env:?}"
    );

    let ca = root.path().join("ca.crt");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let out = install(
        &prefix,
        &[
            "agent",
            "--server",
            "https://192.0.2.1:6443",
            "--token",
            "t0k",
            "--ca-file",
            ca.to_str().unwrap(),
            "--node-ip",
            "192.0.2.2",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = env_file(&prefix.join("etc/default/skep-agent"));
    for want in [
        ("SKEP_SERVER", "https://192.0.2.1:6443"),
        ("SKEP_TOKEN", "t0k"),
        ("SKEP_CA_FILE", "/etc/skep/ca.crt"),
        ("SKEP_AGENT_ARGS", "--node-ip 192.0.2.2"),
    ] {
        assert!(
            env.contains(&(want.0.into(), want.1.into())),
            "{want:?} in {env:?}"
        );
    }
    assert!(prefix.join("etc/skep/ca.crt").is_file(), "CA installed");

    // Bad invocations are refused with a message naming what is missing.
    for (args, says) in [
        (vec!["agent", "--server", "https://x:6443"], "--token"),
        (vec!["worker"], "unknown role"),
        (vec![], "usage"),
    ] {
        let out = install(&prefix, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
    }

    // Both units verify (with ExecStart pointing at the installed binary).
    for role in ["server", "agent"] {
        let text =
            std::fs::read_to_string(prefix.join(format!("etc/systemd/system/skep-{role}.service")))
                .unwrap()
                .replace("/usr/local/bin/skep", bin.to_str().unwrap());
        let copy = root.path().join(format!("skep-{role}.service"));
        std::fs::write(&copy, text).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("systemd-analyze (systemd) is needed to check the units");
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "skep-{role}.service: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The server unit's command line, expanded as systemd does, starts a
    // server (on loopback, in a temporary data dir).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = root.path().join("data");
    let line = exec_start(&unit)
        .replace("/usr/local/bin/skep", bin.to_str().unwrap())
        .replace("/var/lib/skep/server", data.to_str().unwrap())
        .replace("$SKEP_SERVER_ARGS", "--no-agent");
    let argv: Vec<&str> = line.split_whitespace().collect();
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .args(["--api-listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ok = false;
    while Instant::now() < deadline {
        let out = Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("https://127.0.0.1:{port}/readyz"))
            .output()
            .unwrap();
        if out.stdout == b"200" {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "the unit's command line started a ready server");
    assert!(data.join("kubeconfig.yaml").is_file(), "kubeconfig written");
}
