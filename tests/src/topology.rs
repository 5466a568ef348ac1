//! A switched test network: one hub namespace holding a Linux bridge, and one
//! namespace per host, each plugged into the bridge through a veth pair.
//!
//! ```text
//!   <prefix>-client        <prefix>-hub            <prefix>-backend1
//!   eth0 ─────── veth ──── h0-client ┐   ┌─ h1-backend1 ──── veth ─── eth0
//!                                    br0 (bridge, no address)
//! ```
//!
//! Nothing is added to the root namespace: no interface, no address, no
//! route. Hosts reach each other on the shared segment through the on-link
//! routes of their addresses' prefixes.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// The bridge inside the hub namespace.
pub const BRIDGE: &str = "br0";
/// Every host's interface towards the bridge.
pub const HOST_IFACE: &str = "eth0";
/// Kernel interface names hold at most 15 bytes.
const IFNAME_MAX: usize = 15;

/// An interface address with its prefix length, as in `10.77.0.11/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IfAddr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// The test network; removes every namespace it made on drop.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    // Field order is drop order: hosts first, then the hub.
    hosts: Vec<Host>,
    hub: Netns,
}

/// One host of a [`Topology`]: a namespace with `eth0` on the bridge.
///
/// Cheap to clone. The namespace lives until the topology and every clone
/// are dropped.
#[derive(Clone, Debug)]
pub struct Host {
    inner: Arc<HostInner>,
}

#[derive(Debug)]
struct HostInner {
    name: String,
    addrs: Mutex<Vec<IfAddr>>,
    netns: Netns,
}

// === impl IfAddr ===

impl IfAddr {
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }
}

impl FromStr for IfAddr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = s
            .split_once('/')
            .with_context(|| format!("interface address {s:?}: expected ADDR/PREFIXLEN"))?;
        let addr: IpAddr = addr
            .parse()
            .with_context(|| format!("interface address {s:?}: {addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len: u8 =
            len.parse().ok().filter(|l| *l <= max).with_context(|| {
                format!("interface address {s:?}: prefix length must be 0..={max}")
            })?;
        Ok(IfAddr { addr, prefix_len })
    }
}

impl fmt::Display for IfAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

// === impl Topology ===

impl Topology {
    /// Creates the hub namespace `<prefix>-hub` with bridge `br0` up.
    pub fn new(prefix: &str) -> Result<Self> {
        let hub = Netns::new(&format!("{prefix}-hub"))?;
        hub.ip(&[
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        hub.ip(&["link", "set", BRIDGE, "up"])?;
        Ok(Topology {
            prefix: prefix.to_owned(),
            hosts: Vec::new(),
            hub,
        })
    }

    /// Adds host namespace `<prefix>-<name>` whose `eth0` carries `addrs`
    /// (`"10.77.0.11/16"`, `"fd00:77::11/64"`; IPv6 without DAD, so usable at
    /// once) and is wired to the bridge.
    pub fn add_host<S: AsRef<str>>(&mut self, name: &str, addrs: &[S]) -> Result<Host> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            bail!("host name {name:?}: use lowercase letters, digits and '-'");
        }
        if self.host(name).is_some() {
            bail!("host name {name:?} is already in topology {}", self.prefix);
        }
        let addrs = parse_addrs(addrs)?;
        let netns = Netns::new(&format!("{}-{name}", self.prefix))?;
        let host = Host {
            inner: Arc::new(HostInner {
                name: name.to_owned(),
                addrs: Mutex::new(Vec::new()),
                netns,
            }),
        };
        // Owned by the topology from here on, so a failure below cleans up.
        self.hosts.push(host.clone());

        // The peer is created directly inside the hub, so its name only has
        // to be unique there.
        let mut peer = format!("h{}-{name}", self.hosts.len() - 1);
        peer.truncate(IFNAME_MAX);
        host.netns().ip(&[
            "link",
            "add",
            HOST_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            self.hub.name(),
        ])?;
        crate::ip::ip_batch(
            Some(self.hub.name()),
            &[
                format!("link set {peer} master {BRIDGE}"),
                format!("link set {peer} up"),
            ],
        )?;
        host.netns().ip(&["link", "set", HOST_IFACE, "up"])?;
        host.add_parsed(&addrs)?;
        Ok(host)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace that holds the bridge.
    pub fn hub(&self) -> &Netns {
        &self.hub
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name() == name)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }
}

// === impl Host ===

impl Host {
    /// The short name given to [`Topology::add_host`].
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn netns(&self) -> &Netns {
        &self.inner.netns
    }

    /// Every address added to `eth0`, in order.
    pub fn addrs(&self) -> Vec<IfAddr> {
        self.lock_addrs().clone()
    }

    /// The addresses of `eth0` without prefix lengths.
    pub fn ips(&self) -> Vec<IpAddr> {
        self.lock_addrs().iter().map(|a| a.addr).collect()
    }

    /// The first IPv4 address of `eth0`.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.lock_addrs().iter().find_map(|a| match a.addr {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
    }

    /// The first IPv6 address of `eth0`.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.lock_addrs().iter().find_map(|a| match a.addr {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        })
    }

    /// Adds more addresses to `eth0` (one `ip -batch` for all of them).
    pub fn add_addrs<S: AsRef<str>>(&self, addrs: &[S]) -> Result<()> {
        self.add_parsed(&parse_addrs(addrs)?)
    }

    /// Runs `ip -n <netns> ARGS...` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        self.netns().ip(args)
    }

    fn add_parsed(&self, addrs: &[IfAddr]) -> Result<()> {
        let lines: Vec<String> = addrs
            .iter()
            .map(|a| {
                let nodad = if a.is_ipv6() { " nodad" } else { "" };
                format!("address add {a} dev {HOST_IFACE}{nodad}")
            })
            .collect();
        crate::ip::ip_batch(Some(self.netns().name()), &lines)
            .with_context(|| format!("adding addresses to host {}", self.name()))?;
        self.lock_addrs().extend_from_slice(addrs);
        Ok(())
    }

    fn lock_addrs(&self) -> std::sync::MutexGuard<'_, Vec<IfAddr>> {
        self.inner
            .addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn parse_addrs<S: AsRef<str>>(addrs: &[S]) -> Result<Vec<IfAddr>> {
    addrs.iter().map(|a| a.as_ref().parse()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_interface_addresses() -> Result<()> {
        let v4: IfAddr = "10.77.0.11/16".parse()?;
        assert_eq!(v4.addr, IpAddr::from([10, 77, 0, 11]));
        assert_eq!(v4.prefix_len, 16);
        assert_eq!(v4.to_string(), "10.77.0.11/16");
        let v6: IfAddr = "fd00:77::11/64".parse()?;
        assert!(v6.is_ipv6());
        assert_eq!(v6.to_string(), "fd00:77::11/64");
        assert!("10.77.0.11".parse::<IfAddr>().is_err());
        assert!("10.77.0.11/33".parse::<IfAddr>().is_err());
        assert!("fd00::1/129".parse::<IfAddr>().is_err());
        Ok(())
    }
}
