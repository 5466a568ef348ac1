//! The release build of `canary`, with profile-guided optimisation.
//!
//! 1. An instrumented build (`-Cprofile-generate`) in `target/pgo/instrumented`.
//! 2. `canary pgo-train` on it: the shim serving `deploy/examples/` to
//!    loopback clients (no privileges; see `canary-user/src/train.rs`).
//! 3. `llvm-profdata merge` of what it recorded.
//! 4. The optimised build (`-Cprofile-use`) in `target/pgo/optimized`,
//!    copied to `target/release/canary`.
//!
//! Separate target directories: each build keeps its own compiled
//! dependencies, so a rebuild does not evict the other's. The test helpers
//! (backend, probe, http client) are a plain release build in
//! `target/release`.
//!
//! Why: LLVM lays out and inlines the shim's request path (async state
//! machines across tokio, hyper and the shim) from what it saw run; the
//! README's "Benchmarks" has the figures (the shim's user time per request
//! roughly halves).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, Result, bail};

use crate::setup::{LLVM_PREFIX, run, say};

/// The LLVM major version of the pinned llvm-22 packages; rustc's must
/// match it for llvm-profdata to read the instrumented build's profiles.
const LLVM_MAJOR: &str = "22";

/// Builds the release binaries once per xtask run (the L4 and L7 benches
/// both ask).
pub fn build_release(pgo: bool) -> Result<()> {
    static DONE: OnceLock<()> = OnceLock::new();
    if DONE.get().is_some() {
        return Ok(());
    }
    say("release build: the test helpers (backend, probe, http client)");
    run(crate::cargo().args(["build", "--release", "-p", "canary-tests", "--bins"]))?;
    if pgo {
        build_canary_pgo()?;
    } else {
        say("release build: canary without profile-guided optimisation (--no-pgo)");
        run(crate::cargo().args(["build", "--release", "-p", "canary-user"]))?;
    }
    let _ = DONE.set(());
    Ok(())
}

fn build_canary_pgo() -> Result<()> {
    let profdata = llvm_profdata()?;
    let target = PathBuf::from(crate::bench::target_dir());
    std::fs::create_dir_all(target.join("pgo"))?;
    let pgo = std::fs::canonicalize(target.join("pgo"))?;
    let instrumented = pgo.join("instrumented");
    let optimized = pgo.join("optimized");
    let raw = pgo.join("profiles");
    let merged = pgo.join("canary.profdata");

    say(format!(
        "release build 1/4: instrumented canary (-Cprofile-generate) in {}",
        instrumented.display()
    ));
    build_canary(
        &instrumented,
        &format!("-Cprofile-generate={}", raw.display()),
    )?;

    // Build scripts are instrumented too and wrote profiles while building;
    // only the training run's belong in the merge.
    let _ = std::fs::remove_dir_all(&raw);
    std::fs::create_dir_all(&raw)?;
    say(
        "release build 2/4: training run (`canary pgo-train`: the shim on loopback, deploy/examples)",
    );
    run(Command::new(instrumented.join("release/canary"))
        .arg("pgo-train")
        .env("LLVM_PROFILE_FILE", raw.join("canary-%p-%m.profraw")))?;

    say(format!(
        "release build 3/4: merging the profiles ({})",
        profdata.display()
    ));
    let profiles: Vec<PathBuf> = std::fs::read_dir(&raw)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "profraw"))
        .collect();
    if profiles.is_empty() {
        bail!(
            "the training run wrote no profile into {}: the instrumented build did not record",
            raw.display()
        );
    }
    run(Command::new(&profdata)
        .args(["merge", "-o"])
        .arg(&merged)
        .args(&profiles))?;

    say(format!(
        "release build 4/4: canary optimised with the profile (-Cprofile-use) in {}",
        optimized.display()
    ));
    build_canary(&optimized, &format!("-Cprofile-use={}", merged.display()))?;
    let release = target.join("release");
    std::fs::create_dir_all(&release)?;
    install(&optimized.join("release/canary"), &release.join("canary"))?;
    say(format!(
        "release build: {} (profile-guided)",
        release.join("canary").display()
    ));
    Ok(())
}

/// A release build of canary in `target_dir` with `flag` in the rustflags
/// of the host target only (not the eBPF object, which canary-user's
/// build.rs builds with its own cargo).
fn build_canary(target_dir: &Path, flag: &str) -> Result<()> {
    let host = rustc_field("host")?;
    run(crate::cargo()
        .args(["build", "--release", "-p", "canary-user", "--target-dir"])
        .arg(target_dir)
        .arg("--config")
        .arg(format!("target.{host}.rustflags=[\"{flag}\"]")))
}

fn rustc_field(name: &str) -> Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_owned))
        .with_context(|| format!("rustc -vV printed no `{name}:` line"))
}

/// llvm-profdata of the LLVM that rustc uses (profiles are LLVM-version
/// specific).
fn llvm_profdata() -> Result<PathBuf> {
    let llvm = rustc_field("LLVM version")?;
    if llvm.split('.').next() != Some(LLVM_MAJOR) {
        bail!(
            "rustc uses LLVM {llvm}, but the profile tools here are LLVM {LLVM_MAJOR}'s \
             ({LLVM_PREFIX}): profiles of one cannot be read by the other. Build with \
             `cargo xtask build --release --no-pgo`, or install llvm-profdata of LLVM {llvm}"
        );
    }
    let p = Path::new(LLVM_PREFIX).join("bin/llvm-profdata");
    if !p.is_file() {
        bail!(
            "{} is missing (it comes with the llvm-{LLVM_MAJOR} package, which llvm-{LLVM_MAJOR}-dev \
             pulls in): run `cargo xtask setup`, or build with --no-pgo",
            p.display()
        );
    }
    Ok(p)
}

/// Copies through a temporary name, so a running agent's binary is
/// replaced, not rewritten in place.
fn install(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("pgo-tmp");
    std::fs::copy(from, &tmp).with_context(|| format!("copying {}", from.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("installing {}", to.display()))?;
    Ok(())
}
