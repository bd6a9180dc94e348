//! `autoscaler.ini`: typed configuration, its defaults, parsing and validation.
//!
//! The file is parsed (rust-ini), read key by key into typed structs, then validated as a whole.
//! Every problem is collected — a bad value, an unknown key (with the closest known one), a
//! contradiction between keys — and reported together, each naming the file, the section and
//! the key. After [`Config::load`] returns, the rest of the program trusts the values.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Serialize, Serializer};
use thiserror::Error;

use crate::hosts::{parse_port, HostName};
#[cfg(test)]
use crate::render;

/// Where `autoscaler init` writes by default, and where the daemon looks for its files.
pub const DEFAULT_DIR: &str = "/etc/autoscaler";
/// The configuration file name inside the configuration directory.
pub const CONFIG_FILE_NAME: &str = "autoscaler.ini";
/// Default configuration path (`--config` and `$AUTOSCALER_CONFIG` override it).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/autoscaler/autoscaler.ini";

/// The placeholder in `[haproxy] check_command` replaced by the file to validate.
pub const CONFIG_PLACEHOLDER: &str = "{config}";
/// The name inside [`CONFIG_PLACEHOLDER`], as [`CommandLine::expand`] takes it.
pub const CONFIG_VAR: &str = "config";

pub const DEFAULT_REPORT_PORT: u16 = 9700;
pub const DEFAULT_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_REPORT_BUFFER: usize = 300;
pub const DEFAULT_SCALE_UP_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_SCALE_DOWN_WINDOW: Duration = Duration::from_secs(600);
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(300);
pub const DEFAULT_SCALE_DOWN_COOLDOWN: Duration = Duration::from_secs(600);
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(10);
pub const DEFAULT_WARMUP: Duration = Duration::from_secs(120);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_SSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_SSH_KEEPALIVE: Duration = Duration::from_secs(15);
pub const DEFAULT_LAUNCH_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_secs(1);
/// sysinfo's CPU readings closer together than this are meaningless.
pub const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(200);

macro_rules! choice {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// Every accepted spelling, for error messages.
            pub const CHOICES: &'static [&'static str] = &[$($text),+];
            /// The spelling used in the file.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!("one of: {}", Self::CHOICES.join(", "))),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

choice!(
    /// Which daemon this machine runs.
    Role {
        /// The HAProxy machine: hears nodes, decides, launches, rewrites HAProxy.
        Master = "master",
        /// A web server: samples its CPU and reports it.
        Node = "node",
    }
);

choice!(
    /// How the decider turns CPU into a desired node count.
    Policy {
        /// Scale up when any node's mean busy CPU over the window reaches the threshold.
        Instance = "instance",
        /// Target tracking: desired = ceil(n × mean / target), with a tolerance band.
        Cluster = "cluster",
    }
);

choice!(
    /// What to do with a host key that is not in known_hosts yet.
    HostKeyPolicy {
        /// Refuse the session (the default).
        Strict = "strict",
        /// Record the key on first contact, refuse a changed one (OpenSSH's accept-new).
        AcceptNew = "accept-new",
    }
);

choice!(
    /// How new capacity is obtained.
    Launcher {
        /// RunInstances through the AWS SDK.
        Ec2 = "ec2",
        /// A user command that prints the new host as JSON.
        Command = "command",
    }
);

/// A secret value (AWS keys): never printed, logged or serialised in clear.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The clear text, for the one place that needs it (the credentials provider).
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether a value was set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "<redacted>"
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "<redacted>" })
    }
}

/// A command line from the configuration: an argv, split with POSIX shell quoting rules but
/// never run through a shell (write `sh -c '…'` to get one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandLine(pub Vec<String>);

impl CommandLine {
    /// Whether no command was configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The argv with every `{name}` placeholder in `vars` replaced, argument by argument.
    pub fn expand(&self, vars: &[(&str, &str)]) -> Vec<String> {
        self.0
            .iter()
            .map(|arg| {
                vars.iter()
                    .fold(arg.clone(), |a, (k, v)| a.replace(&format!("{{{k}}}"), v))
            })
            .collect()
    }
}

impl FromStr for CommandLine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        shell_words::split(s)
            .map(CommandLine)
            .map_err(|e| format!("a command line with balanced quotes ({e})"))
    }
}

impl fmt::Display for CommandLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&shell_words::join(&self.0))
    }
}

impl Serialize for CommandLine {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// One HAProxy server that receives the generated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HaproxyTarget {
    /// HAProxy on this machine.
    Local,
    /// HAProxy on another machine, reached over SSH with the `[ssh]` settings.
    Ssh {
        user: Option<String>,
        host: HostName,
        port: Option<u16>,
    },
}

impl FromStr for HaproxyTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const ACCEPTED: &str = "`local` or `[ssh://][user@]host[:port]`";
        if s == "local" {
            return Ok(HaproxyTarget::Local);
        }
        let rest = s.strip_prefix("ssh://").unwrap_or(s);
        let (user, hostport) = match rest.split_once('@') {
            Some((u, h)) => {
                let user_ok = !u.is_empty()
                    && !u.starts_with('-')
                    && u.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
                if !user_ok {
                    return Err(format!("{ACCEPTED}; user {u:?} is not a valid user name"));
                }
                (Some(u.to_string()), h)
            }
            None => (None, rest),
        };
        let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
            let (h, after) = inner
                .split_once(']')
                .ok_or_else(|| format!("{ACCEPTED}; unbalanced '['"))?;
            match after {
                "" => (h, None),
                p => (
                    h,
                    Some(p.strip_prefix(':').ok_or_else(|| ACCEPTED.to_string())?),
                ),
            }
        } else if hostport.matches(':').count() == 1 {
            let (h, p) = hostport.split_once(':').unwrap_or((hostport, ""));
            (h, Some(p))
        } else {
            (hostport, None)
        };
        let host = HostName::parse(host).map_err(|e| format!("{ACCEPTED}; {e}"))?;
        let port = port
            .map(parse_port)
            .transpose()
            .map_err(|e| format!("{ACCEPTED}; {e}"))?;
        Ok(HaproxyTarget::Ssh { user, host, port })
    }
}

impl fmt::Display for HaproxyTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HaproxyTarget::Local => f.write_str("local"),
            HaproxyTarget::Ssh { user, host, port } => {
                f.write_str("ssh://")?;
                if let Some(u) = user {
                    write!(f, "{u}@")?;
                }
                match (host, port) {
                    (HostName::V6(ip), Some(p)) => write!(f, "[{ip}]:{p}"),
                    (h, Some(p)) => write!(f, "{h}:{p}"),
                    (h, None) => write!(f, "{h}"),
                }
            }
        }
    }
}

impl Serialize for HaproxyTarget {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

mod human_duration {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

mod optional_path {
    use serde::Serializer;
    use std::path::PathBuf;

