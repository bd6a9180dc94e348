//! HaproxyWriter against real HAProxy 2.6 servers in master-worker mode, started here: one on
//! this machine, and one "remote" in its own network and mount namespaces reached over SSH.
//! Server-list changes go through the runtime API without a reload; drains wait for the last
//! session; a configuration HAProxy rejects never replaces the live one; every server is
//! retried until it runs the current configuration.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{
    current_user, free_port, keygen, root, shell_user, tool, LogBuf, Netns, Proc, Sshd,
};
use actix::{Actor, Addr};
use autoscaler_actors::adapters::ssh::SshSettings;
use autoscaler_actors::admin::{self, Output};
use autoscaler_actors::config::{CommandLine, Config, HaproxyTarget, Role};
use autoscaler_actors::haproxy_api::LbSample;
use autoscaler_actors::hosts::{Host, HostName};
use autoscaler_actors::master::decider::BalancerLoad;
use autoscaler_actors::master::haproxy_worker::WorkerSettings;
use autoscaler_actors::master::haproxy_writer::{
    DrainOutcome, GetServerStatus, HaproxyWriter, WaitDrained,
};
use autoscaler_actors::master::messages::HostsChanged;
use autoscaler_actors::render::{HaproxyTemplate, HAPROXY_TEMPLATE};

/// One runtime API command, answered; Err when HAProxy cannot be asked or says nothing.
fn try_api(sock: &Path, cmd: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    match out.is_empty() {
        true => Err(std::io::Error::other("empty answer")),
        false => Ok(out),
    }
}

/// One runtime API command, answered. A HAProxy that does not answer fails the test: "no
/// servers" must never pass because HAProxy is dead.
#[track_caller]
fn api(sock: &Path, cmd: &str) -> String {
    try_api(sock, cmd).unwrap_or_else(|e| panic!("{cmd:?} on {}: {e}", sock.display()))
}

/// The server names HAProxy has in the backend, with their admin state.
#[track_caller]
fn servers(sock: &Path) -> Vec<(String, u32)> {
    let answer = api(sock, "show servers state app");
    // Version 1 of the format, then its header: anything else ("Can't find backend.") is
    // not an empty backend.
    assert!(
        answer.starts_with(
            "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state"
        ),
        "not a server state answer: {answer}"
    );
    answer
        .lines()
        .skip(2)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() > 6, "short server state line: {l}");
            (f[3].to_string(), f[6].parse().expect("srv_admin_state"))
        })
        .collect()
}

/// The server names HAProxy has in the backend, sorted.
fn names(sock: &Path) -> Vec<String> {
    let mut n: Vec<String> = servers(sock).into_iter().map(|(n, _)| n).collect();
    n.sort();
    n
}

/// The names of `list`, sorted as [`names`] are.
fn of(list: &[&Backend]) -> Vec<String> {
    let mut n: Vec<String> = list.iter().map(|b| b.name()).collect();
    n.sort();
    n
}

/// A HAProxy master process (`-W`) and what to reach it by.
struct Lb {
    _proc: Proc,
    pidfile: PathBuf,
    sock: PathBuf,
}

impl Lb {
    /// Starts `haproxy -W -f cfg -p pidfile -S DIR/haproxy-master.sock` (DIR: the file's
    /// directory, where a private configuration's `[haproxy] master_socket` points), under
    /// `wrapper` (e.g. `nsenter …`) if given.
    fn start(haproxy: &Path, cfg: &Path, pidfile: &Path, sock: &Path, wrapper: &[String]) -> Lb {
        let _ = std::fs::remove_file(pidfile);
        let mut argv: Vec<std::ffi::OsString> = wrapper.iter().map(Into::into).collect();
        argv.push(haproxy.into());
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..])
            .arg("-W")
            .arg("-f")
            .arg(cfg)
            .arg("-p")
            .arg(pidfile)
            .arg("-S")
            .arg(cfg.parent().unwrap().join("haproxy-master.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let lb = Lb {
            _proc: Proc(c.spawn().unwrap()),
            pidfile: pidfile.to_path_buf(),
            sock: sock.to_path_buf(),
        };
        let end = Instant::now() + Duration::from_secs(10);
        while !lb.pidfile.exists() || try_api(&lb.sock, "show info").is_err() {
            assert!(
                Instant::now() < end,
                "HAProxy {} did not start",
                cfg.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        lb
    }

    /// The master's worker processes (a reload starts a new one).
    fn workers(&self) -> Vec<u32> {
        let master: u32 = std::fs::read_to_string(&self.pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|x| x.parse::<u32>().ok());
            if ppid == Some(master) {
                out.push(pid);
            }
        }
        out.sort();
        out
    }
}

/// A backend on 127.0.0.1 answering HTTP with its name after `hold`; stops when dropped.
struct Backend(crate::common::HttpBackend);

