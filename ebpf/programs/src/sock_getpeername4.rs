//! `sock_getpeername4`: cgroup/getpeername4 (Linux ≥ 5.8) — a connected
//! socket reports the frontend, not the backend, as its peer.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    crate::sock_lb::reverse(&ctx)
}
