//! Each steered socket's flow record, by socket cookie: written by
//! connect4, read by getpeername and sockops, freed at TCP CLOSE.
//!
//! Socket cookies come from per-CPU runs of consecutive numbers, so the
//! flow of cookie `c` lives in slot `c % FLOW_SLOT_COUNT` of an array: the
//! connections a client opens one after another land in neighbouring slots
//! (64-byte lines, warm in cache and TLB). A hash map keyed by cookie
//! scatters them over a 4 MiB bucket array instead, and the cold bucket
//! and LRU node each `connect()` touched cost about a third of connect4.
//!
//! A slot still held by another live socket (one that has outlived
//! `FLOW_SLOT_COUNT` newer cookies) sends the flow to the overflow hash
//! `FLOWS`, an LRU. A slot whose `connect()` failed before the handshake
//! is never freed by a state callback; connect4 takes it over once it is
//! clearly abandoned (`canary_common::slot_is_ours`).

use aya_ebpf::Global;
use canary_common::{FLOW_IN_TCP, Flow, FlowSlot, MAX_FLOWS, slot_is_ours};

use crate::maps::{FLOW_EPOCH, FLOW_SLOTS, FLOWS};

/// Slots in use, `1..=MAX_FLOWS`; the agent lowers it only for tests of
/// the overflow map.
#[unsafe(no_mangle)]
static FLOW_SLOT_COUNT: Global<u32> = Global::new(MAX_FLOWS);

#[inline(always)]
fn slot_of(cookie: u64) -> Option<*mut FlowSlot> {
    let count = FLOW_SLOT_COUNT.load().max(1) as u64;
    FLOW_SLOTS.get_ptr_mut((cookie % count) as u32)
}

/// Records `flow` for socket `cookie` (connect4).
#[inline(always)]
pub fn record(cookie: u64, flow: &Flow) {
    if let Some(slot) = slot_of(cookie) {
        let epoch = FLOW_EPOCH.get(0).copied().unwrap_or(0);
        // SAFETY: a map value. Another CPU writes this slot only for a
        // cookie equal to ours modulo the slot count, at the same instant:
        // the cookie word is written last, and readers check it.
        unsafe {
            if slot_is_ours(&*slot, cookie, epoch) {
                (*slot).flow = *flow;
                (*slot).claimed_epoch = epoch;
                core::ptr::write_volatile(&raw mut (*slot).cookie, cookie);
                return;
            }
        }
    }
    let _ = FLOWS.insert(&cookie, flow, 0);
}

/// The flow of socket `cookie`, if canary steered it.
#[inline(always)]
pub fn get(cookie: u64) -> Option<Flow> {
    if let Some(slot) = slot_of(cookie) {
        // SAFETY: a map value, read whole after its cookie matched.
        unsafe {
            if core::ptr::read_volatile(&raw const (*slot).cookie) == cookie {
                return Some((*slot).flow);
            }
        }
    }
    unsafe { FLOWS.get(&cookie) }.copied()
}

/// The handshake of socket `cookie` has started: its record is freed at
/// TCP CLOSE from now on (sockops' connect callback).
#[inline(always)]
pub fn entered_tcp(cookie: u64) {
    if let Some(slot) = slot_of(cookie) {
        // SAFETY: a map value; only this socket's callbacks write a slot
        // that holds its cookie.
        unsafe {
            if core::ptr::read_volatile(&raw const (*slot).cookie) == cookie {
                (*slot).flow.state = FLOW_IN_TCP;
            }
        }
    }
}

/// Frees the record of socket `cookie` (TCP CLOSE).
#[inline(always)]
pub fn forget(cookie: u64) {
    if let Some(slot) = slot_of(cookie) {
        // SAFETY: as in `entered_tcp`.
        unsafe {
            if core::ptr::read_volatile(&raw const (*slot).cookie) == cookie {
                core::ptr::write_volatile(&raw mut (*slot).cookie, 0);
                return;
            }
        }
    }
    let _ = FLOWS.remove(&cookie);
}
