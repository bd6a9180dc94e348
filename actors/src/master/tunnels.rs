//! TunnelManager (master role): one SSH session per registered host, each asking the node's
//! sshd for a remote port forward of 127.0.0.1:report_port back to the master.
//!
//! ```text
//!  node                                   master
//!  ReportLink ──TCP──▶ sshd 127.0.0.1:report_port ══SSH══▶ session task ──▶ channel task
//!                                                          (russh client)   decode frames
//!                                                                           ├─▶ NodeUp / NodeDown
//!                                                                           └─▶ CpuReported
//! ```
//!
//! Each session is a plain tokio task (russh is tokio-native and `Send`); the actor only starts
//! and aborts them as [`HostsChanged`] arrives. Forwarded channels are handled in-process: no
//! listener is opened on the master. Sessions and host keys are the SSH adapter's business
//! ([`crate::adapters::ssh`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, Recipient};
use russh::client;
use russh::keys::PublicKeyOrCertificate;
use russh::Channel;
use slog::{debug, info, o, warn, Logger};
use thiserror::Error;
use tokio::io::AsyncReadExt;

use super::messages::{CpuReported, HostsChanged, NodeDown, NodeUp};
use crate::adapters::ssh::{self, HostKeyCheck, SshError, SshSettings};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::hosts::{Host, HostKey};
use crate::metrics::Metrics;
use crate::report::{decode, ChannelState, DecodeError, Frame, LineBuffer, SeqFilter, SeqVerdict};

const RETRY_BASE: Duration = Duration::from_secs(1);
/// SSH handshakes in progress at once (each costs key exchange on both ends).
pub const MAX_HANDSHAKES: usize = 32;
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A session that lasted this long counts as a success: the next failure retries quickly.
const STABLE_SESSION: Duration = Duration::from_secs(60);

/// Why a tunnel could not be set up, or ended.
#[derive(Debug, Error)]
pub enum TunnelError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("the node refused the forward of 127.0.0.1:{port}: is report_port {port} already in use on the node, or AllowTcpForwarding off? ({message})")]
    ForwardRefused { port: u16, message: String },
}

impl From<russh::Error> for TunnelError {
    fn from(e: russh::Error) -> TunnelError {
        TunnelError::Ssh(SshError::Ssh(e))
    }
}

/// What every session needs, shared.
pub struct TunnelSettings {
    pub ssh: Arc<SshSettings>,
    pub report_port: u16,
    /// A channel that carries no frame for this long is closed and its node marked down.
    pub stale_after: Duration,
    /// SSH handshakes allowed in progress at once, over all hosts.
    pub handshakes: Arc<tokio::sync::Semaphore>,
    /// Reconnects and dropped frames are counted here.
    pub metrics: Arc<Metrics>,
}

impl TunnelSettings {
    /// From the configuration; loads the identity file now so a bad key stops the master at
    /// start rather than failing every session later.
    pub fn from_config(cfg: &Config) -> Result<TunnelSettings, TunnelError> {
        Ok(TunnelSettings::with_ssh(
            cfg,
            Arc::new(SshSettings::from_config(cfg)?),
        ))
    }

    /// From the configuration, with an SSH identity already loaded.
    pub fn with_ssh(cfg: &Config, ssh: Arc<SshSettings>) -> TunnelSettings {
        TunnelSettings {
            ssh,
            report_port: cfg.node.report_port,
            stale_after: cfg.scaling.stale_after,
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            metrics: Arc::default(),
        }
    }
}

/// Where the tunnels' events go (each to every recipient listed).
#[derive(Clone)]
pub struct TunnelOutputs {
    pub cpu: Vec<Recipient<CpuReported>>,
    pub up: Vec<Recipient<NodeUp>>,
    pub down: Vec<Recipient<NodeDown>>,
}

impl TunnelOutputs {
    fn cpu(&self, m: CpuReported) {
        self.cpu.iter().for_each(|r| r.do_send(m.clone()));
    }
    fn up(&self, m: NodeUp) {
        self.up.iter().for_each(|r| r.do_send(m.clone()));
    }
    fn down(&self, m: NodeDown) {
        self.down.iter().for_each(|r| r.do_send(m.clone()));
    }
}

struct SessionHandle {
    task: tokio::task::JoinHandle<()>,
    /// SSH and report port the session was opened with; a change reopens it.
    ports: (u16, u16),
    up: Arc<AtomicBool>,
}

/// The actor: starts a session task per host, aborts it when the host goes away.
pub struct TunnelManager {
    settings: Arc<TunnelSettings>,
    out: TunnelOutputs,
    sessions: HashMap<HostKey, SessionHandle>,
    log: Logger,
}

impl TunnelManager {
    /// A manager with no sessions until the first [`HostsChanged`].
    pub fn new(settings: TunnelSettings, out: TunnelOutputs, log: &Logger) -> TunnelManager {
        TunnelManager {
            settings: Arc::new(settings),
            out,
            sessions: HashMap::new(),
            log: log.new(o!("actor" => "TunnelManager")),
        }
    }

