//! The launcher's durable records ([`Records`]: `state_dir`, or etcd with several masters),
//! written before the side effect they stand for and settled by the reconciler after any
//! crash or a change of leader:
//!
//! - `intents/DECISION.json`: a launch; written before RunInstances (or the scale-up
//!   command), holding what the command printed as soon as it is known; removed when the
//!   launch is settled (registered, or cleaned up).
//! - `drains/NAME.json`: a host leaving; written before it is taken out of HAProxy, removed
//!   once its instance is terminated (or the scale-down command succeeded).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::LaunchError;
use crate::adapters::records::Records;
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

/// The record kinds.
pub const INTENTS: &str = "intents";
pub const DRAINS: &str = "drains";

/// Records (or updates) a launch intent durably.
pub async fn write_intent(r: &Records, i: &Intent) -> Result<(), LaunchError> {
    Ok(r.put(INTENTS, &i.decision_id, i).await?)
}

/// Every launch intent left (a launch that did not finish).
pub async fn pending_intents(r: &Records) -> Result<Vec<Intent>, LaunchError> {
    Ok(r.list(INTENTS).await?.into_iter().map(|(_, i)| i).collect())
}

/// Settles an intent: the launch is done, one way or another.
pub async fn remove_intent(r: &Records, decision: &str) -> Result<(), LaunchError> {
    Ok(r.delete(INTENTS, decision).await?)
}

/// Records a drain durably.
pub async fn write_drain(r: &Records, d: &Drain) -> Result<(), LaunchError> {
    Ok(r.put(DRAINS, &d.name(), d).await?)
}

/// Every drain not finished yet.
pub async fn pending_drains(r: &Records) -> Result<Vec<Drain>, LaunchError> {
    Ok(r.list(DRAINS).await?.into_iter().map(|(_, d)| d).collect())
}

/// Settles a drain: its host is gone.
pub async fn remove_drain(r: &Records, d: &Drain) -> Result<(), LaunchError> {
    Ok(r.delete(DRAINS, &d.name()).await?)
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

    #[tokio::test]
    async fn records_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Records::Files(tmp.path().to_path_buf());
        let mut i = Intent {
            decision_id: "d-1".into(),
            count: 2,
            at_ms: 5,
            launched: vec![],
        };
        write_intent(&r, &i).await.unwrap();
        assert!(tmp.path().join("intents/d-1.json").is_file());
        assert_eq!(pending_intents(&r).await.unwrap(), vec![i.clone()]);
        i.launched.push(Launched {
            host: Host::launched(HostName::parse("127.0.1.5").unwrap(), 80, None),
            host_keys: vec!["ssh-ed25519 AAAA".into()],
        });
        write_intent(&r, &i).await.unwrap();
        assert_eq!(pending_intents(&r).await.unwrap(), vec![i]);
        remove_intent(&r, "d-1").await.unwrap();
        assert!(pending_intents(&r).await.unwrap().is_empty());
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
        write_drain(&r, &d).await.unwrap();
        assert!(tmp.path().join("drains/127.0.1.6_80.json").is_file());
        assert_eq!(pending_drains(&r).await.unwrap(), vec![d.clone()]);
        remove_drain(&r, &d).await.unwrap();
        assert!(pending_drains(&r).await.unwrap().is_empty());
    }
}
