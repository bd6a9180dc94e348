//! ScaleDecider (master role): keeps each node's recent samples and state, asks the
//! [`policy`](crate::policy) once per tick, and carries out what it says: LaunchInstances to
//! the launcher; for scale-in, DeregisterHost (HAProxy stops sending it new requests), then
//! after `drain_timeout` TerminateInstance.
//!
//! Every decision is one structured log record with its inputs; a hold is logged when its
//! reason changes. With `dry_run` it decides and logs, and sends nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use actix::{Actor, AsyncContext, Context, Handler, Message, Recipient};
use slog::{info, o, warn, Logger};

use super::launcher::{LaunchInstances, TerminateInstance};
use super::messages::{CpuReported, HostsChanged, NodeDown, NodeUp};
use super::registry::DeregisterHost;
use crate::config::Scaling;
use crate::hosts::{Host, HostKey, Origin};
use crate::policy::{decide_with_summary, Decision, History, NodeInput};

/// How often the policy runs.
pub const DEFAULT_TICK: Duration = Duration::from_secs(1);

/// A launch ended: what was registered, or why not.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct LaunchFinished {
    pub decision_id: String,
    pub requested: u32,
    pub registered: Vec<HostKey>,
    pub error: Option<String>,
}

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
    /// The master's clock starts when this actor is created (see [`ScaleDecider::now`]).
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

    /// Milliseconds on the decider's clock. It starts at the sample retention rather than 0,
    /// so a sample resent with an age up to that is still placed at a real time; no window can
    /// look as if covered by data from before the master started.
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + self.retention()
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
        let (decision, sum) = decide_with_summary(&self.cfg, &nodes, &self.hist, now);
        let fleet = nodes.len();
        let in_flight = self.hist.in_flight;
        let inputs = slog::o!("nodes" => fleet, "eligible" => sum.eligible, "in_flight" => in_flight,
            "mean_up_pct" => sum.mean_up.map(|m| format!("{m:.1}")), "hottest_pct" => sum.hottest.map(|m| format!("{m:.1}")),
            "mean_down_pct" => sum.mean_down.map(|m| format!("{m:.1}")), "policy" => self.cfg.policy.as_str());
        let log = self.log.new(inputs);
        match decision {
            Decision::Hold(h) => {
                let reason = h.to_string();
                if self.last_hold.as_deref() != Some(reason.as_str()) {
                    info!(log, "Decision"; "action" => "hold", "reason" => &reason);
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
                info!(log, "Decision"; "action" => "scale_up", "count" => count, "reason" => &reason,
                    "decision" => &id, "dry_run" => self.cfg.dry_run);
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
                info!(log, "Decision"; "action" => "scale_down", "host" => %host.host, "port" => host.port,
                    "reason" => &reason, "dry_run" => self.cfg.dry_run,
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
        // A sample resent after an outage is placed when it was taken, not when it arrived.
        let at = now.saturating_sub(m.sample.age_ms);
        let t = self.nodes.entry(m.host).or_default();
        let pos = t.samples.partition_point(|(x, _)| *x <= at);
        t.samples.insert(pos, (at, m.sample.busy_pct));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Layout, Role};
    use crate::hosts::HostName;
    use crate::report::{CpuSample, Hello};
    use actix::Addr;
    use std::path::Path;
    use std::sync::Arc;
    use tokio::sync::mpsc;

    #[derive(Debug)]
    enum Out {
        Launch(u32),
        Deregister(HostKey),
        Terminate(HostKey),
    }

    struct Sink(mpsc::UnboundedSender<Out>);
    impl Actor for Sink {
        type Context = Context<Self>;
    }
    impl Handler<LaunchInstances> for Sink {
        type Result = ();
        fn handle(&mut self, m: LaunchInstances, _: &mut Context<Self>) {
            let _ = self.0.send(Out::Launch(m.count));
        }
    }
    impl Handler<TerminateInstance> for Sink {
        type Result = ();
        fn handle(&mut self, m: TerminateInstance, _: &mut Context<Self>) {
            let _ = self.0.send(Out::Terminate(m.host.key()));
        }
    }
    impl Handler<DeregisterHost> for Sink {
        type Result = <DeregisterHost as Message>::Result;
        fn handle(&mut self, m: DeregisterHost, _: &mut Context<Self>) -> Self::Result {
            let _ = self.0.send(Out::Deregister(m.0));
            Ok(())
        }
    }

    fn scaling(dry_run: bool) -> Scaling {
        let mut c = Config::defaults(&Layout::for_dir(Path::new("/x")), Role::Master).scaling;
        c.scale_up_window = Duration::from_secs(10);
        c.scale_down_window = Duration::from_secs(20);
        c.warmup = Duration::from_secs(3);
        c.stale_after = Duration::from_secs(5);
        c.cooldown = Duration::from_secs(60);
        c.scale_down_cooldown = Duration::from_secs(60);
        c.drain_timeout = Duration::from_secs(5);
        c.min_nodes = 1;
        c.dry_run = dry_run;
        c
    }

    fn host(i: u8, origin: Origin) -> Host {
        let mut h = Host::manual(HostName::parse(&format!("127.0.1.{i}")).unwrap(), 80);
        h.origin = origin;
        h
    }

    /// A decider whose outputs land in the returned channel, told about `hosts`, all up.
    fn start(dry_run: bool, hosts: &[Host]) -> (Addr<ScaleDecider>, mpsc::UnboundedReceiver<Out>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = Sink(tx).start();
        let log = Logger::root(slog::Discard, o!());
        let out = DeciderOutputs {
            launch: sink.clone().recipient(),
            terminate: sink.clone().recipient(),
            deregister: sink.recipient(),
        };
        let d = ScaleDecider::new(scaling(dry_run), Some(out), DEFAULT_TICK, &log).start();
        d.do_send(HostsChanged {
            hosts: Arc::new(hosts.to_vec()),
        });
        for h in hosts {
            d.do_send(NodeUp {
                host: h.key(),
                hello: Hello {
                    node: "n".into(),
                    boot: 1,
                    instance_id: None,
                },
            });
        }
        (d, rx)
    }

    fn sample(seq: u64, busy_pct: f64, age_ms: u64) -> CpuSample {
        CpuSample {
            seq,
            ts_ms: 0,
            busy_pct,
            cores: 1,
            age_ms,
        }
    }

    /// Drives the actor on tokio's paused clock: `secs` seconds of one sample a second from
    /// every host at `busy`. Returns what it sent.
    async fn drive(dry_run: bool, hosts: Vec<Host>, busy: f64, secs: u64) -> Vec<Out> {
        let (d, mut rx) = start(dry_run, &hosts);
        for seq in 0..secs {
            for h in &hosts {
                d.do_send(CpuReported {
                    host: h.key(),
                    sample: sample(seq, busy, 0),
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut got = Vec::new();
        while let Ok(o) = rx.try_recv() {
            got.push(o);
        }
        got
    }

    #[actix_rt::test]
    async fn hot_node_launches_once_then_cools_down() {
        tokio::time::pause();
        let got = drive(false, vec![host(1, Origin::Manual)], 95.0, 30).await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(matches!(got[0], Out::Launch(1)));
    }

    /// Samples a node resends after an outage carry their age: they fill the window at once,
    /// placed when they were taken, not when they arrived.
    #[actix_rt::test]
    async fn resent_samples_are_placed_by_their_age() {
        tokio::time::pause();
        for (aged, want_launch) in [(true, true), (false, false)] {
            let h = host(1, Origin::Manual);
            let (d, mut rx) = start(false, std::slice::from_ref(&h));
            // 12 s of buffered samples (window: 10 s), all arriving now, oldest first.
            for seq in 0..12u64 {
                let age_ms = if aged { (11 - seq) * 1000 } else { 0 };
                d.do_send(CpuReported {
                    host: h.key(),
                    sample: sample(seq, 95.0, age_ms),
                });
            }
            // Only the warm-up (3 s) passes: far less than a window of live samples.
            tokio::time::sleep(Duration::from_millis(3500)).await;
            let launched = matches!(rx.try_recv(), Ok(Out::Launch(1)));
            assert_eq!(launched, want_launch, "aged = {aged}");
        }
    }

    #[actix_rt::test]
    async fn dry_run_sends_nothing() {
        tokio::time::pause();
        assert!(drive(true, vec![host(1, Origin::Manual)], 95.0, 30)
            .await
            .is_empty());
    }

    #[actix_rt::test]
    async fn idle_fleet_drains_then_terminates_the_launched_host() {
        tokio::time::pause();
        let got = drive(
            false,
            vec![host(1, Origin::Manual), host(2, Origin::Launched)],
            3.0,
            40,
        )
        .await;
        let k = host(2, Origin::Launched).key();
        assert!(
            matches!(&got[..], [Out::Deregister(a), Out::Terminate(b)] if *a == k && *b == k),
            "{got:?}"
        );
    }
}
