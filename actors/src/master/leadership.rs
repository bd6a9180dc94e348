//! Leadership (master role, `[cluster]`): etcd elects one master of the group; only it
//! decides, launches, terminates and reconciles. No consensus is made here — etcd's election
//! API decides who leads, on a lease this task keeps alive.
//!
//! ```text
//! grant lease (lease_ttl) ── keep it alive every ttl/3 ──┐
//! campaign (waits for its turn) ── elected ──▶ Leading(true) to the decider and launcher
//!                                               lead cell set: guarded writes succeed
//! no renewal for 2/3 ttl, or etcd gone ──▶ lead cell cleared, Leading(false), resign/revoke,
//!                                          start again
//! ```
//!
//! Safety: a renewal sent at `t` makes etcd keep the lease until at least `t + ttl`; this
//! master stops acting at `t + 2/3 ttl` unless a later renewal succeeded. So it has stopped
//! before its lease can expire and another master can be elected. Its writes are guarded by
//! its election key ([`crate::adapters::etcd`]): even a request in flight is refused once
//! the key is gone.

use std::time::{Duration, Instant};

use actix::{Message, Recipient};
use etcd_client::{Client, LeaderKey, ResignOptions};
use slog::{info, o, warn, Logger};

use crate::adapters::etcd::{Etcd, EtcdError, Lead, LeadCell};
use crate::backoff::Backoff;
use crate::config::Cluster;
use crate::outage::{Outage, Say};

/// This master starts or stops leading.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Leading(pub bool);

/// How often the lead's validity is checked.
const CHECK: Duration = Duration::from_millis(100);
/// How often a lasting failure to reach the election is logged again.
const REPEAT_FAILURE_LOG: Duration = Duration::from_secs(60);

/// Runs the election for this master until aborted: campaigns, leads while the lease is kept,
/// steps down and campaigns again when it is not.
pub async fn run(
    cluster: Cluster,
    name: String,
    lead: LeadCell,
    subscribers: Vec<Recipient<Leading>>,
    log: Logger,
) {
    let log = log.new(o!("actor" => "Leadership", "name" => name.clone()));
    let mut backoff = Backoff::new(Duration::from_millis(500), cluster.lease_ttl);
    // Failing to reach the election is logged at the start, then once a minute, not at
    // every retry through an etcd outage.
    let mut failing = Outage::new(REPEAT_FAILURE_LOG);
    loop {
        let started = Instant::now();
        let (end, was) = term(&cluster, &name, &lead, &subscribers, &log).await;
        match end {
            Ok(()) => {
                failing.ended(Instant::now());
            }
            Err(e) if was => {
                failing.ended(Instant::now());
                warn!(log, "Stepped down: no longer leading"; "error" => %e)
            }
            Err(e) => match failing.failed(Instant::now()) {
                Some(Say::Started) => {
                    warn!(log, "Cannot take part in the election; retrying"; "error" => %e)
                }
                Some(Say::Lasting(d)) => {
                    warn!(log, "Still cannot take part in the election; retrying"; "error" => %e,
                        "for" => %humantime::format_duration(d))
                }
                None => {}
            },
        }
        if started.elapsed() > cluster.lease_ttl * 3 {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// One term: a lease, a campaign, leading while the lease lives. Returns why it ended, and
/// whether it led.
async fn term(
    c: &Cluster,
    name: &str,
    lead: &LeadCell,
    subscribers: &[Recipient<Leading>],
    log: &Logger,
) -> (Result<(), EtcdError>, bool) {
    let mut led = false;
    let r = term_inner(c, name, lead, subscribers, &mut led, log).await;
    (r, led)
}

async fn term_inner(
    c: &Cluster,
    name: &str,
    lead: &LeadCell,
    subscribers: &[Recipient<Leading>],
    led: &mut bool,
    log: &Logger,
) -> Result<(), EtcdError> {
    let kv = Etcd::connect(c, Some(c.etcd_timeout)).await?;
    // The campaign waits for its turn: a connection without a request time limit.
    let waiting = Etcd::connect(c, None).await?;
    let ttl = c.lease_ttl;
    let valid_for = ttl * 2 / 3;
    let mut client = kv.client();
    let sent = Instant::now();
    let lease = tokio::time::timeout(
        c.etcd_timeout,
        client.lease_grant(ttl.as_secs() as i64, None),
    )
    .await
    .map_err(|_| EtcdError::Timeout("lease grant"))??
    .id();
    let mut valid_until = sent + valid_for;
    let (mut keeper, mut answers) =
        tokio::time::timeout(c.etcd_timeout, client.lease_keep_alive(lease))
            .await
            .map_err(|_| EtcdError::Timeout("lease keep-alive"))??;
    let mut campaign_client = waiting.client();
    let election = kv.election();
    let campaign = campaign_client.campaign(election.clone(), name.to_string(), lease);
    tokio::pin!(campaign);
    let mut renew = tokio::time::interval(ttl / 3);
    renew.tick().await;
    let mut renewing: Option<Instant> = None;
    let mut check = tokio::time::interval(CHECK);
    let mut elected: Option<LeaderKey> = None;
    let result = loop {
        tokio::select! {
            r = &mut campaign, if elected.is_none() => {
                let key = match r {
                    Ok(resp) => resp.leader().cloned(),
                    Err(e) => break Err(e.into()),
                };
                let Some(key) = key else {
                    break Err(EtcdError::Timeout("campaign (no leader key)"));
                };
                if Instant::now() >= valid_until {
                    break Err(EtcdError::Timeout("lease renewal while campaigning"));
                }
                *lead.write().unwrap_or_else(|p| p.into_inner()) = Some(Lead {
                    key: key.key().to_vec(),
                    rev: key.rev(),
                    lease,
                });
                info!(log, "Leading"; "lease_ttl" => %humantime::format_duration(ttl));
                subscribers.iter().for_each(|s| s.do_send(Leading(true)));
                *led = true;
                elected = Some(key);
            }
            _ = renew.tick() => {
                if renewing.is_none() {
                    renewing = Some(Instant::now());
                    if let Err(e) = keeper.keep_alive().await {
                        break Err(e.into());
                    }
                }
            }
            a = answers.message() => match a {
                Ok(Some(resp)) if resp.ttl() > 0 => {
                    if let Some(at) = renewing.take() {
                        valid_until = at + valid_for;
                    }
                }
                Ok(Some(_)) => break Err(EtcdError::Timeout("lease renewal (the lease expired)")),
                Ok(None) => break Err(EtcdError::Timeout("lease renewal (stream ended)")),
                Err(e) => break Err(e.into()),
            },
            _ = check.tick() => {
                if Instant::now() >= valid_until {
                    break Err(EtcdError::Timeout("lease renewal"));
                }
            }
        }
    };
    // Out of the term: stop acting first, then hand over early rather than let the lease
    // run out.
    *lead.write().unwrap_or_else(|p| p.into_inner()) = None;
    if *led {
        subscribers.iter().for_each(|s| s.do_send(Leading(false)));
    }
    let mut c2: Client = kv.client();
    if let Some(key) = elected {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            c2.resign(Some(ResignOptions::new().with_leader(key))),
        )
        .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), c2.lease_revoke(lease)).await;
    result
}

/// This master's name in the election: `[cluster] name`, else the host name.
pub fn name_of(c: &Cluster) -> String {
    match c.name.as_str() {
        "" => sysinfo::System::host_name().unwrap_or_else(|_| "master".into()),
        n => n.to_string(),
    }
}
