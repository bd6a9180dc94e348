//! The launcher (master role): every host the master starts, from the decision to its
//! termination, through one of two provisioners: EC2 ([`ec2`]) or the user's commands
//! ([`command`]).
//!
//! Every step that costs money or moves traffic is recorded first ([`intents`]) and settled by
//! the reconciler ([`reconcile`]) at start and every `reconcile_every`, so that after any crash
//! or API fault each instance is either serving and watched, or terminated — never forgotten,
//! never launched twice:
//!
//! - A launch ([`launch`]): intent → RunInstances (or the scale-up command) → running with a
//!   private IP → SSH host keys into known_hosts and HOST:app_port answering (each host in
//!   parallel) → RegisterHost → intent removed → [`LaunchFinished`]. A launch that fails or
//!   runs out of time terminates what it started and did not register. A master killed
//!   mid-launch resumes the launch from its intent when it starts again.
//! - A drain ([`drain`]): record → DeregisterHost → wait `drain_timeout` → terminate (or the
//!   scale-down command) → known_hosts line removed → record removed; retried with backoff
//!   until it succeeds.
//!
//! Launches, drains and reconciliations run as tokio tasks over shared state; the actor's own
//! state never changes after an await, so no handler needs `AtomicResponse`.

pub mod command;
mod drain;
pub mod ec2;
pub mod intents;
mod launch;
mod reconcile;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, Handler, Message, Recipient};
use slog::{error, o, warn, Logger};
use thiserror::Error;

use self::command::CommandProvisioner;
use self::intents::{now_ms, write_drain, Drain, DrainKey};
use super::decider::{LaunchFinished, Reconciled};
use super::haproxy_writer::WaitDrained;
use super::leadership::Leading;
use super::registry::{DeregisterHost, ListHosts, RegisterHost};
use crate::adapters::ec2::{Ec2Api, Ec2Error, SdkEc2};
use crate::adapters::process::CommandFailed;
use crate::adapters::records::{RecordError, Records};
use crate::config::{Config, ProvisionerKind};
use crate::hosts::Host;
use crate::metrics::Metrics;

pub use launch::health_gate;

/// Allowance for API calls and registration on top of the launch and health timeouts.
pub const LAUNCH_SLACK: Duration = Duration::from_secs(120);
/// How often the reconciler runs (it also runs at start).
pub const DEFAULT_RECONCILE: Duration = Duration::from_secs(30);
/// How often a launch asks EC2 about its instances.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);
/// First delay before an API call or a termination is tried again; it doubles.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(1);

/// Launch `count` instances for decision `decision_id`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct LaunchInstances {
    pub count: u32,
    pub decision_id: String,
}

/// Take a host this autoscaler launched out of service: out of HAProxy now, terminated after
/// `drain_timeout`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct DrainHost {
    pub host: Host,
}

