//! HaproxyWriter (master role): keeps every HAProxy server of `[haproxy] servers` — this
//! machine's and remote ones over SSH — in step with the registered hosts.
//!
//! On every [`HostsChanged`] (debounced) it resolves the hosts registered by name
//! ([`crate::adapters::resolve`]), renders one plan (the configuration, its skeleton, the
//! server options) and hands it to each server's worker
//! ([`haproxy_worker`](super::haproxy_worker)), which applies it through the runtime API when
//! only servers changed, or by validate + install + reload otherwise, and retries with backoff
//! until that server runs it. Names are resolved again every `[haproxy] resolve_every`; a
//! changed address is a new plan. A rendering that fails is logged and nothing is applied; a
//! configuration that fails validation never replaces a live one.
//!
//! [`WaitDrained`] lets the launcher wait, before it terminates an instance, until every
//! HAProxy server has taken the host out of rotation and its last session has ended (or the
//! time given is up).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, Recipient, ResponseFuture,
    WrapFuture,
};
use slog::{error, info, o, warn, Logger};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::decider::BalancerLoad;
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

/// Each HAProxy server's state, and why its runtime API cannot be used when it cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerView {
    pub status: ServerStatus,
    /// Why changes to this server are reloads instead of runtime changes (None: they are not).
    pub runtime_unavailable: Option<String>,
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
    runtime_unavailable: BTreeMap<String, String>,
    /// The host list to plan next (a change not applied yet).
    pending: Option<Arc<Vec<Host>>>,
    /// The last host list planned, resolved again every resolve_every.
    current: Option<Arc<Vec<Host>>>,
    /// The addresses of the hosts registered by name, as last resolved.
    addresses: BTreeMap<String, IpAddr>,
    /// Names that did not resolve, as last logged.
    unresolved: BTreeMap<String, String>,
    resolving: bool,
    scheduled: bool,
    waiters: Vec<Waiter>,
    /// Who hears each server's backend load (the decider, when a HAProxy signal is on).
    load_to: Option<Recipient<BalancerLoad>>,
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
            runtime_unavailable: BTreeMap::new(),
            pending: None,
            current: None,
            addresses: BTreeMap::new(),
            unresolved: BTreeMap::new(),
            resolving: false,
            scheduled: false,
            waiters: Vec::new(),
            load_to: None,
            metrics: Arc::default(),
            log: log.new(o!("actor" => "HaproxyWriter")),
        }
    }

    /// Counts applies in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> HaproxyWriter {
        self.metrics = metrics;
        self
    }

    /// Sends each HAProxy server's backend load, as its worker reads it, to `to`.
    pub fn with_load_to(mut self, to: Recipient<BalancerLoad>) -> HaproxyWriter {
        self.load_to = Some(to);
        self
    }

    /// The workers read each server's backend load while `on` is set (shared with the
    /// decider, which sets it when a HAProxy signal is on).
    pub fn with_sampling(mut self, on: Arc<std::sync::atomic::AtomicBool>) -> HaproxyWriter {
        Arc::make_mut(&mut self.settings).sampling = on;
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
        ctx.run_later(self.cfg.haproxy.debounce, |this, ctx| {
            this.scheduled = false;
            this.resolve_then_plan(ctx);
        });
    }

    /// Resolves the names of the pending host list (or, with none pending, of the current one),
    /// then plans and applies it when something changed. One round at a time; a change that
    /// arrives meanwhile is planned after it.
    fn resolve_then_plan(&mut self, ctx: &mut Context<Self>) {
        if self.resolving {
            return;
        }
        let (hosts, changed_list) = match self.pending.take() {
            Some(h) => (h, true),
            None => match &self.current {
                Some(h) => (h.clone(), false),
                None => return,
            },
        };
        let names = crate::adapters::resolve::names(&hosts);
        if names.is_empty() && !changed_list {
            return;
        }
        self.resolving = true;
        let last = self.addresses.clone();
        ctx.spawn(
            async move { crate::adapters::resolve::resolve_all(&names, &last).await }
                .into_actor(self)
                .map(move |resolved, this, ctx| {
                    this.resolving = false;
                    for (name, why) in &resolved.failed {
                        if this.unresolved.get(name) != Some(why) {
                            match resolved.addresses.get(name) {
                                Some(ip) => warn!(this.log, "Host name does not resolve; keeping its last address"; "name" => name, "address" => %ip, "error" => why),
                                None => warn!(this.log, "Host name does not resolve; it is not served until it does"; "name" => name, "error" => why),
                            }
                        }
                    }
                    for name in this.unresolved.keys() {
                        if !resolved.failed.contains_key(name) {
                            info!(this.log, "Host name resolves again"; "name" => name);
                        }
                    }
                    this.unresolved = resolved.failed;
                    let moved = resolved.addresses != this.addresses;
                    if moved && !this.addresses.is_empty() {
                        info!(this.log, "Host addresses changed"; "addresses" => format!("{:?}", resolved.addresses));
                    }
                    this.addresses = resolved.addresses;
                    if changed_list || moved {
                        this.plan_and_apply(hosts);
                    }
                    if this.pending.is_some() {
                        this.resolve_then_plan(ctx);
                    }
                }),
        );
    }

    fn plan_and_apply(&mut self, hosts: Arc<Vec<Host>>) {
        let addresses = &self.addresses;
        let plan = self.template.plan(
            &self.cfg.haproxy,
            &self.cfg.general.hosts_dir,
            &hosts,
            &|n| addresses.get(n).copied(),
        );
        self.current = Some(hosts);
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
        // Names are looked up again now and then: a changed address is a new plan.
        ctx.run_interval(self.cfg.haproxy.resolve_every, |this, ctx| {
            if this.pending.is_none() && !this.scheduled {
                this.resolve_then_plan(ctx);
            }
        });
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
            ServerEvent::Runtime(why) => match why {
                Some(reason) => {
                    self.runtime_unavailable.insert(m.server, reason);
                }
                None => {
                    self.runtime_unavailable.remove(&m.server);
                }
            },
            ServerEvent::Load(sample) => {
                if let Some(to) = &self.load_to {
                    to.do_send(BalancerLoad {
                        server: m.server,
                        sample,
                    });
                }
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

/// The last thing each HAProxy server did, and whether its runtime API can be used.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "BTreeMap<String, ServerView>")]
pub struct GetServerStatus;

impl Handler<GetServerStatus> for HaproxyWriter {
    type Result = actix::MessageResult<GetServerStatus>;

    fn handle(&mut self, _: GetServerStatus, _: &mut Context<Self>) -> Self::Result {
        actix::MessageResult(
            self.status
                .iter()
                .map(|(k, s)| {
                    let view = ServerView {
                        status: s.clone(),
                        runtime_unavailable: self.runtime_unavailable.get(k).cloned(),
                    };
                    (k.clone(), view)
                })
                .collect(),
        )
    }
}
