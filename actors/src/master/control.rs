//! The master's control socket (`[autoscaler] control_socket`, mode 0600): `autoscaler status`
//! connects, sends `status`, and reads one JSON document — what the running master knows of
//! each node, its decisions, the launches and drains in flight, and each HAProxy server's last
//! apply. Only the owner of the socket (root, with the packaged unit) can ask.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actix::Addr;
use serde::{Deserialize, Serialize};
use slog::{debug, Logger};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use super::decider::{GetDecisionStatus, ScaleDecider};
use super::haproxy_worker::Applied;
use super::haproxy_writer::{GetServerStatus, HaproxyWriter, ServerStatus, ServerView};
use super::launcher::intents::{now_ms, pending_drains, pending_intents};
use super::node_status::{ListNodes, NodeStatus};
use super::registry::{HostRegistry, ListHosts};
use crate::adapters::etcd::{current, Etcd, LeadCell};
use crate::adapters::files;
use crate::adapters::records::Records;
use crate::hosts::Origin;

/// What `autoscaler status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub policy: String,
    pub dry_run: bool,
    pub nodes: Vec<NodeLine>,
    /// The last scale-up or scale-in.
    pub last_action: Option<LastAction>,
    /// Why the decider holds now, if it does.
    pub holding: Option<String>,
    /// Time left before `cooldown` lets a scale-up happen, if it holds.
    pub cooldown_left_s: Option<f64>,
    /// Time left before `scale_down_cooldown` lets a scale-in happen, if it holds.
    #[serde(default)]
    pub scale_down_cooldown_left_s: Option<f64>,
    /// Time left before `max_launches_per_hour` allows a launch, if it holds.
    #[serde(default)]
    pub hourly_cap_left_s: Option<f64>,
    /// None from a master before this field.
    #[serde(default)]
    pub max_launches_per_hour: Option<u32>,
    /// Launches in a row that failed, and the time left before the next may be asked for.
    #[serde(default)]
    pub failed_launches: u32,
    #[serde(default)]
    pub launch_backoff_left_s: Option<f64>,
    pub launches_last_hour: usize,
    /// Launches in flight: decision id and instances.
    pub launches: Vec<(String, u32)>,
    pub drains: Vec<DrainLine>,
    pub haproxy: Vec<HaproxyLine>,
    /// Several masters: who this is, and who leads.
    #[serde(default)]
    pub cluster: Option<ClusterLine>,
    /// Each HAProxy signal that is on, against its target.
    #[serde(default)]
    pub signals: Vec<SignalLine>,
}

/// A HAProxy signal over scale_up_window, against its target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignalLine {
    /// requests, sessions, queue or response_time.
    pub signal: String,
    /// Requests per second, requests in progress, queued requests, or milliseconds; None
    /// while no HAProxy server's figures cover the window.
    pub value: Option<f64>,
    /// Per node (the queue's is 0: any queue is a breach).
    pub target: f64,
    /// The nodes it asks for (None: no opinion).
    pub desired: Option<u32>,
    /// HAProxy servers whose figures cover the window, and those whose do not.
    pub covered: usize,
    pub missing: usize,
}

/// This master in its group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterLine {
    pub name: String,
    pub leading: bool,
    /// The leader's name, if there is one.
    pub leader: Option<String>,
}

/// One HAProxy server's last apply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HaproxyLine {
    pub server: String,
    /// `applied`, `applying` or `failing`.
    pub state: String,
    /// What the last apply did, or the error it retries after.
    pub detail: String,
    pub applied_s_ago: Option<f64>,
    /// Why changes to this server go by reloads instead of its runtime API, if they do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_unavailable: Option<String>,
}

/// A decision that acted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastAction {
    pub action: String,
    pub reason: String,
    pub s_ago: f64,
}

/// One registered host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeLine {
    pub host: String,
    pub port: u16,
    pub origin: String,
    pub instance_id: Option<String>,
    /// `up`, `down` or `never` (no tunnel has come up yet).
    pub tunnel: String,
    pub last_cpu_pct: Option<f64>,
    pub last_seen_s: Option<f64>,
    pub mean_up_pct: Option<f64>,
    pub mean_down_pct: Option<f64>,
    /// Why it takes no part in scale-up decisions; None when it does.
    pub why_not: Option<String>,
    /// Why the node is not heard (SSH, host key, forward, report secret), if it is not.
    #[serde(default)]
    pub problem: Option<String>,
}