impl std::ops::Deref for Backend {
    type Target = crate::common::HttpBackend;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Backend {
    fn start(name: &str, hold: Duration) -> Backend {
        Backend(crate::common::HttpBackend::start("127.0.0.1", name, hold))
    }

    fn host(&self) -> Host {
        Host::manual(HostName::parse("127.0.0.1").unwrap(), self.port)
    }

    fn name(&self) -> String {
        format!("127.0.0.1_{}", self.port)
    }
}

/// GET / through HAProxy's frontend; the body.
fn get(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

async fn wait_until(what: &str, limit: Duration, f: impl FnMut() -> bool) {
    wait_logged(what, limit, None, f).await
}

/// Like [`wait_until`], printing the writer's log when it fails.
async fn wait_logged(
    what: &str,
    limit: Duration,
    log: Option<&LogBuf>,
    mut f: impl FnMut() -> bool,
) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < end,
            "{what} within {limit:?}; log:\n{}",
            log.map(LogBuf::text).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A master configuration in `dir` for a local HAProxy started by the test: a frontend on a
/// free loopback port, reload by signalling the master process.
fn lb_config(dir: &Path) -> (Config, u16) {
    admin::init(dir, Role::Master, false).unwrap();
    let mut cfg = Config::load(&dir.join("autoscaler.ini")).unwrap();
    let port = free_port("127.0.0.1");
    cfg.haproxy.bind = vec![format!("127.0.0.1:{port}")];
    cfg.haproxy.debounce = Duration::from_millis(100);
    cfg.haproxy.check_interval = Duration::from_millis(500);
    cfg.scaling.drain_timeout = Duration::from_secs(10);
    cfg.haproxy.reload_command = CommandLine(vec![
        "sh".into(),
        "-c".into(),
        format!("kill -USR2 $(cat {})", dir.join("haproxy.pid").display()),
    ]);
    (cfg, port)
}

/// Writes the configuration for no host and starts HAProxy on it.
async fn start_lb(haproxy: &Path, cfg: &Config) -> Lb {
    admin::generate(cfg, &Output::File(cfg.haproxy.config_path.clone()), true)
        .await
        .unwrap();
    let dir = cfg.haproxy.config_path.parent().unwrap();
    Lb::start(
        haproxy,
        &cfg.haproxy.config_path,
        &dir.join("haproxy.pid"),
        &cfg.haproxy.stats_socket,
        &[],
    )
}

fn writer(
    cfg: &Config,
    template: HaproxyTemplate,
    ssh: Option<Arc<SshSettings>>,
    log: &LogBuf,
) -> Addr<HaproxyWriter> {
    let mut settings = WorkerSettings::from_config(cfg, ssh.clone());
    settings.retry_base = Duration::from_millis(200);
    settings.retry_max = Duration::from_secs(1);
    settings.reap_every = Duration::from_millis(100);
    HaproxyWriter::new(Arc::new(cfg.clone()), template, ssh, &log.logger())
        .with_settings(settings)
        .start()
}

/// Every backend load a HaproxyWriter's workers read: (server, when, sample).
#[derive(Clone, Default)]
struct Loads(Arc<std::sync::Mutex<Vec<(String, Instant, LbSample)>>>);

impl actix::Actor for Loads {
    type Context = actix::Context<Self>;
}

impl actix::Handler<BalancerLoad> for Loads {
    type Result = ();
    fn handle(&mut self, m: BalancerLoad, _: &mut actix::Context<Self>) {
        self.0
            .lock()
            .unwrap()
            .push((m.server, Instant::now(), m.sample));
    }
}

impl Loads {
    /// How many loads `server` sent since `since`.
    fn from(&self, server: &str, since: Instant) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, at, _)| s == server && *at >= since)
            .count()
    }
}

/// [`writer`] whose workers read each server's backend load (a HAProxy signal on) for
/// `loads`.
fn reading_writer(
    cfg: &Config,
    ssh: Option<Arc<SshSettings>>,
    log: &LogBuf,
    loads: &Loads,
) -> Addr<HaproxyWriter> {
    let mut settings = WorkerSettings::from_config(cfg, ssh.clone());
    settings.retry_base = Duration::from_millis(200);
    settings.retry_max = Duration::from_secs(1);
    settings.reap_every = Duration::from_millis(100);
    HaproxyWriter::new(
        Arc::new(cfg.clone()),
        HaproxyTemplate::load(None).unwrap(),
        ssh,
        &log.logger(),
    )
    .with_settings(settings)
    .with_sampling(Arc::new(AtomicBool::new(true)))
    .with_load_to(loads.clone().start().recipient())
    .start()
}

fn hosts(list: &[&Backend]) -> HostsChanged {
    HostsChanged {
        hosts: Arc::new(list.iter().map(|b| b.host()).collect()),
    }
}

/// Server changes go through the runtime API: no new worker process, no reload; the file
/// follows every change (validated), so HAProxy started from it has the same backend.
#[actix_rt::test]
async fn server_changes_go_through_the_runtime_api_without_reloads() {
    let Some(haproxy) = tool("haproxy") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, port) = lb_config(tmp.path());
    let lb = start_lb(&haproxy, &cfg).await;
    let (a, b, c) = (
        Backend::start("a", Duration::ZERO),
        Backend::start("b", Duration::ZERO),
        Backend::start("c", Duration::ZERO),
    );
    let log = LogBuf::default();
    let w = writer(&cfg, HaproxyTemplate::load(None).unwrap(), None, &log);
    // The first apply: HAProxy was never told anything by this master: validate and reload.
    w.do_send(hosts(&[&a, &b]));
    wait_until("a and b in HAProxy", Duration::from_secs(15), || {
        names(&lb.sock) == of(&[&a, &b])
    })
    .await;
    log.wait_for("installed and reloaded", Duration::from_secs(5))
        .await;
    // The worker from before that reload finishes its connections, then exits.
    wait_until("one worker", Duration::from_secs(10), || {
        lb.workers().len() == 1
    })
    .await;
    let workers = lb.workers();
    for round in 0..5 {
        w.do_send(hosts(&[&a, &b, &c]));
        wait_until("c added", Duration::from_secs(10), || {
            names(&lb.sock).contains(&c.name())
        })
        .await;
        w.do_send(hosts(&[&a, &c]));
        wait_until("b drained and removed", Duration::from_secs(10), || {
            !names(&lb.sock).contains(&b.name())
        })
        .await;
        w.do_send(hosts(&[&a, &b]));
        wait_until("b back, c removed", Duration::from_secs(10), || {
            names(&lb.sock) == of(&[&a, &b])
        })
        .await;
        assert_eq!(lb.workers(), workers, "no reload in round {round}");
    }
    assert_eq!(
        log.text().matches("installed and reloaded").count(),
        1,
        "only the first apply reloaded"
    );
    assert!(log
        .text()
        .contains("HAProxy servers changed through the runtime API"));
    // Traffic reaches the servers the runtime API added.
    let served: Vec<String> = (0..6).map(|_| get(port).unwrap()).collect();
    assert!(
        served.contains(&"a".into()) && served.contains(&"b".into()),
        "{served:?}"
    );
    // The file followed: it validates, and it describes what HAProxy runs.
    let file = std::fs::read_to_string(&cfg.haproxy.config_path).unwrap();
    let st = Command::new(&haproxy)
        .args(["-c", "-f"])
        .arg(&cfg.haproxy.config_path)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(file.contains(&format!("server {} 127.0.0.1:{} check", a.name(), a.port)));
    assert!(!file.contains(&c.name()));
}

