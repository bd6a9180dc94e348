//! The command provisioner: the user's `scale_up_command` prints the hosts it started as JSON;
//! `scale_down_command` removes one. Argv from the configuration, no shell, a clean
//! environment and a timeout ([`crate::adapters::process`]).

use std::time::Duration;

use serde::Deserialize;

use super::intents::Launched;
use super::LaunchError;
use crate::adapters::known_hosts;
use crate::adapters::process::{self, CommandFailed};
use crate::config::CommandLine;
use crate::hosts::{parse_port, validate_instance_id, Host, HostName};

/// The user's commands.
pub struct CommandProvisioner {
    pub up: CommandLine,
    pub down: CommandLine,
    pub timeout: Duration,
    /// `[aws] region` and `profile`, passed on (AWS_REGION, AWS_DEFAULT_REGION, AWS_PROFILE)
    /// so an `aws ec2 …` command acts where autoscaler is configured to.
    pub env: Vec<(&'static str, String)>,
    /// The report secret: each launch's key derives from it (AUTOSCALER_REPORT_KEY).
    pub secret: Option<Vec<u8>>,
}

impl CommandProvisioner {
    /// The commands of `cfg`.
    pub fn from_config(cfg: &crate::config::Config) -> CommandProvisioner {
        let mut env = Vec::new();
        if !cfg.aws.region.is_empty() {
            env.push(("AWS_REGION", cfg.aws.region.clone()));
            env.push(("AWS_DEFAULT_REGION", cfg.aws.region.clone()));
        }
        if !cfg.aws.profile.is_empty() {
            env.push(("AWS_PROFILE", cfg.aws.profile.clone()));
        }
        CommandProvisioner {
            up: cfg.launch.scale_up_command.clone(),
            down: cfg.launch.scale_down_command.clone(),
            timeout: cfg.launch.command_timeout,
            env,
            secret: None,
        }
    }
}

/// What a scale-down did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The scale-down command ran and succeeded.
    Stopped,
    /// No scale-down command is configured: the host was only taken out of the pool.
    NotConfigured,
}

impl CommandProvisioner {
    /// Runs the scale-up command for `decision` and reads the hosts it printed. After a crash
    /// the master runs it again with the same decision: it must print the same hosts again
    /// rather than start new ones (as EC2's ClientToken does).
    pub async fn provision(
        &self,
        decision: &str,
        count: u32,
        locks: &std::path::Path,
    ) -> Result<Vec<Launched>, LaunchError> {
        let mut env = vec![
            ("AUTOSCALER_DECISION", decision.to_string()),
            ("AUTOSCALER_COUNT", count.to_string()),
        ];
        // The key the hosts of this launch report with: the command installs it as their
        // report.key (the fleet's secret works too, but a leaked copy of it speaks for every
        // node).
        if let Some(s) = &self.secret {
            env.push((
                "AUTOSCALER_REPORT_KEY",
                crate::report::launch_key(s, decision),
            ));
        }
        env.extend(self.env.iter().cloned());
        // Never two runs of one decision at once on this machine (see run_exclusive).
        let lock = locks.join(format!("{decision}.lock"));
        let stdout = process::run_exclusive(&self.up, &env, self.timeout, &lock).await?;
        Ok(parse_launched(&stdout).map_err(|message| CommandFailed {
            command: self.up.to_string(),
            message,
            not_found: false,
            status: None,
            output: String::new(),
            stdout: Some(stdout.as_str().into()),
        })?)
    }

    /// Runs the scale-down command for `h`, when one is configured.
    pub async fn stop(&self, h: &Host) -> Result<Stopped, LaunchError> {
        if self.down.is_empty() {
            return Ok(Stopped::NotConfigured);
        }
        let mut env = vec![
            ("AUTOSCALER_HOST", h.host.to_string()),
            ("AUTOSCALER_PORT", h.port.to_string()),
            (
                "AUTOSCALER_INSTANCE_ID",
                h.instance_id.clone().unwrap_or_default(),
            ),
        ];
        if let Some(d) = &h.decision {
            env.push(("AUTOSCALER_DECISION", d.clone()));
        }
        env.extend(self.env.iter().cloned());
        process::run(&self.down, &env, self.timeout).await?;
        Ok(Stopped::Stopped)
    }
}

/// What a scale-up command that failed after it ran said of a host it started: whatever of
/// host, port and instance id its answer names validly (the rest of the object may be wrong).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftover {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub instance_id: Option<String>,
    pub decision: Option<String>,
}

impl Leftover {
    /// The host to hand to the scale-down command: only with both its address and port (the
    /// command's contract sets every variable).
    pub fn host(&self) -> Option<Host> {
        let mut h = Host::launched(
            HostName::parse(self.host.as_deref()?).ok()?,
            self.port?,
            self.instance_id.clone(),
        );
        h.decision = self.decision.clone();
        Some(h)
    }
}

