//! `skep ctl svc` reads a load balancer's pinned maps and shows its
//! frontends and backends: programmed here through the dataplane's own
//! interface, read back by the CLI in another process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use skep_dataplane::lb::{
    Endpoint, EndpointState, KernelDatapath, LbSettings, LoadBalancer, Protocol, Service,
    ServicePort,
};
use std::{net::Ipv4Addr, process::Command};

struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn ctl_svc_shows_the_programmed_services() {
    assert!(
        nix_root(),
        "this test loads BPF programs: run it as root (with bpffs at /sys/fs/bpf; `cargo xtask setup` mounts it)"
    );
    let pins = PinDir(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/skep-ctl-test-{}",
        std::process::id()
    )));
    let settings = LbSettings {
        pin_root: pins.0.clone(),
        maglev_size: 251,
        max_frontends: 64,
        ..LbSettings::default()
    };
    let dp = KernelDatapath::open(settings)
        .expect("open the LB datapath (did `cargo xtask build-ebpf` run?)");
    let mut lb = LoadBalancer::new(dp).unwrap();
    let ep = |d| Endpoint {
        addr: Ipv4Addr::new(10, 42, 0, d),
        state: if d == 7 {
            EndpointState::Terminating
        } else {
            EndpointState::Ready
        },
        local: true,
    };
    lb.upsert_service(Service {
        name: "demo/echo".into(),
        vip: Ipv4Addr::new(10, 43, 0, 50),
        ports: vec![ServicePort {
            port: 80,
            protocol: Protocol::Tcp,
            target_port: 8080,
            node_port: None,
        }],
        endpoints: vec![ep(5), ep(6), ep(7)],
        session_affinity: Some(std::time::Duration::from_secs(600)),
        internal_traffic_local: false,
        external_traffic_local: false,
        external_ips: vec![],
    })
    .unwrap();
    lb.upsert_service(Service {
        name: "demo/empty".into(),
        vip: Ipv4Addr::new(10, 43, 0, 51),
        ports: vec![ServicePort {
            port: 53,
            protocol: Protocol::Udp,
            target_port: 53,
            node_port: None,
        }],
        endpoints: vec![],
        session_affinity: None,
        internal_traffic_local: false,
        external_traffic_local: false,
        external_ips: vec![],
    })
    .unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_skep"))
        .args(["ctl", "svc", "--pin-root"])
        .arg(&pins.0)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echo = text
        .lines()
        .find(|l| l.starts_with("10.43.0.50:80"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        echo.contains("TCP") && echo.contains("ClientIP 600s"),
        "{echo}"
    );
    assert!(
        echo.contains("10.42.0.5:8080") && echo.contains("10.42.0.6:8080"),
        "{echo}"
    );
    assert!(echo.contains("10.42.0.7:8080 (terminating)"), "{echo}");
    let empty = text
        .lines()
        .find(|l| l.starts_with("10.43.0.51:53"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        empty.contains("UDP") && empty.contains("<none: refused>"),
        "{empty}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_skep"))
        .args(["ctl", "svc", "-o", "json", "--pin-root"])
        .arg(&pins.0)
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = doc["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["vip"] == "10.43.0.50")
        .unwrap();
    assert_eq!(f["readyBackends"], 2);
    assert_eq!(f["backends"].as_array().unwrap().len(), 3);

    // A root without pins gives advice, not a panic.
    let out = Command::new(env!("CARGO_BIN_EXE_skep"))
        .args(["ctl", "svc", "--pin-root", "/sys/fs/bpf/does-not-exist"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is the skep agent's dataplane set up here")
    );
    drop(lb);
}

fn nix_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
