//! getpeername4 / getpeername6: the application sees the VIP it dialled,
//! never the endpoint canary chose.

use aya_ebpf::{EbpfContext, helpers::bpf_get_socket_cookie, programs::SockAddrContext};
use canary_common::{Backend, FAMILY_V4};

use crate::connect::v6_words;
use crate::flows;

/// getpeername programs must always return 1.
const OK: i32 = 1;

/// Generic over the family for the same reason as `on_connect`: every
/// context access must have a constant offset.
pub fn on_getpeername<const FAMILY: u8>(ctx: &SockAddrContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(flow) = flows::get(cookie) else {
        return OK;
    };
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    // Only translate back when the peer is still the endpoint we chose: a
    // reused cookie or a reconnect elsewhere must show the truth.
    let port = unsafe { core::ptr::read_volatile(&sa.user_port) } as u16;
    if port != flow.backend.port {
        return OK;
    }
    unsafe {
        if FAMILY == FAMILY_V4 {
            if flow.service.family != FAMILY_V4
                || core::ptr::read_volatile(&sa.user_ip4) != flow.backend.addr[0]
            {
                return OK;
            }
            core::ptr::write_volatile(&mut sa.user_ip4, flow.service.addr[0]);
        } else {
            // An IPv4 flow on a dual-stack socket shows as mapped addresses.
            let peer = v6_words(&flow.backend);
            for (i, word) in peer.iter().enumerate() {
                if core::ptr::read_volatile(&sa.user_ip6[i]) != *word {
                    return OK;
                }
            }
            let vip = Backend {
                addr: flow.service.addr,
                port: 0,
                family: flow.service.family,
                _pad: 0,
            };
            let vip = v6_words(&vip);
            for (i, word) in vip.iter().enumerate() {
                core::ptr::write_volatile(&mut sa.user_ip6[i], *word);
            }
        }
        core::ptr::write_volatile(&mut sa.user_port, flow.service.port as u32);
    }
    OK
}
