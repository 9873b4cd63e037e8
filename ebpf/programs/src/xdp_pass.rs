//! `xdp_pass`: passes every packet. A veth only accepts frames sent by
//! XDP (XDP_TX, redirect) from its peer when it runs an XDP program itself
//! (Linux < 5.13 always; later kernels unless GRO is on), so this goes on
//! the far side of veths that `xdp_node` transmits on.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
