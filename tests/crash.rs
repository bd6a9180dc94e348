//! The master binary SIGKILLed at each step of a launch and of a drain, then started again on
//! the same state: afterwards exactly the intended instances exist, each registered once, and
//! every drain is completed. EC2 is moto behind the fault-injecting proxy, which holds the
//! step under test so the kill lands exactly there; the command launcher runs real scripts.
//! Nodes are real sshd servers on loopback with stand-in agents reporting a fixed CPU.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use autoscaler_actors::adapters::ec2::{Ec2Api, SdkEc2};
use autoscaler_actors::adapters::hosts_dir::HostsDir;
use autoscaler_actors::config::Config;
use autoscaler_actors::hosts::{Host, HostName, Origin};

use crate::common::ec2_proxy::{Ec2Proxy, Fault};
use crate::common::moto::{console_with_key, moto_bin, Moto};
use crate::common::{free_port, keygen, tool, FakeAgent, MasterProc, Sandbox, Sshd};

/// Polls `f` (bounded) until it holds.
async fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A master configuration in a sandbox: decisions act, the floor is one node, EC2 through
/// the proxy (or the command provisioner), nothing touches the machine's own HAProxy.
struct Rig {
    s: Sandbox,
    cfg: Config,
    ec2: Option<Ec2>,
    host_key: String,
}

struct Ec2 {
    _moto: Moto,
    proxy: Ec2Proxy,
    direct: Arc<SdkEc2>,
}

impl Rig {
    async fn new(ec2: bool) -> Option<Rig> {
        tool("ssh-keygen")?;
        let s = Sandbox::new();
        keygen(&s.path().join("instance_host_key"));
        let host_key = std::fs::read_to_string(s.path().join("instance_host_key.pub")).unwrap();
        let mut sets = crate::common::floor_master();
        sets.extend([
            ("ssh", "connect_timeout", "2s".into()),
            ("scaling", "warmup", "0s".into()),
            ("scaling", "stale_after", "3s".into()),
            ("scaling", "scale_up_window", "2s".into()),
            ("scaling", "scale_down_window", "2s".into()),
            ("scaling", "scale_down_threshold", "50".into()),
            ("scaling", "scale_up_threshold", "90".into()),
            ("scaling", "scale_down_cooldown", "0s".into()),
        ]);
        let ec2 = match ec2 {
            false => {
                sets.push(("launch", "launcher", "command".into()));
                sets.push(("launch", "scale_up_command", "false".into()));
                None
            }
            true => {
                let moto = Moto::start(&moto_bin()?).await;
                let proxy = Ec2Proxy::start(&moto.endpoint).await;
                proxy.set_console(None, &console_with_key(&host_key));
                sets.extend(crate::common::moto::ec2_settings(
                    &proxy.endpoint,
                    &moto.subnet,
                    "crash",
                ));
                Some((moto, proxy))
            }
        };
        for (section, key, value) in &sets {
            s.set(section, key, value);
        }
        let cfg = Config::load(&s.config()).unwrap();
        let ec2 = match ec2 {
            None => None,
            Some((moto, proxy)) => {
                let mut direct = cfg.clone();
                direct.aws.endpoint = moto.endpoint.clone();
                let direct = Arc::new(
                    SdkEc2::new(&direct.aws, &direct.launch, None)
                        .await
                        .unwrap(),
                );
                Some(Ec2 {
                    _moto: moto,
                    proxy,
                    direct,
                })
            }
        };
        Some(Rig {
            s,
            cfg,
            ec2,
            host_key,
        })
    }

    fn ec2(&self) -> &Ec2 {
        self.ec2.as_ref().unwrap()
    }

    fn master(&self) -> MasterProc {
        MasterProc::spawn(&self.s.config(), &[])
    }

    fn state(&self) -> &Path {
        &self.cfg.general.state_dir
    }

    fn hosts(&self) -> Vec<Host> {
        HostsDir::new(&self.cfg.general.hosts_dir)
            .load_strict()
            .unwrap()
    }

