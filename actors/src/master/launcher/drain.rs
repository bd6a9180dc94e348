//! Settling one drain record: the host out of the registry (HAProxy stops sending it new
//! requests), `drain_timeout` for its connections to finish, then terminated (or stopped by
//! the scale-down command), its known_hosts lines removed, and the record deleted. A step that
//! fails is retried with backoff, for as long as it takes; each failure is logged.

use std::sync::Arc;
use std::time::Duration;

use slog::{info, o, warn, Logger};

use super::command::Stopped;
use super::intents::{now_ms, remove_drain, Drain};
use super::{Inner, LaunchError, Provisioner};
use crate::adapters::hosts_dir::HostsError;
use crate::adapters::known_hosts;
use crate::backoff::Backoff;
use crate::master::haproxy_writer::{DrainOutcome, WaitDrained};
use crate::master::registry::DeregisterHost;

/// Longest wait between two tries of a failing drain.
const RETRY_MAX: Duration = Duration::from_secs(300);

/// Starts settling `d` (recorded) unless this process already is.
pub fn start(inner: &Arc<Inner>, d: Drain) {
    if !inner.busy().drains.insert(d.key()) {
        return;
    }
    inner.spawn(settle(inner.clone(), d));
}

async fn settle(inner: Arc<Inner>, d: Drain) {
    let log = inner.log.new(o!("drain" => d.name()));
    let mut backoff = Backoff::new(inner.settings.retry_base, RETRY_MAX);
    let began = std::time::Instant::now();
    loop {
        match once(&inner, &d, &log).await {
            Ok(()) => {
                inner.metrics.termination(Some(began.elapsed()));
                break;
            }
            // Not this master's to finish any more: the record stays for the next leader.
            Err(e) if e.lost_lead() => {
                warn!(
                    log,
                    "Drain stopped: this master no longer leads; the next leader finishes it"
                );
                inner.busy().drains.remove(&d.key());
                return;
            }
            Err(e) => {
                inner.metrics.termination(None);
                let delay = backoff.next_delay();
                warn!(log, "Drain not finished; retrying"; "error" => %e,
                    "attempt" => backoff.attempts(), "retry_in" => ?delay);
                tokio::time::sleep(delay).await;
            }
        }
    }
    if let Err(e) = remove_drain(&inner.records, &d).await {
        warn!(log, "Cannot remove the finished drain's record; the next reconciliation settles it"; "error" => %e);
    }
    inner.busy().drains.remove(&d.key());
}

async fn once(inner: &Inner, d: &Drain, log: &Logger) -> Result<(), LaunchError> {
    let s = &inner.settings;
    if let Some(h) = &d.host {
        match inner.out.deregister.send(DeregisterHost(h.key())).await {
            Ok(Ok(())) => {
                info!(log, "Draining: out of the pool"; "host" => %h.host, "port" => h.port,
                "terminate_in" => ?Duration::from_millis(d.deadline_ms.saturating_sub(now_ms())))
            }
            Ok(Err(HostsError::NotFound(_))) => {} // Already out (a retry, or a restart).
            Ok(Err(e)) => return Err(LaunchError::from_registry(e)),
            Err(e) => return Err(LaunchError::Registry(e.to_string())),
        }
    }
    // HAProxy stops sending it new requests; its connections get until the deadline to end.
    let left = Duration::from_millis(d.deadline_ms.saturating_sub(now_ms()));
    match (&inner.out.drained, &d.host) {
        (Some(haproxy), Some(h)) => {
            let wait = haproxy.send(WaitDrained {
                server: h.key(),
                within: left,
            });
            match tokio::time::timeout(left + Duration::from_secs(5), wait).await {
                Ok(Ok(DrainOutcome::Drained)) => {
                    info!(log, "HAProxy has no more traffic for it"; "host" => %h.host, "port" => h.port,
                        "early_by" => ?Duration::from_millis(d.deadline_ms.saturating_sub(now_ms())))
                }
                _ => {
                    warn!(log, "Drain time is up; stopping the host with sessions possibly still open";
                        "host" => %h.host, "port" => h.port)
                }
            }
        }
        _ => tokio::time::sleep(left).await,
    }
    // The lease is checked right before the host is stopped.
    inner.may_act()?;
    match (&inner.provisioner, &d.instance_id, &d.host) {
        (Provisioner::Ec2(api), Some(id), _) => match api.terminate(id).await {
            Ok(()) => info!(log, "Terminated"; "instance_id" => id),
            Err(e) if e.not_found => info!(log, "Instance already gone"; "instance_id" => id),
            Err(e) => return Err(e.into()),
        },
        (Provisioner::Command(c), _, Some(h)) => match c.stop(h).await? {
            Stopped::Stopped => {
                info!(log, "Stopped (scale_down_command)"; "host" => %h.host, "port" => h.port)
            }
            Stopped::NotConfigured => {
                info!(log, "Removed from the pool; scale_down_command is empty, so the host was not stopped";
                    "host" => %h.host, "port" => h.port)
            }
        },
        _ => warn!(log, "Nothing to terminate: the record names no instance"),
    }
    if let Some(h) = &d.host {
        let port = h.ssh_port.unwrap_or(s.ssh_port);
        crate::master::cluster_sync::unshare(&inner.records, &h.host.to_string(), port).await?;
        known_hosts::remove(&s.known_hosts, &h.host.to_string(), port).map_err(|source| {
            LaunchError::KnownHosts {
                path: s.known_hosts.clone(),
                source,
            }
        })?;
    }
    Ok(())
}