/// A host on its way out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainLine {
    pub name: String,
    pub instance_id: Option<String>,
    /// Seconds until it is terminated at the latest.
    pub deadline_in_s: f64,
}

/// The actors the status comes from.
#[derive(Clone)]
pub struct Sources {
    pub registry: Addr<HostRegistry>,
    pub nodes: Addr<NodeStatus>,
    pub decider: Addr<ScaleDecider>,
    pub writer: Addr<HaproxyWriter>,
    /// Launch intents and drains.
    pub records: Records,
    /// With several masters: the election, and this master's name in it.
    pub cluster: Option<(Etcd, LeadCell, String)>,
}

impl Sources {
    /// What the running actors say now.
    pub async fn status(&self) -> Result<Status, actix::MailboxError> {
        let hosts = self.registry.send(ListHosts).await?;
        let views = self.nodes.send(ListNodes).await?;
        let d = self.decider.send(GetDecisionStatus).await?;
        let servers = self.writer.send(GetServerStatus).await?;
        // Records and the leader's name are best effort: a status must come even when etcd
        // does not answer.
        let intents = pending_intents(&self.records).await.unwrap_or_default();
        let drains = pending_drains(&self.records).await.unwrap_or_default();
        let cluster = match &self.cluster {
            None => None,
            Some((etcd, lead, name)) => Some(ClusterLine {
                name: name.clone(),
                leading: current(lead).is_some(),
                leader: etcd
                    .leader()
                    .await
                    .unwrap_or_else(|e| Some(format!("unknown ({e})"))),
            }),
        };
        let nodes = hosts
            .iter()
            .map(|h| {
                let v = views.get(&h.key());
                let eval = d
                    .nodes
                    .iter()
                    .find(|n| n.host == h.host.to_string() && n.port == h.port);
                NodeLine {
                    host: h.host.to_string(),
                    port: h.port,
                    origin: match h.origin {
                        Origin::Manual => "manual".into(),
                        Origin::Launched => "launched".into(),
                    },
                    instance_id: h.instance_id.clone(),
                    tunnel: match v {
                        Some(v) if v.up => "up".into(),
                        // Heard before: down now. Never heard (only a problem known): never.
                        Some(v) if v.hello.is_some() => "down".into(),
                        _ => "never".into(),
                    },
                    last_cpu_pct: v.and_then(|v| v.last_sample).map(|s| s.busy_pct),
                    last_seen_s: v
                        .and_then(|v| v.last_seen)
                        .map(|t| t.elapsed().as_secs_f64()),
                    mean_up_pct: eval.and_then(|e| e.mean_up_pct),
                    mean_down_pct: eval.and_then(|e| e.mean_down_pct),
                    why_not: eval.and_then(|e| e.why_not.clone()),
                    problem: v.and_then(|v| v.problem.clone()),
                }
            })
            .collect();
        let now = now_ms();
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            policy: d.policy,
            dry_run: d.dry_run,
            nodes,
            last_action: d.last_action.map(|(action, reason, ago)| LastAction {
                action,
                reason,
                s_ago: ago as f64 / 1000.0,
            }),
            holding: d.holding,
            cooldown_left_s: d.cooldown_left_ms.map(|ms| ms as f64 / 1000.0),
            scale_down_cooldown_left_s: d.scale_down_cooldown_left_ms.map(|ms| ms as f64 / 1000.0),
            hourly_cap_left_s: d.hourly_cap_left_ms.map(|ms| ms as f64 / 1000.0),
            max_launches_per_hour: Some(d.max_launches_per_hour),
            failed_launches: d.failed_launches,
            launch_backoff_left_s: d.launch_backoff_left_ms.map(|ms| ms as f64 / 1000.0),
            launches_last_hour: d.launches_last_hour,
            signals: d
                .signals
                .into_iter()
                .map(|l| SignalLine {
                    signal: l.signal,
                    value: l.value,
                    target: l.target,
                    desired: l.desired,
                    covered: l.covered,
                    missing: l.missing,
                })
                .collect(),
            launches: {
                let mut l = d.in_flight;
                for i in intents {
                    if !l.iter().any(|(id, _)| *id == i.decision_id) {
                        l.push((i.decision_id, i.count));
                    }
                }
                l
            },
            drains: drains
                .into_iter()
                .map(|d| DrainLine {
                    name: d.name(),
                    instance_id: d.instance_id.clone(),
                    deadline_in_s: d.deadline_ms.saturating_sub(now) as f64 / 1000.0,
                })
                .collect(),
            cluster,
            haproxy: servers
                .into_iter()
                .map(|(server, view)| {
                    let ServerView {
                        status,
                        runtime_unavailable,
                    } = view;
                    let (state, detail, at) = match status {
                        ServerStatus::Pending => ("applying", String::new(), None),
                        ServerStatus::Failing(e) => ("failing", e, None),
                        ServerStatus::Applied(a, at) => ("applied", describe(&a), Some(at)),
                    };
                    HaproxyLine {
                        server,
                        state: state.into(),
                        detail,
                        applied_s_ago: at.map(|t| t.elapsed().as_secs_f64()),
                        runtime_unavailable,
                    }
                })
                .collect(),
        })
    }
}

