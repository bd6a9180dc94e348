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
use crate::adapters::host_store::HostStore;
use crate::adapters::known_hosts;
use crate::adapters::records::{RecordError, Records};
use crate::hosts::{HostName, Origin};

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

/// Why a shared record is not applied here, if it is not: its host must be written as
/// `add-host` would take it, be a host the masters launched (on its SSH port), and have no
/// key an operator pinned in this master's known_hosts.
fn refusal(k: &SharedKeys, launched: &[(String, u16)], pinned: bool) -> Option<&'static str> {
    let valid = HostName::parse(&k.host).is_ok_and(|h| h.to_string() == k.host);
    match () {
        _ if !valid => Some("not a valid host name"),
        _ if !launched.iter().any(|(h, p)| *h == k.host && *p == k.port) => {
            Some("not a host the masters launched")
        }
        _ if pinned => Some("its key is pinned in known_hosts by hand"),
        _ => None,
    }
}

/// Every `poll`: known_hosts made to hold exactly the shared keys of the launched hosts that
/// have them (lines of other hosts, and keys an operator pinned, untouched). Runs until
/// aborted.
pub async fn known_hosts(etcd: Etcd, path: PathBuf, ssh_port: u16, poll: Duration, log: Logger) {
    let log = log.new(o!("actor" => "KnownHostsSync"));
    let mut applied: BTreeMap<String, SharedKeys> = BTreeMap::new();
    let mut refused: BTreeMap<String, &'static str> = BTreeMap::new();
    let mut failing = false;
    let hosts = HostStore::Etcd {
        etcd: etcd.clone(),
        lead: None,
    };
    loop {
        let read = async {
            let records = etcd.list(KIND).await.map_err(|e| e.to_string())?;
            let (hosts, _) = hosts.load().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((records, hosts))
        };
        match read.await {
            Ok((records, hosts)) => {
                failing = false;
                let launched: Vec<(String, u16)> = hosts
                    .iter()
                    .filter(|h| h.origin == Origin::Launched)
                    .map(|h| (h.host.to_string(), h.ssh_port.unwrap_or(ssh_port)))
                    .collect();
                let now: BTreeMap<String, SharedKeys> = records
                    .into_iter()
                    .filter_map(|(n, v)| Some((n, serde_json::from_slice(&v).ok()?)))
                    .collect();
                for (n, k) in &now {
                    if applied.get(n) == Some(k) {
                        continue;
                    }
                    let pinned = known_hosts::pinned(&path, &k.host, k.port).unwrap_or(true);
                    if let Some(why) = refusal(k, &launched, pinned) {
                        if refused.insert(n.clone(), why) != Some(why) {
                            warn!(log, "Shared SSH keys not recorded"; "host" => &k.host, "port" => k.port, "reason" => why);
                        }
                        continue;
                    }
                    refused.remove(n);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_valid_launched_unpinned_hosts_take_shared_keys() {
        let k = |host: &str, port| SharedKeys {
            host: host.into(),
            port,
            keys: vec![],
        };
        let launched = vec![("127.0.1.5".to_string(), 22)];
        assert_eq!(refusal(&k("127.0.1.5", 22), &launched, false), None);
        assert_eq!(
            refusal(&k("127.0.1.5", 22), &launched, true),
            Some("its key is pinned in known_hosts by hand")
        );
        assert_eq!(
            refusal(&k("127.0.1.5", 2222), &launched, false),
            Some("not a host the masters launched")
        );
        assert_eq!(
            refusal(&k("10.0.0.1", 22), &launched, false),
            Some("not a host the masters launched")
        );
        for bad in [
            "127.0.1.5\n10.0.0.1",
            "[127.0.1.5]:22",
            "host name",
            "Web-1",
            "*",
        ] {
            assert_eq!(
                refusal(&k(bad, 22), &[(bad.to_string(), 22)], false),
                Some("not a valid host name"),
                "{bad:?}"
            );
        }
    }
}