/// Why a launch (or a drain) failed.
#[derive(Debug, Error)]
pub enum LaunchError {
    #[error(transparent)]
    Api(#[from] Ec2Error),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("instances {ids:?} not running with a private IP after {timeout:?}")]
    NotRunning { ids: Vec<String>, timeout: Duration },
    #[error("instance {instance_id} is {state}")]
    Gone { instance_id: String, state: String },
    #[error("{host}:{port} did not accept TCP within {timeout:?}")]
    Unhealthy {
        host: String,
        port: u16,
        timeout: Duration,
    },
    #[error("instance {instance_id} printed no SSH host keys on its console within {timeout:?} (cloud-init's SSH HOST KEY KEYS block; or set [launch] learn_host_keys = false)")]
    NoHostKeys {
        instance_id: String,
        timeout: Duration,
    },
    #[error("cannot update known_hosts {path}: {source}")]
    KnownHosts {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Command(#[from] CommandFailed),
    #[error("registry: {0}")]
    Registry(String),
    #[error("launch did not finish within {0:?}")]
    TimedOut(Duration),
    #[error("this master no longer leads")]
    NotLeader,
}

impl LaunchError {
    /// Whether it says this master no longer leads (a write its lead guarded was refused):
    /// not a failure of the launch, which the next leader resumes.
    pub fn lost_lead(&self) -> bool {
        matches!(
            self,
            LaunchError::NotLeader
                | LaunchError::Record(RecordError::Etcd(
                    crate::adapters::etcd::EtcdError::NotLeader
                ))
        )
    }

    /// Whether the shared store (etcd) could not be reached, or kept changing: worth trying
    /// again while this master leads, and never a reason to undo a launch.
    pub fn store_unavailable(&self) -> bool {
        use crate::adapters::etcd::EtcdError as E;
        matches!(
            self,
            LaunchError::Record(RecordError::Etcd(
                E::Connect { .. } | E::Request(_) | E::Timeout(_) | E::Contended(_)
            ))
        )
    }

    /// What a registry refusal means for a launch: its store's error kept as it is (lost lead,
    /// etcd away), anything else a registry failure.
    fn from_registry(e: crate::adapters::hosts_dir::HostsError) -> LaunchError {
        match e {
            crate::adapters::hosts_dir::HostsError::Etcd(e) => LaunchError::Record(e.into()),
            e => LaunchError::Registry(e.to_string()),
        }
    }
}

/// How new capacity is obtained.
pub enum Provisioner {
    /// EC2 RunInstances / TerminateInstances.
    Ec2(Arc<dyn Ec2Api>),
    /// The user's commands (argv, no shell).
    Command(CommandProvisioner),
}

impl Provisioner {
    /// The provisioner `[launch] launcher` names; the EC2 client is built here.
    pub async fn from_config(cfg: &Config) -> Result<Provisioner, Ec2Error> {
        // Each launch hands its hosts a key derived from the report secret (the user data's
        // {{ report_secret }}, or AUTOSCALER_REPORT_KEY for the scale-up command).
        let secret = match &cfg.node.secret_file {
            Some(p) => Some(
                crate::adapters::secret::read(&crate::adapters::secret::location(p)).map_err(
                    |e| Ec2Error {
                        operation: "RunInstances",
                        message: e.to_string(),
                        retryable: false,
                        not_found: false,
                    },
                )?,
            ),
            None => None,
        };
        Ok(match cfg.launch.launcher {
            ProvisionerKind::Ec2 => Provisioner::Ec2(Arc::new(
                SdkEc2::new(&cfg.aws, &cfg.launch, secret.as_deref()).await?,
            )),
            ProvisionerKind::Command => {
                let mut c = CommandProvisioner::from_config(cfg);
                c.secret = secret;
                Provisioner::Command(c)
            }
        })
    }
}

/// What launches and drains need besides the provisioner.
#[derive(Debug, Clone)]
pub struct LaunchSettings {
    pub state_dir: PathBuf,
    pub app_port: u16,
    pub launch_timeout: Duration,
    pub health_check: bool,
    pub health_timeout: Duration,
    pub learn_host_keys: bool,
    /// The master's known_hosts, and the SSH port launched hosts listen on.
    pub known_hosts: PathBuf,
    pub ssh_port: u16,
    pub drain_timeout: Duration,
    pub reconcile_every: Duration,
    /// Allowance for API calls and registration on top of the launch and health timeouts.
    pub slack: Duration,
    pub poll: Duration,
    pub retry_base: Duration,
}

impl LaunchSettings {
    pub fn from_config(cfg: &Config) -> LaunchSettings {
        LaunchSettings {
            state_dir: cfg.general.state_dir.clone(),
            app_port: cfg.launch.app_port,
            launch_timeout: cfg.launch.launch_timeout,
            health_check: cfg.launch.health_check,
            health_timeout: cfg.launch.health_timeout,
            learn_host_keys: cfg.launch.learn_host_keys,
            known_hosts: cfg.ssh.known_hosts.clone(),
            ssh_port: cfg.ssh.port,
            drain_timeout: cfg.scaling.drain_timeout,
            reconcile_every: DEFAULT_RECONCILE,
            slack: LAUNCH_SLACK,
            poll: DEFAULT_POLL,
            retry_base: DEFAULT_RETRY_BASE,
        }
    }
}

/// Where the launcher's results go.
#[derive(Clone)]
pub struct LauncherOutputs {
    pub register: Recipient<RegisterHost>,
    pub deregister: Recipient<DeregisterHost>,
    pub list: Recipient<ListHosts>,
    pub finished: Recipient<LaunchFinished>,
    pub reconciled: Recipient<Reconciled>,
    /// HAProxy's side of a drain: None waits the whole drain time.
    pub drained: Option<Recipient<WaitDrained>>,
}

/// What this process is working on right now.
#[derive(Debug, Default)]
struct Busy {
    /// Decisions being launched (new or resumed): the reconciler leaves their instances alone.
    launches: HashSet<String>,
    /// Drains whose task runs.
    drains: HashSet<DrainKey>,
    reconciling: bool,
}

/// Whether this master may act, shared with the leadership task: when the lease is lost that
/// task stops every launch, drain and reconciliation through here at once (not through the
/// launcher's mailbox, which may be busy), and each side effect looks here just before it
/// happens.
#[derive(Debug)]
pub struct Acting {
    leading: std::sync::atomic::AtomicBool,
    /// Every task started (launches, drains, reconciliations): aborted when this master stops
    /// leading.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Acting {
    /// A gate that starts leading (one master) or following (several).
    pub fn new(leading: bool) -> Arc<Acting> {
        Arc::new(Acting {
            leading: std::sync::atomic::AtomicBool::new(leading),
            tasks: Mutex::default(),
        })
    }

    pub fn leading(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set(&self, leading: bool) {
        self.leading
            .store(leading, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops acting: every task in progress is aborted, nothing is cleaned up (the records
    /// stay for the next leader). How many were running.
    pub fn stop(&self) -> usize {
        self.set(false);
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let n = tasks.iter().filter(|t| !t.is_finished()).count();
        tasks.drain(..).for_each(|t| t.abort());
        n
    }

    fn register(&self, handle: tokio::task::AbortHandle) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }
}

/// Everything the launcher's tasks share.
struct Inner {
    provisioner: Provisioner,
    settings: LaunchSettings,
    out: LauncherOutputs,
    busy: Mutex<Busy>,
    /// Whether this master leads (always, without `[cluster]`): only the leader acts.
    acting: Arc<Acting>,
    /// Launch intents and drains.
    records: Records,
    metrics: Arc<Metrics>,
    log: Logger,
}

impl Inner {
    fn busy(&self) -> std::sync::MutexGuard<'_, Busy> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn leading(&self) -> bool {
        self.acting.leading()
    }

    /// Ok when this master may carry out a side effect now: it leads, and (several masters)
    /// still holds its lead in etcd. Checked just before each one.
    fn may_act(&self) -> Result<(), LaunchError> {
        let held = match &self.records {
            Records::Etcd { lead, .. } => crate::adapters::etcd::current(lead).is_some(),
            Records::Files(_) => true,
        };
        match self.leading() && held {
            true => Ok(()),
            false => Err(LaunchError::NotLeader),
        }
    }

    /// Runs `f` as a task that stepping down aborts.
    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        self.acting.register(tokio::spawn(f).abort_handle());
    }
}

/// The actor.
pub struct Launcher {
    inner: Arc<Inner>,
}

impl Launcher {
    pub fn new(
        provisioner: Provisioner,
        settings: LaunchSettings,
        out: LauncherOutputs,
        log: &Logger,
    ) -> Launcher {
        Launcher {
            inner: Arc::new(Inner {
                provisioner,
                records: Records::Files(settings.state_dir.clone()),
                settings,
                out,
                busy: Mutex::default(),
                acting: Acting::new(true),
                metrics: Arc::default(),
                log: log.new(o!("actor" => "Launcher")),
            }),
        }
    }

    /// Waits for [`Leading`] before it acts (several masters), and stops at once when the
    /// leadership task stops `acting`. Before the actor starts.
    pub fn following(mut self, acting: Arc<Acting>) -> Launcher {
        acting.set(false);
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.acting = acting;
        }
        self
    }

    /// Keeps its records in `records` (etcd, with several masters). Before the actor starts.
    pub fn with_records(mut self, records: Records) -> Launcher {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.records = records;
        }
        self
    }

    /// Counts launches and terminations in `metrics`. Before the actor starts.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Launcher {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.metrics = metrics;
        }
        self
    }
}

