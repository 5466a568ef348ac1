//! `canary agent`: load and attach the kernel programs, push the config,
//! then serve the admin socket and watch the files until told to stop.
//! Stopping (even SIGKILL) leaves the pinned data path running.

mod overrides;
mod state;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::io::unix::AsyncFd;

use crate::admin::server::{self, SocketGuard};
use crate::dataplane::{Dataplane, DataplaneOptions, KernelLogLevel};
pub use state::Agent;

/// Seconds between rescans of /run/netns for client identities.
const IDENTITY_RESCAN_TICKS: u64 = 5;

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub config: PathBuf,
    pub cgroup: PathBuf,
    pub pin_path: PathBuf,
    pub admin_socket: PathBuf,
    pub state_dir: PathBuf,
    pub kernel_log_level: KernelLogLevel,
}

pub async fn run(opts: AgentOptions) -> Result<()> {
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("creating state dir {}", opts.state_dir.display()))?;
    check_attachment(&opts)?;
    let (dataplane, logger) = Dataplane::open(&DataplaneOptions {
        pin_path: opts.pin_path.clone(),
        cgroup: opts.cgroup.clone(),
        log_level: opts.kernel_log_level,
    })?;
    tracing::info!(cgroup = %opts.cgroup.display(), pins = %opts.pin_path.display(), "kernel programs attached");
    if let Some(logger) = logger {
        tokio::spawn(forward_kernel_logs(logger));
    }
    let overrides = overrides::Overrides::load(&opts.state_dir)?;
    let agent = Arc::new(Agent::new(opts.clone(), dataplane, overrides));

    // A bad config at start is reported but not fatal: whatever a previous
    // agent left in the kernel keeps serving until the files are fixed.
    agent.refresh_client_identities();
    let _ = agent.reload();
    let mut seen = watch::fingerprint(&opts.config);

    // The socket appears only once the first config is in the kernel, so
    // "socket answers" means "ready".
    let listener = server::bind(&opts.admin_socket)?;
    let _socket = SocketGuard(opts.admin_socket.clone());
    tokio::spawn(server::serve(listener, agent.clone()));
    tracing::info!(socket = %opts.admin_socket.display(), "admin socket ready");

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                ticks += 1;
                // Pods come and go: rescan their namespaces every few seconds.
                if ticks.is_multiple_of(IDENTITY_RESCAN_TICKS) {
                    let agent = agent.clone();
                    let _ = tokio::task::spawn_blocking(move || agent.refresh_client_identities()).await;
                }
                let now = watch::fingerprint(&opts.config);
                if now != seen {
                    seen = now;
                    tracing::info!(config = %opts.config.display(), "config files changed; reloading");
                    let agent = agent.clone();
                    let _ = tokio::task::spawn_blocking(move || agent.reload()).await;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    tracing::info!(
        "stopping; the pinned data path keeps serving (`canary agent --cleanup` removes it)"
    );
    Ok(())
}

/// Pinned links belong to one cgroup. Refuse to adopt them for another,
/// which would silently leave the new cgroup unserved.
fn check_attachment(opts: &AgentOptions) -> Result<()> {
    let record = opts.state_dir.join("cgroup");
    let links = opts.pin_path.join("links");
    let ours = opts
        .cgroup
        .canonicalize()
        .unwrap_or_else(|_| opts.cgroup.clone());
    if links.exists()
        && let Ok(prev) = std::fs::read_to_string(&record)
        && ours != Path::new(prev.trim())
    {
        bail!(
            "the pinned data path at {} is attached to cgroup {}, not {}; \
             use --cgroup {} or run `canary agent --cleanup` first",
            opts.pin_path.display(),
            prev.trim(),
            ours.display(),
            prev.trim()
        );
    }
    std::fs::write(&record, ours.display().to_string())?;
    Ok(())
}

/// aya-log records from the kernel's ring buffer, forwarded to our logs.
async fn forward_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd
    // holds the logger, and always reports that same fd.
    let Ok(mut fd) =
        (unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) })
    else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// `canary agent --cleanup`: unpin everything and forget overrides.
pub fn cleanup(
    pin_path: &std::path::Path,
    state_dir: &std::path::Path,
    socket: &std::path::Path,
) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        bail!(
            "a canary agent is still answering on {}; stop it before --cleanup",
            socket.display()
        );
    }
    let removed = crate::dataplane::cleanup(pin_path)?;
    for f in ["overrides.json", "cgroup"] {
        let _ = std::fs::remove_file(state_dir.join(f));
    }
    let _ = std::fs::remove_dir(state_dir);
    println!(
        "removed {} pins under {} (programs detached from the cgroup, maps freed)",
        removed.len(),
        pin_path.display()
    );
    Ok(())
}
