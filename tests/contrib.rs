//! What ships in contrib/ is checked by the real tools: the cloud-init user data by
//! `cloud-init schema`, the systemd units by `systemd-analyze verify`.

use std::path::Path;
use std::process::Command;

use crate::common::tool;

fn contrib(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(rel)
}

#[test]
fn cloud_init_user_data_is_valid_cloud_config() {
    let Some(cloud_init) = tool("cloud-init") else {
        return;
    };
    let file = contrib("cloud-init/node.yaml");
    let out = Command::new(cloud_init)
        .args(["schema", "--config-file"])
        .arg(&file)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("Valid schema") || said.contains("Valid cloud-config"),
        "{said}"
    );
    // What the master relies on: its key authorised for the tunnel user, host keys on the
    // console, the agent's unit enabled.
    let text = std::fs::read_to_string(&file).unwrap();
    for want in [
        "ssh_authorized_keys:",
        "ssh_key_console_blacklist: []",
        "AllowTcpForwarding remote",
        "enable, --now, autoscaler-node.service",
    ] {
        assert!(text.contains(want), "missing {want:?}");
    }
}
