//! Backend hosts: validation of what a user types, and the text of one host's file in
//! `hosts.d` (the directory itself is an adapter: `autoscaler_actors::adapters::hosts_dir`).
//!
//! Every value that ends up in haproxy.cfg or in an SSH connection passes [`HostName::parse`]
//! and [`parse_port`] first, so nothing a user (or a launch command) supplies can inject a line
//! or an option anywhere.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// File-name suffix of host files; anything else in hosts.d (temp files, editor backups) is ignored.
pub const HOST_FILE_SUFFIX: &str = ".host";

/// A backend address as HAProxy and SSH will use it: an IP literal or an RFC 1123 host name,
/// kept as given (names are resolved by HAProxy, not at add time) but normalised
/// (lower case, canonical IPv6 form) so one host cannot be registered twice under two spellings.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum HostName {
    /// An IPv4 literal.
    V4(Ipv4Addr),
    /// An IPv6 literal (written without brackets).
    V6(Ipv6Addr),
    /// A DNS name, lower case.
    Name(String),
}

/// Why a host or port was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidHost {
    #[error("host is empty")]
    Empty,
    #[error("host {0:?} contains {1:?}; a host is an IPv4/IPv6 address or a DNS name (letters, digits, '-' and '.')")]
    BadCharacter(String, char),
    #[error("host {0:?} is too long ({1} characters; at most 253)")]
    TooLong(String, usize),
    #[error("host {0:?} has an empty label (two dots in a row, or a leading or trailing dot)")]
    EmptyLabel(String),
    #[error("host {0:?} has a label longer than 63 characters")]
    LongLabel(String),
    #[error("host {0:?} has a label that starts or ends with '-'")]
    HyphenLabel(String),
    #[error("host {0:?} looks like an IP address but is not a valid one")]
    BadNumeric(String),
    #[error("port {0:?} is not a number between 1 and 65535")]
    BadPort(String),
    #[error("report socket: {0}")]
    BadSocket(String),
}

impl HostName {
    /// Parses what a user typed. Accepts `192.0.2.1`, `2001:db8::1`, `[2001:db8::1]`,
    /// `web-1.example.com`; refuses everything else with a reason.
    pub fn parse(input: &str) -> Result<HostName, InvalidHost> {
        if input.is_empty() {
            return Err(InvalidHost::Empty);
        }
        if let Some(c) = input
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')))
        {
            return Err(InvalidHost::BadCharacter(input.to_string(), c));
        }
        let unbracketed = input
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(input);
        if unbracketed.contains(':') {
            return unbracketed
                .parse::<Ipv6Addr>()
                .map(HostName::V6)
                .map_err(|_| InvalidHost::BadNumeric(input.to_string()));
        }
        if let Some(c) = input.chars().find(|c| matches!(c, '[' | ']' | ':')) {
            return Err(InvalidHost::BadCharacter(input.to_string(), c));
        }
        if input.len() > 253 {
            return Err(InvalidHost::TooLong(input.to_string(), input.len()));
        }
        let labels: Vec<&str> = input.split('.').collect();
        if labels.iter().any(|l| l.is_empty()) {
            return Err(InvalidHost::EmptyLabel(input.to_string()));
        }
        // A name whose last label is all digits would be read as an address by resolvers
        // (RFC 3696 §2): it is either a valid IPv4 literal or a mistake.
        if labels
            .last()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        {
            return input
                .parse::<Ipv4Addr>()
                .map(HostName::V4)
                .map_err(|_| InvalidHost::BadNumeric(input.to_string()));
        }
        if labels.iter().any(|l| l.len() > 63) {
            return Err(InvalidHost::LongLabel(input.to_string()));
        }
        if labels
            .iter()
            .any(|l| l.starts_with('-') || l.ends_with('-'))
        {
            return Err(InvalidHost::HyphenLabel(input.to_string()));
        }
        Ok(HostName::Name(input.to_ascii_lowercase()))
    }

    /// The address as HAProxy's `server` line and socket APIs want it: IPv6 in brackets.
    pub fn to_address(&self, port: u16) -> String {
        match self {
            HostName::V6(ip) => format!("[{ip}]:{port}"),
            other => format!("{other}:{port}"),
        }
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostName::V4(ip) => write!(f, "{ip}"),
            HostName::V6(ip) => write!(f, "{ip}"),
            HostName::Name(n) => f.write_str(n),
        }
    }
}

impl TryFrom<String> for HostName {
    type Error = InvalidHost;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        HostName::parse(&s)
    }
}

impl From<HostName> for String {
    fn from(h: HostName) -> String {
        h.to_string()
    }
}

/// Parses a TCP port as typed by a user: 1 to 5 ASCII digits, 1–65535.
pub fn parse_port(input: &str) -> Result<u16, InvalidHost> {
    let bad = || InvalidHost::BadPort(input.to_string());
    if input.is_empty() || input.len() > 5 || !input.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match input.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(bad()),
    }
}

