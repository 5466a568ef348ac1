//! Named network namespaces (`ip netns`), and running code inside one.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::ip::ip;

/// Where `ip netns add` pins named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// A named network namespace with `lo` up; deleted on drop.
///
/// Deleting the name frees the namespace (and destroys the veths inside it)
/// once no process is left in it, which is why process guards should drop
/// before this one.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

// === impl Netns ===

impl Netns {
    /// `ip netns add NAME`, then `lo` up inside.
    pub fn new(name: &str) -> Result<Self> {
        ip(None, &["netns", "add", name])
            .with_context(|| format!("creating network namespace {name}"))?;
        // From here on the guard owns the namespace, also if `lo` fails.
        let netns = Netns {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, for `nsenter --net=` or `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_RUN_DIR).join(&self.name)
    }

    /// Opens the namespace file (close-on-exec) for `setns`.
    pub fn open(&self) -> Result<File> {
        File::open(self.path())
            .with_context(|| format!("opening network namespace {}", self.path().display()))
    }

    /// Runs `ip -n NAME ARGS...` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        ip(Some(&self.name), args)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(None, &["netns", "del", &self.name]) {
            eprintln!("canary-tests: cleanup: {e:#}");
        }
    }
}

/// Runs `f` on a fresh thread that has joined `netns`.
///
/// `setns(CLONE_NEWNET)` changes only the calling thread, and that thread
/// ends with `f`, so the rest of the process stays where it was.
pub fn in_netns<F, R>(netns: &Netns, f: F) -> Result<R>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let file = netns.open()?;
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| -> Result<R> {
            // SAFETY: `file` is an open namespace fd for the whole call.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("setns into {}", netns.name()));
            }
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Waits until a TCP connect to `addr` succeeds, from inside `netns` (or
/// from the calling namespace), for at most `timeout`.
pub fn wait_for_tcp(netns: Option<&Netns>, addr: SocketAddr, timeout: Duration) -> Result<()> {
    let poll = move || -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = Duration::from_millis(200)
                .min(left)
                .max(Duration::from_millis(1));
            match TcpStream::connect_timeout(&addr, attempt) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!("nothing listens on {addr} after {timeout:?}: last error: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    };
    let where_ = netns.map_or("the current namespace", |n| n.name());
    match netns {
        Some(netns) => in_netns(netns, poll)?,
        None => poll(),
    }
    .with_context(|| format!("waiting for {addr} in {where_}"))
}
