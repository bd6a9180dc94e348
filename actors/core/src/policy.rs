//! The scaling policy: a pure function from what the master knows (per-node sample windows,
//! node states, what each HAProxy server measured, launches in flight, past actions,
//! configuration, now) to one decision.
//!
//! Several signals: the nodes' CPU (instance or cluster policy) and, when their targets are
//! set, the load HAProxy measures (requests per second, requests in progress, queued requests,
//! response time). Each asks for a number of nodes; the fleet scales up to the largest, and in
//! only when every signal allows one node fewer. A HAProxy server whose figures do not cover
//! a window is missing, never "no load": scale-in waits for it.
//!
//! Time is an input (milliseconds on the master's clock, when each sample was *received*, so
//! node clock skew does not matter). Nothing here sleeps, reads a clock or does I/O; the
//! ScaleDecider actor feeds it and carries out what it returns.

use std::fmt;
use std::time::Duration;

use crate::config::{Policy, Scaling};
use crate::haproxy_api::LbSample;
use crate::hosts::HostKey;

/// One node as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInput {
    pub key: HostKey,
    /// Whether its tunnel is up now: a node that is down takes no part.
    pub up: bool,
    /// When the node's machine started (its reported uptime placed on the master's clock; the
    /// first hello when it reports none); None before the node ever said hello. Warm-up
    /// counts from here.
    pub born_ms: Option<u64>,
    /// (received at, busy %) of recent samples, oldest first.
    pub samples: Vec<(u64, f64)>,
    /// True for hosts this autoscaler launched: the only ones scale-in may remove.
    pub launched: bool,
    /// When it was registered (any clock: only the order matters; scale-in removes the newest
    /// first).
    pub registered_ms: u64,
}

/// What happened before: the guards' memory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    pub last_scale_up_ms: Option<u64>,
    pub last_scale_down_ms: Option<u64>,
    /// When each instance launched in the last hour (or more) was asked for.
    pub launches_ms: Vec<u64>,
    /// Launches asked for and not finished yet: they count as nodes.
    pub in_flight: u32,
    /// Launches in a row that failed with nothing registered (0 after one that worked), and
    /// when the last of them failed: the next waits `launch_backoff`.
    pub failed_launches: u32,
    pub last_failure_ms: Option<u64>,
}

/// How long after `failed` launches in a row failed the next may be asked for: 1 minute,
/// doubling, at most 30 minutes. A failed launch does not count toward max_launches_per_hour
/// (it started nothing that stayed); this keeps a broken launcher from being run in a loop.
pub fn launch_backoff(failed: u32) -> Duration {
    match failed {
        0 => Duration::ZERO,
        n => Duration::from_secs(60 << (n - 1).min(5)).min(Duration::from_secs(1800)),
    }
}

/// Time left (ms) before a launch may be asked for after failed ones; None when it may now.
pub fn launch_backoff_left(hist: &History, now: u64) -> Option<u64> {
    let wait = ms(launch_backoff(hist.failed_launches));
    let left = hist
        .last_failure_ms?
        .saturating_add(wait)
        .saturating_sub(now);
    (hist.failed_launches > 0 && left > 0).then_some(left)
}

/// Why nothing is done.
#[derive(Debug, Clone, PartialEq)]
pub enum Hold {
    /// No node has fresh data covering the window: missing data is never read as 0 % or
    /// 100 %.
    NoData,
    /// Nodes have data, but their machines are younger than `warmup` (boot-time CPU says
    /// nothing about the load); `remaining_ms` until the first one is old enough.
    WarmingUp { remaining_ms: u64 },
    /// Load is between the thresholds (or inside the tolerance band).
    Steady,
    /// Scale-up wanted, but max_nodes (in-flight launches included) is reached.
    AtMax,
    /// Scale-in wanted, but min_nodes is reached.
    AtMin,
    /// A scale-up within `cooldown` of the last scale-up, or a scale-in within
    /// `scale_down_cooldown` of the last scaling of either kind; `key` names the setting.
    Cooldown {
        key: &'static str,
        remaining_ms: u64,
    },
    /// max_launches_per_hour reached.
    HourlyCap,
    /// The last launches failed: the next waits (see [`launch_backoff`]).
    LaunchBackoff { failed: u32 },
    /// Launches are in flight: no scale-in until they finish, and (instance policy) no more
    /// scale-up for the load that asked for them.
    LaunchInFlight,
    /// Scale-in wanted but no host was launched by this autoscaler.
    NothingToRemove,
    /// A HAProxy server's figures do not cover the scale-down window (it does not answer, or
    /// workers left by a reload could not be asked): its silence is not read as no load.
    BalancerSilent,
    /// The CPU would allow a scale-in, but this HAProxy signal needs the nodes there are.
    Needed(Signal),
}

/// A load signal HAProxy measures for the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Signal {
    /// Requests per second (`target_requests_per_node`).
    Requests,
    /// Requests in progress (`target_sessions_per_node`).
    Sessions,
    /// Requests waiting for a server (`scale_on_queue`).
    Queue,
    /// Average response time (`target_response_time`).
    ResponseTime,
}

impl Signal {
    pub const ALL: [Signal; 4] = [
        Signal::Requests,
        Signal::Sessions,
        Signal::Queue,
        Signal::ResponseTime,
    ];

    /// Its name in logs, status and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Requests => "requests",
            Signal::Sessions => "sessions",
            Signal::Queue => "queue",
            Signal::ResponseTime => "response_time",
        }
    }

    /// Its target in `cfg` (the queue's is 0: any queue is a breach); None when it is off.
    pub fn target(self, cfg: &Scaling) -> Option<f64> {
        match self {
            Signal::Requests => cfg.target_requests_per_node,
            Signal::Sessions => cfg.target_sessions_per_node,
            Signal::Queue => cfg.scale_on_queue.then_some(0.0),
            Signal::ResponseTime => cfg.target_response_time.map(|d| d.as_secs_f64() * 1000.0),
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One HAProxy server's recent figures for the backend: (received at, sample), oldest first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BalancerInput {
    /// Its name in `[haproxy] servers`.
    pub name: String,
    pub samples: Vec<(u64, LbSample)>,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// `signal` is what asked for it: `min_nodes`, `cpu`, or a HAProxy [`Signal`]'s name.
    ScaleUp {
        count: u32,
        reason: String,
        signal: &'static str,
    },
    ScaleDown {
        host: HostKey,
        reason: String,
    },
    Hold(Hold),
}

impl Hold {
    /// A short, fixed word for the hold (a metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            Hold::NoData => "no_data",
            Hold::WarmingUp { .. } => "warming_up",
            Hold::Steady => "steady",
            Hold::AtMax => "at_max",
            Hold::AtMin => "at_min",
            Hold::Cooldown { key, .. } => key,
            Hold::HourlyCap => "hourly_cap",
            Hold::LaunchBackoff { .. } => "launch_backoff",
            Hold::LaunchInFlight => "launch_in_flight",
            Hold::NothingToRemove => "nothing_to_remove",
            Hold::BalancerSilent => "balancer_silent",
            Hold::Needed(_) => "needed",
        }
    }
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::NoData => f.write_str("no node has fresh data covering the window"),
            // No countdown in the text: a hold is logged when its text changes.
            Hold::WarmingUp { .. } => f.write_str("nodes are still warming up"),
            Hold::Steady => f.write_str("load within bounds"),
            Hold::AtMax => f.write_str("max_nodes reached"),
            Hold::AtMin => f.write_str("min_nodes reached"),
            // No countdown in the text: a hold is logged when its text changes (the time left
            // is in the decider's status).
            Hold::Cooldown { key: "cooldown", .. } => {
                f.write_str("cooldown: no scale-up this soon after the last one")
            }
            Hold::Cooldown { key, .. } => {
                write!(f, "{key}: no scale-in this soon after the last scaling")
            }
            Hold::HourlyCap => f.write_str("max_launches_per_hour reached"),
            Hold::LaunchBackoff { failed } => write!(
                f,
                "{failed} launch(es) in a row failed: waiting before the next (see the launcher's error)"
            ),
            Hold::LaunchInFlight => f.write_str("launches in flight"),
            Hold::NothingToRemove => f.write_str("no host launched by autoscaler to remove"),
            Hold::BalancerSilent => f.write_str(
                "a HAProxy server's figures do not cover the scale-down window (it does not answer, or workers left by a reload could not be counted)",
            ),
            Hold::Needed(signal) => write!(
                f,
                "HAProxy's {signal} need the nodes there are (one fewer would be above its target)"
            ),
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Why a node has no mean for a window.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Missing {
    /// Down, stale, or its samples do not cover the window.
    NoData,
    /// Its machine is younger than `warmup` for this long yet.
    WarmingUp(u64),
}

