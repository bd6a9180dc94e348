//! ScaleDecider (master role): keeps each node's recent samples and state, asks the
//! [`policy`](crate::policy) once per tick, and carries out what it says: LaunchInstances to
//! the launcher; for scale-in, DrainHost to the launcher (which records the drain, takes the
//! host out of HAProxy and terminates it after `drain_timeout`).
//!
//! Its memory survives restarts: the guards' history (last scale-up and scale-in, launches of
//! the last hour) is kept in `state_dir/decider.json`; a node's warm-up counts from the
//! node's own boot (its hello says how long it has been up), and a node's samples are kept
//! across a reconnect of the same agent run, so neither a master restart nor an SSH blip
//! blinds it for warm-up + window. It makes no decision before it knows the registered hosts
//! and the launcher has reconciled (so launches resumed after a crash count as in flight).
//!
//! Every decision is one structured log record with its inputs; a hold is logged when its
//! reason, the number of nodes or the launches in flight change. With `dry_run` it decides
//! and logs, and sends nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, Recipient, WrapFuture,
};
use serde::{Deserialize, Serialize};
use slog::{info, o, warn, Logger};

use super::heard::Heard;
use super::launcher::{DrainHost, LaunchInstances};
use super::leadership::Leading;
use super::messages::{CpuReported, HostsChanged, NodeDown, NodeUp};
use crate::adapters::files;
use crate::adapters::records::Records;
use crate::config::Scaling;
use crate::hosts::{Host, HostKey, Origin};
use crate::metrics::Metrics;
use crate::policy::{decide_all, Decision, History, NodeInput};

/// How often the policy runs.
pub const DEFAULT_TICK: Duration = Duration::from_secs(1);
/// Where the decider's clock starts: far enough from 0 that history loaded from disk and
/// samples resent with their age are placed at real times.
const CLOCK_ORIGIN: Duration = Duration::from_secs(24 * 3600);

/// A launch ended: what was registered, or why not.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct LaunchFinished {
    pub decision_id: String,
    pub requested: u32,
    pub registered: Vec<HostKey>,
    pub error: Option<String>,
    /// Not settled here: this master stopped leading, or the launch was left to the
    /// reconciler. Neither a failure nor a success of the launcher.
    pub abandoned: bool,
}

/// The launcher settled what it found on disk and in EC2. `resumed` are launches of an
/// earlier run it is finishing: they count as in flight until their LaunchFinished.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Reconciled {
    pub resumed: Vec<(String, u32)>,
}

/// One HAProxy server's backend load, as its worker read it (HAProxy signals on).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct BalancerLoad {
    /// Its name in `[haproxy] servers`.
    pub server: String,
    pub sample: crate::haproxy_api::LbSample,
}

/// Use these scaling settings from now on (the configuration was reloaded). The guards'
/// history and the nodes' samples are kept.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct SetScaling(pub Scaling);

/// What the decider knows and decided, for `autoscaler status`.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "DecisionStatus")]
pub struct GetDecisionStatus;

/// The answer to [`GetDecisionStatus`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct DecisionStatus {
    pub policy: String,
    pub dry_run: bool,
    /// Each registered host: its window means and why it takes no part, if it does not.
    pub nodes: Vec<NodeStatusLine>,
    /// The last scale-up or scale-in: action, reason, how long ago (ms).
    pub last_action: Option<(String, String, u64)>,
    /// What it would do now, when that is to hold.
    pub holding: Option<String>,
    /// Launches in flight: decision id, instances.
    pub in_flight: Vec<(String, u32)>,
    /// Time left before `cooldown` lets a scale-up happen (ms), if it holds.
    pub cooldown_left_ms: Option<u64>,
    /// Time left before `scale_down_cooldown` lets a scale-in happen (ms), if it holds.
    pub scale_down_cooldown_left_ms: Option<u64>,
    /// Time left before `max_launches_per_hour` allows a launch (ms), if it holds.
    pub hourly_cap_left_ms: Option<u64>,
    /// Launches in a row that failed, and the time left before the next may be asked for.
    pub failed_launches: u32,
    pub launch_backoff_left_ms: Option<u64>,
    pub max_launches_per_hour: u32,
    pub launches_last_hour: usize,
    /// Each HAProxy signal that is on, against its target.
    pub signals: Vec<SignalStatusLine>,
}

/// One HAProxy signal in [`DecisionStatus`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct SignalStatusLine {
    pub signal: String,
    /// Over scale_up_window, across the HAProxy servers whose figures cover it.
    pub value: Option<f64>,
    pub target: f64,
    /// The nodes it asks for (None: no opinion).
    pub desired: Option<u32>,
    /// HAProxy servers with figures covering the window, and without.
    pub covered: usize,
    pub missing: usize,
}

/// One node in [`DecisionStatus`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatusLine {
    pub host: String,
    pub port: u16,
    pub mean_up_pct: Option<f64>,
    pub mean_down_pct: Option<f64>,
    pub why_not: Option<String>,
}

/// Where decisions go; None in dry-run.
#[derive(Clone)]
pub struct DeciderOutputs {
    pub launch: Recipient<LaunchInstances>,
    pub drain: Recipient<DrainHost>,
}

/// What the guards remember across restarts, in Unix milliseconds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Remembered {
    last_scale_up_ms: Option<u64>,
    last_scale_down_ms: Option<u64>,
    #[serde(default)]
    launches_ms: Vec<u64>,
    /// Launches in a row that failed, and when the last did.
    #[serde(default)]
    failed_launches: u32,
    #[serde(default)]
    last_failure_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct Track {
    up: bool,
    /// The agent run (hello's boot) the samples come from.
    boot: Option<u64>,
    born_ms: Option<u64>,
    samples: VecDeque<(u64, f64)>,
}

