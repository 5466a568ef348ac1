//! `canary agent`: load and attach the kernel programs, push the config,
//! then serve the admin socket and watch the files until told to stop.
//! Stopping (even SIGKILL) leaves the pinned data path running.

pub mod memory;
mod netns;
mod overrides;
mod shim_host;
mod state;
mod status;
mod telemetry;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::io::unix::AsyncFd;

use crate::admin::server::{self, SocketGuard};
use crate::dataplane::{Dataplane, DataplaneOptions, KernelLogLevel};
pub use state::Agent;

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub config: PathBuf,
    pub cgroup: PathBuf,
    pub pin_path: PathBuf,
    pub admin_socket: PathBuf,
    pub state_dir: PathBuf,
    pub kernel_log_level: KernelLogLevel,
    /// Force sockops' pre-6.12 way of finding steered sockets (tests).
    pub sockops_lookup: bool,
    /// Flow slots the kernel uses (fewer only in tests).
    pub flow_slots: u32,
    /// Port of the shim's listeners on each client namespace's loopback.
    pub shim_port: u16,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics_addr: std::net::SocketAddr,
    /// Record no per-request HTTP series (the shim reports to nobody);
    /// kernel TCP series and the health endpoints stay.
    pub no_request_metrics: bool,
    pub shim: crate::shim::ShimOptions,
}

pub async fn run(opts: AgentOptions) -> Result<()> {
    // Before anything is created or pinned.
    crate::dataplane::check_cgroup(&opts.cgroup)?;
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("creating state dir {}", opts.state_dir.display()))?;
    check_attachment(&opts)?;
    let (dataplane, logger) = Dataplane::open(&DataplaneOptions {
        pin_path: opts.pin_path.clone(),
        cgroup: opts.cgroup.clone(),
        log_level: opts.kernel_log_level,
        sockops_lookup: opts.sockops_lookup,
        flow_slots: opts.flow_slots,
    })?;
    tracing::info!(cgroup = %opts.cgroup.display(), pins = %opts.pin_path.display(), "kernel programs attached");
    if let Some(logger) = logger {
        tokio::spawn(forward_kernel_logs(logger));
    }
    let overrides = overrides::Overrides::load(&opts.state_dir)?;
    let orig = crate::dataplane::orig_dst::OrigDst::open(&opts.pin_path)?;
    let own_cookie = crate::dataplane::identities::own_cookie()
        .context("reading our network namespace cookie")?;
    let metrics = crate::metrics::Metrics::new();
    let observer: Arc<dyn crate::observe::RequestObserver> = if opts.no_request_metrics {
        Arc::new(crate::observe::NoopObserver)
    } else {
        metrics.clone()
    };
    let shim_options = opts.shim.clone();
    let shim = shim_host::ShimHost::new(opts.shim_port, orig, own_cookie, move |connector| {
        crate::shim::Shim::new(shim_options, connector, observer)
    })?;
    let agent = Arc::new(Agent::new(
        opts.clone(),
        dataplane,
        overrides,
        shim,
        metrics.clone(),
    ));
    {
        // Every scrape sees the kernel counters as they are now.
        let agent = agent.clone();
        metrics.on_scrape(move |_| agent.export_kernel_metrics());
    }

    // A bad config at start is reported but not fatal: whatever a previous
    // agent left in the kernel keeps serving until the files are fixed.
    // Listeners first, so a service the config sends to the shim is
    // served from its first connection.
    agent.refresh_namespaces().await;
    let _ = agent.reload();
    let mut seen = watch::fingerprint(&opts.config);

    // The socket appears only once the first config is in the kernel, so
    // "socket answers" means "ready".
    let ready: crate::metrics::Readiness = {
        let agent = agent.clone();
        Arc::new(move || agent.ready())
    };
    let metrics_listener = tokio::net::TcpListener::bind(opts.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics address {}", opts.metrics_addr))?;
    tokio::spawn(crate::metrics::serve_listener(
        metrics_listener,
        metrics.clone(),
        ready,
    ));
    tracing::info!(addr = %opts.metrics_addr, "metrics at /metrics, /healthz, /readyz");

    let listener = server::bind(&opts.admin_socket)?;
    let _socket = SocketGuard(opts.admin_socket.clone());
    tokio::spawn(server::serve(listener, agent.clone()));
    tracing::info!(socket = %opts.admin_socket.display(), "admin socket ready");

    // Loading parsed the kernel's BTF and the object: give that back.
    memory::release_free_heap();
    let mut trimmer = memory::Trimmer::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Pods come and go: their namespaces are rescanned when the
                // listing changes.
                agent.refresh_namespaces().await;
                agent.sync_ejections();
                agent.advance_flow_epoch();
                agent.expire_idle_upstreams();
                trimmer.tick(agent.shim_requests());
                let now = watch::fingerprint(&opts.config);
                if now != seen {
                    // Editors and scripts write files in steps (truncate,
                    // then write; one file, then the next): wait until the
                    // files hold still, so a half-written state is never
                    // validated and applied.
                    seen = watch::settle(&opts.config, now).await;
                    tracing::info!(config = %opts.config.display(), "config files changed; reloading");
                    let reloader = agent.clone();
                    let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
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
