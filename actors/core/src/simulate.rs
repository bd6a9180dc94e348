//! Replays recorded load through the policy the master runs ([`crate::policy`]), with the
//! configuration's `[scaling]` settings, before trusting it with money.
//!
//! A trace is CSV: `time,node,busy` — seconds from the start, the node's name, its busy CPU in
//! percent — one row per sample, any resolution; a header row is allowed. Each node reports
//! every `sample_interval` the trace's last value for it, as its agent would.
//!
//! With a header row the columns are found by name, and a trace may carry what HAProxy
//! measured for the backend (summed over the HAProxy servers, as the master aggregates it):
//! `requests` (per second), `sessions` (in progress), `queue` (waiting) and `rtime_ms`
//! (average response time). A row may give a node's CPU, the backend's figures, or both;
//! cells may be empty. HAProxy's figures hold until the next row that gives them.
//!
//! The model of what scaling does: the trace's nodes carry the recorded load. A launch adds a
//! node after `launch_delay` (boot and health check); load balancing then spreads the same
//! demand over more nodes, so every node's CPU is its recorded value × (trace nodes present /
//! nodes serving), and a launched node carries the mean. A scale-in removes the launched node
//! the policy names, and the load spreads back. HAProxy's figures: the request rate and the
//! requests in progress are demand, the same however many nodes serve; a queue is absorbed
//! once more nodes serve than when it was recorded; the response time is taken as recorded
//! (more nodes do not make an upstream faster), so a response-time target replays its worst
//! case. Time is simulated: nothing sleeps.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::config::Scaling;
use crate::haproxy_api::LbSample;
use crate::hosts::{HostKey, HostName};
use crate::policy::{decide_all, BalancerInput, Decision, History, NodeInput};

/// A recorded trace: per node, (seconds from start, busy %) in time order; what HAProxy
/// measured for the backend, (seconds from start, figures) in time order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    pub nodes: BTreeMap<String, Vec<(f64, f64)>>,
    pub backend: Vec<(f64, LbSample)>,
}

/// The columns a trace may have, by header name.
const COLUMNS: [&str; 7] = [
    "time", "node", "busy", "requests", "sessions", "queue", "rtime_ms",
];

/// Where each column of [`COLUMNS`] is in a row.
#[derive(Debug, Clone, Copy)]
struct Layout([Option<usize>; 7]);

impl Layout {
    /// `time,node,busy`, the format without a header.
    const PLAIN: Layout = Layout([Some(0), Some(1), Some(2), None, None, None, None]);

    /// The layout a header row names, or None when `cells` is not a header (its first cell
    /// is a number).
    fn from_header(cells: &[&str]) -> Option<Result<Layout, String>> {
        if cells.first().is_some_and(|c| c.parse::<f64>().is_ok()) {
            return None;
        }
        let known = |c: &&str| COLUMNS.contains(&c.to_ascii_lowercase().as_str());
        if cells.len() == 3 && !cells.iter().any(known) {
            // A header of its own words over time,node,busy (`timestamp,host,cpu%`).
            return Some(Ok(Layout::PLAIN));
        }
        let mut at = [None; 7];
        for (i, c) in cells.iter().enumerate() {
            let name = c.to_ascii_lowercase();
            let Some(k) = COLUMNS.iter().position(|n| *n == name) else {
                return Some(Err(format!(
                    "unknown column {c:?} in the header (columns: {})",
                    COLUMNS.join(", ")
                )));
            };
            if at[k].replace(i).is_some() {
                return Some(Err(format!("column {c:?} appears twice in the header")));
            }
        }
        if at[0].is_none() {
            return Some(Err("the header has no time column".into()));
        }
        if at[1].is_some() != at[2].is_some() {
            return Some(Err("node and busy go together in the header".into()));
        }
        Some(Ok(Layout(at)))
    }

    fn width(&self) -> usize {
        self.0.iter().flatten().max().map_or(0, |m| m + 1)
    }

    /// The cell of column `k` (empty when absent).
    fn cell<'a>(&self, cells: &[&'a str], k: usize) -> &'a str {
        self.0[k].and_then(|i| cells.get(i).copied()).unwrap_or("")
    }
}

