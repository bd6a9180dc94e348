//! The launcher (master role): turns [`LaunchInstances`] into registered hosts and
//! [`TerminateInstance`] into terminated ones, through one of two provisioners: EC2
//! ([`ec2`]) or the user's commands ([`command`]).
//!
//! A launch: the intent (decision id, count, time) is written to `state_dir/intents/` first
//! ([`intents`]); then the provisioner starts the hosts (EC2: RunInstances with ClientToken =
//! decision id and the group/decision tags, then wait until they run with a private IP);
//! optionally wait until HOST:app_port accepts TCP; then RegisterHost (hosts.d records the
//! instance id and that autoscaler launched them), remove the intent, and report
//! [`LaunchFinished`]. A master killed at any point finds its instances by tag on restart (the
//! launcher reconciles when it starts) and adopts them instead of launching again. Each launch
//! runs as its own tokio task: the actor's state never changes after an await, so no handler
//! needs `AtomicResponse`.

pub mod command;
pub mod ec2;
pub mod intents;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, Message, Recipient};
use slog::{info, o, warn, Logger};
use thiserror::Error;

use self::command::CommandProvisioner;
use self::intents::{now_ms, write_intent, Intent};
use super::decider::LaunchFinished;
use super::registry::{DeregisterHost, ListHosts, RegisterHost};
use crate::adapters::ec2::{Ec2Api, Ec2Error, SdkEc2};
use crate::adapters::process::CommandFailed;
use crate::config::{Config, ProvisionerKind};
use crate::hosts::{Host, HostKey};

/// Allowance for API calls and registration on top of the launch and health timeouts.
const LAUNCH_SLACK: Duration = Duration::from_secs(120);

/// Launch `count` instances for decision `decision_id`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct LaunchInstances {
    pub count: u32,
    pub decision_id: String,
}

/// Terminate a host this autoscaler launched (after it was drained).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct TerminateInstance {
    pub host: Host,
}

/// Why a launch failed.
#[derive(Debug, Error)]
pub enum LaunchError {
    #[error(transparent)]
    Api(#[from] Ec2Error),
    #[error("cannot write launch intent {path}: {source}")]
    Intent {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("instances {ids:?} not running with a private IP after {timeout:?}")]
    NotRunning { ids: Vec<String>, timeout: Duration },
    #[error("{host}:{port} did not accept TCP within {timeout:?}")]
    Unhealthy {
        host: String,
        port: u16,
        timeout: Duration,
    },
    #[error(transparent)]
    Command(#[from] CommandFailed),
    #[error("registry: {0}")]
    Registry(String),
    #[error("launch did not finish within {0:?}")]
    TimedOut(Duration),
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
        Ok(match cfg.launch.launcher {
            ProvisionerKind::Ec2 => {
                Provisioner::Ec2(Arc::new(SdkEc2::new(&cfg.aws, &cfg.launch).await?))
            }
            ProvisionerKind::Command => Provisioner::Command(CommandProvisioner {
                up: cfg.launch.scale_up_command.clone(),
                down: cfg.launch.scale_down_command.clone(),
                timeout: cfg.launch.command_timeout,
            }),
        })
    }

    /// Longest the provisioner itself may take for one launch.
    fn provision_timeout(&self, settings: &LaunchSettings) -> Duration {
        match self {
            Provisioner::Command(c) => c.timeout,
            Provisioner::Ec2(_) => settings.launch_timeout,
        }
    }

    async fn terminate(&self, h: &Host) -> Result<(), LaunchError> {
        match (self, &h.instance_id) {
            (Provisioner::Ec2(api), Some(id)) => Ok(api.terminate(id).await?),
            (Provisioner::Ec2(_), None) => Err(LaunchError::Registry(format!(
                "{} has no instance id",
                h.key()
            ))),
            (Provisioner::Command(c), _) => c.terminate(h).await,
        }
    }
}

/// What a launch needs besides the provisioner.
#[derive(Debug, Clone)]
pub struct LaunchSettings {
    pub state_dir: PathBuf,
    pub app_port: u16,
    pub launch_timeout: Duration,
    pub health_check: bool,
    pub health_timeout: Duration,
}

impl LaunchSettings {
    pub fn from_config(cfg: &Config) -> LaunchSettings {
        LaunchSettings {
            state_dir: cfg.general.state_dir.clone(),
            app_port: cfg.launch.app_port,
            launch_timeout: cfg.launch.launch_timeout,
            health_check: cfg.launch.health_check,
            health_timeout: cfg.launch.health_timeout,
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
}

/// The actor.
pub struct Launcher {
    provisioner: Arc<Provisioner>,
    settings: Arc<LaunchSettings>,
    out: LauncherOutputs,
    /// Decisions being launched by this process: reconciliation leaves their instances alone.
    in_progress: Arc<Mutex<HashSet<String>>>,
    log: Logger,
}

impl Launcher {
    pub fn new(
        provisioner: Provisioner,
        settings: LaunchSettings,
        out: LauncherOutputs,
        log: &Logger,
    ) -> Launcher {
        Launcher {
            provisioner: Arc::new(provisioner),
            settings: Arc::new(settings),
            out,
            in_progress: Arc::default(),
            log: log.new(o!("actor" => "Launcher")),
        }
    }
}

impl Actor for Launcher {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        if let Provisioner::Ec2(api) = &*self.provisioner {
            let (api, settings, out, log) = (
                api.clone(),
                self.settings.clone(),
                self.out.clone(),
                self.log.clone(),
            );
            let busy = self.in_progress.clone();
            tokio::spawn(async move {
                if let Err(e) = ec2::reconcile(&*api, &settings, &out, &busy, &log).await {
                    warn!(log, "Reconciliation with EC2 failed; will not adopt or clean up until restart"; "error" => %e);
                }
            });
        }
    }
}

impl Handler<LaunchInstances> for Launcher {
    type Result = ();