/// Scale-in drains for real: the server goes to DRAIN, and WaitDrained resolves (Drained) only
/// once its last session has ended, and soon after; then the server is removed. A wait
/// shorter than the session says it timed out. The backends answer when the test releases
/// them, so a session lasts as long as the test needs however slow the machine.
#[actix_rt::test]
async fn a_drain_waits_for_the_last_session() {
    let Some(haproxy) = tool("haproxy") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, port) = lb_config(tmp.path());
    let lb = start_lb(&haproxy, &cfg).await;
    let slow = Backend(crate::common::HttpBackend::gated("127.0.0.1", "slow"));
    let log = LogBuf::default();
    let w = writer(&cfg, HaproxyTemplate::load(None).unwrap(), None, &log);
    w.do_send(hosts(&[&slow]));
    wait_until("slow in HAProxy", Duration::from_secs(15), || {
        names(&lb.sock) == [slow.name()]
    })
    .await;
    // A request held by the backend is in flight when the host leaves.
    let in_flight = |b: &Backend| {
        let line = format!("app,{},0,0,1,", b.name());
        move |sock: &Path| api(sock, "show stat app 4 -1").contains(&line)
    };
    let is_draining = |b: &Backend| {
        let name = b.name();
        move |sock: &Path| {
            servers(sock)
                .iter()
                .any(|(n, admin)| *n == name && admin & DRAIN != 0)
        }
    };
    let client = std::thread::spawn(move || get(port));
    let busy = in_flight(&slow);
    wait_until("the session is counted", Duration::from_secs(5), || {
        busy(&lb.sock)
    })
    .await;
    w.do_send(hosts(&[]));
    let draining = is_draining(&slow);
    wait_until("slow in DRAIN", Duration::from_secs(5), || {
        draining(&lb.sock)
    })
    .await;
    let wait = w.send(WaitDrained {
        server: slow.host().key(),
        within: Duration::from_secs(20),
    });
    tokio::pin!(wait);
    // A second in which a wait that does not look at sessions would resolve.
    let early = tokio::time::timeout(Duration::from_secs(1), &mut wait).await;
    assert!(
        early.is_err(),
        "WaitDrained resolved with the session open: {early:?}"
    );
    slow.release();
    let released = Instant::now();
    let outcome = wait.await.unwrap();
    let waited = released.elapsed();
    assert_eq!(outcome, DrainOutcome::Drained);
    assert_eq!(
        client.join().unwrap().unwrap(),
        "slow",
        "the session ended normally"
    );
    // Soon after the session ended (looks every 100 ms here; a loaded machine gets a few
    // seconds), not at the 20 s limit.
    assert!(
        waited < Duration::from_secs(5),
        "WaitDrained resolved {waited:?} after the session ended"
    );
    wait_until("the drained server removed", Duration::from_secs(5), || {
        names(&lb.sock).is_empty()
    })
    .await;
    // Nothing to wait for: a server HAProxy does not have is drained at once.
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        w.send(WaitDrained {
            server: slow.host().key(),
            within: Duration::from_secs(20),
        }),
    )
    .await
    .expect("resolved before its limit")
    .unwrap();
    assert_eq!(outcome, DrainOutcome::Drained);
    // The time given bounds the wait, and the caller learns that it ran out.
    let slower = Backend(crate::common::HttpBackend::gated("127.0.0.1", "slower"));
    w.do_send(hosts(&[&slower]));
    wait_until("slower in HAProxy", Duration::from_secs(15), || {
        names(&lb.sock) == [slower.name()]
    })
    .await;
    let client = std::thread::spawn(move || get(port));
    let busy = in_flight(&slower);
    wait_until(
        "the second session is counted",
        Duration::from_secs(5),
        || busy(&lb.sock),
    )
    .await;
    w.do_send(hosts(&[]));
    let draining = is_draining(&slower);
    wait_until("slower in DRAIN", Duration::from_secs(5), || {
        draining(&lb.sock)
    })
    .await;
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        w.send(WaitDrained {
            server: slower.host().key(),
            within: Duration::from_millis(500),
        }),
    )
    .await
    .expect("resolved when its time ran out, well before the session ends")
    .unwrap();
    assert_eq!(outcome, DrainOutcome::TimedOut);
    assert!(!client.is_finished(), "the session was still open");
    slower.release();
    assert_eq!(client.join().unwrap().unwrap(), "slower");
}

/// `srv_admin_state` bit of a server set to DRAIN through the runtime API (SRV_ADMF_FDRAIN).
const DRAIN: u32 = 0x08;

/// A template HAProxy rejects never replaces the live configuration; HAProxy's own message
/// is logged; HAProxy keeps serving the last good one.
#[actix_rt::test]
async fn a_rejected_configuration_never_replaces_the_live_one() {
    let Some(haproxy) = tool("haproxy") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, _) = lb_config(tmp.path());
    let lb = start_lb(&haproxy, &cfg).await;
    let a = Backend::start("a", Duration::ZERO);
    let log = LogBuf::default();
    let good = writer(&cfg, HaproxyTemplate::load(None).unwrap(), None, &log);
    good.do_send(hosts(&[&a]));
    wait_until("a in HAProxy", Duration::from_secs(15), || {
        names(&lb.sock) == [a.name()]
    })
    .await;
    drop(good);
    let live = std::fs::read_to_string(&cfg.haproxy.config_path).unwrap();
    let bad = HaproxyTemplate::from_source(
        "bad",
        &HAPROXY_TEMPLATE.replace(
            "balance roundrobin",
            "balance roundrobin\n    frobnicate yes",
        ),
    )
    .unwrap();
    let b = Backend::start("b", Duration::ZERO);
    let w = writer(&cfg, bad, None, &log);
    w.do_send(hosts(&[&a, &b]));
    log.wait_for("the last good one stays live", Duration::from_secs(10))
        .await;
    assert!(
        log.text().contains("frobnicate"),
        "HAProxy's own message is logged"
    );
    assert_eq!(
        std::fs::read_to_string(&cfg.haproxy.config_path).unwrap(),
        live
    );
    assert_eq!(names(&lb.sock), [a.name()]);
}