    fn launched(&self) -> Vec<Host> {
        self.hosts()
            .into_iter()
            .filter(|h| h.origin == Origin::Launched)
            .collect()
    }

    async fn live(&self) -> Vec<String> {
        crate::common::moto::live_instances(&self.ec2().direct).await
    }

    /// After a restart: exactly one instance exists, registered once, with its SSH key in
    /// known_hosts, and no launch left unsettled; and it stays so.
    async fn settled_on_one_instance(&self) {
        let end = Instant::now() + Duration::from_secs(40);
        loop {
            let live = self.live().await;
            let launched = self.launched();
            let ok = live.len() == 1
                && launched.len() == 1
                && launched[0].instance_id.as_deref() == Some(live[0].as_str())
                && crate::common::intents_in(self.state()).is_empty();
            if ok {
                break;
            }
            assert!(
                Instant::now() < end,
                "not settled: instances {live:?}, hosts {launched:?}, intents {:?}",
                crate::common::intents_in(self.state())
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(self.live().await.len(), 1, "nothing launched again");
        assert_eq!(self.launched().len(), 1);
        let known = std::fs::read_to_string(&self.cfg.ssh.known_hosts).unwrap();
        let b64 = self.host_key.split_whitespace().nth(1).unwrap();
        let ip = self.launched()[0].host.to_string();
        assert!(
            known.contains(&format!("{ip} ssh-ed25519 {b64}")),
            "{known}"
        );
    }
}

/// Killed after the intent, while RunInstances is on its way (it never reaches EC2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_killed_before_run_instances_reaches_ec2() {
    let Some(r) = Rig::new(true).await else {
        return;
    };
    let e = r.ec2();
    e.proxy.fail_always("RunInstances", Fault::Hold);
    let m = r.master();
    e.proxy
        .wait_for("RunInstances", 1, Duration::from_secs(30))
        .await;
    assert_eq!(
        crate::common::intents_in(r.state()).len(),
        1,
        "the intent comes first"
    );
    m.kill();
    // The held call's caller is gone: it can never reach EC2, released or not.
    e.proxy
        .wait_abandoned("RunInstances", 1, Duration::from_secs(10))
        .await;
    e.proxy.release("RunInstances");
    assert_eq!(e.proxy.forwarded("RunInstances"), 0);
    assert!(r.live().await.is_empty(), "the call never reached EC2");
    let _m = r.master();
    r.settled_on_one_instance().await;
}

/// Killed after RunInstances reached EC2, before its answer came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_killed_after_run_instances() {
    let Some(r) = Rig::new(true).await else {
        return;
    };
    let e = r.ec2();
    e.proxy.fail_always("RunInstances", Fault::HoldAnswer);
    let m = r.master();
    eventually("the instance exists", Duration::from_secs(30), || {
        e.proxy.count("RunInstances") >= 1
    })
    .await;
    let end = Instant::now() + Duration::from_secs(10);
    while r.live().await.is_empty() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let created = r.live().await;
    assert_eq!(created.len(), 1);
    m.kill();
    e.proxy.release("RunInstances");
    let _m = r.master();
    r.settled_on_one_instance().await;
    assert_eq!(
        r.live().await,
        created,
        "the first instance, adopted by its launch"
    );
}

/// Killed while the instance is pending: resumed, not forgotten; registered once it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_killed_while_pending() {
    let Some(r) = Rig::new(true).await else {
        return;
    };
    let e = r.ec2();
    e.proxy.hold_pending(true);
    let m = r.master();
    let n = e.proxy.count("DescribeInstances");
    e.proxy
        .wait_for("DescribeInstances", n + 3, Duration::from_secs(30))
        .await;
    assert_eq!(r.live().await.len(), 1);
    m.kill();
    let m = r.master();
    // The restarted master has taken the launch up and looked at the pending instance
    // several times: still not registered.
    m.logged("the resumed launch", |v| {
        v["msg"] == "Resuming a launch of an earlier run"
    })
    .await;
    let n = e.proxy.count("DescribeInstances");
    e.proxy
        .wait_for("DescribeInstances", n + 3, Duration::from_secs(30))
        .await;
    assert!(r.launched().is_empty(), "not registered while pending");
    assert_eq!(
        crate::common::intents_in(r.state()).len(),
        1,
        "the launch is not forgotten"
    );
    assert_eq!(r.live().await.len(), 1, "and not launched again");
    e.proxy.hold_pending(false);
    r.settled_on_one_instance().await;
}

