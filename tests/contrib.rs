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
        "AllowStreamLocalForwarding remote",
        "report_socket = /run/autoscaler/reports/master.sock",
        "User=autoscaler",
        "RuntimeDirectoryMode=0700",
        "enable, --now, autoscaler-node.service",
        // The report secret arrives from the master and reaches the agent as a credential.
        "content: '{{ report_secret }}'",
        "LoadCredential=report.key:/etc/autoscaler/report.key",
        // The metadata lock covers both endpoints and fails loudly without nft.
        "ip daddr 169.254.169.254 meta skuid != 0 drop",
        "ip6 daddr fd00:ec2::254 meta skuid != 0 drop",
        "exit 1",
    ] {
        assert!(text.contains(want), "missing {want:?}");
    }
}

/// Both units pass `systemd-analyze verify` (with ExecStart pointed at the built binary, which
/// verify requires to exist), and keep what the daemon relies on.
#[test]
fn systemd_units_verify() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    for role in ["master", "node"] {
        let name = format!("autoscaler-{role}.service");
        let text = std::fs::read_to_string(contrib(&format!("systemd/{name}"))).unwrap();
        for want in ["Type=notify", "NotifyAccess=main", "ProtectSystem=strict"] {
            assert!(text.contains(want), "{name}: missing {want:?}");
        }
        let unit = tmp.path().join(&name);
        std::fs::write(
            &unit,
            text.replace(
                "/usr/local/bin/autoscaler",
                crate::common::bin().to_str().unwrap(),
            ),
        )
        .unwrap();
        let out = Command::new(&analyze)
            .args(["verify", "--man=no"])
            .arg(&unit)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        // verify exits 0 on settings it ignores; any word from it is a finding.
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{name}: {said}"
        );
    }
    // The master can still write what it must under ProtectSystem=strict.
    let master = std::fs::read_to_string(contrib("systemd/autoscaler-master.service")).unwrap();
    let rw = master
        .lines()
        .find_map(|l| l.strip_prefix("ReadWritePaths="))
        .unwrap();
    for path in ["/etc/haproxy", "/etc/autoscaler", "/run/haproxy"] {
        assert!(rw.split(' ').any(|p| p == path), "{path} not writable");
    }
    assert!(master.contains("StateDirectory=autoscaler"));
    assert!(master.contains("RuntimeDirectory=autoscaler"));
    assert!(master.contains("ExecReload=/bin/kill -HUP $MAINPID"));
}

/// The cloud-init metadata lock, as the node's bootcmd runs it, applied for real in a network
/// namespace made here (twice: bootcmd runs every boot): both metadata endpoints are closed
/// to every user but root.
#[test]
fn the_metadata_lock_applies_and_covers_both_endpoints() {
    let (Some(_), Some(nft), true) = (tool("ip"), tool("nft"), crate::common::root()) else {
        return;
    };
    let text = std::fs::read_to_string(contrib("cloud-init/node.yaml")).unwrap();
    // The bootcmd entry is `sh -c <folded script>`: the script is its indented lines, joined
    // with spaces as YAML folds them.
    let start = text.find("bootcmd:").unwrap();
    let script: String = text[start..]
        .lines()
        .skip(4)
        .take_while(|l| l.starts_with("      "))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(script.contains("nft -f -"), "{script}");
    let ns = crate::common::Netns::create(9);
    for _ in 0..2 {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sh", "-c", &script])
            .env(
                "PATH",
                format!(
                    "{}:/usr/sbin:/usr/bin:/bin",
                    nft.parent().unwrap().display()
                ),
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(&nft)
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        rules.matches("table inet autoscaler_imds").count(),
        1,
        "{rules}"
    );
    assert!(
        rules.contains("ip daddr 169.254.169.254 meta skuid != 0 drop"),
        "{rules}"
    );
    assert!(
        rules.contains("ip6 daddr fd00:ec2::254 meta skuid != 0 drop"),
        "{rules}"
    );
    // Without nft (not on this PATH), the script says so and fails.
    assert!(!Path::new("/usr/bin/nft").exists() && !Path::new("/bin/nft").exists());
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sh", "-c"])
        .arg(script.replace("tee /dev/console", "tee /dev/null"))
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nft is missing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
