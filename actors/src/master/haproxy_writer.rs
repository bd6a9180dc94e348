//! HaproxyWriter (master role): on every [`HostsChanged`] (debounced), renders haproxy.cfg,
//! validates it with `[haproxy] check_command`, installs it atomically and runs
//! `[haproxy] reload_command`. A configuration that fails validation never replaces the live
//! one: the last good config stays in place and serving, and the error is logged.
//!
//! Validation and reload are blocking process runs; they happen in a task, one at a time.
//! Changes that arrive meanwhile are folded into the next run.

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, ActorContext, AsyncContext, Context, Handler, Message};
use slog::{error, info, o, warn, Logger};

use super::messages::HostsChanged;
use crate::adapters::haproxy::{self, Installed, Validation};
use crate::adapters::process;
use crate::config::{Config, HaproxyTarget};
use crate::hosts::Host;
use crate::render::{HaproxyContext, HaproxyTemplate};

/// Longest a reload command may run.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// What one apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The rendered config equals the live one: nothing written, no reload.
    Unchanged,
    /// Installed and reloaded.
    Reloaded { servers: usize },
    /// Installed without validation (the check command is not installed) and reloaded.
    ReloadedUnchecked { servers: usize, program: String },
    /// Not installed: rendering or validation failed; the live config is untouched.
    Rejected(String),
    /// Installed, but the reload command failed.
    ReloadFailed(String),
}

#[derive(Message)]
#[rtype(result = "()")]
struct ApplyDone(Applied);

/// The actor.
pub struct HaproxyWriter {
    cfg: Arc<Config>,
    template: Arc<HaproxyTemplate>,
    pending: Option<Arc<Vec<Host>>>,
    busy: bool,
    scheduled: bool,
    log: Logger,
}

impl HaproxyWriter {
    /// A writer for the local HAProxy of `cfg` with a compiled `template`.
    pub fn new(cfg: Arc<Config>, template: HaproxyTemplate, log: &Logger) -> HaproxyWriter {
        HaproxyWriter {
            cfg,
            template: Arc::new(template),
            pending: None,
            busy: false,
            scheduled: false,
            log: log.new(o!("actor" => "HaproxyWriter")),
        }
    }

    fn schedule(&mut self, ctx: &mut Context<Self>) {
        if self.scheduled || self.busy || self.pending.is_none() {
            return;
        }
        self.scheduled = true;
        ctx.run_later(self.cfg.haproxy.debounce, |this, ctx| {
            this.scheduled = false;
            this.start_apply(ctx);
        });
    }

    fn start_apply(&mut self, ctx: &mut Context<Self>) {
        let Some(hosts) = self.pending.take() else {
            return;
        };
        self.busy = true;
        let text = self.template.render(&HaproxyContext::new(
            &self.cfg.haproxy,
            &self.cfg.general.hosts_dir,
            &hosts,
        ));
        let cfg = self.cfg.clone();
        let me = ctx.address();
        tokio::spawn(async move {
            let applied = match text {
                Err(e) => Applied::Rejected(e.to_string()),
                Ok(text) => apply(&cfg, text, hosts.len()).await,
            };
            me.do_send(ApplyDone(applied));
        });
    }
}

async fn apply(cfg: &Config, text: String, servers: usize) -> Applied {
    let path = cfg.haproxy.config_path.clone();
    let check = cfg.haproxy.check_command.clone();
    let installed =
        tokio::task::spawn_blocking(move || haproxy::install(&text, &path, Some(&check))).await;
    let unchecked = match installed {
        Err(e) => return Applied::Rejected(e.to_string()),
        Ok(Err(e)) => return Applied::Rejected(e.to_string()),
        Ok(Ok(Installed::Unchanged { .. })) => return Applied::Unchanged,
        Ok(Ok(Installed::Replaced { validation })) => match validation {
            Validation::Valid => None,
            Validation::Skipped { program } => Some(program),
        },
    };
    match process::run(&cfg.haproxy.reload_command, &[], RELOAD_TIMEOUT).await {
        Err(e) => Applied::ReloadFailed(e.to_string()),
        Ok(_) => match unchecked {
            None => Applied::Reloaded { servers },
            Some(program) => Applied::ReloadedUnchecked { servers, program },
        },
    }
}

impl Actor for HaproxyWriter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let remote: Vec<String> = self
            .cfg
            .haproxy
            .servers
            .iter()
            .filter(|s| **s != HaproxyTarget::Local)
            .map(|s| s.to_string())
            .collect();
        if !remote.is_empty() {
            warn!(self.log, "Remote HAProxy servers are not written yet; only the local one is"; "skipped" => remote.join(", "));
        }
        if !self.cfg.haproxy.servers.contains(&HaproxyTarget::Local) {
            warn!(
                self.log,
                "No local HAProxy server in [haproxy] servers; nothing to write"
            );
            ctx.stop();
        }
    }
}

impl Handler<HostsChanged> for HaproxyWriter {
    type Result = ();

    fn handle(&mut self, m: HostsChanged, ctx: &mut Context<Self>) {
        self.pending = Some(m.hosts);
        self.schedule(ctx);
    }
}

impl Handler<ApplyDone> for HaproxyWriter {
    type Result = ();

    fn handle(&mut self, m: ApplyDone, ctx: &mut Context<Self>) {
        self.busy = false;
        let file = self.cfg.haproxy.config_path.display().to_string();
        match m.0 {
            Applied::Unchanged => {
                info!(self.log, "HAProxy configuration unchanged"; "file" => file)
            }
            Applied::Reloaded { servers } => {
                info!(self.log, "HAProxy reloaded"; "file" => file, "servers" => servers)
            }
            Applied::ReloadedUnchecked { servers, program } => warn!(self.log,
                "HAProxy reloaded with a configuration that was NOT validated: check command not installed";
                "file" => file, "servers" => servers, "program" => program),
            Applied::Rejected(e) => {
                error!(self.log, "New HAProxy configuration rejected; the last good one stays live";
                "file" => file, "error" => e)
            }
            Applied::ReloadFailed(e) => {
                error!(self.log, "HAProxy configuration installed but the reload failed";
                "file" => file, "error" => e)
            }
        }
        self.schedule(ctx);
    }
}
