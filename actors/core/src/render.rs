//! Template rendering (tera): haproxy.cfg from the host list.
//!
//! Pure functions over plain data, so they are tested against golden files and benchmarked
//! without HAProxy. The embedded template lives in the repository's `templates/` directory;
//! `[haproxy] template` replaces it. (autoscaler.ini is written from the key table, see
//! [`Config::to_ini_text`].)

use std::path::{Path, PathBuf};

use serde::Serialize;
use tera::{Context, Tera};
use thiserror::Error;

use std::net::IpAddr;

use crate::config::{Config, Haproxy};
use crate::hosts::{Host, HostKey, HostName};

/// The embedded HAProxy template.
pub const HAPROXY_TEMPLATE: &str = include_str!("../../../templates/haproxy.cfg.tera");

/// Why a template could not be rendered.
#[derive(Debug, Error)]
pub enum RenderError {
    #[error("cannot read template {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("template {name}: {message}")]
    Template { name: String, message: String },
}

fn template_error(name: &str, e: tera::Error) -> RenderError {
    // tera nests the useful part (line, column, what was expected) in its sources.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    RenderError::Template {
        name: name.to_string(),
        message,
    }
}

/// One `server` line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerLine {
    /// Stable name, derived from the registered host (its name, not its address) and port.
    pub name: String,
    /// `ip:port`, IPv6 in brackets: what HAProxy connects to.
    pub address: String,
    /// The IP address alone, without brackets.
    pub ip: String,
    pub port: u16,
}

impl ServerLine {
    /// The line for `key` at `ip`.
    pub fn new(key: &HostKey, ip: IpAddr) -> ServerLine {
        let host = match ip {
            IpAddr::V4(v4) => HostName::V4(v4),
            IpAddr::V6(v6) => HostName::V6(v6),
        };
        ServerLine {
            name: key.server_name(),
            address: host.to_address(key.port),
            ip: ip.to_string(),
            port: key.port,
        }
    }
}

/// The address of a host: its IP literal, or what `resolve` says of its name.
pub fn address_of(h: &HostName, resolve: &dyn Fn(&str) -> Option<IpAddr>) -> Option<IpAddr> {
    match h {
        HostName::V4(ip) => Some(IpAddr::V4(*ip)),
        HostName::V6(ip) => Some(IpAddr::V6(*ip)),
        HostName::Name(n) => resolve(n),
    }
}

/// Everything the HAProxy template sees.
#[derive(Debug, Clone, Serialize)]
pub struct HaproxyContext<'a> {
    pub hosts_dir: String,
    /// Every `bind` line of the frontend.
    pub binds: &'a [String],
    /// The first of them (templates written for a single bind).
    pub bind: &'a str,
    pub backend: &'a str,
    pub stats_socket: String,
    pub server_state_file: String,
    /// Empty: no `user`/`group`/`chroot` line.
    pub user: &'a str,
    pub group: &'a str,
    pub chroot: String,
    pub health_check_path: &'a str,
    pub check_interval_ms: u128,
    /// HAProxy's hard-stop-after in milliseconds; 0: none.
    pub hard_stop_after_ms: u128,
    /// Sorted by host and port; hosts whose name does not resolve are left out.
    pub servers: Vec<ServerLine>,
    /// The names left out because they do not resolve.
    #[serde(skip)]
    pub unresolved: Vec<String>,
}

impl<'a> HaproxyContext<'a> {
    /// The context for `hosts` (sorted here, so the output does not depend on directory order),
    /// their names turned into addresses by `resolve`.
    pub fn new(
        cfg: &'a Haproxy,
        hosts_dir: &Path,
        hosts: &[Host],
        resolve: &dyn Fn(&str) -> Option<IpAddr>,
    ) -> HaproxyContext<'a> {
        let mut keys: Vec<_> = hosts.iter().map(Host::key).collect();
        keys.sort();
        keys.dedup();
        let mut servers = Vec::new();
        let mut unresolved = Vec::new();
        for k in &keys {
            match address_of(&k.host, resolve) {
                Some(ip) => servers.push(ServerLine::new(k, ip)),
                None => unresolved.push(k.host.to_string()),
            }
        }
        HaproxyContext {
            hosts_dir: hosts_dir.display().to_string(),
            binds: &cfg.bind,
            bind: cfg.bind.first().map_or("", String::as_str),
            backend: &cfg.backend,
            stats_socket: cfg.stats_socket.display().to_string(),
            server_state_file: cfg.server_state_file.display().to_string(),
            user: &cfg.user,
            group: &cfg.group,
            chroot: cfg
                .chroot
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            health_check_path: &cfg.health_check_path,
            check_interval_ms: cfg.check_interval.as_millis(),
            hard_stop_after_ms: cfg.hard_stop_after.as_millis(),
            servers,
            unresolved,
        }
    }
}

