//! Node → master reporting over real SSH: a real OpenSSH server on loopback (or in network
//! namespaces made here), the real node agent (`autoscaler node`), and the master's
//! TunnelManager asking for the remote forward with russh.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{bin, free_port, keygen, root, tool, LogBuf, MasterProc, Netns, Proc, Sshd};
use actix::{Actor, Addr, Context, Handler};
use autoscaler_actors::adapters::hosts_dir::HostsDir;
use autoscaler_actors::config::{Config, HostKeyPolicy, Role};
use autoscaler_actors::hosts::{Host, HostName};
use autoscaler_actors::master::heard::Heard;
use autoscaler_actors::master::messages::{CpuReported, NodeDown, NodeUp, TunnelProblem};
use autoscaler_actors::master::registry::HostRegistry;
use autoscaler_actors::master::tunnels::{TunnelManager, TunnelOutputs, TunnelSettings};
use autoscaler_actors::metrics::Metrics;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

#[derive(Debug)]
enum Event {
    Up(NodeUp),
    Down(NodeDown),
    Cpu(CpuReported),
}

struct Collect(mpsc::UnboundedSender<Event>);
impl Actor for Collect {
    type Context = Context<Self>;
}
impl Handler<NodeUp> for Collect {
    type Result = ();
    fn handle(&mut self, m: NodeUp, _: &mut Context<Self>) {
        let _ = self.0.send(Event::Up(m));
    }
}
impl Handler<NodeDown> for Collect {
    type Result = ();
    fn handle(&mut self, m: NodeDown, _: &mut Context<Self>) {
        let _ = self.0.send(Event::Down(m));
    }
}

/// Keeps every problem the tunnels say (what `status` shows), apart from the events.
struct Problems(Arc<std::sync::Mutex<Vec<TunnelProblem>>>);
impl Actor for Problems {
    type Context = Context<Self>;
}
impl Handler<TunnelProblem> for Problems {
    type Result = ();
    fn handle(&mut self, m: TunnelProblem, _: &mut Context<Self>) {
        self.0.lock().unwrap().push(m);
    }
}

/// Passes what the tunnels fold into `heard` on as events, in the order each node's samples
/// were read, until the test drops its receiver.
fn collect_samples(heard: Heard, tx: mpsc::UnboundedSender<Event>) {
    actix::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(10));
        loop {
            every.tick().await;
            for (host, fresh) in heard.take_fresh() {
                for f in fresh {
                    let m = CpuReported {
                        host: host.clone(),
                        sample: f.sample,
                    };
                    if tx.send(Event::Cpu(m)).is_err() {
                        return;
                    }
                }
            }
            if tx.is_closed() {
                return;
            }
        }
    });
}

/// The master side under test: a config dir with a client key, HostRegistry + TunnelManager
/// wired to a collector.
struct Master {
    dir: tempfile::TempDir,
    cfg: Config,
    events: mpsc::UnboundedReceiver<Event>,
    log: LogBuf,
    metrics: Arc<Metrics>,
    /// Every problem said, in order.
    problems: Arc<std::sync::Mutex<Vec<TunnelProblem>>>,
    _registry: Addr<HostRegistry>,
    _tunnels: Addr<TunnelManager>,
}

impl Master {
    fn dir_with_key() -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        autoscaler_actors::admin::init(dir.path(), Role::Master, false).unwrap();
        let mut cfg = Config::load(&dir.path().join("autoscaler.ini")).unwrap();
        keygen(&cfg.ssh.identity_file);
        cfg.ssh.user = crate::common::current_user();
        cfg.ssh.connect_timeout = Duration::from_secs(5);
        cfg.ssh.keepalive = Duration::from_secs(2);
        cfg.scaling.stale_after = Duration::from_secs(3);
        // TCP forwards, on ports the tests choose (Unix sockets have tests of their own).
        cfg.node.report_socket = None;
        (dir, cfg)
    }

    fn start(dir: tempfile::TempDir, cfg: Config) -> Master {
        Master::start_with(dir, cfg, |_| {})
    }

    /// [`Master::start`] with `tweak` applied to the tunnels' settings.
    fn start_with(
        dir: tempfile::TempDir,
        cfg: Config,
        tweak: impl FnOnce(&mut TunnelSettings),
    ) -> Master {
        let (tx, events) = mpsc::unbounded_channel();
        let heard = Heard::default();
        collect_samples(heard.clone(), tx.clone());
        let sink = Collect(tx).start();
        let log = LogBuf::default();
        let logger = log.logger();
        let metrics = Arc::new(Metrics::new());
        let mut settings = TunnelSettings::from_config(&cfg).unwrap();
        settings.metrics = metrics.clone();
        tweak(&mut settings);
        let problems: Arc<std::sync::Mutex<Vec<TunnelProblem>>> = Arc::default();
        let tunnels = TunnelManager::new(
            settings,
            TunnelOutputs {
                samples: heard,
                up: vec![sink.clone().recipient()],
                down: vec![sink.recipient()],
                problem: vec![Problems(problems.clone()).start().recipient()],
            },
            &logger,
        )
        .start();
        let registry = HostRegistry::new(
            HostsDir::new(&cfg.general.hosts_dir),
            vec![tunnels.clone().recipient()],
            Duration::from_millis(200),
            &logger,
        )
        .start();
        Master {
            dir,
            cfg,
            events,
            log,
            metrics,
            problems,
            _registry: registry,
            _tunnels: tunnels,
        }
    }

    fn secret(&self) -> PathBuf {
        secret_of(&self.cfg)
    }

    fn add_host(&self, sshd: &Sshd, app_port: u16) {
        let mut h = Host::manual(HostName::parse(&sshd.addr).unwrap(), app_port);
        h.ssh_port = Some(sshd.port);
        HostsDir::new(&self.cfg.general.hosts_dir).add(&h).unwrap();
    }

    fn trust(&self, sshd: &Sshd) {
        let path = &self.cfg.ssh.known_hosts;
        let old = std::fs::read_to_string(path).unwrap_or_default();
        std::fs::write(path, old + &sshd.known_hosts_line()).unwrap();
    }

    /// The next event matching `pred`, skipping others; panics after `limit`.
    async fn next(&mut self, limit: Duration, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(e)) if pred(&e) => return e,
                Ok(Some(_)) => continue,
                _ => panic!(
                    "no {what} within {limit:?}; master log:\n{}",
                    self.log.text()
                ),
            }
        }
    }

    async fn up(&mut self, addr: &str) -> NodeUp {
        match self
            .next(
                Duration::from_secs(20),
                &format!("NodeUp from {addr}"),
                |e| matches!(e, Event::Up(u) if u.host.host.to_string() == addr),
            )
            .await
        {
            Event::Up(u) => u,
            _ => unreachable!(),
        }
    }

    async fn down(&mut self, addr: &str) -> NodeDown {
        match self
            .next(
                Duration::from_secs(20),
                &format!("NodeDown from {addr}"),
                |e| matches!(e, Event::Down(d) if d.host.host.to_string() == addr),
            )
            .await
        {
            Event::Down(d) => d,
            _ => unreachable!(),
        }
    }

    /// `n` samples from `addr`, in arrival order.
    async fn samples(&mut self, addr: &str, n: usize) -> Vec<u64> {
        let mut seqs = Vec::new();
        while seqs.len() < n {
            if let Event::Cpu(c) = self
                .next(
                    Duration::from_secs(10),
                    &format!("sample from {addr}"),
                    |e| matches!(e, Event::Cpu(c) if c.host.host.to_string() == addr),
                )
                .await
            {
                assert!((0.0..=100.0).contains(&c.sample.busy_pct));
                seqs.push(c.sample.seq);
            }
        }
        seqs
    }
}

