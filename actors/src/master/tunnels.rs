//! TunnelManager (master role): one SSH session per registered host, each asking the node's
//! sshd for a remote forward back to the master: of a Unix socket (`[node] report_socket`,
//! the default: `streamlocal-forward@openssh.com`) or of 127.0.0.1:report_port.
//!
//! ```text
//!  node                                   master
//!  ReportLink ──▶ sshd forward (socket or port) ══SSH══▶ session task (russh client)
//!                                                        └─ Handler::data: MasterChannel
//!                                                           ├─▶ NodeUp / NodeDown
//!                                                           └─▶ samples into Heard
//! ```
//!
//! A report is read where it arrives: in russh's data callback, on the session's own task,
//! with each channel's state beside the session (`Channels`); no task and no queue per
//! channel, so a sample costs no hand-off between tasks. One timer per session ends channels
//! whose hello or next report is overdue.
//!
//! **Whose reports count.** Every channel proves it comes from the agent before anything it
//! says is used, and every sample carries the channel's MAC ([`crate::report`]): the master
//! sends a challenge, the hello must answer it with the report secret (or, for a host a
//! launch started, that launch's key) for this very forward, and the master's welcome proves
//! the secret back. A hello that names another instance than the registered host's is
//! refused. One authenticated channel per node is live; a newer authenticated one (the agent
//! reconnected) replaces it. Channels still proving themselves are few (at most
//! [`MAX_PENDING_CHANNELS`] per node; when full, the one waiting longest is closed to make
//! room) and short-lived ([`HELLO_TIMEOUT`] from the moment they open, however slowly they
//! drip); what they send never reaches NodeStatus or the decider, and their end never marks
//! the node down.
//!
//! **Several masters** (DESIGN). Each master asks every node for a forward of its own
//! (socket name, or `report_port`), and the agent reports to each of them: the node still
//! needs no inbound rule, every master gets the same samples first-hand, and a master's
//! failure costs the others nothing. A single forward relayed between masters would make the
//! leader a relay that must be up for the others to see load; a shared store of samples
//! would put every sample through etcd.
//!
//! Each session is a plain tokio task (russh is tokio-native and `Send`); the actor only starts
//! and aborts them as [`HostsChanged`] arrives. Forwarded channels are handled in-process: no
//! listener is opened on the master. Sessions and host keys are the SSH adapter's business
//! ([`crate::adapters::ssh`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, Recipient};
use russh::client;
use russh::keys::PublicKeyOrCertificate;
use russh::{Channel, ChannelId, ChannelWriteHalf};
use slog::{debug, info, o, warn, Logger};
use thiserror::Error;
use tokio::sync::Notify;

use super::heard::{Feed, Heard};
use super::messages::{HostsChanged, NodeDown, NodeUp, TunnelProblem};
use crate::adapters::secret;
use crate::adapters::ssh::{self, HostKeyCheck, SshError, SshSettings};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::hosts::{Host, HostKey};
use crate::metrics::Metrics;
use crate::report::{
    launch_key, DecodeError, Event, LineBuffer, MasterChannel, SeqFilter, SeqVerdict,
};

const RETRY_BASE: Duration = Duration::from_secs(1);
/// SSH handshakes in progress at once (each costs key exchange on both ends).
pub const MAX_HANDSHAKES: usize = 32;
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Report channels of one node still waiting for their hello; a new one closes the one that
/// has waited longest.
pub const MAX_PENDING_CHANNELS: usize = 4;
/// How long a new report channel has, from the moment it opens, to prove it is the agent's.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one warning a minute per node about refused report channels.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
/// How long a channel this side ended (EOF sent) has to close from the node's side before
/// it is closed from this one. Closed from the node's side, russh forgets the channel; closed
/// from this side first, russh keeps a few KiB of it until the session ends (it drops the
/// node's answering close), so a local user connecting in a loop would grow the master.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Channels one session may have had to close from this side (their [`CLOSE_GRACE`] over)
/// before the session is renewed: russh keeps about 3.5 KiB of each until the session ends,
/// so a local user holding connections to the report port open would otherwise grow the
/// master without bound. 256 is under 1 MiB per node (more for a moment when a burst comes
/// due at once). A working agent closes its channels from the node's side; a hung one's
/// (stale, or no hello) count, so a session of months may be renewed now and then.
pub const MAX_FORCED_CLOSES: u64 = 256;
/// After a renewal the node stays up (no NodeDown) unless no agent proves itself on the
/// sessions since within this long: the retry (0.5-1 s), a handshake and the agent's
/// reconnect (its backoff after a lost link grows to 5 s; typically 1-3 s here) take a few
/// seconds. An agent whose channels were refused backs off longer (up to a minute) and may
/// miss it: the node is then reported down until it is heard.
pub const RENEWAL_GRACE: Duration = Duration::from_secs(15);
/// A session that lasted this long counts as a success: the next failure retries quickly.
const STABLE_SESSION: Duration = Duration::from_secs(60);

