//! Every program in the eBPF object loads and passes the kernel's verifier,
//! whether or not another test attaches it. `cargo xtask vm-test` runs this
//! crate's tests inside Linux 5.10 too, so a program that only verifies on
//! newer kernels fails here, by name, with the verifier's log.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use aya::{Ebpf, programs::Program};

/// Loads one program into the kernel (no attachment).
fn load(program: &mut Program) -> Result<(), String> {
    let result = match program {
        Program::SchedClassifier(p) => p.load(),
        Program::Xdp(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        Program::CgroupSockopt(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        Program::SkSkb(p) => p.load(),
        Program::SocketFilter(p) => p.load(),
        Program::KProbe(p) => p.load(),
        Program::TracePoint(p) => p.load(),
        Program::RawTracePoint(p) => p.load(),
        Program::PerfEvent(p) => p.load(),
        other => {
            return Err(format!(
                "program type {:?} needs load arguments (BTF, a target): add it to {}",
                other.prog_type(),
                file!()
            ));
        }
    };
    result.map_err(|e| e.to_string())
}

#[test]
fn every_program_in_the_object_loads_and_passes_the_verifier() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads BPF programs: run it as root"
    );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let bytes = skep_dataplane::object::bytes()
        .expect("the eBPF object (run `cargo xtask build-ebpf`, or set SKEP_EBPF_OBJECT)");
    let mut ebpf = Ebpf::load(&bytes).expect("create the object's maps");
    let mut loaded = Vec::new();
    let mut failures = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        match load(program) {
            Ok(()) => loaded.push(name.to_owned()),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    loaded.sort();
    println!("loaded on Linux {}: {}", kernel.trim(), loaded.join(", "));
    assert!(
        failures.is_empty(),
        "{} program(s) did not load on Linux {}:\n{}",
        failures.len(),
        kernel.trim(),
        failures.join("\n")
    );
    assert!(!loaded.is_empty(), "the eBPF object holds no program");
}
