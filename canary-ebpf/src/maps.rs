//! Every map is pinned by name under the agent's pin directory, so the
//! data path keeps working while the agent restarts or upgrades.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap},
};
use canary_common::*;

/// VIP:port → the route table in force. The single entry flipped on update.
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceEntry> = HashMap::pinned(MAX_SERVICES, 0);

#[map]
pub static TABLES: Array<RouteTable> = Array::pinned(MAX_TABLES, 0);

#[map]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// Only sticky subsets have one, so allocate on demand.
#[map]
pub static MAGLEV: HashMap<MaglevKey, MaglevTable> =
    HashMap::pinned(MAX_MAGLEV_TABLES, BPF_F_NO_PREALLOC);

/// Slot `cookie % MAX_FLOWS` → what connect() chose for that socket (see
/// `flows`).
#[map]
pub static FLOW_SLOTS: Array<FlowSlot> = Array::pinned(MAX_FLOWS, 0);

/// Seconds the agent has counted (it adds one every second): how connect4
/// tells an abandoned flow slot.
#[map]
pub static FLOW_EPOCH: Array<u64> = Array::pinned(1, 0);

/// Socket cookie → what connect() chose, for sockets whose slot another
/// live socket holds. LRU so that a lost close event can never fill it.
#[map]
pub static FLOWS: LruHashMap<u64, Flow> = LruHashMap::pinned(MAX_FLOW_OVERFLOW, 0);

#[map]
pub static COUNTERS: PerCpuHashMap<CounterKey, Counters> = PerCpuHashMap::pinned(MAX_COUNTERS, 0);

/// Network namespace cookie → the pod address the agent resolved for it.
#[map]
pub static CLIENT_IDS: HashMap<u64, ClientIdentity> = HashMap::pinned(MAX_CLIENT_IDENTITIES, 0);

/// Set to 1 by connect4 if the kernel refused the steered-socket mark
/// (`TCP_BPF_SOCK_OPS_CB_FLAGS`): sockops then looks every connecting
/// socket up, as before 6.12, so no steered connection goes uncounted.
/// Not pinned: a new agent's programs try the mark again.
#[map]
pub static MARK_REFUSED: Array<u32> = Array::with_max_entries(1, 0);

/// The shim's look-up of what a redirected client dialled: written when
/// the client's connection to the shim is established, removed at close.
#[map]
pub static ORIG_DST: LruHashMap<OrigKey, ServiceKey> = LruHashMap::pinned(MAX_ORIG_DST, 0);
