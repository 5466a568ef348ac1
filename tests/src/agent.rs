//! The real `canary` binary as a test sees it: an agent process with its
//! own pin directory, admin socket and state directory (so tests never
//! touch `/sys/fs/bpf/canary` or another test's agent), and the CLI.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{ChildGuard, TestCgroup, spawn_in};

/// The `canary` binary: `$CANARY_BIN` (set by `cargo xtask test`), else
/// next to the running test binary.
pub fn canary_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CANARY_BIN") {
        return Ok(PathBuf::from(p));
    }
    crate::bin_path("canary").context("build canary first: `cargo xtask build`")
}

pub struct Agent {
    child: Option<ChildGuard>,
    pub bin: PathBuf,
    pub config: PathBuf,
    pub cgroup: PathBuf,
    pub pin_path: PathBuf,
    pub run_dir: PathBuf,
    pub log: PathBuf,
    /// Where this agent serves `/metrics` (a free loopback port).
    pub metrics_addr: std::net::SocketAddr,
    /// More `canary agent` arguments (see [`Agent::start_at_with_args`]).
    extra_args: Vec<String>,
}

impl Agent {
    /// Starts `canary agent` on `config` for the processes of `cgroup`, and
    /// waits until its admin socket answers (which it does only once the
    /// config is in the kernel).
    pub fn start(prefix: &str, config: &Path, cgroup: &TestCgroup) -> Result<Self> {
        Self::start_at(
            config,
            cgroup.path(),
            PathBuf::from(format!("/sys/fs/bpf/canary-test-{prefix}")),
            PathBuf::from(format!("/run/canary-test-{prefix}")),
        )
    }

    /// Like [`Agent::start`] with explicit pin and run directories (the
    /// socket is `<run_dir>/canary.sock`, state `<run_dir>/state`). The demo
    /// uses the defaults, `/sys/fs/bpf/canary` and `/run/canary`, so the
    /// CLI works there without flags.
    pub fn start_at(
        config: &Path,
        cgroup: &Path,
        pin_path: PathBuf,
        run_dir: PathBuf,
    ) -> Result<Self> {
        std::fs::create_dir_all(&run_dir)?;
        let mut agent = Self {
            child: None,
            bin: canary_bin()?,
            config: config.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
            pin_path,
            log: run_dir.join("agent.log"),
            run_dir,
            metrics_addr: free_loopback_port()?,
            extra_args: Vec::new(),
        };
        agent.spawn()?;
        Ok(agent)
    }

    /// Like [`Agent::start_at`], with more `canary agent` arguments after
    /// the usual ones (e.g. `--shim-port 15101`, `--no-request-metrics`);
    /// [`Agent::restart`] keeps them.
    pub fn start_at_with_args(
        config: &Path,
        cgroup: &Path,
        pin_path: PathBuf,
        run_dir: PathBuf,
        extra: &[&str],
    ) -> Result<Self> {
        std::fs::create_dir_all(&run_dir)?;
        let mut agent = Self {
            child: None,
            bin: canary_bin()?,
            config: config.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
            pin_path,
            log: run_dir.join("agent.log"),
            run_dir,
            metrics_addr: free_loopback_port()?,
            extra_args: extra.iter().map(|a| (*a).to_owned()).collect(),
        };
        agent.spawn()?;
        Ok(agent)
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::pid)
    }

    /// Has the agent process exited?
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("canary.sock")
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("agent")
            .arg("--config")
            .arg(&self.config)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .arg("--admin-socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.run_dir.join("state"))
            .arg("--metrics-addr")
            .arg(self.metrics_addr.to_string())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = spawn_in(cmd, None, None)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "canary agent exited early ({status}); log:\n{}",
                    self.log_text()
                );
            }
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "canary agent not ready after 30 s; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, as an OOM kill or a node hiccup would; waits for the exit.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill_with(libc::SIGKILL)?;
            child.wait_timeout(Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Starts the agent again on the same pins, socket and state.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9()?;
        self.spawn()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the CLI (`canary ARGS --admin-socket <ours>`).
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let out = Command::new(&self.bin)
            .args(args)
            .arg("--admin-socket")
            .arg(self.socket())
            .output()?;
        Ok(out)
    }

    /// Runs the CLI with exactly `args` (commands that take no socket,
    /// such as `validate`).
    pub fn cli_plain(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(&self.bin).args(args).output()?)
    }

    /// `canary status --json`, parsed.
    pub fn status(&self) -> Result<Value> {
        let out = self.cli(&["status", "--json"])?;
        if !out.status.success() {
            bail!(
                "canary status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `canary weights HOST W...`; returns stdout, or the error text.
    pub fn weights(&self, host: &str, weights: &[&str]) -> Result<String> {
        let mut args = vec!["weights", host];
        args.extend_from_slice(weights);
        let out = self.cli(&args)?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- canary agent log ({}) ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.terminate(Duration::from_secs(10));
        }
        // Unpin everything this agent attached, even if the test failed.
        let _ = Command::new(&self.bin)
            .args(["agent", "--cleanup", "--pin-path"])
            .arg(&self.pin_path)
            .arg("--state-dir")
            .arg(self.run_dir.join("state"))
            .arg("--admin-socket")
            .arg(self.socket())
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// A loopback address with a port nobody listens on right now.
fn free_loopback_port() -> Result<std::net::SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// Walks a status report: the destinations of `host`'s first port.
pub fn destinations<'a>(status: &'a Value, host: &str) -> Vec<&'a Value> {
    status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["host"] == host)
        .flat_map(|s| {
            s["ports"][0]["destinations"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .collect()
}

/// One kernel counter (`opened`, `failed`, `bytes_received`, ...) summed
/// over every destination of `host` in a `canary status --json` answer.
pub fn counter_total(status: &Value, host: &str, field: &str) -> u64 {
    destinations(status, host)
        .iter()
        .map(|d| d["counters"][field].as_u64().unwrap_or(0))
        .sum()
}
