//! Checks, and installs when missing, what building and testing canary
//! needs on a fresh Debian machine. Every step says what it does.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// The eBPF toolchain: must equal canary-ebpf/rust-toolchain.toml and use
/// the same LLVM major as bpf-linker (see shared KERNEL-NOTES).
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";
pub const BPF_LINKER_VERSION: &str = "0.13.0";
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Debian packages: the LLVM that bpf-linker links against, and the tools
/// the tests and the demo drive (iproute2 for namespaces, curl and wrk as
/// real clients, prometheus for its server and promtool).
const BUILD_PACKAGES: &[&str] = &["llvm-22-dev", "libzstd-dev", "zlib1g-dev"];
const TEST_PACKAGES: &[&str] = &["iproute2", "curl", "wrk", "prometheus"];

pub fn say(msg: impl AsRef<str>) {
    eprintln!("xtask: {}", msg.as_ref());
}

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Everything needed to build the kernel object and the agent.
pub fn build_tools() -> Result<()> {
    ensure_packages(BUILD_PACKAGES)?;
    ensure_ebpf_toolchain()?;
    ensure_bpf_linker()
}

/// Everything the end-to-end tests and the demo use.
pub fn test_tools() -> Result<()> {
    ensure_packages(TEST_PACKAGES)?;
    // A real gRPC client and server (tests/grpc/echo.py) for the h2c tests.
    ensure_python_module("grpc", "grpcio")
}

/// `pip install` a PyPI package unless `python3 -c "import MODULE"` works.
pub fn ensure_python_module(module: &str, package: &str) -> Result<()> {
    if ok(Command::new("python3").args(["-c", &format!("import {module}")])) {
        say(format!("Python module {module} present"));
        return Ok(());
    }
    say(format!("installing {package} from PyPI (pip)"));
    run(Command::new("python3").args(["-m", "pip", "install", "--quiet", package]))
}

pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        say(format!("Debian packages present: {}", packages.join(" ")));
        return Ok(());
    }
    say(format!("installing Debian packages: {}", missing.join(" ")));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn ensure_ebpf_toolchain() -> Result<()> {
    let has_src = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))
    .is_some_and(|s| s.lines().any(|l| l.starts_with("rust-src")));
    if has_src {
        say(format!(
            "eBPF toolchain {EBPF_TOOLCHAIN} with rust-src present"
        ));
        return Ok(());
    }
    say(format!(
        "installing the eBPF toolchain {EBPF_TOOLCHAIN} with rust-src (rustup)"
    ));
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        EBPF_TOOLCHAIN,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn ensure_bpf_linker() -> Result<()> {
    if output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        say(format!("bpf-linker {BPF_LINKER_VERSION} present"));
        return Ok(());
    }
    say(format!(
        "installing bpf-linker {BPF_LINKER_VERSION} against {LLVM_PREFIX} (cargo install, about a minute)"
    ));
    // llvm-sys finds LLVM through llvm-config on PATH; Debian's default
    // /usr/bin/llvm-config may be an older LLVM, so put 22's first.
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
        .env("PATH", path))?;
    if !ok(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker installed but not on PATH; add ~/.cargo/bin to PATH");
    }
    Ok(())
}
