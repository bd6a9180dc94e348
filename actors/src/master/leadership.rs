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
use crate::master::launcher::Acting;
use crate::outage::{Outage, Say};

/// This master starts or stops leading.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Leading(pub bool);

/// How often the lead's validity is checked.
const CHECK: Duration = Duration::from_millis(100);
/// How often a lasting failure to reach the election is logged again.
const REPEAT_FAILURE_LOG: Duration = Duration::from_secs(60);

/// A look at the election's head in progress (`Election::leader`, bounded).
type Looking = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    Result<etcd_client::LeaderResponse, etcd_client::Error>,
                    tokio::time::error::Elapsed,
                >,
            > + Send,
    >,
>;

/// Runs the election for this master until aborted: campaigns, leads while the lease is kept,
/// steps down and campaigns again when it is not.
pub async fn run(
    cluster: Cluster,
    name: String,
    lead: LeadCell,
    subscribers: Vec<Recipient<Leading>>,
    acting: std::sync::Arc<Acting>,
    log: Logger,
) {
    let log = log.new(o!("actor" => "Leadership", "name" => name.clone()));
    let mut backoff = Backoff::new(Duration::from_millis(500), cluster.lease_ttl);
    // Failing to reach the election is logged at the start, then once a minute, not at
    // every retry through an etcd outage.
    let mut failing = Outage::new(REPEAT_FAILURE_LOG);
    loop {
        let started = Instant::now();
        let (end, was) = term(&cluster, &name, &lead, &subscribers, &acting, &log).await;
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
    acting: &Acting,
    log: &Logger,
) -> (Result<(), EtcdError>, bool) {
    let mut led = false;
    let r = term_inner(c, name, lead, subscribers, acting, &mut led, log).await;
    (r, led)
}

async fn term_inner(
    c: &Cluster,
    name: &str,
    lead: &LeadCell,
    subscribers: &[Recipient<Leading>],
    acting: &Acting,
    led: &mut bool,
    log: &Logger,
) -> Result<(), EtcdError> {
    let kv = Etcd::connect(c, Some(c.etcd_timeout)).await?;
    // The campaign waits for its turn: a connection without a request time limit.
    let waiting = Etcd::connect(c, None).await?;
    let mut client = kv.client();
    let sent = Instant::now();
    let granted = tokio::time::timeout(
        c.etcd_timeout,
        client.lease_grant(c.lease_ttl.as_secs() as i64, None),
    )
    .await
    .map_err(|_| EtcdError::Timeout("lease grant"))??;
    let lease = granted.id();
    // The TTL etcd granted is the one that counts (etcd may grant more than was asked).
    let ttl = Duration::from_secs(granted.ttl().max(1) as u64);
    let valid_for = ttl * 2 / 3;
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
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    renew.tick().await;
    let mut renewing: Option<Instant> = None;
    let mut check = tokio::time::interval(CHECK);
    // The campaign has no deadline of its own: the election is looked at now and then, and
    // a key of this lease at its head is leadership, whether or not the campaign's answer
    // ever comes (its member may have fallen into a minority).
    // The look runs beside the other arms (never blocking a renewal or the step-down check)
    // and gets no longer than a third of the TTL to answer.
    let mut look = tokio::time::interval(ttl / 3);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    look.tick().await;
    let mut looking: Option<Looking> = None;
    let mut elected: Option<LeaderKey> = None;
    let result = loop {
        let won = tokio::select! {
            r = &mut campaign, if elected.is_none() => {
                match r {
                    Ok(resp) => match resp.leader().cloned() {
                        Some(key) => Some(key),
                        None => break Err(EtcdError::Timeout("campaign (no leader key)")),
                    },
                    Err(e) => break Err(e.into()),
                }
            }
            _ = look.tick(), if looking.is_none() => {
                let mut c2 = kv.client();
                let name = election.clone();
                let limit = c.etcd_timeout.min(ttl / 3);
                looking = Some(Box::pin(async move {
                    tokio::time::timeout(limit, c2.leader(name)).await
                }));
                None
            }
            head = async { looking.as_mut().expect("guarded by the arm's condition").await },
                if looking.is_some() =>
            {
                looking = None;
                let ours = |kv: &etcd_client::KeyValue| kv.lease() == lease;
                match (&elected, head) {
                    // Leading: the head of the election must still be this lease's key (an
                    // operator may have deleted it); no answer is the renewals' business.
                    (Some(_), Ok(Ok(r))) if !r.kv().is_some_and(ours) => {
                        break Err(EtcdError::NotLeader)
                    }
                    (Some(_), Ok(Err(e))) if e.to_string().contains("no leader") => {
                        break Err(EtcdError::NotLeader)
                    }
                    (Some(_), _) => None,
                    (None, Ok(Ok(r))) => r.kv().filter(|kv| ours(kv)).map(|kv| {
                        LeaderKey::new()
                            .with_name(election.clone())
                            .with_key(kv.key().to_vec())
                            .with_rev(kv.create_revision())
                            .with_lease(lease)
                    }),
                    // No leader, or no answer: the campaign goes on.
                    (None, _) => None,
                }
            }
            _ = renew.tick() => {
                if renewing.is_none() {
                    renewing = Some(Instant::now());
                    if let Err(e) = keeper.keep_alive().await {
                        break Err(e.into());
                    }
                }
                None
            }
            a = answers.message() => match a {
                Ok(Some(resp)) if resp.ttl() > 0 => {
                    if let Some(at) = renewing.take() {
                        valid_until = at + valid_for;
                        if let Some(l) = lead.write().unwrap_or_else(|p| p.into_inner()).as_mut() {
                            l.valid_until = valid_until;
                        }
                    }
                    None
                }
                Ok(Some(_)) => break Err(EtcdError::Timeout("lease renewal (the lease expired)")),
                Ok(None) => break Err(EtcdError::Timeout("lease renewal (stream ended)")),
                Err(e) => break Err(e.into()),
            },
            _ = check.tick() => {
                if Instant::now() >= valid_until {
                    break Err(EtcdError::Timeout("lease renewal"));
                }
                None
            }
        };
        if let Some(key) = won {
            if Instant::now() >= valid_until {
                break Err(EtcdError::Timeout("lease renewal while campaigning"));
            }
            *lead.write().unwrap_or_else(|p| p.into_inner()) = Some(Lead {
                key: key.key().to_vec(),
                rev: key.rev(),
                lease,
                valid_until,
            });
            info!(log, "Leading"; "lease_ttl" => %humantime::format_duration(ttl));
            subscribers.iter().for_each(|s| s.do_send(Leading(true)));
            *led = true;
            elected = Some(key);
        }
    };
    // Out of the term: stop acting first — the lead cell cleared (guarded writes refused),
    // the launcher's tasks aborted here and now (a busy mailbox must not delay it) — then
    // tell the actors, then hand over early rather than let the lease run out.
    *lead.write().unwrap_or_else(|p| p.into_inner()) = None;
    if *led {
        let stopped = acting.stop();
        if stopped > 0 {
            warn!(log, "Stopped the launches and drains in progress; the next leader resumes them from their records"; "tasks" => stopped);
        }
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