    pub fn serialize<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(
            &p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        )
    }
}

/// `[autoscaler]`: the role and the directories.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct General {
    pub role: Role,
    /// One file per backend host (`autoscaler add-host`).
    pub hosts_dir: PathBuf,
    /// Launch intents and last decision times.
    pub state_dir: PathBuf,
}

/// `[node]`: the node agent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeSection {
    /// The node's 127.0.0.1 port that the master's SSH remote forward listens on.
    pub report_port: u16,
    #[serde(with = "human_duration")]
    pub sample_interval: Duration,
    /// Samples kept while the link to the master is down.
    pub buffer: usize,
    /// How the node names itself in its hello (empty: the machine's host name).
    pub name: String,
    /// Instance id reported in the hello (empty: none).
    pub instance_id: String,
}

/// `[scaling]`: the decision policy and its guards.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scaling {
    pub policy: Policy,
    pub scale_up_threshold: f64,
    #[serde(with = "human_duration")]
    pub scale_up_window: Duration,
    pub target_cpu: f64,
    pub tolerance: f64,
    pub scale_down_threshold: f64,
    #[serde(with = "human_duration")]
    pub scale_down_window: Duration,
    pub min_nodes: u32,
    pub max_nodes: u32,
    pub scale_up_step: u32,
    #[serde(with = "human_duration")]
    pub cooldown: Duration,
    #[serde(with = "human_duration")]
    pub scale_down_cooldown: Duration,
    pub max_launches_per_hour: u32,
    #[serde(with = "human_duration")]
    pub stale_after: Duration,
    #[serde(with = "human_duration")]
    pub warmup: Duration,
    #[serde(with = "human_duration")]
    pub drain_timeout: Duration,
    pub dry_run: bool,
}

/// `[ssh]`: how the master reaches nodes and remote HAProxy servers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ssh {
    pub user: String,
    pub port: u16,
    pub identity_file: PathBuf,
    pub known_hosts: PathBuf,
    pub host_key_policy: HostKeyPolicy,
    #[serde(with = "human_duration")]
    pub connect_timeout: Duration,
    #[serde(with = "human_duration")]
    pub keepalive: Duration,
}

/// `[aws]`: region, endpoint and (optionally) static credentials.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Aws {
    pub region: String,
    pub endpoint: String,
    pub profile: String,
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
}

/// `[launch]`: how new capacity is obtained.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Launch {
    pub launcher: Launcher,
    /// Value of the `autoscaler:group` tag; separates several fleets in one account.
    pub group: String,
    pub image_id: String,
    pub instance_type: String,
    pub subnet_id: String,
    pub security_group_ids: Vec<String>,
    pub key_name: String,
    pub iam_instance_profile: String,
    #[serde(with = "optional_path")]
    pub user_data_file: Option<PathBuf>,
    pub launch_template: String,
    pub launch_template_version: String,
    /// Port HAProxy sends traffic to on launched hosts.
    pub app_port: u16,
    #[serde(with = "human_duration")]
    pub launch_timeout: Duration,
    pub health_check: bool,
    #[serde(with = "human_duration")]
    pub health_timeout: Duration,
    pub scale_up_command: CommandLine,
    pub scale_down_command: CommandLine,
    #[serde(with = "human_duration")]
    pub command_timeout: Duration,
}

/// `[haproxy]`: the generated configuration and the servers that receive it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Haproxy {
    pub servers: Vec<HaproxyTarget>,
    pub config_path: PathBuf,
    /// Frontend address, e.g. `*:80` or `192.0.2.1:8080`.
    pub bind: String,
    /// Path of a template that replaces the embedded one.
    #[serde(with = "optional_path")]
    pub template: Option<PathBuf>,
    pub check_command: CommandLine,
    pub reload_command: CommandLine,
    pub stats_socket: PathBuf,
    pub backend: String,
    pub health_check_path: String,
    #[serde(with = "human_duration")]
    pub check_interval: Duration,
    #[serde(with = "human_duration")]
    pub debounce: Duration,
}

/// The whole configuration, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// The file it was read from (for messages); not a key.
    #[serde(skip)]
    pub source: PathBuf,
    #[serde(rename = "autoscaler")]
    pub general: General,
    pub node: NodeSection,
    pub scaling: Scaling,
    pub ssh: Ssh,
    pub aws: Aws,
    pub launch: Launch,
    pub haproxy: Haproxy,
}

/// The paths a fresh configuration points at. The system layout under `/etc/autoscaler` uses
/// the usual system directories; any other directory keeps everything inside it, so an
/// unprivileged user can run the whole thing from a temp dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub dir: PathBuf,
    pub hosts_dir: PathBuf,
    pub state_dir: PathBuf,
    pub identity_file: PathBuf,
    pub known_hosts: PathBuf,
    pub haproxy_config: PathBuf,
    pub stats_socket: PathBuf,
}

impl Layout {
    /// The layout for configuration directory `dir`.
    pub fn for_dir(dir: &Path) -> Layout {
        let system = dir == Path::new(DEFAULT_DIR);
        let inside = |name: &str| dir.join(name);
        Layout {
            dir: dir.to_path_buf(),
            hosts_dir: inside("hosts.d"),
            state_dir: if system {
                "/var/lib/autoscaler".into()
            } else {
                inside("state")
            },
            identity_file: inside("id_ed25519"),
            known_hosts: inside("known_hosts"),
            haproxy_config: if system {
                "/etc/haproxy/haproxy.cfg".into()
            } else {
                inside("haproxy.cfg")
            },
            stats_socket: if system {
                "/run/haproxy/admin.sock".into()
            } else {
                inside("haproxy.sock")
            },
        }
    }
}

