//! The reconciler: level-triggered, at start and every `reconcile_every`. It compares the
//! durable records (launch intents, drains), the registry and (EC2) the group's instances, and
//! settles every difference:
//!
//! - a launch intent of an earlier run whose instances exist (pending or running) is resumed
//!   from where it stopped; one whose instances EC2 does not show (yet: it lists new instances
//!   with a delay, and a call of a cut-off leader may still be on its way) is resumed by
//!   sending RunInstances again with its ClientToken — EC2 answers a repeated token with the
//!   first call's instances, or launches them if the first call never arrived — within
//!   [`TOKEN_WINDOW`] of the intent; an older one is dropped; with the command provisioner it
//!   is resumed from what the command printed, or by running the command again with the same
//!   decision id;
//! - a running instance of the group that nobody registered, launches or drains is adopted;
//! - a launched host whose instance is gone is removed, with its known_hosts lines;
//! - every drain record is carried to its end.
//!
//! The decider hears [`Reconciled`] before any resumed launch starts, so it counts them as in
//! flight and never launches again for them; it makes no decision before the first one.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use slog::{info, warn};

use super::drain;
use super::intents::{pending_drains, pending_intents, remove_intent};
use super::launch::{self, Resume};
use super::{Inner, LaunchError, Provisioner};
use crate::adapters::known_hosts;
use crate::hosts::{Host, HostName, Origin};
use crate::master::decider::Reconciled;
use crate::master::registry::{DeregisterHost, ListHosts, RegisterHost};

/// How long after its intent a launch that EC2 does not show is asked for again with its
/// ClientToken. EC2 keeps a RunInstances token's answer far longer; no instance stays invisible
/// for an hour.
pub const TOKEN_WINDOW: Duration = Duration::from_secs(3600);

/// One reconciliation, unless one is running already.
pub async fn run(inner: Arc<Inner>) {
    {
        let mut busy = inner.busy();
        if busy.reconciling {
            return;
        }
        busy.reconciling = true;
    }
    if let Err(e) = once(&inner).await {
        warn!(inner.log, "Reconciliation failed; trying again later"; "error" => %e,
            "retry_in" => ?inner.settings.reconcile_every);
    }
    inner.busy().reconciling = false;
}