/// Mean busy % of a node over `[now - window, now]`, if its samples cover the window (the
/// first one in it is no later than `stale` after the window's start) and the node is eligible.
fn window_mean(n: &NodeInput, cfg: &Scaling, now: u64, window: Duration) -> Result<f64, Missing> {
    let mean = covered_mean(n, cfg, now, window).ok_or(Missing::NoData)?;
    let age = now.saturating_sub(n.born_ms.ok_or(Missing::NoData)?);
    match age < ms(cfg.warmup) {
        true => Err(Missing::WarmingUp(ms(cfg.warmup) - age)),
        false => Ok(mean),
    }
}

fn covered_mean(n: &NodeInput, cfg: &Scaling, now: u64, window: Duration) -> Option<f64> {
    if !n.up {
        return None;
    }
    let last = n.samples.last()?.0;
    if now.saturating_sub(last) > ms(cfg.stale_after) {
        return None;
    }
    // A window reaching back before the clock began cannot be covered by data.
    let start = now.checked_sub(ms(window))?;
    // Samples are in time order: the window is a suffix.
    let inside = &n.samples[n.samples.partition_point(|(t, _)| *t < start)..];
    let first = inside.first()?.0;
    if first > start + ms(cfg.stale_after) {
        return None;
    }
    Some(inside.iter().map(|(_, b)| b).sum::<f64>() / inside.len() as f64)
}

/// One node as the decider sees it now, for `autoscaler status`.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeEval {
    /// Mean busy % over the scale-up window, when the samples cover it.
    pub mean_up: Option<f64>,
    /// The same over the scale-down window.
    pub mean_down: Option<f64>,
    /// Why it takes no part in scale-up decisions now; None when it does.
    pub why_not: Option<String>,
}

/// Explains how `n` counts in the next decision.
pub fn explain(cfg: &Scaling, n: &NodeInput, now: u64) -> NodeEval {
    let secs = |ms: u64| ms.div_ceil(1000);
    let why_not = if n.born_ms.is_none() {
        Some("never reported".to_string())
    } else if !n.up {
        Some("its tunnel is down".to_string())
    } else if let Some(&(last, _)) = n.samples.last() {
        let age = now.saturating_sub(last);
        match window_mean(n, cfg, now, cfg.scale_up_window) {
            Ok(_) => None,
            Err(Missing::WarmingUp(left)) => Some(format!("warming up ({} s left)", secs(left))),
            Err(Missing::NoData) if age > ms(cfg.stale_after) => {
                Some(format!("no sample for {} s", secs(age)))
            }
            Err(Missing::NoData) => Some("its samples do not cover the window yet".into()),
        }
    } else {
        Some("no sample yet".to_string())
    };
    NodeEval {
        mean_up: covered_mean(n, cfg, now, cfg.scale_up_window),
        mean_down: covered_mean(n, cfg, now, cfg.scale_down_window),
        why_not,
    }
}

/// The per-node window means every rule works from: (scale-up window, scale-down window),
/// and how long until the first node warming up is old enough (if one is).
fn means(cfg: &Scaling, nodes: &[NodeInput], now: u64) -> (Vec<f64>, Vec<f64>, Option<u64>) {
    let mut warming: Option<u64> = None;
    let mut of = |window| {
        let mut out = Vec::new();
        for n in nodes {
            match window_mean(n, cfg, now, window) {
                Ok(m) => out.push(m),
                Err(Missing::WarmingUp(left)) => {
                    warming = Some(warming.map_or(left, |w| w.min(left)))
                }
                Err(Missing::NoData) => {}
            }
        }
        out
    };
    let up = of(cfg.scale_up_window);
    let down = of(cfg.scale_down_window);
    (up, down, warming)
}

/// The inputs behind a decision, for its log record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Nodes with fresh, warmed-up data covering the scale-up window.
    pub eligible: usize,
    /// Their mean busy % over the scale-up window.
    pub mean_up: Option<f64>,
    /// The busiest of them.
    pub hottest: Option<f64>,
    /// Mean busy % over the scale-down window (nodes whose data covers it).
    pub mean_down: Option<f64>,
}

fn summary(up: &[f64], down: &[f64]) -> Summary {
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    Summary {
        eligible: up.len(),
        mean_up: mean(up),
        hottest: up.iter().cloned().reduce(f64::max),
        mean_down: mean(down),
    }
}

/// Decides. `nodes` is every registered host.
pub fn decide(cfg: &Scaling, nodes: &[NodeInput], hist: &History, now: u64) -> Decision {
    decide_with_summary(cfg, nodes, hist, now).0
}

/// Decides, and says what the decision looked at (for its log record).
pub fn decide_with_summary(
    cfg: &Scaling,
    nodes: &[NodeInput],
    hist: &History,
    now: u64,
) -> (Decision, Summary) {
    decide_all(cfg, nodes, &[], hist, now)
}

/// Decides on every signal: the nodes' CPU and what `balancers` (every HAProxy server of
/// `[haproxy] servers`, answering or not) measured.
pub fn decide_all(
    cfg: &Scaling,
    nodes: &[NodeInput],
    balancers: &[BalancerInput],
    hist: &History,
    now: u64,
) -> (Decision, Summary) {
    let (up_means, down_means, warming) = means(cfg, nodes, now);
    let sum = summary(&up_means, &down_means);
    let cpu = Cpu {
        up: &up_means,
        down: &down_means,
        warming,
    };
    (decide_from(cfg, nodes, balancers, hist, now, cpu), sum)
}

/// The backend's load over a window, across the HAProxy servers whose figures cover it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LbLoad {
    /// Requests per second, summed over the servers (each one's mean over the window).
    pub rate: f64,
    /// Requests in progress, summed likewise.
    pub sessions: f64,
    /// The largest queue a server kept through the whole window (0: none did).
    pub queue_held: f64,
    /// The largest queue any server had at any moment of the window.
    pub queue_peak: f64,
    /// Response time, each server's mean weighted by its request rate; None without requests.
    pub rtime_ms: Option<f64>,
    /// The highest of each figure through the window (rates and sessions: each server's
    /// highest, summed; response time: the highest any server had while requests came):
    /// scale-in needs one
    /// node fewer to have been enough all along, not on average.
    pub rate_peak: f64,
    pub sessions_peak: f64,
    pub rtime_peak_ms: Option<f64>,
    /// HAProxy servers whose figures cover the window, and those whose do not.
    pub covered: usize,
    pub missing: usize,
    /// Servers among `covered` with figures that leave out workers left by a reload.
    pub partial: usize,
}

/// The samples of `b` inside `[now - window, now]`, if they cover it: the last no older than
/// `stale_after`, the first no later than `stale_after` after the window's start, and no two
/// further apart than `stale_after`.
fn covering<'a>(
    b: &'a BalancerInput,
    cfg: &Scaling,
    now: u64,
    window: Duration,
) -> Option<&'a [(u64, LbSample)]> {
    let last = b.samples.last()?.0;
    if now.saturating_sub(last) > ms(cfg.stale_after) {
        return None;
    }
    let start = now.checked_sub(ms(window))?;
    let inside = &b.samples[b.samples.partition_point(|(t, _)| *t < start)..];
    if inside.first()?.0 > start + ms(cfg.stale_after) {
        return None;
    }
    // Silent for a while inside the window: what it missed may have been the peak.
    let gap = inside
        .windows(2)
        .any(|w| w[1].0 - w[0].0 > ms(cfg.stale_after));
    (!gap).then_some(inside)
}