impl Config {
    /// The defaults for a configuration directory and role: what `autoscaler init` writes.
    pub fn defaults(layout: &Layout, role: Role) -> Config {
        Config {
            source: layout.dir.join(CONFIG_FILE_NAME),
            general: General {
                role,
                hosts_dir: layout.hosts_dir.clone(),
                state_dir: layout.state_dir.clone(),
            },
            node: NodeSection {
                report_port: DEFAULT_REPORT_PORT,
                sample_interval: DEFAULT_SAMPLE_INTERVAL,
                buffer: DEFAULT_REPORT_BUFFER,
                name: String::new(),
                instance_id: String::new(),
            },
            scaling: Scaling {
                policy: Policy::Instance,
                scale_up_threshold: 75.0,
                scale_up_window: DEFAULT_SCALE_UP_WINDOW,
                target_cpu: 60.0,
                tolerance: 0.1,
                scale_down_threshold: 25.0,
                scale_down_window: DEFAULT_SCALE_DOWN_WINDOW,
                min_nodes: 1,
                max_nodes: 10,
                scale_up_step: 1,
                cooldown: DEFAULT_COOLDOWN,
                scale_down_cooldown: DEFAULT_SCALE_DOWN_COOLDOWN,
                max_launches_per_hour: 6,
                stale_after: DEFAULT_STALE_AFTER,
                warmup: DEFAULT_WARMUP,
                drain_timeout: DEFAULT_DRAIN_TIMEOUT,
                dry_run: true,
            },
            ssh: Ssh {
                user: "autoscaler".into(),
                port: 22,
                identity_file: layout.identity_file.clone(),
                known_hosts: layout.known_hosts.clone(),
                host_key_policy: HostKeyPolicy::Strict,
                connect_timeout: DEFAULT_SSH_CONNECT_TIMEOUT,
                keepalive: DEFAULT_SSH_KEEPALIVE,
            },
            aws: Aws {
                region: String::new(),
                endpoint: String::new(),
                profile: String::new(),
                access_key_id: Secret::default(),
                secret_access_key: Secret::default(),
            },
            launch: Launch {
                launcher: Launcher::Ec2,
                group: "default".into(),
                image_id: String::new(),
                instance_type: "t3.micro".into(),
                subnet_id: String::new(),
                security_group_ids: Vec::new(),
                key_name: String::new(),
                iam_instance_profile: String::new(),
                user_data_file: None,
                launch_template: String::new(),
                launch_template_version: String::new(),
                app_port: 80,
                launch_timeout: DEFAULT_LAUNCH_TIMEOUT,
                health_check: true,
                health_timeout: DEFAULT_HEALTH_TIMEOUT,
                scale_up_command: CommandLine::default(),
                scale_down_command: CommandLine::default(),
                command_timeout: DEFAULT_COMMAND_TIMEOUT,
            },
            haproxy: Haproxy {
                servers: vec![HaproxyTarget::Local],
                config_path: layout.haproxy_config.clone(),
                bind: "*:80".into(),
                template: None,
                check_command: CommandLine(vec![
                    "haproxy".into(),
                    "-c".into(),
                    "-f".into(),
                    CONFIG_PLACEHOLDER.into(),
                ]),
                reload_command: CommandLine(vec![
                    "systemctl".into(),
                    "reload".into(),
                    "haproxy".into(),
                ]),
                stats_socket: layout.stats_socket.clone(),
                backend: "app".into(),
                health_check_path: String::new(),
                check_interval: DEFAULT_CHECK_INTERVAL,
                debounce: DEFAULT_DEBOUNCE,
            },
        }
    }

