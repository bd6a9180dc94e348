//! The launcher's durable records in `state_dir`, written before the side effect they stand
//! for and settled by the reconciler after any crash:
//!
//! - `intents/DECISION.json`: a launch; written before RunInstances (or the scale-up
//!   command), holding what the command printed as soon as it is known; removed when the
//!   launch is settled (registered, or cleaned up).
//! - `drains/NAME.json`: a host leaving; written before it is taken out of HAProxy, removed
//!   once its instance is terminated (or the scale-down command succeeded).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::LaunchError;
use crate::adapters::files;
use crate::hosts::{Host, HostKey};

/// A host a provisioner started, with the SSH host keys it learnt for it (OpenSSH text).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Launched {
    pub host: Host,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_keys: Vec<String>,
}

/// A launch intent on disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Intent {
    pub decision_id: String,
    pub count: u32,
    pub at_ms: u64,
    /// What the scale-up command printed (command provisioner), once known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub launched: Vec<Launched>,
}

/// A host (or an instance that never got as far as a host) on its way out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Drain {
    /// The registered host, when there is one: deregistered first.
    pub host: Option<Host>,
    /// The instance to terminate, when there is one.
    pub instance_id: Option<String>,
    pub since_ms: u64,
    /// Not terminated before this (Unix ms): the time connections get to finish.
    pub deadline_ms: u64,
}

impl Drain {
    /// The record's file name: unique per host (or per instance, without one).
    pub fn name(&self) -> String {
        match (&self.host, &self.instance_id) {
            (Some(h), _) => format!("{}_{}", h.host, h.port),
            (None, Some(id)) => id.clone(),
            (None, None) => "unnamed".into(),
        }
    }

    /// Who is draining, for the in-memory set of drains in progress.
    pub fn key(&self) -> DrainKey {
        match &self.host {
            Some(h) => DrainKey::Host(h.key()),
            None => DrainKey::Instance(self.instance_id.clone().unwrap_or_default()),
        }
    }
}

/// Identifies a drain in progress.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DrainKey {
    Host(HostKey),
    Instance(String),
}

fn write<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<PathBuf, LaunchError> {
    let path = dir.join(format!("{name}.json"));
    let text = serde_json::to_string(value).unwrap_or_default();
    files::create_dir_all(dir, 0o700)
        .and_then(|()| files::atomic_write(&path, text.as_bytes(), 0o600))
        .map_err(|source| LaunchError::Record {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

fn read_all<T: DeserializeOwned>(dir: &Path) -> Vec<(PathBuf, T)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, T)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            Some((e.path(), serde_json::from_str(&text).ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Where the intent of `decision` lives.
pub fn intent_path(state: &Path, decision: &str) -> PathBuf {
    state.join("intents").join(format!("{decision}.json"))
}

/// Records (or updates) a launch intent durably.
pub fn write_intent(state: &Path, i: &Intent) -> Result<PathBuf, LaunchError> {
    write(&state.join("intents"), &i.decision_id, i)
}

/// Every intent left in the state directory (a launch that did not finish).
pub fn pending_intents(state: &Path) -> Vec<(PathBuf, Intent)> {
    read_all(&state.join("intents"))
}

/// Records a drain durably.
pub fn write_drain(state: &Path, d: &Drain) -> Result<PathBuf, LaunchError> {
    write(&state.join("drains"), &d.name(), d)
}

/// Every drain not finished yet.
pub fn pending_drains(state: &Path) -> Vec<(PathBuf, Drain)> {
    read_all(&state.join("drains"))
}

/// Wall-clock milliseconds, for records that outlive the process.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::HostName;

    #[test]
    fn records_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let mut i = Intent {
            decision_id: "d-1".into(),
            count: 2,
            at_ms: 5,
            launched: vec![],
        };
        let p = write_intent(tmp.path(), &i).unwrap();
        assert_eq!(p, intent_path(tmp.path(), "d-1"));
        assert_eq!(pending_intents(tmp.path()), vec![(p.clone(), i.clone())]);
        i.launched.push(Launched {
            host: Host::launched(HostName::parse("127.0.1.5").unwrap(), 80, None),
            host_keys: vec!["ssh-ed25519 AAAA".into()],
        });
        write_intent(tmp.path(), &i).unwrap();
        assert_eq!(pending_intents(tmp.path()), vec![(p, i)]);
        let d = Drain {
            host: Some(Host::launched(
                HostName::parse("127.0.1.6").unwrap(),
                80,
                Some("i-1".into()),
            )),
            instance_id: Some("i-1".into()),
            since_ms: 1,
            deadline_ms: 2,
        };
        let p = write_drain(tmp.path(), &d).unwrap();
        assert!(p.ends_with("drains/127.0.1.6_80.json"), "{}", p.display());
        assert_eq!(pending_drains(tmp.path()), vec![(p, d)]);
    }
}
