//! `cargo xtask up` boots a server in its own network namespace that plain
//! kubectl on the host reaches; `down` leaves nothing behind; `up` after
//! `down` works. Uses the debug `skep` binary the workspace build made.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn skep_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/skep");
    assert!(
        bin.is_file(),
        "{} is missing: this test needs the skep binary (`cargo build -p skep`, which `cargo test --workspace` does)",
        bin.display()
    );
    bin
}

struct Cluster {
    state: tempfile::TempDir,
    name: String,
}

impl Cluster {
    fn xtask(&self, cmd: &str, extra: &[&str]) -> std::process::Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
        c.arg(cmd)
            .args([
                "--name",
                &self.name,
                "--host-ip",
                "169.254.45.1",
                "--state-dir",
            ])
            .arg(self.state.path().join("up"))
            .args(extra);
        c.output().unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.xtask("down", &[]);
    }
}

#[test]
fn up_then_down_leaves_nothing_and_up_works_again() {
    assert!(
        nix_is_root(),
        "this test creates network namespaces: run it as root"
    );
    let cluster = Cluster {
        state: tempfile::tempdir().unwrap(),
        name: format!("skt{}", std::process::id() % 100_000),
    };
    let bin = skep_binary();
    for round in 0..2 {
        let out = cluster.xtask("up", &["--binary", bin.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "up (round {round}) failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let kc = stdout
            .lines()
            .find_map(|l| l.strip_prefix("export KUBECONFIG="))
            .expect("up prints the KUBECONFIG to export")
            .to_owned();
        assert!(
            stdout.contains("deployment.apps/echo created"),
            "the demo was applied:\n{stdout}"
        );
        // Its pods run, and the client reached the Service by DNS name.
        assert!(
            stdout.contains("OK Http echo.demo.svc.cluster.local:80 answered by echo-"),
            "the client pod reached the echo Service by name:\n{stdout}"
        );
        // Plain kubectl from the host (this test runs in the root netns).
        let get = Command::new("kubectl")
            .args([
                "--kubeconfig",
                &kc,
                "get",
                "svc",
                "-n",
                "demo",
                "echo",
                "-o",
                "name",
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&get.stdout).trim(),
            "service/echo",
            "{}",
            String::from_utf8_lossy(&get.stderr)
        );

        let out = cluster.xtask("down", &[]);
        assert!(
            out.status.success(),
            "down failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !Path::new("/run/netns").join(&cluster.name).exists(),
            "namespace left behind"
        );
        assert!(
            !Path::new("/sys/class/net")
                .join(format!("{}0", cluster.name))
                .exists(),
            "veth left behind"
        );
        assert!(
            !cluster.state.path().join("up").exists(),
            "state left behind"
        );
        let ps = Command::new("pgrep")
            .args(["-f", &cluster.state.path().display().to_string()])
            .output()
            .unwrap();
        assert!(
            ps.stdout.is_empty(),
            "processes left behind: {}",
            String::from_utf8_lossy(&ps.stdout)
        );
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
