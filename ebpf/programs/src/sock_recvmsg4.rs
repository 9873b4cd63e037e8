//! `sock_recvmsg4`: cgroup/recvmsg4 — replies to unconnected UDP sockets
//! appear to come from the frontend the process sent to.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    crate::sock_lb::reverse(&ctx)
}