    /// (SSH port, report port) for a host: its own, or the configured defaults.
    fn ports(&self, h: &Host) -> (u16, u16) {
        (
            h.ssh_port.unwrap_or(self.settings.ssh.default_port),
            h.report_port.unwrap_or(self.settings.report_port),
        )
    }

    fn stop_session(&mut self, key: &HostKey, reason: &str) {
        if let Some(s) = self.sessions.remove(key) {
            s.task.abort();
            if s.up.swap(false, Ordering::SeqCst) {
                self.out.down(NodeDown {
                    host: key.clone(),
                    reason: reason.to_string(),
                });
            }
        }
    }
}

impl Actor for TunnelManager {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Context<Self>) {
        let keys: Vec<HostKey> = self.sessions.keys().cloned().collect();
        for k in keys {
            self.stop_session(&k, "master stopping");
        }
    }
}

impl Handler<HostsChanged> for TunnelManager {
    type Result = ();

    fn handle(&mut self, msg: HostsChanged, _: &mut Context<Self>) {
        let wanted: HashMap<HostKey, &Host> = msg.hosts.iter().map(|h| (h.key(), h)).collect();
        let gone: Vec<HostKey> = self
            .sessions
            .iter()
            .filter(|(k, s)| wanted.get(*k).is_none_or(|h| self.ports(h) != s.ports))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            info!(self.log, "Closing tunnel"; "host" => %k.host, "port" => k.port);
            self.stop_session(&k, "removed from the registry");
        }
        for (key, host) in wanted {
            if self.sessions.contains_key(&key) {
                continue;
            }
            let ports = self.ports(host);
            let up = Arc::new(AtomicBool::new(false));
            let log = self.log.new(
                o!("host" => key.host.to_string(), "app_port" => key.port, "ssh_port" => ports.0),
            );
            info!(log, "Opening tunnel");
            let task = tokio::spawn(session_loop(
                key.clone(),
                ports,
                self.settings.clone(),
                self.out.clone(),
                up.clone(),
                log,
            ));
            self.sessions.insert(key, SessionHandle { task, ports, up });
        }
    }
}

/// Connects, forwards, waits for the session to end, retries with backoff; forever, until
/// aborted by the actor.
async fn session_loop(
    key: HostKey,
    ports: (u16, u16),
    settings: Arc<TunnelSettings>,
    out: TunnelOutputs,
    up: Arc<AtomicBool>,
    log: Logger,
) {
    let filter = Arc::new(Mutex::new(SeqFilter::default()));
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    loop {
        let started = Instant::now();
        let result = run_session(&key, ports, &settings, &out, &up, &filter, &log).await;
        let reason = match &result {
            Ok(()) => "SSH session closed".to_string(),
            Err(e) => e.to_string(),
        };
        if up.swap(false, Ordering::SeqCst) {
            out.down(NodeDown {
                host: key.clone(),
                reason: reason.clone(),
            });
        }
        if started.elapsed() >= STABLE_SESSION {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        settings.metrics.ssh_reconnect(&key.host.to_string());
        warn!(log, "Tunnel down; retrying"; "error" => reason, "attempt" => backoff.attempts(),
            "retry_in" => %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)));
        tokio::time::sleep(delay).await;
    }
}

async fn run_session(
    key: &HostKey,
    (ssh_port, report_port): (u16, u16),
    settings: &Arc<TunnelSettings>,
    out: &TunnelOutputs,
    up: &Arc<AtomicBool>,
    filter: &Arc<Mutex<SeqFilter>>,
    log: &Logger,
) -> Result<(), TunnelError> {
    let host = key.host.to_string();
    let check = HostKeyCheck::new(&settings.ssh, &host, ssh_port, log);
    let handler = Client {
        key: key.clone(),
        check: check.clone(),
        settings: settings.clone(),
        out: out.clone(),
        up: up.clone(),
        filter: filter.clone(),
        log: log.clone(),
    };
    let setup = async {
        let handle = ssh::connect(&settings.ssh, &host, ssh_port, &check, handler).await?;
        handle
            .tcpip_forward("127.0.0.1", u32::from(report_port))
            .await
            .map_err(|e| TunnelError::ForwardRefused {
                port: report_port,
                message: e.to_string(),
            })?;
        Ok::<_, TunnelError>(handle)
    };
    // Bound the handshakes in progress, so a master (re)starting with thousands of nodes does
    // not time them all out at once; the connect timeout counts from when this one may start.
    let permit = settings.handshakes.acquire().await;
    let timeout = settings.ssh.connect_timeout;
    let mut handle = tokio::time::timeout(timeout, setup)
        .await
        .map_err(|_| SshError::ConnectTimeout(timeout))??;
    drop(permit);
    info!(log, "Tunnel up"; "forward" => format!("127.0.0.1:{report_port}"));
    (&mut handle).await?;
    Ok(())
}

