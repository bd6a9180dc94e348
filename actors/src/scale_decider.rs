//! ScaleDecider (master role): keeps each node's recent samples and state, asks the
//! [`policy`](crate::policy) once per tick, and carries out what it says: LaunchInstances to
//! the launcher; for scale-in, DeregisterHost (HAProxy stops sending it new requests), then
//! after `drain_timeout` TerminateInstance.
//!
//! Every decision is one structured log record with its inputs; a hold is logged when its
//! reason changes. With `dry_run` it decides and logs, and sends nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use actix::{Actor, AsyncContext, Context, Handler, Recipient};
use slog::{info, o, warn, Logger};

use crate::config::Scaling;
use crate::ec2_launcher::{LaunchFinished, LaunchInstances, TerminateInstance};
use crate::host_registry::DeregisterHost;
use crate::hosts::{Host, HostKey, Origin};
use crate::messages::{CpuReported, HostsChanged, NodeDown, NodeUp};
use crate::policy::{decide, Decision, History, NodeInput};

/// How often the policy runs.
pub const DEFAULT_TICK: Duration = Duration::from_secs(1);

/// Where decisions go; None in dry-run.
#[derive(Clone)]
pub struct DeciderOutputs {
    pub launch: Recipient<LaunchInstances>,
    pub terminate: Recipient<TerminateInstance>,
    pub deregister: Recipient<DeregisterHost>,
}

#[derive(Debug, Default)]
struct Track {
    up_since_ms: Option<u64>,
    samples: VecDeque<(u64, f64)>,
}

/// The actor.
pub struct ScaleDecider {
    cfg: Scaling,
    out: Option<DeciderOutputs>,
    tick: Duration,
    /// The master's clock: milliseconds since this actor was created.
    epoch: Instant,
    nodes: HashMap<HostKey, Track>,
    hosts: BTreeMap<HostKey, (Host, u64)>,
    hist: History,
    /// decision id → instances requested, until LaunchFinished.
    pending: HashMap<String, u32>,
    last_hold: Option<String>,
    log: Logger,
}

