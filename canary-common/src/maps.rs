//! Keys and values of every map canary pins under `/sys/fs/bpf/canary/`.
//!
//! How a connection is served (see `canary-ebpf/src/connect.rs`):
//!
//! ```text
//! SERVICES[ServiceKey{vip, port}] ─► ServiceEntry{table}
//! TABLES[table] ─► RouteTable{subsets: [SubsetSlot{upper, backend_base, backend_count}]}
//! BACKENDS[backend_base + i] ─► Backend{addr, port}
//! MAGLEV[table * MAX_SUBSETS + subset] ─► MaglevTable (sticky endpoint choice)
//! ```
//!
//! Updates never modify a table that is in use: the agent writes a complete
//! table and its backends into free slots, then flips the one `SERVICES`
//! entry (a single atomic map update). Old slots are reused only after a
//! grace period, once no `connect()` can still be reading them.

/// Cumulative subset weights are scaled to this many parts (0.01% steps).
pub const WEIGHT_SCALE: u32 = 10_000;
/// Subsets (weighted destinations) one route may split between.
pub const MAX_SUBSETS: usize = 8;
/// Entries of one Maglev lookup table. Prime, and > 100 × the endpoints of a
/// subset up to 10 endpoints, which keeps reassignment skew under 1%
/// (Maglev paper, §3.4).
pub const MAGLEV_SIZE: u32 = 1021;

pub const MAX_SERVICES: u32 = 32_768;
pub const MAX_TABLES: u32 = 65_536;
pub const MAX_BACKENDS: u32 = 262_144;
pub const MAX_MAGLEV_TABLES: u32 = 8_192;
/// Slots of `FLOW_SLOTS`: a socket's flow lives in slot `cookie % MAX_FLOWS`.
pub const MAX_FLOWS: u32 = 262_144;
/// Entries of `FLOWS`, for the flows whose slot is taken. The map is the
/// one every flow went to before the slots, with the same name and
/// layout, so an upgraded agent's programs still find (and count the close
/// of) the connections its predecessor's programs recorded there.
pub const MAX_FLOW_OVERFLOW: u32 = 262_144;
pub const MAX_COUNTERS: u32 = 65_536;
pub const MAX_CLIENT_IDENTITIES: u32 = 16_384;
pub const MAX_ORIG_DST: u32 = 65_536;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;

/// `ServiceEntry.flags`: the routes need HTTP; send the connection to the
/// L7 shim listening on the client's own loopback.
pub const SERVICE_SHIM: u16 = 1;
/// `Flow.subset` of a connection handed to the shim (it picks per request).
pub const SUBSET_SHIM: u32 = u32::MAX;

/// `RouteTable.flags`: the subset is chosen by client hash, not at random.
pub const TABLE_HASH_SUBSET: u32 = 1;
/// `SubsetSlot.flags`: the endpoint is chosen through the Maglev table.
pub const SUBSET_MAGLEV: u32 = 1;

/// A service address as dialled by the client: VIP and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Network-order address words; IPv4 uses word 0 only.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub proto: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Slot in `TABLES` that holds this service's live route.
    pub table: u32,
    pub flags: u16,
    /// With `SERVICE_SHIM`: the shim's port on the client's loopback,
    /// network byte order.
    pub shim_port: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubsetSlot {
    /// Exclusive upper bound of this subset's band on [0, WEIGHT_SCALE).
    /// Bands are cumulative in the table's fixed subset order.
    pub upper: u32,
    /// First backend of this subset in `BACKENDS`.
    pub backend_base: u32,
    /// 0 means the subset has no ready endpoint: `connect()` fails.
    pub backend_count: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteTable {
    pub subset_count: u32,
    pub flags: u32,
    pub subsets: [SubsetSlot; MAX_SUBSETS],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// Key of `MAGLEV`: `table * MAX_SUBSETS + subset`.
pub type MaglevKey = u32;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    /// Index into the subset's backends, one per slot.
    pub slots: [u16; MAGLEV_SIZE as usize],
    pub _pad: u16,
}

/// What `connect()` decided for one socket, keyed by its socket cookie.
/// Read back by `getpeername()` (to show the VIP) and by sockops (to count
/// the flow against its subset and endpoint).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub service: ServiceKey,
    pub backend: Backend,
    pub subset: u32,
    /// `FLOW_CONNECTING` or `FLOW_IN_TCP`.
    pub state: u32,
}

/// `Flow.state`: connect4 chose; the kernel has not started the handshake.
pub const FLOW_CONNECTING: u32 = 0;
/// The handshake has started: the flow ends at TCP CLOSE (sockops state
/// callbacks), which frees its record.
pub const FLOW_IN_TCP: u32 = 1;

/// A slot of `FLOW_SLOTS`, one cache line: the flow of the socket whose
/// cookie it holds (0: free).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSlot {
    pub cookie: u64,
    pub flow: Flow,
    /// `FLOW_EPOCH` when connect4 took the slot.
    pub claimed_epoch: u64,
}

