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

use crate::config::{Config, Haproxy};
use crate::hosts::Host;

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
    /// Stable name, derived from host and port.
    pub name: String,
    /// `host:port`, IPv6 in brackets.
    pub address: String,
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
    /// Sorted by host and port.
    pub servers: Vec<ServerLine>,
}

impl<'a> HaproxyContext<'a> {
    /// The context for `hosts` (sorted here, so the output does not depend on directory order).
    pub fn new(cfg: &'a Haproxy, hosts_dir: &Path, hosts: &[Host]) -> HaproxyContext<'a> {
        let mut keys: Vec<_> = hosts.iter().map(Host::key).collect();
        keys.sort();
        keys.dedup();
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
            servers: keys
                .iter()
                .map(|k| ServerLine {
                    name: k.server_name(),
                    address: k.host.to_address(k.port),
                })
                .collect(),
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
    /// The options the template gives a server line (`check inter 2000ms fall 3 rise 2`), for
    /// servers added through the runtime API; None when the template's server lines cannot be
    /// found (then every change is a reload).
    pub server_options: Option<String>,
    /// The servers, sorted.
    pub servers: Vec<ServerLine>,
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

    /// Renders the configuration for `hosts`, with its skeleton and server options.
    pub fn plan(
        &self,
        cfg: &Haproxy,
        hosts_dir: &Path,
        hosts: &[Host],
    ) -> Result<Plan, RenderError> {
        let mut ctx = HaproxyContext::new(cfg, hosts_dir, hosts);
        let text = self.render(&ctx)?;
        let servers = std::mem::take(&mut ctx.servers);
        let bare = self.render(&ctx)?;
        ctx.servers = vec![ServerLine {
            name: PROBE_NAME.into(),
            address: PROBE_ADDRESS.into(),
        }];
        let probe = self.render(&ctx)?;
        let server_options = probe.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next(), w.next()) {
                (Some("server"), Some(PROBE_NAME), Some(PROBE_ADDRESS)) => {
                    Some(w.collect::<Vec<_>>().join(" "))
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
        })
    }
}

/// Renders haproxy.cfg for `hosts` with the configuration's template.
pub fn render_haproxy(cfg: &Config, hosts: &[Host]) -> Result<String, RenderError> {
    let template = HaproxyTemplate::load(cfg.haproxy.template.as_deref())?;
    template.render(&HaproxyContext::new(
        &cfg.haproxy,
        &cfg.general.hosts_dir,
        hosts,
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

    #[test]
    fn zero_hosts() {
        let out = render_haproxy(&cfg(), &[]).unwrap();
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
        let out = render_haproxy(&cfg(), &hosts).unwrap();
        crate::golden::check("haproxy-4-hosts.cfg", &out);
        let mut reversed = hosts.clone();
        reversed.reverse();
        assert_eq!(
            render_haproxy(&cfg(), &reversed).unwrap(),
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
                "    server web-2.example.com_80 web-2.example.com:80 check inter 2000ms fall 3 rise 2",
            ]
        );
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
        let out = render_haproxy(&c, &[host("127.0.0.1", 9000)]).unwrap();
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
            "stats socket /tmp/x/h.sock mode 600 level admin",
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
            .plan(&c.haproxy, Path::new("/h"), &[host("127.0.1.1", 80)])
            .unwrap();
        let two = t
            .plan(
                &c.haproxy,
                Path::new("/h"),
                &[host("127.0.1.1", 80), host("127.0.1.2", 80)],
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
            .plan(&other.haproxy, Path::new("/h"), &[host("127.0.1.1", 80)])
            .unwrap();
        assert_ne!(changed.skeleton, one.skeleton, "a setting changed: reload");
        let bare = HaproxyTemplate::from_source(
            "t",
            "{% for s in servers %}{{ s.address }}\n{% endfor %}",
        )
        .unwrap();
        assert_eq!(
            bare.plan(&c.haproxy, Path::new("/h"), &[])
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
            render_haproxy(&c, &[host("b", 2), host("a", 1)]).unwrap(),
            "a:1\nb:2\n"
        );
        std::fs::write(&t, "{% for s in servers %}{{ s.address }").unwrap();
        let e = render_haproxy(&c, &[]).unwrap_err().to_string();
        assert!(e.contains("mine.tera"), "{e}");
        std::fs::write(&t, "{{ no_such_value }}").unwrap();
        let e = render_haproxy(&c, &[]).unwrap_err().to_string();
        assert!(e.contains("no_such_value"), "{e}");
        c.haproxy.template = Some(tmp.path().join("missing.tera"));
        assert!(matches!(
            render_haproxy(&c, &[]),
            Err(RenderError::Read { .. })
        ));
    }
}