/// A rendered configuration and what applying it needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub text: String,
    /// SHA-256 of `text`, hex.
    pub hash: String,
    /// SHA-256 of the same configuration without any server: two plans with the same
    /// skeleton differ only in their server lines, which the runtime API can change.
    pub skeleton: String,
    /// The options a server added through the runtime API gets: the `default-server` options
    /// in force for the backend, then the template's server line's own (`check inter 2000ms
    /// fall 3 rise 2`); None when the template's server lines cannot be found (then every
    /// change is a reload).
    pub server_options: Option<String>,
    /// The servers, sorted.
    pub servers: Vec<ServerLine>,
    /// Hosts left out because their name does not resolve.
    pub unresolved: Vec<String>,
}

/// `default-server` keywords that HAProxy does not accept on a server added at runtime (and
/// that a server with an IP address does not need), with the argument each takes.
const NOT_AT_RUNTIME: &[&str] = &[
    "init-addr",
    "resolvers",
    "resolve-prefer",
    "resolve-net",
    "resolve-opts",
];

/// The `default-server` options in force for `backend` in a rendered configuration: those of
/// the last `defaults` section before it, then its own (the later win, as in HAProxy), less
/// what runtime servers cannot take.
pub fn default_server_options(text: &str, backend: &str) -> Vec<String> {
    let mut from_defaults: Vec<String> = Vec::new();
    let mut own: Vec<String> = Vec::new();
    let mut section = "";
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let first = w.next().unwrap_or("");
        match first {
            "defaults" => {
                section = "defaults";
                from_defaults.clear();
            }
            "backend" if w.clone().next() == Some(backend) => section = "ours",
            "global" | "frontend" | "backend" | "listen" | "resolvers" | "peers" | "userlist"
            | "cache" | "program" | "mailers" | "ring" | "http-errors" => section = "",
            "default-server" => match section {
                "defaults" => from_defaults.extend(w.map(String::from)),
                "ours" => own.extend(w.map(String::from)),
                _ => {}
            },
            _ => {}
        }
    }
    let mut words = from_defaults.into_iter().chain(own).peekable();
    let mut out = Vec::new();
    while let Some(word) = words.next() {
        if NOT_AT_RUNTIME.contains(&word.as_str()) {
            words.next();
            continue;
        }
        out.push(word);
    }
    out
}

/// The proxy mode `backend` runs in, in a rendered configuration: its own `mode` line, else
/// that of the last `defaults` section before it, else HAProxy's default, `tcp`. None when
/// there is no such backend (nor `listen` section of that name).
pub fn backend_mode(text: &str, backend: &str) -> Option<String> {
    let mut from_defaults = "tcp".to_string();
    let mut section = "";
    let mut found: Option<String> = None;
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let first = w.next().unwrap_or("");
        match first {
            "defaults" => {
                section = "defaults";
                from_defaults = "tcp".into();
            }
            "backend" | "listen" if w.clone().next() == Some(backend) => {
                section = "ours";
                found = Some(from_defaults.clone());
            }
            "global" | "frontend" | "backend" | "listen" | "resolvers" | "peers" | "userlist"
            | "cache" | "program" | "mailers" | "ring" | "http-errors" => section = "",
            "mode" => match (section, w.next()) {
                ("defaults", Some(m)) => from_defaults = m.into(),
                ("ours", Some(m)) => found = Some(m.into()),
                _ => {}
            },
            _ => {}
        }
    }
    found
}