/// A `FLOW_CONNECTING` slot this many epochs old (the agent advances
/// `FLOW_EPOCH` once a second) belongs to a `connect()` that failed before
/// the handshake (no route, no free port, another program's veto): no
/// state callback will ever free it, so connect4 may take it over. The
/// handshake starts microseconds after connect4, in the same system call.
/// (An epoch instead of a clock: reading the kernel's coarse clock was a
/// tenth of connect4's time.)
pub const FLOW_SLOT_ABANDONED_EPOCHS: u64 = 60;

/// Whether connect4 may write the flow of socket `cookie` into a slot that
/// holds `slot` (see `canary-ebpf/src/flows.rs`): the slot is free, is
/// already this socket's (a second `connect()`), or was abandoned.
#[inline(always)]
pub fn slot_is_ours(slot: &FlowSlot, cookie: u64, epoch: u64) -> bool {
    slot.cookie == 0
        || slot.cookie == cookie
        || (slot.flow.state == FLOW_CONNECTING
            && epoch.saturating_sub(slot.claimed_epoch) > FLOW_SLOT_ABANDONED_EPOCHS)
}

/// Per service, subset and endpoint. An all-zero `backend` is the
/// subset-level record (connections refused for lack of endpoints).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub service: ServiceKey,
    pub backend: Backend,
    pub subset: u32,
}

/// Per-CPU connection counters; the agent sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections that reached ESTABLISHED.
    pub opened: u64,
    /// Established connections that have since closed.
    pub closed: u64,
    /// Connections that never established (refused, timed out, reset).
    pub failed: u64,
    /// `connect()` calls refused because the chosen subset had no endpoint.
    pub no_endpoint: u64,
    /// Payload bytes acknowledged by the peer, counted when the connection
    /// closes (TCP's count less the SYN and FIN: see `tcp`).
    pub bytes_sent: u64,
    /// Payload bytes received, counted when the connection closes.
    pub bytes_received: u64,
}

/// A connection the shim accepts, as the shim sees it: the client's
/// network namespace and its address and port (the shim listens on the
/// client's own loopback, so addresses alone repeat across namespaces).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigKey {
    pub netns: u64,
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

/// A client address the agent resolved for a network namespace cookie, so
/// that unbound sockets of a pod hash like the pod's IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    pub addr: [u32; 4],
}

// The kernel and the agent must agree byte for byte.
const _: () = assert!(size_of::<ServiceKey>() == 20);
const _: () = assert!(size_of::<ServiceEntry>() == 8);
const _: () = assert!(size_of::<SubsetSlot>() == 16);
const _: () = assert!(size_of::<RouteTable>() == 8 + 16 * MAX_SUBSETS);
const _: () = assert!(size_of::<Backend>() == 20);
const _: () = assert!(size_of::<MaglevTable>() == 2 * (MAGLEV_SIZE as usize + 1));
const _: () = assert!(size_of::<Flow>() == 48);
const _: () = assert!(size_of::<FlowSlot>() == 64);
const _: () = assert!(size_of::<CounterKey>() == 44);
const _: () = assert!(size_of::<Counters>() == 48);
const _: () = assert!(size_of::<ClientIdentity>() == 16);
const _: () = assert!(size_of::<OrigKey>() == 32);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, made only of integers, and
    // have no implicit padding (checked by the size assertions above).
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceEntry {}
    unsafe impl aya::Pod for SubsetSlot {}
    unsafe impl aya::Pod for RouteTable {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for FlowSlot {}
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for ClientIdentity {}
    unsafe impl aya::Pod for OrigKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(cookie: u64, state: u32, claimed_epoch: u64) -> FlowSlot {
        FlowSlot {
            cookie,
            flow: Flow {
                state,
                ..Flow::default()
            },
            claimed_epoch,
        }
    }

    #[test]
    fn a_slot_is_taken_when_free_ours_or_abandoned_before_the_handshake() {
        let now = 1000;
        // Free, or this socket's own (a second connect()).
        assert!(slot_is_ours(&slot(0, FLOW_IN_TCP, now), 7, now));
        assert!(slot_is_ours(&slot(7, FLOW_IN_TCP, 0), 7, now));
        // Another socket's flow in TCP: never taken, however old (a
        // long-lived connection still needs its record).
        assert!(!slot_is_ours(&slot(3, FLOW_IN_TCP, 0), 7, now));
        // Another socket's connect that never reached TCP: taken only once
        // it is older than any handshake start could be.
        assert!(!slot_is_ours(&slot(3, FLOW_CONNECTING, now - 1), 7, now));
        assert!(!slot_is_ours(
            &slot(3, FLOW_CONNECTING, now - FLOW_SLOT_ABANDONED_EPOCHS),
            7,
            now
        ));
        assert!(slot_is_ours(
            &slot(3, FLOW_CONNECTING, now - FLOW_SLOT_ABANDONED_EPOCHS - 1),
            7,
            now
        ));
        // An epoch from a newer agent than the one counting now is not old.
        assert!(!slot_is_ours(&slot(3, FLOW_CONNECTING, now + 5), 7, now));
    }
}
