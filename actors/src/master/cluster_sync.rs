//! Several masters: the SSH host keys the leader learns for the hosts it launches reach every
//! master's known_hosts, so each one's tunnels check them as strictly as the leader's do.
//! The leader shares them as `host_keys/HOST_PORT` records ([`share`]); every master copies
//! them into its known_hosts and removes the ones whose record went ([`known_hosts`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slog::{info, o, warn, Logger};

use crate::adapters::etcd::Etcd;
use crate::adapters::known_hosts;
use crate::adapters::records::{RecordError, Records};

/// The record kind.
pub const KIND: &str = "host_keys";

/// One host's SSH keys, as the leader learnt them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedKeys {
    pub host: String,
    pub port: u16,
    /// OpenSSH `TYPE BASE64` lines.
    pub keys: Vec<String>,
}

/// The record's name for `host:port`.
pub fn record_name(host: &str, port: u16) -> String {
    format!("{host}_{port}")
}

/// Shares `keys` of `host:port` with the other masters (nothing to do in files).
pub async fn share(
    records: &Records,
    host: &str,
    port: u16,
    keys: &[russh::keys::PublicKey],
) -> Result<(), RecordError> {
    if let Records::Files(_) = records {
        return Ok(());
    }
    let keys = keys.iter().filter_map(|k| k.to_openssh().ok()).collect();
    let shared = SharedKeys {
        host: host.to_string(),
        port,
        keys,
    };
    records.put(KIND, &record_name(host, port), &shared).await
}

/// Withdraws the keys of `host:port` (the host is gone).
pub async fn unshare(records: &Records, host: &str, port: u16) -> Result<(), RecordError> {
    if let Records::Files(_) = records {
        return Ok(());
    }
    records.delete(KIND, &record_name(host, port)).await
}

/// Every `poll`: known_hosts made to hold exactly the shared keys of the hosts that have them
/// (lines of other hosts untouched). Runs until aborted.
pub async fn known_hosts(etcd: Etcd, path: PathBuf, _ssh_port: u16, poll: Duration, log: Logger) {
    let log = log.new(o!("actor" => "KnownHostsSync"));
    let mut applied: BTreeMap<String, SharedKeys> = BTreeMap::new();
    let mut failing = false;
    loop {
        match etcd.list(KIND).await {
            Ok(records) => {
                failing = false;
                let now: BTreeMap<String, SharedKeys> = records
                    .into_iter()
                    .filter_map(|(n, v)| Some((n, serde_json::from_slice(&v).ok()?)))
                    .collect();
                for (n, k) in &now {
                    if applied.get(n) == Some(k) {
                        continue;
                    }
                    let keys: Vec<_> = k
                        .keys
                        .iter()
                        .filter_map(|l| known_hosts::parse_key(l))
                        .collect();
                    match known_hosts::replace(&path, &k.host, k.port, &keys) {
                        Ok(()) => {
                            info!(log, "Recorded a host's SSH keys shared by the leader"; "host" => &k.host, "keys" => keys.len());
                            applied.insert(n.clone(), k.clone());
                        }
                        Err(e) => {
                            warn!(log, "Cannot record shared SSH keys"; "file" => %path.display(), "error" => %e)
                        }
                    }
                }
                let gone: Vec<String> = applied
                    .keys()
                    .filter(|n| !now.contains_key(*n))
                    .cloned()
                    .collect();
                for n in gone {
                    let k = &applied[&n];
                    match known_hosts::remove(&path, &k.host, k.port) {
                        Ok(()) => {
                            applied.remove(&n);
                        }
                        Err(e) => warn!(log, "Cannot remove withdrawn SSH keys"; "error" => %e),
                    }
                }
            }
            Err(e) => {
                if !failing {
                    warn!(log, "Cannot read shared SSH keys from etcd; retrying"; "error" => %e);
                    failing = true;
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}