fn pub_of(key: &Path) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// Where a test's node agent reports.
enum Via<'a> {
    /// 127.0.0.1:port, and these other masters' ports.
    Tcp(u16, &'a [u16]),
    /// Every master socket in this socket's directory.
    Unix(&'a Path),
}

/// The real node agent (`autoscaler node`) in a fresh configuration directory, sampling every
/// 200 ms, reporting to `report_port` over TCP with a copy of the master's report `secret`.
fn start_node(report_port: u16, netns: Option<&str>, secret: &Path) -> (Proc, tempfile::TempDir) {
    start_agent(Via::Tcp(report_port, &[]), netns, secret)
}

/// [`start_node`] reporting to `others` too (one port per further master).
fn start_node_for(
    report_port: u16,
    others: &[u16],
    netns: Option<&str>,
    secret: &Path,
) -> (Proc, tempfile::TempDir) {
    start_agent(Via::Tcp(report_port, others), netns, secret)
}

/// The real node agent reporting as `via` says.
fn start_agent(via: Via, netns: Option<&str>, secret: &Path) -> (Proc, tempfile::TempDir) {
    start_agent_as(via, netns, secret, "")
}

/// [`start_agent`] naming `instance_id` in its hello.
fn start_agent_as(
    via: Via,
    netns: Option<&str>,
    secret: &Path,
    instance_id: &str,
) -> (Proc, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    autoscaler_actors::admin::init(dir.path(), Role::Node, false).unwrap();
    crate::common::copy_secret(secret, &dir.path().join("report.key"));
    let cfg = dir.path().join("autoscaler.ini");
    let (socket, port, others) = match via {
        Via::Tcp(port, others) => (String::new(), port, others),
        Via::Unix(path) => (path.display().to_string(), 9700, &[][..]),
    };
    let others: Vec<String> = others.iter().map(u16::to_string).collect();
    let text: String = std::fs::read_to_string(&cfg)
        .unwrap()
        .lines()
        .map(|l| match l.split_once(" = ").map(|(k, _)| k) {
            Some("report_socket") => format!("report_socket = {socket}\n"),
            Some("report_port") => format!("report_port = {port}\n"),
            Some("other_report_ports") => format!("other_report_ports = {}\n", others.join(", ")),
            Some("sample_interval") => "sample_interval = 200ms\n".to_string(),
            Some("instance_id") => format!("instance_id = {instance_id}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&cfg, text).unwrap();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin());
            c
        }
        None => Command::new(bin()),
    };
    let child = cmd
        .args(["--log-format", "json", "node"])
        .env("AUTOSCALER_CONFIG", &cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("node.log")).unwrap())
        .spawn()
        .unwrap();
    (Proc(child), dir)
}

fn secret_of(cfg: &Config) -> PathBuf {
    cfg.node
        .secret_file
        .clone()
        .expect("init sets a report secret")
}

/// A test master with one real agent reporting over a TCP forward through a loopback sshd on
/// `addr` (trusted and registered on app port 8080): the master, the sshd, the agent and its
/// directory. The report port is the master's `cfg.node.report_port`.
fn one_tcp_node(sshd_bin: &Path, addr: &str) -> (Master, Sshd, Proc, tempfile::TempDir) {
    let (dir, mut cfg) = Master::dir_with_key();
    let report_port = free_port("127.0.0.1");
    cfg.node.report_port = report_port;
    let sshd = Sshd::start(sshd_bin, addr, None, &pub_of(&cfg.ssh.identity_file), None);
    let (node, node_dir) = start_node(report_port, None, &secret_of(&cfg));
    let m = Master::start(dir, cfg);
    m.trust(&sshd);
    m.add_host(&sshd, 8080);
    (m, sshd, node, node_dir)
}

fn strictly_increasing(seqs: &[u64]) -> bool {
    seqs.windows(2).all(|w| w[0] < w[1])
}

/// Two agents on one node's forward (a second `autoscaler node`, or a copied configuration):
/// each replaces the other's channel in turn, and the master says so instead of logging
/// "Node up" over and over without a word.
#[actix_rt::test]
async fn two_agents_taking_turns_on_one_forward_are_named() {
    let Some(sshd_bin) = tool("sshd") else { return };
    let (dir, mut cfg) = Master::dir_with_key();
    let report_port = free_port("127.0.0.1");
    cfg.node.report_port = report_port;
    let sshd = Sshd::start(
        &sshd_bin,
        "127.0.2.18",
        None,
        &pub_of(&cfg.ssh.identity_file),
        None,
    );
    let m = Master::start(dir, cfg);
    m.trust(&sshd);
    m.add_host(&sshd, 8080);
    m.log.wait_for("Tunnel up", Duration::from_secs(10)).await;
    let one = crate::common::FakeAgent::start_as(report_port, 5.0, &m.secret(), 7);
    m.log.wait_for("Node up", Duration::from_secs(10)).await;
    assert!(!m.log.text().contains("Two agents take turns"));
    let _two = crate::common::FakeAgent::start_as(report_port, 5.0, &m.secret(), 8);
    m.log
        .wait_for("Two agents take turns", Duration::from_secs(20))
        .await;
    // Once a minute, not at every turn.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(m.log.text().matches("Two agents take turns").count(), 1);
    drop(one);
}

/// A node given the wrong report secret (an operator's common mistake): the agent says once
/// what to check and backs off, rather than reconnecting several times a second with a log
/// line each time; the master counts the refusals.
#[actix_rt::test]
async fn a_wrong_secret_is_said_once_and_backed_off() {
    let Some(sshd_bin) = tool("sshd") else { return };
    let (dir, mut cfg) = Master::dir_with_key();
    let report_port = free_port("127.0.0.1");
    cfg.node.report_port = report_port;
    let sshd = Sshd::start(
        &sshd_bin,
        "127.0.2.17",
        None,
        &pub_of(&cfg.ssh.identity_file),
        None,
    );
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, "b".repeat(64)).unwrap();
    let (_node, node_dir) = start_node(report_port, None, &wrong);
    let m = Master::start(dir, cfg);
    m.trust(&sshd);
    m.add_host(&sshd, 8080);
    m.log.wait_for("Tunnel up", Duration::from_secs(10)).await;
    // The agent's first try after the forward is up may come after its backoff (up to 5 s).
    let node_log = || std::fs::read_to_string(node_dir.path().join("node.log")).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while !node_log().contains("did not accept this agent") {
        assert!(Instant::now() < end, "never refused: {}", node_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Then 10 s of refusals from the first, said once.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let log = node_log();
    let said = log
        .lines()
        .filter(|l| l.contains("did not accept this agent"))
        .collect::<Vec<_>>();
    assert_eq!(said.len(), 1, "{log}");
    assert!(
        said[0].contains("does this node's report secret ([node] secret_file) match the master's?"),
        "{log}"
    );
    assert!(log.lines().count() < 10, "{log}");
    // Attempts in the 10 s from the first refusal: a backoff doubling from 0.1-0.2 s up to a
    // minute gives 6 to 8 (it was about 70); at least two, so "said once" means something.
    let text = m.metrics.counted();
    let refused: f64 = text
        .lines()
        .filter(|l| l.starts_with("autoscaler_report_channels_refused_total{host=\"127.0.2.17\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        (2.0..=8.0).contains(&refused),
        "{refused} refusals:\n{text}"
    );
}

/// An agent that stops talking (SIGSTOP: a hung process) on a channel that stays open: the
/// master closes the channel once nothing came for stale_after and marks the node down, and
/// the agent, woken, reconnects as the same run.
#[actix_rt::test]
async fn a_silent_channel_goes_stale_and_the_agent_comes_back() {
    let Some(sshd_bin) = tool("sshd") else { return };
    let (mut m, _sshd, node, _node_dir) = one_tcp_node(&sshd_bin, "127.0.0.18");
    let stale_after = m.cfg.scaling.stale_after;
    let up = m.up("127.0.0.18").await;
    m.samples("127.0.0.18", 2).await;

    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &node.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    let stopped = Instant::now();
    let down = m.down("127.0.0.18").await;
    let took = stopped.elapsed();
    assert!(down.reason.starts_with("no report for"), "{}", down.reason);
    // Its last report came about one interval (200 ms) before the stop; a loaded machine may
    // have delayed that report, and the stop, by some hundreds of milliseconds more.
    assert!(
        took + Duration::from_secs(1) >= stale_after && took < stale_after + Duration::from_secs(5),
        "down after {took:?}, stale_after {stale_after:?}"
    );
    signal("-CONT");
    let again = m.up("127.0.0.18").await;
    assert_eq!(again.hello.boot, up.hello.boot, "the same agent run");
    m.samples("127.0.0.18", 2).await;
    drop(m.dir);
}

#[actix_rt::test]
async fn samples_arrive_in_order_and_resume_after_sshd_and_node_restarts() {
    let Some(sshd_bin) = tool("sshd") else { return };
    let (mut m, mut sshd, node, _node_dir) = one_tcp_node(&sshd_bin, "127.0.0.2");
    let report_port = m.cfg.node.report_port;

    let up = m.up("127.0.0.2").await;
    let boot = up.hello.boot;
    let first = m.samples("127.0.0.2", 5).await;
    assert!(strictly_increasing(&first), "{first:?}");
    m.log.wait_for("Tunnel up", Duration::from_secs(1)).await;

    // sshd dies: NodeDown within seconds; back: NodeUp, and samples go on without duplicates
    // (the node resends its buffer, the master drops what it already has).
    sshd.stop();
    let down = m.down("127.0.0.2").await;
    assert!(!down.reason.is_empty());
    let t = Instant::now();
    sshd.restart(&sshd_bin);
    let again = m.up("127.0.0.2").await;
    assert_eq!(again.hello.boot, boot, "same agent run");
    let after = m.samples("127.0.0.2", 5).await;
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "resumed after {:?}",
        t.elapsed()
    );
    assert!(strictly_increasing(&after), "{after:?}");
    assert!(
        after[0] > *first.last().unwrap(),
        "no duplicates across the restart: {first:?} then {after:?}"
    );

    // The node agent dies: its channel closes; a new agent is a new boot, counting from 0.
    drop(node);
    let down = m.down("127.0.0.2").await;
    assert!(down.reason.contains("closed"), "{}", down.reason);
    let (_node2, _d2) = start_node(report_port, None, &m.secret());
    let up2 = m.up("127.0.0.2").await;
    assert_ne!(up2.hello.boot, boot);
    let fresh = m.samples("127.0.0.2", 2).await;
    assert!(fresh[0] < 10, "new run restarts numbering: {fresh:?}");
    drop(m.dir);
}

/// A refused host: `said` was logged for a second attempt, and in all that time (with an
/// agent on the node ready to report) no tunnel came up and no event reached the master.
async fn refused(m: &mut Master, said: &str) {
    m.log.wait_for_count(said, 2, Duration::from_secs(20)).await;
    assert!(!m.log.text().contains("Tunnel up"), "{}", m.log.text());
    assert!(m.events.try_recv().is_err(), "no event from a refused host");
}

#[actix_rt::test]
async fn host_keys_are_verified() {
    let Some(sshd_bin) = tool("sshd") else { return };

    // Unknown key, strict policy: refused with a clear message, no tunnel, no NodeUp.
    let (dir, mut cfg) = Master::dir_with_key();
    let report_port = free_port("127.0.0.1");
    cfg.node.report_port = report_port;
    let sshd = Sshd::start(
        &sshd_bin,
        "127.0.0.3",
        None,
        &pub_of(&cfg.ssh.identity_file),
        None,
    );
    let (_node, _nd) = start_node(report_port, None, &secret_of(&cfg));
    let mut m = Master::start(dir, cfg);
    m.add_host(&sshd, 8080);
    refused(&mut m, "is not in").await;
    assert!(m.log.text().contains("host_key_policy = accept-new"));

    // A changed key (known_hosts holds another key for this address): refused, loudly.
    let (dir, mut cfg) = Master::dir_with_key();
    let report_port = free_port("127.0.0.1");
    cfg.node.report_port = report_port;
    let other = tempfile::tempdir().unwrap();
    keygen(&other.path().join("k"));
    let other_pub = std::fs::read_to_string(other.path().join("k.pub")).unwrap();
    let b64 = other_pub.split_whitespace().nth(1).unwrap();
    std::fs::write(
        &cfg.ssh.known_hosts,
        format!("[127.0.0.3]:{} ssh-ed25519 {b64}\n", sshd.port),
    )
    .unwrap();
    let (_node2, _nd2) = start_node(report_port, None, &secret_of(&cfg));
    let mut m2 = Master::start(dir, cfg);
    m2.add_host(&sshd, 8080);
    refused(&mut m2, "HOST KEY OF 127.0.0.3 HAS CHANGED").await;

    // accept-new: the key is recorded on first contact and the session comes up.
    let (dir, mut cfg) = Master::dir_with_key();
    let report_port = free_port("127.0.0.1");
    cfg.node.report_port = report_port;
    cfg.ssh.host_key_policy = HostKeyPolicy::AcceptNew;
    let sshd4 = Sshd::start(
        &sshd_bin,
        "127.0.0.4",
        None,
        &pub_of(&cfg.ssh.identity_file),
        None,
    );
    let (_node, _nd) = start_node(report_port, None, &secret_of(&cfg));
    let mut m3 = Master::start(dir, cfg);
    m3.add_host(&sshd4, 8080);
    m3.up("127.0.0.4").await;
    let recorded = std::fs::read_to_string(&m3.cfg.ssh.known_hosts).unwrap();
    assert_eq!(
        recorded.trim(),
        format!("{} autoscaler-learnt", sshd4.known_hosts_line().trim())
    );

    // accept-new, but known_hosts records a key of another type for this host: that is not a
    // new host, and an attacker need only offer a type the real host never recorded.
    let (dir, mut cfg) = Master::dir_with_key();
    let report_port = free_port("127.0.0.1");
    cfg.node.report_port = report_port;
    cfg.ssh.host_key_policy = HostKeyPolicy::AcceptNew;
    let (_node4, _nd4) = start_node(report_port, None, &secret_of(&cfg));
    let other = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ecdsa", "-b", "256", "-N", "", "-f"])
        .arg(other.path().join("k"))
        .status()
        .unwrap();
    assert!(st.success());
    let ecdsa = std::fs::read_to_string(other.path().join("k.pub")).unwrap();
    let mut words = ecdsa.split_whitespace();
    let (alg, b64) = (words.next().unwrap(), words.next().unwrap());
    std::fs::write(
        &cfg.ssh.known_hosts,
        format!("[127.0.0.4]:{} {alg} {b64}\n", sshd4.port),
    )
    .unwrap();
    let mut m4 = Master::start(dir, cfg);
    m4.add_host(&sshd4, 8080);
    refused(&mut m4, "it presents a ssh-ed25519 key").await;
    let after = std::fs::read_to_string(&m4.cfg.ssh.known_hosts).unwrap();
    assert_eq!(after.lines().count(), 1, "nothing learnt: {after}");
}

#[actix_rt::test]
async fn a_busy_report_port_on_the_node_is_reported() {
    let Some(sshd_bin) = tool("sshd") else { return };
    let (dir, mut cfg) = Master::dir_with_key();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    cfg.node.report_port = port;
    let sshd = Sshd::start(
        &sshd_bin,
        "127.0.0.5",
        None,
        &pub_of(&cfg.ssh.identity_file),
        None,
    );
    let m = Master::start(dir, cfg);
    m.trust(&sshd);
    m.add_host(&sshd, 8080);
    m.log
        .wait_for(&format!("the node refused the forward of 127.0.0.1:{port}: is report_port {port} already in use"), Duration::from_secs(10))
        .await;
}

#[actix_rt::test]
async fn two_nodes_in_their_own_network_namespaces() {
    let (Some(sshd_bin), Some(_), true) = (tool("sshd"), tool("ip"), root()) else {
        return;
    };
    let (dir, mut cfg) = Master::dir_with_key();
    // Each namespace has its own loopback: both nodes use the same report_port, as real ones do.
    cfg.node.report_port = 9700;
    let client_pub = pub_of(&cfg.ssh.identity_file);
    let ns1 = Netns::create(1);
    let ns2 = Netns::create(2);
    let s1 = Sshd::start(&sshd_bin, &ns1.inner, None, &client_pub, Some(&ns1.name));
    let s2 = Sshd::start(&sshd_bin, &ns2.inner, None, &client_pub, Some(&ns2.name));
    let (_n1, _d1) = start_node(9700, Some(&ns1.name), &secret_of(&cfg));
    let (_n2, _d2) = start_node(9700, Some(&ns2.name), &secret_of(&cfg));
    let mut m = Master::start(dir, cfg);
    m.trust(&s1);
    m.trust(&s2);
    m.add_host(&s1, 80);
    m.add_host(&s2, 80);
    let mut waiting = vec![ns1.inner.clone(), ns2.inner.clone()];
    while !waiting.is_empty() {
        if let Event::Up(u) = m
            .next(
                Duration::from_secs(20),
                &format!("NodeUp from {waiting:?}"),
                |e| matches!(e, Event::Up(_)),
            )
            .await
        {
            waiting.retain(|a| *a != u.host.host.to_string());
        }
    }
    let a = m.samples(&ns1.inner, 3).await;
    let b = m.samples(&ns2.inner, 3).await;
    assert!(
        strictly_increasing(&a) && strictly_increasing(&b),
        "{a:?} {b:?}"
    );
    drop((s1, s2));
}

/// The binary end to end: `autoscaler master` notices `add-host` while running, opens the
/// tunnel, logs NodeUp and each node's CPU (JSON, -v), and closes it on `remove-host`.
#[test]
fn master_binary_follows_hosts_d() {
    let Some(sshd_bin) = tool("sshd") else { return };
    let s = crate::common::Sandbox::new();
    let key = s.path().join("id_ed25519");
    s.set("ssh", "user", &crate::common::current_user());
    s.set("ssh", "host_key_policy", "accept-new");
    // The master also rewrites haproxy.cfg; never touch the machine's own HAProxy service.
    s.set("haproxy", "reload_command", "true");
    let sshd = Sshd::start(&sshd_bin, "127.0.0.6", None, &pub_of(&key), None);
    // The default transport: the master's forward is a Unix socket in the agent's private
    // directory (node and master share this machine, so the path is the master's default).
    let socket = s.path().join("reports/master.sock");
    let (_node, _nd) = start_agent(Via::Unix(&socket), None, &s.path().join("report.key"));
    let mut master = MasterProc::spawn(&s.config(), &["-v"]);
    let wait = |msg: &str| master.wait_msg(msg);
    wait("Started");
    // A second master on the same machine and configuration would fight over HAProxy.
    let second = std::process::Command::new(bin())
        .args(["master"])
        .env("AUTOSCALER_CONFIG", s.config())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another master answers on it"), "{err}");
    // The socket is named once, not twice.
    let sock = s.path().join("master.sock").display().to_string();
    assert_eq!(err.matches(&sock).count(), 1, "{err}");
    let out = s.run(&[
        "add-host",
        "127.0.0.6",
        "8080",
        "--ssh-port",
        &sshd.port.to_string(),
    ]);
    assert!(out.status.success());
    // The new host noticed within a few of the registry's one-second looks (the agent's own
    // reconnect backoff, up to 5 s, comes after and is not the master's doing).
    let t = Instant::now();
    let tunnel = wait("Tunnel up");
    assert_eq!(tunnel["host"], "127.0.0.6");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "noticed after {:?}",
        t.elapsed()
    );
    let up = wait("NodeUp");
    assert_eq!(up["host"], "127.0.0.6");
    let cpu = wait("CPU");
    assert!(
        cpu["busy_pct"]
            .as_f64()
            .is_some_and(|b| (0.0..=100.0).contains(&b)),
        "{cpu}"
    );
    assert!(s
        .run(&["remove-host", "127.0.0.6", "8080"])
        .status
        .success());
    let closing = wait("Closing tunnel");
    assert_eq!(closing["host"], "127.0.0.6");
    wait("NodeDown");
    // SIGTERM stops it cleanly.
    master.terminate();
    wait("Stopped");
    let status = master.proc.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// The real master binary hearing one real agent over the default Unix-socket forward,
/// through a loopback sshd on `addr` (registered with `add-host`), once it logged NodeUp.
/// Fields drop in order: the master first, the sandbox last.
struct UnixFleet {
    master: MasterProc,
    socket: PathBuf,
    /// The master's metrics endpoint (host:port).
    metrics: String,
    _agent: (Proc, tempfile::TempDir),
    _sshd: Sshd,
    s: crate::common::Sandbox,
}

fn master_binary_hearing_one_agent(sshd_bin: &Path, addr: &str) -> UnixFleet {
    let s = crate::common::Sandbox::new();
    let key = s.path().join("id_ed25519");
    s.set("ssh", "user", &crate::common::current_user());
    s.set("ssh", "host_key_policy", "accept-new");
    s.set("haproxy", "reload_command", "true");
    let metrics = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    s.set("autoscaler", "metrics_address", &metrics);
    let sshd = Sshd::start(sshd_bin, addr, None, &pub_of(&key), None);
    let socket = s.path().join("reports/master.sock");
    let agent = start_agent(Via::Unix(&socket), None, &s.path().join("report.key"));
    let master = MasterProc::spawn(&s.config(), &[]);
    master.wait_msg("Started");
    let port = sshd.port.to_string();
    assert!(s
        .run(&["add-host", addr, "8080", "--ssh-port", &port])
        .status
        .success());
    master.wait_msg("NodeUp");
    UnixFleet {
        master,
        socket,
        metrics,
        _agent: agent,
        _sshd: sshd,
        s,
    }
}

/// A local user of a node connecting to the report socket in a loop — closing at once, or
/// answering the challenge with a line that is not a hello — leaves nothing behind in the
/// master. russh forgets a channel only when the node's side closes it (a close from the
/// master first left about 3.5 KiB per channel until the session ended): the master ends
/// channels with EOF and closes them itself only after CLOSE_GRACE. The agent stays heard.
#[test]
fn a_connect_loop_on_the_node_leaves_nothing_in_the_master() {
    let Some(sshd_bin) = tool("sshd") else { return };
    // The agent and sshd live as long as `fleet`.
    let fleet = master_binary_hearing_one_agent(&sshd_bin, "127.0.0.19");
    let (master, socket, s) = (&fleet.master, &fleet.socket, &fleet.s);
    let pid = master.proc.0.id();
    let rss = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let connect = |n: usize, garbage: bool| {
        for _ in 0..n {
            use std::io::{BufRead, Write};
            let c = std::os::unix::net::UnixStream::connect(socket).unwrap();
            if garbage {
                // Generous: a master still working through a burst answers late.
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut challenge = String::new();
                std::io::BufReader::new(&c)
                    .read_line(&mut challenge)
                    .unwrap();
                (&c).write_all(b"not a hello\n").unwrap();
            }
        }
    };
    // Until what the master closes has been closed (CLOSE_GRACE is 2 s) and a master still
    // working through the burst (a slow machine) is done: RSS steady for a second, within 20 s.
    let settle = || {
        std::thread::sleep(Duration::from_secs(3));
        let (t, mut last) = (Instant::now(), rss());
        while t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_secs(1));
            let now = rss();
            if now.abs_diff(last) < 64 {
                break;
            }
            last = now;
        }
    };
    // Warm up: the allocator's and the maps' high-water marks (the first few thousand
    // channels may grow the heap by a few MiB, whether or not any is left behind).
    connect(2500, false);
    settle();
    connect(300, true);
    settle();
    for garbage in [false, true] {
        let before = rss();
        connect(2500, garbage);
        settle();
        let grown = rss().saturating_sub(before);
        // A channel left behind costs about 3.5 KiB: 2,500 of them, over 8 MiB.
        assert!(
            grown < 3 * 1024,
            "2,500 connections (garbage: {garbage}) grew the master by {grown} KiB"
        );
    }
    let status = s.run(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["nodes"][0]["tunnel"], "up", "{status}");
}