    /// Reads, parses and validates `path`; also refuses a file that holds AWS keys but is
    /// readable by group or others.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mode = fs::metadata(path)
            .map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?
            .permissions()
            .mode();
        let cfg = Config::parse(&text, path)?;
        let has_keys = !cfg.aws.access_key_id.is_empty() || !cfg.aws.secret_access_key.is_empty();
        if has_keys && mode & 0o077 != 0 {
            return Err(ConfigError::Insecure {
                path: path.to_path_buf(),
                mode: mode & 0o777,
            });
        }
        Ok(cfg)
    }

    /// Parses and validates configuration text; `path` names it in messages and anchors
    /// relative paths (they are relative to the file's directory).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        // rust-ini lets a section header run on to the next lines; a header is one line here.
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.starts_with('[') && !line.ends_with(']') {
                return Err(ConfigError::Syntax {
                    path: path.to_path_buf(),
                    line: n + 1,
                    message: format!("section header {line:?} must be one line ending with ']'"),
                });
            }
        }
        let ini = ini::Ini::load_from_str_opt(
            text,
            ini::ParseOption {
                enabled_quote: true,
                enabled_escape: false,
                ..Default::default()
            },
        )
        .map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            line: e.line,
            message: e.msg.to_string(),
        })?;
        let mut r = Reader::new(path, &ini);
        let cfg = Config::read(&mut r);
        r.check_unknown();
        let mut problems = r.problems;
        cfg.validate_into(&mut problems);
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Every (section, key) the file may contain, in file order.
    pub fn known_keys() -> Vec<(&'static str, &'static str)> {
        let ini = ini::Ini::new();
        let mut r = Reader::new(Path::new(CONFIG_FILE_NAME), &ini);
        Config::read(&mut r);
        r.order
    }

    /// Reads every key, falling back to its default (a problem is recorded for a bad value).
    fn read(r: &mut Reader) -> Config {
        let base = r.file.parent().unwrap_or(Path::new("")).to_path_buf();
        let d = Config::defaults(&Layout::for_dir(&base), Role::Master);
        Config {
            source: r.file.clone(),
            general: General {
                role: r.parse("autoscaler", "role", d.general.role),
                hosts_dir: r.path("autoscaler", "hosts_dir", &d.general.hosts_dir),
                state_dir: r.path("autoscaler", "state_dir", &d.general.state_dir),
            },
            node: NodeSection {
                report_port: r.port("node", "report_port", d.node.report_port),
                sample_interval: r.duration("node", "sample_interval", d.node.sample_interval),
                buffer: r.parse("node", "buffer", d.node.buffer),
                name: r.string("node", "name", &d.node.name),
                instance_id: r.string("node", "instance_id", &d.node.instance_id),
            },
            scaling: Scaling {
                policy: r.parse("scaling", "policy", d.scaling.policy),
                scale_up_threshold: r.percent(
                    "scaling",
                    "scale_up_threshold",
                    d.scaling.scale_up_threshold,
                ),
                scale_up_window: r.duration(
                    "scaling",
                    "scale_up_window",
                    d.scaling.scale_up_window,
                ),
                target_cpu: r.percent("scaling", "target_cpu", d.scaling.target_cpu),
                tolerance: r.parse("scaling", "tolerance", d.scaling.tolerance),
                scale_down_threshold: r.percent(
                    "scaling",
                    "scale_down_threshold",
                    d.scaling.scale_down_threshold,
                ),
                scale_down_window: r.duration(
                    "scaling",
                    "scale_down_window",
                    d.scaling.scale_down_window,
                ),
                min_nodes: r.parse("scaling", "min_nodes", d.scaling.min_nodes),
                max_nodes: r.parse("scaling", "max_nodes", d.scaling.max_nodes),
                scale_up_step: r.parse("scaling", "scale_up_step", d.scaling.scale_up_step),
                cooldown: r.duration("scaling", "cooldown", d.scaling.cooldown),
                scale_down_cooldown: r.duration(
                    "scaling",
                    "scale_down_cooldown",
                    d.scaling.scale_down_cooldown,
                ),
                max_launches_per_hour: r.parse(
                    "scaling",
                    "max_launches_per_hour",
                    d.scaling.max_launches_per_hour,
                ),
                stale_after: r.duration("scaling", "stale_after", d.scaling.stale_after),
                warmup: r.duration("scaling", "warmup", d.scaling.warmup),
                drain_timeout: r.duration("scaling", "drain_timeout", d.scaling.drain_timeout),
                dry_run: r.boolean("scaling", "dry_run", d.scaling.dry_run),
            },
            ssh: Ssh {
                user: r.string("ssh", "user", &d.ssh.user),
                port: r.port("ssh", "port", d.ssh.port),
                identity_file: r.path("ssh", "identity_file", &d.ssh.identity_file),
                known_hosts: r.path("ssh", "known_hosts", &d.ssh.known_hosts),
                host_key_policy: r.parse("ssh", "host_key_policy", d.ssh.host_key_policy),
                connect_timeout: r.duration("ssh", "connect_timeout", d.ssh.connect_timeout),
                keepalive: r.duration("ssh", "keepalive", d.ssh.keepalive),
            },
            aws: Aws {
                region: r.string("aws", "region", &d.aws.region),
                endpoint: r.string("aws", "endpoint", &d.aws.endpoint),
                profile: r.string("aws", "profile", &d.aws.profile),
                access_key_id: Secret::new(r.string("aws", "access_key_id", "")),
                secret_access_key: Secret::new(r.string("aws", "secret_access_key", "")),
            },
            launch: Launch {
                launcher: r.parse("launch", "launcher", d.launch.launcher),
                group: r.string("launch", "group", &d.launch.group),
                image_id: r.string("launch", "image_id", &d.launch.image_id),
                instance_type: r.string("launch", "instance_type", &d.launch.instance_type),
                subnet_id: r.string("launch", "subnet_id", &d.launch.subnet_id),
                security_group_ids: r.list("launch", "security_group_ids"),
                key_name: r.string("launch", "key_name", &d.launch.key_name),
                iam_instance_profile: r.string(
                    "launch",
                    "iam_instance_profile",
                    &d.launch.iam_instance_profile,
                ),
                user_data_file: r.optional_path("launch", "user_data_file"),
                launch_template: r.string("launch", "launch_template", &d.launch.launch_template),
                launch_template_version: r.string(
                    "launch",
                    "launch_template_version",
                    &d.launch.launch_template_version,
                ),
                app_port: r.port("launch", "app_port", d.launch.app_port),
                launch_timeout: r.duration("launch", "launch_timeout", d.launch.launch_timeout),
                health_check: r.boolean("launch", "health_check", d.launch.health_check),
                health_timeout: r.duration("launch", "health_timeout", d.launch.health_timeout),
                scale_up_command: r.parse("launch", "scale_up_command", CommandLine::default()),
                scale_down_command: r.parse("launch", "scale_down_command", CommandLine::default()),
                command_timeout: r.duration("launch", "command_timeout", d.launch.command_timeout),
            },
            haproxy: Haproxy {
                servers: r.parsed_list("haproxy", "servers", d.haproxy.servers.clone()),
                config_path: r.path("haproxy", "config_path", &d.haproxy.config_path),
                bind: r.string("haproxy", "bind", &d.haproxy.bind),
                template: r.optional_path("haproxy", "template"),
                check_command: r.parse("haproxy", "check_command", d.haproxy.check_command.clone()),
                reload_command: r.parse(
                    "haproxy",
                    "reload_command",
                    d.haproxy.reload_command.clone(),
                ),
                stats_socket: r.path("haproxy", "stats_socket", &d.haproxy.stats_socket),
                backend: r.string("haproxy", "backend", &d.haproxy.backend),
                health_check_path: r.string(
                    "haproxy",
                    "health_check_path",
                    &d.haproxy.health_check_path,
                ),
                check_interval: r.duration("haproxy", "check_interval", d.haproxy.check_interval),
                debounce: r.duration("haproxy", "debounce", d.haproxy.debounce),
            },
        }
    }

    /// Cross-key checks; each problem names the key to change.
    fn validate_into(&self, out: &mut Vec<Problem>) {
        let file = &self.source;
        let mut bad = |section: &str, key: &str, message: String| {
            out.push(Problem {
                file: file.clone(),
                section: section.into(),
                key: Some(key.into()),
                message,
            })
        };
        let s = &self.scaling;
        if self.node.sample_interval < MIN_SAMPLE_INTERVAL {
            bad(
                "node",
                "sample_interval",
                format!(
                    "{} is too short; CPU readings closer than {} are meaningless",
                    humantime::format_duration(self.node.sample_interval),
                    humantime::format_duration(MIN_SAMPLE_INTERVAL)
                ),
            );
        }
        if self.node.buffer == 0 {
            bad("node", "buffer", "must be at least 1".into());
        }
        if s.max_nodes == 0 {
            bad("scaling", "max_nodes", "must be at least 1".into());
        }
        if s.min_nodes > s.max_nodes {
            bad(
                "scaling",
                "min_nodes",
                format!("{} is above max_nodes ({})", s.min_nodes, s.max_nodes),
            );
        }
        if s.scale_up_step == 0 {
            bad("scaling", "scale_up_step", "must be at least 1".into());
        }
        if s.max_launches_per_hour == 0 {
            bad(
                "scaling",
                "max_launches_per_hour",
                "must be at least 1 (set dry_run = true to launch nothing)".into(),
            );
        }
        if s.scale_down_threshold >= s.scale_up_threshold {
            bad(
                "scaling",
                "scale_down_threshold",
                format!(
                    "{} must be below scale_up_threshold ({}), or every decision would flap",
                    s.scale_down_threshold, s.scale_up_threshold
                ),
            );
        }
        if !(0.0..1.0).contains(&s.tolerance) {
            bad(
                "scaling",
                "tolerance",
                format!("{} is not in [0, 1), e.g. 0.1", s.tolerance),
            );
        }
        if s.target_cpu <= 0.0 {
            bad("scaling", "target_cpu", "must be above 0".into());
        }
        for (key, d) in [
            ("scale_up_window", s.scale_up_window),
            ("scale_down_window", s.scale_down_window),
            ("stale_after", s.stale_after),
        ] {
            if d.is_zero() {
                bad("scaling", key, "must be longer than 0s".into());
            }
        }
        if self.ssh.connect_timeout.is_zero() {
            bad("ssh", "connect_timeout", "must be longer than 0s".into());
        }
        if self.ssh.user.is_empty()
            || self.ssh.user.starts_with('-')
            || self.ssh.user.contains(char::is_whitespace)
        {
            bad(
                "ssh",
                "user",
                format!("{:?} is not a valid user name", self.ssh.user),
            );
        }
        if self.aws.access_key_id.is_empty() != self.aws.secret_access_key.is_empty() {
            bad(
                "aws",
                if self.aws.access_key_id.is_empty() {
                    "access_key_id"
                } else {
                    "secret_access_key"
                },
                "access_key_id and secret_access_key are set together or not at all".into(),
            );
        }
        let endpoint = &self.aws.endpoint;
        if !(endpoint.is_empty()
            || endpoint.starts_with("http://")
            || endpoint.starts_with("https://"))
        {
            bad(
                "aws",
                "endpoint",
                format!("{:?} is not an http:// or https:// URL", self.aws.endpoint),
            );
        }
        let l = &self.launch;
        if l.group.is_empty() || l.group.len() > 128 {
            bad(
                "launch",
                "group",
                "must be 1 to 128 characters (the autoscaler:group tag)".into(),
            );
        }
        let master = self.general.role == Role::Master;
        if master && !s.dry_run {
            match l.launcher {
                Launcher::Ec2 if l.image_id.is_empty() && l.launch_template.is_empty() => bad(
                    "launch",
                    "image_id",
                    "an AMI id (or launch_template) is needed to launch instances; \
                     or set [scaling] dry_run = true"
                        .into(),
                ),
                Launcher::Command if l.scale_up_command.is_empty() => bad(
                    "launch",
                    "scale_up_command",
                    "launcher = command needs a scale_up_command; or set [scaling] dry_run = true"
                        .into(),
                ),
                _ => {}
            }
        }
        if l.launch_timeout.is_zero() {
            bad("launch", "launch_timeout", "must be longer than 0s".into());
        }
        let h = &self.haproxy;
        if master && h.servers.is_empty() {
            bad(
                "haproxy",
                "servers",
                "needs at least one server (`local` for this machine)".into(),
            );
        }
        if let Err(m) = check_bind(&h.bind) {
            bad("haproxy", "bind", m);
        }
        if !h
            .check_command
            .0
            .iter()
            .any(|a| a.contains(CONFIG_PLACEHOLDER))
        {
            bad(
                "haproxy",
                "check_command",
                format!("must contain {CONFIG_PLACEHOLDER} where the file to check goes, e.g. haproxy -c -f {CONFIG_PLACEHOLDER}"),
            );
        }
        if h.reload_command.is_empty() {
            bad("haproxy", "reload_command", "must not be empty".into());
        }
        if !is_config_word(&h.backend) {
            bad(
                "haproxy",
                "backend",
                format!(
                    "{:?} is not a name of letters, digits, '_', '-', '.'",
                    h.backend
                ),
            );
        }
        if !h.health_check_path.is_empty()
            && (!h.health_check_path.starts_with('/')
                || h.health_check_path
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '#'))
        {
            bad(
                "haproxy",
                "health_check_path",
                format!(
                    "{:?} is not a URL path (starts with '/', no spaces or '#')",
                    h.health_check_path
                ),
            );
        }
        if h.stats_socket
            .to_str()
            .is_none_or(|p| p.contains(char::is_whitespace) || p.contains('#'))
        {
            bad(
                "haproxy",
                "stats_socket",
                "must be a path without spaces or '#'".into(),
            );
        }
        if h.check_interval < Duration::from_millis(100) {
            bad("haproxy", "check_interval", "must be at least 100ms".into());
        }
        if let Some(t) = &h.template {
            if !t.is_file() {
                bad(
                    "haproxy",
                    "template",
                    format!("{} is not a readable file", t.display()),
                );
            }
        }
    }

    /// The configuration as `autoscaler.ini` text, secrets redacted.
    pub fn to_ini_text(&self) -> Result<String, crate::render::RenderError> {
        crate::render::render_ini(self)
    }
}