/// What `balancers` measured over `window`.
pub fn lb_load(cfg: &Scaling, balancers: &[BalancerInput], now: u64, window: Duration) -> LbLoad {
    let mut load = LbLoad::default();
    let (mut weighted, mut weight) = (0.0, 0.0);
    for b in balancers {
        let Some(inside) = covering(b, cfg, now, window) else {
            load.missing += 1;
            continue;
        };
        load.covered += 1;
        if inside.iter().any(|(_, s)| s.partial) {
            load.partial += 1;
        }
        let n = inside.len() as f64;
        let mean = |f: fn(&LbSample) -> f64| inside.iter().map(|(_, s)| f(s)).sum::<f64>() / n;
        load.rate += mean(|s| s.rate);
        load.sessions += mean(|s| s.sessions);
        let peak = |f: fn(&LbSample) -> f64| inside.iter().map(|(_, s)| f(s)).fold(0.0, f64::max);
        load.rate_peak += peak(|s| s.rate);
        load.sessions_peak += peak(|s| s.sessions);
        // As for the mean, only while requests come (HAProxy keeps its last figure).
        let timed = inside.iter().filter(|(_, s)| s.rate > 0.0);
        if let Some(r) = timed.filter_map(|(_, s)| s.rtime_ms).reduce(f64::max) {
            load.rtime_peak_ms = Some(load.rtime_peak_ms.map_or(r, |p| p.max(r)));
        }
        let queues = inside.iter().map(|(_, s)| s.queue);
        load.queue_held = load
            .queue_held
            .max(queues.clone().fold(f64::INFINITY, f64::min));
        load.queue_peak = load.queue_peak.max(queues.fold(0.0, f64::max));
        for (_, s) in inside {
            if let Some(r) = s.rtime_ms {
                weighted += r * s.rate;
                weight += s.rate;
            }
        }
    }
    load.rtime_ms = (weight > 0.0).then(|| weighted / weight);
    load
}

/// `x` rounded up, without float noise turning 4.0 into 5.
fn ceil(x: f64) -> u32 {
    (x - 1e-9).ceil().max(0.0) as u32
}

/// How many nodes `signal` asks for under `load`, with `serving` nodes registered and
/// `current` counting launches in flight; None when it has no opinion (off, no figures, no
/// requests for the response time, no queue).
fn desired(cfg: &Scaling, signal: Signal, load: &LbLoad, serving: u32) -> Option<u32> {
    let target = signal.target(cfg)?;
    if load.covered == 0 {
        return None;
    }
    match signal {
        Signal::Requests => Some(ceil(load.rate / target)),
        Signal::Sessions => Some(ceil(load.sessions / target)),
        // One step beyond the nodes serving: a launch in flight is that step already.
        Signal::Queue => (load.queue_held > 0.0).then_some(serving + cfg.scale_up_step),
        Signal::ResponseTime => load
            .rtime_ms
            .map(|r| ceil(f64::from(serving.max(1)) * r / target)),
    }
}

/// The figure a signal is judged on.
fn figure(signal: Signal, load: &LbLoad) -> Option<f64> {
    if load.covered == 0 {
        return None;
    }
    match signal {
        Signal::Requests => Some(load.rate),
        Signal::Sessions => Some(load.sessions),
        Signal::Queue => Some(load.queue_peak),
        Signal::ResponseTime => load.rtime_ms,
    }
}

/// One HAProxy signal against its target, for status and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct SignalEval {
    pub signal: Signal,
    /// Over the scale-up window, across the HAProxy servers that cover it (requests/s,
    /// requests, queued requests, milliseconds).
    pub value: Option<f64>,
    /// Per node (the queue's is 0).
    pub target: f64,
    /// The nodes it asks for; None when it has no opinion.
    pub desired: Option<u32>,
    /// HAProxy servers whose figures cover the window, and those whose do not.
    pub covered: usize,
    pub missing: usize,
}

/// Every HAProxy signal that is on, as the next decision sees it.
pub fn signals(
    cfg: &Scaling,
    balancers: &[BalancerInput],
    serving: u32,
    now: u64,
) -> Vec<SignalEval> {
    let load = lb_load(cfg, balancers, now, cfg.scale_up_window);
    // Silent over the longer scale-down window counts too: scale-in waits for it.
    let missing = load
        .missing
        .max(lb_load(cfg, balancers, now, cfg.scale_down_window).missing);
    Signal::ALL
        .into_iter()
        .filter_map(|signal| {
            Some(SignalEval {
                signal,
                target: signal.target(cfg)?,
                value: figure(signal, &load),
                desired: desired(cfg, signal, &load, serving),
                covered: load.covered,
                missing,
            })
        })
        .collect()
}

/// What the HAProxy signals ask for over the scale-up window: the most nodes any asks for
/// beyond `current`, with its reason. Figures from some HAProxy servers only are a lower
/// bound of the load, enough to scale up on.
fn lb_wants(
    cfg: &Scaling,
    balancers: &[BalancerInput],
    serving: u32,
    current: u32,
    now: u64,
) -> Option<(u32, String, Signal)> {
    if !cfg.haproxy_signals() {
        return None;
    }
    let load = lb_load(cfg, balancers, now, cfg.scale_up_window);
    let window = humantime::format_duration(cfg.scale_up_window);
    let from = match load.missing {
        0 => format!("{} HAProxy server(s)", load.covered),
        m => format!("{} HAProxy server(s), {m} silent", load.covered),
    };
    Signal::ALL
        .into_iter()
        .filter_map(|signal| {
            let want = desired(cfg, signal, &load, serving)?;
            (want > current).then(|| {
                let target = signal.target(cfg).unwrap_or_default();
                let reason = match signal {
                    Signal::Requests => format!(
                        "{:.1} requests/s over {window} ({from}) at {target} per node: desired {want} nodes, have {current}",
                        load.rate
                    ),
                    Signal::Sessions => format!(
                        "{:.1} requests in progress over {window} ({from}) at {target} per node: desired {want} nodes, have {current}",
                        load.sessions
                    ),
                    Signal::Queue => format!(
                        "requests queued through {window} ({from}; at least {:.0} waiting)",
                        load.queue_held
                    ),
                    Signal::ResponseTime => format!(
                        "response time {:.0} ms over {window} ({from}) against {target:.0} ms: desired {want} nodes, have {current}",
                        load.rtime_ms.unwrap_or_default()
                    ),
                };
                (want - current, reason, signal)
            })
        })
        .max_by_key(|(want, _, signal)| (*want, std::cmp::Reverse(*signal)))
}

/// Whether the HAProxy signals let the fleet lose one node: one node fewer would have been
/// enough through the whole scale-down window (its peaks, not its means), and every HAProxy
/// server's figures cover it.
fn lb_allows_scale_in(
    cfg: &Scaling,
    balancers: &[BalancerInput],
    serving: u32,
    now: u64,
) -> Result<(), Hold> {
    if !cfg.haproxy_signals() {
        return Ok(());
    }
    let load = lb_load(cfg, balancers, now, cfg.scale_down_window);
    if load.missing > 0 || load.covered == 0 || load.partial > 0 {
        return Err(Hold::BalancerSilent);
    }
    for signal in Signal::ALL {
        let Some(target) = signal.target(cfg) else {
            continue;
        };
        let fewer = serving.saturating_sub(1);
        let ok = match signal {
            Signal::Requests => ceil(load.rate_peak / target) <= fewer,
            Signal::Sessions => ceil(load.sessions_peak / target) <= fewer,
            Signal::Queue => load.queue_peak == 0.0,
            // One node fewer carries each one's share: the response time rises with it.
            Signal::ResponseTime => load
                .rtime_peak_ms
                .is_none_or(|r| r * f64::from(serving) <= target * f64::from(fewer)),
        };
        if !ok {
            return Err(Hold::Needed(signal));
        }
    }
    Ok(())
}

/// The nodes' CPU, as [`means`] found it.
#[derive(Clone, Copy)]
struct Cpu<'a> {
    up: &'a [f64],
    down: &'a [f64],
    warming: Option<u64>,
}

/// Time left (ms) before `cooldown` lets a scale-up happen; None when it does now.
pub fn cooldown_left(cfg: &Scaling, hist: &History, now: u64) -> Option<u64> {
    let left = (hist.last_scale_up_ms?.saturating_add(ms(cfg.cooldown))).saturating_sub(now);
    (left > 0).then_some(left)
}

/// Time left (ms) before `scale_down_cooldown` lets a scale-in happen: it runs from the last
/// scaling of either kind (a scale-in right after a scale-up would undo it); None when it
/// does now.
pub fn scale_down_cooldown_left(cfg: &Scaling, hist: &History, now: u64) -> Option<u64> {
    let last = hist.last_scale_up_ms.max(hist.last_scale_down_ms)?;
    let left = (last.saturating_add(ms(cfg.scale_down_cooldown))).saturating_sub(now);
    (left > 0).then_some(left)
}

