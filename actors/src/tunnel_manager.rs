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
//! listener is opened on the master. Host keys are checked against `[ssh] known_hosts`; an
//! unknown key is refused (`strict`) or recorded (`accept-new`), a changed key always refused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, Recipient};
use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::Channel;
use slog::{debug, info, o, warn, Logger};
use thiserror::Error;
use tokio::io::AsyncReadExt;

use crate::backoff::Backoff;
use crate::config::{Config, HostKeyPolicy};
use crate::hosts::{Host, HostKey};
use crate::messages::{CpuReported, HostsChanged, NodeDown, NodeUp};
use crate::report::{decode, ChannelState, DecodeError, Frame, LineBuffer, SeqFilter, SeqVerdict};

const RETRY_BASE: Duration = Duration::from_secs(1);
/// SSH handshakes in progress at once (each costs key exchange on both ends).
pub const MAX_HANDSHAKES: usize = 32;
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A session that lasted this long counts as a success: the next failure retries quickly.
const STABLE_SESSION: Duration = Duration::from_secs(60);

/// Why a session could not be set up or ended.
#[derive(Debug, Error)]
pub enum TunnelError {
    #[error("cannot load SSH identity {path}: {message}")]
    Identity { path: PathBuf, message: String },
    #[error("no answer within {0:?}")]
    ConnectTimeout(Duration),
    #[error("host key of {host} is not in {known_hosts} (fingerprint {fingerprint}); add it (ssh-keyscan -p {port} {host} >> {known_hosts}) or set [ssh] host_key_policy = accept-new")]
    UnknownHostKey {
        host: String,
        port: u16,
        fingerprint: String,
        known_hosts: String,
    },
    #[error("HOST KEY OF {host} HAS CHANGED (fingerprint now {fingerprint}, {known_hosts} line {line}); refusing to connect: if the host was reinstalled, remove that line")]
    HostKeyChanged {
        host: String,
        fingerprint: String,
        known_hosts: String,
        line: usize,
    },
    #[error("cannot use known_hosts {known_hosts}: {message}")]
    KnownHosts {
        known_hosts: String,
        message: String,
    },
    #[error("host presented a certificate; only plain host keys are supported")]
    Certificate,
    #[error("public key authentication as {0:?} was refused")]
    AuthRefused(String),
    #[error("the node refused the forward of 127.0.0.1:{port}: is report_port {port} already in use on the node, or AllowTcpForwarding off? ({message})")]
    ForwardRefused { port: u16, message: String },
    #[error("SSH: {0}")]
    Ssh(#[from] russh::Error),
}

/// What every session needs, shared.
pub struct TunnelSettings {
    pub user: String,
    pub default_port: u16,
    pub key: Arc<PrivateKey>,
    pub known_hosts: PathBuf,
    pub policy: HostKeyPolicy,
    pub connect_timeout: Duration,
    pub keepalive: Duration,
    pub report_port: u16,
    /// A channel that carries no frame for this long is closed and its node marked down.
    pub stale_after: Duration,
    /// SSH handshakes allowed in progress at once, over all hosts.
    pub handshakes: Arc<tokio::sync::Semaphore>,
}

impl TunnelSettings {
    /// From the configuration; loads the identity file now so a bad key stops the master at
    /// start rather than failing every session later.
    pub fn from_config(cfg: &Config) -> Result<TunnelSettings, TunnelError> {
        let key = russh::keys::load_secret_key(&cfg.ssh.identity_file, None).map_err(|e| {
            TunnelError::Identity {
                path: cfg.ssh.identity_file.clone(),
                message: e.to_string(),
            }
        })?;
        Ok(TunnelSettings {
            user: cfg.ssh.user.clone(),
            default_port: cfg.ssh.port,
            key: Arc::new(key),
            known_hosts: cfg.ssh.known_hosts.clone(),
            policy: cfg.ssh.host_key_policy,
            connect_timeout: cfg.ssh.connect_timeout,
            keepalive: cfg.ssh.keepalive,
            report_port: cfg.node.report_port,
            stale_after: cfg.scaling.stale_after,
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
        })
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
            h.ssh_port.unwrap_or(self.settings.default_port),
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
    let refusal = Arc::new(Mutex::new(None));
    let handler = Client {
        key: key.clone(),
        host: host.clone(),
        ssh_port,
        settings: settings.clone(),
        out: out.clone(),
        up: up.clone(),
        filter: filter.clone(),
        refusal: refusal.clone(),
        log: log.clone(),
    };
    let config = Arc::new(client::Config {
        keepalive_interval: Some(settings.keepalive),
        keepalive_max: 3,
        nodelay: true,
        ..Default::default()
    });
    let setup = async {
        let mut handle = client::connect(config, (host.as_str(), ssh_port), handler)
            .await
            .map_err(|e| {
                refusal
                    .lock()
                    .ok()
                    .and_then(|mut r| r.take())
                    .unwrap_or(TunnelError::Ssh(e))
            })?;
        let hash: Option<HashAlg> = handle.best_supported_rsa_hash().await?.flatten();
        let auth = handle
            .authenticate_publickey(
                &settings.user,
                PrivateKeyWithHashAlg::new(settings.key.clone(), hash),
            )
            .await?;
        if !auth.success() {
            return Err(TunnelError::AuthRefused(settings.user.clone()));
        }
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
    let mut handle = tokio::time::timeout(settings.connect_timeout, setup)
        .await
        .map_err(|_| TunnelError::ConnectTimeout(settings.connect_timeout))??;
    drop(permit);
    info!(log, "Tunnel up"; "forward" => format!("127.0.0.1:{report_port}"));
    (&mut handle).await?;
    Ok(())
}

/// russh's callbacks for one session.
struct Client {
    key: HostKey,
    host: String,
    ssh_port: u16,
    settings: Arc<TunnelSettings>,
    out: TunnelOutputs,
    up: Arc<AtomicBool>,
    filter: Arc<Mutex<SeqFilter>>,
    /// Why the host key was refused, for the session's error.
    refusal: Arc<Mutex<Option<TunnelError>>>,
    log: Logger,
}

impl Client {
    fn refuse(&self, e: TunnelError) -> Result<bool, russh::Error> {
        if let Ok(mut r) = self.refusal.lock() {
            *r = Some(e);
        }
        Ok(false)
    }
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = server_key else {
            return self.refuse(TunnelError::Certificate);
        };
        let known_hosts = self.settings.known_hosts.display().to_string();
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        match russh::keys::check_known_hosts_path(
            &self.host,
            self.ssh_port,
            key,
            &self.settings.known_hosts,
        ) {
            Ok(true) => Ok(true),
            Ok(false) if self.settings.policy == HostKeyPolicy::AcceptNew => {
                match russh::keys::known_hosts::learn_known_hosts_path(
                    &self.host,
                    self.ssh_port,
                    key,
                    &self.settings.known_hosts,
                ) {
                    Ok(()) => {
                        info!(self.log, "Recorded new host key (accept-new)"; "fingerprint" => fingerprint, "known_hosts" => known_hosts);
                        Ok(true)
                    }
                    Err(e) => self.refuse(TunnelError::KnownHosts {
                        known_hosts,
                        message: e.to_string(),
                    }),
                }
            }
            Ok(false) => self.refuse(TunnelError::UnknownHostKey {
                host: self.host.clone(),
                port: self.ssh_port,
                fingerprint,
                known_hosts,
            }),
            Err(russh::keys::Error::KeyChanged { line }) => {
                self.refuse(TunnelError::HostKeyChanged {
                    host: self.host.clone(),
                    fingerprint,
                    known_hosts,
                    line,
                })
            }
            Err(e) => self.refuse(TunnelError::KnownHosts {
                known_hosts,
                message: e.to_string(),
            }),
        }
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
            self.settings.stale_after,
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
    stale_after: Duration,
    log: Logger,
) {
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
                                debug!(log, "Samples missing"; "count" => gap, "before_seq" => sample.seq);
                            }
                            out.cpu(CpuReported {
                                host: key.clone(),
                                sample,
                            });
                        }
                        Ok(SeqVerdict::Old) | Err(_) => {}
                    }
                }
            }
        }
    };
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
