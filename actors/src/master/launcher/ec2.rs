//! The EC2 provisioner: RunInstances with ClientToken = decision id and the group/decision
//! tags, retried only after looking for the decision's instances; waiting until instances
//! run with a private IP; their SSH host keys from the console output.

use std::time::Duration;

use russh::keys::PublicKey;
use slog::{info, warn, Logger};
use tokio::time::Instant;

use super::{LaunchError, LaunchSettings};
use crate::adapters::ec2::{Ec2Api, InstanceInfo, MAX_ATTEMPTS};
use crate::adapters::known_hosts;
use crate::backoff::Backoff;

/// Asks for `count` instances for `decision`; returns their ids. A retryable failure may
/// hide a call that reached EC2 (its answer lost on the way back): before asking again, the
/// decision's instances are looked up by tag, so a retry never launches a second set, even
/// against an API that does not honour ClientToken.
pub async fn run(
    api: &dyn Ec2Api,
    settings: &LaunchSettings,
    decision: &str,
    count: u32,
    may_act: &(dyn Fn() -> bool + Sync),
    log: &Logger,
) -> Result<Vec<String>, LaunchError> {
    let mut backoff = Backoff::new(settings.retry_base, settings.retry_base * 16);
    let mut attempt = 1;
    loop {
        // The lease is checked right before each call that costs money.
        if !may_act() {
            return Err(LaunchError::NotLeader);
        }
        let e = match api.run_instances(count, decision).await {
            Ok(launched) => {
                let ids: Vec<String> = launched.into_iter().map(|i| i.instance_id).collect();
                info!(log, "RunInstances accepted"; "instances" => ids.join(","));
                return Ok(ids);
            }
            Err(e) => e,
        };
        if e.token_reused() {
            return wait_listed(api, settings, decision, e, log).await;
        }
        if !e.retryable || attempt >= MAX_ATTEMPTS {
            return Err(e.into());
        }
        let delay = backoff.next_delay();
        warn!(log, "RunInstances failed; looking for the decision's instances before asking again";
            "error" => %e, "attempt" => attempt, "retry_in" => ?delay);
        tokio::time::sleep(delay).await;
        match api.describe(Some(decision)).await {
            Ok(found) if !found.is_empty() => {
                let ids: Vec<String> = found.into_iter().map(|i| i.instance_id).collect();
                info!(log, "RunInstances had gone through; using its instances"; "instances" => ids.join(","));
                return Ok(ids);
            }
            Ok(_) => {}
            Err(d) if !d.retryable => return Err(d.into()),
            Err(d) => warn!(log, "Cannot look for the decision's instances"; "error" => %d),
        }
        attempt += 1;
    }
}

/// EC2 refused the decision's ClientToken with other parameters: a master with other
/// `[launch]` settings made the first call, and its instances exist. Waits (up to
/// `launch_timeout`) until EC2 lists them, and carries on with those; failing that, the error
/// stands and the launch's record stays for the reconciler.
async fn wait_listed(
    api: &dyn Ec2Api,
    settings: &LaunchSettings,
    decision: &str,
    e: crate::adapters::ec2::Ec2Error,
    log: &Logger,
) -> Result<Vec<String>, LaunchError> {
    warn!(log, "EC2 already launched this decision with other settings (IdempotentParameterMismatch); waiting until it lists those instances";
        "error" => %e);
    let deadline = Instant::now() + settings.launch_timeout;
    loop {
        match api.describe(Some(decision)).await {
            Ok(found) if !found.is_empty() => {
                let ids: Vec<String> = found.into_iter().map(|i| i.instance_id).collect();
                info!(log, "Using the decision's instances EC2 already had"; "instances" => ids.join(","));
                return Ok(ids);
            }
            Err(d) if !d.retryable => return Err(d.into()),
            _ => {}
        }
        if Instant::now() + settings.poll > deadline {
            return Err(e.into());
        }
        tokio::time::sleep(settings.poll).await;
    }
}

/// Polls until every instance of `ids` runs with a private IP; fails when one ends up
/// terminated or the time is up.
pub async fn wait_running(
    api: &dyn Ec2Api,
    decision: &str,
    ids: &[String],
    settings: &LaunchSettings,
) -> Result<Vec<InstanceInfo>, LaunchError> {
    let deadline = Instant::now() + settings.launch_timeout;
    loop {
        match api.describe(Some(decision)).await {
            Ok(found) => {
                let mine: Vec<_> = found
                    .into_iter()
                    .filter(|i| ids.contains(&i.instance_id))
                    .collect();
                if let Some(dead) = mine.iter().find(|i| !i.is_live()) {
                    return Err(LaunchError::Gone {
                        instance_id: dead.instance_id.clone(),
                        state: dead.state.clone(),
                    });
                }
                let ready: Vec<_> = mine
                    .into_iter()
                    .filter(|i| i.state == "running" && i.private_ip.is_some())
                    .collect();
                if ready.len() == ids.len() {
                    return Ok(ready);
                }
            }
            Err(e) if !e.retryable => return Err(e.into()),
            Err(_) => {} // the next poll asks again
        }
        if Instant::now() + settings.poll > deadline {
            return Err(LaunchError::NotRunning {
                ids: ids.to_vec(),
                timeout: settings.launch_timeout,
            });
        }
        tokio::time::sleep(settings.poll).await;
    }
}

/// Polls the instance's console output until cloud-init's host key block is there.
pub async fn wait_host_keys(
    api: &dyn Ec2Api,
    instance_id: &str,
    timeout: Duration,
    poll: Duration,
) -> Result<Vec<PublicKey>, LaunchError> {
    let deadline = Instant::now() + timeout;
    loop {
        match api.console_output(instance_id).await {
            Ok(text) => {
                let keys = known_hosts::keys_from_console(&text);
                if !keys.is_empty() {
                    return Ok(keys);
                }
            }
            Err(e) if !e.retryable => return Err(e.into()),
            Err(_) => {}
        }
        if Instant::now() + poll > deadline {
            return Err(LaunchError::NoHostKeys {
                instance_id: instance_id.to_string(),
                timeout,
            });
        }
        tokio::time::sleep(poll).await;
    }
}