/// A missing check program is a refusal: nothing unvalidated is ever installed or reloaded.
#[actix_rt::test]
async fn a_missing_check_program_is_a_refusal() {
    let Some(haproxy) = tool("haproxy") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (mut cfg, _) = lb_config(tmp.path());
    let lb = start_lb(&haproxy, &cfg).await;
    let before = std::fs::read_to_string(&cfg.haproxy.config_path).unwrap();
    cfg.haproxy.check_command = "/nonexistent/haproxy -c -f {config}".parse().unwrap();
    let a = Backend::start("a", Duration::ZERO);
    let log = LogBuf::default();
    let w = writer(&cfg, HaproxyTemplate::load(None).unwrap(), None, &log);
    w.do_send(hosts(&[&a]));
    log.wait_for("is not installed on this machine", Duration::from_secs(10))
        .await;
    assert!(log.text().contains("refusing"));
    assert_eq!(
        std::fs::read_to_string(&cfg.haproxy.config_path).unwrap(),
        before
    );
    assert!(names(&lb.sock).is_empty());
}

/// A failed reload is retried until HAProxy runs the configuration; after a restart of the
/// master, a file on disk that differs from what HAProxy was last told to run is put back and
/// reloaded. Before a reload, the servers' health states are saved for the new worker.
#[actix_rt::test]
async fn failures_are_retried_until_haproxy_runs_the_configuration() {
    let Some(haproxy) = tool("haproxy") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (mut cfg, _) = lb_config(tmp.path());
    let lb = start_lb(&haproxy, &cfg).await;
    let flag = tmp.path().join("reloads-work");
    cfg.haproxy.reload_command = CommandLine(vec![
        "sh".into(),
        "-c".into(),
        format!(
            "test -e {} && kill -USR2 $(cat {})",
            flag.display(),
            lb.pidfile.display()
        ),
    ]);
    let a = Backend::start("a", Duration::ZERO);
    let log = LogBuf::default();
    let w = writer(&cfg, HaproxyTemplate::load(None).unwrap(), None, &log);
    w.do_send(hosts(&[&a]));
    log.wait_for_count(
        "HAProxy server not updated; retrying",
        2,
        Duration::from_secs(10),
    )
    .await;
    assert!(names(&lb.sock).is_empty(), "not reloaded yet");
    std::fs::write(&flag, "").unwrap();
    wait_until(
        "a in HAProxy once reloads work",
        Duration::from_secs(10),
        || names(&lb.sock) == [a.name()],
    )
    .await;
    let state = std::fs::read_to_string(&cfg.haproxy.server_state_file).unwrap_or_default();
    assert!(
        state.starts_with("1\n"),
        "health states saved before the reload: {state:?}"
    );
    drop(w);
    // The file is changed behind the master's back while it is down.
    let good = std::fs::read_to_string(&cfg.haproxy.config_path).unwrap();
    std::fs::write(
        &cfg.haproxy.config_path,
        format!("{good}# edited by hand\n"),
    )
    .unwrap();
    let workers = lb.workers();
    let log2 = LogBuf::default();
    let w2 = writer(&cfg, HaproxyTemplate::load(None).unwrap(), None, &log2);
    w2.do_send(hosts(&[&a]));
    log2.wait_for("installed and reloaded", Duration::from_secs(10))
        .await;
    assert_eq!(
        std::fs::read_to_string(&cfg.haproxy.config_path).unwrap(),
        good
    );
    wait_until("a new worker", Duration::from_secs(10), || {
        lb.workers() != workers
    })
    .await;
    let state = std::fs::read_to_string(&cfg.haproxy.server_state_file).unwrap();
    assert!(state.contains(&a.name()), "{state}");
}

