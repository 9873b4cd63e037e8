//! `mesh_connect4`: cgroup/connect4 on a meshed pod's cgroup v2 directory
//! ([mesh] outbound capture, instead of iptables REDIRECT).
//!
//! An app's TCP connect() to a non-loopback destination is rewritten to the
//! sidecar's outbound listener 127.0.0.1:15001 before any packet exists,
//! and where it was going is recorded in `SKEP_MESH_ORIG` under the app
//! socket's cookie. The sidecar finds that cookie from the accepted
//! connection's 4-tuple (sock_diag reports the peer socket's cookie) and
//! reads the map. Keying by cookie needs neither a sock_ops program nor a
//! netns identifier (pods' loopback tuples repeat across namespaces, and
//! `bpf_get_netns_cookie` is not available to sock_ops on 5.10).
//!
//! Exempt: the sidecar's own sockets (SO_MARK 0x5ce9, read from
//! `ctx->sk->mark`, readable by sock_addr programs since 5.3, so 5.10 has
//! it; a uid exemption would also spare the app when both run as root),
//! UDP (pod DNS and everything else that is not TCP), loopback, and the
//! sidecar's ports on any address.
//!
//! Services: cgroup programs of a descendant run before the root's, and in
//! a cluster the ClusterIP is otherwise translated per packet by from_pod,
//! after the rewrite here. So the frontend is resolved here (random Maglev
//! slot, like the socket LB) and the backend pod's address is recorded: the
//! sidecar then knows the real peer and whether it is meshed. A frontend
//! without a usable backend is recorded as is (the sidecar's connect is
//! refused by the LB, which the app sees as a closed connection).

use aya_ebpf::{
    helpers::generated::{bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use skep_ebpf_common::{
    BACKEND_F_TERMINATING, IPPROTO_TCP, MESH_ADMIN_PORT, MESH_INBOUND_PORT, MESH_OUTBOUND_PORT,
    MESH_SIDECAR_MARK, MeshOrigDst, ServiceKey,
};
use skep_ebpf_common::{SockRevKey, SockRevValue};

use crate::maps::SOCK_REVNAT;
use crate::{
    lb,
    maps::{CONFIG, MAGLEV, MESH_ORIG},
};

const ALLOW: i32 = 1;
/// 127.0.0.1 in network order, as `user_ip4` holds it.
const LOOPBACK_NE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    capture(&ctx);
    // Never refuse: a failed capture leaves the connect as the app made it.
    ALLOW
}

#[inline(always)]
fn capture(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel's bpf_sock_addr for this call; these fields are
    // readable for connect4, and `sk` is a non-NULL full socket there.
    let (addr, port_ne, proto, mark) = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        (
            (*sa).user_ip4,
            (*sa).user_port as u16,
            (*sa).protocol,
            (*sk).mark,
        )
    };
    if proto != u32::from(IPPROTO_TCP) || mark == MESH_SIDECAR_MARK {
        return;
    }
    // First octet 127 (network order: the lowest byte in memory).
    if addr.to_ne_bytes()[0] == 127 || addr == 0 {
        return;
    }
    let port = u16::from_be(port_ne);
    if port == MESH_OUTBOUND_PORT || port == MESH_INBOUND_PORT || port == MESH_ADMIN_PORT {
        return;
    }
    let (orig_addr, orig_port) = translate(addr, port_ne).unwrap_or((addr, port_ne));
    // SAFETY: the context pointer is valid for this helper.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let value = MeshOrigDst {
        addr: orig_addr,
        port: orig_port,
        _pad: 0,
    };
    if MESH_ORIG.insert(&cookie, &value, 0).is_err() {
        // Without the record the sidecar could not forward: leave the
        // connection uncaptured rather than broken.
        return;
    }
    // A translated ClusterIP: the socket LB's reverse record, so the app's
    // getpeername() shows the frontend it dialled (mesh_getpeername4).
    if orig_addr != addr || orig_port != port_ne {
        let rkey = SockRevKey {
            cookie,
            addr: orig_addr,
            port: orig_port,
            _pad: 0,
        };
        let rval = SockRevValue {
            addr,
            port: port_ne,
            _pad: 0,
        };
        // Without it getpeername() shows the backend pod: acceptable.
        let _ = SOCK_REVNAT.insert(&rkey, &rval, 0);
    }
    // SAFETY: user_ip4/user_port are writable for connect4 (4-byte stores;
    // the port is in network order in the low 16 bits).
    unsafe {
        (*sa).user_ip4 = LOOPBACK_NE;
        (*sa).user_port = u32::from(MESH_OUTBOUND_PORT.to_be());
    }
}

/// A frontend's backend (address, port), network order; `None` for a
/// destination that is not a frontend or has no usable backend.
#[inline(always)]
fn translate(addr: u32, port: u16) -> Option<(u32, u16)> {
    let cfg = CONFIG.get(0)?;
    if cfg.ready == 0 || cfg.maglev_size == 0 {
        return None;
    }
    let svc = lb::lookup_key(&ServiceKey {
        addr,
        port,
        proto: IPPROTO_TCP,
        _pad: 0,
    })?;
    if svc.backend_count == 0 {
        return None;
    }
    // SAFETY: plain helper call.
    let slot = unsafe { bpf_get_prandom_u32() } % cfg.maglev_size;
    let id = *MAGLEV.get(svc.id.wrapping_mul(cfg.maglev_size).wrapping_add(slot))?;
    let b = lb::backend(id)?;
    if b.service_id != svc.id || b.flags & BACKEND_F_TERMINATING != 0 {
        return None;
    }
    Some((b.addr, b.port))
}

/// to_pod's strict-mode check: a new TCP connection (SYN without ACK) to a
/// strict meshed pod on any port but the sidecar's inbound port is refused,
/// so plaintext from unmeshed clients never reaches the app. Packets from
/// the node's own stack (`ingress_ifindex` 0: kubelet probes) pass, and
/// replies of the pod's own connections never carry a lone SYN.
#[inline(always)]
pub fn strict_refuses(ctx: &aya_ebpf::programs::TcContext, p: &crate::packet::Packet) -> bool {
    if p.proto != IPPROTO_TCP
        || p.tcp_flags & crate::packet::TCP_SYN == 0
        || p.tcp_flags & crate::packet::TCP_ACK != 0
        || p.dport == MESH_INBOUND_PORT.to_be()
    {
        return false;
    }
    // SAFETY: a prompt copy of a userspace-written value.
    let Some(pod) = (unsafe { crate::maps::MESH_PODS.get(&p.daddr) }).copied() else {
        return false;
    };
    if pod.flags & skep_ebpf_common::MESH_POD_F_STRICT == 0 {
        return false;
    }
    // SAFETY: the skb of this TC call; the field is readable.
    let from_host = unsafe { (*ctx.skb.skb).ingress_ifindex } == 0;
    !from_host
}
