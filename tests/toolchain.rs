//! The declared minimum Rust is the real one: no locked dependency needs a newer compiler
//! than the workspace's `rust-version`, and the README and install script say the same.
//!
//! Offline, and only over the crates this machine builds: Cargo.lock also lists crates of
//! other platforms (windows-*, wasm-bindgen, android_*) that a fresh cargo home never
//! downloaded, so the metadata is filtered to the host's target triple.

use std::process::Command;

fn version(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

/// The target triple rustc builds for on this machine (`host:` in `rustc -vV`).
fn host_triple() -> String {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc).arg("-vV").output().unwrap();
    assert!(out.status.success(), "rustc -vV failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host triple")
}

#[test]
fn rust_version_covers_every_locked_crate() {
    let root = env!("CARGO_MANIFEST_DIR");
    let host = host_triple();
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", &host])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let members: Vec<&str> = m["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut declared = None;
    let mut needed: Vec<(Vec<u64>, String)> = Vec::new();
    for p in m["packages"].as_array().unwrap() {
        let Some(rv) = p["rust_version"].as_str() else {
            continue;
        };
        if members.contains(&p["id"].as_str().unwrap()) {
            declared = Some(rv.to_string());
        } else {
            needed.push((version(rv), format!("{} {}", p["name"], p["version"])));
        }
    }
    let declared = declared.expect("the workspace declares rust-version");
    // The filter kept what this machine builds (these two set the minimum).
    for dep in ["\"sysinfo\"", "\"aws-sdk-ec2\""] {
        assert!(
            needed.iter().any(|(_, who)| who.starts_with(dep)),
            "{dep} missing from the host's metadata"
        );
    }
    needed.sort();
    let (top, who) = needed.last().unwrap();
    assert!(
        *top <= version(&declared),
        "{who} needs Rust {top:?}, the workspace declares {declared}"
    );
    // And the documents say the same number.
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    assert!(
        readme.contains(&format!("Rust {declared} or newer")),
        "README does not say Rust {declared} or newer"
    );
}

/// The README's test command cannot pass by skipping: it runs the suite with
/// `AUTOSCALER_TEST_STRICT=1`, under which a missing tool fails the test and names the
/// package to install; a bare `cargo test` skips such a test, loudly.
#[test]
fn the_test_command_fails_on_a_missing_tool() {
    let root = env!("CARGO_MANIFEST_DIR");
    let script = std::fs::read_to_string(format!("{root}/scripts/test.sh")).unwrap();
    let strict = script
        .find("export AUTOSCALER_TEST_STRICT=1")
        .expect("scripts/test.sh runs the suite strict");
    assert!(
        script.find("cargo test").is_some_and(|t| t > strict),
        "the strict setting precedes cargo test"
    );
    // The suite runs only once the test tools installed in the background are there.
    let installed = script
        .rfind("\nfinish_install\n")
        .expect("test.sh waits for the installer");
    assert!(
        script
            .rfind("\ncargo test --workspace")
            .is_some_and(|t| t > installed),
        "the suite runs before the installer is done"
    );
    let ci = std::fs::read_to_string(format!("{root}/.ci/run")).unwrap();
    assert!(ci.contains("exec bash scripts/test.sh"), "{ci}");
    let failed = std::panic::catch_unwind(|| {
        crate::common::tool_in(true, "haproxy-but-not-installed");
    })
    .expect_err("strict: a missing tool is a failure");
    let said = failed.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        said.contains("`haproxy-but-not-installed` is not installed"),
        "{said}"
    );
    assert!(
        crate::common::tool_in(false, "haproxy-but-not-installed").is_none(),
        "a bare cargo test skips"
    );
    // Every program the tests look for is one scripts/install-deps.sh installs, from the
    // package a failure names.
    let deps = std::fs::read_to_string(format!("{root}/scripts/install-deps.sh")).unwrap();
    for (tool, package) in crate::common::PACKAGES {
        assert!(
            deps.contains(&format!("{tool}:{package}")),
            "install-deps.sh does not install {tool} ({package})"
        );
    }
}
