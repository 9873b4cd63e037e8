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
    // One node first, then a server and an agent.
    for (round, nodes) in [(0, "1"), (1, "2")] {
        let out = cluster.xtask("up", &["--binary", bin.to_str().unwrap(), "--nodes", nodes]);
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
        // The NetworkPolicy denied the intruder and the flows show both
        // verdicts (`up` fails otherwise; the output says so too).
        assert!(
            stdout.contains("denied, as the policy says"),
            "the intruder was denied:\n{stdout}"
        );
        assert!(
            stdout.contains("FORWARDED") && stdout.contains("DROPPED"),
            "skep ctl flows showed both verdicts:\n{stdout}"
        );
        let ready = Command::new("kubectl")
            .args(["--kubeconfig", &kc, "get", "nodes", "--no-headers"])
            .output()
            .unwrap();
        let ready = String::from_utf8_lossy(&ready.stdout);
        assert_eq!(
            ready.lines().filter(|l| l.contains(" Ready ")).count(),
            nodes.parse::<usize>().unwrap(),
            "every node Ready:\n{ready}"
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
            !Path::new("/run/netns")
                .join(format!("{}-1", cluster.name))
                .exists(),
            "agent namespace left behind"
        );
        for pins in [cluster.name.clone(), format!("{}-1", cluster.name)] {
            assert!(
                !Path::new("/sys/fs/bpf").join(&pins).exists(),
                "pinned maps/links left behind in /sys/fs/bpf/{pins}"
            );
            assert!(
                !Path::new("/sys/fs/cgroup/memory")
                    .join(format!("skep-{pins}"))
                    .exists(),
                "cgroups left behind: skep-{pins}"
            );
        }
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
