//! canary's kernel programs. Each entry point is a thin wrapper over a
//! module that does one job:
//!
//! - `connect`: cgroup connect4/connect6 — VIP:port → subset → endpoint →
//!   rewrite, and a flow record keyed by socket cookie (`flows`).
//! - `peer`: cgroup getpeername4/getpeername6 — show the dialled VIP.
//! - `sockops`: per-connection counters (opened, closed, failed, bytes).
//!
//! Policy (weights to bands, Maglev tables) is computed by the agent and
//! only looked up here.
#![no_std]
#![no_main]

mod connect;
mod flows;
mod maps;
mod peer;
mod sockops;

use aya_ebpf::{
    macros::{cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use canary_common::{FAMILY_V4, FAMILY_V6};

#[cgroup_sock_addr(connect4)]
pub fn canary_connect4(ctx: SockAddrContext) -> i32 {
    connect::on_connect::<FAMILY_V4>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn canary_connect6(ctx: SockAddrContext) -> i32 {
    connect::on_connect::<FAMILY_V6>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn canary_peer4(ctx: SockAddrContext) -> i32 {
    peer::on_getpeername::<FAMILY_V4>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn canary_peer6(ctx: SockAddrContext) -> i32 {
    peer::on_getpeername::<FAMILY_V6>(&ctx)
}

#[sock_ops]
pub fn canary_sockops(ctx: SockOpsContext) -> u32 {
    sockops::on_sock_op(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
