//! skep's task runner: `cargo xtask <command>` (the alias is in
//! .cargo/config.toml). Every command it runs is echoed as `$ …` first.

mod bench;
mod build;
mod ci;
mod docker_cluster;
mod ebpf;
mod setup;
mod test;
mod up;
mod up_docker;
mod util;
mod vm_test;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Build, test and benchmark skep"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what is missing (nightly + rust-src, bpf-linker, apt packages,
    /// qemu 10 from bookworm-backports)
    /// and mount bpffs; safe to rerun.
    Setup,
    /// Build the eBPF programs (ebpf/programs) and list their programs and maps.
    BuildEbpf,
    /// build-ebpf, then the release `skep` binary with the object embedded.
    Build,
    /// The full test run, as root: setup, build-ebpf, then every test phase.
    Test,
    /// cargo fmt --check, cargo clippy -D warnings, then `test`.
    Ci,
    /// Boot Debian's Linux 5.10 cloud kernel under qemu and run the
    /// dataplane's tests inside (downloads the kernel; needs `setup`).
    VmTest(vm_test::Args),
    /// Boot a cluster in its own network namespace (builds first) and apply
    /// the demo; prints the KUBECONFIG to export.
    Up(up::UpArgs),
    /// Stop the cluster `up` started and remove everything it created.
    Down(up::Sandbox),
    /// Run a benchmark.
    Bench {
        #[command(subcommand)]
        target: bench::BenchTarget,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Setup => setup::run(),
        Command::BuildEbpf => ebpf::build().map(drop),
        Command::Build => build::run(),
        Command::Test => test::run(),
        Command::Ci => ci::run(),
        Command::VmTest(args) => vm_test::run(&args),
        Command::Bench { target } => bench::run(target),
        Command::Up(args) => up::up(&args),
        Command::Down(sandbox) => up::down(&sandbox),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\nerror: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