/// A word that may appear in haproxy.cfg as a name.
fn is_config_word(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// `bind`: `ADDR:PORT` where ADDR is `*`, empty, an IP literal (IPv6 in brackets or bare) or a name.
fn check_bind(bind: &str) -> Result<(), String> {
    let accepted = "ADDRESS:PORT, e.g. *:80, 0.0.0.0:8080 or [::]:80";
    let (addr, port) = bind
        .rsplit_once(':')
        .ok_or_else(|| format!("{bind:?} is not {accepted}"))?;
    parse_port(port).map_err(|e| format!("{bind:?} is not {accepted}: {e}"))?;
    if addr.is_empty() || addr == "*" || addr == "::" || addr == "[::]" {
        return Ok(());
    }
    HostName::parse(addr)
        .map(|_| ())
        .map_err(|e| format!("{bind:?} is not {accepted}: {e}"))
}

/// One problem in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// Empty for a key outside any section.
    pub section: String,
    /// None for a problem with the section itself (an unknown section or key).
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            None if self.section.is_empty() => {
                write!(f, "{}: {}", self.file.display(), self.message)
            }
            Some(k) => write!(
                f,
                "{}: [{}] {}: {}",
                self.file.display(),
                self.section,
                k,
                self.message
            ),
            None => write!(
                f,
                "{}: [{}]: {}",
                self.file.display(),
                self.section,
                self.message
            ),
        }
    }
}

/// Why a configuration could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source} (create one with `autoscaler init`)")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{} problem{} in the configuration:\n{}", .0.len(), if .0.len() == 1 { "" } else { "s" }, .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
    #[error("{path} holds AWS keys but its mode is {mode:04o}, readable by others; run `chmod 600 {path}`")]
    Insecure { path: PathBuf, mode: u32 },
}

impl ConfigError {
    /// The problems, when the file parsed but did not validate.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(p) => p,
            _ => &[],
        }
    }
}

/// Reads typed values key by key, remembering which keys exist and collecting problems.
struct Reader {
    file: PathBuf,
    /// section → key → values (several when a key is repeated).
    values: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// Keys outside any section.
    stray: Vec<String>,
    known: BTreeMap<&'static str, BTreeSet<&'static str>>,
    order: Vec<(&'static str, &'static str)>,
    problems: Vec<Problem>,
}

impl Reader {
    fn new(file: &Path, ini: &ini::Ini) -> Reader {
        let mut values: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
        let mut stray = Vec::new();
        for (section, props) in ini.iter() {
            match section {
                None => stray.extend(props.iter().map(|(k, _)| k.to_string())),
                Some(s) => {
                    let sec = values.entry(s.trim().to_string()).or_default();
                    for (k, v) in props.iter() {
                        sec.entry(k.trim().to_string())
                            .or_default()
                            .push(v.trim().to_string());
                    }
                }
            }
        }
        Reader {
            file: file.to_path_buf(),
            values,
            stray,
            known: BTreeMap::new(),
            order: Vec::new(),
            problems: Vec::new(),
        }
    }

    fn problem(&mut self, section: &'static str, key: &'static str, message: String) {
        self.problems.push(Problem {
            file: self.file.clone(),
            section: section.into(),
            key: Some(key.into()),
            message,
        });
    }

    /// The raw value of a key, registering the key as known; a repeated key is a problem.
    fn raw(&mut self, section: &'static str, key: &'static str) -> Option<String> {
        if self.known.entry(section).or_default().insert(key) {
            self.order.push((section, key));
        }
        let vals = self.values.get(section)?.get(key)?.clone();
        if vals.len() > 1 {
            self.problem(
                section,
                key,
                format!(
                    "is set {} times; set it once (lists are comma-separated)",
                    vals.len()
                ),
            );
        }
        vals.into_iter().last()
    }

