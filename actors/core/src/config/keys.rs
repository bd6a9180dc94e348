//! The table of configuration keys: each key's section, name, kind, default, bound and comment,
//! declared once. Reading a file, the defaults, `autoscaler check`'s printout and the file
//! `autoscaler init` writes all come from [`KEYS`]; adding a key is one entry here plus its
//! field in the section struct.

use super::kinds::{
    check_bound, quote_if_needed, unquote, Binds, Bound, CheckCommand, Choice, Command, ConfigWord,
    Cx, Dur, FilePath, Flag, Fraction, GroupTag, Kind, OptionalDur, OptionalListen, OptionalName,
    OptionalPath, Percent, Port, Ports, ReportSocket, RequiredCommand, SecretText, SocketPath,
    Target, Targets, Text, UrlOrEmpty, UrlPath, UserName, Whole, Words,
};
use super::values::{HostKeyPolicy, Policy, ProvisionerKind, Role};
use super::{Config, Layout};

/// A key's default: fixed text, or a path that depends on the configuration directory.
#[derive(Clone, Copy)]
pub enum DefaultValue {
    /// Parsed like a value in the file.
    Text(&'static str),
    /// What [`Layout`] says for this key (a path, or a value that differs between the
    /// system layout and a private directory).
    Layout(fn(&Layout) -> String),
}

/// One key of `autoscaler.ini`.
pub struct Key {
    pub section: &'static str,
    pub name: &'static str,
    pub default: DefaultValue,
    /// The lowest value allowed, in the key's notation, beyond what its kind accepts.
    pub bound: Option<Bound>,
    /// Added to the message when the bound is not met.
    pub why: &'static str,
    /// One line (or a few) written above the key in the file; empty for a key that shares the
    /// comment of the key before it.
    pub comment: &'static str,
    /// Parses `text` into the key's field (a value that parses is stored even when it is out
    /// of bounds, so rules between keys see it too).
    pub(crate) set: fn(&mut Config, &str, &Cx) -> Result<(), String>,
    /// The field as text that parses back to the same value (secrets redacted).
    pub(crate) show: fn(&Config) -> String,
}

impl Key {
    /// The default as text, for configuration directory `layout`.
    pub fn default_text(&self, layout: &Layout) -> String {
        match self.default {
            DefaultValue::Text(t) => t.to_string(),
            DefaultValue::Layout(f) => f(layout),
        }
    }

    /// The key's value in `cfg`, as the file would hold it (secrets redacted).
    pub fn show(&self, cfg: &Config) -> String {
        (self.show)(cfg)
    }

