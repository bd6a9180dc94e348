//! Durable records (launch intents, drains, the decider's memory): JSON files in the state
//! directory for a single master, or keys in etcd for several ([`crate::adapters::etcd`]),
//! where a write is refused unless this master leads.
//!
//! A record is `(kind, name)`: `state_dir/KIND/NAME.json`, or `/autoscaler/GROUP/KIND/NAME`;
//! an empty kind is the top level (`state_dir/NAME.json`).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::etcd::{current, Etcd, EtcdError, LeadCell};
use super::files;

/// Where records live.
#[derive(Clone)]
pub enum Records {
    /// A directory on local disk (the state directory).
    Files(PathBuf),
    /// etcd; writes need the lead in `lead`.
    Etcd { etcd: Etcd, lead: LeadCell },
}

/// Why a record could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

impl Records {
    fn dir(base: &Path, kind: &str) -> PathBuf {
        match kind {
            "" => base.to_path_buf(),
            k => base.join(k),
        }
    }

    /// Where a file record lives (None in etcd).
    pub fn path(&self, kind: &str, name: &str) -> Option<PathBuf> {
        match self {
            Records::Files(base) => Some(Self::dir(base, kind).join(format!("{name}.json"))),
            Records::Etcd { .. } => None,
        }
    }

    /// Writes (or replaces) a record durably.
    pub async fn put<T: Serialize>(
        &self,
        kind: &str,
        name: &str,
        v: &T,
    ) -> Result<(), RecordError> {
        let text = serde_json::to_vec(v).unwrap_or_default();
        match self {
            Records::Files(base) => {
                let dir = Self::dir(base, kind);
                let path = dir.join(format!("{name}.json"));
                files::create_dir_all(&dir, 0o700)
                    .and_then(|()| files::atomic_write(&path, &text, 0o600))
                    .map_err(|source| RecordError::Io { path, source })
            }
            Records::Etcd { etcd, lead } => {
                let lead = current(lead).ok_or(EtcdError::NotLeader)?;
                Ok(etcd.put(kind, name, text, Some(&lead)).await?)
            }
        }
    }

    /// Every readable record of `kind`, by name. Unreadable ones are skipped (a half-written
    /// file cannot exist: writes are atomic).
    pub async fn list<T: DeserializeOwned>(
        &self,
        kind: &str,
    ) -> Result<Vec<(String, T)>, RecordError> {
        match self {
            Records::Files(base) => {
                let Ok(entries) = std::fs::read_dir(Self::dir(base, kind)) else {
                    return Ok(Vec::new());
                };
                let mut out: Vec<(String, T)> = entries
                    .flatten()
                    .filter_map(|e| {
                        let file = e.file_name().to_string_lossy().into_owned();
                        let name = file.strip_suffix(".json")?.to_string();
                        let text = std::fs::read(e.path()).ok()?;
                        Some((name, serde_json::from_slice(&text).ok()?))
                    })
                    .collect();
                out.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(out)
            }
            Records::Etcd { etcd, .. } => Ok(etcd
                .list(kind)
                .await?
                .into_iter()
                .filter(|(name, _)| !name.contains('/'))
                .filter_map(|(name, v)| Some((name, serde_json::from_slice(&v).ok()?)))
                .collect()),
        }
    }

    /// One record, if it exists and reads.
    pub async fn get<T: DeserializeOwned>(
        &self,
        kind: &str,
        name: &str,
    ) -> Result<Option<T>, RecordError> {
        match self {
            Records::Files(_) => Ok(self
                .list::<T>(kind)
                .await?
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)),
            // One key, not the group's whole prefix.
            Records::Etcd { etcd, .. } => Ok(etcd
                .get(kind, name)
                .await?
                .and_then(|v| serde_json::from_slice(&v).ok())),
        }
    }

    /// Removes a record; a missing one is no error.
    pub async fn delete(&self, kind: &str, name: &str) -> Result<(), RecordError> {
        match self {
            Records::Files(base) => {
                let path = Self::dir(base, kind).join(format!("{name}.json"));
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(RecordError::Io { path, source: e })
                    }
                    _ => Ok(()),
                }
            }
            Records::Etcd { etcd, lead } => {
                let lead = current(lead).ok_or(EtcdError::NotLeader)?;
                Ok(etcd.delete(kind, name, Some(&lead)).await?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_records_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Records::Files(tmp.path().to_path_buf());
        r.put("intents", "d-1", &vec![1, 2]).await.unwrap();
        r.put("intents", "d-2", &vec![3]).await.unwrap();
        r.put("", "decider", &5u32).await.unwrap();
        assert!(tmp.path().join("intents/d-1.json").is_file());
        assert!(tmp.path().join("decider.json").is_file());
        let all: Vec<(String, Vec<u32>)> = r.list("intents").await.unwrap();
        assert_eq!(
            all,
            vec![("d-1".into(), vec![1, 2]), ("d-2".into(), vec![3])]
        );
        assert_eq!(r.get::<u32>("", "decider").await.unwrap(), Some(5));
        r.delete("intents", "d-1").await.unwrap();
        r.delete("intents", "d-1").await.unwrap();
        let all: Vec<(String, Vec<u32>)> = r.list("intents").await.unwrap();
        assert_eq!(all.len(), 1);
        let none: Vec<(String, u32)> = r.list("drains").await.unwrap();
        assert!(none.is_empty());
    }
}