impl ScaleDecider {
    pub fn new(
        cfg: Scaling,
        out: Option<DeciderOutputs>,
        tick: Duration,
        log: &Logger,
    ) -> ScaleDecider {
        ScaleDecider {
            cfg,
            out,
            tick,
            epoch: Instant::now(),
            nodes: HashMap::new(),
            hosts: BTreeMap::new(),
            hist: History::default(),
            pending: HashMap::new(),
            last_hold: None,
            log: log.new(o!("actor" => "ScaleDecider")),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// How long samples are kept: the longest window plus the staleness allowance.
    fn retention(&self) -> u64 {
        (self.cfg.scale_up_window.max(self.cfg.scale_down_window) + self.cfg.stale_after)
            .as_millis() as u64
    }

    fn inputs(&self) -> Vec<NodeInput> {
        self.hosts
            .iter()
            .map(|(k, (h, seen))| {
                let t = self.nodes.get(k);
                NodeInput {
                    key: k.clone(),
                    up_since_ms: t.and_then(|t| t.up_since_ms),
                    samples: t
                        .map(|t| t.samples.iter().copied().collect())
                        .unwrap_or_default(),
                    launched: h.origin == Origin::Launched,
                    registered_ms: *seen,
                }
            })
            .collect()
    }

    fn evaluate(&mut self, ctx: &mut Context<Self>) {
        let now = self.now();
        let nodes = self.inputs();
        self.hist.in_flight = self.pending.values().sum();
        let decision = decide(&self.cfg, &nodes, &self.hist, now);
        let fleet = nodes.len();
        let in_flight = self.hist.in_flight;
        match decision {
            Decision::Hold(h) => {
                let reason = h.to_string();
                if self.last_hold.as_deref() != Some(reason.as_str()) {
                    info!(self.log, "Decision"; "action" => "hold", "reason" => &reason,
                        "nodes" => fleet, "in_flight" => in_flight, "policy" => %self.cfg.policy);
                    self.last_hold = Some(reason);
                }
            }
            Decision::ScaleUp { count, reason } => {
                self.last_hold = None;
                let id = format!(
                    "as-{}-{:08x}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    rand::random::<u32>()
                );
                info!(self.log, "Decision"; "action" => "scale_up", "count" => count, "reason" => &reason,
                    "nodes" => fleet, "in_flight" => in_flight, "decision" => &id, "dry_run" => self.cfg.dry_run);
                self.hist.last_scale_up_ms = Some(now);
                self.hist
                    .launches_ms
                    .extend(std::iter::repeat_n(now, count as usize));
                if let Some(out) = self.out.as_ref().filter(|_| !self.cfg.dry_run) {
                    self.pending.insert(id.clone(), count);
                    out.launch.do_send(LaunchInstances {
                        count,
                        decision_id: id,
                    });
                }
            }
            Decision::ScaleDown { host, reason } => {
                self.last_hold = None;
                info!(self.log, "Decision"; "action" => "scale_down", "host" => %host.host, "port" => host.port,
                    "reason" => &reason, "nodes" => fleet, "dry_run" => self.cfg.dry_run,
                    "drain" => %humantime::format_duration(self.cfg.drain_timeout));
                self.hist.last_scale_down_ms = Some(now);
                if let Some(out) = self.out.clone().filter(|_| !self.cfg.dry_run) {
                    let Some((h, _)) = self.hosts.get(&host).cloned() else {
                        return;
                    };
                    // Out of HAProxy first; terminate only after the drain time.
                    out.deregister.do_send(DeregisterHost(host));
                    ctx.run_later(self.cfg.drain_timeout, move |_, _| {
                        out.terminate.do_send(TerminateInstance { host: h })
                    });
                }
            }
        }
        let hour_ago = now.saturating_sub(3_600_000);
        self.hist.launches_ms.retain(|&t| t > hour_ago);
    }
}

impl Actor for ScaleDecider {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        info!(self.log, "Deciding"; "policy" => %self.cfg.policy, "dry_run" => self.cfg.dry_run,
            "launcher" => if self.out.is_some() { "configured" } else { "none" });
        ctx.run_interval(self.tick, |this, ctx| this.evaluate(ctx));
    }
}

impl Handler<CpuReported> for ScaleDecider {
    type Result = ();
    fn handle(&mut self, m: CpuReported, _: &mut Context<Self>) {
        let now = self.now();
        let keep = self.retention();
        let t = self.nodes.entry(m.host).or_default();
        t.samples.push_back((now, m.sample.busy_pct));
        while t
            .samples
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) > keep)
        {
            t.samples.pop_front();
        }
    }
}

impl Handler<NodeUp> for ScaleDecider {
    type Result = ();
    fn handle(&mut self, m: NodeUp, _: &mut Context<Self>) {
        let now = self.now();
        let t = self.nodes.entry(m.host).or_default();
        t.up_since_ms = Some(now);
        // Samples from before a gap say nothing about the window now.
        t.samples.clear();
    }
}

impl Handler<NodeDown> for ScaleDecider {
    type Result = ();
    fn handle(&mut self, m: NodeDown, _: &mut Context<Self>) {
        if let Some(t) = self.nodes.get_mut(&m.host) {
            t.up_since_ms = None;
            t.samples.clear();
        }
    }
}

impl Handler<HostsChanged> for ScaleDecider {
    type Result = ();
    fn handle(&mut self, m: HostsChanged, _: &mut Context<Self>) {
        let now = self.now();
        let mut next = BTreeMap::new();
        for h in m.hosts.iter() {
            let seen = self.hosts.get(&h.key()).map_or(now, |(_, s)| *s);
            next.insert(h.key(), (h.clone(), seen));
        }
        self.nodes.retain(|k, _| next.contains_key(k));
        self.hosts = next;
    }
}

impl Handler<LaunchFinished> for ScaleDecider {
    type Result = ();
    fn handle(&mut self, m: LaunchFinished, _: &mut Context<Self>) {
        self.pending.remove(&m.decision_id);
        match &m.error {
            None => {
                info!(self.log, "Launch finished"; "decision" => &m.decision_id, "registered" => m.registered.len())
            }
            Some(e) => {
                warn!(self.log, "Launch failed; a new decision will retry if load stays high";
                "decision" => &m.decision_id, "registered" => m.registered.len(), "requested" => m.requested, "error" => e)
            }
        }
    }
}