/// Why a tunnel could not be set up, or ended.
#[derive(Debug, Error)]
pub enum TunnelError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("report secret: {0}")]
    Secret(#[from] secret::SecretError),
    #[error("the node refused the forward of 127.0.0.1:{port}: is report_port {port} already in use on the node, or AllowTcpForwarding off, or PermitListen none (the README's settings for socket reports)? ({message})")]
    ForwardRefused { port: u16, message: String },
    #[error("the node refused the forward of {path}: does its directory exist (the agent makes it at start) and belong to the SSH user, is the socket left from an earlier session (the agent removes it; or StreamLocalBindUnlink yes), or is AllowStreamLocalForwarding off, or AllowTcpForwarding no (which refuses socket forwards too)? ({message})")]
    SocketRefused { path: String, message: String },
    #[error("renewing the SSH session: {0} report channels were held open on the node after this side ended them (a local user connecting to the report forward?); each costs the master memory until the session ends")]
    Renewed(u64),
}

impl From<russh::Error> for TunnelError {
    fn from(e: russh::Error) -> TunnelError {
        TunnelError::Ssh(SshError::Ssh(e))
    }
}

/// Where a node's forward for this master appears on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// 127.0.0.1:port.
    Tcp(u16),
    /// A Unix socket at this path.
    Unix(String),
}

impl Forward {
    /// The forward's name in the report protocol (`via`), as the agent names it.
    pub fn via(&self) -> String {
        match self {
            Forward::Tcp(p) => format!("tcp:{p}"),
            Forward::Unix(p) => format!("unix:{p}"),
        }
    }
}

impl std::fmt::Display for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Forward::Tcp(p) => write!(f, "127.0.0.1:{p}"),
            Forward::Unix(p) => f.write_str(p),
        }
    }
}

