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
//! **Whose reports count.** The node's forwarded port is reachable by every local user of the
//! node, so a channel proves it comes from the agent before anything it says is used: the
//! master sends a challenge, and the hello must answer it with the report secret
//! ([`crate::report`]). One authenticated channel per node is live; a newer authenticated one
//! (the agent reconnected) replaces it. Channels still proving themselves are few (at most
//! [`MAX_PENDING_CHANNELS`] per node, further ones refused) and short-lived (a hello within
//! [`HELLO_TIMEOUT`]); what they send never reaches NodeStatus or the decider, and their end
//! never marks the node down.
//!
//! **Several masters** (DESIGN). Each master asks every node for a forward of its own
//! `report_port`, and the agent reports to each of them (`[node] other_report_ports`): the
//! node still needs no inbound rule, every master gets the same samples first-hand, and a
//! master's failure costs the others nothing. A single forward relayed between masters
//! would make the leader a relay that must be up for the others to see load; a shared
//! store of samples would put every sample through etcd.
//!
//! Each session is a plain tokio task (russh is tokio-native and `Send`); the actor only starts
//! and aborts them as [`HostsChanged`] arrives. Forwarded channels are handled in-process: no
//! listener is opened on the master. Sessions and host keys are the SSH adapter's business
//! ([`crate::adapters::ssh`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, Recipient};
use russh::client;
use russh::keys::PublicKeyOrCertificate;
use russh::Channel;
use slog::{debug, info, o, warn, Logger};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::messages::{CpuReported, HostsChanged, NodeDown, NodeUp};
use crate::adapters::secret;
use crate::adapters::ssh::{self, HostKeyCheck, SshError, SshSettings};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::hosts::{Host, HostKey};
use crate::metrics::Metrics;
use crate::report::{
    decode, encode, new_nonce, verify_hello, Challenge, ChannelState, DecodeError, Frame,
    LineBuffer, SeqFilter, SeqVerdict,
};

const RETRY_BASE: Duration = Duration::from_secs(1);
/// SSH handshakes in progress at once (each costs key exchange on both ends).
pub const MAX_HANDSHAKES: usize = 32;
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Report channels of one node still waiting for their hello; more are refused.
pub const MAX_PENDING_CHANNELS: usize = 4;
/// How long a new report channel has to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one warning a minute per node about refused report channels.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
/// A session that lasted this long counts as a success: the next failure retries quickly.
const STABLE_SESSION: Duration = Duration::from_secs(60);

/// Why a tunnel could not be set up, or ended.
#[derive(Debug, Error)]
pub enum TunnelError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("report secret: {0}")]
    Secret(#[from] secret::SecretError),
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
    /// The report secret agents must prove they hold; None: reports are not authenticated.
    pub secret: Option<Arc<Vec<u8>>>,
}

impl TunnelSettings {
    /// From the configuration; loads the identity file now so a bad key stops the master at
    /// start rather than failing every session later.
    pub fn from_config(cfg: &Config) -> Result<TunnelSettings, TunnelError> {
        let mut s = TunnelSettings::with_ssh(cfg, Arc::new(SshSettings::from_config(cfg)?));
        s.secret = report_secret(cfg)?;
        Ok(s)
    }

    /// From the configuration, with an SSH identity already loaded.
    pub fn with_ssh(cfg: &Config, ssh: Arc<SshSettings>) -> TunnelSettings {
        TunnelSettings {
            ssh,
            report_port: cfg.node.report_port,
            stale_after: cfg.scaling.stale_after,
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            metrics: Arc::default(),
            secret: None,
        }
    }
}

