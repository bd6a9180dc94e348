//! One launch, new or resumed after a crash: from the intent to registered hosts, or to a
//! clean-up that terminates whatever it started and did not register.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use slog::{info, o, warn, Logger};
use tokio::time::Instant;

use super::command::Stopped;
use super::drain;
use super::intents::{now_ms, remove_intent, write_drain, write_intent, Drain, Intent, Launched};
use super::{ec2, Inner, LaunchError, Provisioner};
use crate::adapters::known_hosts;
use crate::hosts::{Host, HostKey, HostName};
use crate::master::decider::LaunchFinished;
use crate::master::registry::{ListHosts, RegisterHost};

/// Where a resumed launch picks up.
pub enum Resume {
    /// EC2 instances of the decision exist (pending or running); none yet visible: RunInstances
    /// is sent again with the decision's ClientToken, which answers with the first call's
    /// instances if it went through (EC2 lists new instances with a delay).
    Ec2 { instance_ids: Vec<String> },
    /// The scale-up command printed these hosts (empty: it is run again, with the same
    /// decision id).
    Command { launched: Vec<Launched> },
}

/// What a launch has done so far: what the clean-up must undo if it fails.
#[derive(Default)]
struct Progress {
    /// Instances RunInstances returned (EC2).
    created: Vec<String>,
    /// Hosts the provisioner started.
    launched: Vec<Launched>,
    registered: Vec<HostKey>,
}

/// Runs the launch of `decision` to its end and reports [`LaunchFinished`].
pub async fn run(inner: Arc<Inner>, decision: String, count: u32, resume: Option<Resume>) {
    let log = inner.log.new(o!("decision" => decision.clone()));
    match &resume {
        None => info!(log, "Launching"; "count" => count),
        Some(_) => info!(log, "Resuming a launch of an earlier run"; "count" => count),
    }
    let s = &inner.settings;
    let provision = match &inner.provisioner {
        Provisioner::Command(c) => c.timeout,
        Provisioner::Ec2(_) => s.launch_timeout,
    };
    // Every step is bounded on its own; this bounds the whole, so a hung call can never leave
    // the decider counting a launch in flight forever. The progress lives outside the bounded
    // future: when time runs out, the clean-up still knows what to undo.
    let limit = provision + s.health_timeout + s.slack;
    let began = std::time::Instant::now();
    let mut progress = Progress::default();
    let result = match tokio::time::timeout(
        limit,
        steps(&inner, &decision, count, resume, &mut progress, &log),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(LaunchError::TimedOut(limit)),
    };
    // Lost leadership is not a failed launch: nothing is undone, the record stays, and the
    // next leader resumes the launch from it.
    let lost = match &result {
        Err(e) => e.lost_lead() || inner.may_act().is_err(),
        Ok(()) => false,
    };
    // EC2 already made this decision's instances, with other settings than this master's
    // (IdempotentParameterMismatch): nothing of this call to undo; the record stays, and the
    // reconciler takes the instances up once EC2 lists them.
    let elsewhere = matches!(&result, Err(LaunchError::Api(e)) if e.token_reused());
    if elsewhere {
        warn!(log, "Launch left to the reconciler: EC2 has this decision's instances, launched with other settings; they are taken up once EC2 lists them";
            "error" => %result.as_ref().err().map(|e| e.to_string()).unwrap_or_default());
    }
    if lost {
        warn!(log, "Launch stopped: this master no longer leads; the next leader resumes it from its record";
            "error" => %result.as_ref().err().map(|e| e.to_string()).unwrap_or_default());
    }
    if lost || elsewhere {
        inner.busy().launches.remove(&decision);
        inner.out.finished.do_send(LaunchFinished {
            decision_id: decision,
            requested: count,
            registered: progress.registered,
            error: Some(match lost {
                true => "this master no longer leads".into(),
                false => {
                    "left to the reconciler (the ClientToken was used with other settings)".into()
                }
            }),
            abandoned: true,
        });
        return;
    }
    inner.metrics.launch(result.is_ok(), began.elapsed());
    match &result {
        Ok(()) => info!(log, "Launch finished"; "registered" => progress.registered.len()),
        Err(e) => {
            warn!(log, "Launch failed"; "error" => %e, "registered" => progress.registered.len());
            clean_up(&inner, &decision, &progress, e, &log).await;
        }
    }
    // Settled either way: registered, terminated, or handed to a drain record.
    if let Err(e) = remove_intent(&inner.records, &decision).await {
        warn!(log, "Cannot remove the settled launch's record; the next reconciliation settles it"; "error" => %e);
    }
    inner.busy().launches.remove(&decision);
    inner.out.finished.do_send(LaunchFinished {
        decision_id: decision,
        requested: count,
        registered: progress.registered,
        error: result.err().map(|e| e.to_string()),
        abandoned: false,
    });
}