/// Two HAProxy servers: this machine's, and one over SSH in its own network and mount
/// namespaces (its own stats socket and pid file at the same paths). Both converge; with the
/// remote one's sshd down, the local one is unaffected, and the remote one converges after it
/// comes back.
#[actix_rt::test]
async fn two_servers_one_over_ssh_converge_and_a_down_one_catches_up() {
    let (Some(haproxy), Some(sshd_bin), Some(_), Some(_), true) = (
        tool("haproxy"),
        tool("sshd"),
        tool("unshare"),
        tool("setpriv"),
        root(),
    ) else {
        return;
    };
    let Some(user) = shell_user() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // The remote server's files belong to its (unprivileged) user.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (mut cfg, _) = lb_config(tmp.path());
    // Paths both servers use: the remote one sees its own directory there.
    let run = tmp.path().join("run");
    let remote_run = tmp.path().join("remote-run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::create_dir_all(&remote_run).unwrap();
    cfg.haproxy.stats_socket = run.join("admin.sock");
    cfg.haproxy.server_state_file = run.join("server-state");
    cfg.haproxy.reload_command = CommandLine(vec![
        "sh".into(),
        "-c".into(),
        format!("kill -USR2 $(cat {})", run.join("haproxy.pid").display()),
    ]);
    let remote_dir = tmp.path().join("remote");
    std::fs::create_dir_all(&remote_dir).unwrap();
    for d in [&remote_dir, &remote_run] {
        let st = Command::new("chown")
            .arg(format!("{user}:"))
            .arg(d)
            .status()
            .unwrap();
        assert!(st.success());
    }
    let remote_cfg = remote_dir.join("haproxy.cfg");
    keygen(&cfg.ssh.identity_file);
    cfg.ssh.user = current_user();
    cfg.ssh.connect_timeout = Duration::from_secs(2);
    cfg.haproxy.command_timeout = Duration::from_secs(10);
    // An unprivileged user's PATH has no /usr/sbin: name the program.
    cfg.haproxy.check_command = CommandLine(vec![
        haproxy.display().to_string(),
        "-c".into(),
        "-f".into(),
        "{config}".into(),
    ]);
    let ns = Netns::create(7);
    cfg.haproxy.servers = vec![
        HaproxyTarget::Local,
        format!("ssh://{user}@{}{}", ns.inner, remote_cfg.display())
            .parse()
            .unwrap(),
    ];
    // The remote server: sshd and HAProxy in the namespace, remote-run mounted over run.
    let wrapper = crate::common::mounted_over(&remote_run, &run);
    let mut pub_key = cfg.ssh.identity_file.as_os_str().to_owned();
    pub_key.push(".pub");
    let mut sshd = Sshd::start_wrapped(
        &sshd_bin,
        &ns.inner,
        Path::new(&pub_key),
        Some(&ns.name),
        &wrapper,
    );
    std::fs::write(&cfg.ssh.known_hosts, sshd.known_hosts_line()).unwrap();
    admin::generate(&cfg, &Output::File(cfg.haproxy.config_path.clone()), true)
        .await
        .unwrap();
    std::fs::copy(&cfg.haproxy.config_path, &remote_cfg).unwrap();
    let _ = Command::new("chown")
        .arg(format!("{user}:"))
        .arg(&remote_cfg)
        .status();
    let local = Lb::start(
        &haproxy,
        &cfg.haproxy.config_path,
        &run.join("haproxy.pid"),
        &run.join("admin.sock"),
        &[],
    );
    // The remote HAProxy runs in sshd's namespaces, as the remote user.
    let enter = |pid: u32| {
        vec![
            "nsenter".to_string(),
            "-t".into(),
            pid.to_string(),
            "-m".into(),
            "-n".into(),
            "setpriv".into(),
            format!("--reuid={user}"),
            format!("--regid={user}"),
            "--clear-groups".into(),
        ]
    };
    let remote = Lb::start(
        &haproxy,
        &remote_cfg,
        &remote_run.join("haproxy.pid"),
        &remote_run.join("admin.sock"),
        &enter(sshd.pid().unwrap()),
    );

    let (a, b) = (
        Backend::start("a", Duration::ZERO),
        Backend::start("b", Duration::ZERO),
    );
    let log = LogBuf::default();
    let ssh = Arc::new(SshSettings::from_config(&cfg).unwrap());
    let loads = Loads::default();
    let w = reading_writer(&cfg, Some(ssh), &log, &loads);
    w.do_send(hosts(&[&a]));
    wait_logged(
        "both servers run the configuration",
        Duration::from_secs(20),
        Some(&log),
        || names(&local.sock) == [a.name()] && names(&remote.sock) == [a.name()],
    )
    .await;
    // Each server's backend load is read, this machine's and the remote one's over SSH.
    let remote_label = cfg.haproxy.servers[1].to_string();
    let t = Instant::now();
    wait_logged(
        "loads from both servers",
        Duration::from_secs(10),
        Some(&log),
        || loads.from("local", t) >= 2 && loads.from(&remote_label, t) >= 2,
    )
    .await;
    let remote_file = std::fs::read_to_string(&remote_cfg).unwrap();
    assert_eq!(
        remote_file,
        std::fs::read_to_string(&cfg.haproxy.config_path).unwrap()
    );

    // The remote server goes away: the local one is unaffected.
    sshd.stop();
    w.do_send(hosts(&[&a, &b]));
    wait_until("the local server changed", Duration::from_secs(10), || {
        names(&local.sock) == of(&[&a, &b])
    })
    .await;
    log.wait_for(
        "HAProxy server not updated; retrying",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(names(&remote.sock), [a.name()], "the remote one is behind");
    // A server that cannot be reached sends no figures (silence, never a zero load) while
    // the local one goes on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    wait_logged(
        "the local server's loads going on",
        Duration::from_secs(10),
        Some(&log),
        || loads.from("local", t) >= 2,
    )
    .await;
    if t.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_secs(3) - t.elapsed()).await;
    }
    assert_eq!(loads.from(&remote_label, t), 0);
    // It comes back: it catches up by itself.
    sshd.restart(&sshd_bin);
    wait_logged(
        "the remote server caught up",
        Duration::from_secs(20),
        Some(&log),
        || names(&remote.sock) == of(&[&a, &b]),
    )
    .await;
    assert!(log.text().contains("\"server\":\"ssh://"));
    let t = Instant::now();
    wait_logged(
        "loads from the remote server again",
        Duration::from_secs(40),
        Some(&log),
        || loads.from(&remote_label, t) >= 1,
    )
    .await;

    // Reached as a non-root user (the SSH user) with a socket it may use (mode 660, its
    // group): changes go through the remote's runtime API, no reload there.
    let c = Backend::start("c", Duration::ZERO);
    let remote_workers = remote.workers();
    w.do_send(hosts(&[&a, &b, &c]));
    wait_logged(
        "c on the remote server",
        Duration::from_secs(20),
        Some(&log),
        || names(&remote.sock) == of(&[&a, &b, &c]),
    )
    .await;
    // No new worker there (an old one may have finished meanwhile).
    let now = remote.workers();
    assert!(
        now.iter().all(|p| remote_workers.contains(p)),
        "no reload on the remote: {remote_workers:?} then {now:?}"
    );
    let views = w.send(GetServerStatus).await.unwrap();
    assert_eq!(views[&remote_label].runtime_unavailable, None, "{views:?}");
    // The socket made unusable for that user (root's, mode 600): changes become reloads, and
    // the status says why.
    let sock = remote_run.join("admin.sock");
    for cmd in [vec!["chown", "root:root"], vec!["chmod", "600"]] {
        let st = Command::new(cmd[0])
            .arg(cmd[1])
            .arg(&sock)
            .status()
            .unwrap();
        assert!(st.success());
    }
    w.do_send(hosts(&[&a, &b]));
    wait_logged(
        "c gone from the remote server by a reload",
        Duration::from_secs(20),
        Some(&log),
        || {
            names(&remote.sock) == of(&[&a, &b])
                && remote.workers().iter().any(|p| !remote_workers.contains(p))
        },
    )
    .await;
    let views = w.send(GetServerStatus).await.unwrap();
    let why = views[&remote_label]
        .runtime_unavailable
        .clone()
        .unwrap_or_default();
    assert!(
        why.contains("could not open the socket for the SSH user") && why.contains("mode 660"),
        "{views:?}"
    );
    drop(remote);
    drop(ns);
}

