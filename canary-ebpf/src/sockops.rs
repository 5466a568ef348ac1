//! sockops: count each connection canary steered against its service,
//! subset and endpoint — opened at ESTABLISHED, closed (with bytes) or
//! failed at CLOSE — in per-CPU counters the agent sums.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    helpers::bpf_get_socket_cookie,
    programs::SockOpsContext,
};
use canary_common::{CounterKey, Counters, Flow};

use crate::maps::{COUNTERS, FLOWS};

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
            }
        }
        _ => {}
    }
    1
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