/// SHA-256 of `text` as lower-case hex.
pub fn digest(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The probe server rendered to find the template's server options.
const PROBE_NAME: &str = "autoscaler-probe";
const PROBE_ADDRESS: &str = "192.0.2.1:1";
const PROBE_IP: &str = "192.0.2.1";

/// A compiled HAProxy template, built once and rendered on every host-list change.
pub struct HaproxyTemplate {
    tera: Tera,
    name: String,
}

impl HaproxyTemplate {
    /// The embedded template, or the file at `override_path`.
    pub fn load(override_path: Option<&Path>) -> Result<HaproxyTemplate, RenderError> {
        match override_path {
            None => HaproxyTemplate::from_source("haproxy.cfg.tera", HAPROXY_TEMPLATE),
            Some(p) => {
                let src = std::fs::read_to_string(p).map_err(|source| RenderError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                HaproxyTemplate::from_source(&p.display().to_string(), &src)
            }
        }
    }

    /// Compiles template text; `name` appears in errors.
    pub fn from_source(name: &str, src: &str) -> Result<HaproxyTemplate, RenderError> {
        let mut tera = Tera::default();
        // No autoescaping: this is not HTML, and every value was validated before it got here.
        tera.autoescape_on(vec![]);
        tera.add_raw_template(name, src)
            .map_err(|e| template_error(name, e))?;
        Ok(HaproxyTemplate {
            tera,
            name: name.to_string(),
        })
    }

    /// Renders the configuration.
    pub fn render(&self, ctx: &HaproxyContext<'_>) -> Result<String, RenderError> {
        let ctx = Context::from_serialize(ctx).map_err(|e| template_error(&self.name, e))?;
        self.tera
            .render(&self.name, &ctx)
            .map_err(|e| template_error(&self.name, e))
    }

    /// Renders the configuration for `hosts`, their names turned into addresses by
    /// `resolve`, with its skeleton and server options.
    pub fn plan(
        &self,
        cfg: &Haproxy,
        hosts_dir: &Path,
        hosts: &[Host],
        resolve: &dyn Fn(&str) -> Option<IpAddr>,
    ) -> Result<Plan, RenderError> {
        let mut ctx = HaproxyContext::new(cfg, hosts_dir, hosts, resolve);
        let text = self.render(&ctx)?;
        let servers = std::mem::take(&mut ctx.servers);
        let unresolved = std::mem::take(&mut ctx.unresolved);
        let bare = self.render(&ctx)?;
        ctx.servers = vec![ServerLine {
            name: PROBE_NAME.into(),
            address: PROBE_ADDRESS.into(),
            ip: PROBE_IP.into(),
            port: 1,
        }];
        let probe = self.render(&ctx)?;
        let server_options = probe.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next(), w.next()) {
                (Some("server"), Some(PROBE_NAME), Some(PROBE_ADDRESS)) => {
                    let mut all = default_server_options(&probe, &cfg.backend);
                    all.extend(w.map(String::from));
                    Some(all.join(" "))
                }
                _ => None,
            }
        });
        // The server options are part of the skeleton: a change in them (check_interval, say)
        // changes every server line, which is a reload.
        let skeleton = digest(&format!("{bare}\n{server_options:?}"));
        Ok(Plan {
            hash: digest(&text),
            text,
            skeleton,
            server_options,
            servers,
            unresolved,
        })
    }
}

