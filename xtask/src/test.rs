//! `cargo xtask test`: the one test command (CI runs exactly this, as root,
//! on a fresh clone). Prerequisites (setup, the eBPF build) stop the run when
//! they fail; after them every test phase runs, even when an earlier one
//! failed, and the summary names the ones that failed.
//!
//! To add a phase (e.g. python client tests), write a
//! `fn(&TestEnv) -> Result<()>` and append it to [`PHASES`].

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    ebpf, setup,
    util::{self, Cmd},
    vm_test,
};

/// What the phases get from the prerequisites.
#[derive(Debug)]
pub struct TestEnv {
    /// The eBPF object built by `build-ebpf`, for `SKEP_EBPF_OBJECT`.
    pub ebpf_object: PathBuf,
}

/// One step of `cargo xtask test`.
#[derive(Debug)]
pub struct Phase {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&TestEnv) -> Result<()>,
}

/// The test phases, in the order they run.
pub const PHASES: &[Phase] = &[
    Phase {
        name: "cargo-test",
        about: "cargo test --workspace (the dataplane tests load the real eBPF object)",
        run: cargo_test,
    },
    Phase {
        name: "vm-test",
        about: "the dataplane's tests inside Linux 5.10 under qemu (cargo xtask vm-test)",
        run: vm_test::phase,
    },
];

pub fn run() -> Result<()> {
    util::require_root(
        "the tests create network namespaces and load BPF programs (and setup installs apt packages); rerun with sudo or in a root shell",
    )?;
    report_disk();
    setup::run().context("setup (before the tests)")?;
    let ebpf_object = ebpf::build()?;
    let env = TestEnv { ebpf_object };

    let mut results: Vec<(&Phase, Duration, Option<anyhow::Error>)> = Vec::new();
    for phase in PHASES {
        println!("\n[test] ── phase {}: {}", phase.name, phase.about);
        let start = Instant::now();
        let outcome = (phase.run)(&env).err();
        if let Some(err) = &outcome {
            eprintln!("[test] phase {} failed: {err:#}", phase.name);
        }
        results.push((phase, start.elapsed(), outcome));
    }

    println!("\n[test] summary:");
    let width = PHASES.iter().map(|p| p.name.len()).max().unwrap_or(0);
    for (phase, elapsed, outcome) in &results {
        let verdict = if outcome.is_some() { "FAILED" } else { "ok" };
        println!(
            "[test]   {:<width$}  {verdict:<6}  {:.1}s",
            phase.name,
            elapsed.as_secs_f64()
        );
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, _, e)| e.is_some())
        .map(|(p, _, _)| p.name)
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} test phases failed: {}",
            failed.len(),
            results.len(),
            failed.join(", ")
        );
    }
    println!("[test] all {} phases passed", results.len());
    Ok(())
}

/// What a fresh `cargo xtask test` writes under target/ (debug build of the
/// workspace and its tests, the static VM build, the kernel download), with
/// a margin: 3.0 GB measured on a fresh clone on 2026-12-04 (see the note
/// in Cargo.toml).
const DISK_NEEDED: u64 = 5 << 30;

/// Says up front when the disk looks too small, so that a run that later
/// dies of ENOSPC points at the cause at once.
fn report_disk() {
    let target = util::target_dir();
    let probe = if target.exists() {
        target.as_path()
    } else {
        util::workspace_root()
    };
    match util::free_disk_bytes(probe) {
        Some(free) if free < DISK_NEEDED => eprintln!(
            "[test] warning: only {:.1} GiB free under {}; a fresh run needs about {} GiB (cargo will fail with 'No space left on device')",
            free as f64 / f64::from(1u32 << 30),
            probe.display(),
            DISK_NEEDED >> 30
        ),
        Some(free) => println!(
            "[test] {:.1} GiB free under {}",
            free as f64 / f64::from(1u32 << 30),
            probe.display()
        ),
        None => {}
    }
}

/// `cargo test --workspace --no-fail-fast`, with the real eBPF object.
fn cargo_test(env: &TestEnv) -> Result<()> {
    Cmd::cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .env("SKEP_EBPF_OBJECT", &env.ebpf_object)
        .env("RUST_BACKTRACE", "1")
        // A one-shot full build gains nothing from incremental caches, and
        // they would double the disk the build takes.
        .env("CARGO_INCREMENTAL", "0")
        .cwd(util::workspace_root())
        .hint("see the failing tests above; rerun one with `cargo test -p <crate> <name>` (as root, with SKEP_EBPF_OBJECT set)")
        .run()
}
