//! `autoscaler.ini`: parsed, then validated, then trusted.
//!
//! - [`keys`]: the table of keys — section, name, kind, default, bound and comment of each,
//!   declared once. Reading, defaults, `check`'s printout and the `init` file come from it.
//! - [`kinds`]: how each kind of value is parsed, checked and written back.
//! - [`values`]: the value types that are more than a number or a string.
//! - `reader`: the file's shape (repeated, stray and unknown keys, with suggestions).
//!
//! Every problem is collected — a bad value, an unknown key (with the closest known one), a
//! contradiction between keys — and reported together, each naming the file, the section and
//! the key. After [`Config::load`] returns, the rest of the program trusts the values.

pub mod keys;
pub mod kinds;
mod reader;
pub mod values;

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use thiserror::Error;

pub use keys::{Key, KEYS};
pub use values::{
    CommandLine, HaproxyTarget, HostKeyPolicy, Policy, ProvisionerKind, Role, Secret,
};

use kinds::Cx;
use reader::Reader;

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

/// `[autoscaler]`: the role and the directories.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct General {
    pub role: Role,
    /// One file per backend host (`autoscaler add-host`).
    pub hosts_dir: PathBuf,
    /// Launch intents and last decision times.
    pub state_dir: PathBuf,
    /// The running master answers `autoscaler status` here (mode 0600).
    pub control_socket: PathBuf,
    /// Where the master serves Prometheus metrics at `/metrics`; None: off.
    pub metrics_address: Option<std::net::SocketAddr>,
}

/// `[node]`: the node agent.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeSection {
    /// The Unix socket on the node where the master's SSH remote forward appears (the agent
    /// reports to every socket in its directory); None: TCP on `report_port`.
    pub report_socket: Option<String>,
    /// The node's 127.0.0.1 port that the master's SSH remote forward listens on (TCP).
    pub report_port: u16,
    pub sample_interval: Duration,
    /// Samples kept while the link to the master is down.
    pub buffer: usize,
    /// How the node names itself in its hello (empty: the machine's host name).
    pub name: String,
    /// Instance id reported in the hello (empty: none).
    pub instance_id: String,
    /// The report secret (HMAC key) agents prove they hold; None: reports are not
    /// authenticated.
    pub secret_file: Option<PathBuf>,
    /// Report ports of other masters; the agent reports to each (and to report_port).
    pub other_report_ports: Vec<u16>,
}

/// `[scaling]`: the decision policy and its guards.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Scaling {
    pub policy: Policy,
    pub scale_up_threshold: f64,
    pub scale_up_window: Duration,
    pub target_cpu: f64,
    pub tolerance: f64,
    pub scale_down_threshold: f64,
    pub scale_down_window: Duration,
    /// HAProxy signals (None / false: off).
    pub target_requests_per_node: Option<f64>,
    pub target_sessions_per_node: Option<f64>,
    pub scale_on_queue: bool,
    pub target_response_time: Option<Duration>,
    pub min_nodes: u32,
    pub max_nodes: u32,
    pub scale_up_step: u32,
    pub cooldown: Duration,
    pub scale_down_cooldown: Duration,
    pub max_launches_per_hour: u32,
    pub stale_after: Duration,
    pub warmup: Duration,
    pub drain_timeout: Duration,
    pub dry_run: bool,
}

impl Scaling {
    /// Whether any HAProxy signal is on (the master then reads `show stat` every tick).
    pub fn haproxy_signals(&self) -> bool {
        self.target_requests_per_node.is_some()
            || self.target_sessions_per_node.is_some()
            || self.scale_on_queue
            || self.target_response_time.is_some()
    }
}

/// `[ssh]`: how the master reaches nodes and remote HAProxy servers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Ssh {
    pub user: String,
    pub port: u16,
    pub identity_file: PathBuf,
    pub known_hosts: PathBuf,
    pub host_key_policy: HostKeyPolicy,
    pub connect_timeout: Duration,
    pub keepalive: Duration,
}