/// russh's callbacks for one session.
struct Client {
    key: HostKey,
    check: HostKeyCheck,
    settings: Arc<TunnelSettings>,
    out: TunnelOutputs,
    up: Arc<AtomicBool>,
    filter: Arc<Mutex<SeqFilter>>,
    log: Logger,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(self.check.check(server_key))
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<client::Msg>,
        _connected_address: &str,
        _connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        debug!(self.log, "Report channel opened"; "from" => format!("{originator_address}:{originator_port}"));
        tokio::spawn(read_channel(
            channel,
            self.key.clone(),
            self.out.clone(),
            self.up.clone(),
            self.filter.clone(),
            self.settings.clone(),
            self.log.clone(),
        ));
        Ok(())
    }
}

/// Why a report channel ended.
#[derive(Debug)]
enum ChannelEnd {
    Closed,
    Stale(Duration),
    Truncated,
    Io(std::io::Error),
    Bad(DecodeError),
}

impl std::fmt::Display for ChannelEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelEnd::Closed => f.write_str("report channel closed by the node"),
            ChannelEnd::Stale(d) => write!(f, "no report for {}", humantime::format_duration(*d)),
            ChannelEnd::Truncated => f.write_str("report channel closed in the middle of a frame"),
            ChannelEnd::Io(e) => write!(f, "report channel failed: {e}"),
            ChannelEnd::Bad(e) => write!(f, "bad report frame: {e}"),
        }
    }
}

/// Reads one forwarded channel: a hello, then samples, until it closes, goes stale or sends
/// something malformed. Only this channel is affected by what arrives on it.
async fn read_channel(
    channel: Channel<client::Msg>,
    key: HostKey,
    out: TunnelOutputs,
    up: Arc<AtomicBool>,
    filter: Arc<Mutex<SeqFilter>>,
    settings: Arc<TunnelSettings>,
    log: Logger,
) {
    let (stale_after, metrics) = (settings.stale_after, &settings.metrics);
    let host = key.host.to_string();
    let mut stream = channel.into_stream();
    let mut lines = LineBuffer::default();
    let mut state = ChannelState::default();
    let mut buf = vec![0u8; 8192];
    let end = 'read: loop {
        let n = match tokio::time::timeout(stale_after, stream.read(&mut buf)).await {
            Err(_) => break ChannelEnd::Stale(stale_after),
            Ok(Err(e)) => break ChannelEnd::Io(e),
            Ok(Ok(0)) if lines.pending() > 0 => break ChannelEnd::Truncated,
            Ok(Ok(0)) => break ChannelEnd::Closed,
            Ok(Ok(n)) => n,
        };
        let complete = match lines.push(&buf[..n]) {
            Ok(l) => l,
            Err(e) => break ChannelEnd::Bad(e),
        };
        for line in complete {
            match decode(&line).and_then(|f| state.accept(f)) {
                Err(e) => break 'read ChannelEnd::Bad(e),
                Ok(Frame::Hello(hello)) => {
                    info!(log, "Node up"; "node" => &hello.node, "boot" => hello.boot);
                    up.store(true, Ordering::SeqCst);
                    out.up(NodeUp {
                        host: key.clone(),
                        hello,
                    });
                }
                Ok(Frame::Cpu(sample)) => {
                    let boot = state.hello().map_or(0, |h| h.boot);
                    let verdict = filter.lock().map(|mut f| f.check(boot, sample.seq));
                    match verdict {
                        Ok(SeqVerdict::New { gap }) => {
                            if gap > 0 {
                                metrics.samples_missing(&host, gap);
                                debug!(log, "Samples missing"; "count" => gap, "before_seq" => sample.seq);
                            }
                            out.cpu(CpuReported {
                                host: key.clone(),
                                sample,
                            });
                        }
                        Ok(SeqVerdict::Old) => metrics.frame_dropped(&host, "duplicate"),
                        Err(_) => {}
                    }
                }
            }
        }
    };
    match &end {
        ChannelEnd::Bad(_) => metrics.frame_dropped(&host, "malformed"),
        ChannelEnd::Truncated => metrics.frame_dropped(&host, "truncated"),
        _ => {}
    }
    match &end {
        ChannelEnd::Bad(_) | ChannelEnd::Truncated | ChannelEnd::Io(_) => {
            warn!(log, "Closing report channel"; "error" => %end)
        }
        ChannelEnd::Closed | ChannelEnd::Stale(_) => {
            info!(log, "Report channel ended"; "reason" => %end)
        }
    }
    drop(stream);
    if up.swap(false, Ordering::SeqCst) {
        out.down(NodeDown {
            host: key,
            reason: end.to_string(),
        });
    }
}
