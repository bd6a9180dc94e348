//! One HAProxy server's worker: a tokio task that owns the connection to that server (local,
//! or an SSH session), brings it to the latest plan and keeps trying, with backoff, until it
//! runs it; drains and removes servers through its runtime API. A server that is down or
//! failing only delays itself: every server has its own worker.
//!
//! Applying a plan:
//!
//! - If HAProxy was last told to run a configuration with the same skeleton (everything but
//!   the server list), and the runtime API is on, the servers are changed in place: new ones
//!   added (`add server`, `enable health`, `enable server`), gone ones set to DRAIN; then the
//!   file is validated and installed with no reload, so a later reload or restart gives the
//!   same backend.
//! - Otherwise (first start, a setting changed, the runtime API failed): validate, install,
//!   save the servers' health states to the server state file, reload.
//!
//! What each server was last told to run (the hash of the file and of its skeleton) is kept in
//! `state_dir/haproxy/`: after a restart or a failure, a server whose file differs from that is
//! brought back in line. A draining server is removed (`set … maint`, `del server`) once
//! HAProxy reports no sessions on it, or when `drain_timeout` is up (its sessions closed).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::{Message, Recipient};
use serde::{Deserialize, Serialize};
use slog::{debug, error, info, warn, Logger};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::adapters::files;
use crate::adapters::haproxy::{Check, HaproxyError, Installed, Link, OnMissing};
use crate::adapters::ssh::SshSettings;
use crate::backoff::Backoff;
use crate::config::{CommandLine, Config, HaproxyTarget};
use crate::haproxy_api::{command, parse_servers_state, parse_sessions};
use crate::render::{digest, Plan};

/// What every worker needs.
#[derive(Clone)]
pub struct WorkerSettings {
    pub config_path: PathBuf,
    pub socket: PathBuf,
    pub state_file: PathBuf,
    pub backend: String,
    pub check: CommandLine,
    pub reload: CommandLine,
    pub timeout: Duration,
    pub runtime_api: bool,
    pub drain_timeout: Duration,
    /// Where what each server was last told to run is kept.
    pub state_dir: PathBuf,
    pub ssh: Option<Arc<SshSettings>>,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How often draining servers are looked at.
    pub reap_every: Duration,
}

impl WorkerSettings {
    pub fn from_config(cfg: &Config, ssh: Option<Arc<SshSettings>>) -> WorkerSettings {
        let h = &cfg.haproxy;
        WorkerSettings {
            config_path: h.config_path.clone(),
            socket: h.stats_socket.clone(),
            state_file: h.server_state_file.clone(),
            backend: h.backend.clone(),
            check: h.check_command.clone(),
            reload: h.reload_command.clone(),
            timeout: h.command_timeout,
            runtime_api: h.runtime_api,
            drain_timeout: cfg.scaling.drain_timeout,
            state_dir: cfg.general.state_dir.join("haproxy"),
            ssh,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            reap_every: Duration::from_millis(500),
        }
    }
}

/// Work for a worker.
#[derive(Debug)]
pub enum Work {
    /// Bring the server to this plan (a newer one replaces an older one not applied yet).
    Apply(Arc<Plan>),
    /// Report [`ServerEvent::Drained`] for this server once it takes no traffic.
    Watch { name: String, deadline: Instant },
}

/// What one apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The server already runs this configuration.
    Unchanged,
    /// Servers changed through the runtime API, the file rewritten; no reload.
    Runtime { added: usize, draining: usize },
    /// Validated, installed and reloaded.
    Reloaded { servers: usize },
}

/// What happened on one HAProxy server.
#[derive(Debug, Clone)]
pub enum ServerEvent {
    Applied(Applied),
    Failed {
        error: String,
        retry_in: Duration,
    },
    /// A watched server takes no traffic any more, or its time is up (`timed_out`).
    Drained {
        name: String,
        timed_out: bool,
    },
}

/// A worker's report to the HaproxyWriter.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ServerReport {
    /// The server's name in `[haproxy] servers` (`local`, `ssh://…`).
    pub server: String,
    pub event: ServerEvent,
}

/// What a server was last told to run, kept across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Told {
    hash: String,
    skeleton: String,
}

