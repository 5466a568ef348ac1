//! The shim's side of `ORIG_DST`: what a redirected client dialled.
//!
//! Opened from its pin on its own, so the shim's per-connection look-up
//! never waits on the agent's dataplane lock.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData};
use canary_common::{FAMILY_V4, FAMILY_V6, OrigKey, ServiceKey};

use super::{addr_words, words_addr};

pub struct OrigDst {
    map: HashMap<MapData, OrigKey, ServiceKey>,
}

impl OrigDst {
    pub fn open(pin_path: &Path) -> Result<Self> {
        let path = pin_path.join("ORIG_DST");
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let map = HashMap::try_from(aya::maps::Map::LruHashMap(data))?;
        Ok(Self { map })
    }

    /// The VIP:port that the client at `peer`, in network namespace
    /// `netns`, dialled before the kernel sent it to the shim.
    pub fn lookup(&self, netns: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let family = if peer.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
        let key = OrigKey {
            netns,
            addr: addr_words(peer.ip()),
            port: peer.port().to_be(),
            family,
            _pad: [0; 5],
        };
        let service = self.map.get(&key, 0).ok()?;
        Some(SocketAddr::new(
            words_addr(service.addr, service.family),
            u16::from_be(service.port),
        ))
    }
}
