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
    pub bind: &'a str,
    pub backend: &'a str,
    pub stats_socket: String,
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
            bind: &cfg.bind,
            backend: &cfg.backend,
            stats_socket: cfg.stats_socket.display().to_string(),
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
                "    server 10.0.0.5_80 10.0.0.5:80 check",
                "    server 10.0.0.5_8080 10.0.0.5:8080 check",
                "    server 2001:db8::7_80 [2001:db8::7]:80 check",
                "    server web-2.example.com_80 web-2.example.com:80 check",
            ]
        );
    }

    #[test]
    fn settings_reach_the_output() {
        let mut c = cfg();
        c.haproxy.bind = "127.0.0.1:8080".into();
        c.haproxy.backend = "shop".into();
        c.haproxy.health_check_path = "/healthz".into();
        c.haproxy.check_interval = std::time::Duration::from_millis(1500);
        c.haproxy.stats_socket = "/tmp/x/h.sock".into();
        let out = render_haproxy(&c, &[host("127.0.0.1", 9000)]).unwrap();
        crate::golden::check("haproxy-http-check.cfg", &out);
        for want in [
            "bind 127.0.0.1:8080\n",
            "frontend shop_in\n",
            "default_backend shop\n",
            "backend shop\n",
            "option httpchk GET /healthz\n",
            "default-server inter 1500ms",
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