/// A local user on the node who holds connections to the report forward open after the
/// master has ended them: each one the master then closes itself costs it about 3.5 KiB
/// inside russh until the session ends. Once `MAX_FORCED_CLOSES` (256) pile up the master
/// renews the session, says why, and the node is up again on the new one.
#[test]
fn channels_held_open_on_the_node_renew_the_session() {
    let Some(sshd_bin) = tool("sshd") else { return };
    // The agent and sshd live as long as `fleet`.
    let fleet = master_binary_hearing_one_agent(&sshd_bin, "127.0.0.20");
    let (master, socket, s) = (&fleet.master, &fleet.socket, &fleet.s);
    // Twice: the second renewal must not wait longer than the first (a renewal is not a
    // failure to back off from).
    for round in 0..2 {
        // Connections that say nothing and stay open: past the 4 a node may have waiting for
        // their hello, each new one evicts an older one, which the master ends with an EOF
        // the user never answers.
        let _held: Vec<_> = (0..300)
            .map(|_| std::os::unix::net::UnixStream::connect(socket).unwrap())
            .collect();
        let renewed = master.wait("the session renewed", |v| {
            v["msg"] == "Tunnel down; retrying"
                && v["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("renewing the SSH session: "))
        });
        let said = renewed["error"].as_str().unwrap();
        let count: u64 = said["renewing the SSH session: ".len()..]
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{said}"));
        assert!((256..300).contains(&count), "{said}");
        assert!(
            said.contains("report channels were held open on the node"),
            "{said}"
        );
        assert_eq!(renewed["attempt"], 1, "renewal {round}: {renewed}");
        master.wait_msg("NodeUp");
    }
    let status = s.run(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["nodes"][0]["tunnel"], "up", "{status}");
    // The agent came back each time: the node was never reported down.
    let downs = master.matching(|v| v["msg"] == "NodeDown");
    assert!(downs.is_empty(), "{downs:?}");
    // Told apart from failures: each renewal counts on its own (and as a reconnect).
    let (code, text) = crate::common::http_get(&fleet.metrics, "/metrics");
    assert_eq!(code, 200, "{text}");
    for want in [
        "autoscaler_ssh_session_renewals_total{host=\"127.0.0.20\"} 2",
        "autoscaler_ssh_reconnects_total{host=\"127.0.0.20\"} 2",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
}

/// A renewal is the master's doing: the node is not reported down for it while its agent
/// comes back on the new session (a user holding channels open does not make their node
/// flap). If no agent proves itself on the sessions since within the grace, it is. Over a
/// TCP forward, where the new session's forward comes up without the agent (over the Unix
/// socket, the agent's socket left behind refuses it, a failure of its own).
#[actix_rt::test]
async fn a_renewal_takes_the_node_down_only_if_its_agent_stays_away() {
    let Some(sshd_bin) = tool("sshd") else { return };
    let (dir, mut cfg) = Master::dir_with_key();
    let report_port = free_port("127.0.0.1");
    cfg.node.report_port = report_port;
    let addr = "127.0.0.21";
    let sshd = Sshd::start(&sshd_bin, addr, None, &pub_of(&cfg.ssh.identity_file), None);
    let (agent, _nd) = start_agent(Via::Tcp(report_port, &[]), None, &secret_of(&cfg));
    // Room for the retry, a handshake of the debug build and the agent's reconnect backoff
    // (its fifth try comes 3.1-6.2 s after it lost the channel).
    let grace = Duration::from_secs(10);
    let mut m = Master::start_with(dir, cfg, |s| s.renewal_grace = grace);
    m.trust(&sshd);
    m.add_host(&sshd, 8080);
    m.up(addr).await;
    let hold = || -> Vec<std::net::TcpStream> {
        (0..300)
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", report_port)).unwrap())
            .collect()
    };
    let renewal = "renewing the SSH session";
    let limit = Duration::from_secs(30);
    let up_or_down = |e: &Event| match e {
        Event::Up(u) => u.host.host.to_string() == addr,
        Event::Down(d) => d.host.host.to_string() == addr,
        Event::Cpu(_) => false,
    };
    // The agent runs: after the renewal it is heard again, and the node never went down.
    let held = hold();
    m.log.wait_for(renewal, limit).await;
    match m.next(limit, "NodeUp or NodeDown", up_or_down).await {
        Event::Up(_) => {}
        Event::Down(d) => panic!("a renewal took the node down: {}", d.reason),
        Event::Cpu(_) => unreachable!(),
    }
    drop(held);
    // The agent gone as the session is renewed: down once the grace is over, and not before.
    let _held = hold();
    m.log.wait_for_count(renewal, 2, limit).await;
    let renewed = Instant::now();
    drop(agent);
    let down = m.down(addr).await;
    assert!(
        // `renewed` is when the log line was seen, a look (50 ms) or a busy moment after.
        renewed.elapsed() >= grace - Duration::from_secs(1),
        "down after {:?}, within the grace: {}",
        renewed.elapsed(),
        down.reason
    );
    assert!(
        down.reason.starts_with(renewal) && down.reason.contains("no agent proved itself"),
        "{}",
        down.reason
    );
    // What `status` shows for the node from then on: the same.
    let said = m.problems.lock().unwrap().last().cloned().unwrap();
    assert_eq!(said.host, down.host);
    assert_eq!(said.problem.as_deref(), Some(down.reason.as_str()));
}

/// A host that accepts TCP but never speaks SSH costs the connect timeout, then a retry with
/// backoff; other hosts are not held up.
#[actix_rt::test]
async fn a_silent_host_costs_a_bounded_timeout_and_retries() {
    let Some(_) = tool("ssh-keygen") else { return };
    let (dir, mut cfg) = Master::dir_with_key();
    cfg.ssh.connect_timeout = Duration::from_millis(500);
    let silent = std::net::TcpListener::bind("127.0.0.7:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let m = Master::start(dir, cfg);
    let mut h = Host::manual(HostName::parse("127.0.0.7").unwrap(), 8080);
    h.ssh_port = Some(port);
    HostsDir::new(&m.cfg.general.hosts_dir).add(&h).unwrap();
    let t = Instant::now();
    m.log
        .wait_for("no answer within 500ms", Duration::from_secs(5))
        .await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "gave up after {:?}",
        t.elapsed()
    );
    // A second attempt follows after the backoff (1-2 s for the second try).
    let text = m.log.text();
    let first = text.matches("no answer within 500ms").count();
    m.log
        .wait_for_count("no answer within 500ms", first + 1, Duration::from_secs(10))
        .await;
    drop(silent);
}

/// The table row of `host` in `check --fleet`'s output.
fn row_of(text: &str, host: &str) -> String {
    text.lines()
        .find(|l| l.starts_with(&format!("{host}:8080 ")))
        .unwrap_or_else(|| panic!("{host} missing:\n{text}"))
        .to_string()
}

/// `check --fleet` reaches every registered host as the master would, before it runs: a
/// host that is fine, one whose key is not known (the ssh-keyscan line), one where nothing
/// answers, one whose sshd refuses the forward; a table, exit 69, nothing on stdout with -q,
/// and nothing written (known_hosts unchanged).
#[test]
fn check_fleet_finds_what_the_master_would_trip_on() {
    let Some(sshd_bin) = tool("sshd") else { return };
    let s = crate::common::Sandbox::new();
    let key = s.path().join("id_ed25519");
    s.set("ssh", "user", &crate::common::current_user());
    s.set("ssh", "connect_timeout", "2s");
    s.set("node", "report_socket", "");
    s.set("haproxy", "reload_command", "true");
    let good = Sshd::start(&sshd_bin, "127.0.2.31", None, &pub_of(&key), None);
    let unknown = Sshd::start(&sshd_bin, "127.0.2.32", None, &pub_of(&key), None);
    let mut no_forward = Sshd::start(&sshd_bin, "127.0.2.33", None, &pub_of(&key), None);
    let conf = no_forward.dir.path().join("sshd_config");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        text.replace("AllowTcpForwarding yes", "AllowTcpForwarding no"),
    )
    .unwrap();
    no_forward.restart(&sshd_bin);
    let silent_port = free_port("127.0.2.34");
    let known = good.known_hosts_line() + &no_forward.known_hosts_line();
    std::fs::write(s.path().join("known_hosts"), &known).unwrap();
    for (addr, port) in [
        ("127.0.2.31", good.port),
        ("127.0.2.32", unknown.port),
        ("127.0.2.33", no_forward.port),
        ("127.0.2.34", silent_port),
    ] {
        let out = s.run(&["add-host", addr, "8080", "--ssh-port", &port.to_string()]);
        assert!(out.status.success(), "{}", crate::common::stderr(&out));
    }
    let out = s.run(&["check", "--fleet"]);
    let text = crate::common::stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(69),
        "{text}{}",
        crate::common::stderr(&out)
    );
    let row = |host: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{host}:8080 ")))
            .unwrap_or_else(|| panic!("{host} missing:\n{text}"))
            .to_string()
    };
    assert!(row("127.0.2.31").contains(" ok    ok"), "{text}");
    assert!(row("127.0.2.32").contains(" FAIL "), "{text}");
    assert!(
        text.contains(&format!("ssh-keyscan -p {} 127.0.2.32", unknown.port)),
        "{text}"
    );
    assert!(
        row("127.0.2.33").contains(" ok    TCP forward refused")
            && row("127.0.2.33").contains("AllowTcpForwarding"),
        "{text}"
    );
    assert!(row("127.0.2.34").contains(" FAIL "), "{text}");
    assert!(text.contains("4 host(s), 3 not reachable"), "{text}");
    // No master runs: whether its agent is heard is not asked, and not held against it.
    assert!(
        text.contains("agent: not checked: no master answers"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(s.path().join("known_hosts")).unwrap(),
        known
    );
    // Quietly: the exit code, and the hosts on standard error.
    let out = s.run(&["-q", "check", "--fleet"]);
    assert_eq!(out.status.code(), Some(69));
    assert_eq!(crate::common::stdout(&out), "");
    assert!(crate::common::stderr(&out).contains("127.0.2.32"));
    // Under accept-new, the unknown key is a note, not a failure: login and forward are
    // tried with it (taken into a copy of known_hosts; the real one is unchanged).
    s.set("ssh", "host_key_policy", "accept-new");
    let out = s.run(&["check", "--fleet"]);
    let text = crate::common::stdout(&out);
    assert!(row_of(&text, "127.0.2.32").contains(" ok    ok"), "{text}");
    assert!(
        text.contains("host_key_policy = accept-new records it"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(s.path().join("known_hosts")).unwrap(),
        known
    );
    s.set("ssh", "host_key_policy", "strict");
    // Only the good one left: exit 0, HAProxy looked at as the master would reload it.
    for addr in ["127.0.2.32", "127.0.2.33", "127.0.2.34"] {
        assert!(s.run(&["remove-host", addr, "8080"]).status.success());
    }
    // Nothing answers on master_socket: a note (drains then wait drain_timeout), not a failure.
    let out = s.run(&["check", "--fleet"]);
    let text = crate::common::stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("local  reload ok: `true` found; note: the master CLI at")
            && text.contains("-S "),
        "{text}"
    );
    // A reload command that cannot run there fails the check.
    let program = "no-such-reload-program";
    s.set("haproxy", "reload_command", program);
    let out = s.run(&["check", "--fleet"]);
    let text = crate::common::stdout(&out);
    assert_eq!(out.status.code(), Some(69), "{text}");
    assert!(
        text.contains(&format!(
            "reload FAIL: the reload command's program `{program}` cannot be found or run"
        )),
        "{text}"
    );
    s.set("haproxy", "reload_command", "true");
    s.set("haproxy", "master_socket", "");
    let out = s.run(&["check", "--fleet"]);
    let text = crate::common::stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("local  reload ok: `true` found; no master_socket"),
        "{text}"
    );
}