/// The worker of one server.
pub struct Worker {
    target: HaproxyTarget,
    label: String,
    settings: Arc<WorkerSettings>,
    link: Option<Link>,
    told: Option<Told>,
    /// Servers set to DRAIN here, with their removal deadline.
    draining: BTreeMap<String, Instant>,
    /// Servers someone waits for (WaitDrained), with its deadline.
    watched: BTreeMap<String, Instant>,
    out: Recipient<ServerReport>,
    log: Logger,
}

/// Starts the worker of `target`; it runs until the sender is dropped.
pub fn spawn(
    target: HaproxyTarget,
    settings: Arc<WorkerSettings>,
    out: Recipient<ServerReport>,
    log: &Logger,
) -> mpsc::UnboundedSender<Work> {
    let label = target.to_string();
    let mut w = Worker {
        log: log.new(slog::o!("server" => label.clone())),
        told: None,
        target,
        label,
        settings,
        link: None,
        draining: BTreeMap::new(),
        watched: BTreeMap::new(),
        out,
    };
    w.told = w.recall();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(w.run(rx));
    tx
}

impl Worker {
    fn config_path(&self) -> PathBuf {
        match &self.target {
            HaproxyTarget::Ssh { path: Some(p), .. } => p.clone(),
            _ => self.settings.config_path.clone(),
        }
    }

