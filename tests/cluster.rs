//! Several masters on a real etcd (started here on loopback): the election, writes guarded by
//! the leader's lease, the shared host list, failover and outages, through the library and
//! through the master binary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler};
use autoscaler_actors::adapters::etcd::{current, Etcd, EtcdError, Lead, LeadCell};
use autoscaler_actors::config::{Cluster, Config, Layout, Role};
use autoscaler_actors::master::leadership::{self, Leading};
use tokio::sync::mpsc;

use crate::common::etcd::Etcd as EtcdServer;

fn cluster(server: &EtcdServer, ttl: Duration) -> Cluster {
    let mut c = Config::defaults(
        &Layout::for_dir(std::path::Path::new("/srv/as")),
        Role::Master,
    )
    .cluster;
    c.etcd_endpoints = vec![server.endpoint.clone()];
    c.group = format!("g{}", rand_suffix());
    c.lease_ttl = ttl;
    c.etcd_timeout = Duration::from_secs(2);
    c
}

fn rand_suffix() -> u32 {
    std::process::id() ^ (Instant::now().elapsed().subsec_nanos())
}

/// Host-store writes are read-compare-write: of eight concurrent adds of one host exactly one
/// reports it added (the others find it there), of eight concurrent removes exactly one
/// removes it (the others find it gone); of eight writers of one record that write only
/// where etcd has none (`import-hosts`), one writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_host_writes_do_not_cross() {
    use autoscaler_actors::adapters::host_store::HostStore;
    use autoscaler_actors::adapters::hosts_dir::{AddOutcome, HostsError};
    use autoscaler_actors::hosts::{Host, HostName};
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let c = cluster(&server, Duration::from_secs(5));
    let mut stores = Vec::new();
    for _ in 0..8 {
        let etcd = Etcd::connect(&c, Some(c.etcd_timeout)).await.unwrap();
        stores.push(HostStore::Etcd { etcd, lead: None });
    }
    for round in 0..5u8 {
        let host = Host::manual(HostName::parse(&format!("127.0.2.{round}")).unwrap(), 8080);
        let adds = all(&stores, |s| {
            let host = host.clone();
            async move { s.add(&host).await }
        })
        .await;
        let added = adds
            .iter()
            .filter(|r| matches!(r, Ok(AddOutcome::Added)))
            .count();
        let present = adds
            .iter()
            .filter(|r| matches!(r, Ok(AddOutcome::AlreadyPresent)))
            .count();
        assert_eq!((added, present), (1, 7), "round {round}: {adds:?}");
        let removes = all(&stores, |s| {
            let key = host.key();
            async move { s.remove(&key).await }
        })
        .await;
        let removed = removes.iter().filter(|r| r.is_ok()).count();
        let gone = removes
            .iter()
            .filter(|r| matches!(r, Err(HostsError::NotFound(_))))
            .count();
        assert_eq!((removed, gone), (1, 7), "round {round}: {removes:?}");
    }
    // import-hosts' write: of eight writers of one record, one writes, and its text stays.
    let etcd = Etcd::connect(&c, Some(c.etcd_timeout)).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..8u8 {
        let etcd = etcd.clone();
        tasks.push(tokio::spawn(async move {
            etcd.put_if_absent("intents", "d-import", vec![b'0' + w])
                .await
                .unwrap()
        }));
    }
    let mut winners = Vec::new();
    for (w, t) in tasks.into_iter().enumerate() {
        if t.await.unwrap() {
            winners.push(b'0' + w as u8);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(
        etcd.get("intents", "d-import").await.unwrap(),
        Some(winners.clone())
    );
}

/// Runs `f` on every store at once; what each returned, in order.
async fn all<T, F, Fut>(
    stores: &[autoscaler_actors::adapters::host_store::HostStore],
    f: F,
) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(autoscaler_actors::adapters::host_store::HostStore) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let tasks: Vec<_> = stores.iter().cloned().map(|s| tokio::spawn(f(s))).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Guarded writes: only while the lead's election key lives; once its lease is revoked, the
/// same write (same key, same revision) is refused, and an unguarded (operator's) write is not.
#[actix_rt::test]
async fn a_deposed_leaders_writes_are_refused() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let c = cluster(&server, Duration::from_secs(5));
    let etcd = Etcd::connect(&c, Some(c.etcd_timeout)).await.unwrap();
    let mut client = etcd.client();
    let lease = client.lease_grant(5, None).await.unwrap().id();
    let won = client.campaign(etcd.election(), "m1", lease).await.unwrap();
    let key = won.leader().unwrap().clone();
    let lead = Lead {
        key: key.key().to_vec(),
        rev: key.rev(),
        lease,
        valid_until: std::time::Instant::now() + Duration::from_secs(3600),
    };
    etcd.put("intents", "d-1", b"{}".to_vec(), Some(&lead))
        .await
        .unwrap();
    assert_eq!(etcd.list("intents").await.unwrap().len(), 1);
    assert_eq!(etcd.leader().await.unwrap().as_deref(), Some("m1"));
    client.lease_revoke(lease).await.unwrap();
    let refused = etcd
        .put("intents", "d-2", b"{}".to_vec(), Some(&lead))
        .await;
    assert!(matches!(refused, Err(EtcdError::NotLeader)), "{refused:?}");
    let refused = etcd.delete("intents", "d-1", Some(&lead)).await;
    assert!(matches!(refused, Err(EtcdError::NotLeader)), "{refused:?}");
    assert_eq!(
        etcd.list("intents").await.unwrap().len(),
        1,
        "nothing written"
    );
    etcd.put("hosts", "h", b"x".to_vec(), None).await.unwrap();
    assert_eq!(etcd.leader().await.unwrap(), None, "nobody leads");
}

type Changes = mpsc::UnboundedReceiver<(usize, bool, Instant)>;

/// The next leadership change, within `limit`.
async fn next(rx: &mut Changes, limit: Duration) -> (usize, bool, Instant) {
    tokio::time::timeout(limit, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no leadership change within {limit:?}"))
        .unwrap()
}

struct Collect(mpsc::UnboundedSender<(usize, bool, Instant)>, usize);
impl Actor for Collect {
    type Context = Context<Self>;
}
impl Handler<Leading> for Collect {
    type Result = ();
    fn handle(&mut self, m: Leading, _: &mut Context<Self>) {
        let _ = self.0.send((self.1, m.0, Instant::now()));
    }
}

/// Three candidates: exactly one leads. Its process stops without a word (the task aborted,
/// its lease left to expire, as after SIGKILL): another leads after the lease expired, never
/// before. etcd stopped: the leader steps down within 2/3 of the TTL, before anyone else
/// could lead; back, someone leads again.
#[actix_rt::test]
async fn one_leader_failover_after_the_lease_and_step_down_without_etcd() {
    let Some(mut server) = EtcdServer::start() else {
        return;
    };
    let ttl = Duration::from_secs(2);
    let c = cluster(&server, ttl);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let log = crate::common::LogBuf::default();
    let mut cells: Vec<LeadCell> = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let sink = Collect(tx.clone(), i).start();
        let cell: LeadCell = Arc::default();
        cells.push(cell.clone());
        tasks.push(tokio::spawn(leadership::run(
            c.clone(),
            format!("m{i}"),
            cell,
            vec![sink.recipient()],
            autoscaler_actors::master::launcher::Acting::new(false),
            log.logger(),
        )));
    }
    let (first, leading, _) = next(&mut rx, Duration::from_secs(10)).await;
    assert!(leading);
    let leaders = |cells: &[LeadCell]| cells.iter().filter(|c| current(c).is_some()).count();
    assert_eq!(leaders(&cells), 1);
    // Nobody else leads while it does.
    assert!(tokio::time::timeout(Duration::from_secs(3), rx.recv())
        .await
        .is_err());

    // The leader's process vanishes: no resign, no revoke.
    let killed = Instant::now();
    tasks[first].abort();
    cells[first].write().unwrap().take();
    let (second, leading, at) = next(&mut rx, ttl * 4).await;
    assert!(leading && second != first);
    // Its last renewal was at most ttl/3 before the kill, so its lease lasted at least 2/3
    // of the TTL after it; an election that ignored leases would be over in milliseconds.
    let took = at - killed;
    assert!(
        took >= ttl * 2 / 3 - Duration::from_millis(100),
        "took over after {took:?}, before the lease expired"
    );
    eprintln!("failover (lease {ttl:?}): new leader after {took:?}");
    assert_eq!(leaders(&cells), 1);

    // etcd goes away: the leader steps down on its own, within 2/3 of the TTL of its last
    // renewal (plus a check period).
    let outage = Instant::now();
    server.stop();
    let (who, leading, at) = next(&mut rx, ttl * 2).await;
    assert_eq!((who, leading), (second, false));
    assert!(
        at - outage <= ttl * 2 / 3 + Duration::from_millis(300),
        "stepped down after {:?}",
        at - outage
    );
    assert_eq!(leaders(&cells), 0);
    // Retries every half second or so through the outage; each master says so once.
    tokio::time::sleep(ttl).await;
    server.resume();
    let (_, leading, _) = next(&mut rx, Duration::from_secs(20)).await;
    assert!(leading);
    assert_eq!(leaders(&cells), 1);
    let said = log
        .text()
        .matches("annot take part in the election")
        .count();
    assert!((1..=3).contains(&said), "{}", log.text());
    tasks.iter().for_each(|t| t.abort());
}

