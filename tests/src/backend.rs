//! `canary-backend`, the demo and test HTTP server: its arguments and a
//! helper that starts it inside a host's namespace and waits until it
//! listens.
//!
//! Every response carries the body `"<version> <pod>\n"` and the headers
//! `x-canary-version`, `x-canary-pod` and `x-canary-host` (the request's
//! `Host`), so a client can tell which backend answered.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::cgroup::TestCgroup;
use crate::netns::{Netns, wait_for_tcp};
use crate::process::{ChildGuard, spawn_in};

/// The binary's name, for [`crate::bin_path`].
pub const BACKEND_BIN: &str = "canary-backend";

/// How long [`BackendSpec::spawn`] waits for the listeners.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Arguments of `canary-backend`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    /// `--listen`, one or more.
    pub listen: Vec<SocketAddr>,
    /// `--version`, e.g. `v1`.
    pub version: String,
    /// `--pod`, e.g. `checkout-v1-a`.
    pub pod: String,
    /// `--delay-ms`: wait this long before each response.
    pub delay: Duration,
    /// `--fail-first`: the first N requests answer `fail_status`.
    pub fail_first: u64,
    /// `--fail-status` (503 by default).
    pub fail_status: u16,
    /// `--fail-every N`: every Nth request answers `fail_status`.
    pub fail_every: u64,
    /// `--log PATH`: one JSON line per request received.
    pub log: Option<std::path::PathBuf>,
    /// `--verbose`: one line per request on stderr.
    pub verbose: bool,
}

/// The body `canary-backend` answers with.
pub fn response_body(version: &str, pod: &str) -> String {
    format!("{version} {pod}\n")
}

// === impl BackendSpec ===

impl BackendSpec {
    pub fn new(version: impl Into<String>, pod: impl Into<String>) -> Self {
        BackendSpec {
            listen: Vec::new(),
            version: version.into(),
            pod: pod.into(),
            delay: Duration::ZERO,
            fail_first: 0,
            fail_status: 503,
            fail_every: 0,
            log: None,
            verbose: false,
        }
    }

    /// Every `n`th request answers `status`.
    pub fn fail_every(mut self, n: u64, status: u16) -> Self {
        self.fail_every = n;
        self.fail_status = status;
        self
    }

    /// Log every request received to `path` (JSON lines).
    pub fn log(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen.push(addr);
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn fail_first(mut self, n: u64, status: u16) -> Self {
        self.fail_first = n;
        self.fail_status = status;
        self
    }

    pub fn verbose(mut self) -> Self {
        self.verbose = true;
        self
    }

    /// The command line for `canary-backend`.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for addr in &self.listen {
            args.extend(["--listen".to_owned(), addr.to_string()]);
        }
        args.extend([
            "--version".to_owned(),
            self.version.clone(),
            "--pod".to_owned(),
            self.pod.clone(),
        ]);
        if !self.delay.is_zero() {
            args.extend(["--delay-ms".to_owned(), self.delay.as_millis().to_string()]);
        }
        if self.fail_first > 0 {
            args.extend([
                "--fail-first".to_owned(),
                self.fail_first.to_string(),
                "--fail-status".to_owned(),
                self.fail_status.to_string(),
            ]);
        }
        if self.fail_every > 0 {
            args.extend([
                "--fail-every".to_owned(),
                self.fail_every.to_string(),
                "--fail-status".to_owned(),
                self.fail_status.to_string(),
            ]);
        }
        if let Some(log) = &self.log {
            args.extend(["--log".to_owned(), log.display().to_string()]);
        }
        if self.verbose {
            args.push("--verbose".to_owned());
        }
        args
    }

    /// Starts `canary-backend` (at `bin`) in `netns` (and `cgroup`, if
    /// any), stderr inherited, and returns once every listen address
    /// accepts connections.
    pub fn spawn(
        &self,
        bin: &Path,
        netns: Option<&Netns>,
        cgroup: Option<&TestCgroup>,
    ) -> Result<ChildGuard> {
        if self.listen.is_empty() {
            bail!("backend {}: no listen address", self.pod);
        }
        let mut cmd = Command::new(bin);
        cmd.args(self.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mut child = spawn_in(cmd, netns, cgroup)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        for addr in &self.listen {
            loop {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "backend {} exited before listening on {addr}: {status}",
                        self.pod
                    );
                }
                match wait_for_tcp(netns, *addr, Duration::from_millis(100)) {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(e.context(format!("backend {} not ready", self.pod)));
                    }
                    Err(_) => {}
                }
            }
        }
        Ok(child)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_command_line() -> Result<()> {
        let spec = BackendSpec::new("v2", "checkout-v2-a")
            .listen("10.77.0.11:8080".parse()?)
            .listen("[fd00:77::11]:8080".parse()?)
            .fail_first(3, 502)
            .delay(Duration::from_millis(5));
        assert_eq!(
            spec.to_args().join(" "),
            "--listen 10.77.0.11:8080 --listen [fd00:77::11]:8080 --version v2 \
             --pod checkout-v2-a --delay-ms 5 --fail-first 3 --fail-status 502"
        );
        assert_eq!(response_body("v2", "checkout-v2-a"), "v2 checkout-v2-a\n");
        Ok(())
    }
}
