//! `xdp_node`: XDP on a node's external interface. First the load
//! balancer's external frontends (`xdp_lb`), then the policy early drop
//! (`xdp_policy`) for everything the load balancer did not take.

use aya_ebpf::{macros::xdp, programs::XdpContext};

use crate::{xdp_lb, xdp_policy};

#[xdp]
pub fn xdp_node(ctx: XdpContext) -> u32 {
    if let Some(action) = xdp_lb::handle(&ctx) {
        return action;
    }
    xdp_policy::early_drop(&ctx)
}