fn describe(a: &Applied) -> String {
    match a {
        Applied::Unchanged => "unchanged".into(),
        Applied::Runtime {
            added,
            moved,
            draining,
        } => match moved {
            0 => format!("runtime API: {added} added, {draining} draining"),
            _ => format!("runtime API: {added} added, {moved} moved, {draining} draining"),
        },
        Applied::Reloaded { servers } => format!("reloaded with {servers} servers"),
    }
}

/// Binds the control socket at `path` (0600). A socket another master still answers on is
/// an error (two masters on one machine would fight over HAProxy); a stale one is replaced.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            // The caller names the socket ("cannot listen on control socket PATH: …").
            "another master answers on it".to_string(),
        ));
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        files::create_dir_all(dir, 0o700)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// An error answer: one JSON object, whatever the message holds.
fn error_answer(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// The error answer to a request that is not `status`: `read` is None when none came in
/// time.
fn refused(read: Option<std::io::Result<usize>>, line: &str) -> Option<String> {
    match (read, line.trim()) {
        (Some(Ok(_)), "status") => None,
        (None, _) => Some(error_answer("no request within 5s")),
        (Some(Err(e)), _) => Some(error_answer(&format!("cannot read the request: {e}"))),
        (Some(Ok(_)), other) => Some(error_answer(&format!("unknown request {other:?}"))),
    }
}

/// Answers status requests on `listener` until the master stops.
pub fn serve(listener: UnixListener, sources: Sources, log: &Logger) {
    let log = log.new(slog::o!("actor" => "Control"));
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let (sources, log) = (sources.clone(), log.clone());
            tokio::spawn(async move {
                let (rd, mut wr) = conn.into_split();
                let mut line = String::new();
                let read = tokio::time::timeout(
                    Duration::from_secs(5),
                    BufReader::new(rd).take(256).read_line(&mut line),
                )
                .await;
                let answer = match refused(read.ok(), &line) {
                    Some(refusal) => refusal,
                    None => match sources.status().await {
                        Ok(s) => serde_json::to_string(&s).unwrap_or_default(),
                        Err(e) => error_answer(&e.to_string()),
                    },
                };
                if let Err(e) = wr.write_all(format!("{answer}\n").as_bytes()).await {
                    debug!(log, "Status request dropped"; "error" => %e);
                }
            });
        }
    });
}

