//! One HAProxy server's worker: a tokio task that owns the connection to that server (local,
//! or an SSH session), brings it to the latest plan and keeps trying, with backoff, until it
//! runs it; drains and removes servers through its runtime API. A server that is down or
//! failing only delays itself: every server has its own worker.
//!
//! Applying a plan:
//!
//! - If HAProxy was last told to run a configuration with the same skeleton (everything but
//!   the server list), and the runtime API is on, the servers are changed in place: new ones
//!   added (`add server`, `enable health`, `set server … state ready`), moved ones given their
//!   new address (`set server … addr`), gone ones set to DRAIN; then the file is validated
//!   and installed with no reload, so a later reload or restart gives the same backend, and
//!   the server state file is refreshed, so an outside reload brings back the plan.
//! - Otherwise (first start, a setting changed, the runtime API failed): validate, install,
//!   write the server state file (the plan's servers ready, health states kept), reload, and
//!   wait until a new worker answers: a configuration that passes `haproxy -c` but does not
//!   load (a bind already in use) is a failed apply, retried with backoff.
//!
//! Every change sent through the runtime API is followed by `show version` on the same line,
//! so an answer that is empty because the connection closed is not taken for success.
//!
//! What each server was last told to run (the hash of the file and of its skeleton) is kept in
//! `state_dir/haproxy/`: after a restart or a failure, a server whose file differs from that is
//! brought back in line. A draining server is removed (`set … maint`, `del server`) once
//! HAProxy reports no sessions on it, or when `drain_timeout` is up (its sessions closed). A
//! server someone waits for ([`Work::Watch`]) counts as drained only when no worker holds a
//! session on it: the current one, and the old ones a reload left (through the master CLI) —
//! never because the new worker does not have it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::haproxy_api::{
    command, parse_info_pid, parse_servers_state, parse_sessions, parse_show_proc, parse_stats,
    state_file, LbSample,
};
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
    /// HAProxy's master CLI (old workers' sessions after a reload); None: not known.
    pub master_socket: Option<PathBuf>,
    /// How long workers left by a reload may live (zero: until their last connection).
    pub hard_stop_after: Duration,
    pub drain_timeout: Duration,
    /// Where what each server was last told to run is kept.
    pub state_dir: PathBuf,
    pub ssh: Option<Arc<SshSettings>>,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How often draining servers are looked at.
    pub reap_every: Duration,
    /// How often the backend's load (`show stat`) is read for the decider, while `sampling`
    /// is set (a HAProxy signal is on; the decider sets it when `[scaling]` changes).
    pub sample_every: Duration,
    pub sampling: Arc<AtomicBool>,
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
            master_socket: h.master_socket.clone(),
            hard_stop_after: h.hard_stop_after,
            drain_timeout: cfg.scaling.drain_timeout,
            state_dir: cfg.general.state_dir.join("haproxy"),
            ssh,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            reap_every: Duration::from_millis(500),
            sample_every: SAMPLE_EVERY,
            sampling: Arc::new(AtomicBool::new(cfg.scaling.haproxy_signals())),
        }
    }
}

/// How often each HAProxy server's load is read when a HAProxy signal is on: the decider's
/// tick.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Longest a `show stat` for the decider may take (a later answer would be stale anyway).
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait between two reads of a server that does not answer: under the default
/// stale_after, so figures resume within it once the server answers again.
const SAMPLE_MAX: Duration = Duration::from_secs(5);
/// Longest a whole read may take, reaching the server included (a black-holed server must not
/// hold up the plans and drains this worker also serves).
const SAMPLE_LIMIT: Duration = Duration::from_secs(5);

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
    Runtime {
        added: usize,
        moved: usize,
        draining: usize,
    },
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
    /// Whether changes can go through the runtime API (None) or why they are reloads; sent
    /// when that changes.
    Runtime(Option<String>),
    /// The backend's load as this server measures it now (HAProxy signals on).
    Load(LbSample),
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
    /// HAProxy's answer to `show version` on this link: the sentinel after every change.
    version: Option<String>,
    told: Option<Told>,
    /// Servers set to DRAIN here, with their removal deadline.
    draining: BTreeMap<String, Instant>,
    /// Servers someone waits for (WaitDrained), with its deadline.
    watched: BTreeMap<String, Instant>,
    /// When this worker last reloaded HAProxy: old workers may hold sessions since.
    reloaded_at: Option<Instant>,
    /// What was last said about the runtime API (None: usable).
    runtime_note: Option<Option<String>>,
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
        version: None,
        draining: BTreeMap::new(),
        watched: BTreeMap::new(),
        reloaded_at: None,
        runtime_note: None,
        out,
    };
    w.told = w.recall();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(w.run(rx));
    tx
}