/// What every session needs, shared.
pub struct TunnelSettings {
    pub ssh: Arc<SshSettings>,
    /// The node's report socket (`[node] report_socket`); None: TCP on `report_port`.
    pub report_socket: Option<String>,
    pub report_port: u16,
    /// A channel that carries no frame for this long is closed and its node marked down.
    pub stale_after: Duration,
    /// SSH handshakes allowed in progress at once, over all hosts.
    pub handshakes: Arc<tokio::sync::Semaphore>,
    /// Reconnects and dropped frames are counted here.
    pub metrics: Arc<Metrics>,
    /// The report secret agents must prove they hold; None: the empty key, which proves
    /// nothing (reports are not authenticated).
    pub secret: Option<Arc<Vec<u8>>>,
    /// [`RENEWAL_GRACE`]; tests shorten it.
    pub renewal_grace: Duration,
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
            report_socket: cfg.node.report_socket.clone(),
            report_port: cfg.node.report_port,
            stale_after: cfg.scaling.stale_after,
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            metrics: Arc::default(),
            secret: None,
            renewal_grace: RENEWAL_GRACE,
        }
    }

    /// (SSH port, forward) for a host: its own, or the configured defaults. A host's own
    /// socket wins over its own port, which wins over the configured socket.
    pub fn route(&self, h: &Host) -> (u16, Forward) {
        let forward = match (&h.report_socket, h.report_port, &self.report_socket) {
            (Some(s), _, _) => Forward::Unix(s.clone()),
            (None, Some(p), _) => Forward::Tcp(p),
            (None, None, Some(s)) => Forward::Unix(s.clone()),
            (None, None, None) => Forward::Tcp(self.report_port),
        };
        (h.ssh_port.unwrap_or(self.ssh.default_port), forward)
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

/// Where the tunnels' events go (each to every recipient listed), and the book their samples
/// are folded into (no message per sample: [`Heard`]).
#[derive(Clone)]
pub struct TunnelOutputs {
    pub samples: Heard,
    pub up: Vec<Recipient<NodeUp>>,
    pub down: Vec<Recipient<NodeDown>>,
    /// Why a node is not heard, and when that is over (NodeStatus, for `status`).
    pub problem: Vec<Recipient<TunnelProblem>>,
}

impl TunnelOutputs {
    fn up(&self, m: NodeUp) {
        self.up.iter().for_each(|r| r.do_send(m.clone()));
    }
    fn down(&self, m: NodeDown) {
        self.down.iter().for_each(|r| r.do_send(m.clone()));
    }
    fn problem(&self, host: &HostKey, problem: Option<String>) {
        self.problem.iter().for_each(|r| {
            r.do_send(TunnelProblem {
                host: host.clone(),
                problem: problem.clone(),
            })
        });
    }
}

struct SessionHandle {
    task: tokio::task::JoinHandle<()>,
    /// The host as the session was opened for it; a change of route or identity reopens it.
    host: Host,
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

/// Whether a session opened for `a` serves `b` as well: same route, same identity and keys.
fn same_session(settings: &TunnelSettings, a: &Host, b: &Host) -> bool {
    settings.route(a) == settings.route(b)
        && a.instance_id == b.instance_id
        && a.decision == b.decision
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
            .filter(|(k, s)| {
                wanted
                    .get(*k)
                    .is_none_or(|h| !same_session(&self.settings, h, &s.host))
            })
            .map(|(k, _)| k.clone())
            .collect();
        self.out.samples.retain(|k| wanted.contains_key(k));
        for k in gone {
            info!(self.log, "Closing tunnel"; "host" => %k.host, "port" => k.port);
            self.stop_session(&k, "removed from the registry");
            // Its series go too, unless another registered host has the same address.
            if !wanted.keys().any(|w| w.host == k.host) {
                self.settings.metrics.forget_host(&k.host.to_string());
            }
        }
        for (key, host) in wanted {
            if self.sessions.contains_key(&key) {
                continue;
            }
            let (ssh_port, forward) = self.settings.route(host);
            let up = Arc::new(AtomicBool::new(false));
            let log = self.log.new(
                o!("host" => key.host.to_string(), "app_port" => key.port, "ssh_port" => ssh_port),
            );
            info!(log, "Opening tunnel"; "forward" => %forward);
            let task = tokio::spawn(session_loop(
                host.clone(),
                (ssh_port, forward),
                self.settings.clone(),
                self.out.clone(),
                up.clone(),
                log,
            ));
            self.sessions.insert(
                key,
                SessionHandle {
                    task,
                    host: host.clone(),
                    up,
                },
            );
        }
    }
}

/// Connects, forwards, waits for the session to end, retries with backoff; forever, until
/// aborted by the actor.
async fn session_loop(
    host: Host,
    route: (u16, Forward),
    settings: Arc<TunnelSettings>,
    out: TunnelOutputs,
    up: Arc<AtomicBool>,
    log: Logger,
) {
    let key = host.key();
    // The metrics' label for this host.
    let label = key.host.to_string();
    let chans = Arc::new(Channels::new(
        &host,
        &route,
        settings.clone(),
        out.clone(),
        up.clone(),
        log.clone(),
    ));
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    // A renewal whose node is still up: when that ends, and the channels numbered before it.
    let mut renewal: Option<Renewal> = None;
    loop {
        let started = Instant::now();
        let session = run_session(&key, &route, &settings, &out, &up, &chans, &log);
        tokio::pin!(session);
        let result = loop {
            let due = renewal.as_ref().map(|r| r.due);
            tokio::select! {
                r = &mut session => break r,
                () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    let Some(Renewal { before, reason, .. }) = renewal.take() else { continue };
                    // Under the live lock, as a hello sets `heard` and `up`: no hello slips
                    // between the check and the NodeDown.
                    let _live = lock(&chans.live);
                    if chans.heard.load(Ordering::SeqCst) <= before && up.swap(false, Ordering::SeqCst) {
                        let reason = format!("{reason}; no agent proved itself on the sessions since within {}: is `autoscaler node` running there?",
                            humantime::format_duration(settings.renewal_grace));
                        out.down(NodeDown { host: key.clone(), reason: reason.clone() });
                        out.problem(&key, Some(reason));
                    }
                }
            }
        };
        // The session's channels went with it.
        chans.session_ended();
        *lock(&chans.live) = None;
        let reason = match &result {
            Ok(()) => "SSH session closed".to_string(),
            Err(e) => e.to_string(),
        };
        // A renewal is this side's choice, not a failure: the next session comes at the first
        // delay, or a user holding channels open would keep the node down ever longer. The
        // node is not reported down for it either, unless its agent stays away: a user holding
        // channels open does not make their node flap. An earlier renewal the agent has not
        // come back from keeps its deadline, so renewals in a row cannot hide an absent agent.
        let renewed = matches!(result, Err(TunnelError::Renewed(_)));
        if renewed && up.load(Ordering::SeqCst) {
            renewal = Some(Renewal::after(
                renewal.take(),
                chans.heard.load(Ordering::SeqCst),
                chans.next.load(Ordering::SeqCst),
                tokio::time::Instant::now() + settings.renewal_grace,
                &reason,
            ));
        } else if up.swap(false, Ordering::SeqCst) {
            renewal = None;
            out.down(NodeDown {
                host: key.clone(),
                reason: reason.clone(),
            });
        }
        if started.elapsed() >= STABLE_SESSION || renewed {
            backoff.reset();
        }
        if renewed {
            settings.metrics.ssh_renewal(&label);
        }
        out.problem(&key, Some(reason.clone()));
        let delay = backoff.next_delay();
        settings.metrics.ssh_reconnect(&label);
        warn!(log, "Tunnel down; retrying"; "error" => reason, "attempt" => backoff.attempts(),
            "retry_in" => %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)));
        tokio::time::sleep(delay).await;
    }
}

/// A renewal the node is kept up across: by when an agent must have proved itself again, on a
/// channel numbered from `before` on.
#[derive(Debug, Clone, PartialEq)]
struct Renewal {
    due: tokio::time::Instant,
    before: u64,
    reason: String,
}

