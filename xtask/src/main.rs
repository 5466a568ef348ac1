//! `cargo xtask`: the project's entry points.
//!
//! - `setup`: check/install the toolchain (nightly + rust-src, llvm-22-dev,
//!   bpf-linker) and the test tools.
//! - `run`: build and start the local demo topology with the agent.
//! - `test`: formatting, clippy, unit tests, then the privileged end-to-end
//!   tests on real kernel objects.
//! - `bench`: canary beside its peers, as ratios.

mod bench;
mod bench_l7;
mod demo;
mod pgo;
mod setup;

use std::process::Command;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use setup::{run, say};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check and install the toolchain and test tools.
    Setup,
    /// Build canary (agent with its kernel object, and the test helpers).
    Build {
        /// Optimised build; canary itself with profile-guided optimisation
        /// (an instrumented build, a training run, the optimised build).
        #[arg(long)]
        release: bool,
        /// With --release: skip the profile-guided optimisation.
        #[arg(long, requires = "release")]
        no_pgo: bool,
    },
    /// Start the local demo: v1/v2 backends, a client, and the agent.
    Run {
        /// Config to serve (default: deploy/examples/checkout).
        #[arg(long, default_value = "deploy/examples/checkout")]
        config: String,
    },
    /// Run every test: fmt, clippy, unit, privileged end-to-end.
    Test {
        /// Only run end-to-end tests whose name contains this.
        filter: Option<String>,
    },
    /// Benchmark canary beside direct connections and kube-proxy iptables.
    Bench(bench_l7::BenchAll),
}

fn main() -> Result<()> {
    // Work from the workspace root whatever the caller's directory.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::set_current_dir(&root)?;
    match Cli::parse().command {
        Cmd::Setup => {
            setup::build_tools()?;
            setup::test_tools()
        }
        Cmd::Build { release, no_pgo } => {
            setup::build_tools()?;
            if release {
                pgo::build_release(!no_pgo)
            } else {
                build_debug()
            }
        }
        Cmd::Run { config } => {
            setup::build_tools()?;
            setup::test_tools()?;
            build_debug()?;
            demo::run(&config)
        }
        Cmd::Test { filter } => {
            setup::build_tools()?;
            setup::test_tools()?;
            test(filter)
        }
        Cmd::Bench(args) => {
            setup::build_tools()?;
            if args.l7.with_l4() {
                bench::run(args.l4)?;
            }
            bench_l7::run(&args.l7)
        }
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn build_debug() -> Result<()> {
    say("building canary (kernel object via canary-user/build.rs) and the test helpers");
    run(cargo().args(["build", "-p", "canary-user", "-p", "canary-tests", "--bins"]))
}

fn test(filter: Option<String>) -> Result<()> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        let msg = "the end-to-end tests need root (network namespaces, cgroups, BPF)";
        if ci {
            bail!("{msg}; CI=true, so this is a failure, not a skip");
        }
        bail!("{msg}: run `sudo -E cargo xtask test`");
    }
    say("checking formatting (cargo fmt --check)");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    say("linting userspace crates (cargo clippy -D warnings)");
    // The default members: canary-ebpf only builds for the bpf target.
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    say("unit tests (cargo test)");
    run(cargo().args(["test"]))?;
    build_debug()?;
    say("privileged end-to-end tests: real agent, real kernel programs, real sockets");
    let mut cmd = cargo();
    cmd.args([
        "test",
        "-p",
        "canary-tests",
        "--",
        "--ignored",
        "--test-threads=1",
    ]);
    if let Some(f) = filter {
        cmd.arg(f);
    }
    cmd.env("CANARY_BIN", std::fs::canonicalize("target/debug/canary")?);
    run(&mut cmd)
}
