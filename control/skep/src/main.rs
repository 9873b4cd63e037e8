//! The `skep` binary: every role of a skep cluster in one executable.

mod server;
mod tools;

use anyhow::{Result, bail};
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
    #[arg(long, global = true, env = "SKEP_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Control plane: API server over the store (SQLite or etcd).
    Server(server::ServerArgs),
    /// A node: kubelet, dataplane and flow observer, joined to a server.
    Agent(AgentArgs),
    /// Command-line client: apply, get, flows, svc, policy, bpf, status.
    Ctl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The mTLS proxy injected into meshed pods.
    Sidecar,
    /// Report what this binary carries.
    Check,
    /// Test workloads: echo servers and probes (skep's agnhost).
    #[command(subcommand)]
    Tools(tools::Tools),
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    /// URL of the server's API.
    #[arg(long, env = "SKEP_SERVER")]
    server: Option<String>,
    /// Node join token (the server writes it to DATA_DIR/node-token).
    #[arg(long, env = "SKEP_TOKEN")]
    token: Option<String>,
}

fn main() -> Result<()> {
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
            runtime.block_on(server::run(args))
        }
        Command::Agent(_) => unavailable("agent", "[node]"),
        Command::Ctl { .. } => unavailable("ctl", "[api]"),
        Command::Sidecar => unavailable("sidecar", "[mesh]"),
    }
}

/// Roles built by later issues say so plainly instead of pretending.
fn unavailable(role: &str, issue: &str) -> Result<()> {
    bail!("`skep {role}` is not yet available in this build (it arrives with the {issue} issue)")
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