async fn once(inner: &Arc<Inner>) -> Result<(), LaunchError> {
    let s = &inner.settings;
    let log = &inner.log;
    let active: HashSet<String> = inner.busy().launches.clone();
    let drains = pending_drains(&inner.records).await?;
    let intents = pending_intents(&inner.records).await?;
    let mut resumed = Vec::new();
    match &inner.provisioner {
        Provisioner::Ec2(api) => {
            let all = api.describe(None).await?;
            for intent in intents {
                if active.contains(&intent.decision_id) {
                    continue;
                }
                let instance_ids: Vec<String> = all
                    .iter()
                    .filter(|i| i.decision.as_deref() == Some(intent.decision_id.as_str()))
                    .filter(|i| i.is_live())
                    .map(|i| i.instance_id.clone())
                    .collect();
                let age = super::intents::now_ms().saturating_sub(intent.at_ms);
                if instance_ids.is_empty() && age > TOKEN_WINDOW.as_millis() as u64 {
                    info!(log, "Pending launch has no live instance an hour on (it never reached EC2, or they are gone); dropped";
                        "decision" => &intent.decision_id);
                    remove_intent(&inner.records, &intent.decision_id).await?;
                } else {
                    if instance_ids.is_empty() {
                        info!(log, "Pending launch shows no instance yet; asking again with its ClientToken";
                            "decision" => &intent.decision_id);
                    }
                    resumed.push((intent, Resume::Ec2 { instance_ids }));
                }
            }
            let launching: HashSet<&str> = active
                .iter()
                .map(String::as_str)
                .chain(resumed.iter().map(|(i, _)| i.decision_id.as_str()))
                .collect();
            let draining: HashSet<&str> = drains
                .iter()
                .filter_map(|d| d.instance_id.as_deref())
                .collect();
            let hosts = inner
                .out
                .list
                .send(ListHosts)
                .await
                .map_err(|e| LaunchError::Registry(e.to_string()))?;
            for i in all.iter().filter(|i| i.state == "running") {
                let known = hosts
                    .iter()
                    .any(|h| h.instance_id.as_deref() == Some(i.instance_id.as_str()));
                let busy = i.decision.as_deref().is_some_and(|d| launching.contains(d))
                    || draining.contains(i.instance_id.as_str());
                let ip = i
                    .private_ip
                    .as_deref()
                    .and_then(|ip| HostName::parse(ip).ok());
                let (false, false, Some(ip)) = (known, busy, ip) else {
                    continue;
                };
                info!(log, "Adopting running instance missing from the registry"; "instance_id" => &i.instance_id,
                    "host" => %ip, "decision" => i.decision.as_deref().unwrap_or(""));
                if s.learn_host_keys {
                    let keys = api
                        .console_output(&i.instance_id)
                        .await
                        .map(|text| known_hosts::keys_from_console(&text))
                        .unwrap_or_default();
                    match keys.is_empty() {
                        true => {
                            warn!(log, "No SSH host keys on the adopted instance's console"; "instance_id" => &i.instance_id)
                        }
                        false => {
                            if let Err(e) = known_hosts::replace(
                                &s.known_hosts,
                                &ip.to_string(),
                                s.ssh_port,
                                &keys,
                            ) {
                                warn!(log, "Cannot record the adopted instance's SSH keys"; "error" => %e);
                            }
                            let addr = ip.to_string();
                            let shared = crate::master::cluster_sync::share(
                                &inner.records,
                                &addr,
                                s.ssh_port,
                                &keys,
                            );
                            if let Err(e) = shared.await {
                                warn!(log, "Cannot share the adopted instance's SSH keys"; "error" => %e);
                            }
                        }
                    }
                }
                let mut h = Host::launched(ip, s.app_port, Some(i.instance_id.clone()));
                h.registered_ms = Some(super::intents::now_ms());
                if let Ok(Err(e)) = inner.out.register.send(RegisterHost(h)).await {
                    warn!(log, "Cannot adopt instance"; "instance_id" => &i.instance_id, "error" => %e);
                }
            }
            for h in hosts.iter().filter(|h| h.origin == Origin::Launched) {
                let Some(id) = &h.instance_id else { continue };
                let live = all.iter().any(|i| &i.instance_id == id && i.is_live());
                if live || draining.contains(id.as_str()) {
                    continue;
                }
                info!(log, "Removing host whose instance is gone"; "instance_id" => id, "host" => %h.host, "port" => h.port);
                let _ = inner.out.deregister.send(DeregisterHost(h.key())).await;
                let port = h.ssh_port.unwrap_or(s.ssh_port);
                if let Err(e) = known_hosts::remove(&s.known_hosts, &h.host.to_string(), port) {
                    warn!(log, "Cannot remove its known_hosts lines"; "error" => %e);
                }
                let host = h.host.to_string();
                if let Err(e) =
                    crate::master::cluster_sync::unshare(&inner.records, &host, port).await
                {
                    warn!(log, "Cannot withdraw its shared SSH keys"; "error" => %e);
                }
            }
        }
        Provisioner::Command(_) => {
            for intent in intents {
                if !active.contains(&intent.decision_id) {
                    let launched = intent.launched.clone();
                    resumed.push((intent, Resume::Command { launched }));
                }
            }
        }
    }
    // A launch that started while the records were being read is not one to resume: the
    // launches in progress are looked at before and after the read.
    {
        let mut busy = inner.busy();
        resumed.retain(|(i, _)| !busy.launches.contains(&i.decision_id));
        for (i, _) in &resumed {
            busy.launches.insert(i.decision_id.clone());
        }
    }
    // The decider counts these as in flight before any of them can finish.
    inner.out.reconciled.do_send(Reconciled {
        resumed: resumed
            .iter()
            .map(|(i, _)| (i.decision_id.clone(), i.count))
            .collect(),
    });
    for (intent, resume) in resumed {
        inner.spawn(launch::run(
            inner.clone(),
            intent.decision_id,
            intent.count,
            Some(resume),
        ));
    }
    for d in drains {
        drain::start(inner, d);
    }
    Ok(())
}
