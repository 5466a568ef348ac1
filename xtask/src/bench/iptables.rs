//! The peer: kube-proxy's iptables mode, written the way kube-proxy writes
//! it (`pkg/proxy/iptables/proxier.go`), into a client namespace's `nat`
//! table with one `iptables-restore`.
//!
//! ```text
//! OUTPUT ─► KUBE-SERVICES ─(-d VIP -p tcp --dport P)─► KUBE-SVC-x
//!   KUBE-SVC-x: one rule per endpoint, `-m statistic --mode random
//!               --probability 1/(n-i)` weighted, the last unconditional
//!   KUBE-SEP-y: hairpin mark, then DNAT --to-destination POD:PORT
//! POSTROUTING ─► KUBE-POSTROUTING (MASQUERADE marked traffic only)
//! ```
//!
//! Only the `nat` table: kube-proxy's `filter` rules (KUBE-FIREWALL,
//! KUBE-FORWARD, ...), which every packet crosses, are left out, which
//! favours iptables.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use canary_tests::{Netns, spawn_in};

/// The pod CIDR kube-proxy is told about (`--cluster-cidr`): traffic from
/// outside it to a ClusterIP is masqueraded.
const CLUSTER_CIDR: &str = "10.77.0.0/16";

/// Which `iptables` the kernel is driven through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// `iptables-legacy` (x_tables): kube-proxy's classic linear rule walk.
    Legacy,
    /// `iptables-nft`: the same rules as nf_tables expressions.
    Nft,
}

/// One Service port as kube-proxy sees it.
#[derive(Clone, Debug)]
pub struct Service {
    /// `namespace/name:port`, kube-proxy's "service port name".
    pub name: String,
    pub vip: SocketAddrV4,
    /// Endpoint address and its share of connections (shares sum to 1).
    pub endpoints: Vec<(SocketAddrV4, f64)>,
}

// === impl Backend ===