/// The actor.
pub struct ScaleDecider {
    cfg: Scaling,
    out: Option<DeciderOutputs>,
    /// `state_dir/decider.json`, when decisions act (not in dry-run).
    memory: Option<PathBuf>,
    /// With several masters: the memory in etcd (written before acting, read on taking the
    /// lead), and whether this master leads; only the leader acts.
    shared: Option<Records>,
    leading: bool,
    /// Counts leadership changes: a memory read for an earlier term is dropped.
    term: u64,
    tick: Duration,
    /// The decider's clock starts when this actor is created (see [`ScaleDecider::now`]).
    epoch: Instant,
    nodes: HashMap<HostKey, Track>,
    hosts: BTreeMap<HostKey, Host>,
    hosts_known: bool,
    /// The launcher reconciled at least once (always true without one).
    reconciled: bool,
    hist: History,
    /// decision id → instances requested, until LaunchFinished.
    pending: HashMap<String, u32>,
    /// When each launch of this run was decided (its instances' place in the hourly count).
    decided_at: HashMap<String, u64>,
    last_hold: Option<String>,
    /// The reason of the last hold, and the last scale-up/in (at, action, reason).
    holding: Option<String>,
    last_action: Option<(u64, String, String)>,
    /// Each HAProxy server of `[haproxy] servers` (all of them, answering or not): the
    /// backend load it measured (received at, sample).
    balancers: BTreeMap<String, VecDeque<(u64, crate::haproxy_api::LbSample)>>,
    /// Set while a HAProxy signal is on: the HAProxy workers read the load.
    sampling: Arc<AtomicBool>,
    /// The tunnels' samples, taken at each tick.
    heard: Option<Heard>,
    metrics: Arc<Metrics>,
    log: Logger,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ScaleDecider {
    /// A decider sending to `out` (None: dry-run, or nothing to launch with), remembering its
    /// guards in `memory`.
    pub fn new(
        cfg: Scaling,
        out: Option<DeciderOutputs>,
        memory: Option<PathBuf>,
        tick: Duration,
        log: &Logger,
    ) -> ScaleDecider {
        let log = log.new(o!("actor" => "ScaleDecider"));
        let mut d = ScaleDecider {
            reconciled: out.is_none(),
            cfg,
            out,
            memory,
            tick,
            epoch: Instant::now(),
            nodes: HashMap::new(),
            hosts: BTreeMap::new(),
            hosts_known: false,
            hist: History::default(),
            pending: HashMap::new(),
            decided_at: HashMap::new(),
            last_hold: None,
            holding: None,
            last_action: None,
            shared: None,
            leading: true,
            term: 0,
            balancers: BTreeMap::new(),
            sampling: Arc::default(),
            heard: None,
            metrics: Arc::default(),
            log,
        };
        d.recall();
        d
    }

    /// Several masters: acts only after [`Leading`], with its memory in `shared`.
    pub fn following(mut self, shared: Records) -> ScaleDecider {
        self.leading = false;
        self.memory = None;
        self.shared = Some(shared);
        self
    }

    /// Weighs the backend load these HAProxy servers measure ([`BalancerLoad`]); one that
    /// never sends any is missing, never "no load". `sampling` is set while a HAProxy
    /// signal is on (the HAProxy workers read the load only then).
    pub fn with_balancers(
        mut self,
        names: impl IntoIterator<Item = String>,
        sampling: Arc<AtomicBool>,
    ) -> ScaleDecider {
        self.balancers = names.into_iter().map(|n| (n, VecDeque::new())).collect();
        sampling.store(self.cfg.haproxy_signals(), Ordering::Relaxed);
        self.sampling = sampling;
        self
    }

    fn balancer_inputs(&self) -> Vec<crate::policy::BalancerInput> {
        self.balancers
            .iter()
            .map(|(name, samples)| crate::policy::BalancerInput {
                name: name.clone(),
                samples: samples.iter().copied().collect(),
            })
            .collect()
    }

    /// Takes the samples the tunnels fold into `heard` at each tick (besides those sent to it
    /// as [`CpuReported`]).
    pub fn with_samples(mut self, heard: Heard) -> ScaleDecider {
        self.heard = Some(heard);
        self
    }

    /// Puts a sample of `host`'s taken `age_ms` before `now` in its series, and lets go of
    /// what is older than the longest window needs.
    fn place(&mut self, host: HostKey, now: u64, age_ms: u64, busy_pct: f64) {
        let keep = self.retention_d().as_millis() as u64;
        // A sample resent after an outage is placed when it was taken, not when it arrived.
        let at = now.saturating_sub(age_ms);
        let t = self.nodes.entry(host).or_default();
        let pos = t.samples.partition_point(|(x, _)| *x <= at);
        t.samples.insert(pos, (at, busy_pct));
        while t
            .samples
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) > keep)
        {
            t.samples.pop_front();
        }
    }

    /// Takes the tunnels' fresh samples into the series: each placed when it was read (plus
    /// its age on the node); those of an agent run other than the node's current one, and of
    /// hosts no longer registered, are left out. A node whose hello has not been handled yet
    /// takes its run from its samples (NodeUp of that run then keeps them).
    fn take_heard(&mut self) {
        let Some(heard) = &self.heard else { return };
        let now = self.now();
        for (host, fresh) in heard.take_fresh() {
            if !self.hosts.contains_key(&host) {
                continue;
            }
            let t = self.nodes.entry(host.clone()).or_default();
            // The newest run, when the batch spans a restart of the agent.
            let newest = fresh.last().map_or(0, |f| f.boot);
            let boot = *t.boot.get_or_insert(newest);
            for f in fresh {
                if f.boot != boot {
                    continue;
                }
                let age = f.arrived.elapsed().as_millis() as u64 + f.sample.age_ms;
                self.place(host.clone(), now, age, f.sample.busy_pct);
            }
        }
    }

    /// Counts its decisions in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> ScaleDecider {
        self.metrics = metrics;
        self
    }

    /// Milliseconds on the decider's clock (see [`CLOCK_ORIGIN`]).
    fn now(&self) -> u64 {
        let origin = CLOCK_ORIGIN.max(self.retention_d());
        (self.epoch.elapsed() + origin).as_millis() as u64
    }

    /// How long samples are kept: the longest window plus the staleness allowance.
    fn retention_d(&self) -> Duration {
        self.cfg.scale_up_window.max(self.cfg.scale_down_window) + self.cfg.stale_after
    }

    /// Loads the guards' history from `memory`.
    fn recall(&mut self) {
        let Some(path) = &self.memory else { return };
        let m: Remembered = match std::fs::read_to_string(path) {
            Ok(text) => match serde_json::from_str(&text) {
                Ok(m) => m,
                Err(e) => {
                    warn!(self.log, "Cannot read the decider's memory; starting without it"; "file" => %path.display(), "error" => %e);
                    return;
                }
            },
            Err(_) => return,
        };
        self.apply_memory(m);
    }

    /// Takes remembered guards (Unix ms) onto the decider's clock.
    fn apply_memory(&mut self, m: Remembered) {
        let (now, wall) = (self.now(), wall_ms());
        let to_clock = |t: u64| now.saturating_sub(wall.saturating_sub(t));
        self.hist.last_scale_up_ms = m.last_scale_up_ms.map(to_clock);
        self.hist.last_scale_down_ms = m.last_scale_down_ms.map(to_clock);
        self.hist.launches_ms = m.launches_ms.into_iter().map(to_clock).collect();
        self.hist.failed_launches = m.failed_launches;
        self.hist.last_failure_ms = m.last_failure_ms.map(to_clock);
        info!(self.log, "Recalled the guards' history"; "launches_last_hour" => self.hist.launches_ms.len(),
            "failed_launches" => m.failed_launches);
    }

    /// The guards' history as it is remembered (Unix ms).
    fn memory_now(&self) -> Remembered {
        let (now, wall) = (self.now(), wall_ms());
        let to_wall = |t: u64| wall.saturating_sub(now.saturating_sub(t));
        Remembered {
            last_scale_up_ms: self.hist.last_scale_up_ms.map(to_wall),
            last_scale_down_ms: self.hist.last_scale_down_ms.map(to_wall),
            launches_ms: self.hist.launches_ms.iter().copied().map(to_wall).collect(),
            failed_launches: self.hist.failed_launches,
            last_failure_ms: self.hist.last_failure_ms.map(to_wall),
        }
    }

    /// Carries out `act` once the memory is durable: at once with a file (written here), after
    /// etcd took it with several masters (not at all if etcd refuses: this master no longer
    /// leads, and its launch in flight is forgotten).
    fn remember_then(
        &mut self,
        ctx: &mut Context<Self>,
        decision: Option<String>,
        act: impl FnOnce() + 'static,
    ) {
        let Some(shared) = self.shared.clone() else {
            self.remember();
            act();
            return;
        };
        let m = self.memory_now();
        ctx.spawn(
            async move { shared.put("", "decider", &m).await }
                .into_actor(self)
                .map(move |written, this, _| match written {
                    Ok(()) => act(),
                    Err(e) => {
                        warn!(this.log, "Decision not carried out: its record was refused"; "error" => %e);
                        if let Some(id) = decision {
                            this.pending.remove(&id);
                            this.decided_at.remove(&id);
                        }
                    }
                }),
        );
    }

    /// Writes the guards' history to `memory`, before the decision is carried out.
    fn remember(&self) {
        let Some(path) = &self.memory else { return };
        let m = self.memory_now();
        let text = serde_json::to_string(&m).unwrap_or_default();
        let written = path
            .parent()
            .map_or(Ok(()), |d| files::create_dir_all(d, 0o700))
            .and_then(|()| files::atomic_write(path, text.as_bytes(), 0o600));
        if let Err(e) = written {
            warn!(self.log, "Cannot save the decider's memory; a restart would forget this decision's cooldown"; "file" => %path.display(), "error" => %e);
        }
    }

    fn inputs(&self) -> Vec<NodeInput> {
        self.hosts
            .iter()
            .map(|(k, h)| {
                let t = self.nodes.get(k);
                NodeInput {
                    key: k.clone(),
                    up: t.is_some_and(|t| t.up),
                    born_ms: t.and_then(|t| t.born_ms),
                    samples: t
                        .map(|t| t.samples.iter().copied().collect())
                        .unwrap_or_default(),
                    launched: h.origin == Origin::Launched,
                    registered_ms: h.registered_ms.unwrap_or(0),
                }
            })
            .collect()
    }

    fn evaluate(&mut self, ctx: &mut Context<Self>) {
        self.take_heard();
        // A follower decides too (logged, never carried out), so an operator sees what it
        // would do; a leader waits for the launcher's first reconciliation.
        if !(self.hosts_known && (self.reconciled || !self.leading)) {
            return;
        }
        let now = self.now();
        let nodes = self.inputs();
        self.hist.in_flight = self.pending.values().sum();
        let balancers = self.balancer_inputs();
        let (decision, sum) = decide_all(&self.cfg, &nodes, &balancers, &self.hist, now);
        let fleet = nodes.len();
        let in_flight = self.hist.in_flight;
        let inputs = slog::o!("nodes" => fleet, "eligible" => sum.eligible, "in_flight" => in_flight,
            "mean_up_pct" => sum.mean_up.map(|m| format!("{m:.1}")), "hottest_pct" => sum.hottest.map(|m| format!("{m:.1}")),
            "mean_down_pct" => sum.mean_down.map(|m| format!("{m:.1}")), "policy" => self.cfg.policy.as_str());
        let log = match self.leading {
            true => self.log.new(inputs),
            false => self.log.new(inputs).new(o!("following" => true)),
        };
        let acting = self
            .out
            .clone()
            .filter(|_| !self.cfg.dry_run && self.leading);
        match decision {
            Decision::Hold(h) => {
                self.metrics.decision("hold", h.kind());
                let reason = h.to_string();
                self.holding = Some(reason.clone());
                // Logged when it says something new: another reason, or another fleet.
                let key = format!("{reason}|{fleet}|{in_flight}");
                if self.last_hold.as_deref() != Some(key.as_str()) {
                    info!(log, "Decision"; "action" => "hold", "reason" => &reason);
                    self.last_hold = Some(key);
                }
            }
            Decision::ScaleUp {
                count,
                reason,
                signal,
            } => {
                self.metrics.decision(
                    "scale_up",
                    match signal {
                        "cpu" => self.cfg.policy.as_str(),
                        other => other,
                    },
                );
                self.last_hold = None;
                self.holding = None;
                self.last_action = Some((now, format!("scale_up {count}"), reason.clone()));
                let id = format!("as-{}-{:08x}", wall_ms() / 1000, rand::random::<u32>());
                info!(log, "Decision"; "action" => "scale_up", "count" => count, "reason" => &reason,
                    "signal" => signal, "decision" => &id, "dry_run" => self.cfg.dry_run);
                self.hist.last_scale_up_ms = Some(now);
                self.hist
                    .launches_ms
                    .extend(std::iter::repeat_n(now, count as usize));
                if let Some(out) = acting {
                    self.pending.insert(id.clone(), count);
                    self.decided_at.insert(id.clone(), now);
                    let msg = LaunchInstances {
                        count,
                        decision_id: id.clone(),
                    };
                    self.remember_then(ctx, Some(id), move || out.launch.do_send(msg));
                }
            }
            Decision::ScaleDown { host, reason } => {
                self.metrics
                    .decision("scale_down", self.cfg.policy.as_str());
                self.last_hold = None;
                self.holding = None;
                self.last_action = Some((now, format!("scale_down {host}"), reason.clone()));
                info!(log, "Decision"; "action" => "scale_down", "host" => %host.host, "port" => host.port,
                    "reason" => &reason, "dry_run" => self.cfg.dry_run,
                    "drain" => %humantime::format_duration(self.cfg.drain_timeout));
                self.hist.last_scale_down_ms = Some(now);
                if let (Some(out), Some(h)) = (acting, self.hosts.get(&host)) {
                    let msg = DrainHost { host: h.clone() };
                    self.remember_then(ctx, None, move || out.drain.do_send(msg));
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
        self.place(m.host, now, m.sample.age_ms, m.sample.busy_pct);
    }
}

impl Handler<NodeUp> for ScaleDecider {
    type Result = ();
    fn handle(&mut self, m: NodeUp, _: &mut Context<Self>) {
        let now = self.now();
        let t = self.nodes.entry(m.host).or_default();
        let same_run = t.boot == Some(m.hello.boot);
        if !same_run {
            // A new agent run: its samples start afresh.
            t.samples.clear();
            t.boot = Some(m.hello.boot);
        }
        t.born_ms = Some(match (m.hello.uptime_ms, t.born_ms) {
            (Some(up), _) => now.saturating_sub(up),
            // A node that does not say its age: from when it was first heard, in this run.
            (None, Some(born)) if same_run => born,
            (None, _) => now,
        });
        t.up = true;
    }
}

impl Handler<BalancerLoad> for ScaleDecider {
    type Result = ();
    fn handle(&mut self, m: BalancerLoad, _: &mut Context<Self>) {
        // Read before the signals were turned off: figures kept now would look older than
        // they are once turned on again.
        if !self.cfg.haproxy_signals() {
            return;
        }
        let now = self.now();
        let keep = self.retention_d().as_millis() as u64;
        let samples = self.balancers.entry(m.server).or_default();
        samples.push_back((now, m.sample));
        while samples
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) > keep)
        {
            samples.pop_front();
        }
    }
}