mod sinks {
    use actix::{Actor, Context, Handler};
    use autoscaler_actors::master::decider::{LaunchFinished, Reconciled};

    /// Stands in for the decider.
    pub struct Decider;
    impl Actor for Decider {
        type Context = Context<Self>;
    }
    impl Handler<LaunchFinished> for Decider {
        type Result = ();
        fn handle(&mut self, _: LaunchFinished, _: &mut Context<Self>) {}
    }
    impl Handler<Reconciled> for Decider {
        type Result = ();
        fn handle(&mut self, _: Reconciled, _: &mut Context<Self>) {}
    }
}

/// Scale-in end to end with the real actors: the launcher's drain takes the host out of the
/// registry, the writer drains it in HAProxy, and the host is stopped (the scale-down command
/// runs) only after its last request has been answered — not when a timer says so.
#[actix_rt::test]
async fn a_launched_host_is_stopped_only_after_haproxy_lets_go() {
    stopped_only_after_haproxy_lets_go(true).await
}

/// The same with `runtime_api = false`: the host leaves HAProxy by a reload, the new worker
/// never had it while the old one still serves its request; the host is stopped only once
/// no worker, old or new, holds a session on it (seen through the master CLI).
#[actix_rt::test]
async fn a_drain_across_a_reload_waits_for_the_old_worker() {
    stopped_only_after_haproxy_lets_go(false).await
}

async fn stopped_only_after_haproxy_lets_go(runtime_api: bool) {
    use autoscaler_actors::adapters::hosts_dir::HostsDir;
    use autoscaler_actors::master::launcher::command::CommandProvisioner;
    use autoscaler_actors::master::launcher::{
        DrainHost, LaunchSettings, Launcher, LauncherOutputs, Provisioner,
    };
    use autoscaler_actors::master::registry::HostRegistry;

    let Some(haproxy) = tool("haproxy") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (mut cfg, port) = lb_config(tmp.path());
    cfg.haproxy.runtime_api = runtime_api;
    // Far beyond what the held request needs: the host is stopped when the request ends,
    // never because a slow machine let the drain time run out first.
    cfg.scaling.drain_timeout = Duration::from_secs(60);
    let lb = start_lb(&haproxy, &cfg).await;
    // Answers only when released below: the request is in flight across the drain however
    // slow the machine (a timed hold could end before a slow reload, and the old worker
    // with it).
    let slow = Backend(crate::common::HttpBackend::gated("127.0.0.1", "slow"));
    let mut h = Host::launched(
        HostName::parse("127.0.0.1").unwrap(),
        slow.port,
        Some("vm-1".into()),
    );
    h.registered_ms = Some(1);
    let dir = HostsDir::new(&cfg.general.hosts_dir);
    dir.add(&h).unwrap();
    let log = LogBuf::default();
    let w = writer(&cfg, HaproxyTemplate::load(None).unwrap(), None, &log);
    let registry = HostRegistry::new(
        dir,
        vec![w.clone().recipient()],
        Duration::from_millis(100),
        &log.logger(),
    )
    .start();
    let stopped = tmp.path().join("stopped-at");
    let down = tmp.path().join("down.sh");
    std::fs::write(
        &down,
        format!("#!/bin/sh\ndate +%s.%N > {}\n", stopped.display()),
    )
    .unwrap();
    std::fs::set_permissions(&down, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let decider = sinks::Decider.start();
    let launcher = Launcher::new(
        Provisioner::Command(CommandProvisioner {
            up: CommandLine::default(),
            down: CommandLine(vec![down.display().to_string()]),
            timeout: Duration::from_secs(10),
            env: vec![],
            secret: None,
        }),
        LaunchSettings::from_config(&cfg),
        LauncherOutputs {
            register: registry.clone().recipient(),
            deregister: registry.clone().recipient(),
            list: registry.recipient(),
            finished: decider.clone().recipient(),
            reconciled: decider.recipient(),
            drained: Some(w.recipient()),
        },
        &log.logger(),
    )
    .start();
    wait_until("the host in HAProxy", Duration::from_secs(15), || {
        names(&lb.sock) == [slow.name()]
    })
    .await;
    // The writer's first write (it reloads a server it has no record of) done before the
    // request, so the request's worker is the one the drain finds.
    wait_logged(
        "the writer's first write",
        Duration::from_secs(15),
        Some(&log),
        || log.text().contains("HAProxy configuration "),
    )
    .await;
    let client = std::thread::spawn(move || {
        let body = get(port);
        (body, std::time::SystemTime::now())
    });
    wait_until("the request in flight", Duration::from_secs(5), || {
        api(&lb.sock, "show stat app 4 -1").contains(&format!("app,{},0,0,1,", slow.name()))
    })
    .await;
    let workers = lb.workers();
    launcher.do_send(DrainHost { host: h });
    if runtime_api {
        // Set to DRAIN in the running worker, which keeps the session.
        wait_logged(
            "the server set to drain",
            Duration::from_secs(10),
            Some(&log),
            || {
                servers(&lb.sock)
                    .iter()
                    .any(|(_, admin)| admin & DRAIN != 0)
            },
        )
        .await;
    } else {
        // The new worker does not have the server; the old one still serves the request.
        wait_logged("a new worker", Duration::from_secs(10), Some(&log), || {
            lb.workers().iter().any(|w| !workers.contains(w))
        })
        .await;
        // The old worker may still take a connection to the stats socket for a moment after
        // the new one started (the listeners pass between them): asked until the new answers.
        wait_logged(
            "the new worker answering without the host",
            Duration::from_secs(10),
            Some(&log),
            || names(&lb.sock).is_empty(),
        )
        .await;
    }
    // A second in which a drain that does not wait for the session would stop the host.
    let end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        assert!(
            !stopped.exists(),
            "the host stopped with its request in flight; log:\n{}",
            log.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    slow.release();
    // Written in full (the shell creates the file before `date` writes to it).
    wait_logged(
        "the host stopped",
        Duration::from_secs(20),
        Some(&log),
        || std::fs::read_to_string(&stopped).is_ok_and(|t| t.ends_with('\n')),
    )
    .await;
    let (body, answered) = client.join().unwrap();
    assert_eq!(body.unwrap(), "slow", "the request was answered in full");
    let at: f64 = std::fs::read_to_string(&stopped)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let answered = answered
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        at >= answered - 0.05,
        "stopped at {at}, the request was answered at {answered}"
    );
    assert!(
        at < answered + 5.0,
        "and not long after (drain_timeout is 60 s)"
    );
    wait_until(
        "the server removed from HAProxy",
        Duration::from_secs(5),
        || names(&lb.sock).is_empty(),
    )
    .await;
}

/// A backend answering with `name` on `ip:port`; stops when dropped.
fn backend_at(ip: &str, port: u16, name: &'static str) -> Arc<AtomicBool> {
    let l = TcpListener::bind((ip, port)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            if flag.load(Ordering::SeqCst) {
                return;
            }
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let mut req = Vec::new();
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = c.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                    name.len()
                )
                .as_bytes(),
            );
        }
    });
    stop
}

