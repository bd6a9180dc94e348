//! Ec2Launcher (master role): turns [`LaunchInstances`] into registered hosts and
//! [`TerminateInstance`] into terminated ones, through EC2 ([`Ec2Api`]) or the user's commands.
//!
//! A launch: the intent (decision id, count, time) is written to `state_dir/intents/` first;
//! then RunInstances with ClientToken = decision id and the group/decision tags; wait until the
//! instances run and have a private IP; optionally wait until HOST:app_port accepts TCP; then
//! RegisterHost (hosts.d records the instance id and that autoscaler launched it), remove the
//! intent, and report [`LaunchFinished`]. A master killed at any point finds its instances by
//! tag on restart ([`Ec2Launcher`] reconciles when it starts) and adopts them instead of
//! launching again. Each launch runs as its own tokio task: the actor's state never changes
//! after an await, so no handler needs `AtomicResponse`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::{Actor, Context, Handler, Message, Recipient};
use serde::{Deserialize, Serialize};
use slog::{info, o, warn, Logger};
use thiserror::Error;

use crate::command::{self, CommandFailed};
use crate::config::{CommandLine, Config, Launcher};
use crate::ec2_api::{Ec2Api, Ec2Error};
use crate::fsutil;
use crate::host_registry::{DeregisterHost, ListHosts, RegisterHost};
use crate::hosts::{parse_port, validate_instance_id, Host, HostKey, HostName, Origin};

/// How often a launch in progress asks EC2 whether its instances are running.
const POLL: Duration = Duration::from_secs(2);
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

/// A launch ended: what was registered, or why not.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct LaunchFinished {
    pub decision_id: String,
    pub requested: u32,
    pub registered: Vec<HostKey>,
    pub error: Option<String>,
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
pub enum Backend {
    /// EC2 RunInstances / TerminateInstances.
    Ec2(Arc<dyn Ec2Api>),
    /// The user's commands (argv, no shell).
    Command {
        up: CommandLine,
        down: CommandLine,
        timeout: Duration,
    },
}

/// What a launch needs besides the backend.
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

impl Backend {
    /// The backend `[launch] launcher` names; the EC2 client is built here.
    pub async fn from_config(cfg: &Config) -> Result<Backend, Ec2Error> {
        Ok(match cfg.launch.launcher {
            Launcher::Ec2 => Backend::Ec2(Arc::new(
                crate::ec2_api::SdkEc2::new(&cfg.aws, &cfg.launch).await?,
            )),
            Launcher::Command => Backend::Command {
                up: cfg.launch.scale_up_command.clone(),
                down: cfg.launch.scale_down_command.clone(),
                timeout: cfg.launch.command_timeout,
            },
        })
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
pub struct Ec2Launcher {
    backend: Arc<Backend>,
    settings: Arc<LaunchSettings>,
    out: LauncherOutputs,
    /// Decisions being launched by this process: reconciliation leaves their instances alone.
    in_progress: Arc<Mutex<HashSet<String>>>,
    log: Logger,
}

impl Ec2Launcher {
    pub fn new(
        backend: Backend,
        settings: LaunchSettings,
        out: LauncherOutputs,
        log: &Logger,
    ) -> Ec2Launcher {
        Ec2Launcher {
            backend: Arc::new(backend),
            settings: Arc::new(settings),
            out,
            in_progress: Arc::default(),
            log: log.new(o!("actor" => "Ec2Launcher")),
        }
    }
}

impl Actor for Ec2Launcher {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        if let Backend::Ec2(api) = &*self.backend {
            let (api, settings, out, log) = (
                api.clone(),
                self.settings.clone(),
                self.out.clone(),
                self.log.clone(),
            );
            let busy = self.in_progress.clone();
            tokio::spawn(async move {
                if let Err(e) = reconcile(&*api, &settings, &out, &busy, &log).await {
                    warn!(log, "Reconciliation with EC2 failed; will not adopt or clean up until restart"; "error" => %e);
                }
            });
        }
    }
}

impl Handler<LaunchInstances> for Ec2Launcher {
    type Result = ();

