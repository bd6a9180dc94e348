//! The master's Prometheus metrics (`[autoscaler] metrics_address`, served at `/metrics` in the
//! text exposition format).
//!
//! Counters and histograms are counted where things happen: the decider, the launcher, the
//! HAProxy writer, the tunnels. What describes the present (per-node CPU, nodes by tunnel
//! state, launches and drains in flight) is read from the running actors at each scrape, the
//! same view `autoscaler status` shows, so it can never drift from it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use slog::{info, warn, Logger};

use crate::master::control::{Sources, Status};

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// Launches take minutes (boot, health check); drains up to drain_timeout: 1 s … about 2.3 h.
fn long_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 14))
}

/// Why a report frame is not used.
pub const FRAME_REASONS: &[&str] = &["duplicate", "malformed", "truncated", "overflow"];
/// Why a report channel is refused.
pub const REFUSAL_REASONS: &[&str] = &[
    "unauthenticated",
    "forged",
    "no_hello",
    "wrong_instance",
    "evicted",
];

/// Every metric the master exports.
pub struct Metrics {
    registry: Registry,
    decisions: Family<Labels, Counter>,
    launches: Family<Labels, Counter>,
    launch_seconds: HistogramFamily,
    terminations: Family<Labels, Counter>,
    termination_seconds: HistogramFamily,
    haproxy_applies: Family<Labels, Counter>,
    ssh_reconnects: Family<Labels, Counter>,
    ssh_renewals: Family<Labels, Counter>,
    frames_dropped: Family<Labels, Counter>,
    samples_missing: Family<Labels, Counter>,
    channels_refused: Family<Labels, Counter>,
    // Read from the actors at each scrape.
    node_cpu: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    node_mean_up: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    nodes: Family<Labels, Gauge>,
    launches_in_flight: Gauge,
    drains_in_flight: Gauge,
    launches_last_hour: Gauge,
    haproxy_failing: Family<Labels, Gauge>,
    signal_value: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    signal_target: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    signal_desired: Family<Labels, Gauge>,
    signal_servers_silent: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("autoscaler"),
            decisions: Family::default(),
            launches: Family::default(),
            launch_seconds: Family::new_with_constructor(long_buckets),
            terminations: Family::default(),
            termination_seconds: Family::new_with_constructor(long_buckets),
            haproxy_applies: Family::default(),
            ssh_reconnects: Family::default(),
            ssh_renewals: Family::default(),
            frames_dropped: Family::default(),
            samples_missing: Family::default(),
            channels_refused: Family::default(),
            node_cpu: Family::default(),
            node_mean_up: Family::default(),
            nodes: Family::default(),
            launches_in_flight: Gauge::default(),
            drains_in_flight: Gauge::default(),
            launches_last_hour: Gauge::default(),
            haproxy_failing: Family::default(),
            signal_value: Family::default(),
            signal_target: Family::default(),
            signal_desired: Family::default(),
            signal_servers_silent: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register(
            "decisions",
            "Policy evaluations by outcome (scale_up, scale_down, hold) and reason",
            m.decisions.clone(),
        );
        r.register(
            "launches",
            "Launches finished, by result (ok, failed)",
            m.launches.clone(),
        );
        r.register(
            "launch_duration_seconds",
            "From the decision to the last host registered (or the failure), by result",
            m.launch_seconds.clone(),
        );
        r.register(
            "terminations",
            "Drained hosts terminated or stopped (ok), and attempts that failed and are retried (failed)",
            m.terminations.clone(),
        );
        r.register(
            "termination_duration_seconds",
            "From the start of a drain to the host terminated, drain included",
            m.termination_seconds.clone(),
        );
        r.register(
            "haproxy_applies",
            "Changes applied to each HAProxy server, by how (runtime, reload, unchanged) or failed",
            m.haproxy_applies.clone(),
        );
        r.register(
            "ssh_reconnects",
            "SSH sessions to a node retried after a failure or a drop",
            m.ssh_reconnects.clone(),
        );
        r.register(
            "ssh_session_renewals",
            "SSH sessions to a node the master ended and opened again because report channels it had closed were still held open on the node (each is also a reconnect)",
            m.ssh_renewals.clone(),
        );
        r.register(
            "report_frames_dropped",
            "Report frames from nodes not used, by reason (malformed, truncated, duplicate)",
            m.frames_dropped.clone(),
        );
        r.register(
            "report_samples_missing",
            "Samples a node's sequence numbers show were never received (lost on the node)",
            m.samples_missing.clone(),
        );
        r.register(
            "report_channels_refused",
            "Report channels closed before proving they are the agent's: unauthenticated (the hello \
             did not answer the challenge), no_hello (none in time), too_many (waiting already)",
            m.channels_refused.clone(),
        );
        r.register(
            "node_cpu_busy_percent",
            "Each node's last reported busy CPU",
            m.node_cpu.clone(),
        );
        r.register(
            "node_cpu_window_mean_percent",
            "Each node's mean busy CPU over scale_up_window, when its data covers the window",
            m.node_mean_up.clone(),
        );
        r.register(
            "nodes",
            "Registered hosts by tunnel state (up, down, never) and origin (manual, launched)",
            m.nodes.clone(),
        );
        r.register(
            "launches_in_flight",
            "Launches decided and not finished",
            m.launches_in_flight.clone(),
        );
        r.register(
            "drains_in_flight",
            "Hosts being drained before termination",
            m.drains_in_flight.clone(),
        );
        r.register(
            "launches_last_hour",
            "Instances launched in the last hour (max_launches_per_hour counts these)",
            m.launches_last_hour.clone(),
        );
        r.register(
            "haproxy_server_failing",
            "1 while the last apply to an HAProxy server failed and is being retried",
            m.haproxy_failing.clone(),
        );
        r.register(
            "haproxy_signal_value",
            "Each HAProxy signal that is on, over scale_up_window across the HAProxy servers (requests: per second; sessions and queue: requests; response_time: milliseconds); absent without figures",
            m.signal_value.clone(),
        );
        r.register(
            "haproxy_signal_target",
            "Each HAProxy signal's target per node (queue: 0, any queue is a breach; response_time: milliseconds)",
            m.signal_target.clone(),
        );
        r.register(
            "haproxy_signal_desired_nodes",
            "The nodes each HAProxy signal asks for; absent while it has no opinion",
            m.signal_desired.clone(),
        );
        r.register(
            "haproxy_signal_servers_silent",
            "HAProxy servers whose figures do not cover scale_up_window (not read as no load)",
            m.signal_servers_silent.clone(),
        );
        m
    }

    /// A policy evaluation: `action` is scale_up, scale_down or hold; `reason` a short word.
    pub fn decision(&self, action: &str, reason: &str) {
        self.decisions
            .get_or_create(&labels(&[("action", action), ("reason", reason)]))
            .inc();
    }

    /// A launch that ended, and how long it took.
    pub fn launch(&self, ok: bool, took: Duration) {
        let l = labels(&[("result", if ok { "ok" } else { "failed" })]);
        self.launches.get_or_create(&l).inc();
        self.launch_seconds
            .get_or_create(&l)
            .observe(took.as_secs_f64());
    }

    /// A drained host terminated after `took` (Some), or an attempt that failed (None).
    pub fn termination(&self, took: Option<Duration>) {
        let result = if took.is_some() { "ok" } else { "failed" };
        let l = labels(&[("result", result)]);
        self.terminations.get_or_create(&l).inc();
        if let Some(t) = took {
            self.termination_seconds
                .get_or_create(&l)
                .observe(t.as_secs_f64());
        }
    }

    /// An apply to HAProxy server `server`: runtime, reload, unchanged or failed.
    pub fn haproxy_apply(&self, server: &str, how: &str) {
        self.haproxy_applies
            .get_or_create(&labels(&[("server", server), ("result", how)]))
            .inc();
    }

    /// The SSH session to `host` is retried.
    pub fn ssh_reconnect(&self, host: &str) {
        self.ssh_reconnects
            .get_or_create(&labels(&[("host", host)]))
            .inc();
    }

    /// The SSH session to `host` is renewed: channels the master closed were held open on
    /// the node.
    pub fn ssh_renewal(&self, host: &str) {
        self.ssh_renewals
            .get_or_create(&labels(&[("host", host)]))
            .inc();
    }

    /// A report frame from `host` not used; `reason` is one of [`FRAME_REASONS`].
    pub fn frame_dropped(&self, host: &str, reason: &'static str) {
        debug_assert!(FRAME_REASONS.contains(&reason), "{reason}");
        self.frames_dropped
            .get_or_create(&labels(&[("host", host), ("reason", reason)]))
            .inc();
    }

    /// A report channel of `host` refused before it proved to be the agent's; `reason` is one
    /// of [`REFUSAL_REASONS`].
    pub fn channel_refused(&self, host: &str, reason: &'static str) {
        debug_assert!(REFUSAL_REASONS.contains(&reason), "{reason}");
        self.channels_refused
            .get_or_create(&labels(&[("host", host), ("reason", reason)]))
            .inc();
    }

    /// `n` samples from `host` never arrived.
    pub fn samples_missing(&self, host: &str, n: u64) {
        self.samples_missing
            .get_or_create(&labels(&[("host", host)]))
            .inc_by(n);
    }

    /// Removes every series of `host` (it left the registry): with launch churn they would
    /// grow without end.
    pub fn forget_host(&self, host: &str) {
        let h = labels(&[("host", host)]);
        self.ssh_reconnects.remove(&h);
        self.ssh_renewals.remove(&h);
        self.samples_missing.remove(&h);
        for r in FRAME_REASONS {
            self.frames_dropped
                .remove(&labels(&[("host", host), ("reason", r)]));
        }
        for r in REFUSAL_REASONS {
            self.channels_refused
                .remove(&labels(&[("host", host), ("reason", r)]));
        }
    }

    /// Sets the gauges that describe the present from `s`.
    fn observe(&self, s: &Status) {
        self.node_cpu.clear();
        self.node_mean_up.clear();
        self.nodes.clear();
        self.haproxy_failing.clear();
        for n in &s.nodes {
            let node = labels(&[("host", &n.host), ("port", &n.port.to_string())]);
            if let Some(c) = n.last_cpu_pct {
                self.node_cpu.get_or_create(&node).set(c);
            }
            if let Some(c) = n.mean_up_pct {
                self.node_mean_up.get_or_create(&node).set(c);
            }
            self.nodes
                .get_or_create(&labels(&[("state", &n.tunnel), ("origin", &n.origin)]))
                .inc();
        }
        self.launches_in_flight
            .set(s.launches.iter().map(|(_, n)| i64::from(*n)).sum());
        self.drains_in_flight.set(s.drains.len() as i64);
        self.launches_last_hour.set(s.launches_last_hour as i64);
        self.signal_value.clear();
        self.signal_target.clear();
        self.signal_desired.clear();
        self.signal_servers_silent
            .set(s.signals.first().map_or(0, |l| l.missing as i64));
        for l in &s.signals {
            let signal = labels(&[("signal", &l.signal)]);
            self.signal_target.get_or_create(&signal).set(l.target);
            if let Some(v) = l.value {
                self.signal_value.get_or_create(&signal).set(v);
            }
            if let Some(d) = l.desired {
                self.signal_desired.get_or_create(&signal).set(i64::from(d));
            }
        }
        for h in &s.haproxy {
            self.haproxy_failing
                .get_or_create(&labels(&[("server", &h.server)]))
                .set(i64::from(h.state == "failing"));
        }
    }

    /// The counters and histograms as they stand (OpenMetrics text), without reading the
    /// present from the actors.
    pub fn counted(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Every metric in the OpenMetrics text format, with the present read from `s`.
    pub fn render(&self, s: &Status) -> String {
        self.observe(s);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// OpenMetrics text as the older Prometheus text format (0.0.4), for clients that do not ask
/// for OpenMetrics (`curl`, `promtool check metrics`): a counter's HELP and TYPE name its
/// `_total` series, and there is no `# EOF` or `# UNIT`.
pub fn classic_text(open: &str) -> String {
    let counters: std::collections::HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len());
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(format!("{prefix}{name}{suffix} {tail}").trim_end());
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Whether an `Accept` header asks for OpenMetrics.
fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// Serves `GET /metrics` on `addr` (one worker: a scrape every few seconds needs no more).
/// Binding happens here, so a taken address fails the master's start.
pub fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    sources: Sources,
    log: &Logger,
) -> std::io::Result<()> {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let log = log.new(slog::o!("actor" => "Metrics"));
    let handler_log = log.clone();
    let server = HttpServer::new(move || {
        let (metrics, sources, log) = (metrics.clone(), sources.clone(), handler_log.clone());
        App::new().route(
            "/metrics",
            web::get().to(move |req: actix_web::HttpRequest| {
                let (metrics, sources, log) = (metrics.clone(), sources.clone(), log.clone());
                let accept = req
                    .headers()
                    .get(actix_web::http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                async move {
                    match sources.status().await {
                        Ok(s) if wants_openmetrics(accept.as_deref()) => HttpResponse::Ok()
                            .content_type(
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(metrics.render(&s)),
                        Ok(s) => HttpResponse::Ok()
                            .content_type("text/plain; version=0.0.4; charset=utf-8")
                            .body(classic_text(&metrics.render(&s))),
                        Err(e) => {
                            warn!(log, "Metrics scrape failed"; "error" => %e);
                            HttpResponse::ServiceUnavailable().body(e.to_string())
                        }
                    }
                }
            }),
        )
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .bind(addr)?
    .run();
    info!(log, "Serving metrics"; "address" => %addr, "path" => "/metrics");
    actix::spawn(async move {
        if let Err(e) = server.await {
            warn!(log, "Metrics server stopped"; "error" => %e);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_that_left_leaves_no_series() {
        let m = Metrics::new();
        for host in ["127.0.1.5", "127.0.1.6"] {
            m.ssh_reconnect(host);
            m.ssh_renewal(host);
            m.samples_missing(host, 2);
            for r in FRAME_REASONS {
                m.frame_dropped(host, r);
            }
            for r in REFUSAL_REASONS {
                m.channel_refused(host, r);
            }
        }
        let series = 3 + FRAME_REASONS.len() + REFUSAL_REASONS.len();
        let before = m.counted();
        assert_eq!(
            before.matches("host=\"127.0.1.5\"").count(),
            series,
            "{before}"
        );
        m.forget_host("127.0.1.5");
        let after = m.counted();
        assert!(!after.contains("127.0.1.5"), "{after}");
        assert_eq!(
            after.matches("host=\"127.0.1.6\"").count(),
            series,
            "{after}"
        );
    }

    #[test]
    fn classic_text_names_counters_by_their_series() {
        let m = Metrics::new();
        m.decision("hold", "steady");
        m.launch(true, Duration::from_secs(3));
        let open = {
            let mut out = String::new();
            encode(&mut out, &m.registry).unwrap();
            out
        };
        assert!(
            open.contains("# TYPE autoscaler_decisions counter"),
            "{open}"
        );
        assert!(open.ends_with("# EOF\n"), "{open}");
        let text = classic_text(&open);
        assert!(
            text.contains("# TYPE autoscaler_decisions_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP autoscaler_decisions_total Policy evaluations"),
            "{text}"
        );
        assert!(text.contains("autoscaler_decisions_total{action=\"hold\",reason=\"steady\"} 1"));
        // Histograms and gauges keep their names.
        assert!(
            text.contains("# TYPE autoscaler_launch_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("autoscaler_launch_duration_seconds_bucket{le=\"4.0\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE autoscaler_nodes gauge") || !open.contains("autoscaler_nodes")
        );
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn openmetrics_only_when_asked() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
    }
}