    fn handle(&mut self, msg: LaunchInstances, _: &mut Context<Self>) {
        let (provisioner, settings, out, log) = (
            self.provisioner.clone(),
            self.settings.clone(),
            self.out.clone(),
            self.log.clone(),
        );
        let busy = self.in_progress.clone();
        if let Ok(mut b) = busy.lock() {
            b.insert(msg.decision_id.clone());
        }
        tokio::spawn(async move {
            let log = log.new(o!("decision" => msg.decision_id.clone()));
            info!(log, "Launching"; "count" => msg.count);
            // Every step is bounded on its own; this bounds the whole, so a hung API call can
            // never leave the decider counting a launch in flight forever.
            let limit =
                provisioner.provision_timeout(&settings) + settings.health_timeout + LAUNCH_SLACK;
            let result = match tokio::time::timeout(
                limit,
                launch(&provisioner, &settings, &out, &msg, &log),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err((vec![], LaunchError::TimedOut(limit))),
            };
            let (registered, error) = match result {
                Ok(keys) => {
                    info!(log, "Launch finished"; "registered" => keys.len());
                    (keys, None)
                }
                Err((keys, e)) => {
                    warn!(log, "Launch failed"; "error" => %e, "registered" => keys.len());
                    (keys, Some(e.to_string()))
                }
            };
            if let Ok(mut b) = busy.lock() {
                b.remove(&msg.decision_id);
            }
            out.finished.do_send(LaunchFinished {
                decision_id: msg.decision_id,
                requested: msg.count,
                registered,
                error,
            });
        });
    }
}

impl Handler<TerminateInstance> for Launcher {
    type Result = ();

    fn handle(&mut self, msg: TerminateInstance, _: &mut Context<Self>) {
        let (provisioner, log) = (self.provisioner.clone(), self.log.clone());
        tokio::spawn(async move {
            let h = &msg.host;
            match provisioner.terminate(h).await {
                Ok(()) => {
                    info!(log, "Terminated"; "host" => %h.host, "port" => h.port, "instance_id" => h.instance_id.as_deref().unwrap_or(""))
                }
                Err(e) => {
                    warn!(log, "Terminate failed"; "host" => %h.host, "port" => h.port, "error" => %e)
                }
            }
        });
    }
}

type Partial = (Vec<HostKey>, LaunchError);

async fn launch(
    provisioner: &Provisioner,
    settings: &LaunchSettings,
    out: &LauncherOutputs,
    msg: &LaunchInstances,
    log: &Logger,
) -> Result<Vec<HostKey>, Partial> {
    let intent = Intent {
        decision_id: msg.decision_id.clone(),
        count: msg.count,
        at_ms: now_ms(),
    };
    let intent_path = write_intent(&settings.state_dir, &intent).map_err(|e| (vec![], e))?;
    let mut created = Vec::new();
    let mut registered = Vec::new();
    let result = launch_steps(
        provisioner,
        settings,
        out,
        msg,
        log,
        &mut created,
        &mut registered,
    )
    .await;
    if let (Err(e), Provisioner::Ec2(api)) = (&result, provisioner) {
        ec2::terminate_unregistered(&**api, &created, &registered, e, log).await;
    }
    // The launch is settled either way; a restart reconciles by tag, not by intent.
    let _ = std::fs::remove_file(&intent_path);
    let keys = registered.iter().map(Host::key).collect();
    match result {
        Ok(()) => Ok(keys),
        Err(e) => Err((keys, e)),
    }
}

async fn launch_steps(
    provisioner: &Provisioner,
    settings: &LaunchSettings,
    out: &LauncherOutputs,
    msg: &LaunchInstances,
    log: &Logger,
    created: &mut Vec<String>,
    registered: &mut Vec<Host>,
) -> Result<(), LaunchError> {
    let hosts = match provisioner {
        Provisioner::Ec2(api) => ec2::provision(&**api, settings, msg, log, created).await?,
        Provisioner::Command(c) => c.provision(msg).await?,
    };
    for h in hosts {
        if settings.health_check {
            health_gate(&h.host.to_string(), h.port, settings.health_timeout).await?;
        }
        match out.register.send(RegisterHost(h.clone())).await {
            Ok(Ok(_)) => registered.push(h),
            Ok(Err(e)) => return Err(LaunchError::Registry(e.to_string())),
            Err(e) => return Err(LaunchError::Registry(e.to_string())),
        }
    }
    Ok(())
}

/// Waits until `host:port` accepts a TCP connection.
pub async fn health_gate(host: &str, port: u16, timeout: Duration) -> Result<(), LaunchError> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect((host, port)),
        )
        .await;
        if let Ok(Ok(_)) = attempt {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LaunchError::Unhealthy {
                host: host.to_string(),
                port,
                timeout,
            });
        }
        tokio::time::sleep(
            Duration::from_millis(250).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn health_gate_waits_for_a_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        health_gate("127.0.0.1", port, Duration::from_secs(2))
            .await
            .unwrap();
        drop(l);
        let e = health_gate("127.0.0.1", port, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, LaunchError::Unhealthy { .. }), "{e}");
    }
}