impl Actor for Launcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.inner.leading() {
            self.inner.spawn(reconcile::run(self.inner.clone()));
        }
        ctx.run_interval(self.inner.settings.reconcile_every, |this, _| {
            if this.inner.leading() {
                this.inner.spawn(reconcile::run(this.inner.clone()));
            }
        });
    }
}

impl Handler<Leading> for Launcher {
    type Result = ();

    fn handle(&mut self, msg: Leading, _: &mut Context<Self>) {
        let inner = &self.inner;
        match msg.0 {
            // The records say what the last leader left in flight: reconcile resumes it.
            true => {
                inner.acting.set(true);
                inner.spawn(reconcile::run(inner.clone()));
            }
            false => {
                // The leadership task has stopped the tasks already (see Acting); this is
                // the bookkeeping.
                let n = inner.acting.stop();
                let mut busy = inner.busy();
                busy.launches.clear();
                busy.drains.clear();
                busy.reconciling = false;
                if n > 0 {
                    warn!(inner.log, "Not leading: launches and drains in progress stopped (the next leader resumes them from their records)"; "tasks" => n);
                }
            }
        }
    }
}

impl Handler<LaunchInstances> for Launcher {
    type Result = ();

    fn handle(&mut self, msg: LaunchInstances, _: &mut Context<Self>) {
        if !self.inner.leading() {
            warn!(self.inner.log, "Launch asked while not leading; ignored"; "decision" => &msg.decision_id);
            return;
        }
        self.inner.busy().launches.insert(msg.decision_id.clone());
        self.inner.spawn(launch::run(
            self.inner.clone(),
            msg.decision_id,
            msg.count,
            None,
        ));
    }
}

impl Handler<DrainHost> for Launcher {
    type Result = ();

    fn handle(&mut self, msg: DrainHost, _: &mut Context<Self>) {
        if !self.inner.leading() {
            warn!(self.inner.log, "Drain asked while not leading; ignored"; "host" => %msg.host.host);
            return;
        }
        let now = now_ms();
        let d = Drain {
            instance_id: msg.host.instance_id.clone(),
            host: Some(msg.host),
            since_ms: now,
            deadline_ms: now + self.inner.settings.drain_timeout.as_millis() as u64,
        };
        // Recorded before anything moves: a master killed from here on finishes the drain
        // when it starts again.
        let inner = self.inner.clone();
        self.inner.spawn(async move {
            match write_drain(&inner.records, &d).await {
                Ok(()) => drain::start(&inner, d),
                Err(e) => {
                    error!(inner.log, "Cannot record the drain; the host stays in service"; "host" => d.name(), "error" => %e)
                }
            }
        });
    }
}
