//! etcd, for several masters (`[cluster]`): the connection (TLS, auth), records under the
//! group's prefix, writes guarded by the leader's lease, and the election.
//!
//! Layout under `/autoscaler/GROUP/`:
//!
//! ```text
//! leader/…              the election (etcd's election API: one key per candidate, on its lease)
//! hosts/HOST_PORT       a registered host (JSON)
//! intents/DECISION      a launch not finished (JSON)
//! drains/HOST_PORT      a drain not finished (JSON)
//! decider/memory        the guards' history: last scale-up/in, launches of the last hour
//! ```
//!
//! A leader's writes are transactions that compare its election key's create revision: once
//! its lease is gone (expired, revoked) the key is gone, the comparison fails, and the write
//! is refused — a deposed leader cannot write, however late its request arrives.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn,
    TxnOp,
};

use crate::config::Cluster;

/// Why an etcd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd: cannot read {path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("etcd: {path} may be read by group or others (mode {mode:03o}); it holds a credential: chmod 600 it")]
    Loose { path: std::path::PathBuf, mode: u32 },
    #[error("etcd: {path}: {what}")]
    Unusable {
        path: std::path::PathBuf,
        what: &'static str,
    },
    #[error("etcd ({endpoints}): {source}")]
    Connect {
        endpoints: String,
        source: etcd_client::Error,
    },
    #[error("etcd: {0}")]
    Request(#[from] etcd_client::Error),
    #[error("etcd: {0} timed out")]
    Timeout(&'static str),
    /// A guarded write while this master does not lead (or no longer does).
    #[error("not the leader (the lease is gone or another master leads): write refused")]
    NotLeader,
    /// A record kept changing under a read-modify-write.
    #[error("etcd: {0} kept changing while it was being written; try again")]
    Contended(String),
}

impl EtcdError {
    /// Whether `[cluster]` names a file that cannot be used (an operator's fix, not etcd's
    /// availability).
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            EtcdError::File { .. } | EtcdError::Loose { .. } | EtcdError::Unusable { .. }
        )
    }
}

/// This master's leadership, as the election granted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lead {
    /// The election key and its create revision: what guarded writes compare.
    pub key: Vec<u8>,
    pub rev: i64,
    pub lease: i64,
    /// Until when this master may act on it: two thirds of the TTL after the last renewal.
    /// A master that was stopped (SIGSTOP, a paused VM) sees at once on waking that its lead
    /// has run out, before its leadership task has had a chance to say so.
    pub valid_until: std::time::Instant,
}

/// Shared by the leadership task (which sets it) and everyone who writes (who read it).
pub type LeadCell = Arc<RwLock<Option<Lead>>>;

/// The current lead, if any.
pub fn current(cell: &LeadCell) -> Option<Lead> {
    cell.read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .filter(|l| std::time::Instant::now() < l.valid_until)
}

/// A connection to etcd for one group (cheap to clone).
#[derive(Clone)]
pub struct Etcd(Arc<Inner>);