/// Who put a host in the registry. Scale-in only ever removes hosts autoscaler launched itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Added by an operator (`autoscaler add-host`); never terminated by autoscaler.
    #[default]
    Manual,
    /// Launched by this autoscaler (EC2 or the scale-up command).
    Launched,
}

/// One backend host: the contents of one file in hosts.d.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// Address HAProxy sends traffic to and the master SSHes to.
    pub host: HostName,
    /// Application port (the port in HAProxy's `server` line).
    pub port: u16,
    /// SSH port of this host when it differs from `[ssh] port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_port: Option<u16>,
    /// The node's report port when it differs from `[node] report_port` (that port is taken
    /// on this node, or several agents share one machine); the forward is then TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_port: Option<u16>,
    /// The node's report socket when it differs from `[node] report_socket`; wins over
    /// `report_port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_socket: Option<String>,
    /// The launch decision that started it: its reports may prove that launch's key
    /// ([`crate::report::launch_key`]) instead of the fleet's secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// EC2 instance id (or the launch command's id) when autoscaler launched it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Who added it.
    #[serde(default)]
    pub origin: Origin,
    /// When autoscaler registered a host it launched (Unix ms): scale-in removes the newest
    /// first, and this order must survive a restart of the master.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_ms: Option<u64>,
}

impl Host {
    /// A host added by hand.
    pub fn manual(host: HostName, port: u16) -> Host {
        Host {
            host,
            port,
            ssh_port: None,
            report_port: None,
            report_socket: None,
            decision: None,
            instance_id: None,
            origin: Origin::Manual,
            registered_ms: None,
        }
    }

    /// A host this autoscaler launched; its registration time is stamped when it is
    /// registered.
    pub fn launched(host: HostName, port: u16, instance_id: Option<String>) -> Host {
        Host {
            instance_id,
            origin: Origin::Launched,
            ..Host::manual(host, port)
        }
    }

    /// The identity of a host in the registry: address and application port.
    pub fn key(&self) -> HostKey {
        HostKey {
            host: self.host.clone(),
            port: self.port,
        }
    }

    /// Name of this host's file in hosts.d, derived only from validated parts.
    pub fn file_name(&self) -> String {
        self.key().file_name()
    }

    /// The file's text: `key = value` lines, readable and editable by an operator.
    pub fn to_file_text(&self) -> String {
        let mut s = String::from(
            "# Backend host for autoscaler; managed by `autoscaler add-host`/`remove-host`.\n",
        );
        s.push_str(&format!("host = {}\nport = {}\n", self.host, self.port));
        if let Some(p) = self.ssh_port {
            s.push_str(&format!("ssh_port = {p}\n"));
        }
        if let Some(p) = self.report_port {
            s.push_str(&format!("report_port = {p}\n"));
        }
        if let Some(p) = &self.report_socket {
            s.push_str(&format!("report_socket = {p}\n"));
        }
        if let Some(id) = &self.instance_id {
            s.push_str(&format!("instance_id = {id}\n"));
        }
        if let Some(d) = &self.decision {
            s.push_str(&format!("decision = {d}\n"));
        }
        let origin = match self.origin {
            Origin::Manual => "manual",
            Origin::Launched => "launched",
        };
        s.push_str(&format!("origin = {origin}\n"));
        if let Some(ms) = self.registered_ms {
            s.push_str(&format!("registered_ms = {ms}\n"));
        }
        s
    }

