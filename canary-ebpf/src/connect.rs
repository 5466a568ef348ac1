//! connect4 / connect6: choose the subset and endpoint for a connection to a
//! service VIP and rewrite the destination before the kernel routes it.

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie,
        generated::{bpf_getsockopt, bpf_set_retval, bpf_setsockopt},
    },
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use canary_common::*;

use crate::{
    flows,
    maps::*,
    sockops::{STEERED_MARK, count, flags_at_connect},
};

/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// A VIP whose chosen subset has no endpoint fails `connect()` at once with
/// EHOSTUNREACH ("No route to host"), as Cilium's socket LB does, instead of
/// letting the SYN go to an address nobody owns.
const EHOSTUNREACH: i32 = 113;

/// Generic over the address family so that every family test is resolved
/// at compile time: the verifier rejects a context store through a pointer
/// chosen at run time between `user_ip4` and `user_ip6`.
pub fn on_connect<const FAMILY: u8>(ctx: &SockAddrContext) -> i32 {
    let family = FAMILY;
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let dialled = dialled_addr::<FAMILY>(sa);
    // An IPv4 service dialled through a dual-stack IPv6 socket
    // (::ffff:a.b.c.d, as gRPC and Java clients do) is the IPv4 service.
    let (addr, family) = match v4_mapped(&dialled) {
        Some(v4) if family == FAMILY_V6 => ([v4, 0, 0, 0], FAMILY_V4),
        _ => (dialled, family),
    };
    let service = ServiceKey {
        addr,
        port: sa.user_port as u16,
        family,
        proto: PROTO_TCP,
    };
    let Some(entry) = (unsafe { SERVICES.get(&service) }) else {
        return ALLOW; // not a service: leave the connection alone
    };
    if entry.flags & SERVICE_SHIM != 0 {
        return to_shim::<FAMILY>(ctx, sa, service, entry.shim_port);
    }
    let Some(table) = TABLES.get(entry.table) else {
        return ALLOW;
    };

    let sticky = table.flags & TABLE_HASH_SUBSET != 0;
    let hash = if sticky || any_maglev(table) {
        client_hash::<FAMILY>(ctx, sa)
    } else {
        0
    };
    // One random number serves both picks: its remainder places the point
    // on the subset bands, its quotient (0..=429,496) picks the endpoint,
    // independent of the remainder. A second helper call cost ~7% of
    // connect4. A sticky table draws only if its subset has no Maglev
    // table.
    let roll = (!sticky).then(random);
    let draw = || roll.unwrap_or_else(random) / WEIGHT_SCALE;
    let point = match roll {
        Some(r) => r % WEIGHT_SCALE,
        None => subset_point(hash),
    };
    let Some(subset) = pick_subset(table, point) else {
        return refuse(ctx, &service, MAX_SUBSETS as u32);
    };
    let Some(slot) = table.subsets.get(subset as usize) else {
        return ALLOW;
    };
    if slot.backend_count == 0 {
        return refuse(ctx, &service, subset);
    }
    let pick = if slot.flags & SUBSET_MAGLEV != 0 {
        let key: MaglevKey = entry.table * MAX_SUBSETS as u32 + subset;
        match unsafe { MAGLEV.get(&key) } {
            Some(maglev) => match maglev.slots.get(maglev_slot(hash) as usize) {
                Some(i) => *i as u32,
                None => 0,
            },
            None => draw(),
        }
    } else {
        draw()
    };
    let index = pick % slot.backend_count;
    let Some(backend) = BACKENDS.get(slot.backend_base + index) else {
        return ALLOW;
    };

    rewrite::<FAMILY>(ctx, sa, service, *backend, subset);
    debug!(ctx, "canary: subset {} backend #{}", subset, index);
    ALLOW
}

/// Sends the connection to the L7 shim on the client's own loopback (the
/// agent keeps a listener in every client network namespace).
fn to_shim<const FAMILY: u8>(
    ctx: &SockAddrContext,
    sa: &mut bpf_sock_addr,
    service: ServiceKey,
    port: u16,
) -> i32 {
    let family = FAMILY;
    let addr = if family == FAMILY_V4 {
        [u32::to_be(0x7f00_0001), 0, 0, 0]
    } else {
        [0, 0, 0, u32::to_be(1)]
    };
    let shim = Backend {
        addr,
        port,
        family,
        _pad: 0,
    };
    rewrite::<FAMILY>(ctx, sa, service, shim, SUBSET_SHIM);
    ALLOW
}