impl Handler<NodeDown> for ScaleDecider {
    type Result = ();
    fn handle(&mut self, m: NodeDown, _: &mut Context<Self>) {
        // Its samples stay: if the same agent run comes back, they (and what it resends from
        // its buffer) still describe its load. While down, it takes no part.
        if let Some(t) = self.nodes.get_mut(&m.host) {
            t.up = false;
        }
    }
}

impl Handler<HostsChanged> for ScaleDecider {
    type Result = ();
    fn handle(&mut self, m: HostsChanged, _: &mut Context<Self>) {
        let next: BTreeMap<HostKey, Host> = m.hosts.iter().map(|h| (h.key(), h.clone())).collect();
        self.nodes.retain(|k, _| next.contains_key(k));
        self.hosts = next;
        self.hosts_known = true;
    }
}

impl Handler<GetDecisionStatus> for ScaleDecider {
    type Result = actix::MessageResult<GetDecisionStatus>;
    fn handle(&mut self, _: GetDecisionStatus, _: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        let nodes = self
            .inputs()
            .iter()
            .map(|n| {
                let e = crate::policy::explain(&self.cfg, n, now);
                NodeStatusLine {
                    host: n.key.host.to_string(),
                    port: n.key.port,
                    mean_up_pct: e.mean_up,
                    mean_down_pct: e.mean_down,
                    why_not: e.why_not,
                }
            })
            .collect();
        let cooldown_left_ms = crate::policy::cooldown_left(&self.cfg, &self.hist, now);
        let scale_down_cooldown_left_ms =
            crate::policy::scale_down_cooldown_left(&self.cfg, &self.hist, now);
        let hourly_cap_left_ms = crate::policy::hourly_cap_left(&self.cfg, &self.hist, now);
        let hour_ago = now.saturating_sub(3_600_000);
        let mut in_flight: Vec<(String, u32)> =
            self.pending.iter().map(|(k, v)| (k.clone(), *v)).collect();
        in_flight.sort();
        actix::MessageResult(DecisionStatus {
            policy: self.cfg.policy.to_string(),
            dry_run: self.cfg.dry_run,
            nodes,
            last_action: self
                .last_action
                .clone()
                .map(|(at, a, r)| (a, r, now.saturating_sub(at))),
            holding: self.holding.clone(),
            in_flight,
            cooldown_left_ms,
            scale_down_cooldown_left_ms,
            hourly_cap_left_ms,
            failed_launches: self.hist.failed_launches,
            launch_backoff_left_ms: crate::policy::launch_backoff_left(&self.hist, now),
            max_launches_per_hour: self.cfg.max_launches_per_hour,
            launches_last_hour: self
                .hist
                .launches_ms
                .iter()
                .filter(|&&t| t > hour_ago)
                .count(),
            signals: crate::policy::signals(
                &self.cfg,
                &self.balancer_inputs(),
                self.hosts.len() as u32,
                now,
            )
            .into_iter()
            .map(|e| SignalStatusLine {
                signal: e.signal.name().into(),
                value: e.value,
                target: e.target,
                desired: e.desired,
                covered: e.covered,
                missing: e.missing,
            })
            .collect(),
        })
    }
}