/// Killed before registration, while waiting for the instance's SSH keys on its console.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_killed_before_registration() {
    let Some(r) = Rig::new(true).await else {
        return;
    };
    let e = r.ec2();
    e.proxy
        .set_console(None, "Linux version 6.1 (still booting)\n");
    let m = r.master();
    e.proxy
        .wait_for("GetConsoleOutput", 2, Duration::from_secs(30))
        .await;
    m.kill();
    e.proxy.set_console(None, &console_with_key(&r.host_key));
    let _m = r.master();
    r.settled_on_one_instance().await;
}

/// An idle fleet: a node added by hand and one launched (in EC2 when `instance` is given),
/// both real sshd servers on loopback whose stand-in agents report 5 %: the master scales in,
/// draining the launched one.
struct IdleFleet {
    launched: Host,
    _sshd: (Sshd, Sshd),
    _agents: (FakeAgent, FakeAgent),
}

impl IdleFleet {
    fn start(r: &Rig, launched_ip: &str, instance: Option<String>) -> Option<IdleFleet> {
        let sshd_bin = tool("sshd")?;
        let client_pub = r.s.path().join("id_ed25519.pub");
        let a = Sshd::start(&sshd_bin, "127.0.0.31", None, &client_pub, None);
        let b = Sshd::start(&sshd_bin, launched_ip, None, &client_pub, None);
        let known = a.known_hosts_line() + &b.known_hosts_line();
        std::fs::write(&r.cfg.ssh.known_hosts, known).unwrap();
        let (pa, pb) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
        let mut manual = Host::manual(HostName::parse("127.0.0.31").unwrap(), 8080);
        manual.ssh_port = Some(a.port);
        manual.report_port = Some(pa);
        let mut launched = Host::launched(HostName::parse(launched_ip).unwrap(), 8080, instance);
        launched.ssh_port = Some(b.port);
        launched.report_port = Some(pb);
        launched.registered_ms = Some(1);
        let dir = HostsDir::new(&r.cfg.general.hosts_dir);
        dir.add(&manual).unwrap();
        dir.add(&launched).unwrap();
        Some(IdleFleet {
            launched,
            _sshd: (a, b),
            _agents: (
                FakeAgent::start(pa, 5.0, &r.s.path().join("report.key")),
                FakeAgent::start(pb, 5.0, &r.s.path().join("report.key")),
            ),
        })
    }
}

/// The EC2 drain tests' fleet: the launched node is an instance of the group.
async fn ec2_idle_fleet(r: &Rig) -> Option<(IdleFleet, String)> {
    let e = r.ec2();
    let i = e
        .direct
        .run_instances(1, "as-earlier")
        .await
        .unwrap()
        .remove(0);
    let ip = i.private_ip.clone().unwrap();
    let fleet = IdleFleet::start(r, &ip, Some(i.instance_id.clone()))?;
    Some((fleet, i.instance_id))
}

async fn drain_completed(r: &Rig, launched: &Host) {
    eventually(
        "the drain record is removed",
        Duration::from_secs(40),
        || crate::common::drains_in(r.state()).is_empty(),
    )
    .await;
    assert!(
        !r.hosts().iter().any(|h| h.key() == launched.key()),
        "the drained host is out"
    );
    let known = std::fs::read_to_string(&r.cfg.ssh.known_hosts).unwrap_or_default();
    let pattern = format!("[{}]:{} ", launched.host, launched.ssh_port.unwrap());
    assert!(!known.contains(&pattern), "its key is forgotten: {known}");
}

