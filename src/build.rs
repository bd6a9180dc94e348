//! Release builds place the functions the node agent runs (`src/node.order`, written by
//! `scripts/node-order.sh`) together at the start of `.text`. Every node maps the one binary,
//! master code and all; the agent then touches a few contiguous pages of it instead of a page
//! here and there across all of it, each mapped by the kernel with its neighbours
//! (docs/benchmarks.md, "The agent's pages"). Relative relocations are packed (RELR), so the
//! dynamic loader reads a few KiB of them at start instead of 0.7 MB; the binary then needs
//! glibc 2.36 or later (Debian 12). Debug builds, and targets not linked by LLD, are left
//! alone; a name the binary no longer has is skipped.

fn main() {
    println!("cargo:rerun-if-changed=src/node.order");
    println!("cargo:rerun-if-changed=src/build.rs");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    // rustc links this target with its bundled LLD (Rust 1.90 and later).
    let lld = std::env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    if release && lld {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={dir}/src/node.order");
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
