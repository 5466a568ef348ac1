use which::which;

/// The crate has an undeclared dependency on the `bpf-linker` binary: rebuild
/// whenever the linker on PATH changes.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found on PATH; run `cargo xtask setup`"),
    }
}
