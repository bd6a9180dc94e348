//! Where the registered hosts live: hosts.d on local disk (one master), or etcd (several
//! masters, `[cluster]`), in the same text format, one record per host.

use super::etcd::{current, Etcd, EtcdError, LeadCell};
use super::hosts_dir::{AddOutcome, HostsDir, HostsError};
use crate::hosts::{Host, HostKey};

/// The etcd record kind of hosts.
const KIND: &str = "hosts";

/// The host list's store.
#[derive(Clone)]
pub enum HostStore {
    Dir(HostsDir),
    /// etcd. With `lead`, writes are the leader's (refused unless it leads); without, an
    /// operator's (`add-host`).
    Etcd {
        etcd: Etcd,
        lead: Option<LeadCell>,
    },
}

/// The hosts a read found, the entries it refused, and the store revision it read at (etcd;
/// `None` for a directory).
pub type Loaded = (Vec<Host>, Vec<HostsError>, Option<i64>);

impl HostStore {
    /// Where it is, for messages.
    pub fn describe(&self) -> String {
        match self {
            HostStore::Dir(d) => d.path().display().to_string(),
            HostStore::Etcd { .. } => "etcd".into(),
        }
    }

    fn lead(lead: &Option<LeadCell>) -> Result<Option<crate::adapters::etcd::Lead>, HostsError> {
        match lead {
            None => Ok(None),
            Some(cell) => match current(cell) {
                Some(l) => Ok(Some(l)),
                None => Err(HostsError::Etcd(EtcdError::NotLeader)),
            },
        }
    }

    /// Every host, and the records that cannot be read (see [`HostsDir::load`]).
    pub async fn load(&self) -> Result<(Vec<Host>, Vec<HostsError>), HostsError> {
        self.load_at().await.map(|(h, e, _)| (h, e))
    }

    /// [`HostStore::load`], with the store's revision the list was read at (etcd; None for
    /// hosts.d): of two reads, the one with the higher revision is the newer.
    pub async fn load_at(&self) -> Result<Loaded, HostsError> {
        match self {
            HostStore::Dir(d) => d.load().map(|(h, e)| (h, e, None)),
            HostStore::Etcd { etcd, .. } => {
                let mut hosts = Vec::new();
                let mut errors = Vec::new();
                let (records, rev) = etcd.list_rev(KIND).await?;
                for (name, value) in records {
                    let parsed = std::str::from_utf8(&value)
                        .map_err(|_| "not UTF-8 text".to_string())
                        .and_then(|t| Host::from_file_text(t).map_err(|e| e.to_string()));
                    match parsed {
                        Ok(h) if h.file_name() == name => hosts.push(h),
                        Ok(h) => errors.push(HostsError::BadFile {
                            path: name.into(),
                            message: format!("holds host {}, not the one its name says", h.key()),
                        }),
                        Err(message) => errors.push(HostsError::BadFile {
                            path: name.into(),
                            message,
                        }),
                    }
                }
                hosts.sort_by_key(Host::key);
                Ok((hosts, errors, Some(rev)))
            }
        }
    }

    /// Registers a host unless an identical one is there. On etcd the write compares what
    /// was read (a change made meanwhile by another master or an operator is read again, not
    /// overwritten).
    pub async fn add(&self, host: &Host) -> Result<AddOutcome, HostsError> {
        match self {
            HostStore::Dir(d) => d.add(host),
            HostStore::Etcd { etcd, lead } => {
                let lead = Self::lead(lead)?;
                let name = host.file_name();
                for _ in 0..CONTENDED_TRIES {
                    let read = etcd.get_rev(KIND, &name).await?;
                    let existing = read
                        .as_ref()
                        .and_then(|(v, _)| Host::from_file_text(&String::from_utf8_lossy(v)).ok());
                    let outcome = match existing {
                        Some(h) if &h == host => return Ok(AddOutcome::AlreadyPresent),
                        Some(_) => AddOutcome::Updated,
                        None => AddOutcome::Added,
                    };
                    let text = host.to_file_text().into_bytes();
                    let at = read.map(|(_, rev)| rev);
                    if etcd
                        .write_if_unchanged(KIND, &name, Some(text), at, lead.as_ref())
                        .await?
                    {
                        return Ok(outcome);
                    }
                }
                Err(crate::adapters::etcd::EtcdError::Contended(name).into())
            }
        }
    }

    /// Removes a host; one that is not registered is an error. On etcd the delete compares
    /// what was read.
    pub async fn remove(&self, key: &HostKey) -> Result<(), HostsError> {
        match self {
            HostStore::Dir(d) => d.remove(key),
            HostStore::Etcd { etcd, lead } => {
                let lead = Self::lead(lead)?;
                let name = key.file_name();
                for _ in 0..CONTENDED_TRIES {
                    let Some((_, rev)) = etcd.get_rev(KIND, &name).await? else {
                        return Err(HostsError::NotFound(key.clone()));
                    };
                    if etcd
                        .write_if_unchanged(KIND, &name, None, Some(rev), lead.as_ref())
                        .await?
                    {
                        return Ok(());
                    }
                }
                Err(crate::adapters::etcd::EtcdError::Contended(name).into())
            }
        }
    }
}

/// How often a read-modify-write of one host is tried while others keep changing it.
const CONTENDED_TRIES: usize = 5;