/// A line of a trace that cannot be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct TraceError {
    pub line: usize,
    pub message: String,
}

impl Trace {
    /// Parses `time,node,busy` rows, or the columns a header row names. Blank lines and `#`
    /// comments are skipped; a first row whose time is not a number is a header.
    pub fn parse(text: &str) -> Result<Trace, TraceError> {
        let mut t = Trace::default();
        let mut layout = Layout::PLAIN;
        let mut headed = false;
        let first = first_row(text);
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |message: String| TraceError {
                line: i + 1,
                message,
            };
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            if i == first {
                if let Some(l) = Layout::from_header(&cells) {
                    layout = l.map_err(err)?;
                    headed = true;
                    continue;
                }
            }
            let want = layout.width();
            if (!headed && cells.len() != 3) || cells.len() < want {
                return Err(err(match headed {
                    false => format!("expected 3 columns (time,node,busy), found {}", cells.len()),
                    true => format!(
                        "expected {want} columns as the header names, found {}",
                        cells.len()
                    ),
                }));
            }
            let time_cell = layout.cell(&cells, 0);
            let Ok(time) = time_cell.parse::<f64>() else {
                return Err(err(format!(
                    "time {time_cell:?} is not a number of seconds"
                )));
            };
            if !time.is_finite() || time < 0.0 {
                return Err(err(format!("time {time} must be 0 or more")));
            }
            let (node, busy_cell) = (layout.cell(&cells, 1), layout.cell(&cells, 2));
            if !(node.is_empty() && busy_cell.is_empty() && headed) {
                t.node_row(node, busy_cell, time).map_err(err)?;
            }
            let figures: Vec<&str> = (3..7).map(|k| layout.cell(&cells, k)).collect();
            if figures.iter().any(|c| !c.is_empty()) {
                t.backend_row(&figures, time).map_err(err)?;
            }
        }
        match t.nodes.is_empty() && t.backend.is_empty() {
            true => Err(TraceError {
                line: 0,
                message: "no samples".into(),
            }),
            false => Ok(t),
        }
    }

    fn node_row(&mut self, node: &str, busy: &str, time: f64) -> Result<(), String> {
        if HostName::parse(node).is_err() {
            return Err(format!(
                "node {node:?} is not a host name (letters, digits, '-', '.')"
            ));
        }
        let busy: f64 = busy
            .trim_end_matches('%')
            .parse()
            .map_err(|_| format!("busy {busy:?} is not a number"))?;
        if !(0.0..=100.0).contains(&busy) {
            return Err(format!("busy {busy} is not between 0 and 100"));
        }
        let samples = self.nodes.entry(node.to_string()).or_default();
        if samples.last().is_some_and(|(last, _)| *last > time) {
            return Err(format!(
                "time {time} for {node} is before its previous row; rows of a node go in time order"
            ));
        }
        samples.push((time, busy));
        Ok(())
    }

    /// `cells`: requests, sessions, queue, rtime_ms; an empty cell keeps the figure the last
    /// row gave (0, or no response time, before any).
    fn backend_row(&mut self, cells: &[&str], time: f64) -> Result<(), String> {
        let last = self.backend.last().map(|(_, s)| *s).unwrap_or_default();
        let mut v = [
            last.rate,
            last.sessions,
            last.queue,
            last.rtime_ms.unwrap_or_default(),
        ];
        for (k, c) in cells.iter().enumerate() {
            if c.is_empty() {
                continue;
            }
            let name = COLUMNS[k + 3];
            v[k] = c
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("{name} {c:?} is not a number of 0 or more"))?;
        }
        let sample = LbSample {
            rate: v[0],
            sessions: v[1],
            queue: v[2],
            rtime_ms: (!cells[3].is_empty() || last.rtime_ms.is_some()).then_some(v[3]),
            partial: false,
        };
        match self.backend.last_mut() {
            Some((last, _)) if *last > time => {
                return Err(format!(
                    "time {time} is before the previous row with HAProxy figures; rows go in time order"
                ))
            }
            Some((last, s)) if *last == time => *s = sample,
            _ => self.backend.push((time, sample)),
        }
        Ok(())
    }

    /// The first and last time of any sample.
    pub fn span(&self) -> (f64, f64) {
        let times = self
            .nodes
            .values()
            .flatten()
            .map(|(t, _)| *t)
            .chain(self.backend.iter().map(|(t, _)| *t));
        let start = times.clone().fold(f64::INFINITY, f64::min);
        let end = times.fold(f64::NEG_INFINITY, f64::max);
        (start, end)
    }

    /// `node`'s recorded value at `t`: its last sample at or before `t`; None before its first
    /// sample or after its last.
    fn at<T: Copy>(samples: &[(f64, T)], t: f64) -> Option<T> {
        let last = samples.last()?.0;
        if t > last {
            return None;
        }
        let i = samples.partition_point(|(s, _)| *s <= t);
        (i > 0).then(|| samples[i - 1].1)
    }
}