    fn told_file(&self) -> PathBuf {
        let safe: String = self
            .label
            .chars()
            .map(
                |c| match c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                    true => c,
                    false => '_',
                },
            )
            .collect();
        self.settings.state_dir.join(format!("{safe}.json"))
    }

    fn recall(&self) -> Option<Told> {
        let text = std::fs::read_to_string(self.told_file()).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn remember(&mut self, told: Told) {
        let path = self.told_file();
        let text = serde_json::to_string(&told).unwrap_or_default();
        let written = files::create_dir_all(&self.settings.state_dir, 0o700)
            .and_then(|()| files::atomic_write(&path, text.as_bytes(), 0o600));
        if let Err(e) = written {
            warn!(self.log, "Cannot record what HAProxy runs; the next start reloads it"; "file" => %path.display(), "error" => %e);
        }
        self.told = Some(told);
    }

    fn report(&self, event: ServerEvent) {
        self.out.do_send(ServerReport {
            server: self.label.clone(),
            event,
        });
    }

    async fn link(&mut self) -> Result<&Link, HaproxyError> {
        if self.link.as_ref().is_none_or(Link::is_closed) {
            self.link =
                Some(Link::connect(&self.target, self.settings.ssh.as_ref(), &self.log).await?);
        }
        Ok(self.link.as_ref().expect("just connected"))
    }

    async fn api(&mut self, cmd: &str) -> Result<String, HaproxyError> {
        let (socket, timeout) = (self.settings.socket.clone(), self.settings.timeout);
        self.link().await?.api(&socket, cmd, timeout).await
    }

    /// Sends `cmd` and checks HAProxy's answer says it was done.
    async fn api_do(&mut self, cmd: &str) -> Result<(), HaproxyError> {
        let answer = self.api(cmd).await?;
        match command::succeeded(cmd, &answer) {
            true => Ok(()),
            false => Err(HaproxyError::Api {
                server: self.label.clone(),
                socket: self.settings.socket.display().to_string(),
                message: format!("{cmd:?} answered {:?}", answer.trim()),
            }),
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Work>) {
        let s = self.settings.clone();
        let mut plan: Option<Arc<Plan>> = None;
        let mut retry_at: Option<Instant> = None;
        let mut backoff = Backoff::new(s.retry_base, s.retry_max);
        loop {
            let reap_at = (!self.draining.is_empty() || !self.watched.is_empty())
                .then(|| Instant::now() + s.reap_every);
            let wake = match (retry_at.filter(|_| plan.is_some()), reap_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let work = match wake {
                Some(at) => tokio::select! {
                    w = rx.recv() => w.map(Some),
                    _ = tokio::time::sleep_until(at) => Some(None),
                },
                None => rx.recv().await.map(Some),
            };
            let Some(first) = work else { return };
            for w in first
                .into_iter()
                .chain(std::iter::from_fn(|| rx.try_recv().ok()))
            {
                match w {
                    Work::Apply(p) => plan = Some(p),
                    Work::Watch { name, deadline } => {
                        self.watched.insert(name, deadline);
                    }
                }
            }
            if let Some(p) = plan
                .clone()
                .filter(|_| retry_at.is_none_or(|t| Instant::now() >= t))
            {
                match self.apply(&p).await {
                    Ok(applied) => {
                        plan = None;
                        retry_at = None;
                        backoff.reset();
                        self.report(ServerEvent::Applied(applied));
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        retry_at = Some(Instant::now() + delay);
                        self.link = None;
                        match &e {
                            HaproxyError::Invalid { .. } | HaproxyError::CheckMissing { .. } => {
                                error!(self.log, "New HAProxy configuration rejected; the last good one stays live";
                                    "error" => %e, "attempt" => backoff.attempts(), "retry_in" => ?delay)
                            }
                            _ => {
                                warn!(self.log, "HAProxy server not updated; retrying"; "error" => %e,
                                "attempt" => backoff.attempts(), "retry_in" => ?delay)
                            }
                        }
                        self.report(ServerEvent::Failed {
                            error: e.to_string(),
                            retry_in: delay,
                        });
                    }
                }
            }
            if !self.draining.is_empty() || !self.watched.is_empty() {
                if let Err(e) = self.reap().await {
                    debug!(self.log, "Cannot look at draining servers yet"; "error" => %e);
                    self.link = None;
                }
            }
        }
    }

    async fn apply(&mut self, plan: &Plan) -> Result<Applied, HaproxyError> {
        let s = self.settings.clone();
        let path = self.config_path();
        let check = Check {
            command: &s.check,
            timeout: s.timeout,
            on_missing: OnMissing::Refuse,
        };
        let live = self.link().await?.read(&path, s.timeout).await?;
        let live_hash = live.as_deref().map(digest_bytes);
        // The runtime API may only change what HAProxy runs when the file on disk is exactly
        // what it was last told to run: a file changed since (by hand, or by a master killed
        // between writing it and recording it) may be what HAProxy runs now, so it reloads.
        let trusted = self
            .told
            .as_ref()
            .is_some_and(|t| t.skeleton == plan.skeleton && Some(&t.hash) == live_hash.as_ref());
        if s.runtime_api && trusted {
            if let Some(options) = &plan.server_options {
                match self.runtime_sync(plan, options).await {
                    Ok((added, draining)) => {
                        // HAProxy runs the change from here on.
                        if added + draining > 0 {
                            info!(self.log, "HAProxy servers changed through the runtime API";
                                "added" => added, "draining" => draining, "servers" => plan.servers.len());
                        }
                        // The file follows in the same step, so a reload or restart gives the
                        // same backend; it is validated like any other. Until it is in place
                        // HAProxy's record stays the old file, so a failure here is retried
                        // and the new file never trusted unvalidated.
                        self.link()
                            .await?
                            .install(&plan.text, &path, &check)
                            .await?;
                        self.remember(Told {
                            hash: plan.hash.clone(),
                            skeleton: plan.skeleton.clone(),
                        });
                        return Ok(Applied::Runtime { added, draining });
                    }
                    Err(e) => {
                        warn!(self.log, "Runtime API change failed; validating and reloading instead"; "error" => %e)
                    }
                }
            }
        }
        let told_this = self.told.as_ref().is_some_and(|t| t.hash == plan.hash);
        if told_this && live_hash.as_ref() == Some(&plan.hash) {
            return Ok(Applied::Unchanged);
        }
        let installed = self
            .link()
            .await?
            .install(&plan.text, &path, &check)
            .await?;
        // Health states survive the reload through the server state file.
        match self.api("show servers state").await {
            Ok(state) if state.starts_with('1') => {
                let link = self.link().await?;
                if let Err(e) = link.write(&s.state_file, state.as_bytes(), s.timeout).await {
                    warn!(self.log, "Cannot save the servers' health states before the reload"; "error" => %e);
                }
            }
            Ok(_) | Err(_) => {} // HAProxy not running yet: nothing to keep.
        }
        self.link().await?.run(&s.reload, s.timeout).await?;
        self.remember(Told {
            hash: plan.hash.clone(),
            skeleton: plan.skeleton.clone(),
        });
        // A reload removes every server the file lacks, draining or not.
        self.draining.clear();
        let verb = match installed {
            Installed::Replaced { .. } => "installed and reloaded",
            Installed::Unchanged { .. } => "reloaded (the file was already in place)",
        };
        info!(self.log, "HAProxy configuration {verb}"; "servers" => plan.servers.len(), "file" => %path.display());
        Ok(Applied::Reloaded {
            servers: plan.servers.len(),
        })
    }

    /// Adds the plan's new servers and drains the ones it lacks, through the runtime API.
    async fn runtime_sync(
        &mut self,
        plan: &Plan,
        options: &str,
    ) -> Result<(usize, usize), HaproxyError> {
        let be = self.settings.backend.clone();
        let actual = parse_servers_state(&self.api(&command::servers_state(&be)).await?)
            .map_err(|message| self.api_error(message))?;
        let mut added = 0;
        for s in &plan.servers {
            match actual.get(&s.name) {
                None => {
                    self.api_do(&command::add(&be, s, options)).await?;
                    if options.split_whitespace().any(|w| w == "check") {
                        self.api_do(&command::enable_health(&be, &s.name)).await?;
                    }
                    self.api_do(&command::set_state(&be, &s.name, "ready"))
                        .await?;
                    added += 1;
                }
                // Back in the list while it was leaving: in rotation again.
                Some(a) if a.leaving() => {
                    self.api_do(&command::set_state(&be, &s.name, "ready"))
                        .await?;
                    self.draining.remove(&s.name);
                    added += 1;
                }
                Some(_) => {}
            }
        }
        let wanted: Vec<&str> = plan.servers.iter().map(|s| s.name.as_str()).collect();
        let mut draining = 0;
        for name in actual.keys().filter(|n| !wanted.contains(&n.as_str())) {
            if !self.draining.contains_key(name) {
                self.api_do(&command::set_state(&be, name, "drain")).await?;
                self.draining
                    .insert(name.clone(), Instant::now() + self.settings.drain_timeout);
                draining += 1;
            }
        }
        Ok((added, draining))
    }

    fn api_error(&self, message: String) -> HaproxyError {
        HaproxyError::Api {
            server: self.label.clone(),
            socket: self.settings.socket.display().to_string(),
            message,
        }
    }

    /// Removes draining servers that have no sessions left (or whose time is up), and reports
    /// watched servers that take no traffic any more.
    async fn reap(&mut self) -> Result<(), HaproxyError> {
        let be = self.settings.backend.clone();
        let state = parse_servers_state(&self.api(&command::servers_state(&be)).await?)
            .map_err(|m| self.api_error(m))?;
        let sessions = parse_sessions(&self.api(&command::stat(&be)).await?, &be)
            .map_err(|m| self.api_error(m))?;
        let now = Instant::now();
        for (name, deadline) in self.draining.clone() {
            let Some(server) = state.get(&name) else {
                self.draining.remove(&name);
                continue;
            };
            let n = sessions.get(&name).copied().unwrap_or(0);
            if n > 0 && now < deadline {
                continue;
            }
            if n > 0 {
                info!(self.log, "Drain time is up; closing the server's sessions"; "name" => &name, "sessions" => n);
                let _ = self.api(&command::shutdown_sessions(&be, &name)).await;
            }
            if !server.in_maintenance() {
                self.api_do(&command::set_state(&be, &name, "maint"))
                    .await?;
            }
            match self.api_do(&command::delete(&be, &name)).await {
                Ok(()) => {
                    info!(self.log, "Drained server removed"; "name" => &name);
                    self.draining.remove(&name);
                }
                // Connections still attached: the next look tries again; after a minute more
                // the next reload removes it.
                Err(e) if now > deadline + Duration::from_secs(60) => {
                    warn!(self.log, "Cannot remove the drained server; the next reload will"; "name" => &name, "error" => %e);
                    self.draining.remove(&name);
                }
                Err(e) => {
                    debug!(self.log, "Drained server not removable yet"; "name" => &name, "error" => %e)
                }
            }
        }
        for (name, deadline) in self.watched.clone() {
            let drained = match state.get(&name) {
                None => true,
                Some(s) => s.leaving() && sessions.get(&name).copied().unwrap_or(0) == 0,
            };
            if drained || now >= deadline {
                self.watched.remove(&name);
                self.report(ServerEvent::Drained {
                    name,
                    timed_out: !drained,
                });
            }
        }
        Ok(())
    }
}

fn digest_bytes(b: &[u8]) -> String {
    digest(&String::from_utf8_lossy(b))
}
