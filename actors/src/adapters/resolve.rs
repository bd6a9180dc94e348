//! Host names to addresses, for HAProxy's server lines: HAProxy 2.6 does not resolve a server
//! added through the runtime API, so the master resolves every name itself (with this
//! machine's resolver) and hands HAProxy addresses, on the runtime and the reload paths
//! alike. IPv4 is taken first when a name has both; a name that stops resolving keeps its
//! last address (a DNS hiccup must not drain a server).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use crate::hosts::{Host, HostName};

/// How long one name may take to resolve.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The address HAProxy gets for a name that resolved to `addrs`: the first IPv4 one, else the
/// first IPv6 one.
pub fn pick(addrs: impl IntoIterator<Item = IpAddr>) -> Option<IpAddr> {
    let all: Vec<IpAddr> = addrs.into_iter().collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or_else(|| all.first())
        .copied()
}

/// The names among `hosts` (IP literals need no resolving).
pub fn names(hosts: &[Host]) -> BTreeSet<String> {
    hosts
        .iter()
        .filter_map(|h| match &h.host {
            HostName::Name(n) => Some(n.clone()),
            _ => None,
        })
        .collect()
}

/// Resolves `name` with this machine's resolver, bounded in time.
pub async fn lookup(name: &str) -> Result<IpAddr, String> {
    match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((name, 0))).await {
        Err(_) => Err(format!("no answer within {LOOKUP_TIMEOUT:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(addrs)) => pick(addrs.map(|a| a.ip())).ok_or_else(|| "no address".to_string()),
    }
}

/// Resolves `name` without a runtime (the one-shot `generate`).
pub fn lookup_blocking(name: &str) -> Option<IpAddr> {
    use std::net::ToSocketAddrs;
    pick((name, 0).to_socket_addrs().ok()?.map(|a| a.ip()))
}

/// What a round of resolving found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Every name with an address: a fresh one, or the last known one.
    pub addresses: BTreeMap<String, IpAddr>,
    /// Names that did not resolve this time, with why (those with a last address keep it).
    pub failed: BTreeMap<String, String>,
}

/// Resolves every name in `names`, keeping the addresses in `last` for those that fail.
pub async fn resolve_all(names: &BTreeSet<String>, last: &BTreeMap<String, IpAddr>) -> Resolved {
    let lookups = names
        .iter()
        .map(|n| async move { (n.clone(), lookup(n).await) });
    let mut out = Resolved::default();
    for (name, r) in futures_util::future::join_all(lookups).await {
        match r {
            Ok(ip) => {
                out.addresses.insert(name, ip);
            }
            Err(why) => {
                if let Some(ip) = last.get(&name) {
                    out.addresses.insert(name.clone(), *ip);
                }
                out.failed.insert(name, why);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_first() {
        let v6: IpAddr = "::1".parse().unwrap();
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(pick([v6, v4]), Some(v4));
        assert_eq!(pick([v6]), Some(v6));
        assert_eq!(pick([]), None);
    }

    #[tokio::test]
    async fn names_resolve_and_a_failed_one_keeps_its_last_address() {
        let names: BTreeSet<String> =
            ["localhost".to_string(), "nowhere.invalid".to_string()].into();
        let last: BTreeMap<String, IpAddr> =
            [("nowhere.invalid".to_string(), "127.0.0.9".parse().unwrap())].into();
        let r = resolve_all(&names, &last).await;
        assert_eq!(
            r.addresses["localhost"],
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            r.addresses["nowhere.invalid"],
            "127.0.0.9".parse::<IpAddr>().unwrap()
        );
        assert!(r.failed.contains_key("nowhere.invalid") && !r.failed.contains_key("localhost"));
        let fresh = resolve_all(&names, &BTreeMap::new()).await;
        assert!(!fresh.addresses.contains_key("nowhere.invalid"));
        assert_eq!(
            lookup_blocking("localhost"),
            Some("127.0.0.1".parse().unwrap())
        );
    }
}
