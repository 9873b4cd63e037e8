//! `cargo xtask build-ebpf`: builds the kernel programs in `ebpf/programs`
//! for `bpfel-unknown-none` with nightly and bpf-linker, then lists what
//! each resulting ELF object holds.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};

use crate::{
    setup,
    util::{self, Cmd},
};

const TARGET: &str = "bpfel-unknown-none";

/// The object the dataplane embeds (its bin target in ebpf/programs).
const MAIN_OBJECT: &str = "skep-ebpf";

/// Variables the outer cargo/rustup may have set that would make the inner
/// nightly, cross-target build use the wrong compiler, flags or directories.
const INHERITED_ENV: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_RUSTC",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTFLAGS",
];

fn crate_dir() -> PathBuf {
    util::workspace_root().join("ebpf/programs")
}

fn target_dir() -> PathBuf {
    util::workspace_root().join("target/ebpf")
}

/// Where the build leaves the object the dataplane embeds.
pub fn object_path() -> PathBuf {
    target_dir().join(TARGET).join("release").join(MAIN_OBJECT)
}

/// Builds the eBPF programs, prints what the objects contain and returns the
/// path of the object to embed (for `SKEP_EBPF_OBJECT`).
pub fn build() -> Result<PathBuf> {
    preflight()?;
    let mut objects = Vec::new();
    Cmd::rustup_cargo(setup::NIGHTLY)
        .args(["build", "--release", "--target", TARGET, "-Z", "build-std=core", "--target-dir"])
        .arg(target_dir())
        // Cargo's JSON messages name the objects this build produced;
        // compiler diagnostics are still rendered to the terminal.
        .arg("--message-format=json-render-diagnostics")
        .cwd(crate_dir())
        .env_removes(INHERITED_ENV)
        .hint("fix the errors above in ebpf/programs; if the toolchain is incomplete, run `cargo xtask setup`")
        .run_reading_stdout(|line| {
            if let Some(path) = artifact_executable(line)? {
                objects.push(path);
            }
            Ok(())
        })
        .context("building the eBPF programs")?;

    objects.sort();
    objects.dedup();
    for path in &objects {
        let info = inspect(path)?;
        print_object(path, &info)?;
    }
    let Some(main) = objects
        .iter()
        .find(|p| p.file_name() == Some(MAIN_OBJECT.as_ref()))
    else {
        bail!(
            "the eBPF build did not produce {}; does ebpf/programs/Cargo.toml still have the `{MAIN_OBJECT}` bin?",
            object_path().display()
        );
    };
    Ok(main.clone())
}

/// Fails with advice when the nightly toolchain, its rust-src or bpf-linker
/// is missing.
fn preflight() -> Result<()> {
    const FIX: &str = "run `cargo xtask setup`";
    if !setup::nightly_present()? {
        bail!("the nightly toolchain is missing: {FIX}");
    }
    if !setup::rust_src_present() {
        bail!("rust-src for nightly is missing (needed by -Z build-std=core): {FIX}");
    }
    match setup::bpf_linker_version() {
        None => bail!("bpf-linker is missing (or not on PATH): {FIX}"),
        Some(v) if v != setup::BPF_LINKER_VERSION => println!(
            "[ebpf] warning: bpf-linker {v} found; {} is the tested version ({FIX} installs it)",
            setup::BPF_LINKER_VERSION
        ),
        Some(_) => {}
    }
    Ok(())
}

/// The `executable` of a cargo `compiler-artifact` message, if `line` is one.
fn artifact_executable(line: &str) -> Result<Option<PathBuf>> {
    if !line.starts_with('{') {
        return Ok(None);
    }
    let msg: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("parsing cargo message {line}"))?;
    if msg["reason"] != "compiler-artifact" {
        return Ok(None);
    }
    Ok(msg["executable"].as_str().map(PathBuf::from))
}

/// The programs and maps in an eBPF object, each as (ELF section, symbol).
#[derive(Debug, Default)]
pub struct ObjectInfo {
    pub programs: Vec<(String, String)>,
    pub maps: Vec<(String, String)>,
}

/// Reads an eBPF ELF object: programs are function symbols in executable
/// sections other than `.text` (whose section names the program type, as
/// aya reads it), maps are the symbols in `maps` (legacy) or `.maps` (BTF).
pub fn inspect(path: &Path) -> Result<ObjectInfo> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("parsing {} as an ELF object", path.display()))?;
    if file.architecture() != object::Architecture::Bpf {
        bail!(
            "{} is not an eBPF object ({:?})",
            path.display(),
            file.architecture()
        );
    }
    let mut info = ObjectInfo::default();
    for symbol in file.symbols() {
        let Some(index) = symbol.section_index() else {
            continue;
        };
        let name = symbol
            .name()
            .with_context(|| format!("symbol name in {}", path.display()))?;
        if name.is_empty() || matches!(symbol.kind(), SymbolKind::Section | SymbolKind::File) {
            continue;
        }
        let section = file.section_by_index(index)?;
        let section_name = section.name()?;
        if symbol.kind() == SymbolKind::Text
            && section.kind() == SectionKind::Text
            && section_name != ".text"
        {
            info.programs
                .push((section_name.to_owned(), name.to_owned()));
        } else if section_name == "maps" || section_name == ".maps" {
            info.maps.push((section_name.to_owned(), name.to_owned()));
        }
    }
    info.programs.sort();
    info.maps.sort();
    Ok(info)
}

fn print_object(path: &Path, info: &ObjectInfo) -> Result<()> {
    println!(
        "[ebpf] object {}: {}",
        util::display_path(path),
        util::file_size(path)?
    );
    let width = info
        .programs
        .iter()
        .chain(&info.maps)
        .map(|(s, _)| s.len())
        .max()
        .unwrap_or(0);
    println!("  programs ({}):", info.programs.len());
    for (section, name) in &info.programs {
        println!("    {section:<width$}  {name}");
    }
    println!("  maps ({}):", info.maps.len());
    for (section, name) in &info.maps {
        println!("    {section:<width$}  {name}");
    }
    if info.programs.is_empty() {
        println!(
            "[ebpf] warning: {} contains no programs",
            util::display_path(path)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_artifact_messages() {
        let line = r#"{"reason":"compiler-artifact","executable":"/t/skep-ebpf","fresh":true}"#;
        assert_eq!(
            artifact_executable(line).unwrap(),
            Some(PathBuf::from("/t/skep-ebpf"))
        );
        let lib = r#"{"reason":"compiler-artifact","executable":null}"#;
        assert_eq!(artifact_executable(lib).unwrap(), None);
        assert_eq!(
            artifact_executable(r#"{"reason":"build-finished"}"#).unwrap(),
            None
        );
        assert_eq!(artifact_executable("warning: text").unwrap(), None);
    }

    /// Reads the real object when `build-ebpf` has produced it.
    #[test]
    fn inspects_the_built_object() {
        let path = object_path();
        if !path.is_file() {
            eprintln!("skipped: {} not built", path.display());
            return;
        }
        let info = inspect(&path).unwrap();
        assert!(
            info.programs
                .contains(&("classifier".into(), "tc_count".into())),
            "{info:?}"
        );
        assert!(
            info.maps.iter().any(|(_, name)| name == "IFACE_STATS"),
            "{info:?}"
        );
        assert!(
            info.programs.iter().all(|(section, _)| section != ".text"),
            "{info:?}"
        );
    }
}