async fn steps(
    inner: &Inner,
    decision: &str,
    count: u32,
    resume: Option<Resume>,
    progress: &mut Progress,
    log: &Logger,
) -> Result<(), LaunchError> {
    let s = &inner.settings;
    let mut intent = Intent {
        decision_id: decision.to_string(),
        count,
        at_ms: now_ms(),
        launched: vec![],
    };
    if resume.is_none() {
        // Durable before the call that costs money.
        durably(inner, log, || write_intent(&inner.records, &intent)).await?;
    }
    let may_act = || inner.may_act().is_ok();
    let launched = match (&inner.provisioner, resume) {
        (Provisioner::Ec2(api), resume) => {
            let ids = match resume {
                Some(Resume::Ec2 { instance_ids }) if !instance_ids.is_empty() => instance_ids,
                _ => ec2::run(&**api, s, decision, count, &may_act, log).await?,
            };
            progress.created = ids.clone();
            ec2::wait_running(&**api, decision, &ids, s)
                .await?
                .into_iter()
                .filter_map(|i| {
                    let ip = HostName::parse(i.private_ip.as_deref()?).ok()?;
                    Some(Launched {
                        host: Host::launched(ip, s.app_port, Some(i.instance_id)),
                        host_keys: vec![],
                    })
                })
                .collect::<Vec<_>>()
        }
        (Provisioner::Command(_), Some(Resume::Command { launched })) if !launched.is_empty() => {
            launched
        }
        (Provisioner::Command(c), _) => {
            // The lease is checked right before the command: a master that was stopped
            // (SIGSTOP, a paused VM) and wakes after another took over does not run it.
            inner.may_act()?;
            let locks = s.state_dir.join("locks");
            let launched = c.provision(decision, count, &locks).await?;
            intent.launched = launched.clone();
            // Once the command has printed its hosts, a crash resumes from them.
            durably(inner, log, || write_intent(&inner.records, &intent)).await?;
            launched
        }
    };
    progress.launched = launched.clone();
    // Every host gets ready at the same time: one slow host must not use up the others' time.
    let ready = join_all(launched.iter().map(|l| get_ready(inner, l, log))).await;
    ready.into_iter().collect::<Result<Vec<()>, _>>()?;
    for l in launched {
        inner.may_act()?;
        let mut h = l.host;
        h.registered_ms = Some(now_ms());
        // Its reports may prove this launch's key.
        h.decision = Some(decision.to_string());
        let key = h.key();
        durably(inner, log, || async {
            match inner.out.register.send(RegisterHost(h.clone())).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(LaunchError::from_registry(e)),
                Err(e) => Err(LaunchError::Registry(e.to_string())),
            }
        })
        .await?;
        progress.registered.push(key);
    }
    Ok(())
}

