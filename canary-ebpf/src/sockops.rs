//! sockops: count each connection canary steered against its service,
//! subset and endpoint — opened at ESTABLISHED, closed (with bytes) or
//! failed at CLOSE — in per-CPU counters the agent sums.
//!
//! The kernel calls this program several times for every TCP socket in
//! the cgroup, steered or not, so an unsteered socket must cost no map
//! lookup. On Linux 6.12+ connect4 marks the sockets it steers in their
//! callback flags (`STEERED_MARK`); the connect callback here turns that
//! into state callbacks, and ESTABLISHED knows a steered socket by those.
//! Before 6.12 (or if the kernel refuses the mark) the connect callback
//! looks each socket up instead.

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockOpsContext,
};
use canary_common::{
    CounterKey, Counters, FAMILY_V4, FAMILY_V6, Flow, OrigKey, SUBSET_SHIM,
    tcp::payload_at_tcp_close,
};

use crate::connect::v4_mapped;
use crate::flows;
use crate::maps::{COUNTERS, MARK_REFUSED, ORIG_DST};

const AF_INET6: u32 = 10;

const STATE_CB_FLAG: i32 = BPF_SOCK_OPS_STATE_CB_FLAG as i32;

/// What connect4 sets on a socket it steered. The RTO flag, because it
/// costs nothing on a healthy connection (its callback only comes on a
/// retransmission timeout). State callbacks would mark as well, but asked
/// for at connect4 they add one callback (CLOSE → SYN_SENT) to every
/// steered connection; the connect callback comes just after that change.
pub const STEERED_MARK: i32 = BPF_SOCK_OPS_RTO_CB_FLAG as i32;

/// 1 when connect4 can set a socket's callback flags itself
/// (`TCP_BPF_SOCK_OPS_CB_FLAGS`, kernel 6.12+); the agent sets it at load.
/// On older kernels the connect callback below looks the socket up.
#[unsafe(no_mangle)]
static CB_FLAGS_AT_CONNECT: Global<u8> = Global::new(0);

#[inline(always)]
pub fn flags_at_connect() -> bool {
    CB_FLAGS_AT_CONNECT.load() != 0
}

/// A kernel that claimed 6.12 but refused the mark: look sockets up.
#[inline(always)]
fn mark_refused() -> bool {
    MARK_REFUSED.get(0).is_some_and(|v| *v != 0)
}

pub fn on_sock_op(ctx: &SockOpsContext) -> u32 {
    match ctx.op() {
        // The SYN is about to leave: ask for state callbacks (for the
        // close, or a connect that fails), but only for steered sockets,
        // and note that their flow records will now be freed at CLOSE.
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let flags = ctx.cb_flags() as i32;
            let marked = flags_at_connect() && !mark_refused();
            if marked && flags & STEERED_MARK == 0 {
                return 1; // not steered: no cookie, no lookup
            }
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if marked || flows::get(cookie).is_some() {
                let _ = ctx.set_cb_flags(flags | STATE_CB_FLAG);
                flows::entered_tcp(cookie);
            }
        }
        // Not steered (no state callbacks asked for): nothing to look up.
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB if ctx.cb_flags() & BPF_SOCK_OPS_STATE_CB_FLAG != 0 => {
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
                let (acked, received) =
                    unsafe { ((*ctx.ops).bytes_acked, (*ctx.ops).bytes_received) };
                // TCP's counters include the SYN and FINs; Istio's are payload.
                let (sent, received) = payload_at_tcp_close(ctx.arg(0), acked, received);
                count(&key_of(&flow), |c| {
                    if never_established {
                        c.failed += 1;
                    } else {
                        c.closed += 1;
                        c.bytes_sent += sent;
                        c.bytes_received += received;
                    }
                });
                flows::forget(cookie);
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
    let flow = flows::get(cookie)?;
    Some((cookie, flow))
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
