//! The EC2 provisioner: RunInstances with ClientToken = decision id and the group/decision
//! tags, then wait until the instances run with a private IP; terminate what a failed launch
//! created; and, at start, reconcile the group's instances with the registry and the intents.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use slog::{info, warn, Logger};

use super::intents::pending_intents;
use super::{LaunchError, LaunchInstances, LaunchSettings, LauncherOutputs};
use crate::adapters::ec2::{Ec2Api, InstanceInfo};
use crate::hosts::{Host, HostName, Origin};
use crate::master::registry::{DeregisterHost, ListHosts, RegisterHost};

/// How often a launch in progress asks EC2 whether its instances are running.
const POLL: Duration = Duration::from_secs(2);

/// Launches the instances of `msg` and waits until they run; every instance id is pushed to
/// `created` as soon as EC2 returns it, so a failure later can clean them up.
pub async fn provision(
    api: &dyn Ec2Api,
    settings: &LaunchSettings,
    msg: &LaunchInstances,
    log: &Logger,
    created: &mut Vec<String>,
) -> Result<Vec<Host>, LaunchError> {
    let launched = api.run_instances(msg.count, &msg.decision_id).await?;
    created.extend(launched.iter().map(|i| i.instance_id.clone()));
    info!(log, "RunInstances accepted"; "instances" => created.join(","));
    let running = wait_running(api, &msg.decision_id, created, settings.launch_timeout).await?;
    Ok(running
        .into_iter()
        .filter_map(|i| {
            Some(Host {
                host: HostName::parse(i.private_ip.as_deref()?).ok()?,
                port: settings.app_port,
                ssh_port: None,
                report_port: None,
                instance_id: Some(i.instance_id),
                origin: Origin::Launched,
            })
        })
        .collect())
}

/// Terminates the instances of a failed launch that were never registered: they cost money
/// and serve nobody.
pub async fn terminate_unregistered(
    api: &dyn Ec2Api,
    created: &[String],
    registered: &[Host],
    cause: &LaunchError,
    log: &Logger,
) {
    for id in created.iter().filter(|id| {
        !registered
            .iter()
            .any(|r| r.instance_id.as_ref() == Some(*id))
    }) {
        match api.terminate(id).await {
            Ok(()) => {
                info!(log, "Terminated instance of a failed launch"; "instance_id" => id, "cause" => %cause)
            }
            Err(t) => {
                warn!(log, "Cannot terminate instance of a failed launch; the next start adopts it"; "instance_id" => id, "error" => %t)
            }
        }
    }
}

/// Polls until every instance of `ids` runs with a private IP.
async fn wait_running(
    api: &dyn Ec2Api,
    decision: &str,
    ids: &[String],
    timeout: Duration,
) -> Result<Vec<InstanceInfo>, LaunchError> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = api.describe(Some(decision)).await?;
        let ready: Vec<_> = found
            .into_iter()
            .filter(|i| {
                ids.contains(&i.instance_id) && i.state == "running" && i.private_ip.is_some()
            })
            .collect();
        if ready.len() == ids.len() {
            return Ok(ready);
        }
        if Instant::now() + POLL > deadline {
            return Err(LaunchError::NotRunning {
                ids: ids.to_vec(),
                timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// After a restart: adopt running instances of the group that hosts.d lacks, remove launched
/// hosts whose instances are gone, and settle every pending intent.
pub async fn reconcile(
    api: &dyn Ec2Api,
    settings: &LaunchSettings,
    out: &LauncherOutputs,
    busy: &Mutex<HashSet<String>>,
    log: &Logger,
) -> Result<(), LaunchError> {
    let all = api.describe(None).await?;
    // Launches started since this process began are this process's own business: their
    // instances are not adopted here (the launch registers them itself).
    let active = busy.lock().map(|b| b.clone()).unwrap_or_default();
    let adoptable: Vec<_> = all
        .iter()
        .filter(|i| i.decision.as_ref().is_none_or(|d| !active.contains(d)))
        .collect();
    let hosts = out
        .list
        .send(ListHosts)
        .await
        .map_err(|e| LaunchError::Registry(e.to_string()))?;
    for i in adoptable.iter().filter(|i| i.state == "running") {
        let known = hosts
            .iter()
            .any(|h| h.instance_id.as_deref() == Some(i.instance_id.as_str()));
        let Some(ip) = i
            .private_ip
            .as_deref()
            .and_then(|ip| HostName::parse(ip).ok())
        else {
            continue;
        };
        if !known {
            info!(log, "Adopting running instance missing from hosts.d"; "instance_id" => &i.instance_id, "host" => %ip,
                "decision" => i.decision.as_deref().unwrap_or(""));
            let h = Host {
                host: ip,
                port: settings.app_port,
                ssh_port: None,
                report_port: None,
                instance_id: Some(i.instance_id.clone()),
                origin: Origin::Launched,
            };
            if let Ok(Err(e)) = out.register.send(RegisterHost(h)).await {
                warn!(log, "Cannot adopt instance"; "instance_id" => &i.instance_id, "error" => %e);
            }
        }
    }
    for h in hosts.iter().filter(|h| h.origin == Origin::Launched) {
        let Some(id) = &h.instance_id else { continue };
        let live = all.iter().any(|i| &i.instance_id == id && i.is_live());
        if !live {
            info!(log, "Removing host whose instance is gone"; "instance_id" => id, "host" => %h.host, "port" => h.port);
            let _ = out.deregister.send(DeregisterHost(h.key())).await;
        }
    }
    for (path, intent) in pending_intents(&settings.state_dir) {
        if active.contains(&intent.decision_id) {
            continue;
        }
        let launched = all
            .iter()
            .filter(|i| i.decision.as_deref() == Some(intent.decision_id.as_str()))
            .count();
        if launched > 0 {
            info!(log, "Pending launch found its instances; adopted"; "decision" => &intent.decision_id, "instances" => launched);
        } else {
            info!(log, "Pending launch never reached EC2; dropped (a new decision will launch if still needed)";
                "decision" => &intent.decision_id);
        }
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
