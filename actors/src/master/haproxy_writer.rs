//! HaproxyWriter (master role): keeps every HAProxy server of `[haproxy] servers` — this
//! machine's and remote ones over SSH — in step with the registered hosts.
//!
//! On every [`HostsChanged`] (debounced) it renders one plan (the configuration, its skeleton,
//! the template's server options) and hands it to each server's worker
//! ([`haproxy_worker`](super::haproxy_worker)), which applies it through the runtime API when
//! only servers changed, or by validate + install + reload otherwise, and retries with backoff
//! until that server runs it. A rendering that fails is logged and nothing is applied; a
//! configuration that fails validation never replaces a live one.
//!
//! [`WaitDrained`] lets the launcher wait, before it terminates an instance, until every
//! HAProxy server has taken the host out of rotation and its last session has ended (or the
//! time given is up).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, Handler, Message, ResponseFuture};
use slog::{error, info, o, Logger};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::haproxy_worker::{self, Applied, ServerEvent, ServerReport, Work, WorkerSettings};
use super::messages::HostsChanged;
use crate::adapters::ssh::SshSettings;
use crate::config::Config;
use crate::hosts::{Host, HostKey};
use crate::metrics::Metrics;
use crate::render::HaproxyTemplate;

/// Resolves once `server` takes no traffic on any HAProxy server (or `within` is up), saying
/// which of the two happened.
#[derive(Debug, Clone, Message)]
#[rtype(result = "DrainOutcome")]
pub struct WaitDrained {
    pub server: HostKey,
    pub within: Duration,
}

/// How long past a [`WaitDrained`]'s time a worker that has not reported is waited for.
const WORKER_GRACE: Duration = Duration::from_secs(1);

/// How a [`WaitDrained`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every HAProxy server reported the server without sessions.
    Drained,
    /// The time given ran out first: sessions may still have been open.
    TimedOut,
}

/// The last thing each HAProxy server did, for logs and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerStatus {
    Pending,
    /// What the last apply did, and when.
    Applied(Applied, std::time::Instant),
    Failing(String),
}

struct Waiter {
    name: String,
    left: BTreeSet<String>,
    /// Some server reported the time up rather than the sessions gone.
    timed_out: bool,
    reply: Option<oneshot::Sender<DrainOutcome>>,
}

/// The actor.
pub struct HaproxyWriter {
    cfg: Arc<Config>,
    template: Arc<HaproxyTemplate>,
    settings: Arc<WorkerSettings>,
    workers: BTreeMap<String, mpsc::UnboundedSender<Work>>,
    status: BTreeMap<String, ServerStatus>,
    pending: Option<Arc<Vec<Host>>>,
    scheduled: bool,
    waiters: Vec<Waiter>,
    metrics: Arc<Metrics>,
    log: Logger,
}

impl HaproxyWriter {
    /// A writer for the HAProxy servers of `cfg` with a compiled `template`; remote servers
    /// are reached with `ssh`.
    pub fn new(
        cfg: Arc<Config>,
        template: HaproxyTemplate,
        ssh: Option<Arc<SshSettings>>,
        log: &Logger,
    ) -> HaproxyWriter {
        HaproxyWriter {
            settings: Arc::new(WorkerSettings::from_config(&cfg, ssh)),
            cfg,
            template: Arc::new(template),
            workers: BTreeMap::new(),
            status: BTreeMap::new(),
            pending: None,
            scheduled: false,
            waiters: Vec::new(),
            metrics: Arc::default(),
            log: log.new(o!("actor" => "HaproxyWriter")),
        }
    }

    /// Counts applies in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> HaproxyWriter {
        self.metrics = metrics;
        self
    }

    /// The same, with worker settings of the caller's (tests shorten the retry delays).
    pub fn with_settings(mut self, settings: WorkerSettings) -> HaproxyWriter {
        self.settings = Arc::new(settings);
        self
    }

    fn schedule(&mut self, ctx: &mut Context<Self>) {
        if self.scheduled || self.pending.is_none() {
            return;
        }
        self.scheduled = true;
        ctx.run_later(self.cfg.haproxy.debounce, |this, _| {
            this.scheduled = false;
            this.plan_and_apply();
        });
    }

    fn plan_and_apply(&mut self) {
        let Some(hosts) = self.pending.take() else {
            return;
        };
        let plan = self
            .template
            .plan(&self.cfg.haproxy, &self.cfg.general.hosts_dir, &hosts);
        match plan {
            Err(e) => {
                error!(self.log, "Cannot render the HAProxy configuration; nothing applied"; "error" => %e)
            }
            Ok(plan) => {
                let plan = Arc::new(plan);
                for (label, tx) in &self.workers {
                    let _ = tx.send(Work::Apply(plan.clone()));
                    self.status.insert(label.clone(), ServerStatus::Pending);
                }
            }
        }
    }
}

