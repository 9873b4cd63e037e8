//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is optional at compile time so that a plain `cargo build` works
//! on a machine without the BPF toolchain; such a binary reports at run time
//! that the object is missing and how to build it.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=SKEP_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let default = manifest.join("../target/ebpf/bpfel-unknown-none/release/skep-ebpf");
    let source = env::var_os("SKEP_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-changed={}", source.display());

    let out = PathBuf::from(env::var("OUT_DIR").unwrap_or_default()).join("skep-ebpf.o");
    let bytes = fs::read(&source).unwrap_or_default();
    if bytes.is_empty() {
        println!(
            "cargo:warning=eBPF object {} not found; the dataplane will need `cargo xtask build-ebpf` (or SKEP_EBPF_OBJECT) at run time",
            source.display()
        );
    }
    if let Err(e) = fs::write(&out, &bytes) {
        panic!("cannot write {}: {e}", out.display());
    }
}
