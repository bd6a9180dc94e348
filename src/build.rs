//! Release builds place the functions the node agent runs (`src/node.order`, written by
//! `scripts/node-order.sh`) together at the start of `.text`. Every node maps the one binary,
//! master code and all; the agent then touches a few contiguous pages of it instead of a page
//! here and there across all of it, each mapped by the kernel with its neighbours
//! (docs/benchmarks.md, "The agent's pages"). Relative relocations are packed (RELR) when the
//! build machine's glibc is 2.36 or later, so the dynamic loader reads a few KiB of them at
//! start instead of 0.7 MB; the binary then needs glibc 2.36 where it runs.
//!
//! Only for release builds of x86_64 Linux with rustc's own LLD (the default since Rust 1.90),
//! and not when a linker or linker flavour is chosen by hand or `AUTOSCALER_PLAIN_LINK` is
//! set. A name the binary no longer has is skipped: a stale list costs memory, nothing else.

use std::env;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/node.order");
    println!("cargo:rerun-if-changed=src/build.rs");
    println!("cargo:rerun-if-env-changed=AUTOSCALER_PLAIN_LINK");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let target = env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let own_linker = env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_some()
        || flags.contains("linker");
    if !release || !target || own_linker || env::var_os("AUTOSCALER_PLAIN_LINK").is_some() {
        return;
    }
    let dir = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={dir}/src/node.order");
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    if glibc().is_some_and(|v| v >= (2, 36)) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// The build machine's glibc version, from `ldd --version` ("ldd (Debian GLIBC 2.36-9) 2.36").
fn glibc() -> Option<(u32, u32)> {
    let out = Command::new("ldd").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.lines().next()?.rsplit(' ').next()?;
    let (major, minor) = version.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}
