//! Builds the kernel programs (`canary-ebpf`) with the pinned nightly and
//! bpf-linker, and leaves the object in `OUT_DIR/canary` for the dataplane
//! to embed.

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Must match `canary-ebpf/rust-toolchain.toml` (see shared KERNEL-NOTES).
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        // Pure-logic work (config, compile) can build without the eBPF
        // toolchain; the agent then refuses to start with a clear error.
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("canary");
        std::fs::write(out, b"")?;
        return Ok(());
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "canary-ebpf")
        .ok_or_else(|| anyhow!("canary-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