    /// Parses a host file's text; every line must be a known key with a valid value.
    pub fn from_file_text(text: &str) -> Result<Host, String> {
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("line {}: expected `key = value`", n + 1))?;
            let (k, v) = (k.trim(), v.trim());
            if !matches!(
                k,
                "host"
                    | "port"
                    | "ssh_port"
                    | "report_port"
                    | "report_socket"
                    | "instance_id"
                    | "decision"
                    | "origin"
                    | "registered_ms"
            ) {
                return Err(format!(
                    "line {}: unknown key {k:?} (known: host, port, ssh_port, report_port, report_socket, instance_id, decision, origin, registered_ms)",
                    n + 1
                ));
            }
            if fields.insert(k, v).is_some() {
                return Err(format!("line {}: {k} is set twice", n + 1));
            }
        }
        let host = HostName::parse(fields.get("host").ok_or("missing `host`")?)
            .map_err(|e| e.to_string())?;
        let port =
            parse_port(fields.get("port").ok_or("missing `port`")?).map_err(|e| e.to_string())?;
        let ssh_port = fields
            .get("ssh_port")
            .map(|p| parse_port(p).map_err(|e| format!("ssh_port: {e}")))
            .transpose()?;
        let report_port = fields
            .get("report_port")
            .map(|p| parse_port(p).map_err(|e| format!("report_port: {e}")))
            .transpose()?;
        let report_socket = fields
            .get("report_socket")
            .map(|p| {
                validate_report_socket(p)
                    .map(str::to_string)
                    .map_err(|e| format!("report_socket: {e}"))
            })
            .transpose()?;
        let instance_id = match fields.get("instance_id") {
            Some(id) => Some(validate_instance_id(id)?.to_string()),
            None => None,
        };
        let decision = match fields.get("decision") {
            Some(d) => Some(
                validate_instance_id(d)
                    .map_err(|e| format!("decision: {e}"))?
                    .to_string(),
            ),
            None => None,
        };
        let origin = match fields.get("origin").copied() {
            None | Some("manual") => Origin::Manual,
            Some("launched") => Origin::Launched,
            Some(o) => return Err(format!("origin {o:?} is not `manual` or `launched`")),
        };
        let registered_ms = fields
            .get("registered_ms")
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("registered_ms {v:?} is not a whole number"))
            })
            .transpose()?;
        Ok(Host {
            host,
            port,
            ssh_port,
            report_port,
            report_socket,
            decision,
            instance_id,
            origin,
            registered_ms,
        })
    }
}

/// A report socket path as a user typed it (`add-host --report-socket`).
pub fn parse_report_socket(input: &str) -> Result<String, InvalidHost> {
    validate_report_socket(input)
        .map(str::to_string)
        .map_err(InvalidHost::BadSocket)
}

/// A report socket path on a node, as the master asks the node's sshd to create it: absolute,
/// at most 100 bytes (a Unix socket's path limit, with room), of letters, digits and
/// `._-/`, no `..`, ending in `.sock`.
pub fn validate_report_socket(path: &str) -> Result<&str, String> {
    let ok_chars = path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    match () {
        _ if !path.starts_with('/') => Err(format!("{path:?} is not an absolute path")),
        _ if path.len() > 100 => Err(format!("{path:?} is longer than 100 bytes")),
        _ if !ok_chars => Err(format!(
            "{path:?} may hold only letters, digits and . _ - /"
        )),
        _ if path.split('/').any(|p| p == ".." || p == ".") => {
            Err(format!("{path:?} has a . or .. component"))
        }
        _ if !path.ends_with(".sock") || path.ends_with("/.sock") => {
            Err(format!("{path:?} does not name a file ending in .sock"))
        }
        _ => Ok(path),
    }
}

/// An instance id as EC2 or a launch command reports it: 1–64 of `[A-Za-z0-9_.:-]`, the first
/// a letter or digit (never an option, `.` or `..` to a command that is handed it).
pub fn validate_instance_id(id: &str) -> Result<&str, String> {
    if id.is_empty()
        || id.len() > 64
        || !id.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(format!(
            "instance id {id:?} is not 1-64 letters, digits, '-', '_', '.' or ':' starting with a letter or digit"
        ));
    }
    Ok(id)
}

/// The identity of a registered host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostKey {
    /// Address.
    pub host: HostName,
    /// Application port.
    pub port: u16,
}

impl HostKey {
    /// File name in hosts.d. `:` of IPv6 addresses is kept (valid in Linux file names).
    pub fn file_name(&self) -> String {
        format!("{}_{}{}", self.host, self.port, HOST_FILE_SUFFIX)
    }

    /// HAProxy server name: stable for a given host and port, and made only of characters
    /// HAProxy accepts in names (`[A-Za-z0-9_.:-]`).
    pub fn server_name(&self) -> String {
        format!("{}_{}", self.host, self.port)
    }
}

