//! The command provisioner: the user's `scale_up_command` prints the hosts it started as JSON;
//! `scale_down_command` removes one. Argv from the configuration, no shell, a clean
//! environment and a timeout ([`crate::adapters::process`]).

use std::time::Duration;

use serde::Deserialize;

use super::{LaunchError, LaunchInstances};
use crate::adapters::process::{self, CommandFailed};
use crate::config::CommandLine;
use crate::hosts::{parse_port, validate_instance_id, Host, HostName, Origin};

/// The user's commands.
pub struct CommandProvisioner {
    pub up: CommandLine,
    pub down: CommandLine,
    pub timeout: Duration,
}

impl CommandProvisioner {
    /// Runs the scale-up command and reads the hosts it printed.
    pub async fn provision(&self, msg: &LaunchInstances) -> Result<Vec<Host>, LaunchError> {
        let env = [
            ("AUTOSCALER_DECISION", msg.decision_id.clone()),
            ("AUTOSCALER_COUNT", msg.count.to_string()),
        ];
        let stdout = process::run(&self.up, &env, self.timeout).await?;
        Ok(parse_launched(&stdout).map_err(|message| CommandFailed {
            command: self.up.to_string(),
            message,
        })?)
    }

    /// Runs the scale-down command for `h` (nothing when none is configured).
    pub async fn terminate(&self, h: &Host) -> Result<(), LaunchError> {
        if self.down.is_empty() {
            return Ok(());
        }
        let env = [
            ("AUTOSCALER_HOST", h.host.to_string()),
            ("AUTOSCALER_PORT", h.port.to_string()),
            (
                "AUTOSCALER_INSTANCE_ID",
                h.instance_id.clone().unwrap_or_default(),
            ),
        ];
        process::run(&self.down, &env, self.timeout).await?;
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LaunchedJson {
    host: String,
    port: serde_json::Value,
    #[serde(default)]
    instance_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(LaunchedJson),
    Many(Vec<LaunchedJson>),
}

/// Parses a scale-up command's output: `{"host": …, "port": …, "instance_id": …?}` or an array
/// of those. Every host and port is validated as `add-host` would.
pub fn parse_launched(stdout: &str) -> Result<Vec<Host>, String> {
    let parsed: OneOrMany = serde_json::from_str(stdout.trim()).map_err(|e| {
        format!(
            "expected JSON {{\"host\": …, \"port\": …, \"instance_id\": …}} (or an array of them) on standard output, got {:?} ({e})",
            stdout.chars().take(200).collect::<String>()
        )
    })?;
    let items = match parsed {
        OneOrMany::One(x) => vec![x],
        OneOrMany::Many(v) if v.is_empty() => {
            return Err("printed an empty array: nothing was launched".into())
        }
        OneOrMany::Many(v) => v,
    };
    items
        .into_iter()
        .map(|j| {
            let port = match &j.port {
                serde_json::Value::Number(n) => parse_port(&n.to_string()),
                serde_json::Value::String(s) => parse_port(s),
                other => parse_port(&other.to_string()),
            }
            .map_err(|e| e.to_string())?;
            Ok(Host {
                host: HostName::parse(&j.host).map_err(|e| e.to_string())?,
                port,
                ssh_port: None,
                report_port: None,
                instance_id: j
                    .instance_id
                    .as_deref()
                    .map(validate_instance_id)
                    .transpose()?
                    .map(String::from),
                origin: Origin::Launched,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_command_output() {
        let hs = parse_launched(r#"{"host": "127.0.1.9", "port": 8080, "instance_id": "vm-1"}"#)
            .unwrap();
        assert_eq!(hs.len(), 1);
        assert_eq!(hs[0].host.to_string(), "127.0.1.9");
        assert_eq!(hs[0].origin, Origin::Launched);
        assert_eq!(hs[0].instance_id.as_deref(), Some("vm-1"));
        let hs = parse_launched(
            "[{\"host\":\"a.example\",\"port\":\"80\"},{\"host\":\"::1\",\"port\":81}]\n",
        )
        .unwrap();
        assert_eq!(hs.len(), 2);
        for (bad, want) in [
            ("", "expected JSON"),
            ("OK launched", "expected JSON"),
            ("[]", "empty array"),
            (r#"{"host": "a b", "port": 80}"#, "contains ' '"),
            (r#"{"host": "a", "port": 0}"#, "between 1 and 65535"),
            (
                r#"{"host": "a", "port": 80, "instance_id": "x y"}"#,
                "instance id",
            ),
            (r#"{"host": "a", "port": 80, "extra": 1}"#, "expected JSON"),
            (
                r#"{"host": "a\nserver evil 1.2.3.4:80", "port": 80}"#,
                "contains",
            ),
        ] {
            let e = parse_launched(bad).unwrap_err();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }
}