/// A write to the shared store, tried again while etcd cannot be reached and this master
/// still leads (with a backoff up to 2 s; the launch's own limit bounds it): a moment without
/// etcd is not a failed launch, whose clean-up would destroy what is about to be registered.
/// Once the lead is gone, `NotLeader`: the launch stops and the next leader resumes it.
async fn durably<T, E, F, Fut>(inner: &Inner, log: &Logger, mut op: F) -> Result<T, LaunchError>
where
    E: Into<LaunchError>,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut wait = Duration::from_millis(100);
    let mut said = false;
    loop {
        match op().await.map_err(Into::into) {
            Err(e) if e.store_unavailable() => {
                inner.may_act()?;
                if !std::mem::replace(&mut said, true) {
                    warn!(log, "etcd did not take the launch's write; trying again while this master leads"; "error" => %e);
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

/// Records the host's SSH keys (learnt from a channel bound to it) and waits until it
/// accepts TCP on its application port.
async fn get_ready(inner: &Inner, l: &Launched, log: &Logger) -> Result<(), LaunchError> {
    let s = &inner.settings;
    let host = l.host.host.to_string();
    if s.learn_host_keys {
        let keys = match (&inner.provisioner, &l.host.instance_id) {
            (Provisioner::Ec2(api), Some(id)) => {
                ec2::wait_host_keys(&**api, id, s.health_timeout, s.poll).await?
            }
            _ => l
                .host_keys
                .iter()
                .filter_map(|k| known_hosts::parse_key(k))
                .collect(),
        };
        if keys.is_empty() {
            warn!(log, "The scale-up command printed no host_key: the host's SSH key must already be known, or it will not report under host_key_policy = strict";
                "host" => &host);
        } else {
            let ssh_port = l.host.ssh_port.unwrap_or(s.ssh_port);
            known_hosts::replace(&s.known_hosts, &host, ssh_port, &keys).map_err(|source| {
                LaunchError::KnownHosts {
                    path: s.known_hosts.clone(),
                    source,
                }
            })?;
            info!(log, "Recorded the host's SSH keys"; "host" => &host, "keys" => keys.len());
            durably(inner, log, || {
                crate::master::cluster_sync::share(&inner.records, &host, ssh_port, &keys)
            })
            .await?;
        }
    }
    if s.health_check {
        info!(log, "Waiting for the host to accept TCP"; "host" => &host, "port" => l.host.port,
            "within" => ?s.health_timeout);
        health_gate(&host, l.host.port, s.health_timeout).await?;
    }
    Ok(())
}

/// Undoes a failed launch: what it started and did not register is terminated (EC2) or
/// stopped (the scale-down command), and its known_hosts lines go. What cannot be undone now
/// becomes a drain record, which the reconciler retries until it succeeds. Only while this
/// master leads: a step-down stops it, leaving the record to the next leader.
async fn clean_up(
    inner: &Arc<Inner>,
    decision: &str,
    p: &Progress,
    cause: &LaunchError,
    log: &Logger,
) {
    let s = &inner.settings;
    if inner.may_act().is_err() {
        return;
    }
    let unregistered = |h: &Host| !p.registered.contains(&h.key());
    for l in p.launched.iter().filter(|l| unregistered(&l.host)) {
        let ssh_port = l.host.ssh_port.unwrap_or(s.ssh_port);
        if let Err(e) = known_hosts::remove(&s.known_hosts, &l.host.host.to_string(), ssh_port) {
            warn!(log, "Cannot remove a failed host's known_hosts lines"; "host" => %l.host.host, "error" => %e);
        }
        let host = l.host.host.to_string();
        if let Err(e) = crate::master::cluster_sync::unshare(&inner.records, &host, ssh_port).await
        {
            warn!(log, "Cannot withdraw a failed host's shared SSH keys"; "host" => %l.host.host, "error" => %e);
        }
    }
    match &inner.provisioner {
        Provisioner::Ec2(api) => {
            let registered_ids: Vec<&str> = p
                .launched
                .iter()
                .filter(|l| !unregistered(&l.host))
                .filter_map(|l| l.host.instance_id.as_deref())
                .collect();
            for id in p
                .created
                .iter()
                .filter(|id| !registered_ids.contains(&id.as_str()))
            {
                if inner.may_act().is_err() {
                    return;
                }
                match api.terminate(id).await {
                    Ok(()) => {
                        info!(log, "Terminated instance of a failed launch"; "instance_id" => id, "cause" => %cause)
                    }
                    Err(e) => {
                        warn!(log, "Cannot terminate instance of a failed launch; retrying later"; "instance_id" => id, "error" => %e);
                        later(inner, None, Some(id.clone()), log).await;
                    }
                }
            }
        }
        Provisioner::Command(c) => {
            if let LaunchError::Command(f) = cause {
                if let (Some(stdout), true) = (&f.stdout, p.launched.is_empty()) {
                    stop_leftovers(inner, c, decision, stdout, f, log).await;
                    return;
                }
            }
            let log = log.new(o!("cause" => cause.to_string()));
            for l in p.launched.iter().filter(|l| unregistered(&l.host)) {
                if inner.may_act().is_err() {
                    return;
                }
                stop_unregistered(inner, c, &l.host, "host of a failed launch", &log).await;
            }
        }
    }
}

/// The scale-up command failed after it ran (a non-zero exit, a timeout, an answer that is
/// not the contract's): each host its answer names with address and port — and that is not
/// registered — is stopped with the scale-down command (a failure of that goes to a drain
/// record, retried as any); what is named only in part, or nothing, is said in the log.
async fn stop_leftovers(
    inner: &Arc<Inner>,
    c: &super::command::CommandProvisioner,
    decision: &str,
    stdout: &str,
    failed: &crate::adapters::process::CommandFailed,
    log: &Logger,
) {
    let known = super::command::leftovers(stdout, decision);
    if known.is_empty() {
        warn!(log, "The scale-up command failed after it ran and printed no host or instance id: anything it started keeps running unregistered (look for what it made for this decision, AUTOSCALER_DECISION)";
            "error" => %failed);
        return;
    }
    // A registered host is never a leftover, whatever a failing command prints.
    let registered = match inner.out.list.send(ListHosts).await {
        Ok(hosts) => hosts,
        Err(e) => {
            warn!(log, "Cannot list the registered hosts: what the failed scale-up command printed is left running";
                "error" => %e);
            return;
        }
    };
    for (i, l) in known.iter().enumerate() {
        if inner.may_act().is_err() {
            let left: Vec<String> = known[i..]
                .iter()
                .map(|l| format!("{:?} {:?}", l.host, l.instance_id))
                .collect();
            warn!(log, "No longer leading: what the failed scale-up command printed is left to stop by hand";
                "left" => left.join(", "));
            return;
        }
        let (host, id) = (
            l.host.as_deref().unwrap_or(""),
            l.instance_id.as_deref().unwrap_or(""),
        );
        let h = l.host();
        // Any registered machine: the same address on another port is the same machine.
        let taken = registered.iter().any(|r| {
            h.as_ref().is_some_and(|h| r.host == h.host)
                || (l.instance_id.is_some() && r.instance_id == l.instance_id)
        });
        if taken {
            warn!(log, "A failed scale-up command printed a registered host; it is left alone";
                "host" => host, "instance_id" => id);
            continue;
        }
        let Some(h) = h else {
            warn!(log, "A failed scale-up command printed a host without both address and port: whatever it is keeps running unregistered; stop it by hand";
                "host" => host, "port" => l.port, "instance_id" => id);
            continue;
        };
        stop_unregistered(inner, c, &h, "what a failed scale-up command printed", log).await;
    }
}

/// Stops `h`, started by a failed launch and not registered (`what` says how it is known),
/// with the scale-down command; one that cannot be stopped goes to a drain record, retried.
async fn stop_unregistered(
    inner: &Arc<Inner>,
    c: &super::command::CommandProvisioner,
    h: &Host,
    what: &str,
    log: &Logger,
) {
    let id = h.instance_id.as_deref().unwrap_or("");
    match c.stop(h).await {
        Ok(Stopped::Stopped) => {
            info!(log, "Stopped {}", what; "host" => %h.host, "port" => h.port, "instance_id" => id)
        }
        Ok(Stopped::NotConfigured) => {
            warn!(log, "Not stopped, scale_down_command is empty: {} keeps running", what;
                "host" => %h.host, "port" => h.port, "instance_id" => id)
        }
        Err(e) => {
            warn!(log, "Cannot stop {}; retrying later", what; "host" => %h.host, "error" => %e);
            later(inner, Some(h.clone()), h.instance_id.clone(), log).await;
        }
    }
}

/// Hands a host (or an instance) that could not be stopped to a drain record due now.
async fn later(inner: &Arc<Inner>, host: Option<Host>, instance_id: Option<String>, log: &Logger) {
    let now = now_ms();
    let d = Drain {
        host,
        instance_id,
        since_ms: now,
        deadline_ms: now,
    };
    match write_drain(&inner.records, &d).await {
        Ok(()) => drain::start(inner, d),
        Err(e) => {
            warn!(log, "Cannot record it either: the next start adopts it if it runs"; "error" => %e)
        }
    }
}

/// Waits until `host:port` accepts a TCP connection.
pub async fn health_gate(host: &str, port: u16, timeout: Duration) -> Result<(), LaunchError> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect((host, port)),
        )
        .await;
        if let Ok(Ok(_)) = attempt {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LaunchError::Unhealthy {
                host: host.to_string(),
                port,
                timeout,
            });
        }
        tokio::time::sleep(
            Duration::from_millis(250).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn health_gate_waits_for_a_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        health_gate("127.0.0.1", port, Duration::from_secs(2))
            .await
            .unwrap();
        drop(l);
        let e = health_gate("127.0.0.1", port, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, LaunchError::Unhealthy { .. }), "{e}");
    }
}