impl ScaleDecider {
    /// Reads the last leader's memory (cooldowns, the hourly cap), then leads. A failed read
    /// is retried (every second, then less often): leading without it would forget the
    /// guards, and the first decision would overwrite the shared memory with that.
    fn read_memory_then_lead(&mut self, ctx: &mut Context<Self>, term: u64, attempt: u32) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        ctx.spawn(
            async move { shared.get::<Remembered>("", "decider").await }
                .into_actor(self)
                .map(move |memory, this, ctx| {
                    if this.term != term {
                        return;
                    }
                    match memory {
                        Ok(m) => {
                            // What it decided while the read was on its way was a follower's
                            // decision, never carried out: the shared memory alone counts.
                            this.hist = History::default();
                            this.last_action = None;
                            if let Some(m) = m {
                                this.apply_memory(m);
                            }
                            this.leading = true;
                            info!(this.log, "Leading: decisions act");
                        }
                        Err(e) => {
                            let retry = Duration::from_secs(1 << attempt.min(4));
                            warn!(this.log, "Cannot read the guards' history; not acting until it is read"; "error" => %e,
                                "retry_in" => ?retry);
                            ctx.run_later(retry, move |this, ctx| {
                                if this.term == term {
                                    this.read_memory_then_lead(ctx, term, attempt + 1);
                                }
                            });
                        }
                    }
                }),
        );
    }
}