/// `[aws]`: region, endpoint and (optionally) static credentials.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Aws {
    pub region: String,
    pub endpoint: String,
    pub profile: String,
    /// Longest one API call may take before it is retried.
    pub api_timeout: Duration,
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
}

/// `[launch]`: how new capacity is obtained.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Launch {
    pub launcher: ProvisionerKind,
    /// Value of the `autoscaler:group` tag; separates several fleets in one account.
    pub group: String,
    pub image_id: String,
    pub instance_type: String,
    pub subnet_id: String,
    pub security_group_ids: Vec<String>,
    pub key_name: String,
    pub iam_instance_profile: String,
    pub user_data_file: Option<PathBuf>,
    pub launch_template: String,
    pub launch_template_version: String,
    /// Port HAProxy sends traffic to on launched hosts.
    pub app_port: u16,
    pub launch_timeout: Duration,
    pub health_check: bool,
    pub health_timeout: Duration,
    /// Record launched hosts' SSH host keys from the console output or the command's output.
    pub learn_host_keys: bool,
    pub scale_up_command: CommandLine,
    pub scale_down_command: CommandLine,
    pub command_timeout: Duration,
}

/// `[cluster]`: several masters, one leader, state in etcd. Empty `etcd_endpoints`: one
/// master with hosts.d and the state directory on local disk.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Cluster {
    pub etcd_endpoints: Vec<String>,
    /// Masters of one group elect one leader and share one host list.
    pub group: String,
    /// This master's name in the election (empty: the host name).
    pub name: String,
    pub lease_ttl: Duration,
    pub etcd_timeout: Duration,
    pub etcd_ca_file: Option<PathBuf>,
    pub etcd_cert_file: Option<PathBuf>,
    pub etcd_key_file: Option<PathBuf>,
    pub etcd_user: String,
    pub etcd_password_file: Option<PathBuf>,
}

impl Cluster {
    /// Whether masters share state in etcd.
    pub fn enabled(&self) -> bool {
        !self.etcd_endpoints.is_empty()
    }
}

/// `[haproxy]`: the generated configuration and the servers that receive it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Haproxy {
    pub servers: Vec<HaproxyTarget>,
    pub config_path: PathBuf,
    /// Frontend `bind` lines, e.g. `*:80`, `*:443 ssl crt /etc/haproxy/site.pem`.
    pub bind: Vec<String>,
    /// Path of a template that replaces the embedded one.
    pub template: Option<PathBuf>,
    pub check_command: CommandLine,
    pub reload_command: CommandLine,
    /// Longest the check or reload command may run.
    pub command_timeout: Duration,
    /// Change servers through the runtime API when only the server list changes.
    pub runtime_api: bool,
    pub stats_socket: PathBuf,
    /// HAProxy's master CLI (`-S`): old workers' sessions after a reload. None: not used.
    pub master_socket: Option<PathBuf>,
    pub server_state_file: PathBuf,
    pub user: String,
    pub group: String,
    pub chroot: Option<PathBuf>,
    pub backend: String,
    pub health_check_path: String,
    pub check_interval: Duration,
    pub debounce: Duration,
    /// HAProxy's `hard-stop-after`; zero: none.
    pub hard_stop_after: Duration,
    /// How often host names are resolved again.
    pub resolve_every: Duration,
}

/// The whole configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (for messages); not a key.
    pub source: PathBuf,
    pub general: General,
    pub node: NodeSection,
    pub scaling: Scaling,
    pub ssh: Ssh,
    pub aws: Aws,
    pub launch: Launch,
    pub haproxy: Haproxy,
    pub cluster: Cluster,
}

/// The paths a fresh configuration points at. The system layout under `/etc/autoscaler` uses
/// the usual system directories; any other directory keeps everything inside it, so an
/// unprivileged user can run the whole thing from a temp dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub dir: PathBuf,
    /// The system layout (`/etc/autoscaler`), as opposed to a private directory.
    pub system: bool,
    pub hosts_dir: PathBuf,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub report_secret: PathBuf,
    /// `[node] report_socket`'s default (text: it is a path on the node).
    pub report_socket: String,
    pub identity_file: PathBuf,
    pub known_hosts: PathBuf,
    pub haproxy_config: PathBuf,
    pub stats_socket: PathBuf,
    pub haproxy_master: PathBuf,
    pub haproxy_state: PathBuf,
}