/// Renders haproxy.cfg for `hosts` with the configuration's template, their names turned
/// into addresses by `resolve`.
pub fn render_haproxy(
    cfg: &Config,
    hosts: &[Host],
    resolve: &dyn Fn(&str) -> Option<IpAddr>,
) -> Result<String, RenderError> {
    let template = HaproxyTemplate::load(cfg.haproxy.template.as_deref())?;
    template.render(&HaproxyContext::new(
        &cfg.haproxy,
        &cfg.general.hosts_dir,
        hosts,
        resolve,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Layout, Role};
    use crate::hosts::{HostName, Origin};

    fn cfg() -> Config {
        Config::defaults(&Layout::for_dir(Path::new("/etc/autoscaler")), Role::Master)
    }

    fn host(h: &str, port: u16) -> Host {
        Host::manual(HostName::parse(h).unwrap(), port)
    }

    /// A resolver that knows a few names, as DNS would answer them.
    fn dns(name: &str) -> Option<IpAddr> {
        match name {
            "web-2.example.com" => Some("192.0.2.80".parse().unwrap()),
            "a" => Some("127.0.0.1".parse().unwrap()),
            "b" => Some("127.0.0.2".parse().unwrap()),
            "v6-only" => Some("2001:db8::9".parse().unwrap()),
            _ => None,
        }
    }

    #[test]
    fn zero_hosts() {
        let out = render_haproxy(&cfg(), &[], &dns).unwrap();
        crate::golden::check("haproxy-0-hosts.cfg", &out);
        assert!(out.contains("backend app\n    balance roundrobin\n"));
        assert!(!out.contains("    server "));
    }

    #[test]
    fn hosts_are_sorted_deduplicated_and_named_stably() {
        let mut launched = host("10.0.0.5", 8080);
        launched.origin = Origin::Launched;
        let hosts = vec![
            host("web-2.example.com", 80),
            host("2001:db8::7", 80),
            launched,
            host("10.0.0.5", 80),
            host("web-2.example.com", 80),
        ];
        let out = render_haproxy(&cfg(), &hosts, &dns).unwrap();
        crate::golden::check("haproxy-4-hosts.cfg", &out);
        let mut reversed = hosts.clone();
        reversed.reverse();
        assert_eq!(
            render_haproxy(&cfg(), &reversed, &dns).unwrap(),
            out,
            "order of hosts.d must not matter"
        );
        let servers: Vec<&str> = out
            .lines()
            .filter(|l| l.trim_start().starts_with("server "))
            .collect();
        assert_eq!(
            servers,
            [
                "    server 10.0.0.5_80 10.0.0.5:80 check inter 2000ms fall 3 rise 2",
                "    server 10.0.0.5_8080 10.0.0.5:8080 check inter 2000ms fall 3 rise 2",
                "    server 2001:db8::7_80 [2001:db8::7]:80 check inter 2000ms fall 3 rise 2",
                "    server web-2.example.com_80 192.0.2.80:80 check inter 2000ms fall 3 rise 2",
            ]
        );
    }

    /// Names become addresses (the server keeps the name's name); a name that does not
    /// resolve is left out and said so; an IPv6 answer is bracketed.
    #[test]
    fn names_are_resolved_or_left_out() {
        let t = HaproxyTemplate::load(None).unwrap();
        let c = cfg();
        let plan = t
            .plan(
                &c.haproxy,
                Path::new("/h"),
                &[
                    host("a", 8080),
                    host("nowhere.example", 80),
                    host("v6-only", 80),
                ],
                &dns,
            )
            .unwrap();
        let lines: Vec<(&str, &str, &str, u16)> = plan
            .servers
            .iter()
            .map(|s| (s.name.as_str(), s.address.as_str(), s.ip.as_str(), s.port))
            .collect();
        assert_eq!(
            lines,
            [
                ("a_8080", "127.0.0.1:8080", "127.0.0.1", 8080),
                ("v6-only_80", "[2001:db8::9]:80", "2001:db8::9", 80),
            ]
        );
        assert_eq!(plan.unresolved, ["nowhere.example"]);
        assert!(plan.text.contains("server a_8080 127.0.0.1:8080 check"));
        assert!(!plan.text.contains("nowhere"));
    }

    /// Options set with `default-server` reach servers added at runtime, the backend's own
    /// after the defaults section's, without what HAProxy refuses there.
    #[test]
    fn default_server_options_reach_runtime_servers() {
        let src = "global\n    maxconn 10\ndefaults\n    default-server init-addr last,libc,none inter 5s\n\
                   defaults\n    default-server init-addr none check inter 500ms\nfrontend f\n    default-server weight 9\n\
                   backend other\n    default-server maxconn 3\nbackend app\n    default-server rise 1 resolvers dns\n\
                   {% for s in servers %}    server {{ s.name }} {{ s.address }} fall 4\n{% endfor %}";
        let t = HaproxyTemplate::from_source("t", src).unwrap();
        let plan = t
            .plan(
                &cfg().haproxy,
                Path::new("/h"),
                &[host("127.0.1.1", 80)],
                &dns,
            )
            .unwrap();
        assert_eq!(
            plan.server_options.as_deref(),
            Some("check inter 500ms rise 1 fall 4")
        );
    }

    /// The backend's mode comes from its own line, else the last defaults before it, else
    /// tcp; a defaults section after it, or another backend's mode, does not count.
    #[test]
    fn the_backend_mode_as_haproxy_reads_it() {
        let cases = [
            (
                "defaults\n    mode http\nbackend app\n    server a 1.2.3.4:80\n",
                Some("http"),
            ),
            (
                "defaults\n    mode http\nbackend app\n    mode tcp\n",
                Some("tcp"),
            ),
            ("backend app\n    balance roundrobin\n", Some("tcp")),
            (
                "defaults\n    mode http\ndefaults\n    timeout client 1s\nbackend app\n",
                Some("tcp"),
            ),
            ("backend other\n    mode http\nbackend app\n", Some("tcp")),
            ("backend app\ndefaults\n    mode http\n", Some("tcp")),
            (
                "defaults\n    mode http\nlisten app\n    bind :80\n",
                Some("http"),
            ),
            ("defaults\n    mode http\nbackend other\n", None),
        ];
        for (text, want) in cases {
            assert_eq!(backend_mode(text, "app").as_deref(), want, "{text}");
        }
        let plan = HaproxyTemplate::load(None)
            .unwrap()
            .plan(&cfg().haproxy, Path::new("/h"), &[], &dns)
            .unwrap();
        assert_eq!(backend_mode(&plan.text, "app").as_deref(), Some("http"));
    }

    #[test]
    fn settings_reach_the_output() {
        let mut c = cfg();
        c.haproxy.bind = vec![
            "127.0.0.1:8080".into(),
            "[::1]:8443 ssl crt /x/site.pem".into(),
        ];
        c.haproxy.backend = "shop".into();
        c.haproxy.health_check_path = "/healthz".into();
        c.haproxy.check_interval = std::time::Duration::from_millis(1500);
        c.haproxy.stats_socket = "/tmp/x/h.sock".into();
        let out = render_haproxy(&c, &[host("127.0.0.1", 9000)], &dns).unwrap();
        crate::golden::check("haproxy-http-check.cfg", &out);
        for want in [
            "bind 127.0.0.1:8080\n",
            "bind [::1]:8443 ssl crt /x/site.pem\n",
            "load-server-state-from-file global\n",
            "frontend shop_in\n",
            "default_backend shop\n",
            "backend shop\n",
            "option httpchk GET /healthz\n",
            "check inter 1500ms fall 3 rise 2\n",
            "stats socket /tmp/x/h.sock mode 660 level admin group haproxy expose-fd listeners\n",
            "hard-stop-after 900000ms\n",
            "option idle-close-on-response\n",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
        assert!(
            !out.lines()
                .any(|l| matches!(l.split_whitespace().next(), Some("daemon" | "pidfile"))),
            "master-worker friendly: no daemon or pidfile"
        );
    }

    #[test]
    fn plans_know_their_skeleton_and_server_options() {
        let t = HaproxyTemplate::load(None).unwrap();
        let c = cfg();
        let one = t
            .plan(&c.haproxy, Path::new("/h"), &[host("127.0.1.1", 80)], &dns)
            .unwrap();
        let two = t
            .plan(
                &c.haproxy,
                Path::new("/h"),
                &[host("127.0.1.1", 80), host("127.0.1.2", 80)],
                &dns,
            )
            .unwrap();
        assert_ne!(one.hash, two.hash);
        assert_eq!(one.skeleton, two.skeleton, "only the servers differ");
        assert_eq!(
            one.server_options.as_deref(),
            Some("check inter 2000ms fall 3 rise 2"),
            "what a server line of the file carries"
        );
        assert_eq!(one.servers.len(), 1);
        let mut other = c.clone();
        other.haproxy.check_interval = std::time::Duration::from_secs(5);
        let changed = t
            .plan(
                &other.haproxy,
                Path::new("/h"),
                &[host("127.0.1.1", 80)],
                &dns,
            )
            .unwrap();
        assert_ne!(changed.skeleton, one.skeleton, "a setting changed: reload");
        let bare = HaproxyTemplate::from_source(
            "t",
            "{% for s in servers %}{{ s.address }}\n{% endfor %}",
        )
        .unwrap();
        assert_eq!(
            bare.plan(&c.haproxy, Path::new("/h"), &[], &dns)
                .unwrap()
                .server_options,
            None,
            "no server line: every change is a reload"
        );
    }

    #[test]
    fn template_override_and_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("mine.tera");
        std::fs::write(&t, "{% for s in servers %}{{ s.address }}\n{% endfor %}").unwrap();
        let mut c = cfg();
        c.haproxy.template = Some(t.clone());
        assert_eq!(
            render_haproxy(&c, &[host("b", 2), host("a", 1)], &dns).unwrap(),
            "127.0.0.1:1\n127.0.0.2:2\n"
        );
        std::fs::write(&t, "{% for s in servers %}{{ s.address }").unwrap();
        let e = render_haproxy(&c, &[], &dns).unwrap_err().to_string();
        assert!(e.contains("mine.tera"), "{e}");
        std::fs::write(&t, "{{ no_such_value }}").unwrap();
        let e = render_haproxy(&c, &[], &dns).unwrap_err().to_string();
        assert!(e.contains("no_such_value"), "{e}");
        c.haproxy.template = Some(tmp.path().join("missing.tera"));
        assert!(matches!(
            render_haproxy(&c, &[], &dns),
            Err(RenderError::Read { .. })
        ));
    }
}
