//! sockops: count each connection canary steered against its service,
//! subset and endpoint — opened at ESTABLISHED, closed (with bytes) or
//! failed at CLOSE — in per-CPU counters the agent sums.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockOpsContext,
};
use canary_common::{CounterKey, Counters, FAMILY_V4, FAMILY_V6, Flow, OrigKey, SUBSET_SHIM};

use crate::connect::v4_mapped;
use crate::maps::{COUNTERS, FLOWS, ORIG_DST};

const AF_INET6: u32 = 10;

pub fn on_sock_op(ctx: &SockOpsContext) -> u32 {
    match ctx.op() {
        // The SYN is about to leave: ask for state callbacks, but only for
        // the sockets connect() steered, so other sockets cost nothing more.
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            if flow_of(ctx).is_some() {
                let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            if let Some((_, flow)) = flow_of(ctx) {
                count(&key_of(&flow), |c| c.opened += 1);
                if flow.subset == SUBSET_SHIM {
                    // Before the shim's accept() can return: the client
                    // sends the handshake's last ACK after this callback.
                    let _ = ORIG_DST.insert(&orig_key(ctx), &flow.service, 0);
                }
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            if let Some((cookie, flow)) = flow_of(ctx) {
                let never_established = ctx.arg(0) == BPF_TCP_SYN_SENT;
                // SAFETY: valid context; byte counters are plain reads.
                let (sent, received) =
                    unsafe { ((*ctx.ops).bytes_acked, (*ctx.ops).bytes_received) };
                count(&key_of(&flow), |c| {
                    if never_established {
                        c.failed += 1;
                    } else {
                        c.closed += 1;
                        c.bytes_sent += sent;
                        c.bytes_received += received;
                    }
                });
                let _ = FLOWS.remove(&cookie);
                if flow.subset == SUBSET_SHIM {
                    let _ = ORIG_DST.remove(&orig_key(ctx));
                }
            }
        }
        _ => {}
    }
    1
}

/// The client side of a connection to the shim, as the shim will see it.
fn orig_key(ctx: &SockOpsContext) -> OrigKey {
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let port = (ctx.local_port() as u16).to_be();
    // One 32-bit context load per word: the verifier rejects a copy of
    // the whole array through a derived pointer.
    let ops = ctx.ops;
    let (addr, family) = unsafe {
        if ctx.family() == AF_INET6 {
            let w = |i: usize| core::ptr::read_volatile(core::ptr::addr_of!((*ops).local_ip6[i]));
            let words = [w(0), w(1), w(2), w(3)];
            // A dual-stack client reached the shim's IPv4 listener: the
            // shim sees it as an IPv4 peer.
            match v4_mapped(&words) {
                Some(v4) => ([v4, 0, 0, 0], FAMILY_V4),
                None => (words, FAMILY_V6),
            }
        } else {
            (
                [
                    core::ptr::read_volatile(core::ptr::addr_of!((*ops).local_ip4)),
                    0,
                    0,
                    0,
                ],
                FAMILY_V4,
            )
        }
    };
    OrigKey {
        netns,
        addr,
        port,
        family,
        _pad: [0; 5],
    }
}

fn flow_of(ctx: &SockOpsContext) -> Option<(u64, Flow)> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let flow = unsafe { FLOWS.get(&cookie) }?;
    Some((cookie, *flow))
}

fn key_of(flow: &Flow) -> CounterKey {
    CounterKey {
        service: flow.service,
        backend: flow.backend,
        subset: flow.subset,
    }
}

/// Applies `update` to this CPU's counters for `key`, creating them first.
#[inline(always)]
pub fn count(key: &CounterKey, update: impl FnOnce(&mut Counters)) {
    let ptr = match COUNTERS.get_ptr_mut(key) {
        Some(p) => p,
        None => {
            let _ = COUNTERS.insert(key, &Counters::default(), 0);
            match COUNTERS.get_ptr_mut(key) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: per-CPU value, and BPF programs do not preempt each other on
    // one CPU for these hooks, so this CPU's copy is ours.
    update(unsafe { &mut *ptr });
}