/// Every object in a failed scale-up command's answer — where [`parse_launched`] looks: its
/// whole standard output or its last line, an object or an array of them — that names a
/// valid host or instance id: what it may have started. Invalid values are left out, never
/// passed on; progress lines and standard error are not read.
pub fn leftovers(stdout: &str, decision: &str) -> Vec<Leftover> {
    let whole = stdout.trim();
    let last = whole.lines().last().unwrap_or("").trim();
    let values = [whole, last]
        .into_iter()
        .filter(|t| t.starts_with('{') || t.starts_with('['))
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(t).ok());
    let mut found: Vec<Leftover> = Vec::new();
    for v in values {
        let objects = match v {
            serde_json::Value::Array(a) => a,
            o => vec![o],
        };
        for o in objects {
            let field = |k: &str| o.get(k);
            let l = Leftover {
                host: field("host")
                    .and_then(|h| h.as_str())
                    .and_then(|h| HostName::parse(h).ok())
                    .map(|h| h.to_string()),
                port: field("port").and_then(|p| json_port(p).ok()),
                instance_id: field("instance_id")
                    .and_then(|i| i.as_str())
                    .and_then(|i| validate_instance_id(i).ok())
                    .map(String::from),
                decision: Some(decision.to_string()),
            };
            if (l.host.is_some() || l.instance_id.is_some()) && !found.contains(&l) {
                found.push(l);
            }
        }
    }
    found
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LaunchedJson {
    host: String,
    port: serde_json::Value,
    #[serde(default)]
    instance_id: Option<String>,
    /// The host's SSH host key(s), `TYPE BASE64`: recorded in known_hosts before the first
    /// connection.
    #[serde(default)]
    host_key: Option<OneOrManyKeys>,
    /// The host's SSH port, when not `[ssh] port`.
    #[serde(default)]
    ssh_port: Option<serde_json::Value>,
    /// TCP reports (`[node] report_socket` empty): the port on the host's 127.0.0.1 for
    /// the master's forward, when not `[node] report_port`.
    #[serde(default)]
    report_port: Option<serde_json::Value>,
}