    /// Whether a running master applies a change of this key when it re-reads the file
    /// (SIGHUP): the decision policy and its guards do; everything else is read at start.
    pub fn is_live(&self) -> bool {
        self.section == "scaling"
    }
}

/// A value as the file holds it: quoted where reading it back needs that.
fn shown<K: Kind>(v: &K::Value) -> String {
    match K::RAW {
        true => K::show(v),
        false => quote_if_needed(K::show(v)),
    }
}

/// `key!("section", group.field: Kind = default, [bound, "why",] "comment")`: one entry of
/// [`KEYS`]. The key's name is the field's name.
macro_rules! key {
    ($section:literal, $group:ident . $field:ident : $kind:ty = $default:expr, $comment:literal) => {
        Key {
            section: $section,
            name: stringify!($field),
            default: $default,
            bound: None,
            why: "",
            comment: $comment,
            set: |c, text, cx| {
                let text = if <$kind as Kind>::RAW {
                    text
                } else {
                    unquote(text)
                };
                c.$group.$field = <$kind as Kind>::parse(text, cx)?;
                Ok(())
            },
            show: |c| shown::<$kind>(&c.$group.$field),
        }
    };
    ($section:literal, $group:ident . $field:ident : $kind:ty = $default:expr,
     $bound:expr, $why:literal, $comment:literal) => {
        Key {
            section: $section,
            name: stringify!($field),
            default: $default,
            bound: Some($bound),
            why: $why,
            comment: $comment,
            set: |c, text, cx| {
                let text = if <$kind as Kind>::RAW {
                    text
                } else {
                    unquote(text)
                };
                c.$group.$field = <$kind as Kind>::parse(text, cx)?;
                check_bound::<$kind>(&c.$group.$field, $bound, $why)
            },
            show: |c| shown::<$kind>(&c.$group.$field),
        }
    };
}

use DefaultValue::{Layout as At, Text as T};

/// The lines at the top of the file `autoscaler init` writes.
pub const FILE_HEADER: &str = "\
# autoscaler configuration. Every key is shown with its value; a removed key takes its default.
# Durations: 500ms, 30s, 5m, 1h, 1h 30m. Lists: comma-separated. Relative paths are relative to
# this file's directory. This file may hold AWS keys: keep it mode 0600 (autoscaler refuses it
# otherwise). Check it with `autoscaler check`. A running master re-reads it on SIGHUP
# (`systemctl reload autoscaler-master`): [scaling] applies at once, the rest at the next start.
";

/// The header of a node's file: what `init --role node` writes holds only what a node reads.
pub const NODE_FILE_HEADER: &str = "\
# autoscaler configuration of a node (the agent on a web server). A node reads only [autoscaler]
# role and [node]; every other section is the master's and is left out here. Every key is
# shown with its value; a removed key takes its default. Durations: 500ms, 30s, 5m.
# Relative paths are relative to this file's directory. Check it with `autoscaler check`.
";

/// Whether a node reads key `section`/`name` (the rest is the master's).
pub fn node_reads(section: &str, name: &str) -> bool {
    section == "node" || (section == "autoscaler" && name == "role")
}

/// Every key, in file order.
pub static KEYS: &[Key] = &[
    // [autoscaler]
    key!("autoscaler", general.role: Choice<Role> = T("master"),
        "master (the HAProxy machine: decides, launches, rewrites HAProxy) or node (a web server)."),
    key!("autoscaler", general.hosts_dir: FilePath = At(|l| l.hosts_dir.display().to_string()),
        "One file per backend host, written by `autoscaler add-host`."),
    key!("autoscaler", general.state_dir: FilePath = At(|l| l.state_dir.display().to_string()),
        "Launch intents and decision times (master)."),
    key!("autoscaler", general.control_socket: FilePath = At(|l| l.control_socket.display().to_string()),
        "Unix socket (mode 0600) where the running master answers `autoscaler status`."),
    key!("autoscaler", general.metrics_address: OptionalListen = T(""),
        "IP:PORT where the master serves Prometheus metrics at /metrics (empty: off). Keep it on\n\
         loopback or a private network: the page names every host."),
    // [node]
    key!("node", node.report_socket: ReportSocket = At(|l| l.report_socket.clone()),
        "Where the master's SSH remote forward appears on the node: a Unix socket, in a directory\n\
         only the agent's user can open (other local users can neither connect to it nor take\n\
         its place). The master logs in as that user ([ssh] user) and asks the node's sshd to\n\
         create this socket; with several masters give each its own name in that directory.\n\
         The agent reports to every master socket in this file's directory. Empty: TCP, below."),
    key!("node", node.report_port: Port = T("9700"),
        "With report_socket empty: port on the node's 127.0.0.1 where the master's forward\n\
         listens. Any local user can connect to it, or bind it while no master holds it."),
    key!("node", node.sample_interval: Dur = T("1s"),
        Bound::AtLeast("200ms"), "; CPU readings closer together are meaningless",
        "How often the node samples its CPU (at least 200ms)."),
    key!("node", node.buffer: Whole<usize> = T("300"), Bound::AtLeast("1"), "",
        "Samples kept while the link to the master is down."),
    key!("node", node.name: Text = T(""),
        "Name the node reports in its hello (empty: this machine's host name)."),
    key!("node", node.instance_id: Text = T(""),
        "Instance id the node reports (empty: none)."),
    key!("node", node.secret_file: OptionalPath = At(|l| l.report_secret.display().to_string()),
        "Report secret shared by the master and its nodes: each report channel proves the agent\n\
         holds it (HMAC over the master's challenge). `autoscaler init` makes it on the master;\n\
         copy it to every node, mode 0600, readable only by the agent's user. Empty: reports\n\
         are not authenticated, and any local user of a node could send some."),
    key!("node", node.other_report_ports: Ports = T(""),
        "TCP, several masters: each forwards its own report_port; list the others' here (node),\n\
         and the agent reports to every one."),
    // [scaling]
    key!("scaling", scaling.policy: Choice<Policy> = T("instance"),
        "instance: scale up when any node's mean busy CPU over scale_up_window reaches\n\
         scale_up_threshold. cluster: keep the fleet's mean CPU near target_cpu."),
    key!("scaling", scaling.scale_up_threshold: Percent = T("75"),
        "Busy CPU percentage that triggers a scale-up (policy = instance)."),
    key!("scaling", scaling.scale_up_window: Dur = T("1m"), Bound::Above("0s"), "",
        "Window over which a node's CPU is averaged for scale-up decisions."),
    key!("scaling", scaling.target_cpu: Percent = T("60"), Bound::Above("0"), "",
        "Mean busy CPU percentage the cluster policy aims for."),
    key!("scaling", scaling.tolerance: Fraction = T("0.1"),
        "Cluster policy: no action while mean/target is within 1 ± tolerance."),
    key!("scaling", scaling.scale_down_threshold: Percent = T("25"),
        "Mean busy CPU percentage below which the fleet scales in."),
    key!("scaling", scaling.scale_down_window: Dur = T("10m"), Bound::Above("0s"), "",
        "How long CPU must stay below scale_down_threshold before a scale-in."),
    key!("scaling", scaling.target_requests_per_node: Target = T(""),
        "HAProxy signal: requests per second each node should carry (the backend's rate, summed\n\
         over every HAProxy server). The fleet aims for ceil(rate / target) nodes. Empty: off."),
    key!("scaling", scaling.target_sessions_per_node: Target = T(""),
        "HAProxy signal: requests in progress per node (the backend's current sessions, summed\n\
         over every HAProxy server): ceil(sessions / target) nodes. Empty: off."),
    key!("scaling", scaling.scale_on_queue: Flag = T("false"),
        "HAProxy signal: true scales up by scale_up_step while requests wait in a queue (the\n\
         backend's or a server's, on any HAProxy server) through the whole scale_up_window;\n\
         scale-in needs no queue at all over scale_down_window."),
    key!("scaling", scaling.target_response_time: OptionalDur = T(""),
        "HAProxy signal (HTTP mode): the backend's average response time to aim for, e.g. 200ms\n\
         (HAProxy's rtime, weighted by each server's request rate): nodes × rtime / target\n\
         nodes. Empty: off. HAProxy signals are read every tick from every [haproxy] server;\n\
         the fleet scales up to the largest count any signal (CPU included) asks for, and in\n\
         only when every signal allows it. A server that does not answer is never read as no\n\
         load."),
    key!("scaling", scaling.min_nodes: Whole<u32> = T("1"),
        "Never fewer nodes than this (scale-in stops here)."),
    key!("scaling", scaling.max_nodes: Whole<u32> = T("10"), Bound::AtLeast("1"), "",
        "Never more nodes than this, launches in flight included."),
    key!("scaling", scaling.scale_up_step: Whole<u32> = T("1"), Bound::AtLeast("1"), "",
        "Nodes launched per scale-up decision (policy = instance)."),
    key!("scaling", scaling.cooldown: Dur = T("5m"),
        "No new scale-up for this long after one (scale-ins are not held by it)."),
    key!("scaling", scaling.scale_down_cooldown: Dur = T("10m"),
        "No scale-in for this long after the last scaling, up or in (a scale-in right after a\n\
         scale-up would undo it)."),
    key!("scaling", scaling.max_launches_per_hour: Whole<u32> = T("6"),
        Bound::AtLeast("1"), " (set dry_run = true to launch nothing)",
        "Hard cap on launches in any hour, whatever the load does."),
    key!("scaling", scaling.stale_after: Dur = T("10s"), Bound::Above("0s"), "",
        "A node whose last sample is older than this takes no part in decisions."),
    key!("scaling", scaling.warmup: Dur = T("2m"),
        "A node takes no part in decisions until its machine has been up this long (the uptime\n\
         its agent reports: a master restart or a reconnect does not start it again; an agent\n\
         that cannot read its uptime counts from when the master first heard it)."),
    key!("scaling", scaling.drain_timeout: Dur = T("1m"),
        "Longest a host taken out of HAProxy may keep its sessions before it is terminated (it\n\
         goes as soon as every HAProxy server reports none left)."),
    key!("scaling", scaling.dry_run: Flag = T("true"),
        "true: decide and log, launch and terminate nothing. Set to false once [launch] is filled in."),
    // [ssh]
    key!("ssh", ssh.user: UserName = T("autoscaler"),
        "User the master logs in as on nodes and remote HAProxy servers."),
    key!("ssh", ssh.port: Port = T("22"),
        "SSH port (a host file's ssh_port overrides it for that host)."),
    key!("ssh", ssh.identity_file: FilePath = At(|l| l.identity_file.display().to_string()),
        "Private key of the master (Ed25519 or ECDSA; RSA is not supported)."),
    key!("ssh", ssh.known_hosts: FilePath = At(|l| l.known_hosts.display().to_string()),
        "Known host keys of the nodes, OpenSSH format."),
    key!("ssh", ssh.host_key_policy: Choice<HostKeyPolicy> = T("strict"),
        "strict: refuse hosts not in known_hosts. accept-new: record a new host's key on first\n\
         contact, refuse a changed one."),
    key!("ssh", ssh.connect_timeout: Dur = T("10s"), Bound::Above("0s"), "",
        "Give up connecting to a host after this long (then retry with backoff)."),
    key!("ssh", ssh.keepalive: Dur = T("15s"),
        "Keepalive interval on SSH sessions (0s: none, as OpenSSH's ServerAliveInterval 0)."),
    // [aws]
    key!("aws", aws.region: Text = T(""),
        "Region (empty: AWS_REGION or the profile's region)."),
    key!("aws", aws.endpoint: UrlOrEmpty = T(""),
        "EC2 API endpoint URL (empty: the region's public endpoint)."),
    key!("aws", aws.profile: Text = T(""),
        "Shared-config profile (empty: AWS_PROFILE or default)."),
    key!("aws", aws.api_timeout: Dur = T("20s"), Bound::Above("0s"), "",
        "Longest one EC2 API call may take; a slower one is retried like a throttled one."),
    key!("aws", aws.access_key_id: SecretText = T(""),
        "Static keys (empty: the standard chain: environment, profile, instance role)."),
    key!("aws", aws.secret_access_key: SecretText = T(""), ""),
    // [launch]
    key!("launch", launch.launcher: Choice<ProvisionerKind> = T("ec2"),
        "ec2: RunInstances through the AWS API. command: run scale_up_command."),
    key!("launch", launch.group: GroupTag = T("default"),
        "Value of the autoscaler:group tag on launched instances."),
    key!("launch", launch.image_id: Text = T(""),
        "AMI to launch (or use launch_template)."),
    key!("launch", launch.instance_type: Text = T("t3.micro"),
        "EC2 instance type."),
    key!("launch", launch.subnet_id: Text = T(""),
        "Subnet to launch into (empty: the default subnet)."),
    key!("launch", launch.security_group_ids: Words = T(""),
        "Security groups, comma-separated ids."),
    key!("launch", launch.key_name: Text = T(""),
        "EC2 key pair name (empty: none)."),
    key!("launch", launch.iam_instance_profile: Text = T(""),
        "IAM instance profile name or ARN (empty: none)."),
    key!("launch", launch.user_data_file: OptionalPath = T(""),
        "File whose contents are the instances' user data (empty: none)."),
    key!("launch", launch.launch_template: Text = T(""),
        "Launch template id (lt-…) or name (empty: none)."),
    key!("launch", launch.launch_template_version: Text = T(""),
        "Launch template version (empty: the template's default)."),
    key!("launch", launch.app_port: Port = T("80"),
        "Port HAProxy sends traffic to on launched hosts."),
    key!("launch", launch.launch_timeout: Dur = T("5m"), Bound::Above("0s"), "",
        "How long a launched instance may take to be running with a private IP."),
    key!("launch", launch.health_check: Flag = T("true"),
        "Wait until host:app_port accepts TCP before registering a launched host."),
    key!("launch", launch.health_timeout: Dur = T("5m"),
        "How long to wait for that."),
    key!("launch", launch.learn_host_keys: Flag = T("true"),
        "Record a launched host's SSH host keys before the first connection, from a channel bound\n\
         to it: its console output (ec2: cloud-init's SSH HOST KEY KEYS block; the launch fails\n\
         without it) or the scale-up command's host_key field. Removed when the host goes."),
    key!("launch", launch.scale_up_command: Command = T(""),
        "launcher = command: argv (shell quoting, no shell) printing {\"host\": …, \"port\": …} as JSON."),
    key!("launch", launch.scale_down_command: Command = T(""),
        "Command run to remove a host on scale-in (empty: just deregister it)."),
    key!("launch", launch.command_timeout: Dur = T("5m"), Bound::Above("0s"), "",
        "Longest a scale command may run (then it is killed)."),
    // [haproxy]
    key!("haproxy", haproxy.servers: Targets = T("local"),
        "HAProxy servers that get the generated config: local, or\n\
         [ssh://][user@]host[:port][/path/to/haproxy.cfg] (reached with [ssh]; path: config_path)."),
    key!("haproxy", haproxy.config_path: FilePath = At(|l| l.haproxy_config.display().to_string()),
        "Where the generated config is installed."),
    key!("haproxy", haproxy.bind: Binds = T("*:80"),
        "Frontend addresses: ADDRESS:PORT [bind options], several separated by ';'\n\
         (e.g. *:80; *:443 ssl crt /etc/haproxy/site.pem alpn h2,http/1.1)."),
    key!("haproxy", haproxy.template: OptionalPath = T(""),
        "Template replacing the embedded one (empty: embedded)."),
    key!("haproxy", haproxy.check_command: CheckCommand = T("haproxy -c -f {config}"),
        "Validates a candidate config; {config} is replaced by its path."),
    key!("haproxy", haproxy.reload_command: RequiredCommand = T("systemctl reload haproxy"),
        "Reloads HAProxy after a new config is installed (hitless in master-worker mode)."),
    key!("haproxy", haproxy.command_timeout: Dur = T("1m"), Bound::Above("0s"), "",
        "Longest check_command or reload_command may run (then it is killed and retried)."),
    key!("haproxy", haproxy.runtime_api: Flag = T("true"),
        "Add, drain and remove servers through the runtime API (stats_socket) without a reload\n\
         when only the server list changes; false: validate and reload for every change."),
    key!("haproxy", haproxy.stats_socket: SocketPath = At(|l| l.stats_socket.display().to_string()),
        "HAProxy runtime API socket (the same path on every server)."),
    key!("haproxy", haproxy.master_socket: OptionalPath = At(|l| l.haproxy_master.display().to_string()),
        "HAProxy's master CLI (haproxy -W -S PATH; Debian's unit passes -S /run/haproxy-master.sock,\n\
         the same path on every server): after a reload it shows the old workers, and a host\n\
         being drained is let go only when none of them holds a session on it. Empty: after a\n\
         reload such a host waits the whole drain_timeout."),
    key!("haproxy", haproxy.server_state_file: SocketPath = At(|l| l.haproxy_state.display().to_string()),
        "Servers' health states are saved here before each reload, so a reload keeps them."),
    key!("haproxy", haproxy.user: OptionalName = At(|l| l.haproxy_user()),
        "User and group HAProxy drops to after start (empty: stays who started it)."),
    key!("haproxy", haproxy.group: OptionalName = At(|l| l.haproxy_user()), ""),
    key!("haproxy", haproxy.chroot: OptionalPath = At(|l| l.haproxy_chroot()),
        "Directory HAProxy confines itself to after start (empty: none)."),
    key!("haproxy", haproxy.backend: ConfigWord = T("app"),
        "Name of the backend (and frontend prefix) in the generated config."),
    key!("haproxy", haproxy.health_check_path: UrlPath = T(""),
        "HTTP health check path such as /healthz (empty: TCP connect checks)."),
    key!("haproxy", haproxy.check_interval: Dur = T("2s"), Bound::AtLeast("100ms"), "",
        "Interval between health checks of each server."),
    key!("haproxy", haproxy.debounce: Dur = T("1s"),
        "Host-list changes closer together than this are applied as one."),
    key!("haproxy", haproxy.hard_stop_after: Dur = T("15m"),
        "Workers left by a reload stop after this long even with connections open (websockets,\n\
         long downloads); HAProxy's hard-stop-after. 0s: they wait for their last connection."),
    key!("haproxy", haproxy.resolve_every: Dur = T("30s"), Bound::AtLeast("1s"), "",
        "Hosts registered by name: the master resolves them (IPv4 first) and gives HAProxy the\n\
         address, again this often; a changed address is applied, a name that stops resolving\n\
         keeps its last address (a name never resolved is left out until it does)."),
    // [cluster]
    key!("cluster", cluster.etcd_endpoints: Words = T(""),
        "Several masters (one per HAProxy machine): etcd endpoints, e.g.\n\
         https://10.0.0.1:2379, https://10.0.0.2:2379. The masters elect one leader, which alone\n\
         decides, launches and terminates; every master applies its own HAProxy servers. Hosts,\n\
         launch and drain records and the decision history then live in etcd, not in\n\
         hosts_dir and state_dir. Empty: one master, local files."),
    key!("cluster", cluster.group: ConfigWord = T("default"),
        "Masters of one group share a leader and a host list (etcd prefix /autoscaler/GROUP/)."),
    key!("cluster", cluster.name: Text = T(""),
        "This master's name in the election (empty: the host name)."),
    key!("cluster", cluster.lease_ttl: Dur = T("10s"), Bound::AtLeast("2s"), "",
        "The leader's lease: a leader that cannot renew it stops acting within two thirds of\n\
         it; another master takes over after it expires."),
    key!("cluster", cluster.etcd_timeout: Dur = T("5s"), Bound::Above("0s"), "",
        "Each etcd request's time limit."),
    key!("cluster", cluster.etcd_ca_file: OptionalPath = T(""),
        "TLS to etcd: the CA that signed its certificates (https:// endpoints)."),
    key!("cluster", cluster.etcd_cert_file: OptionalPath = T(""),
        "TLS client certificate, when etcd asks for one (--client-cert-auth)."),
    key!("cluster", cluster.etcd_key_file: OptionalPath = T(""), ""),
    key!("cluster", cluster.etcd_user: Text = T(""),
        "etcd user (etcd auth enabled); its password is read from etcd_password_file."),
    key!("cluster", cluster.etcd_password_file: OptionalPath = T(""), ""),
];

/// The sections, in file order.
pub fn sections() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for k in KEYS {
        if !out.contains(&k.section) {
            out.push(k.section);
        }
    }
    out
}