/// Killed after deregistration, during the drain: the restarted master never adopts the
/// instance again, and terminates it when the drain time is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_killed_during_a_drain() {
    let Some(r) = Rig::new(true).await else {
        return;
    };
    r.s.set("scaling", "drain_timeout", "6s");
    let Some((fleet, id)) = ec2_idle_fleet(&r).await else {
        return;
    };
    let m = r.master();
    m.logged("the drain", |v| v["msg"] == "Draining: out of the pool")
        .await;
    m.kill();
    let drains = crate::common::drains_in(r.state());
    assert_eq!(drains.len(), 1);
    let deadline = drains[0].deadline_ms;
    let m = r.master();
    // Up to ten looks while the drain time has more than a second to run (each look asks
    // moto, which a loaded machine slows: the count alone could outlast the drain).
    let wall_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let mut looks = 0;
    while looks < 10 && wall_ms() + 1_000 < deadline {
        assert!(
            !r.hosts().iter().any(|h| h.key() == fleet.launched.key()),
            "never adopted again"
        );
        let live = r.live().await;
        if wall_ms() < deadline {
            assert!(live.contains(&id), "not terminated before the drain time");
        }
        looks += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drain_completed(&r, &fleet.launched).await;
    assert!(r.live().await.is_empty(), "terminated");
    // By the restarted master, once the drain time recorded before the kill was up: the
    // record's own time, however few looks the loop above made.
    m.logged("Terminated", |v| v["msg"] == "Terminated").await;
    let terminated = m.matching(|v| v["msg"] == "Terminated");
    assert_eq!(terminated.len(), 1, "{terminated:?}");
    let at = humantime::parse_rfc3339_weak(terminated[0]["ts"].as_str().unwrap())
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        at >= deadline,
        "terminated at {at} ms, the drain time ends at {deadline} ms"
    );
    let adopted = m.matching(|v| v["msg"] == "Adopting running instance missing from the registry");
    assert!(adopted.is_empty(), "not even for a moment: {adopted:?}");
}

/// Killed while TerminateInstances is on its way: the restarted master terminates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_killed_before_termination() {
    let Some(r) = Rig::new(true).await else {
        return;
    };
    r.s.set("scaling", "drain_timeout", "0s");
    let Some((fleet, _)) = ec2_idle_fleet(&r).await else {
        return;
    };
    let e = r.ec2();
    e.proxy.fail_always("TerminateInstances", Fault::Hold);
    let m = r.master();
    e.proxy
        .wait_for("TerminateInstances", 1, Duration::from_secs(40))
        .await;
    m.kill();
    e.proxy
        .wait_abandoned("TerminateInstances", 1, Duration::from_secs(10))
        .await;
    e.proxy.release("TerminateInstances");
    assert_eq!(e.proxy.forwarded("TerminateInstances"), 0);
    assert_eq!(r.live().await.len(), 1, "the call never reached EC2");
    let _m = r.master();
    drain_completed(&r, &fleet.launched).await;
    assert!(r.live().await.is_empty(), "terminated");
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    p
}

/// An idempotent scale-up command: the first run for a decision "starts" a host (one line in
/// `started`), every run prints that decision's host once `go` exists.
fn idempotent_up(dir: &Path, host: &str, port: u16) -> PathBuf {
    let d = dir.display();
    script(
        dir,
        "up.sh",
        &format!(
            "state={d}/launch-$AUTOSCALER_DECISION\n\
             if [ ! -e \"$state\" ]; then echo \"$AUTOSCALER_DECISION\" >> {d}/started; \
             echo '{{\"host\": \"{host}\", \"port\": {port}}}' > \"$state\"; fi\n\
             echo run >> {d}/runs\n\
             i=0; while [ ! -e {d}/go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n\
             cat \"$state\""
        ),
    )
}

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p).map_or(0, |t| t.lines().count())
}

