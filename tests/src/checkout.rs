//! The `deploy/examples/checkout` world, built for real: one network
//! namespace per pod of the example YAML (same names, same addresses), the
//! backends answering as their version and pod, and a client namespace in
//! a cgroup of its own for the agent to attach to.
//!
//! Used by the end-to-end tests and by `cargo xtask run`.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;

use crate::backend::BackendSpec;
use crate::{ChildGuard, Host, TestCgroup, Topology};

/// The Service's clusterIPs and port in the example.
pub const VIP4: &str = "10.96.0.10:8080";
pub const VIP6: &str = "[fd00:96::10]:8080";

/// (version, pod, IPv4, IPv6) of every pod in `deploy/examples/*/pods.yaml`.
pub const PODS: [(&str, &str, &str, &str); 3] = [
    ("v1", "checkout-v1-a", "10.77.0.11", "fd00:77::11"),
    ("v1", "checkout-v1-b", "10.77.0.12", "fd00:77::12"),
    ("v2", "checkout-v2-a", "10.77.0.21", "fd00:77::21"),
];
pub const CLIENT_V4: &str = "10.77.0.100";
pub const CLIENT_V6: &str = "fd00:77::100";
pub const PORT: u16 = 8080;

pub fn vip4() -> SocketAddr {
    VIP4.parse().expect("constant")
}

pub fn vip6() -> SocketAddr {
    VIP6.parse().expect("constant")
}

/// The running world. Fields drop in order: processes before the cgroup
/// they run in, the cgroup before the namespaces.
pub struct Checkout {
    pub backends: Vec<ChildGuard>,
    pub cgroup: TestCgroup,
    pub client: Host,
    pub topology: Topology,
}

impl Checkout {
    /// Builds namespaces `<prefix>-*`, starts `canary-backend` (at
    /// `backend_bin`) for every pod, and a client cgroup
    /// `canary-<prefix>-client`.
    pub fn start(prefix: &str, backend_bin: &Path) -> Result<Self> {
        Self::start_with(prefix, backend_bin, |_, spec| spec)
    }

    /// Like [`Checkout::start`], with each pod's backend adjusted by
    /// `customize(pod, spec)` (delays, failures, request logs).
    pub fn start_with(
        prefix: &str,
        backend_bin: &Path,
        customize: impl Fn(&str, BackendSpec) -> BackendSpec,
    ) -> Result<Self> {
        let mut topology = Topology::new(prefix)?;
        let mut hosts = Vec::new();
        for (version, pod, v4, v6) in PODS {
            // Short netns names: "v1-a", "v2-a", derived from the pod name.
            let short = pod.trim_start_matches("checkout-");
            let host = topology.add_host(short, &[format!("{v4}/16"), format!("{v6}/64")])?;
            hosts.push((version, pod, v4, v6, host));
        }
        let client = topology.add_host(
            "client",
            &[format!("{CLIENT_V4}/16"), format!("{CLIENT_V6}/64")],
        )?;
        let cgroup = TestCgroup::new(prefix, "client")?;
        let mut backends = Vec::new();
        for (version, pod, v4, v6, host) in &hosts {
            let spec = customize(
                pod,
                BackendSpec::new(*version, *pod)
                    .listen(SocketAddr::new(v4.parse()?, PORT))
                    .listen(SocketAddr::new(v6.parse()?, PORT)),
            );
            backends.push(spec.spawn(backend_bin, Some(host.netns()), None)?);
        }
        Ok(Self {
            backends,
            cgroup,
            client,
            topology,
        })
    }
}