/// The key `section`.`name`, if there is one.
pub fn find(section: &str, name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.section == section && k.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    #[test]
    fn every_default_parses_within_its_bound() {
        let layout = Layout::for_dir(Path::new("/srv/as"));
        let mut cfg = Config::blank(PathBuf::new());
        for k in KEYS {
            let text = k.default_text(&layout);
            (k.set)(&mut cfg, &text, &Cx::PLAIN)
                .unwrap_or_else(|e| panic!("[{}] {} = {text:?}: {e}", k.section, k.name));
            assert_eq!(k.show(&cfg), text, "[{}] {} shows back", k.section, k.name);
        }
    }

    #[test]
    fn keys_are_unique_grouped_by_section_and_commented() {
        let mut seen = std::collections::BTreeSet::new();
        let mut last_section = "";
        let mut done_sections = Vec::new();
        for (i, k) in KEYS.iter().enumerate() {
            assert!(seen.insert((k.section, k.name)), "{} twice", k.name);
            if k.section != last_section {
                assert!(!done_sections.contains(&k.section), "[{}] split", k.section);
                done_sections.push(last_section);
                last_section = k.section;
                assert!(
                    !k.comment.is_empty(),
                    "first key of [{}] needs a comment",
                    k.section
                );
            }
            assert!(i == 0 || !k.comment.is_empty() || KEYS[i - 1].section == k.section);
            assert!(
                !k.comment.ends_with('\n') && !k.comment.contains("\n\n"),
                "{}",
                k.name
            );
        }
        assert!(find("scaling", "cooldown").is_some());
        assert!(find("node", "cooldown").is_none());
    }
}