/// Command launcher, killed while the scale-up command runs: the restarted master runs it
/// again with the same decision id, and the one host it started is registered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_killed_while_the_scale_up_command_runs() {
    let Some(r) = Rig::new(false).await else {
        return;
    };
    let dir = r.s.path();
    let up = idempotent_up(dir, "127.0.1.70", 8080);
    r.s.set("launch", "scale_up_command", &up.display().to_string());
    let m = r.master();
    eventually(
        "the command started a host",
        Duration::from_secs(30),
        || lines(&dir.join("started")) == 1,
    )
    .await;
    m.kill();
    std::fs::write(dir.join("go"), "").unwrap();
    let _m = r.master();
    eventually("registered", Duration::from_secs(30), || {
        r.launched().len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(r.launched().len(), 1);
    assert_eq!(lines(&dir.join("started")), 1, "one host started, ever");
    assert!(crate::common::intents_in(r.state()).is_empty());
}

/// Command launcher, killed after the command printed its host, before registration (the
/// health gate waits): resumed from what was printed, without running the command again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_killed_before_registration() {
    let Some(r) = Rig::new(false).await else {
        return;
    };
    let dir = r.s.path();
    let port = free_port("127.0.1.71");
    let up = idempotent_up(dir, "127.0.1.71", port);
    std::fs::write(dir.join("go"), "").unwrap();
    r.s.set("launch", "scale_up_command", &up.display().to_string());
    r.s.set("launch", "health_check", "true");
    r.s.set("launch", "app_port", &port.to_string());
    let m = r.master();
    eventually(
        "the command printed its host",
        Duration::from_secs(30),
        || {
            crate::common::intents_in(r.state())
                .first()
                .is_some_and(|i| !i.launched.is_empty())
        },
    )
    .await;
    m.kill();
    let _app = std::net::TcpListener::bind(("127.0.1.71", port)).unwrap();
    let _m = r.master();
    eventually("registered", Duration::from_secs(30), || {
        r.launched().len() == 1
    })
    .await;
    assert_eq!(lines(&dir.join("runs")), 1, "not run again");
    assert!(crate::common::intents_in(r.state()).is_empty());
}

/// Command launcher, killed while the scale-down command runs: the restarted master runs it
/// again and completes the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_killed_during_the_scale_down_command() {
    let Some(r) = Rig::new(false).await else {
        return;
    };
    let dir = r.s.path();
    let d = dir.display();
    let down = script(
        dir,
        "down.sh",
        &format!(
            "echo \"$AUTOSCALER_HOST\" >> {d}/downs\n\
             i=0; while [ ! -e {d}/go-down ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n\
             echo \"$AUTOSCALER_HOST\" >> {d}/stopped"
        ),
    );
    r.s.set("launch", "scale_down_command", &down.display().to_string());
    r.s.set("scaling", "drain_timeout", "0s");
    let Some(fleet) = IdleFleet::start(&r, "127.0.1.72", None) else {
        return;
    };
    let m = r.master();
    eventually(
        "the scale-down command runs",
        Duration::from_secs(40),
        || lines(&dir.join("downs")) == 1,
    )
    .await;
    m.kill();
    std::fs::write(dir.join("go-down"), "").unwrap();
    let _m = r.master();
    drain_completed(&r, &fleet.launched).await;
    assert!(lines(&dir.join("stopped")) >= 1);
    assert_eq!(lines(&dir.join("downs")), 2, "run again after the restart");
}