impl Actor for HaproxyWriter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        for target in &self.cfg.haproxy.servers {
            let tx = haproxy_worker::spawn(
                target.clone(),
                self.settings.clone(),
                ctx.address().recipient(),
                &self.log,
            );
            self.workers.insert(target.to_string(), tx);
        }
        info!(self.log, "Writing HAProxy servers"; "servers" => self.workers.keys().cloned().collect::<Vec<_>>().join(", "));
    }
}

impl Handler<HostsChanged> for HaproxyWriter {
    type Result = ();

    fn handle(&mut self, m: HostsChanged, ctx: &mut Context<Self>) {
        self.pending = Some(m.hosts);
        self.schedule(ctx);
    }
}

impl Handler<ServerReport> for HaproxyWriter {
    type Result = ();

    fn handle(&mut self, m: ServerReport, _: &mut Context<Self>) {
        match m.event {
            ServerEvent::Applied(a) => {
                let how = match a {
                    Applied::Unchanged => "unchanged",
                    Applied::Runtime { .. } => "runtime",
                    Applied::Reloaded { .. } => "reload",
                };
                self.metrics.haproxy_apply(&m.server, how);
                self.status.insert(
                    m.server,
                    ServerStatus::Applied(a, std::time::Instant::now()),
                );
            }
            ServerEvent::Failed { error, .. } => {
                self.metrics.haproxy_apply(&m.server, "failed");
                self.status.insert(m.server, ServerStatus::Failing(error));
            }
            ServerEvent::Drained { name, timed_out } => {
                for w in self.waiters.iter_mut().filter(|w| w.name == name) {
                    w.left.remove(&m.server);
                    w.timed_out |= timed_out;
                    if w.left.is_empty() {
                        if let Some(r) = w.reply.take() {
                            let _ = r.send(match w.timed_out {
                                true => DrainOutcome::TimedOut,
                                false => DrainOutcome::Drained,
                            });
                        }
                    }
                }
                self.waiters
                    .retain(|w| w.reply.as_ref().is_some_and(|r| !r.is_closed()));
            }
        }
    }
}

impl Handler<WaitDrained> for HaproxyWriter {
    type Result = ResponseFuture<DrainOutcome>;

    fn handle(&mut self, m: WaitDrained, _: &mut Context<Self>) -> Self::Result {
        let name = m.server.server_name();
        let (tx, rx) = oneshot::channel();
        let deadline = Instant::now() + m.within;
        self.waiters
            .retain(|w| w.reply.as_ref().is_some_and(|r| !r.is_closed()));
        self.waiters.push(Waiter {
            name: name.clone(),
            left: self.workers.keys().cloned().collect(),
            timed_out: false,
            reply: Some(tx),
        });
        for tx in self.workers.values() {
            let _ = tx.send(Work::Watch {
                name: name.clone(),
                deadline,
            });
        }
        let none = self.workers.is_empty();
        Box::pin(async move {
            if none {
                return DrainOutcome::Drained;
            }
            // Each worker reports at its deadline, drained or not; this is only for a worker
            // that cannot report at all.
            match tokio::time::timeout(m.within + WORKER_GRACE, rx).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(_)) | Err(_) => DrainOutcome::TimedOut,
            }
        })
    }
}

/// The last thing each HAProxy server did.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "BTreeMap<String, ServerStatus>")]
pub struct GetServerStatus;

impl Handler<GetServerStatus> for HaproxyWriter {
    type Result = actix::MessageResult<GetServerStatus>;

    fn handle(&mut self, _: GetServerStatus, _: &mut Context<Self>) -> Self::Result {
        actix::MessageResult(self.status.clone())
    }
}