/// `status` says why a node is not heard, with what to do: a host whose key is not known
/// (the exact ssh-keyscan line), a node whose agent holds another report secret, a node whose
/// tunnel is up and no agent answers; the reason goes once the agent is heard.
#[test]
fn status_says_why_a_node_is_not_heard() {
    let Some(sshd_bin) = tool("sshd") else { return };
    let s = crate::common::Sandbox::new();
    let key = s.path().join("id_ed25519");
    let (p_wrong, p_silent) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    s.set("ssh", "user", &crate::common::current_user());
    s.set("node", "report_socket", "");
    s.set("haproxy", "reload_command", "true");
    let unknown = Sshd::start(&sshd_bin, "127.0.2.21", None, &pub_of(&key), None);
    let wrong = Sshd::start(&sshd_bin, "127.0.2.22", None, &pub_of(&key), None);
    let silent = Sshd::start(&sshd_bin, "127.0.2.23", None, &pub_of(&key), None);
    // Only the last two are trusted.
    std::fs::write(
        s.path().join("known_hosts"),
        wrong.known_hosts_line() + &silent.known_hosts_line(),
    )
    .unwrap();
    for (d, report) in [
        (&unknown, None),
        (&wrong, Some(p_wrong)),
        (&silent, Some(p_silent)),
    ] {
        let mut args = vec![
            "add-host".to_string(),
            d.addr.clone(),
            "8080".into(),
            "--ssh-port".into(),
            d.port.to_string(),
        ];
        if let Some(p) = report {
            args.extend(["--report-port".into(), p.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = s.run(&args);
        assert!(out.status.success(), "{}", crate::common::stderr(&out));
    }
    let other = s.path().join("other.key");
    std::fs::write(&other, "c".repeat(64)).unwrap();
    let agent = crate::common::FakeAgent::start(p_wrong, 5.0, &other);
    let master = MasterProc::spawn(&s.config(), &[]);
    master.wait_msg("Started");
    let problems = || {
        let out = s.run(&["status", "--json"]);
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let of = |host: &str| {
            st["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["host"] == host)
                .and_then(|n| n["problem"].as_str().map(String::from))
                .unwrap_or_default()
        };
        (of("127.0.2.21"), of("127.0.2.22"), of("127.0.2.23"))
    };
    let end = Instant::now() + Duration::from_secs(20);
    let (a, b, c) = loop {
        let (a, b, c) = problems();
        if (a.contains("ssh-keyscan") && b.contains("report secret") && c.contains("no agent"))
            || Instant::now() > end
        {
            break (a, b, c);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        a.contains(&format!("ssh-keyscan -p {} 127.0.2.21", unknown.port)),
        "{a}"
    );
    assert!(
        b.contains("does the node's [node] secret_file hold the master's report.key?"),
        "{b}"
    );
    assert!(c.contains("is `autoscaler node` running there"), "{c}");
    let table = crate::common::stdout(&s.run(&["status"]));
    assert!(
        table.contains("127.0.2.21:8080 not heard: host key of 127.0.2.21"),
        "{table}"
    );
    // `check --fleet` beside the running master: SSH and the forward are fine for the node
    // with the wrong secret, and its agent line says the master does not hear it, and why.
    let out = s.run(&["check", "--fleet"]);
    let text = crate::common::stdout(&out);
    assert_eq!(out.status.code(), Some(69), "{text}");
    let agent_of = |text: &str, host: &str| {
        text.lines()
            .skip_while(|l| !l.starts_with(&format!("{host}:8080 ")))
            .find(|l| l.trim_start().starts_with("agent: "))
            .unwrap_or_else(|| panic!("no agent line for {host}:\n{text}"))
            .to_string()
    };
    assert!(row_of(&text, "127.0.2.22").contains(" ok    ok"), "{text}");
    assert!(
        agent_of(&text, "127.0.2.22").contains("not heard by the running master")
            && agent_of(&text, "127.0.2.22").contains("report secret"),
        "{text}"
    );
    // The right secret: heard, and the reason is gone.
    drop(agent);
    let _agent = crate::common::FakeAgent::start(p_wrong, 5.0, &s.path().join("report.key"));
    let end = Instant::now() + Duration::from_secs(20);
    while !problems().1.is_empty() {
        assert!(Instant::now() < end, "still: {}", problems().1);
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = crate::common::stdout(&s.run(&["check", "--fleet"]));
    assert!(
        agent_of(&text, "127.0.2.22").contains("heard by the running master (")
            && !agent_of(&text, "127.0.2.22").contains("not heard"),
        "{text}"
    );
    master.terminate();
}

/// The whole master, as a binary: a node reports 95 % CPU through a real SSH tunnel, the
/// decider scales up, the command launcher "launches" a host, the registry records it and the
/// HAProxy writer puts it in a validated haproxy.cfg.
#[test]
fn master_binary_scales_up_end_to_end() {
    let (Some(sshd_bin), Some(_)) = (tool("sshd"), tool("haproxy")) else {
        return;
    };
    let s = crate::common::Sandbox::new();
    let key = s.path().join("id_ed25519");
    let report_port = free_port("127.0.0.1");
    let metrics = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let grow = s.path().join("grow.sh");
    std::fs::write(
        &grow,
        "#!/bin/sh\necho \"{\\\"host\\\": \\\"127.0.1.77\\\", \\\"port\\\": 8080, \\\"instance_id\\\": \\\"$AUTOSCALER_DECISION\\\"}\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&grow, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    s.set_all(&crate::common::quick_command_master(report_port, &grow));
    s.set("autoscaler", "metrics_address", &metrics);
    let sshd = Sshd::start(&sshd_bin, "127.0.0.8", None, &pub_of(&key), None);
    let out = s.run(&[
        "add-host",
        "127.0.0.8",
        "8080",
        "--ssh-port",
        &sshd.port.to_string(),
    ]);
    assert!(out.status.success());
    let master = MasterProc::spawn(&s.config(), &[]);
    master.wait_msg("Tunnel up");
    // Stand in for the node agent: a hot node, one frame every 200 ms, until the checks
    // below are done (at most two minutes): a node gone quiet would show down.
    let mut node = std::net::TcpStream::connect(("127.0.0.1", report_port)).unwrap();
    use std::io::Write;
    let ch = crate::common::handshake(
        &mut node,
        crate::common::hello("hot", 1, None),
        Some(&s.path().join("report.key")),
        &format!("tcp:{report_port}"),
    )
    .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    let feeder = std::thread::spawn(move || {
        for seq in 0..600u64 {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let line = ch.sample(&crate::common::sample(seq, 95.0));
            // Frame 1 arrives twice (a resend): the master uses it once and counts the copy.
            let copies = if seq == 1 { 2 } else { 1 };
            if node.write_all(line.repeat(copies).as_bytes()).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let d = master.wait("a scale-up decision", |v| {
        v["msg"] == "Decision" && v["action"] == "scale_up"
    });
    assert_eq!(d["count"], 1);
    assert!(d["reason"].as_str().unwrap().contains("95.0%"), "{d}");
    master.wait("Launch finished", |v| {
        v["msg"] == "Launch finished" && v["actor"] == "ScaleDecider"
    });
    master.wait("HAProxy told about 2 servers", |v| {
        v["servers"] == 2
            && (v["msg"] == "HAProxy configuration installed and reloaded"
                || v["msg"] == "HAProxy servers changed through the runtime API")
    });
    let cfg = std::fs::read_to_string(s.path().join("haproxy.cfg")).unwrap();
    assert!(
        cfg.contains("server 127.0.1.77_8080 127.0.1.77:8080 check"),
        "{cfg}"
    );
    let hosts = crate::common::stdout(&s.run(&["list-hosts", "--json"]));
    assert!(hosts.contains("\"origin\": \"launched\""), "{hosts}");
    // `status` asks the running master over its control socket.
    let out = s.run(&["status", "--json"]);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let node = |host: &str| {
        st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["host"] == host)
            .cloned()
            .unwrap_or_else(|| panic!("{host} missing: {st}"))
    };
    let hot = node("127.0.0.8");
    assert_eq!(hot["tunnel"], "up", "{st}");
    assert_eq!(hot["last_cpu_pct"], 95.0, "{st}");
    assert_eq!(hot["origin"], "manual", "{st}");
    let launched = node("127.0.1.77");
    assert_eq!(launched["origin"], "launched", "{st}");
    assert!(launched["instance_id"].as_str().is_some(), "{st}");
    assert!(
        st["last_action"]["action"]
            .as_str()
            .is_some_and(|a| a.starts_with("scale_up")),
        "{st}"
    );
    assert_eq!(st["launches_last_hour"], 1, "{st}");
    assert_eq!(st["haproxy"][0]["state"], "applied", "{st}");
    let table = crate::common::stdout(&s.run(&["status"]));
    let row = table
        .lines()
        .find(|l| l.starts_with("127.0.0.8 "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(" up ") && row.contains("95.0%"), "{table}");
    assert!(table.contains("last decision: scale_up 1"), "{table}");
    // The same view, and the counters, as Prometheus metrics that promtool accepts.
    let (code, text) = crate::common::http_get(&metrics, "/metrics");
    assert_eq!(code, 200, "{text}");
    for want in [
        "autoscaler_node_cpu_busy_percent{host=\"127.0.0.8\",port=\"8080\"} 95.0",
        "autoscaler_decisions_total{action=\"scale_up\",reason=\"instance\"} 1",
        "autoscaler_launches_total{result=\"ok\"} 1",
        "autoscaler_launch_duration_seconds_count{result=\"ok\"} 1",
        "autoscaler_nodes{state=\"up\",origin=\"manual\"} 1",
        "autoscaler_nodes{state=\"never\",origin=\"launched\"} 1",
        "autoscaler_launches_last_hour 1",
        "autoscaler_haproxy_server_failing{server=\"local\"} 0",
        "autoscaler_report_frames_dropped_total{host=\"127.0.0.8\",reason=\"duplicate\"} 1",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("autoscaler_haproxy_applies_total{server=\"local\"")),
        "{text}"
    );
    if let Some(promtool) = tool("promtool") {
        if let Some(said) = crate::common::promtool_check(&promtool, &text) {
            panic!("promtool check metrics: {said}\n{text}");
        }
    }
    // Prometheus itself asks for OpenMetrics, and gets it.
    let (code, open) = crate::common::http_get_accept(
        &metrics,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    );
    assert_eq!(code, 200);
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(
        open.contains("# TYPE autoscaler_decisions counter"),
        "{open}"
    );
    let (code, _) = crate::common::http_get(&metrics, "/nope");
    assert_eq!(code, 404);
    let socket = s.path().join("master.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", socket.display());
    done.store(true, Ordering::SeqCst);
    master.terminate();
    let _ = feeder.join();
    master.wait_msg("Stopped");
    // With no master, `status` says so and exits 69 (EX_UNAVAILABLE).
    let out = s.run(&["status"]);
    crate::common::assert_fails(&out, 69, "no master answers on");
}

/// Everything the master reported within `d`.
async fn events_for(m: &mut Master, d: Duration) -> Vec<Event> {
    let end = Instant::now() + d;
    let mut out = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(
        end.saturating_duration_since(Instant::now()),
        m.events.recv(),
    )
    .await
    {
        out.push(e);
    }
    out
}

/// A local user of a node connects to the forwarded report port and claims 99.25 % busy,
/// without the report secret, over and over, and holds idle connections open. Nothing it
/// says reaches the master's actors, the real node is never taken down, its samples keep
/// flowing, idle connections beyond the bound are refused, and the refusals are counted. An
/// agent with another secret is refused too.
#[actix_rt::test]
async fn a_spoofing_client_cannot_move_decisions_or_take_the_node_down() {
    let Some(sshd_bin) = tool("sshd") else { return };
    let (mut m, _sshd, _node, _nd) = one_tcp_node(&sshd_bin, "127.0.0.9");
    let report_port = m.cfg.node.report_port;
    let real = m.up("127.0.0.9").await;
    m.samples("127.0.0.9", 2).await;

    // A key of the local user's own making.
    let guess = m.dir.path().join("guess.key");
    std::fs::write(&guess, "1".repeat(64)).unwrap();
    let spoof = std::thread::spawn(move || {
        use std::io::Write;
        let mut idle = Vec::new();
        for i in 0..30u64 {
            let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", report_port)) else {
                continue;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            // Answers the challenge without the secret (a key of its own, or none), then
            // writes samples with no MAC or a made-up one.
            let hello = crate::common::hello("spoof", 7 + i, Some(3_600_000));
            let key = (i % 2 == 0).then_some(guess.as_path());
            let _ = crate::common::handshake(&mut s, hello, key, &format!("tcp:{report_port}"));
            for seq in 0..5 {
                let frame = autoscaler_actors::report::encode(
                    &autoscaler_actors::report::Frame::Cpu(crate::common::sample(seq, 99.25)),
                );
                let frame = match seq % 2 {
                    0 => frame,
                    _ => {
                        frame.trim_end().trim_end_matches('}').to_string()
                            + &format!(",\"mac\":\"{}\"}}\n", "0".repeat(32))
                    }
                };
                let _ = s.write_all(frame.as_bytes());
            }

            if i < 10 {
                // Connections that never say anything, held open.
                if let Ok(c) = std::net::TcpStream::connect(("127.0.0.1", report_port)) {
                    idle.push(c);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        idle
    });
    let seen = events_for(&mut m, Duration::from_secs(5)).await;
    let idle = spoof.join().unwrap();
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::Up(u) if u.hello.node == "spoof")),
        "a spoofed hello was taken: {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::Cpu(c) if c.sample.busy_pct == 99.25)),
        "a spoofed sample was taken"
    );
    assert!(
        !seen.iter().any(|e| matches!(e, Event::Down(_))),
        "the real node was taken down"
    );
    let real_samples = seen
        .iter()
        .filter(|e| matches!(e, Event::Cpu(c) if c.host.host.to_string() == "127.0.0.9"))
        .count();
    assert!(
        real_samples >= 10,
        "the agent's samples kept flowing: {real_samples}"
    );
    // Refused and counted by reason; logged once a minute, not once per connection.
    let counted = m.metrics.counted();
    for reason in ["unauthenticated", "evicted"] {
        let line = format!(
            "autoscaler_report_channels_refused_total{{host=\"127.0.0.9\",reason=\"{reason}\"}}"
        );
        assert!(counted.contains(&line), "{line} missing:\n{counted}");
    }
    let log = m.log.text();
    let logged =
        log.matches("closed before it proved").count() + log.matches("closed to make room").count();
    assert_eq!(logged, 1, "{log}");
    drop(idle);

    // The agent itself restarts with another secret: refused, and the node is not up.
    drop(_node);
    m.down("127.0.0.9").await;
    let wrong = m.dir.path().join("wrong.key");
    std::fs::write(&wrong, "f".repeat(64)).unwrap();
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (_bad_node, _bd) = start_node(report_port, None, &wrong);
    let seen = events_for(&mut m, Duration::from_secs(4)).await;
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::Up(_) | Event::Cpu(_))),
        "an agent with another secret was heard: {seen:?}"
    );
    drop(_bad_node);
    // And with the right one again, it is.
    let (_good, _gd) = start_node(report_port, None, &secret_of(&m.cfg));
    let again = m.up("127.0.0.9").await;
    assert_ne!(again.hello.boot, real.hello.boot);
}

/// Two masters (the highly available pair): each forwards its own report port from the same
/// node, the agent reports to both, and each master hears it first-hand; one master going
/// away costs the other nothing.
#[actix_rt::test]
async fn two_masters_each_get_the_agents_reports() {
    let Some(sshd_bin) = tool("sshd") else { return };
    let (dir1, mut cfg1) = Master::dir_with_key();
    let (dir2, mut cfg2) = Master::dir_with_key();
    // One fleet: the same SSH identity and the same report secret.
    std::fs::copy(&cfg1.ssh.identity_file, &cfg2.ssh.identity_file).unwrap();
    crate::common::copy_secret(&secret_of(&cfg1), &secret_of(&cfg2));
    let (p1, p2) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    cfg1.node.report_port = p1;
    cfg2.node.report_port = p2;
    let sshd = Sshd::start(
        &sshd_bin,
        "127.0.0.10",
        None,
        &pub_of(&cfg1.ssh.identity_file),
        None,
    );
    let (_node, _nd) = start_node_for(p1, &[p2], None, &secret_of(&cfg1));
    let mut a = Master::start(dir1, cfg1);
    let mut b = Master::start(dir2, cfg2);
    for m in [&a, &b] {
        m.trust(&sshd);
        m.add_host(&sshd, 8080);
    }
    let (up_a, up_b) = (a.up("127.0.0.10").await, b.up("127.0.0.10").await);
    assert_eq!(up_a.hello.boot, up_b.hello.boot, "the same agent run");
    let sa = a.samples("127.0.0.10", 3).await;
    let sb = b.samples("127.0.0.10", 3).await;
    assert!(strictly_increasing(&sa) && strictly_increasing(&sb));
    // Master A goes away: B keeps hearing the node, and is never told it went down.
    drop(a);
    let more = b.samples("127.0.0.10", 5).await;
    assert!(more.first() > sb.last(), "{sb:?} then {more:?}");
    let seen = events_for(&mut b, Duration::from_secs(2)).await;
    assert!(!seen.iter().any(|e| matches!(e, Event::Down(_))));
}

/// tests/local_user.py run as the suite's unprivileged user (no secret, no root), in the
/// background; None (loudly) when that user or setpriv is missing.
fn local_user(args: &[String]) -> Option<std::process::Child> {
    let setpriv = tool("setpriv")?;
    // The system's Python: one under root's home (pyenv) is no use to another user.
    let python = Path::new("/usr/bin/python3");
    if !python.is_file() {
        crate::common::unavailable(
            "/usr/bin/python3 is missing (the local user's attacks run in it)",
            "apt-get install python3",
        );
        return None;
    }
    let user = crate::common::shell_user()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/local_user.py");
    Some(
        Command::new(setpriv)
            .args([
                format!("--reuid={user}"),
                format!("--regid={user}"),
                "--clear-groups".into(),
            ])
            .arg(python)
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// What the local user's attack says it managed (its last line of output).
async fn attack_result(child: std::process::Child) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!(
            "the attack said nothing usable ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn forged_sample_taken(seen: &[Event]) -> bool {
    seen.iter()
        .any(|e| matches!(e, Event::Cpu(c) if c.sample.busy_pct == 99.0))
}

/// Two masters' ports on the node; master A is down, so its port on the node's loopback is
/// free. A local user binds it, the agent connects there, and the user passes master B's
/// challenge to the agent and the agent's hello back to B, then writes frames claiming 99 %
/// on that channel. B refuses the hello (it answers another forward), takes no sample from
/// that channel, never loses the node, and hears the agent's own reports throughout.
#[actix_rt::test]
async fn a_hello_relayed_to_another_master_opens_nothing() {
    let Some(sshd_bin) = tool("sshd") else { return };
    let (dir, mut cfg) = Master::dir_with_key();
    let (pa, pb) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    cfg.node.report_port = pb;
    let sshd = Sshd::start(
        &sshd_bin,
        "127.0.0.12",
        None,
        &pub_of(&cfg.ssh.identity_file),
        None,
    );
    // The local user holds A's port before the agent starts; the agent reports to A and B.
    let Some(attack) = local_user(&["relay".into(), pa.to_string(), pb.to_string(), "8".into()])
    else {
        return;
    };
    let (_node, _nd) = start_node_for(pa, &[pb], None, &secret_of(&cfg));
    let mut m = Master::start(dir, cfg);
    m.trust(&sshd);
    m.add_host(&sshd, 8080);
    let seen = events_for(&mut m, Duration::from_secs(10)).await;
    let said = attack_result(attack).await;
    assert!(
        said["agent_connected"] == true
            && said["master_connected"] == true
            && said["hello_relayed"] == true
            && said["injected"].as_u64() > Some(0),
        "the relay never happened: {said}"
    );
    assert!(
        !forged_sample_taken(&seen),
        "a forged sample was taken: {said}"
    );
    let ups = seen.iter().filter(|e| matches!(e, Event::Up(_))).count();
    assert_eq!(ups, 1, "only the agent's own channel: {seen:?}");
    assert!(
        !seen.iter().any(|e| matches!(e, Event::Down(_))),
        "the node was taken down"
    );
    let real = seen.iter().filter(|e| matches!(e, Event::Cpu(_))).count();
    assert!(real >= 20, "the agent's own samples flowed: {real}");
    let counted = m.metrics.counted();
    let line =
        "autoscaler_report_channels_refused_total{host=\"127.0.0.12\",reason=\"unauthenticated\"}";
    assert!(counted.contains(line), "{line} missing:\n{counted}");
}

/// One master, before its forward is up: a local user takes the report port, the agent
/// connects there, the user lets the port go, and once the master's forward holds it the user
/// relays the master's challenge, the agent's hello and the master's welcome — a true
/// handshake, for this very forward — then writes frames claiming 99 %. Not one is taken (none
/// carries the channel's MAC); the channel is closed, and the agent, reconnecting, is heard
/// again within seconds.
#[actix_rt::test]
async fn frames_written_into_a_relayed_channel_are_refused() {
    let Some(sshd_bin) = tool("sshd") else { return };
    let (dir, mut cfg) = Master::dir_with_key();
    let port = free_port("127.0.0.1");
    cfg.node.report_port = port;
    let sshd = Sshd::start(
        &sshd_bin,
        "127.0.0.13",
        None,
        &pub_of(&cfg.ssh.identity_file),
        None,
    );
    let Some(mut attack) = local_user(&[
        "relay".into(),
        port.to_string(),
        port.to_string(),
        "10".into(),
    ]) else {
        return;
    };
    let (_node, _nd) = start_node(port, None, &secret_of(&cfg));
    // The agent is in the user's hands before the master starts.
    {
        use std::io::BufRead;
        let err = attack.stderr.take().unwrap();
        let got = tokio::task::spawn_blocking(move || {
            std::io::BufReader::new(err)
                .lines()
                .next()
                .map(Result::unwrap)
        })
        .await
        .unwrap();
        assert_eq!(got.as_deref(), Some("agent connected"));
    }
    let mut m = Master::start(dir, cfg);
    m.trust(&sshd);
    m.add_host(&sshd, 8080);
    let t = Instant::now();
    let seen = events_for(&mut m, Duration::from_secs(12)).await;
    let said = attack_result(attack).await;
    assert!(
        said["hello_relayed"] == true && said["injected"].as_u64() > Some(0),
        "the relay never happened: {said}"
    );
    assert_eq!(said["master_closed"], true, "{said}");
    assert!(
        !forged_sample_taken(&seen),
        "a forged sample was taken: {said}"
    );
    let counted = m.metrics.counted();
    let line = "autoscaler_report_channels_refused_total{host=\"127.0.0.13\",reason=\"forged\"}";
    assert!(counted.contains(line), "{line} missing:\n{counted}");
    // The agent's own channel afterwards: up, and its samples flow.
    let last_up = seen
        .iter()
        .rposition(|e| matches!(e, Event::Up(_)))
        .expect("the agent was heard");
    let after = seen[last_up..]
        .iter()
        .filter(|e| matches!(e, Event::Cpu(_)))
        .count();
    assert!(
        after >= 5,
        "the agent's samples after the attack: {after} ({:?})",
        t.elapsed()
    );
}

/// A local user holds eight channels open on the forwarded port, each dripping a byte every
/// 5 s and never finishing a hello (and opening another when one is closed); the agent
/// restarts meanwhile. It is heard within the hello deadline plus its reconnect backoff:
/// newer channels push out the one that waited longest, and a waiting channel's time counts
/// from when it opened, however it spreads its bytes.
#[actix_rt::test]
async fn dripping_connections_cannot_keep_the_agent_out() {
    let Some(sshd_bin) = tool("sshd") else { return };
    let (dir, mut cfg) = Master::dir_with_key();
    let port = free_port("127.0.0.1");
    cfg.node.report_port = port;
    // The default staleness: a waiting channel's time is the hello's 10 s, longer than the
    // drip's 5 s.
    cfg.scaling.stale_after = Duration::from_secs(10);
    let sshd = Sshd::start(
        &sshd_bin,
        "127.0.0.14",
        None,
        &pub_of(&cfg.ssh.identity_file),
        None,
    );
    let (node, _nd) = start_node(port, None, &secret_of(&cfg));
    let mut m = Master::start(dir, cfg);
    m.trust(&sshd);
    m.add_host(&sshd, 8080);
    let first = m.up("127.0.0.14").await;
    let Some(drip) = local_user(&["drip".into(), port.to_string(), "8".into(), "25".into()]) else {
        return;
    };
    // The drippers fill every waiting slot, then the agent restarts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(node);
    m.down("127.0.0.14").await;
    let t = Instant::now();
    let (_node2, _nd2) = start_node(port, None, &secret_of(&m.cfg));
    let again = m.up("127.0.0.14").await;
    let heard = t.elapsed();
    assert_ne!(again.hello.boot, first.hello.boot);
    assert!(
        heard < autoscaler_actors::master::tunnels::HELLO_TIMEOUT + Duration::from_secs(5),
        "heard {heard:?} after the restart"
    );
    m.samples("127.0.0.14", 3).await;
    let said = attack_result(drip).await;
    assert!(said["opened"].as_u64() >= Some(8), "{said}");
    let counted = m.metrics.counted();
    let line = "autoscaler_report_channels_refused_total{host=\"127.0.0.14\",reason=\"evicted\"}";
    assert!(counted.contains(line), "{line} missing:\n{counted}");
    eprintln!("agent restarted among 8 dripping channels: heard after {heard:?}");
}

/// The default transport: the master's forward is a Unix socket in a directory only the
/// agent's user can open. A local user can neither connect to it nor put a socket of their
/// own there, while the master hears the agent.
#[actix_rt::test]
async fn no_local_user_can_reach_a_unix_socket_forward() {
    let Some(sshd_bin) = tool("sshd") else { return };
    let (dir, mut cfg) = Master::dir_with_key();
    // The agent's directory, inside a temp dir other users may traverse.
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = base.path().join("reports/m.sock");
    cfg.node.report_socket = Some(socket.display().to_string());
    let sshd = Sshd::start(
        &sshd_bin,
        "127.0.0.15",
        None,
        &pub_of(&cfg.ssh.identity_file),
        None,
    );
    let (_node, _nd) = start_agent(Via::Unix(&socket), None, &secret_of(&cfg));
    let mut m = Master::start(dir, cfg);
    m.trust(&sshd);
    m.add_host(&sshd, 8080);
    m.up("127.0.0.15").await;
    m.samples("127.0.0.15", 3).await;
    let mode = std::fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "the agent keeps its directory private");
    let Some(probe) = local_user(&["probe-unix".into(), socket.display().to_string()]) else {
        return;
    };
    let said = attack_result(probe).await;
    assert_eq!(said["connect"], "PermissionError", "{said}");
    assert_eq!(said["bind"], "PermissionError", "{said}");
}

/// A host a launch started reports with that launch's key (what its user data or the
/// scale-up command gave it) and names its instance. An agent naming another instance is
/// refused; so is one proving another launch's key.
#[actix_rt::test]
async fn a_launched_host_speaks_with_its_launch_key_and_instance_id() {
    use autoscaler_actors::report::launch_key;
    let Some(sshd_bin) = tool("sshd") else { return };
    let (dir, mut cfg) = Master::dir_with_key();
    let port = free_port("127.0.0.1");
    cfg.node.report_port = port;
    let sshd = Sshd::start(
        &sshd_bin,
        "127.0.0.16",
        None,
        &pub_of(&cfg.ssh.identity_file),
        None,
    );
    let fleet = std::fs::read_to_string(secret_of(&cfg)).unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key_file = |name: &str, text: String| {
        let p = keys.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let own = key_file("own.key", launch_key(fleet.trim().as_bytes(), "as-1-aaaa"));
    let other = key_file(
        "other.key",
        launch_key(fleet.trim().as_bytes(), "as-1-bbbb"),
    );
    let mut m = Master::start(dir, cfg);
    m.trust(&sshd);
    let mut h = Host::launched(
        HostName::parse("127.0.0.16").unwrap(),
        8080,
        Some("i-0launched".into()),
    );
    h.ssh_port = Some(sshd.port);
    h.decision = Some("as-1-aaaa".into());
    HostsDir::new(&m.cfg.general.hosts_dir).add(&h).unwrap();
    // Its own launch's key, its own instance: heard.
    let (node, _nd) = start_agent_as(Via::Tcp(port, &[]), None, &own, "i-0launched");
    let up = m.up("127.0.0.16").await;
    assert_eq!(up.hello.instance_id.as_deref(), Some("i-0launched"));
    m.samples("127.0.0.16", 2).await;
    drop(node);
    m.down("127.0.0.16").await;
    // Another instance (with the fleet's secret, which this host may use too): refused.
    let (bad, _bd) = start_agent_as(Via::Tcp(port, &[]), None, &secret_of(&m.cfg), "i-0other");
    let seen = events_for(&mut m, Duration::from_secs(3)).await;
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::Up(_) | Event::Cpu(_))),
        "{seen:?}"
    );
    drop(bad);
    // Another launch's key: refused.
    let (bad, _bd) = start_agent_as(Via::Tcp(port, &[]), None, &other, "i-0launched");
    let seen = events_for(&mut m, Duration::from_secs(3)).await;
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::Up(_) | Event::Cpu(_))),
        "{seen:?}"
    );
    drop(bad);
    let counted = m.metrics.counted();
    for reason in ["wrong_instance", "unauthenticated"] {
        let line = format!(
            "autoscaler_report_channels_refused_total{{host=\"127.0.0.16\",reason=\"{reason}\"}}"
        );
        assert!(counted.contains(&line), "{line} missing:\n{counted}");
    }
    // The fleet's secret and the right instance: heard.
    let (_good, _gd) = start_agent_as(Via::Tcp(port, &[]), None, &secret_of(&m.cfg), "i-0launched");
    m.up("127.0.0.16").await;
}

/// The node's sshd settings the README gives (step 3 of "Your first fleet"), taken from the
/// README as written: the master's forward to the agent's socket comes up and the agent is
/// heard; a TCP forward and a command are refused for that user.
#[actix_rt::test]
async fn the_readmes_node_sshd_settings_let_reports_through_and_nothing_else() {
    let (Some(sshd_bin), Some(ssh)) = (tool("sshd"), tool("ssh")) else {
        return;
    };
    // As written (the user is `autoscaler`).
    let snippet = crate::common::readme_sshd_snippet("autoscaler");
    // A launched node gets the same settings (contrib/cloud-init/node.yaml).
    let cloud = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/cloud-init/node.yaml"),
    )
    .unwrap();
    // The Match block's settings, in order, comments left out: the same in both files but
    // for node.yaml's `GatewayPorts no`.
    let settings = |text: &str| -> Vec<String> {
        let mut lines = text
            .lines()
            .skip_while(|l| l.trim() != "Match User autoscaler");
        let head = lines.next().unwrap_or_default();
        let indent = |l: &str| l.len() - l.trim_start().len();
        let base = indent(head);
        lines
            .take_while(|l| indent(l) > base && !l.trim().is_empty())
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .map(String::from)
            .collect()
    };
    let in_readme = settings(&snippet);
    let in_cloud: Vec<String> = settings(&cloud)
        .into_iter()
        .filter(|l| l != "GatewayPorts no")
        .collect();
    assert!(in_readme.len() >= 5, "{snippet}");
    assert_eq!(in_cloud, in_readme, "node.yaml and the README differ");
    // The master logs in as the user the tests run as, standing in for `autoscaler`.
    let user = crate::common::current_user();

    let (dir, mut cfg) = Master::dir_with_key();
    let base = tempfile::tempdir().unwrap();
    let socket = base.path().join("reports/master.sock");
    cfg.node.report_socket = Some(socket.display().to_string());
    let key = cfg.ssh.identity_file.clone();
    let mut sshd = Sshd::start(&sshd_bin, "127.0.0.16", None, &pub_of(&key), None);
    sshd.append_config(&sshd_bin, &crate::common::readme_sshd_snippet(&user));
    let (_node, _nd) = start_agent(Via::Unix(&socket), None, &secret_of(&cfg));
    let mut m = Master::start(dir, cfg);
    m.trust(&sshd);
    m.add_host(&sshd, 8080);
    m.up("127.0.0.16").await;
    assert!(strictly_increasing(&m.samples("127.0.0.16", 3).await));

    // Nothing else for that user: no command (ForceCommand /bin/false: exit 1, where a
    // refused login or connection would be 255), no TCP forward.
    // Each ssh is given 10 s: one the settings wrongly let through would stay connected.
    let ssh_as = |options: &[&str], command: &[&str]| {
        let mut child = Command::new(&ssh)
            .args(["-F", "none", "-o", "IdentitiesOnly=yes"])
            .args(["-i", key.to_str().unwrap(), "-p", &sshd.port.to_string()])
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .args([
                "-o",
                &format!("UserKnownHostsFile={}", m.cfg.ssh.known_hosts.display()),
            ])
            .args(options)
            .arg(format!("{user}@127.0.0.16"))
            .args(command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > end {
                let _ = child.kill();
                panic!("ssh {options:?} {command:?} was let through: still connected after 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    };
    let out = ssh_as(&["-T"], &["echo", "ran"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ran"));
    let out = ssh_as(
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            "127.0.0.1:0:127.0.0.1:9",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("forwarding failed"),
        "a TCP forward was allowed: {err}"
    );
    // Nor a connection out through the node (a local forward: direct-tcpip).
    let out = ssh_as(&["-W", &format!("127.0.0.1:{}", sshd.port)], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("prohibited"),
        "a local forward was allowed: {err}"
    );
}
