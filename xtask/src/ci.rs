//! `cargo xtask ci`: formatting, lints, then the full test run.

use anyhow::{Context, Result};

use crate::{
    test,
    util::{self, Cmd},
};

pub fn run() -> Result<()> {
    let root = util::workspace_root();
    Cmd::cargo()
        .args(["fmt", "--all", "--check"])
        .cwd(root)
        .hint("run `cargo fmt --all` and commit the result")
        .run()
        .context("checking formatting")?;
    Cmd::cargo()
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .cwd(root)
        .hint("fix the lints above (`cargo clippy --workspace --all-targets`)")
        .run()
        .context("running clippy")?;
    test::run()
}
