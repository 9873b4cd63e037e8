//! `sock_sendmsg4`: cgroup/sendmsg4 — unconnected UDP datagrams to a
//! frontend go straight to a backend.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    crate::sock_lb::forward(&ctx)
}
