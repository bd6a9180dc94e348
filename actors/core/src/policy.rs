//! The scaling policy: a pure function from what the master knows (per-node sample windows,
//! node states, launches in flight, past actions, configuration, now) to one decision.
//!
//! Time is an input (milliseconds on the master's clock, when each sample was *received*, so
//! node clock skew does not matter). Nothing here sleeps, reads a clock or does I/O; the
//! ScaleDecider actor feeds it and carries out what it returns.

use std::fmt;
use std::time::Duration;

use crate::config::{Policy, Scaling};
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
    /// Within `cooldown` of the last scale-up (or `scale_down_cooldown` of the last scale-in).
    Cooldown { remaining_ms: u64 },
    /// max_launches_per_hour reached.
    HourlyCap,
    /// Launches are in flight: no scale-in until they finish, and (instance policy) no more
    /// scale-up for the load that asked for them.
    LaunchInFlight,
    /// Scale-in wanted but no host was launched by this autoscaler.
    NothingToRemove,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    ScaleUp { count: u32, reason: String },
    ScaleDown { host: HostKey, reason: String },
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
            Hold::Cooldown { .. } => "cooldown",
            Hold::HourlyCap => "hourly_cap",
            Hold::LaunchInFlight => "launch_in_flight",
            Hold::NothingToRemove => "nothing_to_remove",
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
            Hold::Cooldown { .. } => f.write_str("in a cooldown after the last scaling"),
            Hold::HourlyCap => f.write_str("max_launches_per_hour reached"),
            Hold::LaunchInFlight => f.write_str("launches in flight"),
            Hold::NothingToRemove => f.write_str("no host launched by autoscaler to remove"),
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
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
    let (up_means, down_means, warming) = means(cfg, nodes, now);
    let sum = summary(&up_means, &down_means);
    (
        decide_from(cfg, nodes, hist, now, &up_means, &down_means, warming),
        sum,
    )
}

/// How many of `want` new nodes the guards let launch now: max_nodes (launches in flight
/// count as nodes) and max_launches_per_hour.
fn capped(cfg: &Scaling, hist: &History, now: u64, current: u32, want: u32) -> Result<u32, Hold> {
    if current >= cfg.max_nodes {
        return Err(Hold::AtMax);
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
    hist: &History,
    now: u64,
    up_means: &[f64],
    down_means: &[f64],
    warming: Option<u64>,
) -> Decision {
    let current = nodes.len() as u32 + hist.in_flight;
    // The floor needs no CPU data: fewer nodes than min_nodes (one terminated from outside,
    // a launch that failed) are replaced, within the hourly cap, as EC2 Auto Scaling does.
    if current < cfg.min_nodes {
        let reason = format!(
            "{current} nodes (launches in flight included) is below min_nodes ({})",
            cfg.min_nodes
        );
        return match capped(cfg, hist, now, current, cfg.min_nodes - current) {
            Ok(count) => Decision::ScaleUp { count, reason },
            Err(hold) => Decision::Hold(hold),
        };
    }
    if up_means.is_empty() && down_means.is_empty() {
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
    if let Some((want, reason)) = up_wanted {
        if current >= cfg.max_nodes {
            return Decision::Hold(Hold::AtMax);
        }
        // The load that asked for the launch in flight is still the load seen now: under the
        // instance policy, wait for that capacity before asking for more (a slow bootstrap
        // can outlast the cooldown). The cluster policy counts launches in flight as nodes.
        if cfg.policy == Policy::Instance && hist.in_flight > 0 {
            return Decision::Hold(Hold::LaunchInFlight);
        }
        if let Some(t) = hist.last_scale_up_ms {
            let since = now.saturating_sub(t);
            if since < ms(cfg.cooldown) {
                return Decision::Hold(Hold::Cooldown {
                    remaining_ms: ms(cfg.cooldown) - since,
                });
            }
        }
        return match capped(cfg, hist, now, current, want) {
            Ok(count) => Decision::ScaleUp { count, reason },
            Err(hold) => Decision::Hold(hold),
        };
    }

    // Scale-in: the whole (long) window below the threshold, or below the tolerance band.
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
    if hist.in_flight > 0 {
        return Decision::Hold(Hold::LaunchInFlight);
    }
    for (last, cooldown) in [
        (hist.last_scale_down_ms, cfg.scale_down_cooldown),
        (hist.last_scale_up_ms, cfg.cooldown),
    ] {
        if let Some(t) = last {
            let since = now.saturating_sub(t);
            if since < ms(cooldown) {
                return Decision::Hold(Hold::Cooldown {
                    remaining_ms: ms(cooldown) - since,
                });
            }
        }
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
                        remaining_ms: 5 * MIN,
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
            matches!(&d, Decision::ScaleUp { count: 2, reason } if reason.contains("below min_nodes (3)")),
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
