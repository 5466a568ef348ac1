//! Writes encoded routes into the kernel maps with the spare-slot-then-flip
//! discipline, and reads the counters back.

use std::collections::{BTreeMap, HashMap as StdHashMap};
use std::net::IpAddr;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuHashMap},
};
use canary_common::*;

use super::{
    DataplaneOptions, EncodedRoute, prepare_pin_path, programs,
    slots::{GRACE, RangeAllocator},
};

/// What one service address currently has in the kernel.
#[derive(Debug)]
struct Installed {
    table: u32,
    backend_base: u32,
    backend_len: u32,
    /// `None` when adopted from a previous agent: content unknown, so the
    /// next apply rewrites it (into fresh slots, then flips).
    route: Option<EncodedRoute>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ApplyStats {
    pub changed: usize,
    pub removed: usize,
    pub unchanged: usize,
}

pub struct Dataplane {
    /// Keeps the loaded programs (and the aya-log ring buffer) alive.
    _ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, ServiceEntry>,
    tables: Array<MapData, RouteTable>,
    backends: Array<MapData, Backend>,
    maglev: HashMap<MapData, MaglevKey, MaglevTable>,
    counters: PerCpuHashMap<MapData, CounterKey, Counters>,
    client_ids: HashMap<MapData, u64, ClientIdentity>,
    flow_epoch: Array<MapData, u64>,
    installed: StdHashMap<ServiceKey, Installed>,
    table_slots: RangeAllocator,
    backend_slots: RangeAllocator,
    /// Maglev entries of retired tables, deleted once the grace has passed.
    retired_maglev: Vec<(Instant, MaglevKey)>,
}

impl Dataplane {
    /// Loads and attaches (or adopts) everything, then learns what a
    /// previous agent left in the maps so it never overwrites live slots.
    pub fn open(
        opts: &DataplaneOptions,
    ) -> Result<(Self, Option<aya_log::EbpfLogger<&'static dyn log::Log>>)> {
        prepare_pin_path(&opts.pin_path)?;
        let mut ebpf = programs::load_and_attach(opts)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!(error = %e, "kernel log ring buffer not available");
                None
            }
        };
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the kernel object"))
        };
        let mut dp = Self {
            services: HashMap::try_from(take(&mut ebpf, "SERVICES")?)?,
            tables: Array::try_from(take(&mut ebpf, "TABLES")?)?,
            backends: Array::try_from(take(&mut ebpf, "BACKENDS")?)?,
            maglev: HashMap::try_from(take(&mut ebpf, "MAGLEV")?)?,
            counters: PerCpuHashMap::try_from(take(&mut ebpf, "COUNTERS")?)?,
            client_ids: HashMap::try_from(take(&mut ebpf, "CLIENT_IDS")?)?,
            flow_epoch: Array::try_from(take(&mut ebpf, "FLOW_EPOCH")?)?,
            _ebpf: ebpf,
            installed: StdHashMap::new(),
            table_slots: RangeAllocator::new(MAX_TABLES),
            backend_slots: RangeAllocator::new(MAX_BACKENDS),
            retired_maglev: Vec::new(),
        };
        dp.adopt()?;
        Ok((dp, logger))
    }

    /// Rebuilds the allocators from the live maps.
    fn adopt(&mut self) -> Result<()> {
        let entries: Vec<(ServiceKey, ServiceEntry)> = self
            .services
            .iter()
            .collect::<Result<_, _>>()
            .context("reading SERVICES")?;
        for (key, entry) in entries {
            let table = self.tables.get(&entry.table, 0).context("reading TABLES")?;
            let live = &table.subsets[..(table.subset_count as usize).min(MAX_SUBSETS)];
            let base = live
                .iter()
                .filter(|s| s.backend_count > 0)
                .map(|s| s.backend_base)
                .min();
            let len: u32 = live.iter().map(|s| s.backend_count).sum();
            let base = base.unwrap_or(0);
            if !self.table_slots.reserve(entry.table, 1) || !self.backend_slots.reserve(base, len) {
                anyhow::bail!(
                    "pinned maps are inconsistent (table {} or backends {base}+{len} used twice); \
                     run `canary agent --cleanup`",
                    entry.table
                );
            }
            self.installed.insert(
                key,
                Installed {
                    table: entry.table,
                    backend_base: base,
                    backend_len: len,
                    route: None,
                },
            );
        }
        if !self.installed.is_empty() {
            tracing::info!(
                services = self.installed.len(),
                "adopted live routes from pinned maps"
            );
        }
        Ok(())
    }

    /// Makes the kernel serve exactly `routes`. New tables are written
    /// completely into free slots first; only then is each service's one
    /// `SERVICES` entry flipped. If anything fails before the flips, nothing
    /// changed.
    pub fn apply(&mut self, routes: &[EncodedRoute]) -> Result<ApplyStats> {
        let now = Instant::now();
        self.purge_retired_maglev(now);
        let mut stats = ApplyStats::default();
        let mut staged: Vec<(ServiceKey, Installed)> = Vec::new();
        for route in routes {
            if let Some(cur) = self.installed.get(&route.key)
                && cur.route.as_ref() == Some(route)
            {
                stats.unchanged += 1;
                continue;
            }
            match self.stage(route, now) {
                Ok(inst) => staged.push((route.key, inst)),
                Err(e) => {
                    // Never flipped: give the space straight back.
                    for (_, inst) in staged {
                        self.release(&inst, None);
                    }
                    return Err(e.context(format!("writing the route for {}", route.vip)));
                }
            }
        }
        for (key, inst) in staged {
            self.services
                .insert(key, service_entry(inst.table, inst.route.as_ref()), 0)
                .with_context(|| format!("flipping SERVICES entry of {}", describe(&key)))?;
            if let Some(old) = self.installed.insert(key, inst) {
                self.release(&old, Some(now));
            }
            stats.changed += 1;
        }
        let wanted: std::collections::HashSet<ServiceKey> = routes.iter().map(|r| r.key).collect();
        let gone: Vec<ServiceKey> = self
            .installed
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in gone {
            self.services
                .remove(&key)
                .with_context(|| format!("removing {}", describe(&key)))?;
            if let Some(old) = self.installed.remove(&key) {
                self.release(&old, Some(now));
            }
            stats.removed += 1;
        }
        Ok(stats)
    }

    /// Writes one route into fresh slots, without making it live.
    fn stage(&mut self, route: &EncodedRoute, now: Instant) -> Result<Installed> {
        let len = route.backend_count();
        let table = self
            .table_slots
            .alloc(1, now)
            .ok_or_else(|| anyhow!("all {MAX_TABLES} route tables are in use"))?;
        let Some(base) = self.backend_slots.alloc(len, now) else {
            self.table_slots.free_later(table, 1, long_ago(now));
            return Err(anyhow!(
                "no room for {len} more backends (capacity {MAX_BACKENDS})"
            ));
        };
        let inst = Installed {
            table,
            backend_base: base,
            backend_len: len,
            route: Some(route.clone()),
        };
        if let Err(e) = self.write_table(route, table, base) {
            self.release(&inst, None);
            return Err(e);
        }
        Ok(inst)
    }

    fn write_table(&mut self, route: &EncodedRoute, table: u32, base: u32) -> Result<()> {
        let mut kernel = RouteTable {
            subset_count: route.subsets.len() as u32,
            flags: route.flags,
            ..Default::default()
        };
        let mut next = base;
        for (i, subset) in route.subsets.iter().enumerate() {
            for (j, b) in subset.backends.iter().enumerate() {
                self.backends
                    .set(next + j as u32, *b, 0)
                    .context("writing BACKENDS")?;
            }
            let mut flags = 0;
            if let Some(slots) = &subset.maglev {
                let mut t = MaglevTable {
                    slots: [0; MAGLEV_SIZE as usize],
                    _pad: 0,
                };
                t.slots.copy_from_slice(slots);
                self.maglev
                    .insert(table * MAX_SUBSETS as u32 + i as u32, t, 0)
                    .context("writing MAGLEV")?;
                flags |= SUBSET_MAGLEV;
            }
            kernel.subsets[i] = SubsetSlot {
                upper: subset.upper,
                backend_base: next,
                backend_count: subset.backends.len() as u32,
                flags,
            };
            next += subset.backends.len() as u32;
        }
        self.tables
            .set(table, kernel, 0)
            .context("writing TABLES")?;
        Ok(())
    }

    /// Returns a route's slots: after the grace period if it was live
    /// (`retired_at`), at once if it never was.
    fn release(&mut self, inst: &Installed, retired_at: Option<Instant>) {
        let at = retired_at.unwrap_or_else(|| long_ago(Instant::now()));
        self.table_slots.free_later(inst.table, 1, at);
        self.backend_slots
            .free_later(inst.backend_base, inst.backend_len, at);
        for i in 0..MAX_SUBSETS as u32 {
            self.retired_maglev
                .push((at, inst.table * MAX_SUBSETS as u32 + i));
        }
    }

    fn purge_retired_maglev(&mut self, now: Instant) {
        let (ready, wait): (Vec<_>, Vec<_>) = self
            .retired_maglev
            .drain(..)
            .partition(|(at, _)| now.duration_since(*at) >= GRACE);
        self.retired_maglev = wait;
        for (_, key) in ready {
            // Most retired tables had no Maglev entry: NotFound is expected.
            let _ = self.maglev.remove(&key);
        }
    }

    /// Makes `CLIENT_IDS` hold exactly `ids` (network namespace cookie →
    /// client address); returns how many entries changed.
    pub fn sync_client_identities(&mut self, ids: &BTreeMap<u64, IpAddr>) -> Result<usize> {
        let current: Vec<(u64, ClientIdentity)> = self
            .client_ids
            .iter()
            .collect::<Result<_, _>>()
            .context("reading CLIENT_IDS")?;
        let mut changed = 0;
        for (cookie, _) in current.iter().filter(|(c, _)| !ids.contains_key(c)) {
            self.client_ids
                .remove(cookie)
                .context("pruning CLIENT_IDS")?;
            changed += 1;
        }
        for (cookie, ip) in ids {
            let want = ClientIdentity {
                addr: super::addr_words(*ip),
            };
            if current.iter().any(|(c, v)| c == cookie && *v == want) {
                continue;
            }
            self.client_ids
                .insert(*cookie, want, 0)
                .context("writing CLIENT_IDS")?;
            changed += 1;
        }
        Ok(changed)
    }

    /// Counts one more second for connect4's flow slots, which take over a
    /// slot abandoned before its handshake after
    /// `FLOW_SLOT_ABANDONED_EPOCHS` of them. Pinned, so a restarted agent
    /// counts on.
    pub fn advance_flow_epoch(&mut self) -> Result<()> {
        let epoch = self.flow_epoch.get(&0, 0).context("reading FLOW_EPOCH")?;
        self.flow_epoch
            .set(0, epoch.wrapping_add(1), 0)
            .context("writing FLOW_EPOCH")
    }

    /// Every counter record, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(CounterKey, Counters)>> {
        let mut out = Vec::new();
        for item in self.counters.iter() {
            let (key, per_cpu) = item.context("reading COUNTERS")?;
            let mut sum = Counters::default();
            for c in per_cpu.iter() {
                sum.opened += c.opened;
                sum.closed += c.closed;
                sum.failed += c.failed;
                sum.no_endpoint += c.no_endpoint;
                sum.bytes_sent += c.bytes_sent;
                sum.bytes_received += c.bytes_received;
            }
            out.push((key, sum));
        }
        Ok(out)
    }
}

fn service_entry(table: u32, route: Option<&EncodedRoute>) -> ServiceEntry {
    match route.and_then(|r| r.shim_port) {
        Some(port) => ServiceEntry {
            table,
            flags: SERVICE_SHIM,
            shim_port: port.to_be(),
        },
        None => ServiceEntry {
            table,
            flags: 0,
            shim_port: 0,
        },
    }
}

/// A moment one grace period ago: space freed "then" is reusable now.
fn long_ago(now: Instant) -> Instant {
    now.checked_sub(GRACE).unwrap_or(now)
}

fn describe(key: &ServiceKey) -> String {
    let ip = super::words_addr(key.addr, key.family);
    std::net::SocketAddr::new(ip, u16::from_be(key.port)).to_string()
}