impl fmt::Display for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_addresses_and_names() {
        let ok = [
            ("192.0.2.10", "192.0.2.10"),
            ("127.0.0.1", "127.0.0.1"),
            ("2001:db8::1", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
            ("::1", "::1"),
            ("web-1", "web-1"),
            ("Web-1.Example.COM", "web-1.example.com"),
            ("a", "a"),
            ("3com.net", "3com.net"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ];
        for (input, want) in ok {
            let h = HostName::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(h.to_string(), want, "{input}");
        }
        let long_ok = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(long_ok.len(), 253);
        assert!(HostName::parse(&long_ok).is_ok());
    }

    #[test]
    fn refuses_injection_corpus() {
        let bad = [
            "",
            " ",
            "web 1",
            "web1\n",
            "web1\nserver evil 6.6.6.6:80",
            "web1\r",
            "web1\tcheck",
            "#web",
            "web#1",
            "\"web\"",
            "'web'",
            "-web",
            "-oProxyCommand=sh",
            "web-",
            "web..example",
            ".web",
            "web.",
            "web/1",
            "../etc/passwd",
            "web;reboot",
            "web$(id)",
            "`id`",
            "web\\1",
            "we_b",
            "web@host",
            "web:80",
            "[web]",
            "[192.0.2.1]",
            "1.2.3",
            "256.1.1.1",
            "01.2.3.4",
            "1.2.3.4.5",
            "2001:db8::1%eth0",
            "[2001:db8::1",
            "2001:db8:::1",
            "wéb",
            "web\u{0}",
            "web\u{202e}",
        ];
        for input in bad {
            assert!(HostName::parse(input).is_err(), "{input:?} must be refused");
        }
        let too_long = format!("{}.{}", "a".repeat(63), "b".repeat(200));
        assert!(matches!(
            HostName::parse(&too_long),
            Err(InvalidHost::TooLong(..))
        ));
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(matches!(
            HostName::parse(&long_label),
            Err(InvalidHost::LongLabel(_))
        ));
    }

    #[test]
    fn error_messages_name_the_problem() {
        let e = HostName::parse("web 1").unwrap_err().to_string();
        assert!(e.contains("\"web 1\"") && e.contains("' '"), "{e}");
        let e = HostName::parse("-web").unwrap_err().to_string();
        assert!(e.contains("'-'"), "{e}");
        let e = parse_port("0").unwrap_err().to_string();
        assert!(e.contains("between 1 and 65535"), "{e}");
    }

    #[test]
    fn ports() {
        for (input, want) in [("1", 1), ("80", 80), ("65535", 65535), ("08080", 8080)] {
            assert_eq!(parse_port(input), Ok(want), "{input}");
        }
        for input in [
            "", "0", "00000", "65536", "99999", "100000", "-1", "+80", " 80", "80 ", "8o", "0x50",
            "80\n", "1e3",
        ] {
            assert!(parse_port(input).is_err(), "{input:?} must be refused");
        }
    }

    #[test]
    fn addresses_and_names_for_haproxy() {
        let k = HostKey {
            host: HostName::parse("2001:db8::5").unwrap(),
            port: 8080,
        };
        assert_eq!(k.host.to_address(k.port), "[2001:db8::5]:8080");
        assert_eq!(k.server_name(), "2001:db8::5_8080");
        assert_eq!(k.file_name(), "2001:db8::5_8080.host");
        let k = HostKey {
            host: HostName::parse("web-1.example.com").unwrap(),
            port: 80,
        };
        assert_eq!(k.host.to_address(80), "web-1.example.com:80");
    }

    #[test]
    fn host_file_round_trip() {
        let h = Host {
            host: HostName::parse("192.0.2.7").unwrap(),
            port: 8080,
            ssh_port: Some(2222),
            report_port: Some(9701),
            report_socket: Some("/run/autoscaler/reports/lb-2.sock".into()),
            decision: Some("as-1764000000-0a1b2c3d".into()),
            instance_id: Some("i-0abc".into()),
            origin: Origin::Launched,
            registered_ms: Some(1_764_000_000_000),
        };
        assert_eq!(Host::from_file_text(&h.to_file_text()), Ok(h.clone()));
        let m = Host::manual(HostName::parse("web").unwrap(), 80);
        assert_eq!(Host::from_file_text(&m.to_file_text()), Ok(m));
    }

    #[test]
    fn host_file_errors() {
        let cases = [
            ("port = 80\n", "missing `host`"),
            ("host = a\n", "missing `port`"),
            ("host = a b\nport = 80\n", "contains ' '"),
            ("host = a\nport = 0\n", "port \"0\""),
            ("host = a\nport = 80\nport = 81\n", "set twice"),
            (
                "host = a\nport = 80\nweight = 3\n",
                "unknown key \"weight\"",
            ),
            ("host = a\nport = 80\norigin = cloud\n", "origin \"cloud\""),
            ("host = a\nport = 80\ninstance_id = i 1\n", "instance id"),
            (
                "host = a\nport = 80\ninstance_id = --all\n",
                "starting with a letter",
            ),
            (
                "host = a\nport = 80\ninstance_id = ..\n",
                "starting with a letter",
            ),
            (
                "host = a\nport = 80\nregistered_ms = soon\n",
                "registered_ms",
            ),
            ("host a\n", "line 1: expected"),
            (
                "host = a\nport = 80\nreport_socket = run/x.sock\n",
                "not an absolute path",
            ),
            (
                "host = a\nport = 80\nreport_socket = /run/../x.sock\n",
                ".. component",
            ),
            (
                "host = a\nport = 80\nreport_socket = /run/x y.sock\n",
                "only letters",
            ),
            (
                "host = a\nport = 80\nreport_socket = /run/x\n",
                "ending in .sock",
            ),
            ("host = a\nport = 80\ndecision = a b\n", "decision"),
        ];
        for (text, want) in cases {
            let e = Host::from_file_text(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