fn first_row(text: &str) -> usize {
    text.lines()
        .position(|l| !l.trim().is_empty() && !l.trim().starts_with('#'))
        .unwrap_or(0)
}

/// How the replay runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// How often nodes report (`[node] sample_interval`).
    pub sample_interval: Duration,
    /// How often the policy runs (the master's tick).
    pub tick: Duration,
    /// From a scale-up decision to the new node serving and reporting.
    pub launch_delay: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            sample_interval: Duration::from_secs(1),
            tick: Duration::from_secs(1),
            launch_delay: Duration::from_secs(90),
        }
    }
}

/// What happened, in time order.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    ScaleUp {
        count: u32,
        reason: String,
    },
    /// A launched node serves and reports from now.
    Ready {
        node: String,
    },
    ScaleDown {
        node: String,
        reason: String,
    },
    /// The policy holds for a new reason (logged as the decider logs it: once per reason).
    Hold {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Seconds from the start of the trace.
    pub t: f64,
    pub kind: EventKind,
}

/// One step of the replay, for the plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub t: f64,
    /// Every serving node's CPU (as the model spreads the load), by name.
    pub cpu: Vec<(String, f64)>,
    /// Nodes serving, and launches not ready yet.
    pub nodes: usize,
    pub in_flight: u32,
    /// What HAProxy measures for the backend as the model has it (None: the trace has no
    /// HAProxy figures for this time).
    pub backend: Option<LbSample>,
}

/// The replay's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub events: Vec<Event>,
    pub frames: Vec<Frame>,
    pub scale_ups: u32,
    pub launched: u32,
    pub scale_downs: u32,
    pub max_nodes: usize,
    /// Node-hours served (the bill), and what the trace's nodes alone would have served.
    pub node_hours: f64,
    pub trace_node_hours: f64,
    /// Seconds during which some node was at or above `scale_up_threshold`.
    pub hot_s: f64,
}

struct SimNode {
    name: String,
    key: HostKey,
    launched: bool,
    born_ms: u64,
    registered_ms: u64,
    samples: std::collections::VecDeque<(u64, f64)>,
}

/// Far from zero, so windows that reach back before the trace are not covered (as the
/// decider's clock does).
const ORIGIN_MS: u64 = 24 * 3_600_000;

fn key_of(name: &str) -> HostKey {
    HostKey {
        host: HostName::parse(name).expect("names are checked when the trace is read"),
        port: 80,
    }
}