struct Inner {
    client: Client,
    prefix: String,
    timeout: Duration,
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// What `[cluster]` names as one of etcd's files, and how it must be.
#[derive(Clone, Copy)]
enum Kind {
    /// A PEM certificate anyone may read.
    Certificate,
    /// A PEM private key: only its owner may read it.
    Key,
    /// A password, on the file's first line: only its owner may read it.
    Password,
}

/// Reads one of `[cluster]`'s files as [`Etcd::connect`] uses it, refusing a credential
/// that group or others may read, a PEM file without a PEM block, an empty password.
fn read_as(path: &std::path::Path, kind: Kind) -> Result<Vec<u8>, EtcdError> {
    use std::os::unix::fs::PermissionsExt;
    if let Kind::Key | Kind::Password = kind {
        let meta = std::fs::metadata(path).map_err(|source| EtcdError::File {
            path: path.to_path_buf(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(EtcdError::Loose {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    let bytes = read(path)?;
    let unusable = |what| EtcdError::Unusable {
        path: path.to_path_buf(),
        what,
    };
    match kind {
        Kind::Certificate | Kind::Key if !bytes.windows(11).any(|w| w == b"-----BEGIN ") => {
            Err(unusable("not PEM (no -----BEGIN line)"))
        }
        Kind::Password if String::from_utf8_lossy(&bytes).trim().is_empty() => {
            Err(unusable("empty: no password in it"))
        }
        _ => Ok(bytes),
    }
}

/// Every problem with the files `[cluster]` names, as (key, error): what `check` and the
/// master's start report before any connection is tried.
pub fn file_problems(c: &Cluster) -> Vec<(&'static str, EtcdError)> {
    [
        ("etcd_ca_file", &c.etcd_ca_file, Kind::Certificate),
        ("etcd_cert_file", &c.etcd_cert_file, Kind::Certificate),
        ("etcd_key_file", &c.etcd_key_file, Kind::Key),
        ("etcd_password_file", &c.etcd_password_file, Kind::Password),
    ]
    .into_iter()
    .filter_map(|(key, path, kind)| Some((key, read_as(path.as_ref()?, kind).err()?)))
    .collect()
}

impl Etcd {
    /// Connects to `c.etcd_endpoints` with its TLS and auth settings. `timeout` bounds each
    /// request (None: unbounded, for the election's campaign, which waits for its turn).
    pub async fn connect(c: &Cluster, timeout: Option<Duration>) -> Result<Etcd, EtcdError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(c.etcd_timeout)
            .with_keep_alive(Duration::from_secs(2), c.etcd_timeout)
            // A member cut off from its quorum answers nothing rather than stale data.
            .with_require_leader(true);
        if let Some(t) = timeout {
            opts = opts.with_timeout(t);
        }
        let tls = c.etcd_endpoints.iter().any(|e| e.starts_with("https://"));
        if tls || c.etcd_ca_file.is_some() {
            let mut t = TlsOptions::new();
            if let Some(ca) = &c.etcd_ca_file {
                t = t.ca_certificate(Certificate::from_pem(read_as(ca, Kind::Certificate)?));
            }
            if let (Some(cert), Some(key)) = (&c.etcd_cert_file, &c.etcd_key_file) {
                t = t.identity(Identity::from_pem(
                    read_as(cert, Kind::Certificate)?,
                    read_as(key, Kind::Key)?,
                ));
            }
            opts = opts.with_tls(t);
        }
        if let Some(p) = &c.etcd_password_file {
            let password = String::from_utf8_lossy(&read_as(p, Kind::Password)?)
                .trim()
                .to_string();
            opts = opts.with_user(c.etcd_user.clone(), password);
        }
        let client = tokio::time::timeout(
            c.etcd_timeout,
            Client::connect(c.etcd_endpoints.clone(), Some(opts)),
        )
        .await
        .map_err(|_| EtcdError::Timeout("connect"))?
        .map_err(|source| EtcdError::Connect {
            endpoints: c.etcd_endpoints.join(", "),
            source,
        })?;
        Ok(Etcd(Arc::new(Inner {
            client,
            prefix: format!("/autoscaler/{}/", c.group),
            timeout: c.etcd_timeout,
        })))
    }

    /// The client, for the election and leases.
    pub fn client(&self) -> Client {
        self.0.client.clone()
    }

    /// The election's name (its key prefix).
    pub fn election(&self) -> String {
        format!("{}leader", self.0.prefix)
    }

    fn key(&self, kind: &str, name: &str) -> String {
        match kind {
            "" => format!("{}{name}", self.0.prefix),
            k => format!("{}{k}/{name}", self.0.prefix),
        }
    }

    async fn bounded<T>(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        tokio::time::timeout(self.0.timeout, f)
            .await
            .map_err(|_| EtcdError::Timeout(what))?
            .map_err(EtcdError::from)
    }

    /// Every record of `kind`: (name, value), sorted by name.
    pub async fn list(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, EtcdError> {
        let dir = self.key(kind, "");
        let mut c = self.0.client.clone();
        let resp = self
            .bounded(
                "get",
                c.get(dir.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                let name = String::from_utf8_lossy(kv.key())
                    .trim_start_matches(dir.as_str())
                    .to_string();
                (name, kv.value().to_vec())
            })
            .collect())
    }

    /// One record's value, if it exists.
    pub async fn get(&self, kind: &str, name: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        let mut c = self.0.client.clone();
        let resp = self
            .bounded("get", c.get(self.key(kind, name), None))
            .await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Writes a record: under `lead` (refused unless it still leads), or unguarded (an
    /// operator's command, e.g. `add-host`).
    pub async fn put(
        &self,
        kind: &str,
        name: &str,
        value: Vec<u8>,
        lead: Option<&Lead>,
    ) -> Result<(), EtcdError> {
        self.guarded(TxnOp::put(self.key(kind, name), value, None), lead)
            .await
    }

    /// Deletes a record (guarded as [`Etcd::put`]). Deleting a missing record is no error.
    pub async fn delete(
        &self,
        kind: &str,
        name: &str,
        lead: Option<&Lead>,
    ) -> Result<(), EtcdError> {
        self.guarded(TxnOp::delete(self.key(kind, name), None), lead)
            .await
    }

    async fn guarded(&self, op: TxnOp, lead: Option<&Lead>) -> Result<(), EtcdError> {
        let txn = match lead {
            Some(l) => Txn::new()
                .when([Compare::create_revision(
                    l.key.clone(),
                    CompareOp::Equal,
                    l.rev,
                )])
                .and_then([op]),
            None => Txn::new().and_then([op]),
        };
        let mut c = self.0.client.clone();
        let resp = self.bounded("txn", c.txn(txn)).await?;
        match resp.succeeded() {
            true => Ok(()),
            false => Err(EtcdError::NotLeader),
        }
    }

    /// One record's value and its modification revision (what a later write compares), if
    /// it exists.
    pub async fn get_rev(
        &self,
        kind: &str,
        name: &str,
    ) -> Result<Option<(Vec<u8>, i64)>, EtcdError> {
        let mut c = self.0.client.clone();
        let resp = self
            .bounded("get", c.get(self.key(kind, name), None))
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// Every record of `kind` and the store's revision they were read at: a reader keeps the
    /// newest list it saw and never lets an older read replace it.
    pub async fn list_rev(&self, kind: &str) -> Result<(Vec<(String, Vec<u8>)>, i64), EtcdError> {
        let dir = self.key(kind, "");
        let mut c = self.0.client.clone();
        let resp = self
            .bounded(
                "get",
                c.get(dir.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let records = resp
            .kvs()
            .iter()
            .map(|kv| {
                let name = String::from_utf8_lossy(kv.key())
                    .trim_start_matches(dir.as_str())
                    .to_string();
                (name, kv.value().to_vec())
            })
            .collect();
        Ok((records, rev))
    }

    /// Writes `value` (None: deletes) if the record is still as it was read: at modification
    /// revision `read` (None: absent), and under `lead` when given. Ok(false) when the record
    /// changed meanwhile (read again and retry); NotLeader when the lead is gone.
    pub async fn write_if_unchanged(
        &self,
        kind: &str,
        name: &str,
        value: Option<Vec<u8>>,
        read: Option<i64>,
        lead: Option<&Lead>,
    ) -> Result<bool, EtcdError> {
        let key = self.key(kind, name);
        let unchanged = match read {
            Some(rev) => Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
        };
        let mut when = vec![unchanged];
        if let Some(l) = lead {
            when.push(Compare::create_revision(
                l.key.clone(),
                CompareOp::Equal,
                l.rev,
            ));
        }
        let op = match value {
            Some(v) => TxnOp::put(key, v, None),
            None => TxnOp::delete(key, None),
        };
        let mut c = self.0.client.clone();
        let resp = self
            .bounded("txn", c.txn(Txn::new().when(when).and_then([op])))
            .await?;
        if resp.succeeded() {
            return Ok(true);
        }
        // Which compare failed: the lead (refused for good) or the record (read again).
        match lead {
            Some(l) => match self.guarded(TxnOp::get(l.key.clone(), None), Some(l)).await {
                Ok(()) => Ok(false),
                Err(e) => Err(e),
            },
            None => Ok(false),
        }
    }

    /// Writes a record only if it does not exist (an import never replaces what is there).
    /// Whether it was written.
    pub async fn put_if_absent(
        &self,
        kind: &str,
        name: &str,
        value: Vec<u8>,
    ) -> Result<bool, EtcdError> {
        self.write_if_unchanged(kind, name, Some(value), None, None)
            .await
    }

    /// The current leader's name, if any.
    pub async fn leader(&self) -> Result<Option<String>, EtcdError> {
        let mut c = self.0.client.clone();
        match self.bounded("leader", c.leader(self.election())).await {
            Ok(r) => Ok(r
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            // No leader: the election service answers with an error.
            Err(EtcdError::Request(e)) if e.to_string().contains("no leader") => Ok(None),
            Err(e) => Err(e),
        }
    }
}