impl Layout {
    /// The layout for configuration directory `dir`.
    pub fn for_dir(dir: &Path) -> Layout {
        let system = dir == Path::new(DEFAULT_DIR);
        let inside = |name: &str| dir.join(name);
        let either = |sys: &str, name: &str| match system {
            true => PathBuf::from(sys),
            false => inside(name),
        };
        Layout {
            dir: dir.to_path_buf(),
            system,
            hosts_dir: inside("hosts.d"),
            state_dir: either("/var/lib/autoscaler", "state"),
            control_socket: either("/run/autoscaler/master.sock", "master.sock"),
            report_secret: inside("report.key"),
            report_socket: either("/run/autoscaler/reports/master.sock", "reports/master.sock")
                .display()
                .to_string(),
            identity_file: inside("id_ed25519"),
            known_hosts: inside("known_hosts"),
            haproxy_config: either("/etc/haproxy/haproxy.cfg", "haproxy.cfg"),
            stats_socket: either("/run/haproxy/admin.sock", "haproxy.sock"),
            haproxy_master: either("/run/haproxy-master.sock", "haproxy-master.sock"),
            haproxy_state: either("/var/lib/haproxy/server-state", "haproxy.state"),
        }
    }

    /// HAProxy's user and group: Debian's `haproxy` in the system layout; in a private
    /// directory, whoever starts it.
    pub fn haproxy_user(&self) -> String {
        match self.system {
            true => "haproxy".into(),
            false => String::new(),
        }
    }

    /// HAProxy's chroot: Debian's in the system layout, none in a private directory.
    pub fn haproxy_chroot(&self) -> String {
        match self.system {
            true => "/var/lib/haproxy".into(),
            false => String::new(),
        }
    }
}

impl Config {
    /// Every field empty or zero: only a starting point for [`Config::defaults`].
    fn blank(source: PathBuf) -> Config {
        Config {
            source,
            general: General::default(),
            node: NodeSection::default(),
            scaling: Scaling::default(),
            ssh: Ssh::default(),
            aws: Aws::default(),
            launch: Launch::default(),
            haproxy: Haproxy::default(),
            cluster: Cluster::default(),
        }
    }

    /// The defaults for a configuration directory and role: what `autoscaler init` writes.
    pub fn defaults(layout: &Layout, role: Role) -> Config {
        let mut cfg = Config::blank(layout.dir.join(CONFIG_FILE_NAME));
        for k in KEYS {
            let text = k.default_text(layout);
            if let Err(e) = (k.set)(&mut cfg, &text, &Cx::PLAIN) {
                // The table's own test parses every default: this is a programming error.
                panic!("default of [{}] {} ({text:?}): {e}", k.section, k.name);
            }
        }
        cfg.general.role = role;
        cfg
    }