/// A port given as a JSON number or string.
fn json_port(v: &serde_json::Value) -> Result<u16, String> {
    match v {
        serde_json::Value::Number(n) => parse_port(&n.to_string()),
        serde_json::Value::String(s) => parse_port(s),
        other => parse_port(&other.to_string()),
    }
    .map_err(|e| e.to_string())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrManyKeys {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(LaunchedJson),
    Many(Vec<LaunchedJson>),
}

/// Parses a scale-up command's output: `{"host": …, "port": …, "instance_id": …?,
/// "host_key": …?, "ssh_port": …?, "report_port": …?}` or an array of those, as the whole
/// output or as its last line (lines before it are the command's progress). Every host and
/// port is validated as `add-host` would, every host key must be an Ed25519 or ECDSA public
/// key.
pub fn parse_launched(stdout: &str) -> Result<Vec<Launched>, String> {
    let whole = stdout.trim();
    let last = whole.lines().last().unwrap_or("").trim();
    let parsed: OneOrMany = serde_json::from_str(whole)
        .or_else(|e| match last.starts_with('{') || last.starts_with('[') {
            true => serde_json::from_str(last),
            false => Err(e),
        })
        .map_err(|e| {
            // The end of the output: where the answer should be.
            let tail: String = {
                let chars: Vec<char> = whole.chars().collect();
                chars[chars.len().saturating_sub(200)..].iter().collect()
            };
            format!(
                "expected JSON {{\"host\": …, \"port\": …, \"instance_id\": …, \"host_key\": …}} (or an array of them) as its output or its last line, got {tail:?} ({e})"
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
            let port = json_port(&j.port)?;
            let instance_id = j
                .instance_id
                .as_deref()
                .map(validate_instance_id)
                .transpose()?
                .map(String::from);
            let mut host = Host::launched(
                HostName::parse(&j.host).map_err(|e| e.to_string())?,
                port,
                instance_id,
            );
            host.ssh_port = j
                .ssh_port
                .as_ref()
                .map(json_port)
                .transpose()
                .map_err(|e| format!("ssh_port: {e}"))?;
            host.report_port = j
                .report_port
                .as_ref()
                .map(json_port)
                .transpose()
                .map_err(|e| format!("report_port: {e}"))?;
            let keys = match j.host_key {
                None => vec![],
                Some(OneOrManyKeys::One(k)) => vec![k],
                Some(OneOrManyKeys::Many(v)) => v,
            };
            let host_keys = keys
                .into_iter()
                .map(|k| match known_hosts::parse_key(&k) {
                    Some(key) => key.to_openssh().map_err(|e| format!("host_key {k:?}: {e}")),
                    None => Err(format!(
                        "host_key {k:?} is not an Ed25519 or ECDSA public key (TYPE BASE64)"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Launched { host, host_keys })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_read_where_the_answer_is_and_only_valid_names_kept() {
        // Progress lines that look like JSON are not the answer: only the last line is.
        let out = "{\"host\": \"10.9.9.9\", \"port\": 80}\n\
                   [{\"host\": \"10.0.0.5\", \"port\": 99999, \"instance_id\": \"i-0abc\"}, {\"host\": \"bad host;rm\", \"instance_id\": \"--all\"}, {\"port\": 80}]";
        let got = leftovers(out, "as-1");
        // The invalid port, host and id are left out; an object naming nothing is dropped.
        assert_eq!(
            got,
            [Leftover {
                host: Some("10.0.0.5".into()),
                port: None,
                instance_id: Some("i-0abc".into()),
                decision: Some("as-1".into()),
            }]
        );
        assert_eq!(
            got[0].host(),
            None,
            "no port: not a host for the scale-down command"
        );
        assert!(leftovers("Error: quota exceeded", "as-1").is_empty());
        // The whole output as one (multi-line) object.
        let whole = leftovers("{\"host\": \"10.0.0.6\",\n \"port\": 8080}", "as-2");
        let h = whole[0].host().unwrap();
        assert_eq!(
            (h.host.to_string(), h.port, h.decision.as_deref()),
            ("10.0.0.6".into(), 8080, Some("as-2"))
        );
    }

    #[test]
    fn aws_region_and_profile_reach_the_commands() {
        let mut cfg = crate::config::Config::defaults(
            &crate::config::Layout::for_dir(std::path::Path::new("/x")),
            crate::config::Role::Master,
        );
        assert!(CommandProvisioner::from_config(&cfg).env.is_empty());
        cfg.aws.region = "eu-west-3".into();
        cfg.aws.profile = "fleet".into();
        let env = CommandProvisioner::from_config(&cfg).env;
        for want in [
            ("AWS_REGION", "eu-west-3"),
            ("AWS_DEFAULT_REGION", "eu-west-3"),
            ("AWS_PROFILE", "fleet"),
        ] {
            assert!(
                env.iter().any(|(k, v)| (*k, v.as_str()) == want),
                "{want:?} in {env:?}"
            );
        }
    }

    #[test]
    fn launch_command_output() {
        let hs = parse_launched(r#"{"host": "127.0.1.9", "port": 8080, "instance_id": "vm-1"}"#)
            .unwrap();
        assert_eq!(hs.len(), 1);
        assert_eq!(hs[0].host.host.to_string(), "127.0.1.9");
        assert_eq!(hs[0].host.origin, crate::hosts::Origin::Launched);
        assert_eq!(hs[0].host.instance_id.as_deref(), Some("vm-1"));
        assert!(hs[0].host_keys.is_empty());
        let ed = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMbXjn3SmRtduL4M5Cqz4Xj2OEb1jRhqpXMK6rYyJLud";
        let hs = parse_launched(&format!(
            r#"{{"host": "127.0.1.9", "port": 80, "host_key": "{ed} root@vm"}}"#
        ))
        .unwrap();
        assert_eq!(hs[0].host_keys, [ed]);
        let hs = parse_launched(
            "[{\"host\":\"a.example\",\"port\":\"80\"},{\"host\":\"::1\",\"port\":81}]\n",
        )
        .unwrap();
        assert_eq!(hs.len(), 2);
        assert_eq!((hs[0].host.ssh_port, hs[0].host.report_port), (None, None));
        // Progress lines before the answer: the last line counts.
        let hs = parse_launched(
            "starting vm-7...\n{\"note\": 1}\nwaiting for ssh\n{\"host\": \"127.0.1.9\", \"port\": 80}\n",
        )
        .unwrap();
        assert_eq!(hs[0].host.host.to_string(), "127.0.1.9");
        // Pretty-printed JSON over several lines is read whole, as before.
        let hs = parse_launched("{\n  \"host\": \"127.0.1.9\",\n  \"port\": 80\n}\n").unwrap();
        assert_eq!(hs[0].host.port, 80);
        let hs = parse_launched(
            r#"{"host": "127.0.1.9", "port": 80, "ssh_port": 2222, "report_port": "9701"}"#,
        )
        .unwrap();
        assert_eq!(
            (hs[0].host.ssh_port, hs[0].host.report_port),
            (Some(2222), Some(9701))
        );
        for (bad, want) in [
            // The answer must be the last line: output after it is not an answer.
            (
                "{\"host\": \"127.0.1.9\", \"port\": 80}\ndone\n",
                "its last line, got \"{\\\"host",
            ),
            ("starting\n\"done\"\n", "expected JSON"),
            (r#"{"host": "a", "port": 80, "ssh_port": 0}"#, "ssh_port: "),
            (
                r#"{"host": "a", "port": 80, "report_port": "x"}"#,
                "report_port: ",
            ),
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
            (
                r#"{"host": "a", "port": 80, "host_key": "ssh-ed25519 nope"}"#,
                "not an Ed25519 or ECDSA public key",
            ),
        ] {
            let e = parse_launched(bad).unwrap_err();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }
}