/// Longest wait between two looks at draining servers while HAProxy does not answer.
const REAP_MAX: Duration = Duration::from_secs(30);
/// How often `show info` is asked for the new worker after a reload.
const RELOAD_POLL: Duration = Duration::from_millis(100);

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

    /// Says whether the runtime API can be used (None) or why not, when that changed.
    fn runtime(&mut self, why: Option<String>) {
        if self.runtime_note.as_ref() != Some(&why) {
            if let Some(w) = &why {
                warn!(self.log, "Runtime API unavailable: changes to this server are reloads"; "reason" => w);
            }
            self.runtime_note = Some(why.clone());
            self.report(ServerEvent::Runtime(why));
        }
    }

    /// Drops the connection (and what was learnt on it): the next use connects again.
    fn reset_link(&mut self) {
        self.link = None;
        self.version = None;
    }

    async fn link(&mut self) -> Result<&Link, HaproxyError> {
        if self.link.as_ref().is_none_or(Link::is_closed) {
            self.version = None;
            self.link =
                Some(Link::connect(&self.target, self.settings.ssh.as_ref(), &self.log).await?);
        }
        Ok(self.link.as_ref().expect("just connected"))
    }

    async fn api(&mut self, cmd: &str) -> Result<String, HaproxyError> {
        let (socket, timeout) = (self.settings.socket.clone(), self.settings.timeout);
        self.link().await?.api(&socket, cmd, timeout).await
    }

    /// HAProxy's version as `show version` answers it (once per connection).
    async fn version(&mut self) -> Result<String, HaproxyError> {
        if let Some(v) = &self.version {
            return Ok(v.clone());
        }
        let answer = self.api(command::SENTINEL).await?;
        let v = answer.trim().to_string();
        if v.is_empty() || v.contains(char::is_whitespace) {
            return Err(self.api_error(format!("{:?} answered {answer:?}", command::SENTINEL)));
        }
        self.version = Some(v.clone());
        Ok(v)
    }

    /// Sends `cmd` and checks HAProxy's answer says it was done: the sentinel after it shows
    /// the answer is complete, and what came before it must be what `cmd` says on success.
    async fn api_do(&mut self, cmd: &str) -> Result<(), HaproxyError> {
        let version = self.version().await?;
        let answer = self.api(&command::with_sentinel(cmd)).await?;
        match command::before_sentinel(&answer, &version) {
            Some(said) if command::succeeded(cmd, said) => Ok(()),
            Some(said) => Err(self.api_error(format!("{cmd:?} answered {:?}", said.trim()))),
            None => {
                Err(self.api_error(format!("{cmd:?}: no complete answer ({:?})", answer.trim())))
            }
        }
    }

    /// The process id of the worker that answers the stats socket, None when none does.
    async fn worker_pid(&mut self) -> Option<u32> {
        self.api("show info")
            .await
            .ok()
            .and_then(|a| parse_info_pid(&a))
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Work>) {
        let s = self.settings.clone();
        let mut plan: Option<Arc<Plan>> = None;
        let mut retry_at: Option<Instant> = None;
        let mut backoff = Backoff::new(s.retry_base, s.retry_max);
        let mut reap_backoff = Backoff::new(s.reap_every, REAP_MAX.max(s.reap_every));
        let mut reap_at = Instant::now();
        let mut sample_at = Instant::now();
        let mut sample_backoff = Backoff::new(s.sample_every, SAMPLE_MAX.max(s.sample_every));
        loop {
            let reaping = !self.draining.is_empty() || !self.watched.is_empty();
            let wake = [
                retry_at.filter(|_| plan.is_some()),
                reaping.then_some(reap_at),
                // Looked at every sample_every whether sampling is on or not, so a signal
                // turned on by a reload is read within a second.
                Some(sample_at),
            ]
            .into_iter()
            .flatten()
            .min();
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
                    Work::Apply(p) => {
                        // A new plan is tried now: the last one's backoff was for the last one.
                        plan = Some(p);
                        retry_at = None;
                        backoff.reset();
                    }
                    Work::Watch { name, deadline } => {
                        self.watched.insert(name, deadline);
                        reap_at = Instant::now();
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
                        self.reset_link();
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
            let reaping = !self.draining.is_empty() || !self.watched.is_empty();
            if reaping && Instant::now() >= reap_at {
                match self.reap().await {
                    Ok(()) => {
                        reap_backoff.reset();
                        reap_at = Instant::now() + s.reap_every;
                    }
                    Err(e) => {
                        let delay = reap_backoff.next_delay();
                        debug!(self.log, "Cannot look at draining servers yet"; "error" => %e, "retry_in" => ?delay);
                        self.reset_link();
                        reap_at = Instant::now() + delay;
                        // A watched server whose time is up is reported even so.
                        self.expire_watched();
                    }
                }
            }
            if Instant::now() >= sample_at {
                if !s.sampling.load(Ordering::Relaxed) {
                    sample_at = Instant::now() + s.sample_every;
                } else {
                    let read = tokio::time::timeout(SAMPLE_LIMIT, self.sample()).await;
                    match read {
                        Ok(Ok(load)) => {
                            if sample_backoff.attempts() > 0 {
                                info!(self.log, "The backend's load can be read again");
                            }
                            sample_backoff.reset();
                            sample_at = Instant::now() + s.sample_every;
                            self.report(ServerEvent::Load(load));
                        }
                        Ok(Err(_)) | Err(_) => {
                            // No figure is sent: the decider reads the silence as missing
                            // figures, never as no load (no scale-in while it lasts).
                            let e = match &read {
                                Ok(Err(e)) => e.to_string(),
                                _ => format!("no answer within {SAMPLE_LIMIT:?}"),
                            };
                            let delay = sample_backoff.next_delay();
                            if sample_backoff.attempts() == 1 {
                                warn!(self.log, "Cannot read the backend's load; no scale-in while this lasts";
                                    "error" => %e, "retry_in" => ?delay);
                            } else {
                                debug!(self.log, "Cannot read the backend's load"; "error" => %e, "retry_in" => ?delay);
                            }
                            // A failed transport is dialled again; a refusal by the socket is not
                            // the session's fault.
                            if !matches!(read, Ok(Err(HaproxyError::Api { .. }))) {
                                self.reset_link();
                            }
                            sample_at = Instant::now() + delay;
                        }
                    }
                }
            }
        }
    }

    /// The backend's load as this server measures it (`show stat BACKEND 6 -1`), workers
    /// left by a reload included: their requests in progress count (asked through the master
    /// CLI); when they may live and cannot be asked, the figures are marked partial.
    async fn sample(&mut self) -> Result<LbSample, HaproxyError> {
        let s = self.settings.clone();
        let timeout = s.timeout.min(SAMPLE_TIMEOUT);
        let stat = command::stat_with_backend(&s.backend);
        let answer = self.link().await?.api(&s.socket, &stat, timeout).await?;
        let mut sample = parse_stats(&answer, &s.backend).map_err(|m| self.api_error(m))?;
        let old_may_live = self.reloaded_at.is_some_and(|at| {
            s.hard_stop_after.is_zero() || at.elapsed() < s.hard_stop_after + Duration::from_secs(5)
        });
        let Some(master) = s.master_socket.clone() else {
            sample.partial = old_may_live;
            return Ok(sample);
        };
        let link = self.link().await?;
        let old = match link.master_cli(&master, "show proc", timeout).await {
            Ok(p) => parse_show_proc(&p).map(|(_, old)| old).ok(),
            Err(_) => None,
        };
        let Some(old) = old else {
            sample.partial = old_may_live;
            return Ok(sample);
        };
        for pid in old {
            let cmd = format!("@!{pid} {stat}");
            match link.master_cli(&master, &cmd, timeout).await {
                Ok(answer) => match parse_stats(&answer, &s.backend) {
                    Ok(o) => sample.add_old_worker(&o),
                    // One that exited meanwhile holds nothing; anything else is not known.
                    Err(_) if answer.trim().is_empty() => {}
                    Err(_) => sample.partial = true,
                },
                Err(_) => sample.partial = true,
            }
        }
        Ok(sample)
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
            match &plan.server_options {
                None => self.runtime(Some(
                    "the template's server lines were not found (every change is a reload)".into(),
                )),
                Some(options) => match self.runtime_sync(plan, options).await {
                    Ok((added, moved, draining)) => {
                        self.runtime(None);
                        // HAProxy runs the change from here on.
                        if added + moved + draining > 0 {
                            info!(self.log, "HAProxy servers changed through the runtime API";
                                "added" => added, "moved" => moved, "draining" => draining,
                                "servers" => plan.servers.len());
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
                        // And the state file, so an outside reload (or a reboot) brings back
                        // what runs now, not what ran at the last reload.
                        self.save_state(plan).await;
                        return Ok(Applied::Runtime {
                            added,
                            moved,
                            draining,
                        });
                    }
                    Err(e) => {
                        self.runtime(Some(e.to_string()));
                        warn!(self.log, "Runtime API change failed; validating and reloading instead"; "error" => %e);
                        self.reset_link();
                    }
                },
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
        // Health states survive the reload through the server state file; admin states do
        // not (the plan's servers are ready).
        self.save_state(plan).await;
        let before = self.worker_pid().await;
        self.link().await?.run(&s.reload, s.timeout).await?;
        self.reloaded_at = Some(Instant::now());
        if let Some(old) = before {
            self.wait_for_new_worker(old).await?;
        }
        self.remember(Told {
            hash: plan.hash.clone(),
            skeleton: plan.skeleton.clone(),
        });
        // The new worker has only the plan's servers; a server that was being drained is
        // gone from it (old workers may still hold its sessions: see reap).
        self.draining.clear();
        let verb = match installed {
            Installed::Replaced { .. } => "installed and reloaded",
            Installed::Unchanged { .. } => "reloaded (the file was already in place)",
        };
        info!(self.log, "HAProxy configuration {verb}"; "servers" => plan.servers.len(),
            "file" => %path.display(), "worker" => before.map(|_| "new one answering").unwrap_or("not checked: HAProxy did not answer before the reload"));
        Ok(Applied::Reloaded {
            servers: plan.servers.len(),
        })
    }

    /// After a reload: waits until a worker other than `old` answers the stats socket (the new
    /// configuration runs), within the command timeout.
    async fn wait_for_new_worker(&mut self, old: u32) -> Result<(), HaproxyError> {
        let waited = self.settings.timeout;
        let end = Instant::now() + waited;
        loop {
            match self.worker_pid().await {
                Some(pid) if pid != old => return Ok(()),
                _ => {}
            }
            if Instant::now() >= end {
                return Err(HaproxyError::NotReloaded {
                    server: self.label.clone(),
                    old,
                    waited,
                });
            }
            tokio::time::sleep(RELOAD_POLL).await;
        }
    }

    /// Writes the server state file HAProxy loads at its next reload or start: what runs now,
    /// the plan's servers ready. When that cannot be had, the file is removed rather than
    /// left stale (a reload then forgets health states, never brings back an old drain).
    async fn save_state(&mut self, plan: &Plan) {
        let s = self.settings.clone();
        let keep: std::collections::BTreeSet<&str> =
            plan.servers.iter().map(|x| x.name.as_str()).collect();
        let state = match self.api(command::ALL_SERVERS_STATE).await {
            Ok(text) => state_file(&text, &s.backend, &keep),
            Err(e) => Err(e.to_string()),
        };
        let written = match state {
            Ok(text) => {
                let link = self.link().await;
                match link {
                    Ok(l) => l
                        .write(&s.state_file, text.as_bytes(), s.timeout)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            debug!(self.log, "No server state to save; removing the state file"; "error" => %e);
            if let Ok(l) = self.link().await {
                if let Err(e) = l.remove(&s.state_file, s.timeout).await {
                    warn!(self.log, "Cannot remove the stale server state file"; "file" => %s.state_file.display(), "error" => %e);
                }
            }
        }
    }

    /// Adds the plan's new servers, moves those whose address changed, and drains the ones it
    /// lacks, through the runtime API.
    async fn runtime_sync(
        &mut self,
        plan: &Plan,
        options: &str,
    ) -> Result<(usize, usize, usize), HaproxyError> {
        let be = self.settings.backend.clone();
        let actual = parse_servers_state(&self.api(&command::servers_state(&be)).await?)
            .map_err(|message| self.api_error(message))?;
        let checked = options.split_whitespace().any(|w| w == "check");
        let (mut added, mut moved) = (0, 0);
        for s in &plan.servers {
            match actual.get(&s.name) {
                None => {
                    self.api_do(&command::add(&be, s, options)).await?;
                    if checked {
                        self.api_do(&command::enable_health(&be, &s.name)).await?;
                    }
                    self.api_do(&command::set_state(&be, &s.name, "ready"))
                        .await?;
                    added += 1;
                }
                Some(a) => {
                    if !a.at(&s.ip, s.port) {
                        self.api_do(&command::set_addr(&be, &s.name, &s.ip, s.port))
                            .await?;
                        moved += 1;
                    }
                    // Back in the list while it was leaving: in rotation again.
                    if a.leaving() {
                        self.api_do(&command::set_state(&be, &s.name, "ready"))
                            .await?;
                        self.draining.remove(&s.name);
                        added += 1;
                    }
                }
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
        Ok((added, moved, draining))
    }

    fn api_error(&self, message: String) -> HaproxyError {
        HaproxyError::Api {
            server: self.label.clone(),
            socket: self.settings.socket.display().to_string(),
            message,
        }
    }

    /// Whether old workers (left by a reload) may still hold sessions of `name`: Some(false)
    /// when the master CLI shows none does, Some(true) when one does, None when that cannot
    /// be known (no master CLI, or it does not answer) while old workers may exist.
    async fn old_workers_hold(&mut self, name: &str) -> Option<bool> {
        let s = self.settings.clone();
        let old_may_live = self.reloaded_at.is_some_and(|at| {
            s.hard_stop_after.is_zero() || at.elapsed() < s.hard_stop_after + Duration::from_secs(5)
        });
        let Some(master) = s.master_socket.clone() else {
            return match old_may_live {
                true => None,
                false => Some(false),
            };
        };
        let link = self.link().await.ok()?;
        let procs = link.master_cli(&master, "show proc", s.timeout).await;
        let (_, old) = match procs.map(|p| parse_show_proc(&p)) {
            Ok(Ok(p)) => p,
            _ => {
                return match old_may_live {
                    true => None,
                    false => Some(false),
                }
            }
        };
        for pid in old {
            let cmd = format!("@!{pid} {}", command::stat(&s.backend));
            let answer = link.master_cli(&master, &cmd, s.timeout).await.ok()?;
            // An old worker that exited meanwhile answers nothing useful: it holds nothing.
            let Ok(sessions) = parse_sessions(&answer, &s.backend) else {
                continue;
            };
            if sessions.get(name).copied().unwrap_or(0) > 0 {
                return Some(true);
            }
        }
        Some(false)
    }

    /// Reports every watched server whose time is up.
    fn expire_watched(&mut self) {
        let now = Instant::now();
        let gone: Vec<String> = self
            .watched
            .iter()
            .filter(|(_, d)| now >= **d)
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            self.watched.remove(&name);
            self.report(ServerEvent::Drained {
                name,
                timed_out: true,
            });
        }
    }

    /// Removes draining servers that have no sessions left (or whose time is up), and reports
    /// watched servers that no worker, current or old, holds a session on any more.
    async fn reap(&mut self) -> Result<(), HaproxyError> {
        let be = self.settings.backend.clone();
        let state = parse_servers_state(&self.api(&command::servers_state(&be)).await?)
            .map_err(|m| self.api_error(m))?;
        let sessions = parse_sessions(&self.api(&command::stat(&be)).await?, &be)
            .map_err(|m| self.api_error(m))?;
        let now = Instant::now();
        for (name, deadline) in self.draining.clone() {
            let Some(server) = state.get(&name) else {
                // Not in HAProxy any more (a reload): nothing left to remove.
                self.draining.remove(&name);
                continue;
            };
            let n = sessions.get(&name).copied().unwrap_or(0);
            if n > 0 && now < deadline {
                continue;
            }
            if n > 0 {
                info!(self.log, "Drain time is up; closing the server's sessions"; "name" => &name, "sessions" => n);
                if let Err(e) = self.api_do(&command::shutdown_sessions(&be, &name)).await {
                    warn!(self.log, "Cannot close the drained server's sessions"; "name" => &name, "error" => %e);
                }
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
            let here = match state.get(&name) {
                // Out of rotation here, with no session left.
                Some(s) => s.leaving() && sessions.get(&name).copied().unwrap_or(0) == 0,
                // Gone from the current worker: only the old ones can say.
                None => true,
            };
            let drained = here && self.old_workers_hold(&name).await == Some(false);
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
