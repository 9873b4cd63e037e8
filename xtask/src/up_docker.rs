//! `cargo xtask up --docker [--nodes N]`: the cluster's nodes as Docker
//! containers (as kind does) instead of network namespaces; the engine is
//! docker_cluster.rs (shared with control/skep/tests/docker_nodes.rs).
//! `cargo xtask down` removes it too.
//!
//! State lives in `<state dir>-docker` (default target/up-docker): the
//! private dockerd's data, the nodes' data directories (node-<i>, bind
//! mounted into the containers) and the admin kubeconfig in node-0.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    build,
    docker_cluster::{self, Spec},
    setup,
    up::{Sandbox, UpArgs},
    util::{self, Cmd},
};

/// The nodes' /24 on the host's side of the internal docker network.
const SUBNET: [u8; 3] = [10, 98, 0];
/// Remembers `--docker-socket` for `down`.
const SOCKET_FILE: &str = "docker-socket";

fn state_dir(sb: &Sandbox) -> PathBuf {
    let base = sb
        .state_dir
        .clone()
        .unwrap_or_else(|| util::target_dir().join("up"));
    let mut name = base.file_name().unwrap_or_default().to_os_string();
    name.push("-docker");
    base.with_file_name(name)
}

fn spec(sb: &Sandbox, nodes: u32, binary: PathBuf, socket: Option<PathBuf>) -> Spec {
    Spec {
        name: sb.name.clone(),
        nodes,
        binary,
        state_dir: state_dir(sb),
        subnet: SUBNET,
        docker_socket: socket,
    }
}

/// The host keeps `unreachable` routes for the pod and service ranges (as
/// `cargo xtask setup` adds them), so neither can leave by the default
/// route even if something on the host sends there.
fn ensure_unreachable_routes() -> Result<()> {
    for cidr in ["10.42.0.0/16", "10.43.0.0/16"] {
        let out = Command::new("ip")
            .args(["route", "show", cidr])
            .output()
            .context("running ip route (iproute2)")?;
        if !String::from_utf8_lossy(&out.stdout).contains("unreachable") {
            Cmd::new("ip")
                .args(["route", "replace", "unreachable", cidr])
                .run()?;
        }
    }
    Ok(())
}

pub fn up(args: &UpArgs) -> Result<()> {
    util::require_root("the nodes are containers of a dockerd this command starts")?;
    let sb = &args.sandbox;
    let state = state_dir(sb);
    if state.exists() {
        let existing = spec(sb, 0, PathBuf::new(), remembered_socket(&state));
        let running = existing
            .docker()
            .run(&[
                "inspect",
                "-f",
                "{{.State.Running}}",
                &existing.node_name(0),
            ])
            .is_ok_and(|s| s.trim() == "true");
        if running && existing.kubeconfig().exists() {
            println!("[up] the docker cluster is already running; `cargo xtask down` stops it");
            print_footer(&existing);
            return Ok(());
        }
        println!(
            "[up] removing an earlier docker cluster ({})",
            state.display()
        );
        down(sb)?;
    }
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => {
            setup::run().context("setup (before up)")?;
            build::run().context("building skep (before up)")?;
            util::target_dir().join("release/skep")
        }
    };
    if !binary.is_file() {
        bail!(
            "{} does not exist; build it first (`cargo xtask build`)",
            binary.display()
        );
    }
    let spec = spec(sb, args.nodes, binary, args.docker_socket.clone());
    ensure_unreachable_routes()?;
    fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    if let Some(s) = &args.docker_socket {
        fs::write(state.join(SOCKET_FILE), s.to_string_lossy().as_bytes())
            .context("remembering the docker socket")?;
    }
    let result = start(&spec);
    if let Err(e) = &result {
        eprintln!("[up] failed: {e:#}\n[up] `cargo xtask down` removes what was made");
    }
    result?;
    let kc = spec.kubeconfig();
    Cmd::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kc)
        .args(["get", "nodes", "-o", "wide"])
        .run()?;
    if !args.no_demo {
        crate::up::run_demo(&kc, &spec.binary)?;
    }
    print_footer(&spec);
    Ok(())
}

fn print_footer(spec: &Spec) {
    let kc = spec.kubeconfig();
    println!(
        "\n# nodes: containers on the internal docker network {} (API {}); a node's log: docker -H unix://{} logs {}",
        spec.name,
        spec.api_url(),
        spec.docker().socket.display(),
        spec.node_name(0)
    );
    println!(
        "export KUBECONFIG={}",
        fs::canonicalize(&kc).unwrap_or(kc).display()
    );
    println!("# stop and remove everything: cargo xtask down");
}

fn remembered_socket(state: &Path) -> Option<PathBuf> {
    fs::read_to_string(state.join(SOCKET_FILE))
        .ok()
        .map(|s| PathBuf::from(s.trim()))
}

fn start(spec: &Spec) -> Result<()> {
    println!(
        "[up] starting {} (data in {})",
        if spec.docker_socket.is_some() {
            "on the given Docker daemon"
        } else {
            "a private dockerd"
        },
        spec.state_dir.display()
    );
    let docker = docker_cluster::start_dockerd(spec)?;
    println!(
        "[up] building the node image {} with docker import",
        spec.image()
    );
    let size = docker_cluster::build_image(spec, &docker)?;
    println!(
        "[up] node image {}: rootfs tarball {} (skep binary {}, plus its shared libraries and busybox)",
        spec.image(),
        util::human_size(size),
        util::file_size(&spec.binary)?
    );
    println!(
        "[up] internal network {} ({}.{}.{}.0/24), {} node container(s)",
        spec.name, spec.subnet[0], spec.subnet[1], spec.subnet[2], spec.nodes
    );
    docker_cluster::start_nodes(spec, &docker)?;
    println!("[up] all nodes Ready");
    Ok(())
}

/// Removes the docker cluster of `up --docker`, if there is one.
pub fn down(sb: &Sandbox) -> Result<()> {
    let state = state_dir(sb);
    if !state.exists() {
        return Ok(());
    }
    util::require_root("removing the docker cluster needs root")?;
    let spec = spec(sb, 0, PathBuf::new(), remembered_socket(&state));
    docker_cluster::destroy(&spec)?;
    println!(
        "[down] removed the docker cluster ({}): containers, network {}, image {}, {}{}",
        spec.name,
        spec.name,
        spec.image(),
        if spec.docker_socket.is_some() {
            ""
        } else {
            "the private dockerd, "
        },
        state.display()
    );
    Ok(())
}
