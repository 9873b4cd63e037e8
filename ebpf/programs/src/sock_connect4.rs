//! `sock_connect4`: cgroup/connect4 — TCP and connected UDP sockets of
//! processes in the cgroup connect straight to a backend.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    crate::sock_lb::forward(&ctx)
}
