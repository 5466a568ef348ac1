//! Loading the kernel object and attaching its programs to the cgroup,
//! adopting links a previous agent pinned.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::MapInfo,
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps, links::FdLink},
};

use super::{DataplaneOptions, MAP_NAMES, sys};

/// The kernel object, built by build.rs with the pinned nightly.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/canary"));

/// How chatty the kernel programs are. Filtered in the kernel (aya-log's
/// `AYA_LOG_LEVEL`), so per-connection `debug!` lines cost nothing unless
/// asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelLogLevel {
    Off,
    #[default]
    Warn,
    Info,
    Debug,
}

impl KernelLogLevel {
    /// aya-log-common's `Level` numbering.
    fn as_aya(self) -> u8 {
        match self {
            Self::Off => 0,
            Self::Warn => 2,
            Self::Info => 3,
            Self::Debug => 4,
        }
    }
}

/// bpf_link attachments always coexist with other programs on the cgroup
/// (cilium, systemd's); the kernel rejects the legacy multi-attach flags on
/// links, so the mode must be the flag-less one.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The programs and the cgroup hook each one takes.
const PROGRAMS: [&str; 5] = [
    "canary_connect4",
    "canary_connect6",
    "canary_peer4",
    "canary_peer6",
    "canary_sockops",
];

/// Expected (key size, value size, entries) of each pinned map.
fn expected_layout(name: &str) -> (usize, usize, u32) {
    use canary_common::*;
    match name {
        "SERVICES" => (
            size_of::<ServiceKey>(),
            size_of::<ServiceEntry>(),
            MAX_SERVICES,
        ),
        "TABLES" => (4, size_of::<RouteTable>(), MAX_TABLES),
        "BACKENDS" => (4, size_of::<Backend>(), MAX_BACKENDS),
        "MAGLEV" => (4, size_of::<MaglevTable>(), MAX_MAGLEV_TABLES),
        "FLOW_SLOTS" => (4, size_of::<FlowSlot>(), MAX_FLOWS),
        "FLOW_EPOCH" => (4, 8, 1),
        "FLOWS" => (8, size_of::<Flow>(), MAX_FLOW_OVERFLOW),
        "COUNTERS" => (size_of::<CounterKey>(), size_of::<Counters>(), MAX_COUNTERS),
        "CLIENT_IDS" => (8, size_of::<ClientIdentity>(), MAX_CLIENT_IDENTITIES),
        "ORIG_DST" => (size_of::<OrigKey>(), size_of::<ServiceKey>(), MAX_ORIG_DST),
        _ => (0, 0, 0),
    }
}

/// Refuses to adopt pinned maps whose layout this agent does not share:
/// writing our structs into them would corrupt the data path.
fn check_pinned_maps(pin_path: &Path) -> Result<()> {
    for name in MAP_NAMES {
        let path = pin_path.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        let (key, value, entries) = expected_layout(name);
        let found = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if found != (key, value, entries) {
            bail!(
                "pinned map {} has key/value sizes {}/{} and {} entries but this agent expects \
                 {key}/{value} and {entries}; it was made by another canary version. Run \
                 `canary agent --cleanup` (drops the live routing state) and start again",
                path.display(),
                found.0,
                found.1,
                found.2
            );
        }
    }
    Ok(())
}

/// Whether connect4 can mark the sockets it steers in their sockops
/// callback flags (`bpf_setsockopt(TCP_BPF_SOCK_OPS_CB_FLAGS)`, Linux
/// 6.12). Then sockops tells steered sockets by their flags, and every
/// other TCP socket in the cgroup passes through it without a map lookup;
/// before 6.12 sockops looks each connecting socket up instead.
fn connect_sets_cb_flags() -> bool {
    aya::util::KernelVersion::current()
        .map(|v| v >= aya::util::KernelVersion::new(6, 12, 0))
        .unwrap_or(false)
}

/// Programs attach only to cgroup v2 directories: say so before anything
/// is loaded or pinned (the kernel's own answer would be `EBADF`).
pub fn check_cgroup(path: &Path) -> Result<()> {
    if !sys::is_cgroup2(path) {
        bail!(
            "--cgroup {} is not a cgroup v2 directory; give a directory of the cgroup2 \
             mount (see `grep cgroup2 /proc/self/mounts`; by default canary uses its root)",
            path.display()
        );
    }
    Ok(())
}

/// Loads the object (reusing pinned maps) and makes sure each program is
/// attached to the cgroup through a pinned link, swapping in this agent's
/// program where a link already exists.
pub fn load_and_attach(opts: &DataplaneOptions) -> Result<Ebpf> {
    if OBJECT.is_empty() {
        bail!("this canary binary was built with AYA_BUILD_SKIP and has no kernel programs");
    }
    let cgroup = File::open(&opts.cgroup)
        .with_context(|| format!("opening cgroup {}", opts.cgroup.display()))?;
    check_pinned_maps(&opts.pin_path)?;
    let level = opts.log_level.as_aya();
    let flags_at_connect = u8::from(!opts.sockops_lookup && connect_sets_cb_flags());
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&opts.pin_path)
        .override_global("AYA_LOG_LEVEL", &level, false)
        .override_global("CB_FLAGS_AT_CONNECT", &flags_at_connect, true)
        .override_global("FLOW_SLOT_COUNT", &opts.flow_slots, true)
        .load(OBJECT)
        .context("loading canary's kernel object")?;

    for name in PROGRAMS {
        let link_pin = opts.pin_path.join("links").join(name);
        let program = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?;
        if name == "canary_sockops" {
            let prog: &mut SockOps = program.try_into()?;
            prog.load().with_context(|| format!("verifying {name}"))?;
            if !adopt_link(&link_pin, prog.fd()?.as_fd())? {
                let id = prog.attach(&cgroup, LINK_MODE)?;
                pin(FdLink::try_from(prog.take_link(id)?)?, &link_pin)?;
            }
        } else {
            let prog: &mut CgroupSockAddr = program.try_into()?;
            prog.load().with_context(|| format!("verifying {name}"))?;
            if !adopt_link(&link_pin, prog.fd()?.as_fd())? {
                let id = prog
                    .attach(&cgroup, LINK_MODE)
                    .with_context(|| format!("attaching {name} to {}", opts.cgroup.display()))?;
                pin(FdLink::try_from(prog.take_link(id)?)?, &link_pin)?;
            }
        }
    }
    Ok(ebpf)
}

/// If a previous agent pinned this link, atomically point it at `prog`.
fn adopt_link(link_pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> Result<bool> {
    if !link_pin.exists() {
        return Ok(false);
    }
    let link = sys::obj_get(link_pin).with_context(|| format!("opening {}", link_pin.display()))?;
    sys::link_update(&link, prog)
        .with_context(|| format!("swapping the program behind {}", link_pin.display()))?;
    tracing::info!(link = %link_pin.display(), "adopted pinned link");
    Ok(true)
}

fn pin(link: FdLink, path: &Path) -> Result<()> {
    link.pin(path)
        .with_context(|| format!("pinning {}", path.display()))?;
    Ok(())
}