    /// Reads, parses and validates `path`; also refuses a file that holds AWS keys but is
    /// readable by group or others.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let text = fs::read_to_string(path).map_err(read_err)?;
        let mode = fs::metadata(path).map_err(read_err)?.permissions().mode();
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
        let (cfg, problems) = Config::parse_all(text, path)?;
        match problems.is_empty() {
            true => Ok(cfg),
            false => Err(ConfigError::Invalid(problems)),
        }
    }

    /// Reads `path` as far as it can: every key that parses takes its value, every other
    /// keeps its default, and the problems come along. For `autoscaler status`, which only
    /// needs the control socket and must work while the file on disk is being edited.
    pub fn load_lenient(path: &Path) -> Result<(Config, Vec<Problem>), ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse_all(&text, path)
    }

    /// Where the master at `path`'s configuration answers `status`, even when the file is
    /// not INI at all (a running master may run an older, good copy): the `[autoscaler]
    /// control_socket` line as written, else the default for the file's directory.
    pub fn control_socket_of(path: &Path) -> PathBuf {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let text = fs::read_to_string(path).unwrap_or_default();
        let mut section = "";
        let mut found = None;
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = if name.trim() == "autoscaler" {
                    "autoscaler"
                } else {
                    ""
                };
            } else if let Some((k, v)) = line.split_once(['=', ':']) {
                let v = v.trim();
                // The last one counts, as for the parser.
                if section == "autoscaler" && k.trim() == "control_socket" && !v.is_empty() {
                    found = Some(dir.join(v));
                }
            }
        }
        found.unwrap_or_else(|| Layout::for_dir(dir).control_socket)
    }

    /// The configuration in `text` and every problem found in it; only a file that is not
    /// INI at all is an error.
    fn parse_all(text: &str, path: &Path) -> Result<(Config, Vec<Problem>), ConfigError> {
        // rust-ini lets a section header run on to the next lines; a header is one line here.
        // A broken one is a problem, and is read as closed, so the rest of the file is
        // checked in the same go.
        let mut broken = Vec::new();
        let mut repaired = String::with_capacity(text.len());
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.starts_with('[') && !line.ends_with(']') {
                let name = line.trim_start_matches('[').trim();
                broken.push(Problem {
                    file: path.to_path_buf(),
                    section: String::new(),
                    key: None,
                    message: format!(
                        "line {}: section header {line:?} must be one line ending with ']' (the lines after it were read as [{name}])",
                        n + 1
                    ),
                });
                repaired.push_str(&format!("[{name}]\n"));
            } else if !line.is_empty()
                && !line.starts_with(['#', ';', '['])
                && !line.contains(['=', ':'])
            {
                broken.push(Problem {
                    file: path.to_path_buf(),
                    section: String::new(),
                    key: None,
                    message: format!("line {}: {line:?} is not `key = value`", n + 1),
                });
                repaired.push('\n');
            } else {
                repaired.push_str(raw);
                repaired.push('\n');
            }
        }
        let text = repaired.as_str();
        let ini = ini::Ini::load_from_str_opt(
            text,
            // Values are taken as written: a command line keeps its shell quoting, and each
            // kind decides what quotes mean (see `kinds::unquote`).
            ini::ParseOption {
                enabled_quote: false,
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
        let base = path.parent().unwrap_or(Path::new(""));
        let mut cfg = Config::defaults(&Layout::for_dir(base), Role::Master);
        cfg.source = path.to_path_buf();
        let cx = Cx { base: Some(base) };
        for k in KEYS {
            if let Some(text) = r.raw(k.section, k.name) {
                if let Err(message) = (k.set)(&mut cfg, &text, &cx) {
                    r.problem(k.section, k.name, message);
                }
            }
        }
        r.check_unknown();
        let mut problems = broken;
        problems.append(&mut r.problems);
        cfg.validate_into(&mut problems);
        Ok((cfg, problems))
    }

    /// Every (section, key) the file may contain, in file order.
    pub fn known_keys() -> Vec<(&'static str, &'static str)> {
        KEYS.iter().map(|k| (k.section, k.name)).collect()
    }

    /// Rules between keys (each value on its own was checked by its kind and bound); each
    /// problem names the key to change.
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
        if self.cluster.lease_ttl.subsec_nanos() != 0 {
            bad(
                "cluster",
                "lease_ttl",
                format!(
                    "{} is not a whole number of seconds (etcd leases count whole seconds; \
                     the rest would be cut off)",
                    humantime::format_duration(self.cluster.lease_ttl)
                ),
            );
        }
        if self
            .node
            .other_report_ports
            .contains(&self.node.report_port)
        {
            bad(
                "node",
                "other_report_ports",
                format!(
                    "lists report_port ({}); each master needs a port of its own",
                    self.node.report_port
                ),
            );
        }
        let c = &self.cluster;
        if c.etcd_cert_file.is_some() != c.etcd_key_file.is_some() {
            bad(
                "cluster",
                "etcd_cert_file",
                "etcd_cert_file and etcd_key_file are set together or not at all".into(),
            );
        }
        if c.etcd_user.is_empty() != c.etcd_password_file.is_none() {
            bad(
                "cluster",
                "etcd_user",
                "etcd_user and etcd_password_file are set together or not at all".into(),
            );
        }
        for e in &c.etcd_endpoints {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .unwrap_or(e);
            if rest.is_empty() || rest.contains(['/', ' ']) || !rest.contains(':') {
                bad(
                    "cluster",
                    "etcd_endpoints",
                    format!("{e:?} is not an etcd endpoint (HOST:PORT, http://HOST:PORT or https://HOST:PORT)"),
                );
            }
        }
        let s = &self.scaling;
        if s.min_nodes > s.max_nodes {
            bad(
                "scaling",
                "min_nodes",
                format!("{} is above max_nodes ({})", s.min_nodes, s.max_nodes),
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
        if self.aws.access_key_id.is_empty() != self.aws.secret_access_key.is_empty() {
            bad(
                "aws",
                match self.aws.access_key_id.is_empty() {
                    true => "access_key_id",
                    false => "secret_access_key",
                },
                "access_key_id and secret_access_key are set together or not at all".into(),
            );
        }
        let master = self.general.role == Role::Master;
        let l = &self.launch;
        if master && !s.dry_run {
            match l.launcher {
                ProvisionerKind::Ec2 if l.image_id.is_empty() && l.launch_template.is_empty() => {
                    bad(
                        "launch",
                        "image_id",
                        "an AMI id (or launch_template) is needed to launch instances; \
                         or set [scaling] dry_run = true"
                            .into(),
                    )
                }
                ProvisionerKind::Command if l.scale_up_command.is_empty() => bad(
                    "launch",
                    "scale_up_command",
                    "launcher = command needs a scale_up_command; or set [scaling] dry_run = true"
                        .into(),
                ),
                _ => {}
            }
        }
        let h = &self.haproxy;
        if master && h.servers.is_empty() {
            bad(
                "haproxy",
                "servers",
                "needs at least one server (`local` for this machine)".into(),
            );
        }
        if let Some(t) = h.template.as_ref().filter(|t| !t.is_file()) {
            bad(
                "haproxy",
                "template",
                format!("{} is not a readable file", t.display()),
            );
        }
    }

    /// The configuration as `autoscaler.ini` text: every key with its comment and value,
    /// secrets redacted. `init` writes it for the defaults; `check` prints it.
    pub fn to_ini_text(&self) -> String {
        let node = self.general.role == Role::Node;
        let mut out = String::from(match node {
            true => keys::NODE_FILE_HEADER,
            false => keys::FILE_HEADER,
        });
        let mut section = "";
        for k in KEYS
            .iter()
            .filter(|k| !node || keys::node_reads(k.section, k.name))
        {
            if k.section != section {
                section = k.section;
                out.push_str(&format!("\n[{section}]\n"));
            }
            for line in k.comment.lines() {
                out.push_str(&format!("# {line}\n"));
            }
            out.push_str(&format!("{} = {}\n", k.name, k.show(self)));
        }
        out
    }
}

/// `{"section": {"key": "value as in the file", …}, …}`, secrets redacted.
impl Serialize for Config {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Section<'a>(&'a Config, &'static str);
        impl Serialize for Section<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(None)?;
                for k in KEYS.iter().filter(|k| k.section == self.1) {
                    m.serialize_entry(k.name, &k.show(self.0))?;
                }
                m.end()
            }
        }
        let mut m = s.serialize_map(None)?;
        for section in keys::sections() {
            m.serialize_entry(section, &Section(self, section))?;
        }
        m.end()
    }
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
        let file = self.file.display();
        match &self.key {
            None if self.section.is_empty() => write!(f, "{file}: {}", self.message),
            Some(k) => write!(f, "{file}: [{}] {k}: {}", self.section, self.message),
            None => write!(f, "{file}: [{}]: {}", self.section, self.message),
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

#[cfg(test)]
mod tests;