    fn string(&mut self, section: &'static str, key: &'static str, default: &str) -> String {
        match self.raw(section, key) {
            Some(v) if v.chars().any(|c| c.is_control()) => {
                self.problem(section, key, "contains a control character".into());
                default.to_string()
            }
            Some(v) => v,
            None => default.to_string(),
        }
    }

    fn parse<T: FromStr>(&mut self, section: &'static str, key: &'static str, default: T) -> T
    where
        T::Err: fmt::Display,
    {
        match self.raw(section, key) {
            None => default,
            Some(v) => match v.parse::<T>() {
                Ok(t) => t,
                Err(e) => {
                    let what = accepted::<T>(&e.to_string());
                    self.problem(section, key, format!("{v:?} is not valid; expected {what}"));
                    default
                }
            },
        }
    }

    fn port(&mut self, section: &'static str, key: &'static str, default: u16) -> u16 {
        match self.raw(section, key) {
            None => default,
            Some(v) => parse_port(&v).unwrap_or_else(|e| {
                self.problem(section, key, e.to_string());
                default
            }),
        }
    }

    fn percent(&mut self, section: &'static str, key: &'static str, default: f64) -> f64 {
        match self.raw(section, key) {
            None => default,
            Some(v) => match v.trim_end_matches('%').trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => p,
                _ => {
                    self.problem(
                        section,
                        key,
                        format!("{v:?} is not a percentage between 0 and 100"),
                    );
                    default
                }
            },
        }
    }

    fn duration(
        &mut self,
        section: &'static str,
        key: &'static str,
        default: Duration,
    ) -> Duration {
        match self.raw(section, key) {
            None => default,
            Some(v) => humantime::parse_duration(&v).unwrap_or_else(|_| {
                self.problem(
                    section,
                    key,
                    format!("{v:?} is not a duration; write e.g. 500ms, 30s, 5m, 1h or 1h 30m"),
                );
                default
            }),
        }
    }

    fn boolean(&mut self, section: &'static str, key: &'static str, default: bool) -> bool {
        match self.raw(section, key).map(|v| v.to_ascii_lowercase()) {
            None => default,
            Some(v) => match v.as_str() {
                "true" | "yes" | "on" | "1" => true,
                "false" | "no" | "off" | "0" => false,
                _ => {
                    self.problem(section, key, format!("{v:?} is not true or false"));
                    default
                }
            },
        }
    }

    fn list(&mut self, section: &'static str, key: &'static str) -> Vec<String> {
        self.raw(section, key)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn parsed_list<T: FromStr<Err = String>>(
        &mut self,
        section: &'static str,
        key: &'static str,
        default: Vec<T>,
    ) -> Vec<T> {
        if self.values.get(section).and_then(|s| s.get(key)).is_none() {
            self.raw(section, key);
            return default;
        }
        let mut out = Vec::new();
        for item in self.list(section, key) {
            match item.parse::<T>() {
                Ok(t) => out.push(t),
                Err(e) => {
                    self.problem(section, key, format!("{item:?} is not valid; expected {e}"))
                }
            }
        }
        out
    }

    fn path(&mut self, section: &'static str, key: &'static str, default: &Path) -> PathBuf {
        match self.raw(section, key) {
            None => default.to_path_buf(),
            Some(v) if v.is_empty() => {
                self.problem(section, key, "must not be empty".into());
                default.to_path_buf()
            }
            Some(v) => self.anchor(&v),
        }
    }

    fn optional_path(&mut self, section: &'static str, key: &'static str) -> Option<PathBuf> {
        match self.raw(section, key) {
            Some(v) if !v.is_empty() => Some(self.anchor(&v)),
            _ => None,
        }
    }

    /// Relative paths in the file are relative to the file's directory.
    fn anchor(&self, v: &str) -> PathBuf {
        let p = Path::new(v);
        match self.file.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        }
    }

    /// Turns every key and section that no reader asked for into a problem with a suggestion.
    fn check_unknown(&mut self) {
        let mut found = Vec::new();
        for key in &self.stray {
            found.push(Problem {
                file: self.file.clone(),
                section: String::new(),
                key: None,
                message: format!("{key:?} is outside any section; put it under its [section]"),
            });
        }
        for (section, keys) in &self.values {
            let Some((&known_section, known_keys)) = self.known.get_key_value(section.as_str())
            else {
                let suggestion = closest(section, self.known.keys().copied())
                    .map(|s| format!("; did you mean [{s}]?"))
                    .unwrap_or_default();
                found.push(Problem {
                    file: self.file.clone(),
                    section: section.clone(),
                    key: None,
                    message: format!(
                        "unknown section{suggestion} (sections: {})",
                        self.known.keys().copied().collect::<Vec<_>>().join(", ")
                    ),
                });
                continue;
            };
            for key in keys.keys() {
                if known_keys.contains(key.as_str()) {
                    continue;
                }
                let elsewhere = self
                    .known
                    .iter()
                    .find(|(_, ks)| ks.contains(key.as_str()))
                    .map(|(s, _)| format!("; {key} belongs in [{s}]"));
                let suggestion = elsewhere
                    .or_else(|| {
                        closest(key, known_keys.iter().copied())
                            .map(|k| format!("; did you mean {k}?"))
                    })
                    .unwrap_or_default();
                found.push(Problem {
                    file: self.file.clone(),
                    section: known_section.into(),
                    key: None,
                    message: format!("unknown key {key:?}{suggestion}"),
                });
            }
        }
        self.problems.extend(found);
    }
}