/// A line in /etc/hosts for the time of a test: `name` resolves to `ip`; changed with
/// [`HostsLine::point`], removed on drop.
struct HostsLine {
    name: String,
}

impl HostsLine {
    fn new(name: &str, ip: &str) -> HostsLine {
        let l = HostsLine { name: name.into() };
        l.point(ip);
        l
    }

    fn point(&self, ip: &str) {
        let text = std::fs::read_to_string("/etc/hosts").unwrap();
        let mut kept: String = text
            .lines()
            .filter(|l| !l.split_whitespace().skip(1).any(|n| n == self.name))
            .map(|l| format!("{l}\n"))
            .collect();
        if !ip.is_empty() {
            kept.push_str(&format!("{ip} {}\n", self.name));
        }
        std::fs::write("/etc/hosts", kept).unwrap();
    }
}

impl Drop for HostsLine {
    fn drop(&mut self) {
        self.point("");
    }
}

/// A host registered by name is served, through the runtime API and through reloads: the
/// master resolves the name and gives HAProxy the address (HAProxy does not resolve a server
/// added at runtime). When the name's address changes, the server follows (runtime: `set
/// server … addr`, no reload).
#[actix_rt::test]
async fn a_host_registered_by_name_is_served_and_follows_its_address() {
    let (Some(haproxy), true) = (tool("haproxy"), root()) else {
        return;
    };
    for runtime_api in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let (mut cfg, port) = lb_config(tmp.path());
        cfg.haproxy.runtime_api = runtime_api;
        cfg.haproxy.resolve_every = Duration::from_secs(1);
        let lb = start_lb(&haproxy, &cfg).await;
        let first = Backend::start("first", Duration::ZERO);
        let log = LogBuf::default();
        let w = writer(&cfg, HaproxyTemplate::load(None).unwrap(), None, &log);
        w.do_send(hosts(&[&first]));
        wait_until("first served", Duration::from_secs(15), || {
            get(port).is_ok_and(|b| b == "first")
        })
        .await;
        // Added by name after the first apply: a runtime change (or a reload).
        let name = format!("as-test-{}-{runtime_api}.internal", std::process::id());
        let entry = HostsLine::new(&name, "127.0.0.1");
        let app_port = free_port("127.0.0.1");
        let _one = backend_at("127.0.0.1", app_port, "one");
        let _two = backend_at("127.0.0.2", app_port, "two");
        let by_name = Host::manual(HostName::parse(&name).unwrap(), app_port);
        w.do_send(HostsChanged {
            hosts: Arc::new(vec![by_name.clone()]),
        });
        wait_logged(
            &format!("{name} served (runtime_api {runtime_api})"),
            Duration::from_secs(15),
            Some(&log),
            || get(port).is_ok_and(|b| b == "one"),
        )
        .await;
        let state = api(&lb.sock, "show servers state app");
        assert!(
            state.contains(&format!("{name}_{app_port} 127.0.0.1 ")),
            "the server keeps the name's name, at the address: {state}"
        );
        let workers = lb.workers();
        // The name moves: within a resolve_every or two, the server follows.
        entry.point("127.0.0.2");
        wait_logged(
            &format!("{name} served at its new address"),
            Duration::from_secs(10),
            Some(&log),
            || get(port).is_ok_and(|b| b == "two"),
        )
        .await;
        if runtime_api {
            assert!(log.text().contains("\"moved\":1"), "{}", log.text());
            let now = lb.workers();
            assert!(
                now.iter().all(|p| workers.contains(p)),
                "no reload for a new address: {workers:?} then {now:?}"
            );
        }
        // A name that never resolved is left out, and said so.
        let nowhere = Host::manual(HostName::parse("nowhere.invalid").unwrap(), 80);
        w.do_send(HostsChanged {
            hosts: Arc::new(vec![by_name.clone(), nowhere]),
        });
        log.wait_for("it is not served until it does", Duration::from_secs(10))
            .await;
        assert!(!names(&lb.sock).iter().any(|n| n.contains("nowhere")));
    }
}

/// A configuration that passes `haproxy -c` but fails to load (a bind already in use): the
/// reload is not taken for done — no new worker answers — and it is retried until it runs.
#[actix_rt::test]
async fn a_reload_that_fails_to_load_is_retried_until_it_runs() {
    let Some(haproxy) = tool("haproxy") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (mut cfg, port) = lb_config(tmp.path());
    cfg.haproxy.command_timeout = Duration::from_secs(2);
    let _lb = start_lb(&haproxy, &cfg).await;
    let a = Backend::start("a", Duration::ZERO);
    let log = LogBuf::default();
    let w = writer(&cfg, HaproxyTemplate::load(None).unwrap(), None, &log);
    w.do_send(hosts(&[&a]));
    log.wait_for("installed and reloaded", Duration::from_secs(10))
        .await;
    drop(w);
    // A second frontend address that another program holds.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let second = busy.local_addr().unwrap().port();
    cfg.haproxy.bind.push(format!("127.0.0.1:{second}"));
    let log = LogBuf::default();
    let w = writer(&cfg, HaproxyTemplate::load(None).unwrap(), None, &log);
    w.do_send(hosts(&[&a]));
    wait_logged(
        "the failed load seen",
        Duration::from_secs(15),
        Some(&log),
        || log.text().matches("no new HAProxy worker answered").count() >= 2,
    )
    .await;
    assert!(
        !log.text().contains("installed and reloaded"),
        "{}",
        log.text()
    );
    // The old worker serves on (HAProxy pauses its listeners while a reload is tried).
    wait_until("the old worker serving", Duration::from_secs(5), || {
        get(port).is_ok_and(|b| b == "a")
    })
    .await;
    drop(busy);
    wait_logged(
        "the retried reload runs",
        Duration::from_secs(15),
        Some(&log),
        || log.text().contains("HAProxy configuration reloaded"),
    )
    .await;
    assert_eq!(
        get(second).unwrap_or_else(|e| panic!("{e}: {}", log.text())),
        "a",
        "the new frontend address serves"
    );
}