/// Replays `trace` through the policy with `cfg`.
pub fn run(cfg: &Scaling, trace: &Trace, s: &Settings) -> Outcome {
    let (start, end) = trace.span();
    let ms = |d: Duration| d.as_millis() as u64;
    let at_ms = |t: f64| ORIGIN_MS + ((t - start) * 1000.0).round() as u64;
    let keep = ms(cfg.scale_up_window.max(cfg.scale_down_window) + cfg.stale_after);
    let tick = ms(s.tick).max(1);
    let sample_every = ms(s.sample_interval).max(1);
    let mut nodes: Vec<SimNode> = Vec::new();
    let mut hist = History::default();
    // (ready at, name) of launches not serving yet.
    let mut pending: Vec<(u64, String)> = Vec::new();
    let mut next_id = 1;
    let mut out = Outcome {
        events: Vec::new(),
        frames: Vec::new(),
        scale_ups: 0,
        launched: 0,
        scale_downs: 0,
        max_nodes: 0,
        node_hours: 0.0,
        trace_node_hours: 0.0,
        hot_s: 0.0,
    };
    let mut last_hold: Option<String> = None;
    // HAProxy's figures, as one HAProxy server would report them to the master.
    let mut balancer = BalancerInput {
        name: "haproxy".into(),
        samples: Vec::new(),
    };
    let mut next_sample = at_ms(start);
    let stop = at_ms(end);
    let mut now = at_ms(start);
    while now <= stop {
        let t = start + (now - ORIGIN_MS) as f64 / 1000.0;
        // Launches that are ready serve from now.
        let (ready, waiting): (Vec<_>, Vec<_>) =
            pending.into_iter().partition(|(at, _)| *at <= now);
        pending = waiting;
        for (_, name) in ready {
            out.events.push(Event {
                t,
                kind: EventKind::Ready { node: name.clone() },
            });
            nodes.push(SimNode {
                key: key_of(&name),
                name,
                launched: true,
                // The machine started at the launch.
                born_ms: now.saturating_sub(ms(s.launch_delay)),
                registered_ms: now,
                samples: Default::default(),
            });
        }
        hist.in_flight = pending.len() as u32;
        // The trace's nodes come and go with their rows.
        for (name, samples) in &trace.nodes {
            let present = Trace::at(samples, t).is_some();
            let known = nodes.iter().any(|n| &n.name == name);
            if present && !known {
                nodes.push(SimNode {
                    key: key_of(name),
                    name: name.clone(),
                    launched: false,
                    born_ms: 0,
                    registered_ms: 0,
                    samples: Default::default(),
                });
            } else if !present && known {
                nodes.retain(|n| &n.name != name);
            }
        }
        // The load, spread over the serving nodes.
        let recorded: Vec<(String, f64)> = trace
            .nodes
            .iter()
            .filter_map(|(n, s)| Trace::at(s, t).map(|b| (n.clone(), b)))
            .collect();
        let serving = nodes.len().max(1) as f64;
        let share = recorded.len() as f64 / serving;
        let mean = match recorded.is_empty() {
            true => 0.0,
            false => recorded.iter().map(|(_, b)| b).sum::<f64>() / recorded.len() as f64,
        };
        let cpu: Vec<(String, f64)> = nodes
            .iter()
            .map(|n| {
                let base = recorded
                    .iter()
                    .find(|(r, _)| *r == n.name)
                    .map_or(mean, |(_, b)| *b);
                (n.name.clone(), (base * share).min(100.0))
            })
            .collect();
        // The backend's figures under the model: demand stays; a queue is absorbed once more
        // nodes serve than when it was recorded.
        let backend = Trace::at(&trace.backend, t).map(|mut b| {
            if serving > recorded.len().max(1) as f64 {
                b.queue = 0.0;
            }
            b
        });
        if now >= next_sample {
            if let Some(b) = backend {
                balancer.samples.push((now, b));
                let drop = balancer
                    .samples
                    .partition_point(|(at, _)| now.saturating_sub(*at) > keep);
                balancer.samples.drain(..drop);
            }
            for (n, (_, c)) in nodes.iter_mut().zip(&cpu) {
                n.samples.push_back((now, *c));
                while n
                    .samples
                    .front()
                    .is_some_and(|(at, _)| now.saturating_sub(*at) > keep)
                {
                    n.samples.pop_front();
                }
            }
            next_sample += sample_every;
        }
        let step_h = tick as f64 / 3_600_000.0;
        out.node_hours += nodes.len() as f64 * step_h;
        out.trace_node_hours += recorded.len() as f64 * step_h;
        if cpu.iter().any(|(_, c)| *c >= cfg.scale_up_threshold) {
            out.hot_s += tick as f64 / 1000.0;
        }
        out.max_nodes = out.max_nodes.max(nodes.len());
        out.frames.push(Frame {
            t,
            cpu,
            nodes: nodes.len(),
            in_flight: hist.in_flight,
            backend,
        });

        let inputs: Vec<NodeInput> = nodes
            .iter()
            .map(|n| NodeInput {
                key: n.key.clone(),
                up: true,
                born_ms: Some(n.born_ms),
                samples: n.samples.iter().copied().collect(),
                launched: n.launched,
                registered_ms: n.registered_ms,
            })
            .collect();
        let balancers: &[BalancerInput] = match trace.backend.is_empty() {
            true => &[],
            false => std::slice::from_ref(&balancer),
        };
        match decide_all(cfg, &inputs, balancers, &hist, now).0 {
            Decision::Hold(h) => {
                let reason = h.to_string();
                if last_hold.as_deref() != Some(reason.as_str()) {
                    out.events.push(Event {
                        t,
                        kind: EventKind::Hold {
                            reason: reason.clone(),
                        },
                    });
                    last_hold = Some(reason);
                }
            }
            Decision::ScaleUp {
                count,
                reason,
                signal,
            } => {
                last_hold = None;
                let reason = format!("[{signal}] {reason}");
                out.scale_ups += 1;
                out.launched += count;
                hist.last_scale_up_ms = Some(now);
                hist.launches_ms
                    .extend(std::iter::repeat_n(now, count as usize));
                for _ in 0..count {
                    pending.push((now + ms(s.launch_delay), format!("new-{next_id}")));
                    next_id += 1;
                }
                hist.in_flight = pending.len() as u32;
                out.events.push(Event {
                    t,
                    kind: EventKind::ScaleUp { count, reason },
                });
            }
            Decision::ScaleDown { host, reason } => {
                last_hold = None;
                out.scale_downs += 1;
                hist.last_scale_down_ms = Some(now);
                let name = host.host.to_string();
                nodes.retain(|n| n.key != host);
                out.events.push(Event {
                    t,
                    kind: EventKind::ScaleDown { node: name, reason },
                });
            }
        }
        let hour_ago = now.saturating_sub(3_600_000);
        hist.launches_ms.retain(|&l| l > hour_ago);
        now += tick;
    }
    out
}