impl Handler<Leading> for ScaleDecider {
    type Result = ();
    fn handle(&mut self, m: Leading, ctx: &mut Context<Self>) {
        self.term += 1;
        let term = self.term;
        match m.0 {
            true => {
                // The last leader's guards first, then wait for the launcher to reconcile
                // (its launches in flight count before any decision).
                self.reconciled = self.out.is_none();
                self.pending.clear();
                // What it decided while following was never carried out: the guards start
                // from the last leader's memory.
                self.hist = History::default();
                self.last_action = None;
                if self.shared.is_none() {
                    self.leading = true;
                    return;
                }
                self.read_memory_then_lead(ctx, term, 0);
            }
            false => {
                self.leading = false;
                self.pending.clear();
                self.reconciled = self.out.is_none();
                info!(self.log, "Following: decisions are logged, not carried out");
            }
        }
    }
}

impl Handler<SetScaling> for ScaleDecider {
    type Result = ();
    fn handle(&mut self, m: SetScaling, _: &mut Context<Self>) {
        info!(self.log, "Scaling settings replaced"; "policy" => %m.0.policy, "dry_run" => m.0.dry_run);
        self.cfg = m.0;
        let on = self.cfg.haproxy_signals();
        if !on {
            // Figures from before a signal is turned off would be stale when it is turned
            // back on.
            self.balancers.values_mut().for_each(VecDeque::clear);
        }
        self.sampling.store(on, Ordering::Relaxed);
        self.last_hold = None;
    }
}

impl Handler<Reconciled> for ScaleDecider {
    type Result = ();
    fn handle(&mut self, m: Reconciled, _: &mut Context<Self>) {
        for (id, count) in m.resumed {
            info!(self.log, "Launch of an earlier run resumed; counted as in flight"; "decision" => &id, "count" => count);
            self.pending.insert(id, count);
        }
        self.reconciled = true;
    }
}