/// The report secret `cfg` names, read (None when reports are not authenticated).
pub fn report_secret(cfg: &Config) -> Result<Option<Arc<Vec<u8>>>, TunnelError> {
    cfg.node
        .secret_file
        .as_deref()
        .map(|p| secret::read(&secret::location(p)).map(Arc::new))
        .transpose()
        .map_err(TunnelError::from)
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
    let chans = Arc::new(Channels::default());
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    loop {
        let started = Instant::now();
        let result = run_session(&key, ports, &settings, &out, &up, &chans, &log).await;
        // The session's channels went with it.
        *lock(&chans.live) = None;
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
    chans: &Arc<Channels>,
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
        chans: chans.clone(),
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
    chans: Arc<Channels>,
    log: Logger,
}

/// One node's report channels, across its SSH sessions.
#[derive(Default)]
struct Channels {
    filter: Mutex<SeqFilter>,
    /// The live (authenticated) channel.
    live: Mutex<Option<u64>>,
    next: AtomicU64,
    /// Channels open and not authenticated yet.
    pending: AtomicUsize,
    last_refusal_log: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Channels {
    fn is_live(&self, id: u64) -> bool {
        *lock(&self.live) == Some(id)
    }

    /// Whether a refusal should be logged now (at most one per [`REFUSAL_LOG_EVERY`]).
    fn log_refusal(&self) -> bool {
        let mut last = lock(&self.last_refusal_log);
        match *last {
            Some(t) if t.elapsed() < REFUSAL_LOG_EVERY => false,
            _ => {
                *last = Some(Instant::now());
                true
            }
        }
    }
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
        let host = self.key.host.to_string();
        let pending = self.chans.pending.fetch_add(1, Ordering::SeqCst);
        if pending >= MAX_PENDING_CHANNELS {
            self.chans.pending.fetch_sub(1, Ordering::SeqCst);
            self.settings.metrics.channel_refused(&host, "too_many");
            if self.chans.log_refusal() {
                warn!(self.log, "Report channel refused: too many waiting for their hello (someone on the node is connecting to the report port?)";
                    "waiting" => pending, "from" => format!("{originator_address}:{originator_port}"));
            }
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        }
        reply.accept().await;
        let id = self.chans.next.fetch_add(1, Ordering::SeqCst);
        debug!(self.log, "Report channel opened"; "channel" => id, "from" => format!("{originator_address}:{originator_port}"));
        tokio::spawn(read_channel(
            channel,
            id,
            self.key.clone(),
            self.out.clone(),
            self.up.clone(),
            self.chans.clone(),
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
    /// No hello within the time a new channel gets.
    NoHello(Duration),
    /// The hello did not answer the challenge.
    Unauthenticated,
    /// A newer channel of the agent took over.
    Replaced,
    Truncated,
    Io(std::io::Error),
    Bad(DecodeError),
}

impl std::fmt::Display for ChannelEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelEnd::Closed => f.write_str("report channel closed by the node"),
            ChannelEnd::Stale(d) => write!(f, "no report for {}", humantime::format_duration(*d)),
            ChannelEnd::NoHello(d) => {
                write!(f, "no hello within {}", humantime::format_duration(*d))
            }
            ChannelEnd::Unauthenticated => {
                f.write_str("the hello does not prove the report secret")
            }
            ChannelEnd::Replaced => f.write_str("replaced by a newer channel of the agent"),
            ChannelEnd::Truncated => f.write_str("report channel closed in the middle of a frame"),
            ChannelEnd::Io(e) => write!(f, "report channel failed: {e}"),
            ChannelEnd::Bad(e) => write!(f, "bad report frame: {e}"),
        }
    }
}

/// Reads one forwarded channel: a challenge out, a hello that answers it, then samples, until
/// it closes, goes stale, sends something malformed or is replaced by a newer channel of the
/// agent. Only this channel is affected by what arrives on it, and only the live one speaks
/// for the node.
#[allow(clippy::too_many_arguments)]
async fn read_channel(
    channel: Channel<client::Msg>,
    id: u64,
    key: HostKey,
    out: TunnelOutputs,
    up: Arc<AtomicBool>,
    chans: Arc<Channels>,
    settings: Arc<TunnelSettings>,
    log: Logger,
) {
    let (stale_after, metrics) = (settings.stale_after, &settings.metrics);
    let host = key.host.to_string();
    let mut stream = channel.into_stream();
    let nonce = new_nonce();
    let mut lines = LineBuffer::default();
    let mut state = ChannelState::default();
    let mut buf = vec![0u8; 8192];
    // Until its hello is accepted, a channel counts as pending and has HELLO_TIMEOUT.
    let mut authenticated = false;
    let challenge = encode(&Frame::Challenge(Challenge {
        nonce: nonce.clone(),
    }));
    let end = match stream.write_all(challenge.as_bytes()).await {
        Err(e) => ChannelEnd::Io(e),
        Ok(()) => 'read: loop {
            let wait = match authenticated {
                true => stale_after,
                false => HELLO_TIMEOUT.min(stale_after.max(Duration::from_secs(1))),
            };
            let n = match tokio::time::timeout(wait, stream.read(&mut buf)).await {
                Err(_) if !authenticated => break ChannelEnd::NoHello(wait),
                Err(_) => break ChannelEnd::Stale(stale_after),
                Ok(Err(e)) => break ChannelEnd::Io(e),
                Ok(Ok(0)) if lines.pending() > 0 => break ChannelEnd::Truncated,
                Ok(Ok(0)) => break ChannelEnd::Closed,
                Ok(Ok(n)) => n,
            };
            if authenticated && !chans.is_live(id) {
                break ChannelEnd::Replaced;
            }
            let complete = match lines.push(&buf[..n]) {
                Ok(l) => l,
                Err(e) => break ChannelEnd::Bad(e),
            };
            for line in complete {
                match decode(&line).and_then(|f| state.accept(f)) {
                    Err(e) => break 'read ChannelEnd::Bad(e),
                    Ok(Frame::Hello(hello)) => {
                        let proven = settings
                            .secret
                            .as_deref()
                            .is_none_or(|secret| verify_hello(secret, &nonce, &hello));
                        if !proven {
                            break 'read ChannelEnd::Unauthenticated;
                        }
                        authenticated = true;
                        chans.pending.fetch_sub(1, Ordering::SeqCst);
                        // The newest channel of the agent is the live one.
                        let replaced = lock(&chans.live).replace(id);
                        info!(log, "Node up"; "node" => &hello.node, "boot" => hello.boot,
                            "channel" => id, "replaces" => replaced);
                        up.store(true, Ordering::SeqCst);
                        out.up(NodeUp {
                            host: key.clone(),
                            hello,
                        });
                    }
                    Ok(Frame::Cpu(sample)) => {
                        let boot = state.hello().map_or(0, |h| h.boot);
                        let verdict = lock(&chans.filter).check(boot, sample.seq);
                        match verdict {
                            SeqVerdict::New { gap } => {
                                if gap > 0 {
                                    metrics.samples_missing(&host, gap);
                                    debug!(log, "Samples missing"; "count" => gap, "before_seq" => sample.seq);
                                }
                                out.cpu(CpuReported {
                                    host: key.clone(),
                                    sample,
                                });
                            }
                            SeqVerdict::Old => metrics.frame_dropped(&host, "duplicate"),
                        }
                    }
                    // ChannelState refuses a challenge from the node.
                    Ok(Frame::Challenge(_)) => {
                        break 'read ChannelEnd::Bad(DecodeError::UnexpectedChallenge)
                    }
                }
            }
        },
    };
    if !authenticated {
        chans.pending.fetch_sub(1, Ordering::SeqCst);
    }
    match &end {
        ChannelEnd::Bad(_) => metrics.frame_dropped(&host, "malformed"),
        ChannelEnd::Truncated => metrics.frame_dropped(&host, "truncated"),
        ChannelEnd::Unauthenticated => metrics.channel_refused(&host, "unauthenticated"),
        ChannelEnd::NoHello(_) => metrics.channel_refused(&host, "no_hello"),
        _ => {}
    }
    match (&end, authenticated) {
        // What an unproven channel did says nothing about the node: logged sparingly.
        (_, false) => {
            if chans.log_refusal() {
                warn!(log, "Report channel closed before it proved to be the agent's (someone on the node is connecting to the report port, or the node's report secret differs)";
                    "channel" => id, "error" => %end)
            }
        }
        (ChannelEnd::Bad(_) | ChannelEnd::Truncated | ChannelEnd::Io(_), true) => {
            warn!(log, "Closing report channel"; "channel" => id, "error" => %end)
        }
        _ => info!(log, "Report channel ended"; "channel" => id, "reason" => %end),
    }
    drop(stream);
    // Only the live channel's end takes the node down.
    let was_live = {
        let mut live = lock(&chans.live);
        let was = *live == Some(id);
        if was {
            *live = None;
        }
        was
    };
    if was_live && up.swap(false, Ordering::SeqCst) {
        out.down(NodeDown {
            host: key,
            reason: end.to_string(),
        });
    }
}