impl Backend {
    pub fn restore_bin(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-restore",
            Backend::Nft => "iptables-nft-restore",
        }
    }

    pub fn save_bin(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-save",
            Backend::Nft => "iptables-nft-save",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy (x_tables)",
            Backend::Nft => "iptables-nft (nf_tables)",
        }
    }

    /// Is this backend's restore tool installed?
    pub fn available(self) -> bool {
        Command::new(self.restore_bin())
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

// === impl Service ===

impl Service {
    /// A Service whose endpoints share connections equally.
    pub fn even(name: impl Into<String>, vip: SocketAddrV4, pods: &[SocketAddrV4]) -> Self {
        let share = 1.0 / pods.len() as f64;
        Service {
            name: name.into(),
            vip,
            endpoints: pods.iter().map(|p| (*p, share)).collect(),
        }
    }

    /// kube-proxy's chain names: a hash of the service port name (and the
    /// endpoint), 16 characters, after a fixed prefix.
    fn svc_chain(&self) -> String {
        format!("KUBE-SVC-{}", short_hash(&self.name))
    }

    fn sep_chain(&self, endpoint: &SocketAddrV4) -> String {
        format!(
            "KUBE-SEP-{}",
            short_hash(&format!("{}{endpoint}", self.name))
        )
    }
}

/// 16 characters of FNV-1a, in kube-proxy's base32 alphabet.
fn short_hash(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in s.bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    (0..16)
        .map(|i| ALPHABET[((h >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// The `nat` table for `services`, in `iptables-restore` format. The
/// services appear in `KUBE-SERVICES` in the order given, so the last one
/// is reached only after every rule before it missed.
pub fn ruleset(services: &[Service]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    let mut line = |s: String| {
        rules.push_str(&s);
        rules.push('\n');
    };
    line(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".into(),
    );
    line("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".into());
    line(
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"
            .into(),
    );
    line("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000".into());
    line("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".into());
    line("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0".into());
    line(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully"
            .into(),
    );
    for svc in services {
        let svc_chain = svc.svc_chain();
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let (vip, port) = (svc.vip.ip(), svc.vip.port());
        line(format!(
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{} cluster IP\" \
             -m tcp --dport {port} -j {svc_chain}",
            svc.name
        ));
        line(format!(
            "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {vip}/32 -p tcp -m comment --comment \"{} \
             cluster IP\" -m tcp --dport {port} -j KUBE-MARK-MASQ",
            svc.name
        ));
        // Endpoint i is taken with probability share_i / (what is left),
        // so the chain as a whole gives each endpoint its share.
        let mut left = 1.0_f64;
        let n = svc.endpoints.len();
        for (i, (ep, share)) in svc.endpoints.iter().enumerate() {
            let sep = svc.sep_chain(ep);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let stat = if i + 1 < n {
                let p = (share / left).clamp(0.0, 1.0);
                left -= share;
                format!(" -m statistic --mode random --probability {p:.11}")
            } else {
                String::new()
            };
            line(format!(
                "-A {svc_chain} -m comment --comment \"{} -> {ep}\"{stat} -j {sep}",
                svc.name
            ));
            line(format!(
                "-A {sep} -s {}/32 -m comment --comment \"{}\" -j KUBE-MARK-MASQ",
                ep.ip(),
                svc.name
            ));
            line(format!(
                "-A {sep} -p tcp -m comment --comment \"{}\" -m tcp -j DNAT --to-destination {ep}",
                svc.name
            ));
        }
    }
    line(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be \
         the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
            .into(),
    );
    format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n{chains}{rules}COMMIT\n"
    )
}

/// `count` Services `bench-NNNNN` on VIPs 10.100.x.y, each with one of
/// `pods` (round-robin), port `port`.
pub fn generated(count: usize, pods: &[SocketAddrV4], port: u16) -> Vec<Service> {
    (0..count)
        .map(|i| {
            Service::even(
                format!("prod/bench-{i:05}:http"),
                SocketAddrV4::new(generated_vip(i), port),
                &[pods[i % pods.len()]],
            )
        })
        .collect()
}

/// The ClusterIP of generated Service `i`: 10.100.(i / 250).(i % 250 + 1).
pub fn generated_vip(i: usize) -> Ipv4Addr {
    let (x, y) = (i / 250, i % 250 + 1);
    Ipv4Addr::new(10, 100, u8::try_from(x).unwrap_or(u8::MAX), y as u8)
}

/// Loads `rules` into `netns` (replacing its `nat` table) and returns how
/// long `iptables-restore` took and how many rules the table then holds.
pub fn install(backend: Backend, netns: &Netns, rules: &str) -> Result<(Duration, usize)> {
    let started = Instant::now();
    let mut cmd = Command::new(backend.restore_bin());
    cmd.arg("-w")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = spawn_in(cmd, Some(netns), None)?;
    {
        use std::io::Write as _;
        let mut stdin = child
            .child_mut()
            .stdin
            .take()
            .context("iptables-restore stdin")?;
        stdin
            .write_all(rules.as_bytes())
            .context("writing the ruleset to iptables-restore")?;
    }
    let out = child.wait_with_output(Duration::from_secs(120))?;
    if !out.status.success() {
        bail!(
            "{} in {} failed ({}): {}",
            backend.restore_bin(),
            netns.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let took = started.elapsed();
    let mut save = Command::new(backend.save_bin());
    save.args(["-t", "nat"]);
    let saved = canary_tests::run_in(save, Some(netns), None, Duration::from_secs(60))?;
    let count = saved.lines().filter(|l| l.starts_with("-A ")).count();
    Ok((took, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> SocketAddrV4 {
        s.parse().expect("endpoint")
    }

    #[test]
    fn weights_become_chained_probabilities() {
        let svc = Service {
            name: "prod/checkout-service:http".into(),
            vip: ep("10.96.0.10:8080"),
            endpoints: vec![
                (ep("10.77.0.11:8080"), 0.45),
                (ep("10.77.0.12:8080"), 0.45),
                (ep("10.77.0.21:8080"), 0.10),
            ],
        };
        let rules = ruleset(&[svc]);
        let probs: Vec<&str> = rules
            .lines()
            .filter_map(|l| l.split("--probability ").nth(1))
            .map(|rest| rest.split_whitespace().next().unwrap_or(""))
            .collect();
        // 0.45, then 0.45 of the remaining 0.55, then everything left.
        assert_eq!(probs, vec!["0.45000000000", "0.81818181818"]);
        assert!(rules.contains("-j DNAT --to-destination 10.77.0.21:8080"));
        assert!(rules.starts_with("*nat\n") && rules.ends_with("COMMIT\n"));
        // Every chain jumped to is declared.
        for target in rules.lines().filter_map(|l| l.split(" -j ").nth(1)) {
            let chain = target.split_whitespace().next().unwrap_or("");
            if chain.starts_with("KUBE-") {
                assert!(
                    rules.contains(&format!(":{chain} - ")),
                    "{chain} undeclared"
                );
            }
        }
    }

    #[test]
    fn generated_services_have_distinct_vips_and_chains() {
        let pods = [ep("10.77.0.11:8080"), ep("10.77.0.21:8080")];
        let svcs = generated(10_000, &pods, 8080);
        assert_eq!(generated_vip(0), Ipv4Addr::new(10, 100, 0, 1));
        assert_eq!(generated_vip(9_999), Ipv4Addr::new(10, 100, 39, 250));
        let vips: std::collections::BTreeSet<_> = svcs.iter().map(|s| s.vip).collect();
        assert_eq!(vips.len(), 10_000);
        let chains: std::collections::BTreeSet<_> = svcs.iter().map(Service::svc_chain).collect();
        assert_eq!(chains.len(), 10_000);
        assert!(chains.iter().all(|c| c.len() <= 28));
        assert_eq!(svcs[1].endpoints, vec![(pods[1], 1.0)]);
    }
}
