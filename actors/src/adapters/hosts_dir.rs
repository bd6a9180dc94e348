//! The hosts.d directory: the single-master registry's durable state, one small file per host
//! (the format is [`Host::to_file_text`]), each written atomically.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::files;
use crate::hosts::{Host, HostKey, HOST_FILE_SUFFIX};

/// Errors of the hosts.d directory.
#[derive(Debug, Error)]
pub enum HostsError {
    #[error("cannot read hosts directory {path}: {source}")]
    ReadDir { path: PathBuf, source: io::Error },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("host {0} is not registered (see `autoscaler list-hosts`)")]
    NotFound(HostKey),
    #[error(transparent)]
    Etcd(#[from] super::etcd::EtcdError),
}

/// What [`HostsDir::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddOutcome {
    /// A new file was written.
    Added,
    /// The same host and port were already registered; nothing changed.
    AlreadyPresent,
    /// The host was present with other details (origin, instance id); its file was rewritten.
    Updated,
}

/// The hosts.d directory: one file per host, written atomically.
#[derive(Debug, Clone)]
pub struct HostsDir {
    dir: PathBuf,
}

impl HostsDir {
    /// A hosts directory at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> HostsDir {
        HostsDir { dir: dir.into() }
    }

    /// Where it lives.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Reads every host file. Files that cannot be parsed are returned as errors beside the
    /// hosts that could, so a caller decides whether one bad file stops it; the hosts are
    /// sorted by address and port.
    pub fn load(&self) -> Result<(Vec<Host>, Vec<HostsError>), HostsError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
            Err(source) => {
                return Err(HostsError::ReadDir {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let mut hosts = BTreeMap::new();
        let mut errors = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| HostsError::ReadDir {
                path: self.dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !name.ends_with(HOST_FILE_SUFFIX) {
                continue;
            }
            let path = entry.path();
            let parsed = fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| Host::from_file_text(&t));
            match parsed {
                Ok(h) if h.file_name() != name => errors.push(HostsError::BadFile {
                    path,
                    message: format!(
                        "describes {} but is named {name}; expected {}",
                        h.key(),
                        h.file_name()
                    ),
                }),
                Ok(h) => {
                    hosts.insert(h.key(), h);
                }
                Err(message) => errors.push(HostsError::BadFile { path, message }),
            }
        }
        Ok((hosts.into_values().collect(), errors))
    }

    /// Reads every host file and fails on the first one that cannot be parsed.
    pub fn load_strict(&self) -> Result<Vec<Host>, HostsError> {
        let (hosts, mut errors) = self.load()?;
        match errors.is_empty() {
            true => Ok(hosts),
            false => Err(errors.remove(0)),
        }
    }

    /// Registers a host: writes its file atomically unless an identical one is there.
    pub fn add(&self, host: &Host) -> Result<AddOutcome, HostsError> {
        let path = self.dir.join(host.file_name());
        let existing = fs::read_to_string(&path)
            .ok()
            .and_then(|t| Host::from_file_text(&t).ok());
        let outcome = match existing {
            Some(h) if &h == host => return Ok(AddOutcome::AlreadyPresent),
            Some(_) => AddOutcome::Updated,
            None => AddOutcome::Added,
        };
        files::create_dir_all(&self.dir, 0o755).map_err(|source| HostsError::Write {
            path: self.dir.clone(),
            source,
        })?;
        files::atomic_write(&path, host.to_file_text().as_bytes(), 0o644)
            .map_err(|source| HostsError::Write { path, source })?;
        Ok(outcome)
    }

    /// Removes a host's file; a host that is not registered is an error.
    pub fn remove(&self, key: &HostKey) -> Result<(), HostsError> {
        let path = self.dir.join(key.file_name());
        match fs::remove_file(&path) {
            Ok(()) => {
                files::sync_dir(&self.dir).map_err(|source| HostsError::Write {
                    path: self.dir.clone(),
                    source,
                })?;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(HostsError::NotFound(key.clone())),
            Err(source) => Err(HostsError::Write { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::{HostName, Origin};

    #[test]
    fn dir_add_list_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = HostsDir::new(tmp.path().join("hosts.d"));
        assert_eq!(dir.load().unwrap().0, vec![]);
        let b = Host::manual(HostName::parse("web-b").unwrap(), 80);
        let a = Host::manual(HostName::parse("web-a").unwrap(), 8080);
        assert_eq!(dir.add(&b).unwrap(), AddOutcome::Added);
        assert_eq!(dir.add(&a).unwrap(), AddOutcome::Added);
        assert_eq!(dir.add(&a).unwrap(), AddOutcome::AlreadyPresent);
        let mut launched = a.clone();
        launched.origin = Origin::Launched;
        assert_eq!(dir.add(&launched).unwrap(), AddOutcome::Updated);
        // Temp files and strays are ignored.
        fs::write(dir.path().join(".web-c_80.host.tmp"), "junk").unwrap();
        fs::write(dir.path().join("README"), "junk").unwrap();
        let (hosts, errors) = dir.load().unwrap();
        assert!(errors.is_empty());
        assert_eq!(hosts, vec![launched.clone(), b.clone()]);
        dir.remove(&b.key()).unwrap();
        assert!(matches!(dir.remove(&b.key()), Err(HostsError::NotFound(_))));
        assert_eq!(dir.load_strict().unwrap(), vec![launched]);
    }

    #[test]
    fn dir_reports_bad_files_without_losing_good_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = HostsDir::new(tmp.path());
        let good = Host::manual(HostName::parse("10.1.2.3").unwrap(), 80);
        dir.add(&good).unwrap();
        fs::write(
            tmp.path().join("broken_80.host"),
            "host = bro ken\nport = 80\n",
        )
        .unwrap();
        fs::write(tmp.path().join("other_80.host"), "host = web\nport = 80\n").unwrap();
        let (hosts, errors) = dir.load().unwrap();
        assert_eq!(hosts, vec![good]);
        assert_eq!(errors.len(), 2);
        let all: String = errors.iter().map(|e| e.to_string()).collect();
        assert!(all.contains("broken_80.host"), "{all}");
        assert!(
            all.contains("is named other_80.host; expected web_80.host"),
            "{all}"
        );
        assert!(dir.load_strict().is_err());
    }
}