/// The closest candidate by edit distance, if it is close enough to be a plausible typo.
fn closest<'k>(word: &str, candidates: impl Iterator<Item = &'k str>) -> Option<&'k str> {
    candidates
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 3.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// What a type accepts, for messages: enums list their choices, numbers say what they are.
fn accepted<T>(err: &str) -> String {
    let t = std::any::type_name::<T>();
    match t {
        "u32" | "u64" | "usize" => "a whole number, 0 or more".into(),
        "f64" => "a number such as 0.1".into(),
        _ => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> PathBuf {
        PathBuf::from("/srv/as/autoscaler.ini")
    }

    fn defaults() -> Config {
        Config::defaults(&Layout::for_dir(Path::new("/srv/as")), Role::Master)
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, &path())
    }

    /// Parses `text` expecting failure; returns the problems as display lines.
    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(_) => panic!("expected problems in:\n{text}"),
            Err(e) => {
                let p: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
                assert!(!p.is_empty(), "expected Invalid, got {e}");
                p
            }
        }
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").unwrap(), defaults());
    }

    #[test]
    fn system_layout_uses_system_directories() {
        let l = Layout::for_dir(Path::new(DEFAULT_DIR));
        assert_eq!(l.state_dir, PathBuf::from("/var/lib/autoscaler"));
        assert_eq!(l.haproxy_config, PathBuf::from("/etc/haproxy/haproxy.cfg"));
        assert_eq!(l.hosts_dir, PathBuf::from("/etc/autoscaler/hosts.d"));
        let l = Layout::for_dir(Path::new("/tmp/x"));
        assert_eq!(l.hosts_dir, PathBuf::from("/tmp/x/hosts.d"));
        assert_eq!(l.state_dir, PathBuf::from("/tmp/x/state"));
        assert_eq!(l.haproxy_config, PathBuf::from("/tmp/x/haproxy.cfg"));
    }

    #[test]
    fn rendered_defaults_parse_back_to_the_same_config() {
        for role in [Role::Master, Role::Node] {
            let cfg = Config::defaults(&Layout::for_dir(Path::new("/srv/as")), role);
            let text = render::render_ini(&cfg).unwrap();
            assert_eq!(parse(&text).unwrap(), cfg, "{text}");
            assert!(text.contains(&format!("\nrole = {role}\n")));
        }
    }

    #[test]
    fn rendered_file_has_every_key_once_with_a_comment() {
        let text = render::render_ini(&defaults()).unwrap();
        let keys = Config::known_keys();
        assert!(keys.len() > 60, "{} keys", keys.len());
        let lines: Vec<&str> = text.lines().collect();
        let mut section = "";
        let mut seen = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            if line.starts_with('#') {
                continue;
            } else if let Some(s) = line.strip_prefix('[') {
                section = s.trim_end_matches(']');
            } else if let Some((k, _)) = line.split_once(" = ") {
                seen.push((section, k));
                let prev = lines[i - 1];
                assert!(
                    prev.starts_with("# ") || prev.contains(" = "),
                    "{k} has no comment"
                );
            }
        }
        let mut want: Vec<_> = keys.clone();
        want.sort();
        seen.sort();
        assert_eq!(seen, want);
    }

    #[test]
    fn values_are_read() {
        let cfg = parse(
            "[autoscaler]\nrole = node\nhosts_dir = hosts\n\
             [node]\nsample_interval = 500ms\n\
             [scaling]\npolicy = cluster\nscale_up_threshold = 80%\ncooldown = 1h 30m\ndry_run = no\n\
             [launch]\nlauncher = command\nscale_up_command = /usr/local/bin/grow --zone 'eu west'\n\
             security_group_ids = sg-1, sg-2,\n\
             [haproxy]\nservers = local, ops@lb2.example.com:2222, ssh://[2001:db8::2]:22\n",
        )
        .unwrap();
        assert_eq!(cfg.general.role, Role::Node);
        assert_eq!(cfg.general.hosts_dir, PathBuf::from("/srv/as/hosts"));
        assert_eq!(cfg.node.sample_interval, Duration::from_millis(500));
        assert_eq!(cfg.scaling.policy, Policy::Cluster);
        assert_eq!(cfg.scaling.scale_up_threshold, 80.0);
        assert_eq!(cfg.scaling.cooldown, Duration::from_secs(5400));
        assert!(!cfg.scaling.dry_run);
        assert_eq!(
            cfg.launch.scale_up_command.0,
            ["/usr/local/bin/grow", "--zone", "eu west"]
        );
        assert_eq!(cfg.launch.security_group_ids, ["sg-1", "sg-2"]);
        assert_eq!(
            cfg.haproxy.servers,
            vec![
                HaproxyTarget::Local,
                HaproxyTarget::Ssh {
                    user: Some("ops".into()),
                    host: HostName::parse("lb2.example.com").unwrap(),
                    port: Some(2222)
                },
                HaproxyTarget::Ssh {
                    user: None,
                    host: HostName::parse("2001:db8::2").unwrap(),
                    port: Some(22)
                },
            ]
        );
        assert_eq!(cfg.haproxy.servers[2].to_string(), "ssh://[2001:db8::2]:22");
    }

    /// Each bad file names its section and key, and says what is accepted.
    #[test]
    fn bad_values_name_section_and_key() {
        let cases: &[(&str, &str)] = &[
            ("[autoscaler]\nrole = boss\n", "[autoscaler] role: \"boss\" is not valid; expected one of: master, node"),
            ("[node]\nreport_port = 0\n", "[node] report_port: port \"0\""),
            ("[node]\nreport_port = 70000\n", "[node] report_port: port \"70000\""),
            ("[node]\nsample_interval = 100ms\n", "[node] sample_interval: 100ms is too short"),
            ("[node]\nsample_interval = fast\n", "[node] sample_interval: \"fast\" is not a duration"),
            ("[node]\nbuffer = -3\n", "[node] buffer: \"-3\" is not valid; expected a whole number"),
            ("[scaling]\nscale_up_threshold = 120\n", "[scaling] scale_up_threshold: \"120\" is not a percentage"),
            ("[scaling]\ntolerance = 1.5\n", "[scaling] tolerance: 1.5 is not in [0, 1)"),
            ("[scaling]\ntolerance = lots\n", "[scaling] tolerance: \"lots\" is not valid; expected a number"),
            ("[scaling]\nmin_nodes = 5\nmax_nodes = 2\n", "[scaling] min_nodes: 5 is above max_nodes (2)"),
            ("[scaling]\nscale_down_threshold = 80\n", "[scaling] scale_down_threshold: 80 must be below scale_up_threshold (75)"),
            ("[scaling]\ndry_run = maybe\n", "[scaling] dry_run: \"maybe\" is not true or false"),
            ("[scaling]\nmax_launches_per_hour = 0\n", "[scaling] max_launches_per_hour: must be at least 1"),
            ("[scaling]\ncooldown = 5 minutes later\n", "[scaling] cooldown: \"5 minutes later\" is not a duration"),
            ("[ssh]\nhost_key_policy = accept-all\n", "[ssh] host_key_policy: \"accept-all\" is not valid; expected one of: strict, accept-new"),
            ("[ssh]\nuser = -oProxyCommand=x\n", "[ssh] user: \"-oProxyCommand=x\" is not a valid user name"),
            ("[aws]\naccess_key_id = AKIAEXAMPLE\n", "[aws] secret_access_key: access_key_id and secret_access_key are set together"),
            ("[aws]\nendpoint = localhost:5000\n", "[aws] endpoint: \"localhost:5000\" is not an http:// or https:// URL"),
            ("[launch]\nlauncher = lambda\n", "[launch] launcher: \"lambda\" is not valid; expected one of: ec2, command"),
            ("[launch]\nscale_up_command = grow 'unbalanced\n", "[launch] scale_up_command: \"grow 'unbalanced\" is not valid; expected a command line with balanced quotes"),
            ("[scaling]\ndry_run = false\n", "[launch] image_id: an AMI id (or launch_template) is needed"),
            ("[scaling]\ndry_run = false\n[launch]\nlauncher = command\n", "[launch] scale_up_command: launcher = command needs a scale_up_command"),
            ("[haproxy]\nservers = local, bad host\n", "[haproxy] servers: \"bad host\" is not valid; expected `local` or `[ssh://][user@]host[:port]`"),
            ("[haproxy]\nservers = -x@lb\n", "[haproxy] servers: \"-x@lb\" is not valid"),
            ("[haproxy]\nservers =\n", "[haproxy] servers: needs at least one server"),
            ("[haproxy]\nbind = 80\n", "[haproxy] bind: \"80\" is not ADDRESS:PORT"),
            ("[haproxy]\nbind = *:80 ssl crt /x\n", "[haproxy] bind: \"*:80 ssl crt /x\" is not ADDRESS:PORT"),
            ("[haproxy]\ncheck_command = haproxy -c\n", "[haproxy] check_command: must contain {config}"),
            ("[haproxy]\nbackend = web app\n", "[haproxy] backend: \"web app\" is not a name"),
            ("[haproxy]\nhealth_check_path = healthz\n", "[haproxy] health_check_path: \"healthz\" is not a URL path"),
            ("[haproxy]\ntemplate = /nonexistent/t.tera\n", "[haproxy] template: /nonexistent/t.tera is not a readable file"),
            ("[haproxy]\nconfig_path =\n", "[haproxy] config_path: must not be empty"),
        ];
        for (text, want) in cases {
            let got = problems(text);
            assert!(
                got.iter()
                    .any(|p| p == &format!("/srv/as/autoscaler.ini: {want}")
                        || p.starts_with(&format!("/srv/as/autoscaler.ini: {want}"))),
                "for {text:?}\nwant: {want}\ngot:  {got:#?}"
            );
        }
    }

    #[test]
    fn node_role_needs_no_launch_settings() {
        assert!(parse("[autoscaler]\nrole = node\n[scaling]\ndry_run = false\n").is_ok());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let got = problems(
            "[node]\nreport_port = x\n[scaling]\ncooldown = soon\nmax_nodes = 0\n[haproxy]\nbind = nowhere\nservrs = local\n",
        );
        // max_nodes = 0 is reported twice: on its own and as below min_nodes.
        assert_eq!(got.len(), 6, "{got:#?}");
    }

    #[test]
    fn unknown_keys_and_sections_get_suggestions() {
        let got = problems("[scaling]\ncooldwn = 5m\n");
        assert_eq!(got, ["/srv/as/autoscaler.ini: [scaling]: unknown key \"cooldwn\"; did you mean cooldown?"]);
        let got = problems("[scaling]\nreport_port = 9000\n");
        assert_eq!(got, ["/srv/as/autoscaler.ini: [scaling]: unknown key \"report_port\"; report_port belongs in [node]"]);
        let got = problems("[scalling]\ncooldown = 5m\n");
        assert!(
            got[0].starts_with(
                "/srv/as/autoscaler.ini: [scalling]: unknown section; did you mean [scaling]?"
            ),
            "{got:?}"
        );
        let got = problems("role = master\n");
        assert_eq!(got, ["/srv/as/autoscaler.ini: \"role\" is outside any section; put it under its [section]"]);
        let got = problems("[haproxy]\nzzzzzzzz = 1\n");
        assert_eq!(
            got,
            ["/srv/as/autoscaler.ini: [haproxy]: unknown key \"zzzzzzzz\""]
        );
    }

    #[test]
    fn repeated_keys_and_sections() {
        let got = problems("[scaling]\ncooldown = 1m\ncooldown = 2m\n");
        assert!(
            got[0].contains("[scaling] cooldown: is set 2 times"),
            "{got:?}"
        );
        // A section that appears twice is merged; a key in each is still a repeat.
        let got = problems("[scaling]\ncooldown = 1m\n[node]\n[scaling]\ncooldown = 2m\n");
        assert!(
            got[0].contains("[scaling] cooldown: is set 2 times"),
            "{got:?}"
        );
        let cfg = parse("[scaling]\ncooldown = 1m\n[node]\n[scaling]\nwarmup = 2m\n").unwrap();
        assert_eq!(cfg.scaling.cooldown, Duration::from_secs(60));
    }

    #[test]
    fn syntax_error_names_the_line() {
        let e = parse("[node]\nreport_port = 1\n[scaling\ncooldown = 1m\n").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { line: 3, .. }), "{e}");
        assert!(
            e.to_string().starts_with("/srv/as/autoscaler.ini:3:"),
            "{e}"
        );
    }

    #[test]
    fn secrets_are_redacted_everywhere() {
        let cfg = parse("[aws]\naccess_key_id = AKIAIOSFODNN7EXAMPLE\nsecret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n").unwrap();
        assert_eq!(
            cfg.aws.secret_access_key.expose(),
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
        );
        let shown = [
            render::render_ini(&cfg).unwrap(),
            format!("{cfg:?}"),
            serde_json::to_string(&cfg).unwrap(),
        ];
        for s in shown {
            assert!(
                !s.contains("wJalrXUtnFEMI") && !s.contains("AKIAIOSFODNN7"),
                "{s}"
            );
            assert!(s.contains("<redacted>"));
        }
    }

    #[test]
    fn loose_file_with_keys_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("autoscaler.ini");
        let text = "[aws]\naccess_key_id = AKIAEXAMPLE\nsecret_access_key = s3cr3t\n";
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = Config::load(&p).unwrap_err();
        assert!(
            matches!(e, ConfigError::Insecure { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        assert!(!e.to_string().contains("s3cr3t"));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Config::load(&p).is_ok());
        // Without keys, a world-readable file is fine.
        fs::write(&p, "[scaling]\ncooldown = 1m\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Config::load(&p).is_ok());
    }

    #[test]
    fn missing_file_says_how_to_create_one() {
        let e = Config::load(Path::new("/nonexistent/autoscaler.ini")).unwrap_err();
        assert!(e.to_string().contains("autoscaler init"), "{e}");
    }

    #[test]
    fn command_line_placeholders_stay_single_arguments() {
        let c: CommandLine = "haproxy -c -f {config}".parse().unwrap();
        assert_eq!(
            c.expand(&[("config", "/tmp/a b.cfg")]),
            ["haproxy", "-c", "-f", "/tmp/a b.cfg"]
        );
        assert_eq!(c.to_string(), "haproxy -c -f {config}");
        let c: CommandLine = "sh -c 'kill -USR2 $(cat /run/h.pid)'".parse().unwrap();
        assert_eq!(c.0, ["sh", "-c", "kill -USR2 $(cat /run/h.pid)"]);
        assert_eq!(c.to_string().parse::<CommandLine>().unwrap(), c);
    }
}