    fn handle(&mut self, msg: LaunchInstances, _: &mut Context<Self>) {
        let (backend, settings, out, log) = (
            self.backend.clone(),
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
            let base = match &*backend {
                Backend::Command { timeout, .. } => *timeout,
                Backend::Ec2(_) => settings.launch_timeout,
            };
            let limit = base + settings.health_timeout + LAUNCH_SLACK;
            let result =
                match tokio::time::timeout(limit, launch(&backend, &settings, &out, &msg, &log))
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

impl Handler<TerminateInstance> for Ec2Launcher {
    type Result = ();

    fn handle(&mut self, msg: TerminateInstance, _: &mut Context<Self>) {
        let (backend, log) = (self.backend.clone(), self.log.clone());
        tokio::spawn(async move {
            let h = &msg.host;
            let result = match (&*backend, &h.instance_id) {
                (Backend::Ec2(api), Some(id)) => api.terminate(id).await.map_err(LaunchError::from),
                (Backend::Ec2(_), None) => Err(LaunchError::Registry(format!(
                    "{} has no instance id",
                    h.key()
                ))),
                (Backend::Command { down, .. }, _) if down.is_empty() => Ok(()),
                (Backend::Command { down, timeout, .. }, id) => {
                    let env = [
                        ("AUTOSCALER_HOST", h.host.to_string()),
                        ("AUTOSCALER_PORT", h.port.to_string()),
                        ("AUTOSCALER_INSTANCE_ID", id.clone().unwrap_or_default()),
                    ];
                    command::run(down, &env, *timeout)
                        .await
                        .map(|_| ())
                        .map_err(LaunchError::from)
                }
            };
            match result {
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

/// A launch intent on disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Intent {
    pub decision_id: String,
    pub count: u32,
    pub at_ms: u64,
}

fn intents_dir(state: &Path) -> PathBuf {
    state.join("intents")
}

fn write_intent(state: &Path, i: &Intent) -> Result<PathBuf, LaunchError> {
    let dir = intents_dir(state);
    let path = dir.join(format!("{}.json", i.decision_id));
    let write = || -> std::io::Result<()> {
        fsutil::create_dir_all(&dir, 0o700)?;
        fsutil::atomic_write(
            &path,
            serde_json::to_string(i).unwrap_or_default().as_bytes(),
            0o600,
        )
    };
    write().map_err(|source| LaunchError::Intent {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Every intent left in the state directory (a launch that did not finish).
pub fn pending_intents(state: &Path) -> Vec<(PathBuf, Intent)> {
    let Ok(entries) = std::fs::read_dir(intents_dir(state)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            Some((e.path(), serde_json::from_str(&text).ok()?))
        })
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

type Partial = (Vec<HostKey>, LaunchError);

async fn launch(
    backend: &Backend,
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
        backend,
        settings,
        out,
        msg,
        log,
        &mut created,
        &mut registered,
    )
    .await;
    if let (Err(e), Backend::Ec2(api)) = (&result, backend) {
        // Instances that will never be registered cost money and serve nobody.
        for h in created.iter().filter(|id| {
            !registered
                .iter()
                .any(|r: &Host| r.instance_id.as_ref() == Some(*id))
        }) {
            match api.terminate(h).await {
                Ok(()) => {
                    info!(log, "Terminated instance of a failed launch"; "instance_id" => h, "cause" => %e)
                }
                Err(t) => {
                    warn!(log, "Cannot terminate instance of a failed launch; the next start adopts it"; "instance_id" => h, "error" => %t)
                }
            }
        }
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
    backend: &Backend,
    settings: &LaunchSettings,
    out: &LauncherOutputs,
    msg: &LaunchInstances,
    log: &Logger,
    created: &mut Vec<String>,
    registered: &mut Vec<Host>,
) -> Result<(), LaunchError> {
    let hosts = match backend {
        Backend::Ec2(api) => {
            let launched = api.run_instances(msg.count, &msg.decision_id).await?;
            created.extend(launched.iter().map(|i| i.instance_id.clone()));
            info!(log, "RunInstances accepted"; "instances" => created.join(","));
            let running =
                wait_running(&**api, &msg.decision_id, created, settings.launch_timeout).await?;
            running
                .into_iter()
                .filter_map(|i| {
                    Some(Host {
                        host: HostName::parse(i.private_ip.as_deref()?).ok()?,
                        port: settings.app_port,
                        ssh_port: None,
                        report_port: None,
                        instance_id: Some(i.instance_id),
                        origin: Origin::Launched,
                    })
                })
                .collect::<Vec<_>>()
        }
        Backend::Command { up, timeout, .. } => {
            let env = [
                ("AUTOSCALER_DECISION", msg.decision_id.clone()),
                ("AUTOSCALER_COUNT", msg.count.to_string()),
            ];
            let stdout = command::run(up, &env, *timeout).await?;
            parse_launched(&stdout).map_err(|message| CommandFailed {
                command: up.to_string(),
                message,
            })?
        }
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

/// Polls until every instance of `ids` runs with a private IP.
async fn wait_running(
    api: &dyn Ec2Api,
    decision: &str,
    ids: &[String],
    timeout: Duration,
) -> Result<Vec<crate::ec2_api::InstanceInfo>, LaunchError> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = api.describe(Some(decision)).await?;
        let ready: Vec<_> = found
            .into_iter()
            .filter(|i| {
                ids.contains(&i.instance_id) && i.state == "running" && i.private_ip.is_some()
            })
            .collect();
        if ready.len() == ids.len() {
            return Ok(ready);
        }
        if Instant::now() + POLL > deadline {
            return Err(LaunchError::NotRunning {
                ids: ids.to_vec(),
                timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LaunchedJson {
    host: String,
    port: serde_json::Value,
    #[serde(default)]
    instance_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(LaunchedJson),
    Many(Vec<LaunchedJson>),
}

/// Parses a scale-up command's output: `{"host": …, "port": …, "instance_id": …?}` or an array
/// of those. Every host and port is validated as `add-host` would.
pub fn parse_launched(stdout: &str) -> Result<Vec<Host>, String> {
    let parsed: OneOrMany = serde_json::from_str(stdout.trim()).map_err(|e| {
        format!(
            "expected JSON {{\"host\": …, \"port\": …, \"instance_id\": …}} (or an array of them) on standard output, got {:?} ({e})",
            stdout.chars().take(200).collect::<String>()
        )
    })?;
    let items = match parsed {
        OneOrMany::One(x) => vec![x],
        OneOrMany::Many(v) if v.is_empty() => {
            return Err("printed an empty array: nothing was launched".into())
        }
        OneOrMany::Many(v) => v,
    };
    items
        .into_iter()
        .map(|j| {
            let port = match &j.port {
                serde_json::Value::Number(n) => parse_port(&n.to_string()),
                serde_json::Value::String(s) => parse_port(s),
                other => parse_port(&other.to_string()),
            }
            .map_err(|e| e.to_string())?;
            Ok(Host {
                host: HostName::parse(&j.host).map_err(|e| e.to_string())?,
                port,
                ssh_port: None,
                report_port: None,
                instance_id: j
                    .instance_id
                    .as_deref()
                    .map(validate_instance_id)
                    .transpose()?
                    .map(String::from),
                origin: Origin::Launched,
            })
        })
        .collect()
}

/// After a restart: adopt running instances of the group that hosts.d lacks, remove launched
/// hosts whose instances are gone, and settle every pending intent.
async fn reconcile(
    api: &dyn Ec2Api,
    settings: &LaunchSettings,
    out: &LauncherOutputs,
    busy: &Mutex<HashSet<String>>,
    log: &Logger,
) -> Result<(), LaunchError> {
    let all = api.describe(None).await?;
    // Launches started since this process began are this process's own business: their
    // instances are not adopted here (the launch registers them itself).
    let active = busy.lock().map(|b| b.clone()).unwrap_or_default();
    let adoptable: Vec<_> = all
        .iter()
        .filter(|i| i.decision.as_ref().is_none_or(|d| !active.contains(d)))
        .collect();
    let hosts = out
        .list
        .send(ListHosts)
        .await
        .map_err(|e| LaunchError::Registry(e.to_string()))?;
    for i in adoptable.iter().filter(|i| i.state == "running") {
        let known = hosts
            .iter()
            .any(|h| h.instance_id.as_deref() == Some(i.instance_id.as_str()));
        let Some(ip) = i
            .private_ip
            .as_deref()
            .and_then(|ip| HostName::parse(ip).ok())
        else {
            continue;
        };
        if !known {
            info!(log, "Adopting running instance missing from hosts.d"; "instance_id" => &i.instance_id, "host" => %ip,
                "decision" => i.decision.as_deref().unwrap_or(""));
            let h = Host {
                host: ip,
                port: settings.app_port,
                ssh_port: None,
                report_port: None,
                instance_id: Some(i.instance_id.clone()),
                origin: Origin::Launched,
            };
            if let Ok(Err(e)) = out.register.send(RegisterHost(h)).await {
                warn!(log, "Cannot adopt instance"; "instance_id" => &i.instance_id, "error" => %e);
            }
        }
    }
    for h in hosts.iter().filter(|h| h.origin == Origin::Launched) {
        let Some(id) = &h.instance_id else { continue };
        let live = all.iter().any(|i| &i.instance_id == id && i.is_live());
        if !live {
            info!(log, "Removing host whose instance is gone"; "instance_id" => id, "host" => %h.host, "port" => h.port);
            let _ = out.deregister.send(DeregisterHost(h.key())).await;
        }
    }
    for (path, intent) in pending_intents(&settings.state_dir) {
        if active.contains(&intent.decision_id) {
            continue;
        }
        let launched = all
            .iter()
            .filter(|i| i.decision.as_deref() == Some(intent.decision_id.as_str()))
            .count();
        if launched > 0 {
            info!(log, "Pending launch found its instances; adopted"; "decision" => &intent.decision_id, "instances" => launched);
        } else {
            info!(log, "Pending launch never reached EC2; dropped (a new decision will launch if still needed)";
                "decision" => &intent.decision_id);
        }
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_command_output() {
        let hs = parse_launched(r#"{"host": "127.0.1.9", "port": 8080, "instance_id": "vm-1"}"#)
            .unwrap();
        assert_eq!(hs.len(), 1);
        assert_eq!(hs[0].host.to_string(), "127.0.1.9");
        assert_eq!(hs[0].origin, Origin::Launched);
        assert_eq!(hs[0].instance_id.as_deref(), Some("vm-1"));
        let hs = parse_launched(
            "[{\"host\":\"a.example\",\"port\":\"80\"},{\"host\":\"::1\",\"port\":81}]\n",
        )
        .unwrap();
        assert_eq!(hs.len(), 2);
        for (bad, want) in [
            ("", "expected JSON"),
            ("OK launched", "expected JSON"),
            ("[]", "empty array"),
            (r#"{"host": "a b", "port": 80}"#, "contains ' '"),
            (r#"{"host": "a", "port": 0}"#, "between 1 and 65535"),
            (
                r#"{"host": "a", "port": 80, "instance_id": "x y"}"#,
                "instance id",
            ),
            (r#"{"host": "a", "port": 80, "extra": 1}"#, "expected JSON"),
            (
                r#"{"host": "a\nserver evil 1.2.3.4:80", "port": 80}"#,
                "contains",
            ),
        ] {
            let e = parse_launched(bad).unwrap_err();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }

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

    #[test]
    fn intents_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let i = Intent {
            decision_id: "d-1".into(),
            count: 2,
            at_ms: 5,
        };
        let p = write_intent(tmp.path(), &i).unwrap();
        assert_eq!(pending_intents(tmp.path()), vec![(p, i)]);
    }
}