/// The server state file never brings back an admin state the plan does not say: a server
/// drained by hand comes back ready at the next reload of a plan that lists it; after a
/// runtime change the file is refreshed, so an outside reload keeps what runs.
#[actix_rt::test]
async fn the_state_file_follows_the_plan() {
    let Some(haproxy) = tool("haproxy") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, _) = lb_config(tmp.path());
    let lb = start_lb(&haproxy, &cfg).await;
    let (a, b, c) = (
        Backend::start("a", Duration::ZERO),
        Backend::start("b", Duration::ZERO),
        Backend::start("c", Duration::ZERO),
    );
    let log = LogBuf::default();
    let w = writer(&cfg, HaproxyTemplate::load(None).unwrap(), None, &log);
    w.do_send(hosts(&[&a, &b]));
    wait_until("a and b", Duration::from_secs(15), || {
        names(&lb.sock) == of(&[&a, &b])
    })
    .await;
    // Someone drains b by hand; then a change that needs a reload (c added with the runtime
    // API off) is applied with b still in the plan.
    api(
        &lb.sock,
        &format!("set server app/{} state drain", b.name()),
    );
    let admin = |n: &str| {
        servers(&lb.sock)
            .into_iter()
            .find(|(x, _)| x == n)
            .map(|(_, s)| s)
    };
    assert_eq!(admin(&b.name()), Some(DRAIN));
    drop(w);
    let mut reloading = cfg.clone();
    reloading.haproxy.runtime_api = false;
    let log = LogBuf::default();
    let w = writer(&reloading, HaproxyTemplate::load(None).unwrap(), None, &log);
    w.do_send(hosts(&[&a, &b, &c]));
    log.wait_for("installed and reloaded", Duration::from_secs(15))
        .await;
    wait_until("a, b and c", Duration::from_secs(10), || {
        names(&lb.sock) == of(&[&a, &b, &c])
    })
    .await;
    assert_eq!(admin(&b.name()), Some(0), "b is ready, as the plan says");
    drop(w);
    // Through the runtime API: c leaves (drained, then removed); the state file follows, and
    // an outside reload of the file brings back exactly a and b, ready.
    let w = writer(&cfg, HaproxyTemplate::load(None).unwrap(), None, &log);
    w.do_send(hosts(&[&a, &b]));
    wait_until("c removed", Duration::from_secs(15), || {
        names(&lb.sock) == of(&[&a, &b])
    })
    .await;
    let state = std::fs::read_to_string(&cfg.haproxy.server_state_file).unwrap();
    assert!(!state.contains(&c.name()), "{state}");
    let workers = lb.workers();
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("kill -USR2 $(cat {})", lb.pidfile.display()))
        .status()
        .unwrap();
    wait_until("the outside reload", Duration::from_secs(10), || {
        lb.workers().iter().any(|p| !workers.contains(p))
    })
    .await;
    wait_until("a and b after it", Duration::from_secs(10), || {
        names(&lb.sock) == of(&[&a, &b])
    })
    .await;
    assert_eq!((admin(&a.name()), admin(&b.name())), (Some(0), Some(0)));
}

/// A failing server is retried with backoff; a new plan is tried at once, not after the last
/// one's backoff. Looking at a drained server on a HAProxy that does not answer backs off
/// too, instead of trying every half second.
#[actix_rt::test]
async fn new_plans_and_failing_looks_keep_their_own_pace() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut cfg, _) = lb_config(tmp.path());
    // No HAProxy here: the file goes into a directory that is not there yet.
    cfg.haproxy.config_path = tmp.path().join("later/haproxy.cfg");
    cfg.haproxy.reload_command = CommandLine(vec!["true".into()]);
    cfg.haproxy.check_command = CommandLine(vec!["test".into(), "-f".into(), "{config}".into()]);
    let log = LogBuf::default();
    let mut settings = WorkerSettings::from_config(&cfg, None);
    settings.retry_base = Duration::from_secs(30);
    settings.reap_every = Duration::from_millis(100);
    let w = HaproxyWriter::new(
        Arc::new(cfg.clone()),
        HaproxyTemplate::load(None).unwrap(),
        None,
        &log.logger(),
    )
    .with_settings(settings)
    .start();
    let (a, b) = (
        Backend::start("a", Duration::ZERO),
        Backend::start("b", Duration::ZERO),
    );
    w.do_send(hosts(&[&a]));
    log.wait_for(
        "HAProxy server not updated; retrying",
        Duration::from_secs(5),
    )
    .await;
    std::fs::create_dir_all(tmp.path().join("later")).unwrap();
    let t = Instant::now();
    w.do_send(hosts(&[&a, &b]));
    log.wait_for("installed and reloaded", Duration::from_secs(5))
        .await;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // A drain watched on a HAProxy that does not answer: looked at with backoff.
    let before = log
        .text()
        .matches("Cannot look at draining servers yet")
        .count();
    let outcome = w
        .send(WaitDrained {
            server: b.host().key(),
            within: Duration::from_secs(3),
        })
        .await
        .unwrap();
    assert_eq!(outcome, DrainOutcome::TimedOut);
    let looks = log
        .text()
        .matches("Cannot look at draining servers yet")
        .count()
        - before;
    assert!((1..=8).contains(&looks), "{looks} looks in 3 s");
}