/// Why `autoscaler status` has nothing to show.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "no master answers on {path} ({source}); is it running? (`systemctl status \
         autoscaler-master`; the socket is [autoscaler] control_socket)"
    )]
    NoMaster {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the master on {path} did not answer: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the master on {path} answered {answer:?}")]
    Answer { path: PathBuf, answer: String },
}

/// Asks the master listening on `path` for its status.
pub fn request(path: &Path, timeout: Duration) -> Result<Status, ControlError> {
    use std::io::{BufRead, Write};
    let mut conn =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| ControlError::NoMaster {
            path: path.to_path_buf(),
            source,
        })?;
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    conn.set_read_timeout(Some(timeout)).map_err(io)?;
    conn.set_write_timeout(Some(timeout)).map_err(io)?;
    conn.write_all(b"status\n").map_err(io)?;
    let mut answer = String::new();
    std::io::BufReader::new(conn)
        .read_line(&mut answer)
        .map_err(io)?;
    serde_json::from_str(&answer).map_err(|_| ControlError::Answer {
        path: path.to_path_buf(),
        answer: answer.trim().chars().take(200).collect(),
    })
}

/// `12.3%`, or `-` for nothing.
fn pct(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}%")).unwrap_or_else(|| "-".into())
}

/// `4s ago`, `3m ago`, or `-`.
fn ago(v: Option<f64>) -> String {
    v.map(|s| format!("{} ago", span(s)))
        .unwrap_or_else(|| "-".into())
}

fn span(s: f64) -> String {
    match s {
        s if s < 1.0 => format!("{:.0}ms", s * 1000.0),
        s if s < 120.0 => format!("{s:.0}s"),
        s if s < 7200.0 => format!("{:.0}m", s / 60.0),
        s => format!("{:.1}h", s / 3600.0),
    }
}

/// Rows as columns padded to the widest cell; the last column is not padded.
fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| match i + 1 == r.len() {
                true => c.clone(),
                false => format!("{c:<w$}", w = width[i]),
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

impl Status {
    /// The human-readable report `autoscaler status` prints.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "master {}, policy {}{}\n",
            self.version,
            self.policy,
            if self.dry_run {
                ", dry run (decides, launches nothing)"
            } else {
                ""
            }
        );
        out += &match &self.last_action {
            Some(a) => format!(
                "last decision: {} {} ago: {}\n",
                a.action,
                span(a.s_ago),
                a.reason
            ),
            None => "last decision: none since start\n".into(),
        };
        if let Some(h) = &self.holding {
            out += &format!("holding: {h}\n");
        }
        if let Some(c) = self.cooldown_left_s {
            out += &format!("cooldown (no scale-up): {} left\n", span(c));
        }
        if let Some(c) = self.scale_down_cooldown_left_s {
            out += &format!("scale_down_cooldown (no scale-in): {} left\n", span(c));
        }
        out += &format!("launches in the last hour: {}", self.launches_last_hour);
        if let Some(cap) = self.max_launches_per_hour {
            out += &format!(" of max_launches_per_hour {cap}");
        }
        if let Some(c) = self.hourly_cap_left_s {
            out += &format!(" (reached: the next launch in {})", span(c));
        }
        out += "\n";
        if self.failed_launches > 0 {
            out += &format!("failed launches in a row: {}", self.failed_launches);
            if let Some(c) = self.launch_backoff_left_s {
                out += &format!(" (the next may start in {})", span(c));
            }
            out += "\n";
        }
        for l in &self.signals {
            let unit = match l.signal.as_str() {
                "requests" => " requests/s",
                "response_time" => " ms",
                _ => "",
            };
            let value = l
                .value
                .map_or("no figures".to_string(), |v| format!("{v:.1}{unit}"));
            let target = match l.signal.as_str() {
                "queue" => "any queue is a breach".to_string(),
                "response_time" => format!("target {:.0} ms", l.target),
                _ => format!("target {} per node", l.target),
            };
            let desired = l
                .desired
                .map_or("no opinion".to_string(), |d| format!("asks for {d} nodes"));
            let from = match l.missing {
                0 => format!("{} HAProxy server(s)", l.covered),
                m => format!("{} HAProxy server(s), {m} without figures", l.covered),
            };
            out += &format!(
                "signal {}: {value} ({target}; {desired}; {from})\n",
                l.signal
            );
        }
        if let Some(c) = &self.cluster {
            out += &match (c.leading, &c.leader) {
                (true, _) => format!("cluster: {} leads (decides and launches)\n", c.name),
                (false, Some(l)) => format!("cluster: {} follows; {l} leads\n", c.name),
                (false, None) => format!("cluster: {} follows; no leader now\n", c.name),
            };
        }
        out += "\n";
        let mut rows = vec![[
            "HOST",
            "PORT",
            "ORIGIN",
            "TUNNEL",
            "CPU",
            "SEEN",
            "MEAN UP",
            "MEAN DOWN",
            "ELIGIBLE",
        ]
        .map(String::from)
        .to_vec()];
        for n in &self.nodes {
            rows.push(vec![
                n.host.clone(),
                n.port.to_string(),
                match &n.instance_id {
                    Some(id) => format!("{} {id}", n.origin),
                    None => n.origin.clone(),
                },
                n.tunnel.clone(),
                pct(n.last_cpu_pct),
                ago(n.last_seen_s),
                pct(n.mean_up_pct),
                pct(n.mean_down_pct),
                match &n.why_not {
                    None => "yes".into(),
                    Some(why) => format!("no: {why}"),
                },
            ]);
        }
        out += &columns(&rows);
        if self.nodes.is_empty() {
            out += "(no hosts registered: `autoscaler add-host HOST PORT`)\n";
        }
        // Why a node is not heard, one line each: what to fix.
        for n in self.nodes.iter().filter(|n| n.tunnel != "up") {
            if let Some(p) = &n.problem {
                out += &format!("{}:{} not heard: {p}\n", n.host, n.port);
            }
        }
        if !self.launches.is_empty() {
            out += "\nLAUNCHES IN FLIGHT\n";
            let mut rows = vec![vec!["DECISION".to_string(), "INSTANCES".into()]];
            rows.extend(
                self.launches
                    .iter()
                    .map(|(id, n)| vec![id.clone(), n.to_string()]),
            );
            out += &columns(&rows);
        }
        if !self.drains.is_empty() {
            out += "\nDRAINING\n";
            let mut rows = vec![vec![
                "HOST".to_string(),
                "INSTANCE".into(),
                "TERMINATED AT THE LATEST IN".into(),
            ]];
            rows.extend(self.drains.iter().map(|d| {
                vec![
                    d.name.clone(),
                    d.instance_id.clone().unwrap_or_else(|| "-".into()),
                    span(d.deadline_in_s),
                ]
            }));
            out += &columns(&rows);
        }
        out += "\n";
        let mut rows = vec![["HAPROXY SERVER", "STATE", "LAST APPLY", "DETAIL"]
            .map(String::from)
            .to_vec()];
        rows.extend(self.haproxy.iter().map(|h| {
            let detail = match &h.runtime_unavailable {
                Some(why) => format!("{}; runtime API unavailable: {why}", h.detail),
                None => h.detail.clone(),
            };
            vec![
                h.server.clone(),
                h.state.clone(),
                ago(h.applied_s_ago),
                detail,
            ]
        }));
        out += &columns(&rows);
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_refusal_is_one_json_object() {
        use super::refused;
        assert_eq!(refused(Some(Ok(7)), "status\n"), None);
        let cases = [
            (refused(None, ""), "no request within 5s"),
            (
                refused(Some(Err(std::io::Error::other("reset"))), ""),
                "cannot read the request: reset",
            ),
            (
                refused(Some(Ok(9)), "stat\"us\\\n"),
                "unknown request \"stat\\\"us\\\\\"",
            ),
        ];
        for (answer, want) in cases {
            let answer = answer.expect("refused");
            let v: serde_json::Value =
                serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer}: {e}"));
            assert_eq!(v["error"], want, "{answer}");
        }
    }

    use super::*;

    fn sample() -> Status {
        Status {
            version: "1.2.3".into(),
            policy: "instance".into(),
            dry_run: false,
            nodes: vec![
                NodeLine {
                    host: "10.0.0.5".into(),
                    port: 80,
                    origin: "manual".into(),
                    instance_id: None,
                    tunnel: "up".into(),
                    last_cpu_pct: Some(82.14),
                    last_seen_s: Some(0.4),
                    mean_up_pct: Some(80.0),
                    mean_down_pct: Some(70.0),
                    why_not: None,
                    problem: None,
                },
                NodeLine {
                    host: "10.0.0.17".into(),
                    port: 8080,
                    origin: "launched".into(),
                    instance_id: Some("i-0abc".into()),
                    tunnel: "never".into(),
                    last_cpu_pct: None,
                    last_seen_s: None,
                    mean_up_pct: None,
                    mean_down_pct: None,
                    why_not: Some("no report yet".into()),
                    problem: Some(
                        "host key of 10.0.0.17 is not in /etc/autoscaler/known_hosts".into(),
                    ),
                },
            ],
            last_action: Some(LastAction {
                action: "scale-up".into(),
                reason: "10.0.0.5:80 at 80%".into(),
                s_ago: 95.0,
            }),
            holding: Some("cooldown after the last scale-up".into()),
            cooldown_left_s: Some(200.0),
            scale_down_cooldown_left_s: Some(20.0),
            hourly_cap_left_s: Some(1500.0),
            max_launches_per_hour: Some(1),
            failed_launches: 2,
            launch_backoff_left_s: Some(90.0),
            launches_last_hour: 1,
            launches: vec![("d-1".into(), 1)],
            drains: vec![DrainLine {
                name: "10.0.0.9:80".into(),
                instance_id: Some("i-0def".into()),
                deadline_in_s: 30.0,
            }],
            cluster: None,
            signals: vec![
                SignalLine {
                    signal: "sessions".into(),
                    value: Some(31.0),
                    target: 10.0,
                    desired: Some(4),
                    covered: 2,
                    missing: 0,
                },
                SignalLine {
                    signal: "response_time".into(),
                    value: None,
                    target: 200.0,
                    desired: None,
                    covered: 0,
                    missing: 1,
                },
            ],
            haproxy: vec![HaproxyLine {
                server: "local".into(),
                state: "applied".into(),
                detail: "runtime API: 1 added, 0 draining".into(),
                applied_s_ago: Some(3.0),
                runtime_unavailable: None,
            }],
        }
    }

    #[test]
    fn the_table_lines_up_and_says_everything() {
        let t = sample().to_table();
        assert!(
            t.contains("last decision: scale-up 95s ago: 10.0.0.5:80 at 80%"),
            "{t}"
        );
        assert!(t.contains("cooldown (no scale-up): 3m left"), "{t}");
        assert!(
            t.contains("scale_down_cooldown (no scale-in): 20s left"),
            "{t}"
        );
        assert!(
            t.contains("failed launches in a row: 2 (the next may start in 90s)"),
            "{t}"
        );
        assert!(
            t.contains("launches in the last hour: 1 of max_launches_per_hour 1 (reached: the next launch in 25m)"),
            "{t}"
        );
        assert!(
            t.contains(
                "signal sessions: 31.0 (target 10 per node; asks for 4 nodes; 2 HAProxy server(s))"
            ),
            "{t}"
        );
        assert!(
            t.contains("signal response_time: no figures (target 200 ms; no opinion; 0 HAProxy server(s), 1 without figures)"),
            "{t}"
        );
        let lines: Vec<&str> = t.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("HOST ")).unwrap();
        let col = |l: &str, word: &str| l.find(word).unwrap();
        // Every row's CPU cell starts where the header's does.
        let at = col(lines[header], "CPU");
        assert_eq!(col(lines[header + 1], "82.1%"), at, "{t}");
        assert_eq!(col(lines[header + 2], "-  "), at, "{t}");
        assert!(lines[header + 2].contains("launched i-0abc"), "{t}");
        assert!(lines[header + 2].ends_with("no: no report yet"), "{t}");
        assert!(lines[header + 1].ends_with("yes"), "{t}");
        assert!(
            t.contains("10.0.0.17:8080 not heard: host key of 10.0.0.17 is not in /etc/autoscaler/known_hosts\n"),
            "{t}"
        );
        let drain = lines
            .iter()
            .find(|l| l.starts_with("10.0.0.9:80 "))
            .unwrap();
        assert!(drain.contains(" i-0def ") && drain.ends_with(" 30s"), "{t}");
        assert!(t.contains("local           applied  3s ago"), "{t}");
        assert!(
            !t.lines().any(|l| l.ends_with(' ')),
            "trailing spaces: {t:?}"
        );
    }

    /// A master from before the guard fields answers without them: still read, shown
    /// without what it did not say.
    #[test]
    fn status_from_an_older_master_reads() {
        let mut v = serde_json::to_value(sample()).unwrap();
        for k in [
            "scale_down_cooldown_left_s",
            "hourly_cap_left_s",
            "max_launches_per_hour",
            "signals",
        ] {
            v.as_object_mut().unwrap().remove(k);
        }
        let old: Status = serde_json::from_value(v).unwrap();
        let t = old.to_table();
        assert!(t.contains("launches in the last hour: 1\n"), "{t}");
        assert!(
            !t.contains("scale_down_cooldown") && !t.contains("signal "),
            "{t}"
        );
    }

    #[test]
    fn status_survives_json() {
        let s = sample();
        let back: Status = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back.to_table(), s.to_table());
    }

    #[test]
    fn spans_read_well() {
        assert_eq!(span(0.25), "250ms");
        assert_eq!(span(42.0), "42s");
        assert_eq!(span(600.0), "10m");
        assert_eq!(span(9000.0), "2.5h");
    }
}
