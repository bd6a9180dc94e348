//! SSH sessions opened by the master (russh): the `[ssh]` identity and user, and each host's
//! key checked against `[ssh] known_hosts` — an unknown key refused (`strict`) or recorded
//! (`accept-new`), a changed key always refused. Every session the master opens goes through
//! [`connect`], whatever it carries.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use slog::{info, Logger};
use thiserror::Error;

use super::known_hosts;
use crate::config::{Config, HostKeyPolicy};

/// Why a session could not be set up, or ended.
#[derive(Debug, Error)]
pub enum SshError {
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
    #[error("HOST KEY OF {host} HAS CHANGED: it presents a {presented} key, {known_hosts} records {recorded}; refusing to connect: if the host was reinstalled, remove its lines")]
    HostKeyTypeChanged {
        host: String,
        presented: String,
        recorded: String,
        known_hosts: String,
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
    #[error("SSH: {0}")]
    Ssh(#[from] russh::Error),
}

/// What every session needs: who the master is and how it trusts hosts.
#[derive(Clone)]
pub struct SshSettings {
    pub user: String,
    pub default_port: u16,
    pub key: Arc<PrivateKey>,
    pub known_hosts: PathBuf,
    pub policy: HostKeyPolicy,
    pub connect_timeout: Duration,
    pub keepalive: Duration,
}

impl SshSettings {
    /// From `[ssh]`; loads the identity file now, so a bad key stops the master at start
    /// rather than failing every session later.
    pub fn from_config(cfg: &Config) -> Result<SshSettings, SshError> {
        let key = russh::keys::load_secret_key(&cfg.ssh.identity_file, None).map_err(|e| {
            SshError::Identity {
                path: cfg.ssh.identity_file.clone(),
                message: e.to_string(),
            }
        })?;
        Ok(SshSettings {
            user: cfg.ssh.user.clone(),
            default_port: cfg.ssh.port,
            key: Arc::new(key),
            known_hosts: cfg.ssh.known_hosts.clone(),
            policy: cfg.ssh.host_key_policy,
            connect_timeout: cfg.ssh.connect_timeout,
            keepalive: cfg.ssh.keepalive,
        })
    }
}

/// The host-key check of one session. A russh handler's `check_server_key` calls
/// [`HostKeyCheck::check`]; [`connect`] then reports why a refused key was refused.
#[derive(Clone)]
pub struct HostKeyCheck {
    host: String,
    port: u16,
    known_hosts: PathBuf,
    policy: HostKeyPolicy,
    refusal: Arc<Mutex<Option<SshError>>>,
    log: Logger,
}

impl HostKeyCheck {
    /// The check for `host:port` under `settings`' known_hosts and policy.
    pub fn new(settings: &SshSettings, host: &str, port: u16, log: &Logger) -> HostKeyCheck {
        HostKeyCheck {
            host: host.to_string(),
            port,
            known_hosts: settings.known_hosts.clone(),
            policy: settings.policy,
            refusal: Arc::default(),
            log: log.clone(),
        }
    }

    fn refuse(&self, e: SshError) -> bool {
        if let Ok(mut r) = self.refusal.lock() {
            *r = Some(e);
        }
        false
    }

    /// Whether to trust the key the server presented; records a new key under accept-new.
    pub fn check(&self, server_key: &PublicKeyOrCertificate) -> bool {
        let PublicKeyOrCertificate::PublicKey { key, .. } = server_key else {
            return self.refuse(SshError::Certificate);
        };
        let known_hosts = self.known_hosts.display().to_string();
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        match russh::keys::check_known_hosts_path(&self.host, self.port, key, &self.known_hosts) {
            Ok(true) => true,
            Ok(false) if self.policy == HostKeyPolicy::AcceptNew => {
                // A host known under another key type is not new: a man in the middle need
                // only offer a type the real host never recorded.
                let recorded = russh::keys::known_hosts::known_host_keys_path(
                    &self.host,
                    self.port,
                    &self.known_hosts,
                )
                .unwrap_or_default();
                if !recorded.is_empty() {
                    let names: Vec<String> = recorded
                        .iter()
                        .map(|(line, k)| format!("{} (line {line})", k.algorithm()))
                        .collect();
                    return self.refuse(SshError::HostKeyTypeChanged {
                        host: self.host.clone(),
                        presented: key.algorithm().to_string(),
                        recorded: names.join(", "),
                        known_hosts,
                    });
                }
                match known_hosts::learn(&self.known_hosts, &self.host, self.port, key) {
                    Ok(()) => {
                        info!(self.log, "Recorded new host key (accept-new)"; "fingerprint" => fingerprint, "known_hosts" => known_hosts);
                        true
                    }
                    Err(e) => self.refuse(SshError::KnownHosts {
                        known_hosts,
                        message: e.to_string(),
                    }),
                }
            }
            Ok(false) => self.refuse(SshError::UnknownHostKey {
                host: self.host.clone(),
                port: self.port,
                fingerprint,
                known_hosts,
            }),
            Err(russh::keys::Error::KeyChanged { line }) => self.refuse(SshError::HostKeyChanged {
                host: self.host.clone(),
                fingerprint,
                known_hosts,
                line,
            }),
            Err(e) => self.refuse(SshError::KnownHosts {
                known_hosts,
                message: e.to_string(),
            }),
        }
    }

    /// Why the key was refused, once.
    fn take_refusal(&self) -> Option<SshError> {
        self.refusal.lock().ok().and_then(|mut r| r.take())
    }
}

/// Opens a session to `host:port` with `handler` (whose `check_server_key` answers with
/// `check`) and authenticates as `[ssh] user` with the identity. Not bounded in time: the
/// caller bounds it together with whatever it sets up next.
pub async fn connect<H>(
    settings: &SshSettings,
    host: &str,
    port: u16,
    check: &HostKeyCheck,
    handler: H,
) -> Result<client::Handle<H>, SshError>
where
    H: client::Handler<Error = russh::Error> + Send + 'static,
{
    let config = Arc::new(client::Config {
        // 0s: no keepalive (as OpenSSH's ServerAliveInterval 0).
        keepalive_interval: (!settings.keepalive.is_zero()).then_some(settings.keepalive),
        keepalive_max: 3,
        ..Default::default()
    });
    let socket = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| SshError::Ssh(russh::Error::from(e)))?;
    let _ = socket.set_nodelay(true);
    // Read through a buffer: russh reads a packet's length, then its rest, each a read of
    // its own; buffered, one system call brings both (a report is one small packet).
    let stream = tokio::io::BufReader::with_capacity(4096, socket);
    let mut handle = client::connect_stream(config, stream, handler)
        .await
        .map_err(|e| check.take_refusal().unwrap_or(SshError::Ssh(e)))?;
    let hash: Option<HashAlg> = handle.best_supported_rsa_hash().await?.flatten();
    let auth = handle
        .authenticate_publickey(
            &settings.user,
            PrivateKeyWithHashAlg::new(settings.key.clone(), hash),
        )
        .await?;
    if !auth.success() {
        return Err(SshError::AuthRefused(settings.user.clone()));
    }
    Ok(handle)
}
