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
        match self {
            HostStore::Dir(d) => d.load(),
            HostStore::Etcd { etcd, .. } => {
                let mut hosts = Vec::new();
                let mut errors = Vec::new();
                for (name, value) in etcd.list(KIND).await? {
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
                Ok((hosts, errors))
            }
        }
    }

    /// Registers a host unless an identical one is there.
    pub async fn add(&self, host: &Host) -> Result<AddOutcome, HostsError> {
        match self {
            HostStore::Dir(d) => d.add(host),
            HostStore::Etcd { etcd, lead } => {
                let lead = Self::lead(lead)?;
                let name = host.file_name();
                let existing = etcd
                    .get(KIND, &name)
                    .await?
                    .and_then(|v| Host::from_file_text(&String::from_utf8_lossy(&v)).ok());
                let outcome = match existing {
                    Some(h) if &h == host => return Ok(AddOutcome::AlreadyPresent),
                    Some(_) => AddOutcome::Updated,
                    None => AddOutcome::Added,
                };
                etcd.put(KIND, &name, host.to_file_text().into_bytes(), lead.as_ref())
                    .await?;
                Ok(outcome)
            }
        }
    }

    /// Removes a host; one that is not registered is an error.
    pub async fn remove(&self, key: &HostKey) -> Result<(), HostsError> {
        match self {
            HostStore::Dir(d) => d.remove(key),
            HostStore::Etcd { etcd, lead } => {
                let lead = Self::lead(lead)?;
                let name = key.file_name();
                if etcd.get(KIND, &name).await?.is_none() {
                    return Err(HostsError::NotFound(key.clone()));
                }
                etcd.delete(KIND, &name, lead.as_ref()).await?;
                Ok(())
            }
        }
    }
}
