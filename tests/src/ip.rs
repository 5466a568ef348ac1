//! Thin wrappers over iproute2's `ip`, the one tool that configures links.
//!
//! `ip -n NAME` switches only its own process into the namespace, so the
//! calling test keeps its namespaces and mounts.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Runs `ip [-n NETNS] ARGS...` and returns its stdout.
pub(crate) fn ip(netns: Option<&str>, args: &[&str]) -> Result<String> {
    let mut cmd = command(netns);
    cmd.args(args);
    let rendered = render(netns, args);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{rendered}`"))?;
    if !out.status.success() {
        bail!(
            "`{rendered}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs many `ip` commands in one process (`ip -batch -`), one per line.
pub(crate) fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = command(netns);
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running `{}`", render(netns, &["-batch", "-"])))?;
    let mut script = lines.join("\n");
    script.push('\n');
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .context("writing to `ip -batch -`")?;
    }
    let out = child
        .wait_with_output()
        .context("waiting for `ip -batch`")?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}\nscript:\n{script}",
            render(netns, &["-batch", "-"]),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn command(netns: Option<&str>) -> Command {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd
}

fn render(netns: Option<&str>, args: &[&str]) -> String {
    let ns = netns.map(|n| format!("-n {n} ")).unwrap_or_default();
    format!("ip {ns}{}", args.join(" "))
}