/// `1:02:03` or `2:03` for seconds from the start.
pub fn clock(t: f64) -> String {
    let s = t.max(0.0).round() as u64;
    match s >= 3600 {
        true => format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60),
        false => format!("{}:{:02}", s / 60, s % 60),
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = clock(self.t);
        match &self.kind {
            EventKind::ScaleUp { count, reason } => {
                write!(f, "{at:>8}  scale-up +{count}   {reason}")
            }
            EventKind::Ready { node } => write!(f, "{at:>8}  ready        {node} serves"),
            EventKind::ScaleDown { node, reason } => {
                write!(f, "{at:>8}  scale-in     {node}: {reason}")
            }
            EventKind::Hold { reason } => write!(f, "{at:>8}  hold         {reason}"),
        }
    }
}

impl Outcome {
    /// The closing summary `autoscaler simulate` prints.
    pub fn summary(&self, duration_s: f64) -> String {
        format!(
            "{} over {}: {} scale-ups ({} instances), {} scale-ins, at most {} nodes; \
             {:.1} node-hours served ({:.1} for the trace's nodes alone); some node at or above \
             the scale-up threshold for {}",
            "Replayed",
            clock(duration_s),
            self.scale_ups,
            self.launched,
            self.scale_downs,
            self.max_nodes,
            self.node_hours,
            self.trace_node_hours,
            clock(self.hot_s),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Layout, Role};
    use std::path::Path;

    fn scaling() -> Scaling {
        let mut c = Config::defaults(&Layout::for_dir(Path::new("/srv/as")), Role::Master).scaling;
        c.dry_run = false;
        c.warmup = Duration::from_secs(0);
        c
    }

    /// Two nodes at `busy` from 0 to `secs`, one row every `every` seconds.
    fn flat(busy: f64, secs: u32, every: u32) -> String {
        fleet(2, busy, secs, every)
    }

    /// `n` nodes at `busy`.
    fn fleet(n: usize, busy: f64, secs: u32, every: u32) -> String {
        let mut s = String::from("time,node,busy\n");
        for t in (0..=secs).step_by(every as usize) {
            for i in 1..=n {
                s += &format!("{t},web-{i},{busy}\n");
            }
        }
        s
    }

    #[test]
    fn traces_parse_with_clear_errors() {
        let t =
            Trace::parse("time,node,busy\n0,web-1,10\n5,web-1,20%\n# note\n\n0,web-2,5\n").unwrap();
        assert_eq!(t.nodes["web-1"], vec![(0.0, 10.0), (5.0, 20.0)]);
        assert_eq!(t.span(), (0.0, 5.0));
        for (text, line, says) in [
            ("0,web-1\n", 1, "3 columns"),
            ("0,web-1,10\nx,web-1,5\n", 2, "not a number of seconds"),
            ("0,web 1,10\n", 1, "not a host name"),
            ("0,web-1,101\n", 1, "between 0 and 100"),
            ("0,web-1,ten\n", 1, "not a number"),
            ("5,web-1,1\n4,web-1,1\n", 2, "time order"),
            ("-1,web-1,1\n", 1, "0 or more"),
            ("time,node,busy\n", 0, "no samples"),
        ] {
            let e = Trace::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(says), "{text:?}: {e}");
        }
    }

