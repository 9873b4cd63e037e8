//! skep's kernel programs. One module per concern; each program's attach
//! point is named in its module. Built for `bpfel-unknown-none` by
//! `cargo xtask build-ebpf` and embedded in the `skep` binary.
#![no_std]
#![no_main]

mod counter;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here, so this only
    // exists to satisfy the compiler.
    loop {}
}
