//! The `skep` binary: every role of a skep cluster in one executable.

mod agent;
mod bootstrap;
mod ctl;
mod ctl_connectivity;
// TODO(lead): drop the allow once ctl.rs dispatches `ctl flows`.
mod ctl_flows;
// TODO(lead): drop the allow once ctl.rs dispatches `ctl policy`.
mod ctl_mesh;
mod ctl_policy;
mod ctl_status;
mod dns_check;
mod kube_dns;
mod manifests;
mod mesh_ca;
mod server;
mod storage_defaults;
mod tools;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "skep",
    version,
    about = "A Kubernetes distribution in one binary, with an eBPF dataplane"
)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `info,skep_store=debug`.
    /// hickory-server logs every DNS query at info; keep that off by default.
    #[arg(
        long,
        global = true,
        env = "SKEP_LOG",
        default_value = "info,hickory_server=warn"
    )]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Control plane: API server over the store (SQLite or etcd).
    // Boxed: the server's flags make it far larger than the other variants.
    Server(Box<server::ServerArgs>),
    /// A node joined to a server: registration and heartbeats (pods to come).
    Agent(agent::AgentArgs),
    /// Command-line client: get, apply, delete, status.
    Ctl(ctl::CtlArgs),
    /// The mTLS proxy injected into meshed pods.
    Sidecar(skep_mesh_sidecar::cli::SidecarArgs),
    /// Report what this binary carries.
    Check,
    /// Test workloads: echo servers and probes (skep's agnhost).
    #[command(subcommand)]
    Tools(tools::Tools),
}

fn main() -> Result<()> {
    // The process runtime's hidden helpers (`__shim DIR`, `__exec --pid …`)
    // fork, so they run single-threaded: before any runtime or logging.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("__shim") => std::process::exit(skep_kubelet::runtime::process::shim_main(&args[2..])),
        Some("__exec") => std::process::exit(skep_kubelet::runtime::process::exec_main(&args[2..])),
        _ => {}
    }
    // Before any thread starts (see the function).
    skep_apiserver::heap::limit_arenas();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log)?)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Check => check(),
        Command::Tools(t) => tools::run(t),
        Command::Server(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(server::run(*args))
        }
        Command::Agent(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(agent::run(args))
        }
        Command::Ctl(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(ctl::run(args))
        }
        Command::Sidecar(args) => {
            // One thread: at a pod's request rates cross-thread wake-ups
            // cost more latency than a second core saves (issue 9).
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime
                .block_on(skep_mesh_sidecar::cli::run(args))
                .map_err(|e| anyhow::anyhow!(e))
        }
    }
}

fn check() -> Result<()> {
    println!("skep {}", env!("CARGO_PKG_VERSION"));
    println!(
        "eBPF object embedded: {}",
        if skep_dataplane::object::is_embedded() {
            "yes"
        } else {
            "no (run `cargo xtask build`)"
        }
    );
    Ok(())
}