impl Renewal {
    /// The renewal to wait for after one more, given `heard` (1 + the last live channel's
    /// number) and `next` (the next channel's): an earlier one the agent has not come back
    /// from stands, so renewals in a row cannot push an absent agent's NodeDown away.
    fn after(
        earlier: Option<Renewal>,
        heard: u64,
        next: u64,
        due: tokio::time::Instant,
        reason: &str,
    ) -> Renewal {
        match earlier {
            Some(e) if heard <= e.before => e,
            _ => Renewal {
                due,
                before: next,
                reason: reason.to_string(),
            },
        }
    }
}

async fn run_session(
    key: &HostKey,
    (ssh_port, forward): &(u16, Forward),
    settings: &Arc<TunnelSettings>,
    out: &TunnelOutputs,
    up: &Arc<AtomicBool>,
    chans: &Arc<Channels>,
    log: &Logger,
) -> Result<(), TunnelError> {
    let host = key.host.to_string();
    let check = HostKeyCheck::new(&settings.ssh, &host, *ssh_port, log);
    let handler = Client {
        check: check.clone(),
        session: chans.session.load(Ordering::SeqCst),
        chans: chans.clone(),
    };
    let setup = async {
        let handle = ssh::connect(&settings.ssh, &host, *ssh_port, &check, handler).await?;
        match forward {
            Forward::Tcp(port) => handle
                .tcpip_forward("127.0.0.1", u32::from(*port))
                .await
                .map(|_| ())
                .map_err(|e| TunnelError::ForwardRefused {
                    port: *port,
                    message: e.to_string(),
                })?,
            Forward::Unix(path) => handle
                .streamlocal_forward(path.clone())
                .await
                .map_err(|e| TunnelError::SocketRefused {
                    path: path.clone(),
                    message: e.to_string(),
                })?,
        }
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
    info!(log, "Tunnel up"; "forward" => %forward);
    if !up.load(Ordering::SeqCst) {
        out.problem(
            key,
            Some(format!(
                "SSH tunnel up ({forward}); no agent has proved itself on it yet: is `autoscaler node` running there and reporting to that forward?"
            )),
        );
    }
    tokio::select! {
        r = &mut handle => r?,
        forced = chans.watch() => {
            // Ends the session and, with it, what russh keeps of every channel; bounded, for
            // a node that stopped reading.
            let _ = handle
                .disconnect(russh::Disconnect::ByApplication, "session renewed", "en")
                .await;
            let _ = tokio::time::timeout(CLOSE_GRACE, &mut handle).await;
            return Err(TunnelError::Renewed(forced));
        }
    }
    Ok(())
}

/// russh's callbacks for one session. Report channels are read right here, on the session's
/// own task, as their data arrives: no task and no queue per channel.
struct Client {
    check: HostKeyCheck,
    /// Which of the node's sessions this is ([`Channels::session`]).
    session: u64,
    chans: Arc<Channels>,
}

/// One node's report channels, across its SSH sessions (one at a time), and what reading them
/// needs.
struct Channels {
    key: HostKey,
    /// The host as metrics name it.
    label: String,
    out: TunnelOutputs,
    up: Arc<AtomicBool>,
    settings: Arc<TunnelSettings>,
    log: Logger,
    /// The keys a hello may prove (the fleet's secret first).
    keys: Vec<Vec<u8>>,
    /// The forward's name in the protocol.
    via: String,
    /// The registered host these channels speak for.
    host: Host,
    filter: Mutex<SeqFilter>,
    /// The live (authenticated) channel.
    live: Mutex<Option<u64>>,
    /// 1 + the number of the last channel that became live, over all sessions (0: none yet).
    heard: AtomicU64,
    next: AtomicU64,
    /// The current session's channels, by session and russh's id: those still waiting for
    /// their hello (at most [`MAX_PENDING_CHANNELS`]) and the authenticated ones.
    open: Mutex<HashMap<(u64, ChannelId), Reading>>,
    /// The current session's number. A session that timed out may still run its callbacks
    /// for a moment after the next one started: what it opens then is closed, and what it
    /// reads lands nowhere.
    session: AtomicU64,
    /// Channels this side ended, EOF sent: closed by the node's side, or by this one at the
    /// time given ([`CLOSE_GRACE`]).
    closing: Mutex<HashMap<(u64, ChannelId), Closing>>,
    /// Tells the session's channel timer that a deadline may have come closer.
    wake: Notify,
    last_refusal_log: Mutex<Option<Instant>>,
    /// The live channel's agent run (its hello's boot), and when a channel of another run
    /// replaced a live one lately: two agents taking turns on one forward.
    live_boot: Mutex<Option<u64>>,
    /// Agent runs heard lately, and when each last became live.
    recent_boots: Mutex<VecDeque<(u64, Instant)>>,
    turns: Mutex<VecDeque<Instant>>,
    last_turns_log: Mutex<Option<Instant>>,
}

/// A channel this side ended, until it is closed.
struct Closing {
    close_at: tokio::time::Instant,
    write: Arc<ChannelWriteHalf<client::Msg>>,
}

/// One report channel, as read so far.
struct Reading {
    /// Our number for it (the node's channels, in the order they opened).
    id: u64,
    ch: MasterChannel,
    lines: LineBuffer,
    authenticated: bool,
    /// Until its hello is accepted, a channel has until then (from the moment it opened,
    /// however it spreads its bytes).
    hello_by: tokio::time::Instant,
    /// An authenticated channel is stale once nothing arrived for `stale_after` after this.
    last_read: tokio::time::Instant,
    feed: Feed,
    /// To close it from outside the session's task (the timer).
    write: Arc<ChannelWriteHalf<client::Msg>>,
}

impl Reading {
    fn deadline(&self, stale_after: Duration) -> tokio::time::Instant {
        match self.authenticated {
            true => self.last_read + stale_after,
            false => self.hello_by,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Replacements by another agent run within this long, this many times: two agents on one
/// forward (the same report socket or port, or a copied configuration).
const TURNS_WINDOW: Duration = Duration::from_secs(60);
const TURNS_SEEN: usize = 3;

impl Channels {
    fn new(
        host: &Host,
        route: &(u16, Forward),
        settings: Arc<TunnelSettings>,
        out: TunnelOutputs,
        up: Arc<AtomicBool>,
        log: Logger,
    ) -> Channels {
        // What a channel of this node may prove: the fleet's secret, and for a host a launch
        // started, that launch's key.
        let fleet: Arc<Vec<u8>> = settings.secret.clone().unwrap_or_default();
        let mut keys = vec![fleet.to_vec()];
        if let (Some(secret), Some(d)) = (&settings.secret, &host.decision) {
            keys.push(launch_key(secret, d).into_bytes());
        }
        Channels {
            key: host.key(),
            label: host.host.to_string(),
            out,
            up,
            settings,
            log,
            keys,
            via: route.1.via(),
            host: host.clone(),
            filter: Mutex::default(),
            live: Mutex::default(),
            heard: AtomicU64::default(),
            next: AtomicU64::default(),
            open: Mutex::default(),
            session: AtomicU64::default(),
            closing: Mutex::default(),
            wake: Notify::new(),
            last_refusal_log: Mutex::default(),
            live_boot: Mutex::default(),
            recent_boots: Mutex::default(),
            turns: Mutex::default(),
            last_turns_log: Mutex::default(),
        }
    }

    /// Records that a channel of agent run `boot` became the live one; true when agents of
    /// different runs have taken turns often enough lately to say so (once a minute). A
    /// turn is a run coming back after another replaced it (A, B, A): an agent restarted a
    /// few times in a row (a new run each time) is not two agents.
    fn took_turn(&self, boot: u64) -> bool {
        let now = Instant::now();
        let came_back = {
            let mut recent = lock(&self.recent_boots);
            recent.retain(|(_, at)| now.duration_since(*at) <= TURNS_WINDOW);
            let back = recent.iter().any(|(b, _)| *b == boot);
            recent.retain(|(b, _)| *b != boot);
            recent.push_back((boot, now));
            back
        };
        let previous = lock(&self.live_boot).replace(boot);
        if previous.is_none_or(|p| p == boot) || !came_back {
            return false;
        }
        let mut turns = lock(&self.turns);
        turns.push_back(now);
        while turns
            .front()
            .is_some_and(|t| now.duration_since(*t) > TURNS_WINDOW)
        {
            turns.pop_front();
        }
        if turns.len() < TURNS_SEEN {
            return false;
        }
        let mut last = lock(&self.last_turns_log);
        if last.is_some_and(|t| now.duration_since(t) < TURNS_WINDOW) {
            return false;
        }
        *last = Some(now);
        true
    }

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

    /// A new report channel (accepted already): the challenge goes out, and it waits for its
    /// hello. When [`MAX_PENDING_CHANNELS`] are waiting already, the one that has waited
    /// longest is closed to make room.
    fn open(self: &Arc<Self>, session: u64, channel: Channel<client::Msg>, from: String) {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        // What arrives is read in `data`; russh's own queue for the channel goes unused.
        let (_, write) = channel.split();
        let channel = write.id();
        let write = Arc::new(write);
        let (ch, challenge) = MasterChannel::open(&self.via);
        let now = tokio::time::Instant::now();
        let stale_after = self.settings.stale_after;
        let reading = Reading {
            id,
            ch,
            lines: LineBuffer::default(),
            authenticated: false,
            hello_by: now + HELLO_TIMEOUT.min(stale_after.max(Duration::from_secs(1))),
            last_read: now,
            feed: self.out.samples.feed(&self.key),
            write: write.clone(),
        };
        let evicted = {
            let mut open = lock(&self.open);
            if self.session.load(Ordering::SeqCst) != session {
                drop(open);
                close_soon(write);
                return;
            }
            let waiting = open.iter().filter(|(_, r)| !r.authenticated);
            let evicted = match waiting.clone().count() >= MAX_PENDING_CHANNELS {
                true => waiting.min_by_key(|(_, r)| r.id).map(|(c, _)| *c),
                false => None,
            };
            let evicted = evicted.and_then(|c| open.remove(&c).map(|r| (c, r)));
            open.insert((session, channel), reading);
            evicted
        };
        if let Some((evicted_key, old)) = evicted {
            self.settings
                .metrics
                .channel_refused(&self.label, "evicted");
            if self.log_refusal() {
                warn!(self.log, "Report channel closed to make room: too many waiting for their hello (someone on the node is connecting to the report port?)";
                    "closed" => old.id, "waiting" => MAX_PENDING_CHANNELS, "from" => &from);
            }
            // Through its queue, which russh reads only after the open replies: the oldest
            // may not be confirmed yet, and an EOF through the session would be dropped.
            self.finish(evicted_key, &old.write, None);
            self.ended(old, ChannelEnd::Evicted);
        }
        debug!(self.log, "Report channel opened"; "channel" => id, "from" => &from);
        self.wake.notify_one();
        // Not from this task: the session reads the queue this waits on.
        let log = self.log.clone();
        tokio::spawn(async move {
            if let Err(e) = write.data_bytes(challenge.into_bytes()).await {
                debug!(log, "Challenge not sent"; "channel" => id, "error" => %e);
            }
        });
    }

    /// Bytes that arrived on `channel`: the hello that proves the secret for this forward and
    /// names this host (the welcome goes back), then authenticated samples. Something
    /// malformed or forged, or any read of a channel another one replaced, ends it.
    fn data(self: &Arc<Self>, key: (u64, ChannelId), data: &[u8], session: &mut client::Session) {
        let mut open = lock(&self.open);
        let Some(r) = open.get_mut(&key) else {
            return;
        };
        let Some(end) = self.read(r, data, session) else {
            return;
        };
        let r = open.remove(&key).expect("read just now");
        drop(open);
        self.finish(key, &r.write, Some(session));
        self.ended(r, end);
    }

    /// Reads `data` into `r`; why the channel ends, if it does.
    fn read(
        &self,
        r: &mut Reading,
        data: &[u8],
        session: &mut client::Session,
    ) -> Option<ChannelEnd> {
        r.last_read = tokio::time::Instant::now();
        if r.authenticated && !self.is_live(r.id) {
            return Some(ChannelEnd::Replaced);
        }
        let (metrics, host) = (&self.settings.metrics, &self.label);
        let now = steady_ms();
        let was_authenticated = r.authenticated;
        let keys: Vec<&[u8]> = match r.authenticated {
            true => Vec::new(),
            false => self.keys.iter().map(Vec::as_slice).collect(),
        };
        let mut welcome = None;
        let mut ended = None;
        let pushed = r.lines.each(data, |line| {
            match r.ch.accept(line, &keys, now)? {
                Event::Hello { hello, welcome: w, .. } => {
                    // A launched host's agent must name the instance it was launched as.
                    if let Some(registered) = &self.host.instance_id {
                        if hello.instance_id.as_ref() != Some(registered) {
                            ended = Some(ChannelEnd::WrongInstance {
                                said: hello.instance_id.clone(),
                                registered: registered.clone(),
                            });
                            return Err(DecodeError::Unauthenticated);
                        }
                    }
                    // Proven: this channel is the node's live one (the welcome goes back
                    // below, before anything else is read).
                    r.authenticated = true;
                    // Under the live lock: a renewal's deadline ([`session_loop`]) sees
                    // this hello entirely or not at all.
                    let replaced = {
                        let mut live = lock(&self.live);
                        self.heard.store(r.id + 1, Ordering::SeqCst);
                        self.up.store(true, Ordering::SeqCst);
                        live.replace(r.id)
                    };
                    info!(self.log, "Node up"; "node" => &hello.node, "boot" => hello.boot,
                        "channel" => r.id, "replaces" => replaced);
                    if self.took_turn(hello.boot) {
                        warn!(self.log, "Two agents take turns on this node's forward: each new one replaces the other's channel (two `autoscaler node` running, or two nodes sharing one report socket or port?)";
                            "boot" => hello.boot, "replacements_in_a_minute" => lock(&self.turns).len());
                    }
                    self.out.problem(&self.key, None);
                    self.out.up(NodeUp {
                        host: self.key.clone(),
                        hello,
                    });
                    welcome = Some(w);
                }
                Event::Sample(sample) => {
                    let hello = r.ch.hello().expect("samples follow the hello");
                    match lock(&self.filter).check(hello, sample.seq, now)? {
                        SeqVerdict::New { gap } => {
                            if gap > 0 {
                                metrics.samples_missing(host, gap);
                                debug!(self.log, "Samples missing"; "count" => gap, "before_seq" => sample.seq);
                            }
                            debug!(self.log, "CPU"; "busy_pct" => sample.busy_pct, "seq" => sample.seq);
                            let buffer = hello.buffer as usize;
                            if !lock(&r.feed).push(hello.boot, sample, buffer) {
                                metrics.frame_dropped(host, "overflow");
                            }
                        }
                        SeqVerdict::Old => metrics.frame_dropped(host, "duplicate"),
                    }
                }
            }
            Ok(())
        });
        if ended.is_some() {
            return ended;
        }
        if let Some(w) = welcome {
            if let Err(e) = session.data(r.write.id(), w.into_bytes()) {
                return Some(ChannelEnd::Send(e));
            }
        }
        if r.authenticated && !was_authenticated {
            // Its deadline is now its stale time, which may come sooner.
            self.wake.notify_one();
        }
        pushed.err().map(ChannelEnd::Bad)
    }

    /// The node sent EOF on `channel` (`eof`: ours goes back, and it closes) or closed it.
    fn closed(self: &Arc<Self>, key: (u64, ChannelId), session: &mut client::Session, eof: bool) {
        if !eof {
            lock(&self.closing).remove(&key);
        }
        let Some(r) = lock(&self.open).remove(&key) else {
            return;
        };
        if eof {
            self.finish(key, &r.write, Some(session));
        }
        let end = match r.lines.pending() > 0 {
            true => ChannelEnd::Truncated,
            false => ChannelEnd::Closed,
        };
        self.ended(r, end);
    }

    /// Ends a channel from this side: EOF now (through the session when in one of its
    /// callbacks, else through the channel's queue), and a close after [`CLOSE_GRACE`] unless
    /// the node's side closes it first.
    /// The grace counts from when the EOF is on its way: one sent through the queue may wait
    /// behind a burst of other channels' messages.
    fn finish(
        self: &Arc<Self>,
        key: (u64, ChannelId),
        write: &Arc<ChannelWriteHalf<client::Msg>>,
        session: Option<&mut client::Session>,
    ) {
        match session {
            Some(session) => {
                let _ = session.eof(key.1);
                self.close_later(key, write.clone());
            }
            None => {
                let (chans, write) = (self.clone(), write.clone());
                tokio::spawn(async move {
                    if write.eof().await.is_ok() {
                        chans.close_later(key, write);
                    }
                });
            }
        }
    }

    /// Closes `key` after [`CLOSE_GRACE`] unless the node's side closes it first.
    fn close_later(&self, key: (u64, ChannelId), write: Arc<ChannelWriteHalf<client::Msg>>) {
        let close_at = tokio::time::Instant::now() + CLOSE_GRACE;
        let mut closing = lock(&self.closing);
        // An EOF of a session that has ended since (`session_ended` moves the number on
        // before it clears `closing`): that channel went with its session.
        if key.0 != self.session.load(Ordering::SeqCst) {
            return;
        }
        closing.insert(key, Closing { close_at, write });
        drop(closing);
        self.wake.notify_one();
    }

    /// The session ended: its channels went with it. A frame cut short is counted; the node's
    /// NodeDown, if it was up, is the session's to send.
    fn session_ended(&self) {
        let mut open = lock(&self.open);
        self.session.fetch_add(1, Ordering::SeqCst);
        lock(&self.closing).clear();
        for (_, r) in open.drain() {
            if r.lines.pending() > 0 {
                self.settings
                    .metrics
                    .frame_dropped(&self.label, "truncated");
            }
        }
    }

    /// The session's channel timer: ends the channels whose time is up (no hello in time, or
    /// nothing for `stale_after`), and closes those ended that the node's side has not closed
    /// within [`CLOSE_GRACE`]. Runs as long as the session, unless it has had to close
    /// [`MAX_FORCED_CLOSES`] channels: it then returns their number, and the session is renewed.
    async fn watch(self: &Arc<Self>) -> u64 {
        let stale_after = self.settings.stale_after;
        // Channels of this session closed from this side (see [`MAX_FORCED_CLOSES`]).
        let mut forced = 0;
        loop {
            let now = tokio::time::Instant::now();
            let (due, next) = {
                let mut open = lock(&self.open);
                let due: Vec<_> = open
                    .extract_if(|_, r| r.deadline(stale_after) <= now)
                    .collect();
                let next = open.values().map(|r| r.deadline(stale_after)).min();
                (due, next)
            };
            for (key, r) in due {
                let end = match r.authenticated {
                    true => ChannelEnd::Stale(stale_after),
                    false => ChannelEnd::NoHello(HELLO_TIMEOUT),
                };
                self.finish(key, &r.write, None);
                self.ended(r, end);
            }
            let (overdue, next_close) = {
                let mut closing = lock(&self.closing);
                let overdue: Vec<_> = closing.extract_if(|_, c| c.close_at <= now).collect();
                (overdue, closing.values().map(|c| c.close_at).min())
            };
            forced += overdue.len() as u64;
            for (_, c) in overdue {
                close_soon(c.write);
            }
            if forced >= MAX_FORCED_CLOSES {
                return forced;
            }
            let next = next.into_iter().chain(next_close).min();
            let next = next.unwrap_or(now + Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Counts and logs why a channel ended; the live one's end takes the node down.
    fn ended(&self, r: Reading, end: ChannelEnd) {
        let (metrics, host, log) = (&self.settings.metrics, &self.label, &self.log);
        let (id, authenticated) = (r.id, r.authenticated);
        match &end {
            ChannelEnd::Bad(DecodeError::Unauthenticated | DecodeError::NoMac)
                if !authenticated =>
            {
                metrics.channel_refused(host, "unauthenticated");
                if !self.up.load(Ordering::SeqCst) {
                    self.out.problem(
                        &self.key,
                        Some(
                            "tunnel up, but the report channel did not prove the report secret: does the node's [node] secret_file hold the master's report.key?"
                                .into(),
                        ),
                    );
                }
            }
            // A frame without the channel's MAC is not the agent's either.
            ChannelEnd::Bad(DecodeError::Forged | DecodeError::NoMac) if authenticated => {
                metrics.channel_refused(host, "forged")
            }
            ChannelEnd::Bad(_) => metrics.frame_dropped(host, "malformed"),
            ChannelEnd::Truncated => metrics.frame_dropped(host, "truncated"),
            ChannelEnd::NoHello(_) => metrics.channel_refused(host, "no_hello"),
            ChannelEnd::WrongInstance { .. } => metrics.channel_refused(host, "wrong_instance"),
            _ => {}
        }
        match (&end, authenticated) {
            // Made room for a newer one: counted and logged where it happened.
            (ChannelEnd::Evicted, _) => {}
            // What an unproven channel did says nothing about the node: logged sparingly.
            (_, false) => {
                if self.log_refusal() {
                    warn!(log, "Report channel closed before it proved to be the agent's (someone on the node is connecting to the report port, or the node's report secret differs)";
                        "channel" => id, "error" => %end)
                }
            }
            (ChannelEnd::Bad(_) | ChannelEnd::Truncated | ChannelEnd::Send(_), true) => {
                warn!(log, "Closing report channel"; "channel" => id, "error" => %end)
            }
            _ => info!(log, "Report channel ended"; "channel" => id, "reason" => %end),
        }
        // Only the live channel's end takes the node down.
        // Under the live lock, as a hello sets `up`: a newer channel's hello cannot come
        // between the check and the NodeDown (which would then follow its NodeUp).
        let mut live = lock(&self.live);
        if *live == Some(id) {
            *live = None;
            if self.up.swap(false, Ordering::SeqCst) {
                self.out.down(NodeDown {
                    host: self.key.clone(),
                    reason: end.to_string(),
                });
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
        reply.accept().await;
        let from = format!("{originator_address}:{originator_port}");
        self.chans.open(self.session, channel, from);
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        channel: Channel<client::Msg>,
        socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        self.chans
            .open(self.session, channel, socket_path.to_string());
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.chans.data((self.session, channel), data, session);
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.chans.closed((self.session, channel), session, true);
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        // russh has answered the close already.
        self.chans.closed((self.session, channel), session, false);
        Ok(())
    }
}

/// Closes a channel through its queue, from a task of its own (the session reads that queue).
fn close_soon(write: Arc<ChannelWriteHalf<client::Msg>>) {
    tokio::spawn(async move {
        let _ = write.close().await;
    });
}

/// Why a report channel ended.
#[derive(Debug)]
enum ChannelEnd {
    Closed,
    Stale(Duration),
    /// No proven hello within the time a new channel gets.
    NoHello(Duration),
    /// A newer channel needed the waiting slot.
    Evicted,
    /// The hello names another instance than the registered host's.
    WrongInstance {
        said: Option<String>,
        registered: String,
    },
    /// A newer channel of the agent took over.
    Replaced,
    Truncated,
    /// The welcome could not be sent.
    Send(russh::Error),
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
            ChannelEnd::Evicted => f.write_str("closed to make room for a newer channel"),
            ChannelEnd::WrongInstance { said, registered } => write!(
                f,
                "the hello names instance {} but this host is instance {registered}",
                said.as_deref().unwrap_or("(none)")
            ),
            ChannelEnd::Replaced => f.write_str("replaced by a newer channel of the agent"),
            ChannelEnd::Truncated => f.write_str("report channel closed in the middle of a frame"),
            ChannelEnd::Send(e) => write!(f, "report channel failed: {e}"),
            ChannelEnd::Bad(e) => write!(f, "bad report frame: {e}"),
        }
    }
}

/// Milliseconds on this process's steady clock, for the protocol's rate and jump bounds.
fn steady_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_in_a_row_keep_the_deadline_of_the_first_the_agent_did_not_come_back_from() {
        let t0 = tokio::time::Instant::now();
        let grace = Duration::from_secs(15);
        // Channels 0..10 were numbered before the first renewal; channel 9 was live.
        let first = Renewal::after(None, 10, 10, t0 + grace, "first");
        assert_eq!(
            (first.due, first.before, first.reason.as_str()),
            (t0 + grace, 10, "first")
        );
        // Another renewal, no channel proved since: the first deadline stands.
        let second = Renewal::after(Some(first.clone()), 10, 14, t0 + grace * 2, "second");
        assert_eq!(second, first);
        // Channel 14 proved itself, then a renewal: a new deadline, counting from channel 20.
        let third = Renewal::after(Some(second), 15, 20, t0 + grace * 3, "third");
        assert_eq!(
            (third.due, third.before, third.reason.as_str()),
            (t0 + grace * 3, 20, "third")
        );
    }
}