/// Time left (ms) before `max_launches_per_hour` allows another launch; None when it does
/// now.
pub fn hourly_cap_left(cfg: &Scaling, hist: &History, now: u64) -> Option<u64> {
    let cap = cfg.max_launches_per_hour as usize;
    let hour_ago = now.saturating_sub(HOUR_MS);
    let mut recent: Vec<u64> = hist
        .launches_ms
        .iter()
        .copied()
        .filter(|&t| t > hour_ago)
        .collect();
    if cap == 0 || recent.len() < cap {
        return None;
    }
    recent.sort_unstable();
    // For one more to fit, the oldest len - cap + 1 launches must leave the hour.
    let t = recent[recent.len() - cap];
    Some((t + HOUR_MS).saturating_sub(now).max(1))
}

const HOUR_MS: u64 = 3_600_000;

/// How many of `want` new nodes the guards let launch now: max_nodes (launches in flight
/// count as nodes) and max_launches_per_hour.
fn capped(cfg: &Scaling, hist: &History, now: u64, current: u32, want: u32) -> Result<u32, Hold> {
    if current >= cfg.max_nodes {
        return Err(Hold::AtMax);
    }
    if launch_backoff_left(hist, now).is_some() {
        return Err(Hold::LaunchBackoff {
            failed: hist.failed_launches,
        });
    }
    let hour_ago = now.saturating_sub(3_600_000);
    let recent = hist.launches_ms.iter().filter(|&&t| t > hour_ago).count() as u32;
    let allowed = cfg.max_launches_per_hour.saturating_sub(recent);
    match want.min(cfg.max_nodes - current).min(allowed) {
        0 => Err(Hold::HourlyCap),
        n => Ok(n),
    }
}

