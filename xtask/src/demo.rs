//! `cargo xtask run`: the checkout example, live on this machine.
//!
//! Network namespaces for the v1 (two pods) and v2 (one pod) backends and a
//! client, all joined by a bridge in a namespace of their own; the client
//! in a cgroup the agent attaches to; the agent serving
//! `deploy/examples/checkout`. Ctrl-C tears it all down.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use canary_tests::{agent::Agent, bin_path, checkout, run_in, unique_prefix};

use crate::setup::say;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn run(config: &str) -> Result<()> {
    canary_tests::require_root();
    let config = std::fs::canonicalize(config).with_context(|| format!("config {config}"))?;
    let prefix = unique_prefix();
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    say(format!(
        "building the demo topology (namespaces {prefix}-*)"
    ));
    let world = checkout::Checkout::start(&prefix, &bin_path("canary-backend")?)?;
    say(format!(
        "starting canary agent on {} for cgroup {}",
        config.display(),
        world.cgroup.path().display()
    ));
    let mut agent = Agent::start_at(
        &config,
        world.cgroup.path(),
        "/sys/fs/bpf/canary".into(),
        "/run/canary".into(),
    )?;

    say("20 requests from the client to http://10.96.0.10:8080/ :");
    let mut curl = Command::new("sh");
    curl.args(["-c", "for i in $(seq 20); do curl -s --max-time 2 http://10.96.0.10:8080/; done | sort | uniq -c"]);
    let out = run_in(
        curl,
        Some(world.client.netns()),
        Some(&world.cgroup),
        Duration::from_secs(30),
    )?;
    println!("{out}");

    let canary = agent.bin.display().to_string();
    println!(
        "canary is serving {config} on the checkout pods. In another terminal, as root:\n\n\
         \x20 # a shell in the demo client's network namespace and cgroup\n\
         \x20 nsenter --net=/run/netns/{prefix}-client sh -c 'echo $$ > {cg}/cgroup.procs && exec bash'\n\
         \x20 for i in $(seq 100); do curl -s http://10.96.0.10:8080/; done | sort | uniq -c\n\
         \x20 curl -s 'http://[fd00:96::10]:8080/'\n\n\
         \x20 # change the split live, look at it, go back to the file\n\
         \x20 {canary} weights checkout-service v1=50 v2=50\n\
         \x20 {canary} status\n\
         \x20 {canary} weights checkout-service --reset\n\n\
         \x20 # edit {config}/virtualservice.yaml: the agent reloads within a second\n\n\
         Ctrl-C here tears everything down.",
        cg = world.cgroup.path().display(),
        config = config.display(),
    );
    while !STOP.load(Ordering::SeqCst) {
        if agent.exited() {
            say(format!("the agent exited; its log:\n{}", agent.log_text()));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    say("tearing down: agent, pins, backends, cgroup, namespaces");
    drop(agent);
    drop(world);
    Ok(())
}