impl Handler<LaunchFinished> for ScaleDecider {
    type Result = ();
    fn handle(&mut self, m: LaunchFinished, ctx: &mut Context<Self>) {
        self.pending.remove(&m.decision_id);
        let decided = self.decided_at.remove(&m.decision_id);
        let now = self.now();
        if m.abandoned {
            info!(self.log, "Launch left to whoever settles it next"; "decision" => &m.decision_id,
                "why" => m.error.as_deref().unwrap_or(""));
            return;
        }
        match &m.error {
            Some(e) if m.registered.is_empty() => {
                // Nothing of it stayed: not a launch for the hourly cap; the next waits.
                if let Some(at) = decided {
                    let mut uncount = m.requested as usize;
                    self.hist.launches_ms.retain(|&t| {
                        let drop = t == at && uncount > 0;
                        uncount -= usize::from(drop);
                        !drop
                    });
                }
                self.hist.failed_launches = self.hist.failed_launches.saturating_add(1);
                self.hist.last_failure_ms = Some(now);
                let wait = crate::policy::launch_backoff(self.hist.failed_launches);
                warn!(self.log, "Launch failed; a new decision will retry if still needed";
                    "decision" => &m.decision_id, "registered" => 0, "requested" => m.requested, "error" => e,
                    "failed_in_a_row" => self.hist.failed_launches, "next_launch_in" => %humantime::format_duration(wait));
                self.remember_then(ctx, None, || {});
            }
            Some(e) => {
                if self.hist.failed_launches > 0 {
                    self.hist.failed_launches = 0;
                    self.remember_then(ctx, None, || {});
                }
                warn!(self.log, "Launch failed; a new decision will retry if still needed";
                "decision" => &m.decision_id, "registered" => m.registered.len(), "requested" => m.requested, "error" => e)
            }
            None => {
                if self.hist.failed_launches > 0 {
                    self.hist.failed_launches = 0;
                    self.remember_then(ctx, None, || {});
                }
                info!(self.log, "Launch finished"; "decision" => &m.decision_id, "registered" => m.registered.len())
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
        Launch(u32, String),
        Drain(HostKey),
    }

    struct Sink(mpsc::UnboundedSender<Out>);
    impl Actor for Sink {
        type Context = Context<Self>;
    }
    impl Handler<LaunchInstances> for Sink {
        type Result = ();
        fn handle(&mut self, m: LaunchInstances, _: &mut Context<Self>) {
            let _ = self.0.send(Out::Launch(m.count, m.decision_id));
        }
    }
    impl Handler<DrainHost> for Sink {
        type Result = ();
        fn handle(&mut self, m: DrainHost, _: &mut Context<Self>) {
            let _ = self.0.send(Out::Drain(m.host.key()));
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

    fn hello(boot: u64, uptime_ms: Option<u64>) -> Hello {
        Hello {
            node: "n".into(),
            boot,
            instance_id: None,
            uptime_ms,
            interval_ms: 1000,
            buffer: 0,
            nonce: String::new(),
        }
    }

    /// A decider with `cfg` and `memory` whose outputs land in the returned channel; the
    /// launcher has reconciled; it knows `hosts`, all up (hello without an age).
    fn start_with(
        cfg: Scaling,
        memory: Option<PathBuf>,
        hosts: &[Host],
    ) -> (Addr<ScaleDecider>, mpsc::UnboundedReceiver<Out>) {
        start_made(cfg, memory, hosts, |d| d)
    }

    /// [`start_with`], the decider shaped by `make` before it starts.
    fn start_made(
        cfg: Scaling,
        memory: Option<PathBuf>,
        hosts: &[Host],
        make: impl FnOnce(ScaleDecider) -> ScaleDecider,
    ) -> (Addr<ScaleDecider>, mpsc::UnboundedReceiver<Out>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = Sink(tx).start();
        let log = Logger::root(slog::Discard, o!());
        let out = DeciderOutputs {
            launch: sink.clone().recipient(),
            drain: sink.recipient(),
        };
        let d = make(ScaleDecider::new(
            cfg,
            Some(out),
            memory,
            DEFAULT_TICK,
            &log,
        ))
        .start();
        d.do_send(Reconciled { resumed: vec![] });
        d.do_send(HostsChanged {
            hosts: Arc::new(hosts.to_vec()),
        });
        for h in hosts {
            d.do_send(NodeUp {
                host: h.key(),
                hello: hello(1, None),
            });
        }
        (d, rx)
    }

    fn start(dry_run: bool, hosts: &[Host]) -> (Addr<ScaleDecider>, mpsc::UnboundedReceiver<Out>) {
        start_with(scaling(dry_run), None, hosts)
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

    /// `secs` seconds of one sample a second from every host at `busy`, on tokio's paused
    /// clock; `seq` numbers start at `from`.
    async fn feed(d: &Addr<ScaleDecider>, hosts: &[Host], busy: f64, from: u64, secs: u64) {
        for seq in from..from + secs {
            for h in hosts {
                d.do_send(CpuReported {
                    host: h.key(),
                    sample: sample(seq, busy, 0),
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn sent(rx: &mut mpsc::UnboundedReceiver<Out>) -> Vec<Out> {
        let mut got = Vec::new();
        while let Ok(o) = rx.try_recv() {
            got.push(o);
        }
        got
    }

    /// Drives a fresh decider: `secs` seconds of samples at `busy`. Returns what it sent.
    async fn drive(dry_run: bool, hosts: Vec<Host>, busy: f64, secs: u64) -> Vec<Out> {
        let (d, mut rx) = start(dry_run, &hosts);
        feed(&d, &hosts, busy, 0, secs).await;
        sent(&mut rx)
    }

    #[actix_rt::test]
    async fn hot_node_launches_once_then_cools_down() {
        tokio::time::pause();
        let got = drive(false, vec![host(1, Origin::Manual)], 95.0, 30).await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(matches!(got[0], Out::Launch(1, _)));
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
            let launched = matches!(rx.try_recv(), Ok(Out::Launch(1, _)));
            assert_eq!(launched, want_launch, "aged = {aged}");
        }
    }

    /// The tunnels' path: samples folded into the shared book are taken at each tick, placed
    /// when they were read; those of another agent run than the node's are left out.
    #[actix_rt::test]
    async fn samples_heard_by_the_tunnels_count_those_of_another_run_do_not() {
        tokio::time::pause();
        for (boot, want_launch) in [(1, true), (7, false)] {
            let h = host(1, Origin::Manual);
            let heard = Heard::default();
            let (_d, mut rx) = start_made(scaling(false), None, std::slice::from_ref(&h), |d| {
                d.with_samples(heard.clone())
            });
            let feed = heard.feed(&h.key());
            for seq in 0..30 {
                assert!(feed.lock().unwrap().push(boot, sample(seq, 95.0, 0), 0));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let launched = matches!(rx.try_recv(), Ok(Out::Launch(1, _)));
            assert_eq!(launched, want_launch, "samples of boot {boot}");
            assert!(heard.take_fresh().is_empty(), "every tick takes them");
        }
    }

    #[actix_rt::test]
    async fn dry_run_sends_nothing() {
        tokio::time::pause();
        assert!(drive(true, vec![host(1, Origin::Manual)], 95.0, 30)
            .await
            .is_empty());
    }

    /// Scale-in is a drain handed to the launcher (which records it, takes the host out of
    /// HAProxy and terminates it later): the decider keeps no timer that a restart would lose.
    #[actix_rt::test]
    async fn idle_fleet_drains_the_launched_host() {
        tokio::time::pause();
        let got = drive(
            false,
            vec![host(1, Origin::Manual), host(2, Origin::Launched)],
            3.0,
            40,
        )
        .await;
        let k = host(2, Origin::Launched).key();
        assert!(matches!(&got[..], [Out::Drain(a)] if *a == k), "{got:?}");
    }

    /// Warm-up is about young machines: a node whose machine has been up for an hour is
    /// acted on after one window, even though the master heard it only now (a master restart).
    #[actix_rt::test]
    async fn warm_up_counts_from_the_nodes_own_boot() {
        tokio::time::pause();
        let mut cfg = scaling(false);
        cfg.warmup = Duration::from_secs(120);
        for (uptime, want) in [(Some(3_600_000), 1), (Some(5_000), 0), (None, 0)] {
            let h = host(1, Origin::Manual);
            let (d, mut rx) = start_with(cfg.clone(), None, &[]);
            d.do_send(HostsChanged {
                hosts: Arc::new(vec![h.clone()]),
            });
            d.do_send(NodeUp {
                host: h.key(),
                hello: hello(7, uptime),
            });
            feed(&d, std::slice::from_ref(&h), 95.0, 0, 15).await;
            let got = sent(&mut rx);
            assert_eq!(got.len(), want, "uptime {uptime:?}: {got:?}");
        }
    }

    /// An SSH blip (NodeDown, then NodeUp from the same agent run) keeps the window; a new
    /// agent run starts afresh.
    #[actix_rt::test]
    async fn a_blip_keeps_the_window_a_new_run_does_not() {
        tokio::time::pause();
        // Only data from both sides of the blip (8 s + 3 s) covers the 10 s window.
        let mut cfg = scaling(false);
        cfg.stale_after = Duration::from_millis(1500);
        for (boot_after, want) in [(1, 1), (2, 0)] {
            let h = host(1, Origin::Manual);
            let hs = std::slice::from_ref(&h);
            let (d, mut rx) = start_with(cfg.clone(), None, hs);
            feed(&d, hs, 95.0, 0, 8).await;
            assert!(
                sent(&mut rx).is_empty(),
                "the window is not covered before the blip"
            );
            d.do_send(NodeDown {
                host: h.key(),
                reason: "blip".into(),
            });
            d.do_send(NodeUp {
                host: h.key(),
                hello: hello(boot_after, None),
            });
            feed(&d, hs, 95.0, 8, 3).await;
            let got = sent(&mut rx);
            assert_eq!(got.len(), want, "boot after the blip {boot_after}: {got:?}");
        }
    }

    /// The cooldown and the hourly cap survive a restart of the master.
    #[actix_rt::test]
    async fn a_restarted_decider_remembers_its_guards() {
        tokio::time::pause();
        let tmp = tempfile::tempdir().unwrap();
        let memory = tmp.path().join("decider.json");
        let h = host(1, Origin::Manual);
        let hs = std::slice::from_ref(&h);
        let (d, mut rx) = start_with(scaling(false), Some(memory.clone()), hs);
        feed(&d, hs, 95.0, 0, 15).await;
        assert_eq!(sent(&mut rx).len(), 1, "the first run launches");
        drop(d);
        let (d, mut rx) = start_with(scaling(false), Some(memory.clone()), hs);
        feed(&d, hs, 95.0, 100, 20).await;
        assert!(sent(&mut rx).is_empty(), "still in the cooldown (60 s)");
        // With the cooldown over, the hourly cap still counts the first run's launch.
        let mut cfg = scaling(false);
        cfg.cooldown = Duration::ZERO;
        cfg.max_launches_per_hour = 1;
        let (d, mut rx) = start_with(cfg, Some(memory), hs);
        feed(&d, hs, 95.0, 200, 20).await;
        assert!(sent(&mut rx).is_empty(), "hourly cap of 1 reached");
    }

    /// A launch slower than the cooldown is not doubled for the same load.
    #[actix_rt::test]
    async fn a_slow_launch_is_not_doubled() {
        tokio::time::pause();
        let mut cfg = scaling(false);
        cfg.cooldown = Duration::from_secs(5);
        let h = host(1, Origin::Manual);
        let hs = std::slice::from_ref(&h);
        let (d, mut rx) = start_with(cfg, None, hs);
        feed(&d, hs, 95.0, 0, 40).await;
        let got = sent(&mut rx);
        assert_eq!(got.len(), 1, "no LaunchFinished yet: {got:?}");
        d.do_send(LaunchFinished {
            decision_id: "any".into(),
            requested: 1,
            registered: vec![],
            error: None,
            abandoned: false,
        });
    }

    /// Scale-in removes the host launched last, by its recorded registration time (which
    /// survives a restart), not the one this process happened to see last or the highest
    /// address.
    #[actix_rt::test]
    async fn scale_in_removes_the_newest_by_registration() {
        tokio::time::pause();
        let mut older = host(9, Origin::Launched);
        older.registered_ms = Some(1_000);
        let mut newer = host(2, Origin::Launched);
        newer.registered_ms = Some(2_000);
        let got = drive(
            false,
            vec![host(1, Origin::Manual), older, newer.clone()],
            3.0,
            40,
        )
        .await;
        assert!(
            matches!(&got[..], [Out::Drain(k)] if *k == newer.key()),
            "{got:?}"
        );
    }

    use crate::test_log::Lines;

    /// A cooldown hold is logged once, not every second: its text has no countdown.
    #[actix_rt::test]
    async fn a_cooldown_is_logged_once() {
        tokio::time::pause();
        let lines = Lines::default();
        let log = Logger::root(lines.clone(), o!());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink = Sink(tx).start();
        let out = DeciderOutputs {
            launch: sink.clone().recipient(),
            drain: sink.recipient(),
        };
        let h = host(1, Origin::Manual);
        let d = ScaleDecider::new(scaling(false), Some(out), None, DEFAULT_TICK, &log).start();
        d.do_send(Reconciled { resumed: vec![] });
        d.do_send(HostsChanged {
            hosts: Arc::new(vec![h.clone()]),
        });
        d.do_send(NodeUp {
            host: h.key(),
            hello: hello(1, Some(3_600_000)),
        });
        feed(&d, std::slice::from_ref(&h), 95.0, 0, 15).await;
        let Some(Out::Launch(_, id)) = rx.try_recv().ok() else {
            panic!("no launch")
        };
        d.do_send(LaunchFinished {
            decision_id: id,
            requested: 1,
            registered: vec![],
            error: None,
            abandoned: false,
        });
        feed(&d, std::slice::from_ref(&h), 95.0, 15, 25).await;
        let lines = lines.0.lock().unwrap().clone();
        let launches = lines
            .iter()
            .filter(|l| l.contains("action=scale_up"))
            .count();
        let cooldowns = lines
            .iter()
            .filter(|l| l.contains("action=hold") && l.contains("cooldown"))
            .count();
        assert_eq!((launches, cooldowns), (1, 1), "{lines:#?}");
    }

    /// No decision before the launcher has reconciled; launches it resumed count as in flight.
    #[actix_rt::test]
    async fn the_floor_waits_for_the_launcher_and_counts_resumed_launches() {
        tokio::time::pause();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink = Sink(tx).start();
        let log = Logger::root(slog::Discard, o!());
        let out = DeciderOutputs {
            launch: sink.clone().recipient(),
            drain: sink.recipient(),
        };
        let mut cfg = scaling(false);
        cfg.min_nodes = 2;
        let d = ScaleDecider::new(cfg, Some(out), None, DEFAULT_TICK, &log).start();
        d.do_send(HostsChanged {
            hosts: Arc::new(vec![]),
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(sent(&mut rx).is_empty(), "not before Reconciled");
        d.do_send(Reconciled {
            resumed: vec![("as-earlier".into(), 1)],
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        let got = sent(&mut rx);
        assert!(
            matches!(&got[..], [Out::Launch(1, _)]),
            "only the missing one: {got:?}"
        );
    }

    /// A decider with HAProxy signals (sessions: 4 per node) reading servers `names`.
    fn start_lb(
        names: &[&str],
        hosts: &[Host],
    ) -> (
        Addr<ScaleDecider>,
        mpsc::UnboundedReceiver<Out>,
        Arc<AtomicBool>,
    ) {
        let mut cfg = scaling(false);
        cfg.target_sessions_per_node = Some(4.0);
        let sampling = Arc::new(AtomicBool::new(false));
        let (d, rx) = start_made(cfg, None, hosts, |d| {
            d.with_balancers(names.iter().map(|n| n.to_string()), sampling.clone())
        });
        (d, rx, sampling)
    }

    fn sessions(n: f64) -> crate::haproxy_api::LbSample {
        crate::haproxy_api::LbSample {
            rate: n * 10.0,
            sessions: n,
            queue: 0.0,
            rtime_ms: Some(100.0),
            partial: false,
        }
    }

    /// `secs` seconds of CPU at `busy` from every host and, from each HAProxy server in
    /// `loads`, its sessions; a server not in `loads` says nothing.
    async fn feed_lb(
        d: &Addr<ScaleDecider>,
        hosts: &[Host],
        busy: f64,
        loads: &[(&str, f64)],
        secs: u64,
    ) {
        for seq in 0..secs {
            for h in hosts {
                d.do_send(CpuReported {
                    host: h.key(),
                    sample: sample(seq, busy, 0),
                });
            }
            for (server, n) in loads {
                d.do_send(BalancerLoad {
                    server: server.to_string(),
                    sample: sessions(*n),
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Two HAProxy servers each see half the load: neither half crosses 4 sessions per
    /// node, the sum (6) does, and the idle CPU does not stop it.
    #[actix_rt::test]
    async fn two_balancers_with_half_the_load_each_scale_up_on_the_sum() {
        tokio::time::pause();
        let hosts = [host(1, Origin::Manual)];
        for (loads, want) in [
            (vec![("a", 3.0), ("b", 3.0)], true),
            (vec![("a", 3.0), ("b", 0.0)], false),
            (vec![("a", 0.0), ("b", 3.0)], false),
        ] {
            let (d, mut rx, sampling) = start_lb(&["a", "b"], &hosts);
            assert!(
                sampling.load(Ordering::Relaxed),
                "the workers are asked to read"
            );
            feed_lb(&d, &hosts, 5.0, &loads, 15).await;
            let got = sent(&mut rx);
            match want {
                true => assert!(
                    matches!(&got[..], [Out::Launch(1, _)]),
                    "{loads:?}: {got:?}"
                ),
                false => assert!(got.is_empty(), "{loads:?}: {got:?}"),
            }
            let st = d.send(GetDecisionStatus).await.unwrap();
            let line = &st.signals[0];
            assert_eq!(
                (line.signal.as_str(), line.value, line.covered, line.missing),
                ("sessions", Some(loads[0].1 + loads[1].1), 2, 0)
            );
        }
    }

    /// A HAProxy server that stops answering is missing figures, not no load: the idle
    /// fleet is not scaled in while it is silent, and is once it answers again.
    #[actix_rt::test]
    async fn a_silent_balancer_holds_the_scale_in() {
        tokio::time::pause();
        let hosts = [host(1, Origin::Manual), host(2, Origin::Launched)];
        let (d, mut rx, _) = start_lb(&["a", "b"], &hosts);
        feed_lb(&d, &hosts, 3.0, &[("a", 0.0)], 60).await;
        assert!(sent(&mut rx).is_empty());
        let st = d.send(GetDecisionStatus).await.unwrap();
        assert_eq!((st.signals[0].covered, st.signals[0].missing), (1, 1));
        assert!(
            st.holding
                .as_deref()
                .is_some_and(|h| h.contains("do not cover")),
            "{:?}",
            st.holding
        );
        feed_lb(&d, &hosts, 3.0, &[("a", 0.0), ("b", 0.0)], 30).await;
        let k = host(2, Origin::Launched).key();
        let got = sent(&mut rx);
        assert!(matches!(&got[..], [Out::Drain(a)] if *a == k), "{got:?}");
    }

    /// A reload that turns the HAProxy signals off stops the reading and forgets the
    /// figures; turning them on again starts from none.
    #[actix_rt::test]
    async fn a_reload_turns_the_reading_on_and_off() {
        tokio::time::pause();
        let hosts = [host(1, Origin::Manual)];
        let (d, mut rx, sampling) = start_lb(&["a"], &hosts);
        feed_lb(&d, &hosts, 5.0, &[("a", 2.0)], 3).await;
        let mut off = scaling(false);
        off.target_sessions_per_node = None;
        d.send(SetScaling(off.clone())).await.unwrap();
        assert!(!sampling.load(Ordering::Relaxed));
        assert!(d.send(GetDecisionStatus).await.unwrap().signals.is_empty());
        let mut on = off;
        on.target_sessions_per_node = Some(1.0);
        d.send(SetScaling(on)).await.unwrap();
        assert!(sampling.load(Ordering::Relaxed));
        let st = d.send(GetDecisionStatus).await.unwrap();
        assert_eq!((st.signals[0].value, st.signals[0].covered), (None, 0));
        feed_lb(&d, &hosts, 5.0, &[("a", 2.0)], 15).await;
        let got = sent(&mut rx);
        assert!(matches!(&got[..], [Out::Launch(1, _)]), "{got:?}");
    }

    /// A launch that failed with nothing registered: not counted toward
    /// max_launches_per_hour (the cap of 1 would otherwise hold for an hour), and the next
    /// waits 1 minute, then 2 after a second failure; a success clears the count.
    #[actix_rt::test]
    async fn failed_launches_back_off_and_leave_the_hourly_cap_alone() {
        tokio::time::pause();
        let mut cfg = scaling(false);
        cfg.cooldown = Duration::from_secs(1);
        cfg.max_launches_per_hour = 1;
        let hosts = [host(1, Origin::Manual)];
        let (d, mut rx) = start_with(cfg, None, &hosts);
        let fail = |id: String| LaunchFinished {
            decision_id: id,
            requested: 1,
            registered: vec![],
            error: Some("scale-up command failed".into()),
            abandoned: false,
        };
        let mut seq = 0;
        let mut feed_secs = |n: u64| {
            let from = seq;
            seq += n;
            (from, n)
        };
        let (from, n) = feed_secs(12);
        feed(&d, &hosts, 95.0, from, n).await;
        let got = sent(&mut rx);
        let [Out::Launch(1, first)] = &got[..] else {
            panic!("{got:?}")
        };
        d.send(fail(first.clone())).await.unwrap();
        let st = d.send(GetDecisionStatus).await.unwrap();
        assert_eq!((st.failed_launches, st.launches_last_hour), (1, 0));
        // Within the minute: held by the backoff, not by the cap.
        let (from, n) = feed_secs(50);
        feed(&d, &hosts, 95.0, from, n).await;
        assert!(sent(&mut rx).is_empty());
        let st = d.send(GetDecisionStatus).await.unwrap();
        assert!(
            st.holding
                .as_deref()
                .is_some_and(|h| h.contains("1 launch(es) in a row failed")),
            "{:?}",
            st.holding
        );
        let (from, n) = feed_secs(12);
        feed(&d, &hosts, 95.0, from, n).await;
        let got = sent(&mut rx);
        let [Out::Launch(1, second)] = &got[..] else {
            panic!("{got:?}")
        };
        d.send(fail(second.clone())).await.unwrap();
        // Second failure: two minutes.
        let (from, n) = feed_secs(100);
        feed(&d, &hosts, 95.0, from, n).await;
        assert!(sent(&mut rx).is_empty());
        let (from, n) = feed_secs(30);
        feed(&d, &hosts, 95.0, from, n).await;
        let got = sent(&mut rx);
        let [Out::Launch(1, third)] = &got[..] else {
            panic!("{got:?}")
        };
        d.send(LaunchFinished {
            decision_id: third.clone(),
            requested: 1,
            registered: vec![host(2, Origin::Launched).key()],
            error: None,
            abandoned: false,
        })
        .await
        .unwrap();
        let st = d.send(GetDecisionStatus).await.unwrap();
        assert_eq!((st.failed_launches, st.launches_last_hour), (0, 1));
    }
}
