//! `cargo xtask build`: the eBPF programs, then the `skep` binary with the
//! object embedded.

use anyhow::{Context, Result, bail};

use crate::{
    ebpf,
    util::{self, Cmd},
};

pub fn run() -> Result<()> {
    let object = ebpf::build()?;
    Cmd::cargo()
        .args(["build", "--release", "-p", "skep"])
        .env("SKEP_EBPF_OBJECT", &object)
        .cwd(util::workspace_root())
        .hint("fix the compile errors above")
        .run()
        .context("building the skep binary")?;
    let binary = util::target_dir().join("release/skep");
    if !binary.is_file() {
        bail!(
            "cargo reported success but {} does not exist",
            binary.display()
        );
    }
    println!(
        "[build] binary {}: {}",
        util::display_path(&binary),
        util::file_size(&binary)?
    );
    Ok(())
}
