//! The declared minimum Rust is the real one: no locked dependency needs a newer compiler
//! than the workspace's `rust-version`, and the README and install script say the same.

use std::process::Command;

fn version(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

#[test]
fn rust_version_covers_every_locked_crate() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
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
