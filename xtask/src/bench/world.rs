//! Everything the bench runs on, built once and torn down on drop (also on
//! error or panic):
//!
//! ```text
//!  namespace <p>-client ─┬─ cgroup canary-<p>-client   agent "small" attached
//!                        ├─ cgroup canary-<p>-big      agent "10k" attached
//!                        └─ cgroup canary-<p>-plain    nothing attached
//!  namespace <p>-ipt1    ── cgroup canary-<p>-plain    kube-proxy nat rules, 1 Service
//!  namespace <p>-ipt10k  ── cgroup canary-<p>-plain    the same after 10,000 others
//!  namespaces <p>-v1-a, <p>-v1-b, <p>-v2-a: canary-backend (the checkout pods),
//!                        all in cgroup canary-<p>-servers (for their CPU time)
//! ```
//!
//! All client namespaces hang off the same bridge as the pods and have the
//! same routes. The iptables clients have namespaces of their own because
//! a `nat` table turns on conntrack for the whole namespace; in the canary
//! client's namespace that would tax the direct baseline and canary too.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use canary_tests::agent::Agent;
use canary_tests::checkout::Checkout;
use canary_tests::{Host, Netns, TestCgroup};

/// Where a load generator runs: a network namespace and a cgroup.
#[derive(Clone, Copy)]
pub struct Client<'a> {
    /// For messages: `client/plain`, `ipt1/plain`, ...
    pub name: &'a str,
    pub netns: &'a Netns,
    pub cgroup: &'a TestCgroup,
}

/// Which client a scenario runs from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientId {
    /// Canary client namespace, no programs on the cgroup.
    Plain,
    /// Canary client namespace, agent serving the small config.
    CanarySmall,
    /// Canary client namespace, agent serving 10,002 Services.
    CanaryLarge,
    /// Namespace with kube-proxy rules for one Service.
    Iptables1,
    /// Namespace with kube-proxy rules for 10,001 Services.
    Iptables10k,
}

/// Field order is drop order: agents (they unpin their programs), then the
/// extra cgroups, then the checkout world (backends, its cgroup, the
/// namespaces, including the iptables ones and their rules).
pub struct World {
    pub small: Agent,
    pub large: Agent,
    pub large_start: Duration,
    pub big_cgroup: TestCgroup,
    pub plain_cgroup: TestCgroup,
    pub servers: TestCgroup,
    pub ipt1: Host,
    pub ipt10k: Host,
    pub checkout: Checkout,
}

/// The parts of the world that exist before the agents start.
pub struct Base {
    pub big_cgroup: TestCgroup,
    pub plain_cgroup: TestCgroup,
    pub servers: TestCgroup,
    pub ipt1: Host,
    pub ipt10k: Host,
    pub checkout: Checkout,
}

// === impl Base ===

impl Base {
    /// The checkout world, two more client namespaces, two more cgroups,
    /// and the same on-link default route in every client namespace (the
    /// iptables clients need a route to the VIPs before NAT rewrites them).
    pub fn start(prefix: &str, backend_bin: &Path) -> Result<Self> {
        let mut checkout = Checkout::start(prefix, backend_bin)?;
        let big_cgroup = TestCgroup::new(prefix, "big")?;
        let plain_cgroup = TestCgroup::new(prefix, "plain")?;
        // cgroup v2 moves a whole process, with all its threads.
        let servers = TestCgroup::new(prefix, "servers")?;
        for backend in &checkout.backends {
            std::fs::write(servers.procs_file(), backend.pid().to_string()).with_context(|| {
                format!(
                    "moving backend {} to {}",
                    backend.pid(),
                    servers.path().display()
                )
            })?;
        }
        let ipt1 = checkout.topology.add_host("ipt1", &["10.77.0.101/16"])?;
        let ipt10k = checkout.topology.add_host("ipt10k", &["10.77.0.102/16"])?;
        for host in [&checkout.client, &ipt1, &ipt10k] {
            host.ip(&["route", "add", "default", "dev", "eth0"])
                .with_context(|| format!("default route in {}", host.netns().name()))?;
        }
        Ok(Base {
            big_cgroup,
            plain_cgroup,
            servers,
            ipt1,
            ipt10k,
            checkout,
        })
    }

    /// Starts both agents: the small config on the checkout client's
    /// cgroup, the 10k config on the `big` cgroup. Pins and run
    /// directories are named after the unique prefix.
    pub fn with_agents(self, prefix: &str, small: &Path, large: &Path) -> Result<World> {
        let agent = |name: &str, config: &Path, cgroup: &TestCgroup| {
            Agent::start_at(
                config,
                cgroup.path(),
                PathBuf::from(format!("/sys/fs/bpf/canary-bench-{prefix}-{name}")),
                PathBuf::from(format!("/run/canary-bench-{prefix}-{name}")),
            )
            .with_context(|| format!("starting the {name} agent on {}", config.display()))
        };
        let small = agent("small", small, &self.checkout.cgroup)?;
        let started = Instant::now();
        let large = agent("10k", large, &self.big_cgroup)?;
        let large_start = started.elapsed();
        Ok(World {
            small,
            large,
            large_start,
            big_cgroup: self.big_cgroup,
            plain_cgroup: self.plain_cgroup,
            servers: self.servers,
            ipt1: self.ipt1,
            ipt10k: self.ipt10k,
            checkout: self.checkout,
        })
    }
}

// === impl World ===

impl World {
    pub fn client(&self, id: ClientId) -> Client<'_> {
        let client_ns = self.checkout.client.netns();
        match id {
            ClientId::Plain => Client {
                name: "client netns, cgroup without canary",
                netns: client_ns,
                cgroup: &self.plain_cgroup,
            },
            ClientId::CanarySmall => Client {
                name: "client netns, cgroup with canary (small config)",
                netns: client_ns,
                cgroup: &self.checkout.cgroup,
            },
            ClientId::CanaryLarge => Client {
                name: "client netns, cgroup with canary (10k config)",
                netns: client_ns,
                cgroup: &self.big_cgroup,
            },
            ClientId::Iptables1 => Client {
                name: "ipt1 netns (kube-proxy rules, 1 service)",
                netns: self.ipt1.netns(),
                cgroup: &self.plain_cgroup,
            },
            ClientId::Iptables10k => Client {
                name: "ipt10k netns (kube-proxy rules, 10k services)",
                netns: self.ipt10k.netns(),
                cgroup: &self.plain_cgroup,
            },
        }
    }

    /// How many Services an agent serves, from `canary status --json`.
    pub fn served(agent: &Agent) -> Result<usize> {
        let status = agent.status()?;
        let Some(services) = status["services"].as_array() else {
            bail!("canary status has no services array: {status}");
        };
        Ok(services.len())
    }
}