fn decide_from(
    cfg: &Scaling,
    nodes: &[NodeInput],
    balancers: &[BalancerInput],
    hist: &History,
    now: u64,
    cpu: Cpu,
) -> Decision {
    let (up_means, down_means, warming) = (cpu.up, cpu.down, cpu.warming);
    let serving = nodes.len() as u32;
    let current = serving + hist.in_flight;
    // The floor needs no CPU data: fewer nodes than min_nodes (one terminated from outside,
    // a launch that failed) are replaced, within the hourly cap, as EC2 Auto Scaling does.
    if current < cfg.min_nodes {
        let reason = format!(
            "{current} nodes (launches in flight included) is below min_nodes ({})",
            cfg.min_nodes
        );
        return match capped(cfg, hist, now, current, cfg.min_nodes - current) {
            Ok(count) => Decision::ScaleUp {
                count,
                reason,
                signal: "min_nodes",
            },
            Err(hold) => Decision::Hold(hold),
        };
    }
    // What HAProxy measures needs no CPU data: a backend waiting on a database is slow at
    // 5 % CPU.
    let lb_up = lb_wants(cfg, balancers, serving, current, now);
    if up_means.is_empty() && down_means.is_empty() && lb_up.is_none() {
        return Decision::Hold(match warming {
            Some(remaining_ms) => Hold::WarmingUp { remaining_ms },
            None => Hold::NoData,
        });
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;

    // What the load asks for.
    let up_wanted: Option<(u32, String)> = match cfg.policy {
        Policy::Instance => up_means
            .iter()
            .cloned()
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
            .filter(|&hot| hot >= cfg.scale_up_threshold)
            .map(|hot| {
                (
                    cfg.scale_up_step,
                    format!(
                        "a node averaged {hot:.1}% over {} (threshold {}%)",
                        humantime::format_duration(cfg.scale_up_window),
                        cfg.scale_up_threshold
                    ),
                )
            }),
        Policy::Cluster if !up_means.is_empty() => {
            let m = mean(up_means);
            let ratio = m / cfg.target_cpu;
            let e = up_means.len() as u32;
            let desired = (f64::from(e) * ratio).ceil() as u32 + (current - e.min(current));
            (ratio > 1.0 + cfg.tolerance && desired > current).then(|| {
                (desired - current, format!("cluster mean {m:.1}% vs target {}%: desired {desired} nodes, have {current}", cfg.target_cpu))
            })
        }
        Policy::Cluster => None,
    };
    // The largest ask wins; CPU first on a tie.
    let up_wanted: Option<(u32, String, &'static str)> = match (up_wanted, lb_up) {
        (Some((c, r)), Some((l, _, _))) if c >= l => Some((c, r, "cpu")),
        (_, Some((l, r, signal))) => Some((l, r, signal.name())),
        (Some((c, r)), None) => Some((c, r, "cpu")),
        (None, None) => None,
    };
    if let Some((want, reason, signal)) = up_wanted {
        if current >= cfg.max_nodes {
            return Decision::Hold(Hold::AtMax);
        }
        // The load that asked for the launch in flight is still the load seen now: under the
        // instance policy, wait for that capacity before asking for more (a slow bootstrap
        // can outlast the cooldown). The cluster policy and HAProxy's signals count launches
        // in flight as nodes.
        if cfg.policy == Policy::Instance && signal == "cpu" && hist.in_flight > 0 {
            return Decision::Hold(Hold::LaunchInFlight);
        }
        if let Some(remaining_ms) = cooldown_left(cfg, hist, now) {
            return Decision::Hold(Hold::Cooldown {
                key: "cooldown",
                remaining_ms,
            });
        }
        return match capped(cfg, hist, now, current, want) {
            Ok(count) => Decision::ScaleUp {
                count,
                reason,
                signal,
            },
            Err(hold) => Decision::Hold(hold),
        };
    }

    // Scale-in: the whole (long) window below the threshold, or below the tolerance band,
    // and every HAProxy signal content with one node fewer.
    if down_means.is_empty() {
        return Decision::Hold(Hold::Steady);
    }
    let m = mean(down_means);
    let low = match cfg.policy {
        Policy::Instance => m < cfg.scale_down_threshold,
        Policy::Cluster => {
            let e = down_means.len() as f64;
            m / cfg.target_cpu < 1.0 - cfg.tolerance && (e * m / cfg.target_cpu).ceil() < e
        }
    };
    if !low {
        return Decision::Hold(Hold::Steady);
    }
    if current <= cfg.min_nodes {
        return Decision::Hold(Hold::AtMin);
    }
    if let Err(hold) = lb_allows_scale_in(cfg, balancers, serving, now) {
        return Decision::Hold(hold);
    }
    if hist.in_flight > 0 {
        return Decision::Hold(Hold::LaunchInFlight);
    }
    if let Some(remaining_ms) = scale_down_cooldown_left(cfg, hist, now) {
        return Decision::Hold(Hold::Cooldown {
            key: "scale_down_cooldown",
            remaining_ms,
        });
    }
    match nodes
        .iter()
        .filter(|n| n.launched)
        .max_by_key(|n| (n.registered_ms, n.key.clone()))
    {
        None => Decision::Hold(Hold::NothingToRemove),
        Some(n) => Decision::ScaleDown {
            host: n.key.clone(),
            reason: format!(
                "mean {m:.1}% over {} below {}%",
                humantime::format_duration(cfg.scale_down_window),
                match cfg.policy {
                    Policy::Instance => cfg.scale_down_threshold,
                    Policy::Cluster => cfg.target_cpu * (1.0 - cfg.tolerance),
                }
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Layout, Role};
    use crate::hosts::HostName;
    use std::path::Path;

    const S: u64 = 1000;
    const MIN: u64 = 60 * S;
    /// A "now" far from zero so subtractions are realistic.
    const NOW: u64 = 10_000_000 * S;

    fn cfg() -> Scaling {
        let mut c = Config::defaults(&Layout::for_dir(Path::new("/x")), Role::Master).scaling;
        c.scale_up_threshold = 75.0;
        c.scale_down_threshold = 25.0;
        c.scale_up_window = Duration::from_secs(60);
        c.scale_down_window = Duration::from_secs(600);
        c.warmup = Duration::from_secs(120);
        c.stale_after = Duration::from_secs(10);
        c.cooldown = Duration::from_secs(300);
        c.scale_down_cooldown = Duration::from_secs(600);
        c.min_nodes = 1;
        c.max_nodes = 5;
        c.max_launches_per_hour = 4;
        c
    }

    fn key(i: u8) -> HostKey {
        HostKey {
            host: HostName::parse(&format!("127.0.1.{i}")).unwrap(),
            port: 80,
        }
    }

    /// A node up for an hour, one sample a second at `busy` for the last `span`.
    fn node(i: u8, busy: f64, span: u64) -> NodeInput {
        NodeInput {
            key: key(i),
            up: true,
            born_ms: Some(NOW - 60 * MIN),
            samples: (0..span / S)
                .map(|k| (NOW - span + k * S + S, busy))
                .collect(),
            launched: false,
            registered_ms: NOW - 60 * MIN,
        }
    }

    fn launched(mut n: NodeInput, at: u64) -> NodeInput {
        n.launched = true;
        n.registered_ms = at;
        n
    }

    fn up(count: u32) -> impl Fn(&Decision) -> bool {
        move |d| matches!(d, Decision::ScaleUp { count: c, .. } if *c == count)
    }

    /// Each cooldown holds what its name says: a long scale-up `cooldown` does not hold a
    /// scale-in once `scale_down_cooldown` (from the scale-up) is over; the hold names its key.
    #[test]
    fn cooldowns_hold_what_their_names_say() {
        let mut c = cfg();
        c.cooldown = Duration::from_secs(1800);
        c.scale_down_cooldown = Duration::from_secs(30);
        let idle = vec![
            node(1, 5.0, 11 * MIN),
            launched(node(2, 5.0, 11 * MIN), NOW - 50 * MIN),
        ];
        let after = |ago: u64| History {
            last_scale_up_ms: Some(NOW - ago),
            ..History::default()
        };
        assert!(matches!(
            decide(&c, &idle, &after(MIN), NOW),
            Decision::ScaleDown { .. }
        ));
        let d = decide(&c, &idle, &after(10 * S), NOW);
        assert_eq!(
            d,
            Decision::Hold(Hold::Cooldown {
                key: "scale_down_cooldown",
                remaining_ms: 20 * S
            })
        );
        assert_eq!(
            Hold::Cooldown {
                key: "scale_down_cooldown",
                remaining_ms: 1
            }
            .to_string(),
            "scale_down_cooldown: no scale-in this soon after the last scaling"
        );
        let hot = vec![node(1, 95.0, 11 * MIN)];
        assert_eq!(
            decide(&c, &hot, &after(MIN), NOW),
            Decision::Hold(Hold::Cooldown {
                key: "cooldown",
                remaining_ms: 29 * MIN
            })
        );
        assert_eq!(
            Hold::Cooldown {
                key: "cooldown",
                remaining_ms: 1
            }
            .to_string(),
            "cooldown: no scale-up this soon after the last one"
        );
        // A recent scale-in does not hold a scale-up; the later of the two scalings counts
        // for scale_down_cooldown.
        let both = |up: u64, down: u64| History {
            last_scale_up_ms: Some(NOW - up),
            last_scale_down_ms: Some(NOW - down),
            ..History::default()
        };
        assert!(matches!(
            decide(&c, &hot, &both(40 * MIN, 5 * S), NOW),
            Decision::ScaleUp { .. }
        ));
        assert_eq!(
            scale_down_cooldown_left(&c, &both(40 * MIN, 5 * S), NOW),
            Some(25 * S)
        );
        assert_eq!(
            scale_down_cooldown_left(&c, &both(5 * S, 40 * MIN), NOW),
            Some(25 * S)
        );
        // A cooldown of centuries neither overflows nor lets anything through.
        let mut forever = c.clone();
        forever.cooldown = Duration::from_secs(u64::MAX / 2);
        assert!(cooldown_left(&forever, &after(MIN), NOW).is_some());
        assert_eq!(cooldown_left(&c, &after(MIN), NOW), Some(29 * MIN));
        assert_eq!(scale_down_cooldown_left(&c, &after(MIN), NOW), None);
        assert_eq!(cooldown_left(&c, &History::default(), NOW), None);
    }

    /// Failed launches: the next waits 1 minute, then 2, 4 … at most 30; the floor too.
    #[test]
    fn failed_launches_back_off() {
        assert_eq!(launch_backoff(0), Duration::ZERO);
        assert_eq!(launch_backoff(1), Duration::from_secs(60));
        assert_eq!(launch_backoff(3), Duration::from_secs(240));
        assert_eq!(launch_backoff(6), Duration::from_secs(1800));
        assert_eq!(launch_backoff(60), Duration::from_secs(1800));
        let c = cfg();
        let failed = |n: u32, ago: u64| History {
            failed_launches: n,
            last_failure_ms: Some(NOW - ago),
            ..History::default()
        };
        let hot = vec![node(1, 95.0, 11 * MIN)];
        assert_eq!(
            decide(&c, &hot, &failed(2, MIN), NOW),
            Decision::Hold(Hold::LaunchBackoff { failed: 2 })
        );
        assert_eq!(launch_backoff_left(&failed(2, MIN), NOW), Some(MIN));
        assert!(matches!(
            decide(&c, &hot, &failed(2, 2 * MIN), NOW),
            Decision::ScaleUp { .. }
        ));
        // The floor waits too: a launcher that fails is not run in a loop.
        let mut floor = c.clone();
        floor.min_nodes = 2;
        assert_eq!(
            decide(&floor, &[node(1, 5.0, 11 * MIN)], &failed(1, 10 * S), NOW),
            Decision::Hold(Hold::LaunchBackoff { failed: 1 })
        );
        assert_eq!(launch_backoff_left(&History::default(), NOW), None);
    }

    /// When the hourly cap clears: when the launch whose hour ends first leaves it.
    #[test]
    fn the_hourly_cap_says_when_it_clears() {
        let mut c = cfg();
        c.max_launches_per_hour = 2;
        let launches = |ago: &[u64]| History {
            launches_ms: ago.iter().map(|a| NOW - a).collect(),
            ..History::default()
        };
        assert_eq!(hourly_cap_left(&c, &launches(&[]), NOW), None);
        assert_eq!(hourly_cap_left(&c, &launches(&[10 * MIN]), NOW), None);
        assert_eq!(
            hourly_cap_left(&c, &launches(&[10 * MIN, 50 * MIN]), NOW),
            Some(10 * MIN)
        );
        // Three in the hour (the cap lowered since): two must leave; the second oldest.
        assert_eq!(
            hourly_cap_left(&c, &launches(&[5 * MIN, 20 * MIN, 50 * MIN]), NOW),
            Some(40 * MIN)
        );
        assert_eq!(
            hourly_cap_left(&c, &launches(&[61 * MIN, 62 * MIN]), NOW),
            None
        );
    }

    /// A HAProxy server's figures, one a second for the last `span`, all the same.
    fn lb(name: &str, sample: LbSample, span: u64) -> BalancerInput {
        BalancerInput {
            name: name.into(),
            samples: (0..span / S)
                .map(|k| (NOW - span + k * S + S, sample))
                .collect(),
        }
    }

    fn load(rate: f64, sessions: f64, queue: f64, rtime: Option<f64>) -> LbSample {
        LbSample {
            rate,
            sessions,
            queue,
            rtime_ms: rtime,
            partial: false,
        }
    }

    /// CPU is idle on every node; HAProxy's signals decide.
    fn lb_cfg() -> Scaling {
        let mut c = cfg();
        c.target_requests_per_node = Some(100.0);
        c.target_sessions_per_node = Some(10.0);
        c.scale_on_queue = true;
        c.target_response_time = Some(Duration::from_millis(200));
        c
    }

    fn decided(c: &Scaling, nodes: &[NodeInput], lbs: &[BalancerInput], h: &History) -> Decision {
        decide_all(c, nodes, lbs, h, NOW).0
    }

    fn up_on(count: u32, signal: &'static str) -> impl Fn(&Decision) -> bool {
        move |d| matches!(d, Decision::ScaleUp { count: c, signal: s, .. } if *c == count && *s == signal)
    }

    /// The largest ask of any signal wins; scale-in needs every signal's consent; a silent
    /// HAProxy server is not zero load; the guards hold as for CPU.
    #[test]
    fn haproxy_signals_table() {
        let c = lb_cfg();
        let fresh = History::default();
        let idle = || vec![node(1, 5.0, 11 * MIN), node(2, 5.0, 11 * MIN)];
        let idle_launched = || {
            vec![
                node(1, 5.0, 11 * MIN),
                launched(node(2, 5.0, 11 * MIN), NOW - 30 * MIN),
            ]
        };
        let quiet = load(10.0, 1.0, 0.0, Some(20.0));
        type Check = Box<dyn Fn(&Decision) -> bool>;
        type Case = (
            &'static str,
            Vec<NodeInput>,
            Vec<BalancerInput>,
            History,
            Check,
        );
        let cases: Vec<Case> = vec![
            (
                "requests: 450/s at 100 per node asks for 5 nodes (3 more), CPU idle",
                idle(),
                vec![lb("local", load(450.0, 5.0, 0.0, Some(20.0)), 11 * MIN)],
                fresh.clone(),
                Box::new(up_on(3, "requests")),
            ),
            (
                "sessions: 31 in progress at 10 per node asks for 4 (2 more)",
                idle(),
                vec![lb("local", load(50.0, 31.0, 0.0, Some(20.0)), 11 * MIN)],
                fresh.clone(),
                Box::new(up_on(2, "sessions")),
            ),
            (
                "the largest ask wins: requests 3 nodes, sessions 5 (capped at max_nodes 5)",
                idle(),
                vec![lb("local", load(250.0, 45.0, 0.0, Some(20.0)), 11 * MIN)],
                fresh.clone(),
                Box::new(up_on(3, "sessions")),
            ),
            (
                "two HAProxy servers each at half: only the sum crosses the target",
                idle(),
                vec![
                    lb("local", load(120.0, 2.0, 0.0, Some(20.0)), 11 * MIN),
                    lb("ssh://lb2", load(120.0, 2.0, 0.0, Some(20.0)), 11 * MIN),
                ],
                fresh.clone(),
                Box::new(up_on(1, "requests")),
            ),
            (
                "a queue through the whole window scales up by the step",
                idle(),
                vec![lb("local", load(10.0, 1.0, 3.0, Some(20.0)), 11 * MIN)],
                fresh.clone(),
                Box::new(up_on(1, "queue")),
            ),
            (
                "response time 500 ms against 200 with 2 nodes asks for 5",
                idle(),
                vec![lb("local", load(10.0, 1.0, 0.0, Some(500.0)), 11 * MIN)],
                fresh.clone(),
                Box::new(up_on(3, "response_time")),
            ),
            (
                "CPU asks more than HAProxy: CPU drives",
                vec![node(1, 95.0, 11 * MIN), node(2, 5.0, 11 * MIN)],
                vec![lb("local", quiet, 11 * MIN)],
                fresh.clone(),
                Box::new(up_on(1, "cpu")),
            ),
            (
                "no CPU data at all: HAProxy's figures still scale up",
                vec![node(1, 5.0, 5 * S), node(2, 5.0, 5 * S)],
                vec![lb("local", load(450.0, 5.0, 0.0, None), 11 * MIN)],
                fresh.clone(),
                Box::new(up_on(3, "requests")),
            ),
            (
                "figures younger than the window neither scale up nor let the fleet scale in",
                idle(),
                vec![lb("local", load(450.0, 5.0, 0.0, None), 30 * S)],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::BalancerSilent)),
            ),
            (
                "stale figures (none for 20 s) neither scale up nor let the fleet scale in",
                idle(),
                vec![BalancerInput {
                    name: "local".into(),
                    samples: lb("local", load(450.0, 5.0, 0.0, None), 11 * MIN)
                        .samples
                        .into_iter()
                        .filter(|(t, _)| *t < NOW - 20 * S)
                        .collect(),
                }],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::BalancerSilent)),
            ),
            (
                "a launch in flight counts as a node: 5 wanted, 2 + 3 in flight",
                idle(),
                vec![lb("local", load(450.0, 5.0, 0.0, None), 11 * MIN)],
                History {
                    in_flight: 3,
                    ..fresh.clone()
                },
                Box::new(|d| *d == Decision::Hold(Hold::Needed(Signal::Requests))),
            ),
            (
                "a queue with a launch in flight asks for nothing more (the launch is its step)",
                idle(),
                vec![lb("local", load(10.0, 1.0, 2.0, Some(20.0)), 11 * MIN)],
                History {
                    in_flight: 1,
                    ..fresh.clone()
                },
                Box::new(|d| !matches!(d, Decision::ScaleUp { .. })),
            ),
            (
                "a balancer silent for a minute inside the scale-down window: no scale-in",
                idle_launched(),
                vec![BalancerInput {
                    name: "local".into(),
                    samples: (0..11 * MIN / S)
                        .filter(|k| !(200..260).contains(k))
                        .map(|k| (NOW - 11 * MIN + k * S + S, quiet))
                        .collect(),
                }],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::BalancerSilent)),
            ),
            (
                "figures that leave out a reload's old workers: no scale-in",
                idle_launched(),
                vec![lb(
                    "local",
                    LbSample {
                        partial: true,
                        ..quiet
                    },
                    11 * MIN,
                )],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::BalancerSilent)),
            ),
            (
                "…but enough to scale up on",
                idle(),
                vec![lb(
                    "local",
                    LbSample {
                        partial: true,
                        ..load(450.0, 5.0, 0.0, Some(20.0))
                    },
                    11 * MIN,
                )],
                fresh.clone(),
                Box::new(up_on(3, "requests")),
            ),
            (
                "the cooldown holds a HAProxy scale-up too",
                idle(),
                vec![lb("local", load(450.0, 5.0, 0.0, None), 11 * MIN)],
                History {
                    last_scale_up_ms: Some(NOW - MIN),
                    ..fresh.clone()
                },
                Box::new(|d| matches!(d, Decision::Hold(Hold::Cooldown { .. }))),
            ),
            (
                "the hourly cap holds a HAProxy scale-up too",
                idle(),
                vec![lb("local", load(450.0, 5.0, 0.0, None), 11 * MIN)],
                History {
                    launches_ms: vec![NOW - 10 * MIN; 4],
                    ..fresh.clone()
                },
                Box::new(|d| *d == Decision::Hold(Hold::HourlyCap)),
            ),
            (
                "max_nodes holds it",
                (1..=5).map(|i| node(i, 5.0, 11 * MIN)).collect(),
                vec![lb("local", load(900.0, 5.0, 0.0, None), 11 * MIN)],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::AtMax)),
            ),
            (
                "quiet everywhere, CPU low: scale in the launched node",
                idle_launched(),
                vec![lb("local", quiet, 11 * MIN)],
                fresh.clone(),
                Box::new(|d| matches!(d, Decision::ScaleDown { host, .. } if *host == key(2))),
            ),
            (
                "no requests at all (rtime is HAProxy's last value): scale in",
                idle_launched(),
                vec![lb("local", load(0.0, 0.0, 0.0, Some(900.0)), 11 * MIN)],
                fresh.clone(),
                Box::new(|d| matches!(d, Decision::ScaleDown { .. })),
            ),
            (
                "CPU low but requests need both nodes: no scale-in",
                idle_launched(),
                vec![lb("local", load(150.0, 1.0, 0.0, Some(20.0)), 11 * MIN)],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::Needed(Signal::Requests))),
            ),
            (
                "a queue at one moment of the scale-down window: no scale-in",
                idle_launched(),
                vec![BalancerInput {
                    name: "local".into(),
                    samples: (0..11 * MIN / S)
                        .map(|k| {
                            let t = NOW - 11 * MIN + k * S + S;
                            let q = if k == 100 { 1.0 } else { 0.0 };
                            (t, load(10.0, 1.0, q, Some(20.0)))
                        })
                        .collect(),
                }],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::Needed(Signal::Queue))),
            ),
            (
                "sessions that needed both nodes for a minute of the window (mean fits one): no scale-in",
                idle_launched(),
                vec![BalancerInput {
                    name: "local".into(),
                    samples: (0..11 * MIN / S)
                        .map(|k| {
                            let t = NOW - 11 * MIN + k * S + S;
                            let n = if (200..260).contains(&k) { 15.0 } else { 1.0 };
                            (t, load(10.0, n, 0.0, Some(20.0)))
                        })
                        .collect(),
                }],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::Needed(Signal::Sessions))),
            ),
            (
                "response time that one node fewer would push over the target: no scale-in",
                idle_launched(),
                vec![lb("local", load(10.0, 1.0, 0.0, Some(150.0)), 11 * MIN)],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::Needed(Signal::ResponseTime))),
            ),
            (
                "one HAProxy server silent: its silence is not no load",
                idle_launched(),
                vec![
                    lb("local", quiet, 11 * MIN),
                    BalancerInput {
                        name: "ssh://lb2".into(),
                        samples: vec![],
                    },
                ],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::BalancerSilent)),
            ),
            (
                "a HAProxy server that went silent 20 s ago: no scale-in",
                idle_launched(),
                vec![
                    lb("local", quiet, 11 * MIN),
                    BalancerInput {
                        name: "ssh://lb2".into(),
                        samples: lb("x", quiet, 11 * MIN)
                            .samples
                            .into_iter()
                            .filter(|(t, _)| *t < NOW - 20 * S)
                            .collect(),
                    },
                ],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::BalancerSilent)),
            ),
            (
                "HAProxy quiet but CPU busy: no scale-in",
                vec![
                    node(1, 50.0, 11 * MIN),
                    launched(node(2, 50.0, 11 * MIN), NOW - 30 * MIN),
                ],
                vec![lb("local", quiet, 11 * MIN)],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::Steady)),
            ),
        ];
        for (what, nodes, lbs, hist, check) in cases {
            let d = decided(&c, &nodes, &lbs, &hist);
            assert!(check(&d), "{what}: {d:?}");
        }
    }

    /// With every HAProxy signal off, the figures change nothing: the CPU policy decides
    /// exactly as without them.
    #[test]
    fn haproxy_figures_are_ignored_when_no_signal_is_on() {
        let c = cfg();
        let busy = vec![lb(
            "local",
            load(9000.0, 900.0, 50.0, Some(5000.0)),
            11 * MIN,
        )];
        let cases = [
            vec![node(1, 5.0, 11 * MIN)],
            vec![node(1, 90.0, 11 * MIN)],
            vec![
                node(1, 5.0, 11 * MIN),
                launched(node(2, 5.0, 11 * MIN), NOW - 30 * MIN),
            ],
        ];
        for nodes in cases {
            assert_eq!(
                decided(&c, &nodes, &busy, &History::default()),
                decide(&c, &nodes, &History::default(), NOW)
            );
            assert_eq!(
                decided(&c, &nodes, &[], &History::default()),
                decide(&c, &nodes, &History::default(), NOW)
            );
        }
    }

    /// Aggregation across HAProxy servers: rates and sessions summed, the largest queue, the
    /// response time weighted by requests; a server that does not cover the window counted
    /// as missing, not as zero.
    #[test]
    fn haproxy_figures_aggregate_across_servers() {
        let c = lb_cfg();
        let a = lb("a", load(300.0, 6.0, 0.0, Some(100.0)), 2 * MIN);
        let b = lb("b", load(100.0, 2.0, 4.0, Some(300.0)), 2 * MIN);
        let silent = BalancerInput {
            name: "c".into(),
            samples: vec![],
        };
        let l = lb_load(&c, &[a, b, silent], NOW, Duration::from_secs(60));
        assert_eq!((l.rate, l.sessions), (400.0, 8.0));
        assert_eq!((l.queue_held, l.queue_peak), (4.0, 4.0));
        // (100 × 300 + 300 × 100) / 400
        assert_eq!(l.rtime_ms, Some(150.0));
        assert_eq!((l.covered, l.missing), (2, 1));
        let evals = signals(
            &c,
            &[lb("a", load(300.0, 6.0, 0.0, Some(100.0)), 2 * MIN)],
            2,
            NOW,
        );
        let names: Vec<&str> = evals.iter().map(|e| e.signal.name()).collect();
        assert_eq!(names, ["requests", "sessions", "queue", "response_time"]);
        assert_eq!(evals[0].desired, Some(3));
        assert_eq!(evals[1].desired, Some(1));
        assert_eq!(evals[2].desired, None, "no queue: no opinion");
        assert_eq!(evals[3].desired, Some(1));
        // Exactly at the target is enough nodes (no float noise).
        assert_eq!(ceil(300.0 / 100.0), 3);
        assert_eq!(ceil(0.3 / 0.1), 3);
    }

    #[test]
    fn instance_policy_table() {
        let c = cfg();
        let fresh = History::default();
        type Check = Box<dyn Fn(&Decision) -> bool>;
        let cases: Vec<(&str, Vec<NodeInput>, History, Check)> = vec![
            (
                "one hot node scales up",
                vec![node(1, 90.0, 11 * MIN), node(2, 10.0, 11 * MIN)],
                fresh.clone(),
                Box::new(up(1)),
            ),
            (
                "exactly the threshold scales up",
                vec![node(1, 75.0, 11 * MIN)],
                fresh.clone(),
                Box::new(up(1)),
            ),
            (
                "just under it holds",
                vec![node(1, 74.9, 11 * MIN)],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::Steady)),
            ),
            (
                "no nodes at all: the floor launches min_nodes, no data needed",
                vec![],
                fresh.clone(),
                Box::new(up(1)),
            ),
            (
                "a node without samples counts toward the floor",
                vec![{
                    let mut n = node(1, 0.0, 0);
                    n.born_ms = None;
                    n.up = false;
                    n
                }],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::NoData)),
            ),
            (
                "a launch in flight holds scale-up under the instance policy",
                vec![node(1, 90.0, 11 * MIN)],
                History {
                    in_flight: 1,
                    ..fresh.clone()
                },
                Box::new(|d| *d == Decision::Hold(Hold::LaunchInFlight)),
            ),
            (
                "stale samples are no data, never 0%",
                vec![{
                    let mut n = node(1, 5.0, 11 * MIN);
                    n.samples.iter_mut().for_each(|s| s.0 -= 30 * S);
                    n
                }],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::NoData)),
            ),
            (
                "a node down takes no part",
                vec![{
                    let mut n = node(1, 99.0, 11 * MIN);
                    n.up = false;
                    n
                }],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::NoData)),
            ),
            (
                "a young machine takes no part, and the hold says why",
                vec![{
                    let mut n = node(1, 99.0, MIN + 10 * S);
                    n.born_ms = Some(NOW - MIN);
                    n
                }],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::WarmingUp { remaining_ms: MIN })),
            ),
            (
                "data not covering the window is no data",
                vec![node(1, 99.0, 20 * S)],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::NoData)),
            ),
            (
                "max_nodes counts launches in flight",
                vec![node(1, 90.0, 11 * MIN), node(2, 90.0, 11 * MIN)],
                History {
                    in_flight: 3,
                    ..fresh.clone()
                },
                Box::new(|d| *d == Decision::Hold(Hold::AtMax)),
            ),
            (
                "cooldown after a scale-up",
                vec![node(1, 90.0, 11 * MIN)],
                History {
                    last_scale_up_ms: Some(NOW - 2 * MIN),
                    ..fresh.clone()
                },
                Box::new(|d| {
                    *d == Decision::Hold(Hold::Cooldown {
                        key: "cooldown",
                        remaining_ms: 3 * MIN,
                    })
                }),
            ),
            (
                "cooldown over",
                vec![node(1, 90.0, 11 * MIN)],
                History {
                    last_scale_up_ms: Some(NOW - 6 * MIN),
                    ..fresh.clone()
                },
                Box::new(up(1)),
            ),
            (
                "hourly cap",
                vec![node(1, 90.0, 11 * MIN)],
                History {
                    launches_ms: vec![
                        NOW - 50 * MIN,
                        NOW - 40 * MIN,
                        NOW - 30 * MIN,
                        NOW - 20 * MIN,
                    ],
                    ..fresh.clone()
                },
                Box::new(|d| *d == Decision::Hold(Hold::HourlyCap)),
            ),
            (
                "launches older than an hour do not count",
                vec![node(1, 90.0, 11 * MIN)],
                History {
                    launches_ms: vec![NOW - 70 * MIN; 4],
                    ..fresh.clone()
                },
                Box::new(up(1)),
            ),
            (
                "scale-in removes the newest launched host",
                vec![
                    node(1, 5.0, 11 * MIN),
                    launched(node(2, 5.0, 11 * MIN), NOW - 50 * MIN),
                    launched(node(3, 5.0, 11 * MIN), NOW - 40 * MIN),
                ],
                fresh.clone(),
                Box::new(|d| matches!(d, Decision::ScaleDown { host, .. } if *host == key(3))),
            ),
            (
                "never a host added by hand",
                vec![node(1, 5.0, 11 * MIN), node(2, 5.0, 11 * MIN)],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::NothingToRemove)),
            ),
            (
                "min_nodes",
                vec![launched(node(1, 5.0, 11 * MIN), NOW - 50 * MIN)],
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::AtMin)),
            ),
            (
                "low load for less than the window holds",
                vec![
                    node(1, 50.0, 11 * MIN),
                    launched(node(2, 50.0, 11 * MIN), NOW - 50 * MIN),
                ]
                .into_iter()
                .map(|mut n| {
                    let len = n.samples.len();
                    n.samples[len - 300..].iter_mut().for_each(|s| s.1 = 1.0);
                    n
                })
                .collect(),
                fresh.clone(),
                Box::new(|d| *d == Decision::Hold(Hold::Steady)),
            ),
            (
                "no scale-in while launches are in flight",
                vec![
                    node(1, 5.0, 11 * MIN),
                    launched(node(2, 5.0, 11 * MIN), NOW - 50 * MIN),
                ],
                History {
                    in_flight: 1,
                    ..fresh.clone()
                },
                Box::new(|d| *d == Decision::Hold(Hold::LaunchInFlight)),
            ),
            (
                "scale-down cooldown",
                vec![
                    node(1, 5.0, 11 * MIN),
                    launched(node(2, 5.0, 11 * MIN), NOW - 50 * MIN),
                ],
                History {
                    last_scale_down_ms: Some(NOW - 5 * MIN),
                    ..fresh.clone()
                },
                Box::new(|d| {
                    *d == Decision::Hold(Hold::Cooldown {
                        key: "scale_down_cooldown",
                        remaining_ms: 5 * MIN,
                    })
                }),
            ),
            (
                "scale_down_cooldown runs from a scale-up too",
                vec![
                    node(1, 5.0, 11 * MIN),
                    launched(node(2, 5.0, 11 * MIN), NOW - 50 * MIN),
                ],
                History {
                    last_scale_up_ms: Some(NOW - 4 * MIN),
                    ..fresh.clone()
                },
                Box::new(|d| {
                    *d == Decision::Hold(Hold::Cooldown {
                        key: "scale_down_cooldown",
                        remaining_ms: 6 * MIN,
                    })
                }),
            ),
        ];
        for (name, nodes, hist, check) in cases {
            let d = decide(&c, &nodes, &hist, NOW);
            assert!(check(&d), "{name}: got {d:?}");
        }
    }

    #[test]
    fn a_window_reaching_before_the_clock_began_is_no_data() {
        let c = cfg();
        let mut n = node(1, 99.0, 30 * S);
        let early = 30 * S;
        n.samples.iter_mut().for_each(|s| s.0 -= NOW - early);
        n.born_ms = Some(0);
        let mut c2 = c.clone();
        c2.warmup = Duration::ZERO;
        assert_eq!(
            decide(&c2, &[n], &History::default(), early),
            Decision::Hold(Hold::NoData)
        );
    }

    #[test]
    fn cluster_policy_targets_the_mean() {
        let mut c = cfg();
        c.policy = Policy::Cluster;
        c.target_cpu = 50.0;
        c.max_nodes = 10;
        c.max_launches_per_hour = 10;
        let h = History::default();
        // 4 nodes at 80%: desired = ceil(4 × 80/50) = 7 → 3 more.
        let nodes: Vec<_> = (1..=4).map(|i| node(i, 80.0, 11 * MIN)).collect();
        assert!(matches!(
            decide(&c, &nodes, &h, NOW),
            Decision::ScaleUp { count: 3, .. }
        ));
        // Inside the tolerance band (54% vs 50% ± 10%): nothing.
        let nodes: Vec<_> = (1..=4).map(|i| node(i, 54.0, 11 * MIN)).collect();
        assert_eq!(decide(&c, &nodes, &h, NOW), Decision::Hold(Hold::Steady));
        // Capped by max_nodes.
        let nodes: Vec<_> = (1..=4).map(|i| node(i, 100.0, 11 * MIN)).collect();
        assert!(matches!(
            decide(
                &c,
                &nodes,
                &History {
                    in_flight: 4,
                    ..h.clone()
                },
                NOW
            ),
            Decision::ScaleUp { count: 2, .. }
        ));
        // Low: one launched node goes.
        let mut nodes: Vec<_> = (1..=3).map(|i| node(i, 10.0, 11 * MIN)).collect();
        nodes.push(launched(node(4, 10.0, 11 * MIN), NOW - 30 * MIN));
        assert!(
            matches!(decide(&c, &nodes, &h, NOW), Decision::ScaleDown { host, .. } if host == key(4))
        );
    }

    #[test]
    fn explains_each_nodes_part_in_the_decision() {
        let c = cfg();
        let ok = node(1, 40.0, 11 * MIN);
        let e = explain(&c, &ok, NOW);
        assert_eq!(e.why_not, None);
        assert!((e.mean_up.unwrap() - 40.0).abs() < 1e-9);
        assert!(e.mean_down.is_some());
        let mut down = ok.clone();
        down.up = false;
        assert_eq!(
            explain(&c, &down, NOW).why_not.as_deref(),
            Some("its tunnel is down")
        );
        let mut young = node(1, 40.0, 11 * MIN);
        young.born_ms = Some(NOW - 30 * S);
        assert_eq!(
            explain(&c, &young, NOW).why_not.as_deref(),
            Some("warming up (90 s left)")
        );
        let mut stale = node(1, 40.0, 11 * MIN);
        stale.samples.iter_mut().for_each(|s| s.0 -= 30 * S);
        assert_eq!(
            explain(&c, &stale, NOW).why_not.as_deref(),
            Some("no sample for 30 s")
        );
        let short = node(1, 40.0, 20 * S);
        assert_eq!(
            explain(&c, &short, NOW).why_not.as_deref(),
            Some("its samples do not cover the window yet")
        );
        let mut never = node(1, 0.0, 0);
        never.born_ms = None;
        assert_eq!(
            explain(&c, &never, NOW).why_not.as_deref(),
            Some("never reported")
        );
    }

    /// The floor: fewer nodes than min_nodes are replaced whatever the load (none here has
    /// data), counting launches in flight, within max_nodes and the hourly cap.
    #[test]
    fn min_nodes_is_a_floor_the_master_restores() {
        let mut c = cfg();
        c.min_nodes = 3;
        let silent = |i| {
            let mut n = node(i, 0.0, 0);
            n.up = false;
            n
        };
        let h = History::default();
        let d = decide(&c, &[silent(1)], &h, NOW);
        assert!(
            matches!(&d, Decision::ScaleUp { count: 2, reason, .. } if reason.contains("below min_nodes (3)")),
            "{d:?}"
        );
        let one_in_flight = History {
            in_flight: 1,
            ..h.clone()
        };
        assert!(matches!(
            decide(&c, &[silent(1)], &one_in_flight, NOW),
            Decision::ScaleUp { count: 1, .. }
        ));
        let two_in_flight = History {
            in_flight: 2,
            ..h.clone()
        };
        assert_eq!(
            decide(&c, &[silent(1)], &two_in_flight, NOW),
            Decision::Hold(Hold::NoData),
            "launches in flight fill the floor: nothing more"
        );
        let capped = History {
            launches_ms: vec![NOW - 10 * MIN; 4],
            ..h.clone()
        };
        assert_eq!(
            decide(&c, &[silent(1)], &capped, NOW),
            Decision::Hold(Hold::HourlyCap)
        );
        let mut low_max = c.clone();
        low_max.max_nodes = 3;
        let partly = History {
            launches_ms: vec![NOW - 10 * MIN; 3],
            ..h.clone()
        };
        assert!(matches!(
            decide(&low_max, &[silent(1)], &partly, NOW),
            Decision::ScaleUp { count: 1, .. }
        ));
    }

    /// Load that flaps between hot and idle every few minutes for a day never launches more
    /// than max_launches_per_hour in any hour.
    #[test]
    fn flapping_load_respects_the_hourly_cap() {
        let mut c = cfg();
        c.max_nodes = 1000;
        c.cooldown = Duration::from_secs(60);
        let mut hist = History::default();
        let mut t = NOW;
        for step in 0..(24 * 60) {
            t += MIN;
            let busy = if (step / 3) % 2 == 0 { 95.0 } else { 5.0 };
            let mut n = node(1, busy, 11 * MIN);
            n.samples.iter_mut().for_each(|s| s.0 += t - NOW);
            if let Decision::ScaleUp { count, .. } = decide(&c, &[n], &hist, t) {
                hist.last_scale_up_ms = Some(t);
                hist.launches_ms
                    .extend(std::iter::repeat_n(t, count as usize));
            }
        }
        assert!(
            hist.launches_ms.len() > 20,
            "it did scale: {}",
            hist.launches_ms.len()
        );
        for &start in &hist.launches_ms {
            let in_hour = hist
                .launches_ms
                .iter()
                .filter(|&&x| x >= start && x < start + 60 * MIN)
                .count();
            assert!(
                in_hour <= c.max_launches_per_hour as usize,
                "{in_hour} launches in the hour from {start}"
            );
        }
    }
}
