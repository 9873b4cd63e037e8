//! Socket-level load balancing for host processes (and hostNetwork pods):
//! cgroup sock_addr hooks rewrite the destination of connect()/sendmsg()
//! from a frontend to a backend before any packet exists, so these sockets
//! never need per-packet NAT. What each socket was rewritten to is kept in
//! `SOCK_REVNAT` (by socket cookie) so recvmsg() and getpeername() can show
//! the frontend again.
//!
//! ClientIP affinity does not apply here (the source is not chosen yet);
//! frontends without backends are refused (the syscall fails with EPERM).

use aya_ebpf::{
    helpers::generated::{bpf_get_prandom_u32, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use skep_ebpf_common::{BACKEND_F_TERMINATING, LbCounter, ServiceKey, SockRevKey, SockRevValue};

use crate::{
    lb,
    maps::{CONFIG, MAGLEV, SOCK_REVNAT, count},
};

/// Verdicts of sock_addr programs.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

/// connect4/sendmsg4: frontend → backend.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        return ALLOW;
    };
    if cfg.ready == 0 || cfg.maglev_size == 0 {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the kernel's bpf_sock_addr for this call; these fields are
    // readable for connect4/sendmsg4.
    let (addr, port, proto) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol) };
    let key = ServiceKey {
        addr,
        port,
        proto: proto as u8,
        _pad: 0,
    };
    let Some(svc) = lb::lookup_key(&key) else {
        return ALLOW;
    };
    if svc.backend_count == 0 {
        count(LbCounter::SockRefused);
        return DENY;
    }
    // SAFETY: plain helper call.
    let slot = unsafe { bpf_get_prandom_u32() } % cfg.maglev_size;
    let Some(&id) = MAGLEV.get(svc.id.wrapping_mul(cfg.maglev_size).wrapping_add(slot)) else {
        return ALLOW;
    };
    let Some(b) = lb::backend(id) else {
        count(LbCounter::SockRefused);
        return DENY;
    };
    if b.service_id != svc.id || b.flags & BACKEND_F_TERMINATING != 0 {
        count(LbCounter::SockRefused);
        return DENY;
    }
    // SAFETY: the context pointer is valid for this helper.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let rkey = SockRevKey {
        cookie,
        addr: b.addr,
        port: b.port,
        _pad: 0,
    };
    let rval = SockRevValue {
        addr,
        port,
        _pad: 0,
    };
    // Without the record only getpeername/recvmsg show the backend.
    let _ = SOCK_REVNAT.insert(&rkey, &rval, 0);
    // SAFETY: user_ip4/user_port are writable for these hooks (4-byte
    // stores; the port is in network order in the low 16 bits).
    unsafe {
        (*sa).user_ip4 = b.addr;
        (*sa).user_port = u32::from(b.port);
    }
    count(LbCounter::SockLb);
    ALLOW
}

/// recvmsg4/getpeername4: backend → frontend, for sockets `forward` rewrote.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as above; readable for recvmsg4/getpeername4.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    // SAFETY: the context pointer is valid for this helper.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let key = SockRevKey {
        cookie,
        addr,
        port,
        _pad: 0,
    };
    // SAFETY: a prompt copy of a value only this program type writes whole.
    if let Some(v) = unsafe { SOCK_REVNAT.get(&key) }.copied() {
        // SAFETY: writable for these hooks, as above.
        unsafe {
            (*sa).user_ip4 = v.addr;
            (*sa).user_port = u32::from(v.port);
        }
    }
    ALLOW
}
