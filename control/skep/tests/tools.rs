//! `skep tools serve` / `probe`: the test workload answers with its host
//! name over TCP, UDP and HTTP; probes report success and failure by exit
//! code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn probe(proto: &str, port: u16) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_skep"))
        .args([
            "tools",
            "probe",
            proto,
            &format!("127.0.0.1:{port}"),
            "--timeout",
            "1s",
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn serve_answers_with_the_host_name_and_probe_reports_it() {
    let (tcp, udp, http) = (free_port(), free_port(), free_port());
    let mut server = Command::new(env!("CARGO_BIN_EXE_skep"))
        .args([
            "tools",
            "serve",
            "--bind",
            "127.0.0.1",
            "--tcp",
            &tcp.to_string(),
            "--udp",
            &udp.to_string(),
            "--http",
            &http.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !probe("tcp", tcp).0 {
        assert!(Instant::now() < deadline, "serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    for (proto, port) in [("tcp", tcp), ("udp", udp), ("http", http)] {
        let (ok, out) = probe(proto, port);
        assert!(ok, "{proto}: {out}");
        assert!(
            out.contains(&format!("answered by {host}")),
            "{proto}: {out}"
        );
    }
    server.kill().unwrap();
    server.wait().unwrap();
    // Nothing listens now: every probe fails with exit code 1.
    for (proto, port) in [("tcp", tcp), ("udp", udp), ("http", http)] {
        let (ok, out) = probe(proto, port);
        assert!(!ok, "{proto} probe of a closed port succeeded: {out}");
        assert!(out.starts_with("FAIL"), "{out}");
    }
}
