//! The `canary` binary: the node agent and the CLI that talks to it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};

use canary::admin::{self, protocol::Request};
use canary::agent::{self, AgentOptions};
use canary::dataplane::KernelLogLevel;

/// jemalloc: see `canary::agent::memory` for why, and for its settings.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc reads its options from this symbol when it starts (the
/// bindings prefix jemalloc's symbols with `_rjem_`).
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &[u8; agent::memory::JEMALLOC_CONF.len()] = agent::memory::JEMALLOC_CONF;

#[derive(Parser)]
#[command(
    name = "canary",
    version,
    about = "eBPF canary traffic splitter for Istio VirtualService/DestinationRule YAML"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: attach the kernel programs and serve the config.
    Agent(AgentArgs),
    /// Check a config file or directory; print a summary or every error.
    Validate {
        /// A YAML file or a directory of YAML files.
        path: PathBuf,
    },
    /// Change a service's split live: `canary weights checkout-service v1=90 v2=10`.
    Weights {
        /// Service host: FQDN, `name.namespace`, or a name unique on the node.
        host: String,
        /// New weights, SUBSET=WEIGHT (subsets not named get 0).
        #[arg(value_parser = parse_weight, required_unless_present = "reset")]
        weights: Vec<(String, i64)>,
        /// The route to change, by its VirtualService `name` (default: the
        /// route the kernel serves).
        #[arg(long)]
        route: Option<String>,
        /// Drop the live override and return to the file's weights.
        #[arg(long, conflicts_with = "weights")]
        reset: bool,
        #[arg(long, default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Show every service's split, endpoints and kernel counters.
    Status {
        /// Print the full report as JSON.
        #[arg(long)]
        json: bool,
        /// Refresh in place every SECONDS (default 2) until Ctrl-C, like `top`.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
        #[arg(long, default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
    },
    /// The workload a release build's profile-guided optimisation learns
    /// from (`cargo xtask build --release` runs it on an instrumented
    /// build): the shim serving deploy/examples to loopback clients.
    #[command(hide = true)]
    PgoTrain {
        /// Requests of the main phase; the other phases send a share of it.
        #[arg(long, default_value_t = 200_000)]
        requests: u64,
        /// Kept-alive client connections at once.
        #[arg(long, default_value_t = 32)]
        connections: usize,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// Config file or directory (Service, Pod, VirtualService, DestinationRule).
    #[arg(long, required_unless_present = "cleanup")]
    config: Option<PathBuf>,
    /// cgroup v2 directory whose processes canary serves (default: the root
    /// of the cgroup2 mount found in /proc/self/mounts).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Where maps and links are pinned (on bpffs).
    #[arg(long, default_value = "/sys/fs/bpf/canary")]
    pin_path: PathBuf,
    #[arg(long, default_value = admin::DEFAULT_SOCKET)]
    admin_socket: PathBuf,
    /// Live overrides and bookkeeping that must survive a restart.
    #[arg(long, default_value = "/run/canary/state")]
    state_dir: PathBuf,
    /// Kernel-side log level (aya-log); `debug` logs every connection.
    #[arg(long, value_enum, default_value_t = KernelLogLevel::Warn)]
    kernel_log_level: KernelLogLevel,
    /// Tell the connections canary steered apart in sockops by a map
    /// lookup per connecting socket, as on kernels before 6.12, instead
    /// of by the mark connect4 sets (for tests of that path).
    #[arg(long, hide = true)]
    sockops_lookup: bool,
    /// How many of the kernel's flow slots to use (1 to 262144, all by
    /// default); fewer send more flows to the overflow map (for tests of
    /// that path).
    #[arg(long, hide = true, default_value_t = canary_common::MAX_FLOWS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(canary_common::MAX_FLOWS)))]
    flow_slots: u32,
    /// Port of the L7 shim on each client namespace's loopback (127.0.0.1
    /// and ::1), where the kernel sends connections to services that need
    /// HTTP routing.
    #[arg(long, default_value_t = 15001)]
    shim_port: u16,
    /// Prometheus metrics (Istio's names), /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:15020")]
    metrics_addr: std::net::SocketAddr,
    /// Do not record per-request HTTP series (for measuring what they cost).
    #[arg(long)]
    no_request_metrics: bool,
    /// Suffix appended to the Host/:authority of mirrored requests, as Envoy
    /// and Istio ≤ 1.27 do; `--mirror-host-suffix ''` sends them unchanged
    /// (Istio ≥ 1.28's default).
    #[arg(long, default_value = "-shadow")]
    mirror_host_suffix: String,
    /// Pick the subset at random per request even with a consistentHash,
    /// as Istio does (by default canary's hash also picks the subset, so a
    /// session stays on one version).
    #[arg(long)]
    istio_random_subsets: bool,
    /// Mirror copies in flight at most; more are dropped and counted.
    #[arg(long, default_value_t = 256)]
    max_mirrors_in_flight: usize,
    /// Request bodies up to this size are buffered so they can be retried
    /// and mirrored; larger ones are neither.
    #[arg(long, default_value_t = 64 * 1024)]
    max_retry_body_bytes: usize,
    /// Detach and unpin everything canary put in the kernel, then exit.
    #[arg(long)]
    cleanup: bool,
}

fn parse_weight(s: &str) -> Result<(String, i64), String> {
    let (name, w) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not SUBSET=WEIGHT (e.g. v1=90)"))?;
    if name.is_empty() {
        return Err(format!("`{s}` has no subset name (e.g. v1=90)"));
    }
    let w = w
        .trim()
        .parse::<i64>()
        .map_err(|_| format!("weight `{w}` in `{s}` is not an integer (valid: 0 or more)"))?;
    Ok((name.to_string(), w))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Agent(a) => {
            if a.cleanup {
                agent::cleanup(&a.pin_path, &a.state_dir, &a.admin_socket)?;
                return Ok(ExitCode::SUCCESS);
            }
            let cgroup = match a.cgroup {
                Some(c) => c,
                None => canary::dataplane::cgroup2_mount()?,
            };
            let Some(config) = a.config else {
                bail!("--config is required")
            };
            let opts = AgentOptions {
                config,
                cgroup,
                pin_path: a.pin_path,
                admin_socket: a.admin_socket,
                state_dir: a.state_dir,
                kernel_log_level: a.kernel_log_level,
                sockops_lookup: a.sockops_lookup,
                flow_slots: a.flow_slots,
                shim_port: a.shim_port,
                metrics_addr: a.metrics_addr,
                no_request_metrics: a.no_request_metrics,
                shim: canary::shim::ShimOptions {
                    mirror_host_suffix: (!a.mirror_host_suffix.is_empty())
                        .then_some(a.mirror_host_suffix),
                    sticky_subsets: !a.istio_random_subsets,
                    max_mirrors_in_flight: a.max_mirrors_in_flight,
                    max_retry_body_bytes: a.max_retry_body_bytes,
                    ..Default::default()
                },
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(agent::run(opts))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { path } => match canary::config::load_path(&path) {
            Ok(cfg) => {
                for w in &cfg.warnings {
                    println!("warning: {w}");
                }
                print!(
                    "{}",
                    canary::compile::summary(&canary::compile::compile(&cfg))
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(errors) => {
                eprintln!("{} is invalid:\n{errors}", path.display());
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Weights {
            host,
            weights,
            route,
            reset,
            admin_socket,
        } => {
            let request = if reset {
                Request::Reset { host }
            } else {
                Request::Weights {
                    host,
                    route,
                    weights,
                }
            };
            let response = admin::client::call(&admin_socket, &request)?;
            println!("{}", response.message.unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Command::PgoTrain {
            requests,
            connections,
        } => {
            let reports = canary::train::run(canary::train::TrainOptions {
                requests,
                connections,
            })?;
            for r in reports {
                println!(
                    "pgo-train: {:<48} {:>7} requests ({} at the pods) in {:>6.2} s, statuses {:?}",
                    r.name,
                    r.requests,
                    r.served,
                    r.elapsed.as_secs_f64(),
                    r.statuses
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            json,
            watch,
            admin_socket,
        } => {
            loop {
                let response = admin::client::call(&admin_socket, &Request::Status)?;
                let status = response.status.context("the agent sent no status")?;
                let text = if json {
                    format!("{}\n", serde_json::to_string_pretty(&status)?)
                } else {
                    admin::render::status_table(&status)
                };
                match watch {
                    None => {
                        print!("{text}");
                        return Ok(ExitCode::SUCCESS);
                    }
                    Some(secs) => {
                        // Clear the screen and redraw from the top.
                        print!("\x1b[2J\x1b[H{text}");
                        std::io::Write::flush(&mut std::io::stdout())?;
                        std::thread::sleep(std::time::Duration::from_secs(secs.max(1)));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_arguments() {
        assert_eq!(parse_weight("v1=90"), Ok(("v1".into(), 90)));
        assert_eq!(
            parse_weight("v2=-5"),
            Ok(("v2".into(), -5)),
            "negative reaches the agent's check"
        );
        assert!(parse_weight("v1").unwrap_err().contains("SUBSET=WEIGHT"));
        assert!(parse_weight("=5").unwrap_err().contains("no subset"));
        assert!(
            parse_weight("v1=ten")
                .unwrap_err()
                .contains("not an integer")
        );
    }
}
