//! getpeername4 / getpeername6: the application sees the VIP it dialled,
//! never the endpoint canary chose.

use aya_ebpf::{EbpfContext, helpers::bpf_get_socket_cookie, programs::SockAddrContext};
use canary_common::FAMILY_V4;

use crate::maps::FLOWS;

/// getpeername programs must always return 1.
const OK: i32 = 1;

pub fn on_getpeername(ctx: &SockAddrContext, family: u8) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(flow) = (unsafe { FLOWS.get(&cookie) }) else {
        return OK;
    };
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    // Only translate back when the peer is still the endpoint we chose: a
    // reused cookie or a reconnect elsewhere must show the truth.
    let port = unsafe { core::ptr::read_volatile(&sa.user_port) } as u16;
    if port != flow.backend.port || flow.service.family != family {
        return OK;
    }
    unsafe {
        if family == FAMILY_V4 {
            if core::ptr::read_volatile(&sa.user_ip4) != flow.backend.addr[0] {
                return OK;
            }
            core::ptr::write_volatile(&mut sa.user_ip4, flow.service.addr[0]);
        } else {
            for i in 0..4 {
                if core::ptr::read_volatile(&sa.user_ip6[i]) != flow.backend.addr[i] {
                    return OK;
                }
            }
            for i in 0..4 {
                core::ptr::write_volatile(&mut sa.user_ip6[i], flow.service.addr[i]);
            }
        }
        core::ptr::write_volatile(&mut sa.user_port, flow.service.port as u32);
    }
    OK
}