    /// A header names the columns: HAProxy's figures alone, with the CPU on the same rows,
    /// or in any order; empty cells are no figure.
    #[test]
    fn traces_with_haproxy_columns() {
        let t = Trace::parse(
            "time,node,busy,requests,sessions,queue,rtime_ms\n\
             0,web-1,5,40,4,0,100\n\
             1,web-1,6,,,,\n\
             2,,,50,5,1,\n",
        )
        .unwrap();
        assert_eq!(t.nodes["web-1"], vec![(0.0, 5.0), (1.0, 6.0)]);
        let lb = |rate, sessions, queue, rtime_ms| LbSample {
            rate,
            sessions,
            queue,
            rtime_ms,
            partial: false,
        };
        assert_eq!(
            t.backend,
            vec![
                (0.0, lb(40.0, 4.0, 0.0, Some(100.0))),
                (2.0, lb(50.0, 5.0, 1.0, Some(100.0)))
            ]
        );
        let t = Trace::parse("sessions,time\n3,0\n4,10\n").unwrap();
        assert!(t.nodes.is_empty());
        assert_eq!(t.backend[1], (10.0, lb(0.0, 4.0, 0.0, None)));
        assert_eq!(t.span(), (0.0, 10.0));
        // An empty cell keeps the last figure: a sparse column is not a drop to zero.
        let t = Trace::parse("time,requests,sessions\n0,50,5\n1,,6\n").unwrap();
        assert_eq!(t.backend[1], (1.0, lb(50.0, 6.0, 0.0, None)));
        // A three-column header of other words is read as time,node,busy, as always.
        let t = Trace::parse("timestamp,host,cpu%\n0,web-1,10\n").unwrap();
        assert_eq!(t.nodes["web-1"], vec![(0.0, 10.0)]);
        for (text, line, says) in [
            ("time,node,cpu\n", 1, "unknown column \"cpu\""),
            ("time,node,busy,rps\n", 1, "unknown column \"rps\""),
            ("node,busy\n", 1, "no time column"),
            ("time,node\n", 1, "node and busy go together"),
            ("time,time,busy\n", 1, "appears twice"),
            (
                "time,sessions\n0,-1\n",
                2,
                "sessions \"-1\" is not a number of 0 or more",
            ),
            ("time,rtime_ms\n0,fast\n", 2, "rtime_ms"),
            (
                "time,sessions,queue\n0,1\n",
                2,
                "expected 3 columns as the header names",
            ),
            ("time,sessions\n5,1\n4,1\n", 3, "time order"),
        ] {
            let e = Trace::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(says), "{text:?}: {e}");
        }
    }

    /// A backend that is slow at idle CPU: a replay with a sessions target scales up on
    /// the sessions, not the CPU, and back in once the requests stop; with no HAProxy
    /// signal on, the same trace does nothing.
    #[test]
    fn a_slow_backend_replays_on_its_sessions() {
        let mut text = String::from("time,node,busy,requests,sessions,queue,rtime_ms\n");
        for t in 0..=1800 {
            let busy = 4.0;
            let (rate, sessions) = if (300..900).contains(&t) {
                (60.0, 6.0)
            } else {
                (0.0, 0.0)
            };
            text += &format!("{t},web-1,{busy},{rate},{sessions},0,100\n");
        }
        let trace = Trace::parse(&text).unwrap();
        let settings = Settings {
            launch_delay: Duration::from_secs(30),
            ..Settings::default()
        };
        let mut c = scaling();
        let idle = run(&c, &trace, &settings);
        assert_eq!(
            (idle.scale_ups, idle.scale_downs),
            (0, 0),
            "{:?}",
            idle.events
        );
        c.target_sessions_per_node = Some(4.0);
        c.scale_down_window = Duration::from_secs(120);
        c.scale_down_cooldown = Duration::from_secs(60);
        let o = run(&c, &trace, &settings);
        assert_eq!(
            (o.scale_ups, o.launched, o.scale_downs, o.max_nodes),
            (1, 1, 1, 2),
            "{:#?}",
            o.events
        );
        let up = o
            .events
            .iter()
            .find(|e| matches!(e.kind, EventKind::ScaleUp { .. }))
            .unwrap();
        // Once the mean over the window (1 m) passes 4 per node: 40 s after the load starts
        // at 5:00 (6 in progress over 40 of the 60 s).
        assert!((340.0..=342.0).contains(&up.t), "{up}");
        assert!(
            up.to_string()
                .contains("[sessions] 4.0 requests in progress"),
            "{up}"
        );
        let down = o
            .events
            .iter()
            .find(|e| matches!(e.kind, EventKind::ScaleDown { .. }))
            .unwrap();
        // Not before the load stops (15:00) and the scale-down window has passed.
        assert!(down.t >= 900.0 + 120.0, "{down}");
        let f = o.frames.iter().find(|f| f.t == 600.0).unwrap();
        assert_eq!(f.backend.map(|b| b.sessions), Some(6.0));
    }

    #[test]
    fn a_value_holds_until_the_next_row() {
        let s = vec![(10.0, 1.0), (20.0, 2.0)];
        assert_eq!(Trace::at(&s, 5.0), None);
        assert_eq!(Trace::at(&s, 10.0), Some(1.0));
        assert_eq!(Trace::at(&s, 19.9), Some(1.0));
        assert_eq!(Trace::at(&s, 20.0), Some(2.0));
        assert_eq!(Trace::at(&s, 20.1), None);
    }

    #[test]
    fn steady_load_does_nothing() {
        let t = Trace::parse(&flat(50.0, 1800, 60)).unwrap();
        let o = run(&scaling(), &t, &Settings::default());
        assert_eq!((o.scale_ups, o.scale_downs), (0, 0), "{:?}", o.events);
        assert_eq!(o.max_nodes, 2);
        assert!((o.node_hours - 1.0).abs() < 0.01, "{}", o.node_hours);
    }

    #[test]
    fn a_hot_fleet_scales_up_after_the_window_and_the_load_spreads() {
        let cfg = scaling();
        let t = Trace::parse(&flat(90.0, 1800, 10)).unwrap();
        let s = Settings::default();
        let o = run(&cfg, &t, &s);
        let first = o
            .events
            .iter()
            .find(|e| matches!(e.kind, EventKind::ScaleUp { .. }))
            .unwrap();
        // The window must be covered first: a minute of samples, less the staleness allowance
        // the master grants the first one.
        let covered = (cfg.scale_up_window - cfg.stale_after).as_secs_f64();
        assert!((first.t - covered).abs() <= 1.0, "{first}");
        // The new node serves after the launch delay; then 2 × 90 % spread over 3 is 60 %.
        let ready = o
            .events
            .iter()
            .find(|e| matches!(e.kind, EventKind::Ready { .. }))
            .unwrap();
        assert!((ready.t - first.t - s.launch_delay.as_secs_f64()).abs() <= 1.0);
        let after = o.frames.iter().find(|f| f.t > ready.t).unwrap();
        assert_eq!(after.nodes, 3);
        assert!(
            after.cpu.iter().all(|(_, c)| (*c - 60.0).abs() < 1e-9),
            "{after:?}"
        );
        // 60 % is below the threshold: no second launch, and none while the first was in
        // flight.
        assert_eq!(o.scale_ups, 1, "{:?}", o.events);
    }

    #[test]
    fn the_guards_apply_as_in_the_master() {
        // Load so high that max_nodes cannot cool it (4 × 100 % over 6 nodes is 67 %, but 5
        // nodes still run at 80 %): launches stop at max_nodes, spaced by the cooldown.
        let mut cfg = scaling();
        cfg.max_nodes = 5;
        cfg.cooldown = Duration::from_secs(300);
        let t = Trace::parse(&fleet(4, 100.0, 3600, 30)).unwrap();
        let o = run(&cfg, &t, &Settings::default());
        assert_eq!(o.max_nodes, 5, "{:?}", o.events);
        assert_eq!(o.scale_ups, 1, "{:?}", o.events);
        assert!(o.events.iter().any(|e| e.kind
            == EventKind::Hold {
                reason: "max_nodes reached".into()
            }));
        cfg.max_nodes = 10;
        let o = run(&cfg, &t, &Settings::default());
        let ups: Vec<f64> = o
            .events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::ScaleUp { .. }))
            .map(|e| e.t)
            .collect();
        assert_eq!(ups.len(), 2, "{:?}", o.events);
        assert!(ups[1] - ups[0] >= 300.0, "{ups:?}");
        // And the hourly cap: one launch an hour leaves the fleet hot.
        cfg.max_launches_per_hour = 1;
        let o = run(&cfg, &t, &Settings::default());
        assert_eq!(o.launched, 1, "{:?}", o.events);
        assert!(o.events.iter().any(|e| e.kind
            == EventKind::Hold {
                reason: "max_launches_per_hour reached".into()
            }));
    }

    #[test]
    fn a_spike_scales_up_then_back_in() {
        let mut cfg = scaling();
        cfg.scale_down_window = Duration::from_secs(300);
        cfg.scale_down_cooldown = Duration::from_secs(300);
        cfg.cooldown = Duration::from_secs(120);
        // 10 minutes at 20 %, 10 at 95 %, an hour at 10 %.
        let mut text = String::new();
        for t in (0..=4200).step_by(10) {
            let busy = match t {
                600..1200 => 95.0,
                0..600 => 20.0,
                _ => 10.0,
            };
            for n in ["web-1", "web-2"] {
                text += &format!("{t},{n},{busy}\n");
            }
        }
        let o = run(&cfg, &Trace::parse(&text).unwrap(), &Settings::default());
        assert!(o.scale_ups >= 1, "{:?}", o.events);
        assert_eq!(o.scale_downs, o.launched, "every launched node goes again");
        assert_eq!(o.frames.last().unwrap().nodes, 2);
        // Scale-in comes after the spike, when the window's mean is low, newest node first.
        let downs: Vec<&Event> = o
            .events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::ScaleDown { .. }))
            .collect();
        assert!(downs[0].t > 1200.0, "{}", downs[0]);
        let text = o
            .events
            .iter()
            .map(|e| format!("{e}\n"))
            .collect::<String>();
        assert!(text.contains("scale-up +1"), "{text}");
        let last = format!("new-{}", o.launched);
        assert!(downs[0].to_string().contains(&last), "{text}");
    }

    #[test]
    fn the_same_policy_code_decides() {
        // The cluster policy with a target: a mean of 90 % against 60 % wants 50 % more.
        let mut cfg = scaling();
        cfg.policy = crate::config::Policy::Cluster;
        cfg.max_nodes = 10;
        let t = Trace::parse(&flat(90.0, 600, 10)).unwrap();
        let o = run(&cfg, &t, &Settings::default());
        let EventKind::ScaleUp { count, reason } = &o
            .events
            .iter()
            .find(|e| matches!(e.kind, EventKind::ScaleUp { .. }))
            .unwrap()
            .kind
        else {
            unreachable!()
        };
        assert_eq!(*count, 1, "ceil(2 × 90/60) = 3 nodes");
        assert!(reason.contains("desired 3 nodes"), "{reason}");
    }

    #[test]
    fn clock_reads_well() {
        assert_eq!(clock(0.0), "0:00");
        assert_eq!(clock(65.4), "1:05");
        assert_eq!(clock(3725.0), "1:02:05");
    }
}