/// Points the socket at `backend` and records the choice for
/// getpeername, sockops and the shim.
#[inline(always)]
fn rewrite<const FAMILY: u8>(
    ctx: &SockAddrContext,
    sa: &mut bpf_sock_addr,
    service: ServiceKey,
    backend: Backend,
    subset: u32,
) {
    let family = FAMILY;
    // Full 32-bit stores: the verifier rejects narrower writes here.
    unsafe {
        if family == FAMILY_V4 {
            core::ptr::write_volatile(&mut sa.user_ip4, backend.addr[0]);
        } else {
            let words = v6_words(&backend);
            for i in 0..4 {
                core::ptr::write_volatile(&mut sa.user_ip6[i], words[i]);
            }
        }
        core::ptr::write_volatile(&mut sa.user_port, backend.port as u32);
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let flow = Flow {
        service,
        backend,
        subset,
        state: FLOW_CONNECTING,
    };
    flows::record(cookie, &flow);
    if flags_at_connect() {
        mark_steered(ctx);
    }
}

const SOL_TCP: i32 = 6;
/// `bpf_{get,set}sockopt` option for a TCP socket's sockops callback
/// flags (kernel 6.12+).
const TCP_BPF_SOCK_OPS_CB_FLAGS: i32 = 1008;

/// Marks the socket as steered by canary in its sockops callback flags,
/// which sockops reads without a map lookup (see `sockops::STEERED_MARK`).
/// Flags another program set are kept.
#[inline(always)]
fn mark_steered(ctx: &SockAddrContext) {
    let len = size_of::<i32>() as i32;
    let mut current: i32 = 0;
    // SAFETY: each pointer is to `len` bytes on this program's stack.
    let got = unsafe {
        bpf_getsockopt(
            ctx.as_ptr(),
            SOL_TCP,
            TCP_BPF_SOCK_OPS_CB_FLAGS,
            (&raw mut current).cast(),
            len,
        )
    };
    let mut wanted = if got == 0 { current } else { 0 } | STEERED_MARK;
    let set = unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            SOL_TCP,
            TCP_BPF_SOCK_OPS_CB_FLAGS,
            (&raw mut wanted).cast(),
            len,
        )
    };
    if set != 0
        && let Some(refused) = MARK_REFUSED.get_ptr_mut(0)
    {
        // SAFETY: a map value; a plain store of a flag that only ever
        // goes from 0 to 1.
        unsafe { *refused = 1 };
    }
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (::ffff:a.b.c.d).
#[inline(always)]
pub fn v4_mapped(words: &[u32; 4]) -> Option<u32> {
    (words[0] == 0 && words[1] == 0 && words[2] == u32::to_be(0xffff)).then_some(words[3])
}

/// How an endpoint is written into an IPv6 socket's destination: an IPv4
/// endpoint (of an IPv4 service dialled from a dual-stack socket) mapped.
#[inline(always)]
pub fn v6_words(backend: &Backend) -> [u32; 4] {
    if backend.family == FAMILY_V4 {
        [0, 0, u32::to_be(0xffff), backend.addr[0]]
    } else {
        backend.addr
    }
}

#[inline(always)]
fn random() -> u32 {
    unsafe { bpf_get_prandom_u32() }
}

/// The destination as the application dialled it, in map-key form.
fn dialled_addr<const FAMILY: u8>(sa: &bpf_sock_addr) -> [u32; 4] {
    let family = FAMILY;
    // One 32-bit load per word: the verifier only allows those on user_ip6.
    unsafe {
        if family == FAMILY_V4 {
            [core::ptr::read_volatile(&sa.user_ip4), 0, 0, 0]
        } else {
            [
                core::ptr::read_volatile(&sa.user_ip6[0]),
                core::ptr::read_volatile(&sa.user_ip6[1]),
                core::ptr::read_volatile(&sa.user_ip6[2]),
                core::ptr::read_volatile(&sa.user_ip6[3]),
            ]
        }
    }
}

/// The first subset whose cumulative band contains `point`.
#[inline(always)]
fn pick_subset(table: &RouteTable, point: u32) -> Option<u32> {
    let mut i = 0;
    while i < MAX_SUBSETS {
        if i as u32 >= table.subset_count {
            return None;
        }
        if point < table.subsets[i].upper {
            return Some(i as u32);
        }
        i += 1;
    }
    None
}

#[inline(always)]
fn any_maglev(table: &RouteTable) -> bool {
    let mut i = 0;
    while i < MAX_SUBSETS {
        if table.subsets[i].flags & SUBSET_MAGLEV != 0 {
            return true;
        }
        i += 1;
    }
    false
}

/// Who the client is, for sticky choices.
///
/// At `connect()` an unbound socket has no source address yet (the route
/// lookup that picks it comes later). So: the bound address if the socket
/// has one; otherwise the pod address the agent mapped to the client's
/// network namespace cookie; otherwise the namespace cookie itself. A pod is
/// one network namespace, so every unbound socket of a pod hashes alike.
fn client_hash<const FAMILY: u8>(ctx: &SockAddrContext, sa: &bpf_sock_addr) -> u32 {
    let family = FAMILY;
    // SAFETY: sock_addr programs always see a full socket in `sk`.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let bound = unsafe {
        if family == FAMILY_V4 {
            [core::ptr::read_volatile(&(*sk).src_ip4), 0, 0, 0]
        } else {
            [
                core::ptr::read_volatile(&(*sk).src_ip6[0]),
                core::ptr::read_volatile(&(*sk).src_ip6[1]),
                core::ptr::read_volatile(&(*sk).src_ip6[2]),
                core::ptr::read_volatile(&(*sk).src_ip6[3]),
            ]
        }
    };
    if let Some(v4) = v4_mapped(&bound) {
        return source_hash(&[v4, 0, 0, 0]);
    }
    if bound[0] | bound[1] | bound[2] | bound[3] != 0 {
        return source_hash(&bound);
    }
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if let Some(id) = unsafe { CLIENT_IDS.get(&cookie) } {
        return source_hash(&id.addr);
    }
    source_hash(&[cookie as u32, (cookie >> 32) as u32, 0, 0])
}

/// Fails the connect() with EHOSTUNREACH and counts it.
fn refuse(ctx: &SockAddrContext, service: &ServiceKey, subset: u32) -> i32 {
    let key = CounterKey {
        service: *service,
        backend: Backend::default(),
        subset,
    };
    count(&key, |c| c.no_endpoint += 1);
    unsafe { bpf_set_retval(-EHOSTUNREACH) };
    debug!(ctx, "canary: no endpoint in subset {}", subset);
    DENY
}
