//! skep's kernel programs. One file per attach point (`counter`, `from_pod`,
//! `to_pod`), shared logic in modules (`packet` parsing, `nat` rewrites with
//! checksums, `lb` service lookup and backend selection, `conntrack`,
//! `reject`, `policy` enforcement, `flow` events, `maps`). Built for
//! `bpfel-unknown-none` by `cargo xtask build-ebpf` and embedded in the
//! `skep` binary.
//!
//! Only helpers present in Linux 5.10 are used (no bpf_loop, no atomics with
//! fetch semantics); the flow ring buffer needs 5.8.
#![no_std]
#![no_main]
// `atomic_xadd`: the one atomic add (policy conntrack generation).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod conntrack;
mod counter;
mod flow;
mod from_pod;
mod lb;
mod maps;
mod mesh_connect4;
mod mesh_getpeername4;
mod nat;
mod packet;
mod policy;
mod reject;
mod snat;
mod sock_connect4;
mod sock_getpeername4;
mod sock_lb;
mod sock_recvmsg4;
mod sock_sendmsg4;
mod to_pod;
mod xdp_lb;
mod xdp_node;
mod xdp_pass;
mod xdp_policy;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here, so this only
    // exists to satisfy the compiler.
    loop {}
}
