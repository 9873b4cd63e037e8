//! `mesh_getpeername4`: cgroup/getpeername4 (Linux ≥ 5.8) on a meshed pod's
//! cgroup v2 directory, next to `mesh_connect4`: an app socket the capture
//! sent to the sidecar (its real peer is 127.0.0.1:15001) reports where the
//! app was going, not the sidecar.
//!
//! The record is the one `mesh_connect4` made under the socket's cookie
//! (`SKEP_MESH_ORIG`, a pod address: a ClusterIP is already translated
//! there). For a ClusterIP `mesh_connect4` also leaves the socket LB's
//! reverse record (`SKEP_SOCK_RNAT`, cookie + backend → frontend), so the
//! app sees the ClusterIP:port it dialled, as without the mesh.
//!
//! Only sockets whose peer is the sidecar's outbound listener and whose
//! cookie has a record are touched: the sidecar's own sockets (accepted
//! connections, marked upstream connections) are never recorded, so the
//! sidecar keeps seeing real addresses (it finds the app socket by the
//! accepted connection's real 4-tuple).

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use skep_ebpf_common::{MESH_OUTBOUND_PORT, SockRevKey};

use crate::maps::{MESH_ORIG, SOCK_REVNAT};

const ALLOW: i32 = 1;
/// 127.0.0.1 in network order, as `user_ip4` holds it.
const LOOPBACK_NE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    rewrite(&ctx);
    // getpeername programs cannot refuse; the verdict is ignored.
    ALLOW
}

#[inline(always)]
fn rewrite(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel's bpf_sock_addr for this call; user_ip4/user_port
    // are readable for getpeername4.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    if addr != LOOPBACK_NE || port != MESH_OUTBOUND_PORT.to_be() {
        return;
    }
    // SAFETY: the context pointer is valid for this helper.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    // SAFETY: a prompt copy of a value only mesh_connect4 writes (whole).
    let Some(orig) = (unsafe { MESH_ORIG.get(&cookie) }).copied() else {
        return;
    };
    let key = SockRevKey {
        cookie,
        addr: orig.addr,
        port: orig.port,
        _pad: 0,
    };
    // SAFETY: as above, a prompt copy.
    let (addr, port) = match unsafe { SOCK_REVNAT.get(&key) }.copied() {
        Some(front) => (front.addr, front.port),
        None => (orig.addr, orig.port),
    };
    // SAFETY: user_ip4/user_port are writable for getpeername4 (4-byte
    // stores; the port in network order in the low 16 bits).
    unsafe {
        (*sa).user_ip4 = addr;
        (*sa).user_port = u32::from(port);
    }
}