use crate::common::{assert_fails, free_port, tool, FakeAgent, MasterProc, Sandbox, Sshd};

/// Masters of one group as processes: one etcd, one node (a real sshd on loopback) with a
/// stand-in agent per master's report port, and a scale-up command that records each run.
struct Rig {
    etcd: EtcdServer,
    masters: Vec<(Sandbox, Option<MasterProc>)>,
    ports: Vec<u16>,
    _sshd: Sshd,
    agents: Vec<FakeAgent>,
    shared: tempfile::TempDir,
}

impl Rig {
    /// `n` masters; the scale-up command takes `delay` before it prints its host.
    fn new(n: usize, delay: Duration) -> Option<Rig> {
        let (Some(sshd_bin), Some(_), Some(_)) =
            (tool("sshd"), tool("haproxy"), tool("ssh-keygen"))
        else {
            return None;
        };
        let etcd = EtcdServer::start()?;
        let shared = tempfile::tempdir().unwrap();
        let script = shared.path().join("grow.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n# Idempotent per decision: the same host for the same decision.\n\
                 echo \"$AUTOSCALER_DECISION\" >> {log}\nsleep {delay}\n\
                 echo '{{\"host\": \"127.0.1.93\", \"port\": 8080, \"instance_id\": \"'\"$AUTOSCALER_DECISION\"'\"}}'\n",
                log = shared.path().join("launches.log").display(),
                delay = delay.as_secs_f64(),
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let first = Sandbox::new();
        let mut masters = Vec::new();
        let mut ports = Vec::new();
        for i in 0..n {
            let s = Sandbox::new();
            // One fleet: the same SSH identity and report secret on every master.
            for f in ["id_ed25519", "id_ed25519.pub", "report.key"] {
                std::fs::copy(first.path().join(f), s.path().join(f)).unwrap();
            }
            let port = free_port("127.0.0.1");
            ports.push(port);
            s.set_all(&crate::common::quick_command_master(port, &script));
            s.set_all(&[
                ("cluster", "etcd_endpoints", etcd.endpoint.clone()),
                ("cluster", "group", "rig".into()),
                ("cluster", "name", format!("m{i}")),
                ("cluster", "lease_ttl", "2s".into()),
                ("cluster", "etcd_timeout", "1s".into()),
                ("scaling", "cooldown", "10m".into()),
                ("scaling", "max_nodes", "3".into()),
            ]);
            masters.push((s, None));
        }
        let sshd = Sshd::start(
            &sshd_bin,
            "127.0.0.11",
            None,
            &first.path().join("id_ed25519.pub"),
            None,
        );
        // The node goes into etcd through the CLI, as an operator adds it.
        let out = masters[0].0.run(&[
            "add-host",
            "127.0.0.11",
            "8080",
            "--ssh-port",
            &sshd.port.to_string(),
        ]);
        assert!(out.status.success(), "{}", crate::common::stderr(&out));
        drop(first);
        Some(Rig {
            etcd,
            masters,
            ports,
            _sshd: sshd,
            agents: Vec::new(),
            shared,
        })
    }

    fn start_all(&mut self) {
        for (s, p) in &mut self.masters {
            *p = Some(MasterProc::spawn(&s.config(), &[]));
        }
    }

    fn start(&mut self, i: usize) {
        let (s, p) = &mut self.masters[i];
        *p = Some(MasterProc::spawn(&s.config(), &[]));
    }

    /// The node's agent reports `busy` % to every master.
    fn load(&mut self, busy: f64) {
        self.load_each(&vec![busy; self.ports.len()]);
    }

    /// The node's agent reports `busy[i]` % to master `i`.
    fn load_each(&mut self, busy: &[f64]) {
        self.agents.clear();
        for (i, port) in self.ports.iter().enumerate() {
            let secret = self.masters[i].0.path().join("report.key");
            self.agents.push(FakeAgent::start(*port, busy[i], &secret));
        }
    }

    /// The first master (index) whose log has a record matching `pred`, within `limit`.
    fn any(&self, what: &str, limit: Duration, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
        let end = Instant::now() + limit;
        loop {
            for (i, (_, p)) in self.masters.iter().enumerate() {
                if p.as_ref().is_some_and(|p| !p.matching(&pred).is_empty()) {
                    return i;
                }
            }
            assert!(
                Instant::now() < end,
                "no master logged {what} within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn launches(&self) -> Vec<String> {
        std::fs::read_to_string(self.shared.path().join("launches.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    fn kill(&mut self, i: usize) {
        if let Some(p) = self.masters[i].1.take() {
            p.kill();
        }
    }

    fn leading(&self) -> Vec<usize> {
        // "Leading" after the last "Stepped down" of each master.
        self.masters
            .iter()
            .enumerate()
            .filter(|(_, (_, p))| {
                p.as_ref().is_some_and(|p| {
                    let all = p.matching(|v| {
                        v["msg"] == "Leading" || v["msg"] == "Stepped down: no longer leading"
                    });
                    all.last().is_some_and(|v| v["msg"] == "Leading")
                })
            })
            .map(|(i, _)| i)
            .collect()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for i in 0..self.masters.len() {
            self.kill(i);
        }
        // Scale-up commands of SIGKILLed masters run on in their own process groups.
        crate::common::kill_mentioning(self.shared.path());
    }
}

fn is_leading(v: &serde_json::Value) -> bool {
    v["msg"] == "Leading"
}

/// Three masters, one node under load: exactly one launch. The leader is SIGKILLed while its
/// scale-up command runs: another master takes over after the lease, resumes that launch from
/// its record (the command runs again with the same decision id and prints the same host),
/// registers the host once, and both remaining masters' HAProxy configurations list it. No
/// second decision is taken for the same load.
#[test]
fn one_launch_and_a_killed_leaders_launch_finished_by_the_next() {
    let Some(mut r) = Rig::new(3, Duration::from_secs(3)) else {
        return;
    };
    r.start_all();
    let leader = r.any("Leading", Duration::from_secs(20), is_leading);
    assert_eq!(r.leading(), vec![leader], "exactly one leader");
    r.load(95.0);
    // The leader decides and its command starts.
    let end = Instant::now() + Duration::from_secs(30);
    while r.launches().is_empty() {
        assert!(Instant::now() < end, "no launch");
        std::thread::sleep(Duration::from_millis(50));
    }
    let decision = r.launches()[0].clone();
    let killed = Instant::now();
    r.kill(leader);
    let next = r.any(
        "Leading after the kill",
        Duration::from_secs(20),
        is_leading,
    );
    assert_ne!(next, leader);
    let failover = killed.elapsed();
    r.any("the launch finished", Duration::from_secs(30), |v| {
        v["msg"] == "Launch finished" && v["actor"] == "Launcher"
    });
    // The killed leader's run, then the next leader's resumed run of the same decision.
    let runs = r.launches();
    assert_eq!(
        runs,
        [decision.clone(), decision.clone()],
        "one decision, its command run twice (resumed)"
    );
    // The next leader took over once the old lease could have expired (renewed at most a
    // third of the TTL before the kill; half allows for a late keepalive), and not much later
    // (etcd revokes expired leases every 500 ms through raft; a loaded machine runs debug
    // builds of three masters and the suite beside).
    let ttl = Duration::from_secs(2);
    assert!(
        failover >= ttl / 2 && failover <= ttl * 2 + Duration::from_secs(5),
        "the next leader led {failover:?} after the kill (lease {ttl:?})"
    );
    r.any("the resumed launch", Duration::from_secs(1), |v| {
        v["msg"] == "Resuming a launch of an earlier run"
    });
    let survivor = if next == 0 { 1 } else { 0 };
    let survivor = if survivor == leader { 2 } else { survivor };
    let out = r.masters[survivor].0.run(&["list-hosts", "--json"]);
    let hosts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let launched: Vec<_> = hosts
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["origin"] == "launched")
        .collect();
    assert_eq!(launched.len(), 1, "{hosts}");
    assert_eq!(launched[0]["instance_id"], decision.as_str());
    // Every surviving master renders the same list into its own HAProxy configuration.
    for i in (0..r.masters.len()).filter(|i| *i != leader) {
        let cfg = r.masters[i].0.path().join("haproxy.cfg");
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&cfg).unwrap_or_default();
            if text.contains("server 127.0.1.93_8080 127.0.1.93:8080")
                && text.contains("server 127.0.0.11_8080")
            {
                break;
            }
            assert!(
                Instant::now() < end,
                "master {i}'s HAProxy never listed both:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // The new leader's status says so, and the cooldown the old leader started holds.
    let st = r.masters[next].0.run(&["status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["cluster"]["leading"], true, "{st}");
    assert_eq!(st["cluster"]["leader"], format!("m{next}"), "{st}");
    assert!(
        st["cooldown_left_s"].as_f64().is_some_and(|c| c > 60.0),
        "{st}"
    );
    eprintln!("failover (leader SIGKILLed → next leader): {failover:?}");
}

/// etcd stops: the leader steps down and no master launches, though every master decides
/// it would (the decisions are logged as a follower's); etcd returns: one master leads and
/// launches once.
#[test]
fn no_master_launches_while_etcd_is_down() {
    let Some(mut r) = Rig::new(2, Duration::from_millis(100)) else {
        return;
    };
    r.start_all();
    let leader = r.any("Leading", Duration::from_secs(20), is_leading);
    // Every master has read the host list and reached the node before etcd goes.
    for (i, (_, p)) in r.masters.iter().enumerate() {
        let p = p.as_ref().unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        while p.matching(|v| v["msg"] == "Tunnel up").is_empty() {
            assert!(Instant::now() < end, "master {i} never reached the node");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    r.etcd.stop();
    r.any("a step-down", Duration::from_secs(10), |v| {
        v["msg"] == "Stepped down: no longer leading"
    });
    assert!(r.leading().is_empty());
    r.load(95.0);
    // Both would scale up, as followers: nothing is carried out.
    for i in 0..2 {
        let p = r.masters[i].1.as_ref().unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        while p
            .matching(|v| {
                v["msg"] == "Decision" && v["action"] == "scale_up" && v["following"] == true
            })
            .is_empty()
        {
            assert!(
                Instant::now() < end,
                "master {i} never decided to scale up as a follower: {:#?}",
                p.matching(|v| v["level"] != "DEBUG")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(
        r.launches().is_empty(),
        "launched without etcd: {:?}",
        r.launches()
    );
    r.etcd.resume();
    let end = Instant::now() + Duration::from_secs(30);
    while r.launches().is_empty() {
        assert!(Instant::now() < end, "no launch after etcd returned");
        std::thread::sleep(Duration::from_millis(50));
    }
    r.any("the launch finished", Duration::from_secs(30), |v| {
        v["msg"] == "Launch finished" && v["actor"] == "Launcher"
    });
    assert_eq!(r.launches().len(), 1, "{:?}", r.launches());
    let _ = leader;
}

/// With `[cluster]`, the host commands use etcd: add, list, remove, a second add a no-op; a
/// hosts.d of a single master moves in with `import-hosts` (idempotent, hosts.d untouched);
/// `generate` renders from etcd; with etcd down they say so and exit 69.
#[test]
fn host_commands_use_etcd_and_import_moves_hosts_d_in() {
    let Some(mut server) = EtcdServer::start() else {
        return;
    };
    let s = Sandbox::new();
    // A single master's hosts.d first.
    assert!(s.run(&["add-host", "10.0.0.5", "80"]).status.success());
    assert!(s
        .run(&["add-host", "web-2.internal", "8080", "--ssh-port", "2222"])
        .status
        .success());
    // ... and a launch in flight and the guards' history in its state directory.
    let state = s.path().join("state");
    std::fs::create_dir_all(state.join("intents")).unwrap();
    std::fs::write(state.join("intents/as-1-0a.json"), br#"{"count":1}"#).unwrap();
    std::fs::write(state.join("decider.json"), br#"{"launches_ms":[5]}"#).unwrap();
    // ... and a host it launched, whose SSH key it learnt: the other masters need that key.
    let launched = autoscaler_actors::hosts::Host::launched(
        autoscaler_actors::hosts::HostName::parse("127.0.1.44").unwrap(),
        8080,
        Some("i-0abc".into()),
    );
    std::fs::write(
        s.path().join("hosts.d").join(launched.file_name()),
        launched.to_file_text(),
    )
    .unwrap();
    crate::common::keygen(&s.path().join("node_key"));
    let node_key = std::fs::read_to_string(s.path().join("node_key.pub")).unwrap();
    let node_key = node_key
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(
        s.path().join("known_hosts"),
        format!("127.0.1.44 {node_key}\n127.0.0.9 {node_key}\n"),
    )
    .unwrap();
    s.set("cluster", "etcd_endpoints", &server.endpoint);
    s.set("cluster", "group", "cli");
    let hosts = |s: &Sandbox| crate::common::stdout(&s.run(&["list-hosts"]));
    assert_eq!(hosts(&s), "", "etcd starts empty");
    // While a master still answers here, its launch in flight is not copied.
    let running = std::os::unix::net::UnixListener::bind(s.path().join("master.sock")).unwrap();
    let out = s.run(&["import-hosts"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        crate::common::stderr(&out).contains("stop that master first"),
        "{}",
        crate::common::stderr(&out)
    );
    assert_eq!(hosts(&s), "", "nothing imported");
    drop(running);
    std::fs::remove_file(s.path().join("master.sock")).unwrap();
    let out = s.run(&["import-hosts"]);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    assert!(
        crate::common::stderr(&out).contains("added: 3")
            && crate::common::stderr(&out).contains("records: 2")
            && crate::common::stderr(&out).contains("host_keys: 1"),
        "{}",
        crate::common::stderr(&out)
    );
    let mut c = cluster(&server, Duration::from_secs(5));
    c.group = "cli".into();
    let etcd = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let e = Etcd::connect(&c, Some(c.etcd_timeout)).await.unwrap();
        (
            e.get("intents", "as-1-0a").await.unwrap(),
            e.get("", "decider").await.unwrap(),
            e.get("host_keys", "127.0.1.44_22").await.unwrap(),
        )
    });
    assert_eq!(etcd.0.as_deref(), Some(&br#"{"count":1}"#[..]));
    assert_eq!(etcd.1.as_deref(), Some(&br#"{"launches_ms":[5]}"#[..]));
    let shared: serde_json::Value = serde_json::from_slice(&etcd.2.unwrap()).unwrap();
    assert_eq!(shared["keys"], serde_json::json!([node_key]), "{shared}");
    assert_eq!(
        hosts(&s),
        "10.0.0.5 80\n127.0.1.44 8080\nweb-2.internal 8080\n"
    );
    let again = crate::common::stderr(&s.run(&["import-hosts"]));
    assert!(
        again.contains("added: 0")
            && again.contains("already_there: 3")
            && again.contains("records: 0")
            && again.contains("host_keys: 0"),
        "{again}"
    );
    assert_eq!(
        std::fs::read_dir(s.path().join("hosts.d")).unwrap().count(),
        3,
        "hosts.d kept"
    );
    let json = crate::common::stdout(&s.run(&["list-hosts", "--json"]));
    assert!(json.contains("\"ssh_port\": 2222"), "{json}");
    // Another master of the group sees the same list.
    let other = Sandbox::new();
    other.set("cluster", "etcd_endpoints", &server.endpoint);
    other.set("cluster", "group", "cli");
    assert!(other.run(&["add-host", "10.0.0.6", "80"]).status.success());
    assert!(
        crate::common::stderr(&other.run(&["add-host", "10.0.0.6", "80"]))
            .contains("already registered")
    );
    assert_eq!(
        hosts(&s),
        "10.0.0.5 80\n10.0.0.6 80\n127.0.1.44 8080\nweb-2.internal 8080\n"
    );
    assert!(s.run(&["remove-host", "10.0.0.5", "80"]).status.success());
    assert_eq!(
        s.run(&["remove-host", "10.0.0.5", "80"]).status.code(),
        Some(1)
    );
    let rendered = crate::common::stdout(&s.run(&["generate", "--output", "-", "--no-validate"]));
    assert!(
        rendered.contains("server 10.0.0.6_80 10.0.0.6:80"),
        "{rendered}"
    );
    assert!(!rendered.contains("10.0.0.5"), "{rendered}");
    // Another group is another list.
    other.set("cluster", "group", "other");
    assert_eq!(hosts(&other), "");
    // etcd down: a clear error and EX_UNAVAILABLE, nothing half-done.
    server.stop();
    let out = s.run(&["add-host", "10.0.0.7", "80"]);
    assert_fails(&out, 69, "etcd");
}

/// Two masters launching into EC2 (moto, behind the fault-injecting proxy): the floor
/// (min_nodes 1, no host) makes the leader launch; its instance is held pending and the
/// leader SIGKILLed. The other master takes over, finds the launch in etcd, waits for that
/// instance instead of launching another, and registers it once; its SSH key reaches the
/// other master's known_hosts through etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_a_killed_leaders_pending_instance_is_never_launched_twice() {
    use crate::common::ec2_proxy::Ec2Proxy;
    use crate::common::moto::{console_with_key, moto_bin, Moto};
    use autoscaler_actors::adapters::ec2::SdkEc2;
    let (Some(moto_bin), Some(_), Some(server)) =
        (moto_bin(), tool("ssh-keygen"), EtcdServer::start())
    else {
        return;
    };
    let moto = Moto::start(&moto_bin).await;
    let proxy = Ec2Proxy::start(&moto.endpoint).await;
    let first = Sandbox::new();
    crate::common::keygen(&first.path().join("instance_host_key"));
    let host_key = std::fs::read_to_string(first.path().join("instance_host_key.pub")).unwrap();
    proxy.set_console(None, &console_with_key(&host_key));
    let masters: Vec<Sandbox> = (0..2).map(|_| Sandbox::new()).collect();
    for (i, s) in masters.iter().enumerate() {
        for f in ["id_ed25519", "id_ed25519.pub", "report.key"] {
            std::fs::copy(first.path().join(f), s.path().join(f)).unwrap();
        }
        s.set_all(&crate::common::floor_master());
        s.set_all(&[
            ("cluster", "etcd_endpoints", server.endpoint.clone()),
            ("cluster", "group", "ec2".into()),
            ("cluster", "name", format!("m{i}")),
            ("cluster", "lease_ttl", "2s".into()),
            ("cluster", "etcd_timeout", "1s".into()),
        ]);
        s.set_all(&crate::common::moto::ec2_settings(
            &proxy.endpoint,
            &moto.subnet,
            "cluster",
        ));
    }
    let mut direct_cfg = Config::load(&masters[0].config()).unwrap();
    direct_cfg.aws.endpoint = moto.endpoint.clone();
    let direct = SdkEc2::new(&direct_cfg.aws, &direct_cfg.launch, None)
        .await
        .unwrap();
    let live = || crate::common::moto::live_instances(&direct);
    proxy.hold_pending(true);
    let mut procs: Vec<Option<MasterProc>> = masters
        .iter()
        .map(|s| Some(MasterProc::spawn(&s.config(), &[])))
        .collect();
    // Whoever leads launches for the floor; its instance stays pending.
    let end = Instant::now() + Duration::from_secs(30);
    while proxy.count("RunInstances") == 0 {
        assert!(Instant::now() < end, "no launch for the floor");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leader = procs
        .iter()
        .position(|p| {
            p.as_ref()
                .is_some_and(|p| !p.matching(|v| v["msg"] == "Launching").is_empty())
        })
        .expect("the leader logged its launch");
    let created = {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let l = live().await;
            if !l.is_empty() || Instant::now() > end {
                break l;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(created.len(), 1);
    procs[leader].take().unwrap().kill();
    let other = 1 - leader;
    let p = procs[other].as_ref().unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while p
        .matching(|v| v["msg"] == "Resuming a launch of an earlier run")
        .is_empty()
    {
        assert!(
            Instant::now() < end,
            "the next leader never resumed the launch"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(live().await, created, "not launched again while pending");
    proxy.hold_pending(false);
    let end = Instant::now() + Duration::from_secs(40);
    loop {
        let out = masters[other].run(&["list-hosts", "--json"]);
        let hosts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let ids: Vec<String> = hosts
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["instance_id"].as_str().map(String::from))
            .collect();
        if ids == created {
            break;
        }
        assert!(Instant::now() < end, "never registered: {hosts}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(live().await, created, "one instance in all");
    assert_eq!(proxy.count("RunInstances"), 1, "RunInstances called once");
    // The instance's SSH key, learnt by the new leader from the console, is in its
    // known_hosts (shared through etcd for the others).
    let kh = std::fs::read_to_string(masters[other].path().join("known_hosts")).unwrap_or_default();
    let key_b64 = host_key.split_whitespace().nth(1).unwrap();
    assert!(kh.contains(key_b64), "{kh}");
    drop(procs);
}

/// How the leader is lost.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// SIGKILL of its process.
    Killed,
    /// Its connections to etcd cut (a partition; the process and its tunnels stay).
    Partitioned,
    /// Its packets to etcd dropped, nothing closed: only its own step-down timer can tell.
    BlackHoled,
}

/// Two masters, master 0 leads (its etcd connection runs through a [`Cut`]). The node is hot
/// in what it reports to both, but master 0 looks at a longer window (8 s, or four TTLs, against 2 s), so
/// the leader holds while the follower's window already says "scale up". The leader is lost:
/// master 1 leads and acts on the hot node after the old lease (not before half the TTL,
/// within the TTL plus one window), and one instance is launched. A partitioned leader, whose
/// own window fills while it is cut off, decides only as a follower. Returns the time from the
/// loss to master 1's first acting decision.
fn hot_node_acted_on_after_the_leader_is_lost(how: Loss) -> Option<Duration> {
    use crate::common::cut::Cut;
    let mut r = Rig::new(2, Duration::from_millis(100))?;
    // benches/failover.sh measures other leases through this variable; the suite runs 2 s.
    let ttl = Duration::from_secs(
        std::env::var("AUTOSCALER_FAILOVER_LEASE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2),
    );
    let window = Duration::from_secs(2);
    // The leader's window outlasts its step-down (two thirds of the TTL) by far: it holds
    // while it leads.
    let leader_window = (ttl * 4).max(Duration::from_secs(8));
    let proxy = Cut::to(r.etcd.endpoint.trim_start_matches("http://"));
    r.masters[0].0.set(
        "cluster",
        "etcd_endpoints",
        &format!("http://{}", proxy.addr),
    );
    r.masters[0].0.set(
        "scaling",
        "scale_up_window",
        &format!("{}s", leader_window.as_secs()),
    );
    for (m, _) in &r.masters {
        m.set("cluster", "lease_ttl", &format!("{}s", ttl.as_secs()));
    }
    r.start(0);
    r.any("Leading", Duration::from_secs(20), is_leading);
    r.start(1);
    // Master 1 reaches the node before the load starts: its window, not its start-up, is
    // what the leader's longer one must outlast.
    r.masters[1]
        .1
        .as_ref()
        .unwrap()
        .logged_blocking("Tunnel up", |v| v["msg"] == "Tunnel up");
    r.load(95.0);
    // The follower would scale up; the leader holds.
    let follower = r.masters[1].1.as_ref().unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while follower
        .matching(|v| v["msg"] == "Decision" && v["action"] == "scale_up")
        .is_empty()
    {
        assert!(Instant::now() < end, "master 1 never decided, following");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(r.leading(), vec![0]);
    assert!(r.launches().is_empty(), "{:?}", r.launches());

    // benches/failover.sh: the loss at a random point of the leader's renewal cycle (here it
    // falls at the same point each run, as the follower's first decision does).
    if std::env::var_os("AUTOSCALER_FAILOVER_JITTER").is_some() {
        let cycle = (ttl / 3).as_millis() as u64;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
        std::thread::sleep(Duration::from_millis(nanos % cycle));
    }
    let lost = Instant::now();
    match how {
        Loss::Killed => r.kill(0),
        Loss::Partitioned => proxy.cut(),
        Loss::BlackHoled => proxy.black_hole(),
    }
    let acting = |v: &serde_json::Value| {
        v["msg"] == "Decision" && v["action"] == "scale_up" && v["following"].is_null()
    };
    let end = lost + ttl + window + Duration::from_secs(15);
    let took = loop {
        let follower = r.masters[1].1.as_ref().unwrap();
        if !follower.matching(acting).is_empty() {
            break lost.elapsed();
        }
        assert!(
            Instant::now() < end,
            "master 1 never acted after the leader was {how:?}: {:#?}",
            follower.matching(|v| v["level"] != "DEBUG")
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // Polled every 20 ms; etcd's revocation (every 500 ms, through raft), the campaign, the
    // next tick and scheduling on a loaded machine (debug builds, the suite beside) get four
    // seconds. Not before the old lease can have expired: it was renewed at most a third of
    // the TTL before the loss (half, allowing for a late keepalive).
    assert!(
        took <= ttl + window + Duration::from_secs(4) && took >= ttl / 2,
        "acted {took:?} after the leader was {how:?}"
    );
    if let Loss::Partitioned | Loss::BlackHoled = how {
        // The cut-off leader stepped down on its own; its own window filled while cut off,
        // and it decided as a follower, never acting.
        let old = r.masters[0].1.as_ref().unwrap();
        let end = Instant::now() + leader_window + Duration::from_secs(12);
        while old
            .matching(|v| v["msg"] == "Decision" && v["action"] == "scale_up")
            .is_empty()
        {
            assert!(
                Instant::now() < end,
                "the cut-off leader's window never filled: {:#?}",
                old.matching(|v| v["level"] != "DEBUG")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!old
            .matching(|v| v["msg"] == "Stepped down: no longer leading")
            .is_empty());
        assert!(
            old.matching(acting).is_empty(),
            "the cut-off leader acted: {:#?}",
            old.matching(acting)
        );
        proxy.heal();
    }
    let end = Instant::now() + Duration::from_secs(30);
    while r.launches().is_empty() {
        assert!(Instant::now() < end, "no launch");
        std::thread::sleep(Duration::from_millis(50));
    }
    r.any("the launch finished", Duration::from_secs(30), |v| {
        v["msg"] == "Launch finished" && v["actor"] == "Launcher"
    });
    assert_eq!(r.launches().len(), 1, "{:?}", r.launches());
    if let Loss::Partitioned | Loss::BlackHoled = how {
        // Back in touch with etcd, the old leader follows: one leader.
        std::thread::sleep(ttl);
        assert_eq!(r.leading(), vec![1]);
    }
    Some(took)
}

/// The leader's process is SIGKILLed while a node is hot.
#[test]
fn a_hot_node_is_acted_on_after_the_leader_is_killed() {
    // None: skipped for a missing tool (a failure under the test command).
    if let Some(took) = hot_node_acted_on_after_the_leader_is_lost(Loss::Killed) {
        eprintln!(
            "failover to an acting decision (leader killed): {:.3}s",
            took.as_secs_f64()
        );
    }
}

/// The leader is cut off from etcd while a node is hot: it steps down, the other acts.
#[test]
fn a_hot_node_is_acted_on_after_the_leader_is_partitioned_from_etcd() {
    if let Some(took) = hot_node_acted_on_after_the_leader_is_lost(Loss::Partitioned) {
        eprintln!(
            "failover to an acting decision (leader partitioned): {:.3}s",
            took.as_secs_f64()
        );
    }
}

/// The leader's packets to etcd are dropped, and nothing is closed (a black hole): no stream
/// ends, so only its step-down timer can make it stop; the other acts.
#[test]
fn a_hot_node_is_acted_on_after_the_leader_falls_into_a_black_hole() {
    if let Some(took) = hot_node_acted_on_after_the_leader_is_lost(Loss::BlackHoled) {
        eprintln!(
            "failover to an acting decision (leader black-holed): {:.3}s",
            took.as_secs_f64()
        );
    }
}

/// etcd as its operators run it: TLS with client certificates, and auth with a password. The
/// host commands work with the right `[cluster]` settings; without the client certificate,
/// or with a wrong password, they fail with exit 69 and a message naming etcd, and the
/// password never appears in what they print.
#[test]
fn etcd_over_tls_with_a_client_certificate_and_with_a_password() {
    use crate::common::etcd::Certs;
    let Some(certs) = Certs::make() else {
        return;
    };
    let Some(server) = EtcdServer::start_tls(&certs) else {
        return;
    };
    assert!(server.endpoint.starts_with("https://127.0.0.1:"));
    let s = Sandbox::new();
    s.set("cluster", "etcd_endpoints", &server.endpoint);
    s.set("cluster", "etcd_timeout", "3s");
    s.set(
        "cluster",
        "etcd_ca_file",
        certs.path("ca.pem").to_str().unwrap(),
    );
    // Without a client certificate, etcd (--client-cert-auth) refuses the connection.
    let out = s.run(&["add-host", "10.0.0.5", "80"]);
    assert_fails(&out, 69, "etcd");
    s.set(
        "cluster",
        "etcd_cert_file",
        certs.path("client.pem").to_str().unwrap(),
    );
    s.set(
        "cluster",
        "etcd_key_file",
        certs.path("client.key").to_str().unwrap(),
    );
    let out = s.run(&["add-host", "10.0.0.5", "80"]);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    assert_eq!(
        crate::common::stdout(&s.run(&["list-hosts"])),
        "10.0.0.5 80\n"
    );
    drop(server);

    // Auth: a root user with a password, auth enabled.
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let c = cluster(&server, Duration::from_secs(5));
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut client = Etcd::connect(&c, Some(c.etcd_timeout))
            .await
            .unwrap()
            .client();
        client.user_add("root", "s3cret-pw", None).await.unwrap();
        client.user_grant_role("root", "root").await.unwrap();
        client.auth_enable().await.unwrap();
    });
    let s = Sandbox::new();
    s.set("cluster", "etcd_endpoints", &server.endpoint);
    s.set("cluster", "etcd_timeout", "3s");
    let out = s.run(&["add-host", "10.0.0.6", "80"]);
    assert_eq!(
        out.status.code(),
        Some(69),
        "no user: {}",
        crate::common::stderr(&out)
    );
    let pw = s.path().join("etcd.password");
    std::fs::write(&pw, "wrong-pw\n").unwrap();
    s.set("cluster", "etcd_user", "root");
    s.set("cluster", "etcd_password_file", pw.to_str().unwrap());
    // A password file others may read is refused before it is used: a configuration error.
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = s.run(&["add-host", "10.0.0.6", "80"]);
    assert_fails(&out, 78, "chmod 600");
    let check = s.run(&["check"]);
    assert_eq!(check.status.code(), Some(78));
    assert!(
        crate::common::stderr(&check).contains("[cluster] etcd_password_file"),
        "{}",
        crate::common::stderr(&check)
    );
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = s.run(&["add-host", "10.0.0.6", "80"]);
    let err = assert_fails(&out, 69, "etcd");
    assert!(!err.contains("wrong-pw"), "{err}");
    std::fs::write(&pw, "s3cret-pw\n").unwrap();
    let out = s.run(&["add-host", "10.0.0.6", "80"]);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    assert_eq!(
        crate::common::stdout(&s.run(&["list-hosts"])),
        "10.0.0.6 80\n"
    );
    let check = s.run(&["check"]);
    let all = format!(
        "{}{}",
        crate::common::stdout(&check),
        crate::common::stderr(&check)
    );
    assert!(!all.contains("s3cret-pw"), "{all}");
}

/// EC2 lists a new instance only after a while (here: until the next leader has asked
/// again), and the leader is SIGKILLed right
/// after its RunInstances went through. The next leader finds the launch record with no
/// instance to see, and asks again with the record's ClientToken: EC2 answers with the first
/// call's instance and launches nothing. One token, one RunInstances that created an
/// instance, one live instance, registered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_an_instance_ec2_does_not_list_yet_is_asked_for_with_its_token() {
    use crate::common::ec2_proxy::Ec2Proxy;
    use crate::common::moto::{console_with_key, moto_bin, Moto};
    use autoscaler_actors::adapters::ec2::SdkEc2;
    let (Some(moto_bin), Some(_), Some(server)) =
        (moto_bin(), tool("ssh-keygen"), EtcdServer::start())
    else {
        return;
    };
    let moto = Moto::start(&moto_bin).await;
    let proxy = Ec2Proxy::start(&moto.endpoint).await;
    let first = Sandbox::new();
    crate::common::keygen(&first.path().join("instance_host_key"));
    let host_key = std::fs::read_to_string(first.path().join("instance_host_key.pub")).unwrap();
    proxy.set_console(None, &console_with_key(&host_key));
    proxy.hide_new_instances();
    let masters: Vec<Sandbox> = (0..2).map(|_| Sandbox::new()).collect();
    for (i, s) in masters.iter().enumerate() {
        for f in ["id_ed25519", "id_ed25519.pub", "report.key"] {
            std::fs::copy(first.path().join(f), s.path().join(f)).unwrap();
        }
        s.set_all(&crate::common::floor_master());
        s.set_all(&[
            ("cluster", "etcd_endpoints", server.endpoint.clone()),
            ("cluster", "group", "token".into()),
            ("cluster", "name", format!("m{i}")),
            ("cluster", "lease_ttl", "2s".into()),
            ("cluster", "etcd_timeout", "1s".into()),
        ]);
        s.set_all(&crate::common::moto::ec2_settings(
            &proxy.endpoint,
            &moto.subnet,
            "token",
        ));
    }
    let mut direct_cfg = Config::load(&masters[0].config()).unwrap();
    direct_cfg.aws.endpoint = moto.endpoint.clone();
    let direct = SdkEc2::new(&direct_cfg.aws, &direct_cfg.launch, None)
        .await
        .unwrap();
    let mut procs: Vec<Option<MasterProc>> = masters
        .iter()
        .map(|s| Some(MasterProc::spawn(&s.config(), &[])))
        .collect();
    let end = Instant::now() + Duration::from_secs(30);
    while proxy.forwarded("RunInstances") == 0 {
        assert!(Instant::now() < end, "no launch for the floor");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leader = procs
        .iter()
        .position(|p| {
            p.as_ref()
                .is_some_and(|p| !p.matching(|v| v["msg"] == "Launching").is_empty())
        })
        .expect("the leader logged its launch");
    procs[leader].take().unwrap().kill();
    let other = 1 - leader;
    // The instance stays hidden until the next leader has asked again with the token.
    procs[other]
        .as_ref()
        .unwrap()
        .logged("the next leader's ask with the token", |v| {
            v["msg"] == "Pending launch shows no instance yet; asking again with its ClientToken"
        })
        .await;
    proxy.show_new_instances();
    let end = Instant::now() + Duration::from_secs(40);
    let registered = loop {
        let out = masters[other].run(&["list-hosts", "--json"]);
        let hosts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let ids: Vec<String> = hosts
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["instance_id"].as_str().map(String::from))
            .collect();
        if !ids.is_empty() {
            break ids;
        }
        assert!(Instant::now() < end, "never registered: {hosts}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Whatever was launched shows by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let live = crate::common::moto::live_instances(&direct).await;
    assert_eq!(live.len(), 1, "one live instance: {live:?}");
    assert_eq!(
        proxy.tokens().len(),
        1,
        "one ClientToken: {:?}",
        proxy.tokens()
    );
    assert_eq!(
        proxy.forwarded("RunInstances"),
        1,
        "one RunInstances created an instance"
    );
    assert!(proxy.count("RunInstances") >= 2, "it was asked again");
    assert_eq!(registered, live, "registered once");
    let p = procs[other].as_ref().unwrap();
    assert!(
        !p.matching(|v| v["msg"]
            == "Pending launch shows no instance yet; asking again with its ClientToken")
            .is_empty(),
        "the next leader asked again with the token"
    );
    drop(procs);
}

/// The same, with the next leader configured with another instance type: EC2 refuses its
/// repeat of the token (IdempotentParameterMismatch). The next leader neither drops the launch
/// nor undoes it: it waits until EC2 lists the first call's instance and registers it. One
/// RunInstances that created an instance, one live instance, registered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_a_repeat_with_other_settings_takes_up_the_first_instance() {
    use crate::common::ec2_proxy::Ec2Proxy;
    use crate::common::moto::{console_with_key, moto_bin, Moto};
    use autoscaler_actors::adapters::ec2::SdkEc2;
    let (Some(moto_bin), Some(_), Some(server)) =
        (moto_bin(), tool("ssh-keygen"), EtcdServer::start())
    else {
        return;
    };
    let moto = Moto::start(&moto_bin).await;
    let proxy = Ec2Proxy::start(&moto.endpoint).await;
    let first = Sandbox::new();
    crate::common::keygen(&first.path().join("instance_host_key"));
    let host_key = std::fs::read_to_string(first.path().join("instance_host_key.pub")).unwrap();
    proxy.set_console(None, &console_with_key(&host_key));
    proxy.hide_new_instances();
    let masters: Vec<Sandbox> = (0..2).map(|_| Sandbox::new()).collect();
    for (i, s) in masters.iter().enumerate() {
        for f in ["id_ed25519", "id_ed25519.pub", "report.key"] {
            std::fs::copy(first.path().join(f), s.path().join(f)).unwrap();
        }
        s.set_all(&crate::common::floor_master());
        s.set_all(&[
            ("cluster", "etcd_endpoints", server.endpoint.clone()),
            ("cluster", "group", "mismatch".into()),
            ("cluster", "name", format!("m{i}")),
            ("cluster", "lease_ttl", "2s".into()),
            ("cluster", "etcd_timeout", "1s".into()),
        ]);
        s.set_all(&crate::common::moto::ec2_settings(
            &proxy.endpoint,
            &moto.subnet,
            "mismatch",
        ));
        s.set("launch", "instance_type", ["t3.micro", "t3.small"][i]);
    }
    let mut direct_cfg = Config::load(&masters[0].config()).unwrap();
    direct_cfg.aws.endpoint = moto.endpoint.clone();
    let direct = SdkEc2::new(&direct_cfg.aws, &direct_cfg.launch, None)
        .await
        .unwrap();
    let mut procs: Vec<Option<MasterProc>> = masters
        .iter()
        .map(|s| Some(MasterProc::spawn(&s.config(), &[])))
        .collect();
    let end = Instant::now() + Duration::from_secs(30);
    while proxy.forwarded("RunInstances") == 0 {
        assert!(Instant::now() < end, "no launch for the floor");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leader = procs
        .iter()
        .position(|p| {
            p.as_ref()
                .is_some_and(|p| !p.matching(|v| v["msg"] == "Launching").is_empty())
        })
        .expect("the leader logged its launch");
    procs[leader].take().unwrap().kill();
    let other = 1 - leader;
    // The instance stays hidden until EC2 has refused the next leader's repeat.
    procs[other]
        .as_ref()
        .unwrap()
        .logged("EC2's refusal of the next leader's repeat", |v| {
            v["msg"].as_str().is_some_and(|m| {
                m.starts_with("EC2 already launched this decision with other settings")
            })
        })
        .await;
    proxy.show_new_instances();
    let end = Instant::now() + Duration::from_secs(40);
    let registered = loop {
        let out = masters[other].run(&["list-hosts", "--json"]);
        let hosts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let ids: Vec<String> = hosts
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["instance_id"].as_str().map(String::from))
            .collect();
        if !ids.is_empty() {
            break ids;
        }
        assert!(Instant::now() < end, "never registered: {hosts}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Whatever was launched shows by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let live = crate::common::moto::live_instances(&direct).await;
    assert_eq!(live.len(), 1, "one live instance: {live:?}");
    assert_eq!(proxy.tokens().len(), 1, "{:?}", proxy.tokens());
    assert_eq!(
        proxy.forwarded("RunInstances"),
        1,
        "one RunInstances created an instance"
    );
    assert_eq!(registered, live, "registered once");
    let p = procs[other].as_ref().unwrap();
    assert!(
        !p.matching(|v| v["msg"].as_str().is_some_and(
            |m| m.starts_with("EC2 already launched this decision with other settings")
        ))
        .is_empty(),
        "{:#?}",
        p.matching(|v| v["level"] != "DEBUG")
    );
    assert_eq!(proxy.count("TerminateInstances"), 0);
    drop(procs);
}

/// Lost leadership in the middle of an EC2 launch is not a failed launch either. The leader's
/// instance is pending (held by the proxy) when its election key is deleted — what a guarded
/// write meets when another master leads: it steps down, terminates nothing and keeps the
/// launch record; leading again, it resumes that launch and registers the one instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_a_launch_cut_short_by_lost_leadership_terminates_nothing() {
    use crate::common::ec2_proxy::Ec2Proxy;
    use crate::common::moto::{console_with_key, moto_bin, Moto};
    use autoscaler_actors::adapters::ec2::SdkEc2;
    let (Some(moto_bin), Some(_), Some(server)) =
        (moto_bin(), tool("ssh-keygen"), EtcdServer::start())
    else {
        return;
    };
    let moto = Moto::start(&moto_bin).await;
    let proxy = Ec2Proxy::start(&moto.endpoint).await;
    let s = Sandbox::new();
    crate::common::keygen(&s.path().join("instance_host_key"));
    let host_key = std::fs::read_to_string(s.path().join("instance_host_key.pub")).unwrap();
    proxy.set_console(None, &console_with_key(&host_key));
    s.set_all(&crate::common::floor_master());
    s.set_all(&[
        ("cluster", "etcd_endpoints", server.endpoint.clone()),
        ("cluster", "group", "lost".into()),
        ("cluster", "name", "m0".into()),
        ("cluster", "lease_ttl", "2s".into()),
        ("cluster", "etcd_timeout", "1s".into()),
    ]);
    s.set_all(&crate::common::moto::ec2_settings(
        &proxy.endpoint,
        &moto.subnet,
        "lost",
    ));
    let cfg = Config::load(&s.config()).unwrap();
    let mut direct_cfg = cfg.clone();
    direct_cfg.aws.endpoint = moto.endpoint.clone();
    let direct = SdkEc2::new(&direct_cfg.aws, &direct_cfg.launch, None)
        .await
        .unwrap();
    let live = || crate::common::moto::live_instances(&direct);
    proxy.hold_pending(true);
    let p = MasterProc::spawn(&s.config(), &[]);
    let end = Instant::now() + Duration::from_secs(30);
    let created = loop {
        let l = live().await;
        if !l.is_empty() {
            break l;
        }
        assert!(Instant::now() < end, "no launch for the floor");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The launch waits for its pending instance: the election key goes.
    let etcd = Etcd::connect(&cfg.cluster, Some(Duration::from_secs(2)))
        .await
        .unwrap();
    let mut client = etcd.client();
    let head = client.leader(etcd.election()).await.unwrap();
    client
        .delete(head.kv().unwrap().key().to_vec(), None)
        .await
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while p
        .matching(|v| v["msg"] == "Stepped down: no longer leading")
        .is_empty()
    {
        assert!(Instant::now() < end, "never stepped down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Leading again (nobody else campaigns), it resumes the launch once the instance runs.
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.hold_pending(false);
    let end = Instant::now() + Duration::from_secs(40);
    let registered = loop {
        let out = s.run(&["list-hosts", "--json"]);
        let hosts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let ids: Vec<String> = hosts
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["instance_id"].as_str().map(String::from))
            .collect();
        if !ids.is_empty() {
            break ids;
        }
        assert!(Instant::now() < end, "never registered: {hosts}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        proxy.count("TerminateInstances"),
        0,
        "an instance was terminated"
    );
    assert!(
        p.matching(
            |v| v["msg"] == "Launch failed" || v["msg"] == "Terminated instance of a failed launch"
        )
        .is_empty(),
        "{:#?}",
        p.matching(|v| v["level"] != "DEBUG")
    );
    assert_eq!(registered, created, "the first instance registered");
    assert_eq!(live().await, created, "one instance in all");
    assert_eq!(proxy.forwarded("RunInstances"), 1);
}

/// Lost leadership is not a failed launch. While the leader's scale-up command runs, its
/// election key is deleted (the refusal a guarded write gets when another master leads): it
/// steps down at once, stops the launch and undoes nothing — no scale-down command — and the
/// launch is finished from its record (here by the same master, leading again).
#[test]
fn a_launch_cut_short_by_lost_leadership_undoes_nothing() {
    let Some(mut r) = Rig::new(1, Duration::from_secs(3)) else {
        return;
    };
    let downs = r.shared.path().join("downs.log");
    let down = r.shared.path().join("down.sh");
    std::fs::write(
        &down,
        format!(
            "#!/bin/sh\necho \"$AUTOSCALER_HOST\" >> {}\n",
            downs.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&down, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    r.masters[0]
        .0
        .set("launch", "scale_down_command", &down.display().to_string());
    r.start_all();
    r.any("Leading", Duration::from_secs(20), is_leading);
    r.load(95.0);
    let end = Instant::now() + Duration::from_secs(30);
    while r.launches().is_empty() {
        assert!(Instant::now() < end, "no launch");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The command runs: the election key goes.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use autoscaler_actors::adapters::etcd::Etcd;
        let cfg = Config::load(&r.masters[0].0.config()).unwrap();
        let etcd = Etcd::connect(&cfg.cluster, Some(Duration::from_secs(2)))
            .await
            .unwrap();
        let mut client = etcd.client();
        let head = client.leader(etcd.election()).await.unwrap();
        let key = head.kv().unwrap().key().to_vec();
        client.delete(key, None).await.unwrap();
    });
    let p = r.masters[0].1.as_ref().unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while p
        .matching(|v| v["msg"] == "Stepped down: no longer leading")
        .is_empty()
    {
        assert!(Instant::now() < end, "never stepped down");
        std::thread::sleep(Duration::from_millis(50));
    }
    r.any("the launch finished", Duration::from_secs(40), |v| {
        v["msg"] == "Launch finished" && v["actor"] == "Launcher"
    });
    assert!(
        !downs.exists(),
        "the scale-down command ran: {}",
        std::fs::read_to_string(&downs).unwrap_or_default()
    );
    assert!(p
        .matching(
            |v| v["msg"] == "Launch failed" || v["msg"] == "Terminated instance of a failed launch"
        )
        .is_empty());
    let out = r.masters[0].0.run(&["list-hosts", "--json"]);
    let hosts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let launched = hosts
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["origin"] == "launched")
        .count();
    assert_eq!(launched, 1, "{hosts}");
}

/// etcd out of reach for a moment in the middle of a launch, while this master's lead holds
/// (its election is elsewhere; here the launcher's and the registry's connections alone go
/// through the cut): the launch's record and registration are tried again until etcd
/// answers. The launch is not counted as failed: no scale-down command, the host registered.
#[actix_rt::test]
async fn an_etcd_blip_in_the_middle_of_a_launch_undoes_nothing() {
    use crate::common::cut::Cut;
    use autoscaler_actors::adapters::host_store::HostStore;
    use autoscaler_actors::adapters::records::Records;
    use autoscaler_actors::config::CommandLine;
    use autoscaler_actors::master::decider::LaunchFinished;
    use autoscaler_actors::master::launcher::command::CommandProvisioner;
    use autoscaler_actors::master::launcher::{
        LaunchInstances, LaunchSettings, Launcher, LauncherOutputs, Provisioner,
    };
    use autoscaler_actors::master::registry::HostRegistry;
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let direct = cluster(&server, Duration::from_secs(60));
    let proxy = Cut::to(server.endpoint.trim_start_matches("http://"));
    let mut through = direct.clone();
    through.etcd_endpoints = vec![format!("http://{}", proxy.addr)];
    through.etcd_timeout = Duration::from_secs(1);
    // The lead, taken directly (not through the cut).
    let etcd = Etcd::connect(&direct, Some(Duration::from_secs(2)))
        .await
        .unwrap();
    let mut client = etcd.client();
    let lease = client.lease_grant(60, None).await.unwrap().id();
    let won = client.campaign(etcd.election(), "m1", lease).await.unwrap();
    let key = won.leader().unwrap().clone();
    let lead: LeadCell = Arc::new(std::sync::RwLock::new(Some(Lead {
        key: key.key().to_vec(),
        rev: key.rev(),
        lease,
        valid_until: Instant::now() + Duration::from_secs(3600),
    })));
    let cut_etcd = Etcd::connect(&through, Some(through.etcd_timeout))
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        CommandLine(vec![p.display().to_string()])
    };
    let downs = tmp.path().join("downs.log");
    // The command says it started, then prints its host once told to go (its 20 s timeout
    // bounds the wait).
    let (started, go) = (tmp.path().join("started"), tmp.path().join("go"));
    let up = write(
        "up.sh",
        &format!(
            "touch {}; i=0; while [ ! -e {} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n\
             echo '{{\"host\": \"127.0.1.94\", \"port\": 8080}}'",
            started.display(),
            go.display()
        ),
    );
    let down = write(
        "down.sh",
        &format!("echo \"$AUTOSCALER_HOST\" >> {}", downs.display()),
    );
    let log = crate::common::LogBuf::default();
    let registry = HostRegistry::over(
        HostStore::Etcd {
            etcd: cut_etcd.clone(),
            lead: Some(lead.clone()),
        },
        vec![],
        Duration::from_millis(200),
        &log.logger(),
    )
    .start();
    let (tx, mut finished) = mpsc::unbounded_channel();
    let sink = Finished(tx).start();
    let mut cfg = Config::defaults(&Layout::for_dir(tmp.path()), Role::Master);
    cfg.general.state_dir = tmp.path().join("state");
    cfg.launch.app_port = 8080;
    cfg.launch.health_check = false;
    cfg.launch.learn_host_keys = false;
    let settings = LaunchSettings {
        retry_base: Duration::from_millis(100),
        ..LaunchSettings::from_config(&cfg)
    };
    let launcher = Launcher::new(
        Provisioner::Command(CommandProvisioner {
            up,
            down,
            timeout: Duration::from_secs(20),
            env: vec![],
            secret: None,
        }),
        settings,
        LauncherOutputs {
            register: registry.clone().recipient(),
            deregister: registry.clone().recipient(),
            list: registry.recipient(),
            finished: sink.clone().recipient(),
            reconciled: sink.recipient(),
            drained: None,
        },
        &log.logger(),
    )
    .with_records(Records::Etcd {
        etcd: cut_etcd,
        lead,
    })
    .start();
    launcher.do_send(LaunchInstances {
        count: 1,
        decision_id: "as-blip".into(),
    });
    // etcd is cut off while the command runs (its record written before it starts), and
    // until the launch's next write has failed.
    let end = Instant::now() + Duration::from_secs(20);
    while !started.exists() {
        assert!(
            Instant::now() < end,
            "the command never ran: {}",
            log.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.cut();
    std::fs::write(&go, "").unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while !log.text().contains("etcd did not take the launch's write") {
        assert!(Instant::now() < end, "no failed write: {}", log.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.heal();
    let done: LaunchFinished = tokio::time::timeout(Duration::from_secs(30), finished.recv())
        .await
        .unwrap_or_else(|_| panic!("no end of the launch: {}", log.text()))
        .unwrap();
    assert_eq!(done.error, None, "{}", log.text());
    assert_eq!(done.registered.len(), 1);
    assert!(
        log.text().contains("etcd did not take the launch's write"),
        "{}",
        log.text()
    );
    assert!(
        !downs.exists(),
        "the scale-down command ran: {}",
        std::fs::read_to_string(&downs).unwrap_or_default()
    );
    let hosts = etcd.list("hosts").await.unwrap();
    assert_eq!(hosts.len(), 1, "registered in etcd");
    assert!(etcd.list("intents").await.unwrap().is_empty(), "settled");
}

/// Stands in for the decider: what the launcher says it finished.
struct Finished(mpsc::UnboundedSender<autoscaler_actors::master::decider::LaunchFinished>);
impl Actor for Finished {
    type Context = Context<Self>;
}
impl Handler<autoscaler_actors::master::decider::LaunchFinished> for Finished {
    type Result = ();
    fn handle(
        &mut self,
        m: autoscaler_actors::master::decider::LaunchFinished,
        _: &mut Context<Self>,
    ) {
        let _ = self.0.send(m);
    }
}
impl Handler<autoscaler_actors::master::decider::Reconciled> for Finished {
    type Result = ();
    fn handle(&mut self, _: autoscaler_actors::master::decider::Reconciled, _: &mut Context<Self>) {
    }
}

/// A leader stopped (SIGSTOP: a paused VM) for longer than its lease while its scale-up
/// command runs, its node hot; the other master leads and finishes that launch from its
/// record. The old leader wakes (SIGCONT): it sees at once that its lead ran out, registers
/// nothing, cleans up nothing. One launch in all.
#[test]
fn a_leader_that_wakes_after_its_lease_does_nothing() {
    let Some(mut r) = Rig::new(2, Duration::from_secs(2)) else {
        return;
    };
    let downs = r.shared.path().join("downs.log");
    let down = r.shared.path().join("down.sh");
    std::fs::write(
        &down,
        format!(
            "#!/bin/sh\necho \"$AUTOSCALER_HOST\" >> {}\n",
            downs.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&down, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for (s, _) in &r.masters {
        s.set("launch", "scale_down_command", &down.display().to_string());
    }
    r.start_all();
    let leader = r.any("Leading", Duration::from_secs(20), is_leading);
    r.load(95.0);
    let end = Instant::now() + Duration::from_secs(30);
    while r.launches().is_empty() {
        assert!(Instant::now() < end, "no launch");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = r.masters[leader]
        .1
        .as_ref()
        .unwrap()
        .proc
        .0
        .id()
        .to_string();
    let signal = |sig: &str| {
        let st = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(st.success());
    };
    signal("-STOP");
    let other = 1 - leader;
    let o = r.masters[other].1.as_ref().unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while o
        .matching(|v| v["msg"] == "Launch finished" && v["actor"] == "Launcher")
        .is_empty()
    {
        if Instant::now() > end {
            signal("-CONT");
            panic!("the other master never finished the launch");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signal("-CONT");
    // Awake: it steps down, and does nothing about the launch it was carrying out.
    let old = r.masters[leader].1.as_ref().unwrap();
    let end = Instant::now() + Duration::from_secs(15);
    while old
        .matching(|v| v["msg"] == "Stepped down: no longer leading")
        .is_empty()
    {
        assert!(Instant::now() < end, "the old leader never stepped down");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !downs.exists(),
        "a clean-up ran: {}",
        std::fs::read_to_string(&downs).unwrap_or_default()
    );
    assert!(
        old.matching(|v| v["msg"] == "Launch failed" || v["msg"] == "Registered host")
            .is_empty(),
        "{:#?}",
        old.matching(|v| v["level"] != "DEBUG")
    );
    let runs = r.launches();
    assert!(runs.iter().all(|d| *d == runs[0]), "one decision: {runs:?}");
    let out = r.masters[other].0.run(&["list-hosts", "--json"]);
    let hosts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let launched = hosts
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["origin"] == "launched")
        .count();
    assert_eq!(launched, 1, "{hosts}");
}

/// Stands in for the launcher: counts what the decider asks for.
struct Launches(mpsc::UnboundedSender<String>);
impl Actor for Launches {
    type Context = Context<Self>;
}
impl Handler<autoscaler_actors::master::launcher::LaunchInstances> for Launches {
    type Result = ();
    fn handle(
        &mut self,
        m: autoscaler_actors::master::launcher::LaunchInstances,
        _: &mut Context<Self>,
    ) {
        let _ = self.0.send(m.decision_id);
    }
}
impl Handler<autoscaler_actors::master::launcher::DrainHost> for Launches {
    type Result = ();
    fn handle(&mut self, _: autoscaler_actors::master::launcher::DrainHost, _: &mut Context<Self>) {
    }
}

/// A new leader that cannot read the last leader's memory (cooldowns, the hourly cap) does
/// not act without it: with etcd away when it starts leading, a hot node gets no launch; once
/// the memory reads, the cooldown the last leader started holds.
#[actix_rt::test]
async fn a_new_leader_acts_only_after_reading_the_guards() {
    new_leader_reads_the_guards(true).await;
}

/// The same with no memory in etcd (no leader ever scaled): what the new leader decided as a
/// follower while it could not read (logged, not carried out) starts no cooldown of its own;
/// once the memory reads, it acts on the hot node.
#[actix_rt::test]
async fn what_a_new_leader_decided_while_reading_starts_no_cooldown() {
    new_leader_reads_the_guards(false).await;
}

async fn new_leader_reads_the_guards(last_leader_scaled: bool) {
    use autoscaler_actors::adapters::records::Records;
    use autoscaler_actors::hosts::{Host, HostName};
    use autoscaler_actors::master::decider::{DeciderOutputs, Reconciled, ScaleDecider};
    use autoscaler_actors::master::messages::{CpuReported, HostsChanged, NodeUp};
    let Some(mut server) = EtcdServer::start() else {
        return;
    };
    let c = cluster(&server, Duration::from_secs(5));
    let etcd = Etcd::connect(&c, Some(Duration::from_secs(1)))
        .await
        .unwrap();
    // The last leader scaled up a minute ago (its memory in etcd, in Unix ms).
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let memory = serde_json::json!({
        "last_scale_up_ms": now_ms - 60_000,
        "launches_ms": [now_ms - 60_000],
    });
    if last_leader_scaled {
        etcd.put("", "decider", memory.to_string().into_bytes(), None)
            .await
            .unwrap();
    }
    let mut scaling = Config::defaults(
        &Layout::for_dir(std::path::Path::new("/srv/as")),
        Role::Master,
    )
    .scaling;
    scaling.dry_run = false;
    scaling.warmup = Duration::ZERO;
    scaling.scale_up_window = Duration::from_secs(1);
    scaling.cooldown = Duration::from_secs(600);
    let (tx, mut launched) = mpsc::unbounded_channel();
    let sink = Launches(tx).start();
    // This master holds the lead (its writes are accepted once etcd answers).
    let mut client = etcd.client();
    let lease = client.lease_grant(60, None).await.unwrap().id();
    let won = client.campaign(etcd.election(), "m1", lease).await.unwrap();
    let key = won.leader().unwrap().clone();
    let lead: LeadCell = Arc::new(std::sync::RwLock::new(Some(Lead {
        key: key.key().to_vec(),
        rev: key.rev(),
        lease,
        valid_until: Instant::now() + Duration::from_secs(3600),
    })));
    let log = crate::common::LogBuf::default();
    let decider = ScaleDecider::new(
        scaling,
        Some(DeciderOutputs {
            launch: sink.clone().recipient(),
            drain: sink.recipient(),
        }),
        None,
        Duration::from_millis(100),
        &log.logger(),
    )
    .following(Records::Etcd {
        etcd: etcd.clone(),
        lead,
    })
    .start();
    let node = Host::manual(HostName::parse("127.0.0.1").unwrap(), 8080);
    decider.do_send(HostsChanged {
        hosts: Arc::new(vec![node.clone()]),
    });
    decider.do_send(NodeUp {
        host: node.key(),
        hello: crate::common::hello("web", 1, Some(3_600_000)),
    });
    // etcd goes away as it starts to lead.
    server.stop();
    decider.do_send(Leading(true));
    decider.do_send(Reconciled { resumed: vec![] });
    let feed = |from: u64, n: u64| {
        for seq in from..from + n {
            decider.do_send(CpuReported {
                host: node.key(),
                sample: crate::common::sample(seq, 97.0),
            });
        }
    };
    for i in 0..30 {
        feed(i * 10, 10);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        launched.try_recv().is_err(),
        "acted without the guards' history"
    );
    // etcd back: the memory reads, and the last leader's cooldown holds.
    server.resume();
    log.wait_for("Leading: decisions act", Duration::from_secs(20))
        .await;
    for i in 30..50 {
        feed(i * 10, 10);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        log.text().contains("not acting until it is read"),
        "{}",
        log.text()
    );
    if last_leader_scaled {
        assert!(launched.try_recv().is_err(), "the cooldown was forgotten");
        assert!(log.text().contains("cooldown"), "{}", log.text());
    } else {
        // It decided to scale up as a follower while it could not read...
        assert!(log.text().contains("\"following\":true"), "{}", log.text());
        // ...and acts now, once.
        let id = launched.try_recv().expect("no launch once the memory read");
        assert!(id.starts_with("as-"), "{id}");
        assert!(launched.try_recv().is_err(), "launched twice");
    }
}