/// The master binary under EC2 API faults: throttling, server errors, an answer slower than
/// the client timeout, dropped connections, a lost RunInstances answer and instances held
/// pending. Retries are bounded and logged; the floor (two nodes) is reached with exactly two
/// instances (max_nodes is two: none beyond it, none twice); the decider goes on deciding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_rides_out_api_faults() {
    let Some(r) = Rig::new(true).await else {
        return;
    };
    r.s.set("scaling", "min_nodes", "2");
    r.s.set("scaling", "max_nodes", "2");
    let e = r.ec2();
    e.proxy.fail_next(
        "RunInstances",
        &[Fault::Throttle, Fault::ServerError, Fault::DropAnswer],
    );
    e.proxy.fail_next(
        "DescribeInstances",
        &[
            Fault::Throttle,
            Fault::Slow(Duration::from_secs(3)),
            Fault::Drop,
            Fault::ServerError,
        ],
    );
    e.proxy
        .fail_next("GetConsoleOutput", &[Fault::ServerError, Fault::Drop]);
    e.proxy.hold_pending(true);
    let m = r.master();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(r.live().await.len() <= 2);
    e.proxy.hold_pending(false);
    let end = Instant::now() + Duration::from_secs(60);
    while !(r.launched().len() == 2 && crate::common::intents_in(r.state()).is_empty()) {
        assert!(
            Instant::now() < end,
            "floor not reached: {:?} / {:?}",
            r.launched(),
            r.live().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let live = r.live().await;
    assert_eq!(live.len(), 2, "{live:?}");
    let mut registered: Vec<String> = r
        .launched()
        .iter()
        .filter_map(|h| h.instance_id.clone())
        .collect();
    registered.sort();
    let mut live_sorted = live.clone();
    live_sorted.sort();
    assert_eq!(registered, live_sorted, "each registered once");
    assert_eq!(
        e.proxy.count("RunInstances"),
        3,
        "bounded: three asks, one launch"
    );
    m.logged("the retry after the lost answer", |v| {
        v["msg"] == "RunInstances had gone through; using its instances"
    })
    .await;
    // Still deciding: the two new nodes never report here, so it holds for lack of data.
    m.logged("a later decision", |v| {
        v["msg"] == "Decision" && v["action"] == "hold" && v["nodes"] == 2 && v["in_flight"] == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(r.live().await.len(), 2, "nothing more launched");
}

/// Two runs of one decision never overlap on a machine: the master is SIGKILLed while its
/// scale-up command runs, and the restarted master runs the same decision again. The
/// command's work (a child process, which outlives the command's parent-death signal) logs its
/// start and its end with its pid: the first run's work ends before the second starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_runs_of_one_decision_never_overlap() {
    let Some(r) = Rig::new(false).await else {
        return;
    };
    let dir = r.s.path();
    let d = dir.display();
    let up = script(
        dir,
        "up.sh",
        // The work runs in a child of the script (as `aws …` would): the parent-death
        // signal reaches the script alone, so only the lock keeps the next run from starting
        // while the orphaned child works on.
        &format!(
            "sh -c 'echo \"start $$ $AUTOSCALER_DECISION\" >> {d}/runs; sleep 3; \
             echo \"end $$ $AUTOSCALER_DECISION\" >> {d}/runs'\n\
             echo '{{\"host\": \"127.0.1.73\", \"port\": 8080}}'"
        ),
    );
    r.s.set("launch", "scale_up_command", &up.display().to_string());
    let m = r.master();
    eventually("the command started", Duration::from_secs(30), || {
        lines(&dir.join("runs")) == 1
    })
    .await;
    m.kill();
    let _m = r.master();
    eventually("registered", Duration::from_secs(30), || {
        r.launched().len() == 1
    })
    .await;
    // Wait out anything still running from the first run.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let runs = std::fs::read_to_string(dir.join("runs")).unwrap();
    let mut running: Option<&str> = None;
    let mut starts = 0;
    for line in runs.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match (w[0], running) {
            ("start", None) => {
                running = Some(w[1]);
                starts += 1;
            }
            ("start", Some(other)) => {
                // The earlier run must be gone: no end of it comes later.
                assert!(
                    !runs.contains(&format!("end {other} ")),
                    "run {other} was still going when {} started:\n{runs}",
                    w[1]
                );
                running = Some(w[1]);
                starts += 1;
            }
            ("end", Some(pid)) if pid == w[1] => running = None,
            _ => panic!("out of order:\n{runs}"),
        }
    }
    assert_eq!(starts, 2, "{runs}");
    // The orphaned work of the first run ran to its end: the second waited for it.
    assert_eq!(
        runs.lines().filter(|l| l.starts_with("end ")).count(),
        2,
        "{runs}"
    );
    assert!(
        runs.lines().all(|l| l.ends_with(&intents_decision(&runs))),
        "{runs}"
    );
}

/// The decision id of the first run in a runs log.
fn intents_decision(runs: &str) -> String {
    runs.lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_default()
        .to_string()
}
