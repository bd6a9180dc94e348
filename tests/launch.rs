//! The launcher against a real EC2 API server (moto, started here on loopback, behind the
//! fault-injecting proxy where a test needs faults) and with real scale commands. Instances
//! launch into a VPC 127.0.0.0/16 / subnet 127.0.1.0/24 made in moto, so every address
//! registered is 127.0.1.x and nothing leaves the machine.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Context, Handler};
use autoscaler_actors::adapters::ec2::{Ec2Api, InstanceInfo, SdkEc2};
use autoscaler_actors::adapters::hosts_dir::HostsDir;
use autoscaler_actors::config::{CommandLine, Config, Role, Secret};
use autoscaler_actors::hosts::{Host, HostName, Origin};
use autoscaler_actors::master::decider::{LaunchFinished, Reconciled};
use autoscaler_actors::master::launcher::command::CommandProvisioner;
use autoscaler_actors::master::launcher::intents::{Intent, Launched};
use autoscaler_actors::master::launcher::{
    DrainHost, LaunchInstances, LaunchSettings, Launcher, LauncherOutputs, Provisioner,
};
use autoscaler_actors::master::registry::HostRegistry;
use tokio::sync::mpsc;

use crate::common::ec2_proxy::{Ec2Proxy, Fault};
use crate::common::moto::{console_with_key, moto_bin, Moto};
use crate::common::{free_port, keygen, LogBuf};

/// A configuration in `dir` for EC2 at `endpoint` (moto, or the proxy in front of it).
fn config(dir: &Path, endpoint: Option<(&str, &Moto)>) -> Config {
    autoscaler_actors::admin::init(dir, Role::Master, false).unwrap();
    let mut cfg = Config::load(&dir.join("autoscaler.ini")).unwrap();
    if let Some((endpoint, m)) = endpoint {
        cfg.aws.endpoint = endpoint.to_string();
        cfg.aws.region = "us-east-1".into();
        cfg.aws.access_key_id = Secret::new("testing");
        cfg.aws.secret_access_key = Secret::new("testing");
        cfg.aws.api_timeout = Duration::from_secs(2);
        cfg.launch.subnet_id = m.subnet.clone();
    }
    cfg.launch.image_id = "ami-12c6146b".into();
    cfg.launch.group = "test-group".into();
    cfg.launch.app_port = 8080;
    cfg.launch.health_check = false;
    cfg.launch.learn_host_keys = false;
    cfg.launch.launch_timeout = Duration::from_secs(20);
    cfg.scaling.drain_timeout = Duration::ZERO;
    cfg
}

/// Launch settings with the test's short polls and retries.
fn settings(cfg: &Config) -> LaunchSettings {
    LaunchSettings {
        reconcile_every: Duration::from_millis(500),
        poll: Duration::from_millis(100),
        retry_base: Duration::from_millis(100),
        slack: Duration::from_secs(5),
        ..LaunchSettings::from_config(cfg)
    }
}

#[derive(Debug)]
enum Event {
    Finished(LaunchFinished),
    Reconciled(Reconciled),
}

struct Collect(mpsc::UnboundedSender<Event>);
impl Actor for Collect {
    type Context = Context<Self>;
}
impl Handler<LaunchFinished> for Collect {
    type Result = ();
    fn handle(&mut self, m: LaunchFinished, _: &mut Context<Self>) {
        let _ = self.0.send(Event::Finished(m));
    }
}
impl Handler<Reconciled> for Collect {
    type Result = ();
    fn handle(&mut self, m: Reconciled, _: &mut Context<Self>) {
        let _ = self.0.send(Event::Reconciled(m));
    }
}

/// A launcher with a real registry on hosts.d and a collector standing in for the decider.
struct Rig {
    launcher: Addr<Launcher>,
    events: mpsc::UnboundedReceiver<Event>,
    hosts: HostsDir,
    log: LogBuf,
}

fn rig(cfg: &Config, provisioner: Provisioner, settings: LaunchSettings) -> Rig {
    let log = LogBuf::default();
    let logger = log.logger();
    let hosts = HostsDir::new(&cfg.general.hosts_dir);
    let registry =
        HostRegistry::new(hosts.clone(), vec![], Duration::from_millis(100), &logger).start();
    let (tx, events) = mpsc::unbounded_channel();
    let sink = Collect(tx).start();
    let launcher = Launcher::new(
        provisioner,
        settings,
        LauncherOutputs {
            register: registry.clone().recipient(),
            deregister: registry.clone().recipient(),
            list: registry.recipient(),
            finished: sink.clone().recipient(),
            reconciled: sink.recipient(),
            drained: None,
        },
        &logger,
    )
    .start();
    Rig {
        launcher,
        events,
        hosts,
        log,
    }
}

impl Rig {
    async fn event(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(30), self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("no launcher event within 30 s:\n{}", self.log.text()))
            .unwrap()
    }

    async fn finished(&mut self) -> LaunchFinished {
        loop {
            if let Event::Finished(f) = self.event().await {
                return f;
            }
        }
    }

    async fn reconciled(&mut self) -> Reconciled {
        loop {
            if let Event::Reconciled(r) = self.event().await {
                return r;
            }
        }
    }

    /// Waits (bounded) until hosts.d holds `n` hosts.
    async fn hosts(&self, n: usize) -> Vec<Host> {
        for _ in 0..200 {
            let h = self.hosts.load_strict().unwrap();
            if h.len() == n {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "hosts.d never held {n} hosts: {:?}\n{}",
            self.hosts.load_strict().unwrap(),
            self.log.text()
        );
    }

    fn launch(&self, id: &str, count: u32) {
        self.launcher.do_send(LaunchInstances {
            count,
            decision_id: id.into(),
        });
    }
}

/// The group's live instances, as EC2 (moto itself, not the proxy) sees them.
async fn live(api: &SdkEc2) -> Vec<InstanceInfo> {
    api.describe(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.is_live())
        .collect()
}

/// Waits (bounded: the SDK's own retries of a failing call take up to about 15 s) until the
/// group has `n` live instances.
async fn wait_live(api: &SdkEc2, n: usize) -> Vec<InstanceInfo> {
    let end = std::time::Instant::now() + Duration::from_secs(40);
    while std::time::Instant::now() < end {
        let l = live(api).await;
        if l.len() == n {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never {n} live instances: {:?}", live(api).await);
}

/// moto, the proxy in front of it, a configuration for the proxy, and a client of moto
/// itself for the test's own look.
async fn ec2_set_up(dir: &Path) -> Option<(Moto, Ec2Proxy, Config, Arc<SdkEc2>, Arc<SdkEc2>)> {
    let moto = Moto::start(&moto_bin()?).await;
    let proxy = Ec2Proxy::start(&moto.endpoint).await;
    let cfg = config(dir, Some((&proxy.endpoint, &moto)));
    let through_proxy = Arc::new(SdkEc2::new(&cfg.aws, &cfg.launch, None).await.unwrap());
    let mut direct = cfg.clone();
    direct.aws.endpoint = moto.endpoint.clone();
    let direct = Arc::new(
        SdkEc2::new(&direct.aws, &direct.launch, None)
            .await
            .unwrap(),
    );
    Some((moto, proxy, cfg, through_proxy, direct))
}

#[actix_rt::test]
async fn launches_tags_registers_and_drains() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_moto, _proxy, cfg, api, direct)) = ec2_set_up(tmp.path()).await else {
        return;
    };
    let mut r = rig(&cfg, Provisioner::Ec2(api), settings(&cfg));
    assert!(r.reconciled().await.resumed.is_empty());
    r.launch("as-test-1", 2);
    let done = r.finished().await;
    assert_eq!(done.error, None);
    assert_eq!(done.registered.len(), 2);
    let hosts = r.hosts(2).await;
    for h in &hosts {
        assert!(
            h.host.to_string().starts_with("127.0.1."),
            "loopback subnet only: {}",
            h.host
        );
        assert_eq!(h.port, 8080);
        assert_eq!(h.origin, Origin::Launched);
        assert!(h.registered_ms.is_some(), "registration time recorded");
        assert!(h
            .instance_id
            .as_deref()
            .is_some_and(|i| i.starts_with("i-")));
    }
    let l = live(&direct).await;
    assert_eq!(l.len(), 2);
    assert!(
        l.iter().all(|i| i.decision.as_deref() == Some("as-test-1")),
        "{l:?}"
    );
    assert!(
        crate::common::intents_in(&cfg.general.state_dir).is_empty(),
        "intent removed"
    );

    r.launcher.do_send(DrainHost {
        host: hosts[0].clone(),
    });
    let l = wait_live(&direct, 1).await;
    assert_ne!(
        Some(l[0].instance_id.as_str()),
        hosts[0].instance_id.as_deref()
    );
    assert_eq!(r.hosts(1).await[0], hosts[1]);
    for _ in 0..100 {
        if crate::common::drains_in(&cfg.general.state_dir).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        crate::common::drains_in(&cfg.general.state_dir).is_empty(),
        "drain record removed"
    );
}

/// After a crash: an intent with no instance is dropped; an intent whose instance runs is
/// resumed (registered by the resumed launch, counted in flight by the decider); a launched
/// host whose instance is gone is removed; a host added by hand is never touched.
#[actix_rt::test]
async fn restart_reconciles_intents_and_instances() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_moto, _proxy, cfg, api, direct)) = ec2_set_up(tmp.path()).await else {
        return;
    };
    let intent = |id: &str| Intent {
        decision_id: id.into(),
        count: 1,
        at_ms: 1,
        launched: vec![],
    };
    // Crash between the intent and the API call: an intent, no instance.
    crate::common::write_intent(&cfg.general.state_dir, &intent("as-crash-before")).unwrap();
    // Crash after the call: an intent and its instance, not in hosts.d.
    crate::common::write_intent(&cfg.general.state_dir, &intent("as-crash-after")).unwrap();
    let launched = direct.run_instances(1, "as-crash-after").await.unwrap();
    // And a launched host whose instance has since been terminated elsewhere.
    let gone = direct.run_instances(1, "as-old").await.unwrap();
    direct.terminate(&gone[0].instance_id).await.unwrap();
    let mut stale = Host::launched(
        HostName::parse("127.0.1.200").unwrap(),
        8080,
        Some(gone[0].instance_id.clone()),
    );
    stale.registered_ms = Some(1);
    HostsDir::new(&cfg.general.hosts_dir).add(&stale).unwrap();
    let manual = Host::manual(HostName::parse("127.0.0.9").unwrap(), 80);
    HostsDir::new(&cfg.general.hosts_dir).add(&manual).unwrap();

    let mut r = rig(&cfg, Provisioner::Ec2(api), settings(&cfg));
    let rec = r.reconciled().await;
    assert_eq!(rec.resumed, vec![("as-crash-after".to_string(), 1)]);
    let done = r.finished().await;
    assert_eq!(done.decision_id, "as-crash-after");
    assert_eq!(done.error, None);
    let hosts = r.hosts(2).await;
    assert!(hosts.contains(&manual), "{hosts:?}");
    assert!(
        !hosts.contains(&stale),
        "host of a terminated instance removed"
    );
    let adopted: Vec<_> = hosts
        .iter()
        .filter(|h| h.origin == Origin::Launched)
        .collect();
    assert_eq!(
        adopted[0].instance_id.as_deref(),
        Some(launched[0].instance_id.as_str())
    );
    assert!(crate::common::intents_in(&cfg.general.state_dir).is_empty());
    // Exactly the expected instances exist: nothing was launched again.
    assert_eq!(live(&direct).await.len(), 1);
}

/// Defect: reconciliation used to delete the intent of a decision whose instance was still
/// pending, and adopt only running ones: that instance was never registered nor terminated.
#[actix_rt::test]
async fn a_pending_instance_of_a_crashed_launch_is_resumed() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_moto, proxy, cfg, api, direct)) = ec2_set_up(tmp.path()).await else {
        return;
    };
    crate::common::write_intent(
        &cfg.general.state_dir,
        &Intent {
            decision_id: "as-pending".into(),
            count: 1,
            at_ms: 1,
            launched: vec![],
        },
    )
    .unwrap();
    direct.run_instances(1, "as-pending").await.unwrap();
    proxy.hold_pending(true);
    let mut r = rig(&cfg, Provisioner::Ec2(api), settings(&cfg));
    assert_eq!(
        r.reconciled().await.resumed,
        vec![("as-pending".to_string(), 1)]
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        crate::common::intents_in(&cfg.general.state_dir).len(),
        1,
        "kept while pending"
    );
    assert!(r.hosts.load_strict().unwrap().is_empty());
    proxy.hold_pending(false);
    let done = r.finished().await;
    assert_eq!(
        (done.decision_id.as_str(), done.error),
        ("as-pending", None)
    );
    assert_eq!(r.hosts(1).await.len(), 1);
    assert!(crate::common::intents_in(&cfg.general.state_dir).is_empty());
    assert_eq!(live(&direct).await.len(), 1);
}

/// Defect: the whole-launch time limit dropped the launch, and with it the clean-up: the
/// instance it had started kept running, unregistered.
#[actix_rt::test]
async fn the_whole_launch_limit_still_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_moto, proxy, cfg, api, direct)) = ec2_set_up(tmp.path()).await else {
        return;
    };
    let mut s = settings(&cfg);
    s.launch_timeout = Duration::from_secs(1);
    s.health_timeout = Duration::from_secs(1);
    s.slack = Duration::ZERO;
    let mut r = rig(&cfg, Provisioner::Ec2(api), s);
    r.reconciled().await;
    proxy.fail_always("DescribeInstances", Fault::Hold);
    r.launch("as-hung", 1);
    let done = r.finished().await;
    let e = done.error.expect("an error");
    assert!(e.contains("did not finish within 2s"), "{e}");
    proxy.release("DescribeInstances");
    wait_live(&direct, 0).await;
}

/// Health gates run side by side: three hosts that never answer are all waited for at once
/// and fail after one health timeout, not three, and are all terminated.
#[actix_rt::test]
async fn health_gates_run_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_moto, _proxy, mut cfg, api, direct)) = ec2_set_up(tmp.path()).await else {
        return;
    };
    cfg.launch.app_port = free_port("127.0.0.1");
    let mut s = settings(&cfg);
    s.health_check = true;
    // The launch's whole limit is 6 + 4 s: side by side the gates end after 4 s, however long
    // EC2 took to answer within its 6 s; three gates in a row would reach the limit (12 s),
    // or, stopping at the first failure, never wait for the other two (counted below).
    s.health_timeout = Duration::from_secs(4);
    s.launch_timeout = Duration::from_secs(6);
    s.slack = Duration::ZERO;
    let mut r = rig(&cfg, Provisioner::Ec2(api), s);
    r.reconciled().await;
    r.launch("as-three", 3);
    let e = r.finished().await.error.expect("an error");
    assert!(
        e.contains("did not accept TCP within 4s"),
        "not the overall limit: {e}"
    );
    let waited: std::collections::BTreeSet<String> = r
        .log
        .text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["msg"] == "Waiting for the host to accept TCP")
        .filter_map(|v| v["host"].as_str().map(String::from))
        .collect();
    assert_eq!(waited.len(), 3, "every host waited for: {waited:?}");
    wait_live(&direct, 0).await;
    assert!(r.hosts.load_strict().unwrap().is_empty());
}

/// Throttling, server errors, slow answers and a lost answer: retried, a bounded number of
/// times, and never a second set of instances for one decision.
#[actix_rt::test]
async fn api_faults_are_retried_boundedly_and_never_double_a_launch() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_moto, proxy, cfg, api, direct)) = ec2_set_up(tmp.path()).await else {
        return;
    };
    let mut r = rig(&cfg, Provisioner::Ec2(api), settings(&cfg));
    r.reconciled().await;
    proxy.fail_next(
        "RunInstances",
        &[Fault::Throttle, Fault::ServerError, Fault::DropAnswer],
    );
    proxy.fail_next(
        "DescribeInstances",
        &[
            Fault::Throttle,
            Fault::Slow(Duration::from_secs(3)),
            Fault::Drop,
        ],
    );
    r.launch("as-faults", 1);
    let done = r.finished().await;
    assert_eq!(done.error, None, "{}", r.log.text());
    assert_eq!(proxy.count("RunInstances"), 3, "asked three times");
    assert_eq!(
        live(&direct).await.len(),
        1,
        "the lost answer's instance is used"
    );
    assert!(r.log.text().contains("RunInstances had gone through"));

    // A throttle that does not end: a bounded number of calls, then a clear error.
    proxy.fail_always("RunInstances", Fault::Throttle);
    let before = proxy.count("RunInstances");
    r.launch("as-throttled", 1);
    let e = r.finished().await.error.expect("an error");
    assert!(e.contains("RequestLimitExceeded"), "{e}");
    assert_eq!(
        proxy.count("RunInstances") - before,
        5,
        "MAX_ATTEMPTS calls"
    );
    assert_eq!(live(&direct).await.len(), 1);
}

/// Defect: reconciliation ran only at start. An instance terminated from outside while the
/// master runs leaves the registry within a reconciliation period.
#[actix_rt::test]
async fn the_reconciler_runs_while_the_master_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_moto, _proxy, cfg, api, direct)) = ec2_set_up(tmp.path()).await else {
        return;
    };
    let mut r = rig(&cfg, Provisioner::Ec2(api), settings(&cfg));
    r.reconciled().await;
    r.launch("as-r", 1);
    assert_eq!(r.finished().await.error, None);
    let h = r.hosts(1).await.remove(0);
    direct
        .terminate(h.instance_id.as_deref().unwrap())
        .await
        .unwrap();
    r.hosts(0).await;
    assert!(r
        .log
        .text()
        .contains("Removing host whose instance is gone"));
}

/// Defect: a failed TerminateInstances was logged once and never retried.
#[actix_rt::test]
async fn a_failed_termination_is_retried_until_it_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_moto, proxy, cfg, api, direct)) = ec2_set_up(tmp.path()).await else {
        return;
    };
    let mut r = rig(&cfg, Provisioner::Ec2(api), settings(&cfg));
    r.reconciled().await;
    r.launch("as-t", 1);
    assert_eq!(r.finished().await.error, None);
    let h = r.hosts(1).await.remove(0);
    // As many failures as the SDK tries in one call (5): only the drain's retry succeeds.
    proxy.fail_next("TerminateInstances", &[Fault::ServerError; 5]);
    r.launcher.do_send(DrainHost { host: h });
    wait_live(&direct, 0).await;
    assert!(proxy.count("TerminateInstances") >= 6);
    assert!(r.log.text().contains("Drain not finished; retrying"));
}

/// Defect: a drain was an in-memory timer; after a restart the drained instance was adopted
/// again. The drain record keeps it out of the registry, and the new run terminates it.
#[actix_rt::test]
async fn a_drain_survives_a_restart_and_is_never_adopted_again() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_moto, proxy, cfg, api, direct)) = ec2_set_up(tmp.path()).await else {
        return;
    };
    let mut s = settings(&cfg);
    s.drain_timeout = Duration::from_secs(3);
    let mut r = rig(&cfg, Provisioner::Ec2(api.clone()), s.clone());
    r.reconciled().await;
    r.launch("as-d", 1);
    assert_eq!(r.finished().await.error, None);
    let h = r.hosts(1).await.remove(0);
    // Termination is stuck in the first run.
    proxy.fail_always("TerminateInstances", Fault::Hold);
    r.launcher.do_send(DrainHost { host: h.clone() });
    r.hosts(0).await;
    // A second run on the same state (the restarted master).
    let mut r2 = rig(&cfg, Provisioner::Ec2(api), s);
    r2.reconciled().await;
    for _ in 0..20 {
        assert!(
            r2.hosts.load_strict().unwrap().is_empty(),
            "the drained instance is never adopted again:\n{}",
            r2.log.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.release("TerminateInstances");
    wait_live(&direct, 0).await;
    for _ in 0..100 {
        if crate::common::drains_in(&cfg.general.state_dir).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(crate::common::drains_in(&cfg.general.state_dir).is_empty());
}

/// A launched host's SSH keys come from its console output (cloud-init's block), go into
/// known_hosts before it is registered, and leave with it. Without them the launch fails and
/// the instance is terminated.
#[actix_rt::test]
async fn host_keys_come_from_the_console_and_leave_with_the_host() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_moto, proxy, cfg, api, direct)) = ec2_set_up(tmp.path()).await else {
        return;
    };
    keygen(&tmp.path().join("hostkey"));
    let pub_key = std::fs::read_to_string(tmp.path().join("hostkey.pub")).unwrap();
    let b64 = pub_key.split_whitespace().nth(1).unwrap().to_string();
    let mut s = settings(&cfg);
    s.learn_host_keys = true;
    s.health_timeout = Duration::from_secs(2);
    let mut r = rig(&cfg, Provisioner::Ec2(api), s);
    r.reconciled().await;

    r.launch("as-nokeys", 1);
    let e = r.finished().await.error.expect("an error");
    assert!(e.contains("printed no SSH host keys"), "{e}");
    wait_live(&direct, 0).await;

    proxy.set_console(None, &console_with_key(&pub_key));
    r.launch("as-keys", 1);
    assert_eq!(r.finished().await.error, None, "{}", r.log.text());
    let h = r.hosts(1).await.remove(0);
    let known = std::fs::read_to_string(&cfg.ssh.known_hosts).unwrap();
    assert!(
        known.contains(&format!("{} ssh-ed25519 {b64}", h.host)),
        "{known}"
    );
    r.launcher.do_send(DrainHost { host: h.clone() });
    wait_live(&direct, 0).await;
    for _ in 0..100 {
        let known = std::fs::read_to_string(&cfg.ssh.known_hosts).unwrap_or_default();
        if !known.contains(&b64) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the terminated host's key is still in known_hosts");
}

#[actix_rt::test]
async fn api_errors_and_health_gate_failures_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_moto, _proxy, mut cfg, _, direct)) = ec2_set_up(tmp.path()).await else {
        return;
    };
    cfg.launch.subnet_id = "subnet-doesnotexist".into();
    let api = Arc::new(SdkEc2::new(&cfg.aws, &cfg.launch, None).await.unwrap());
    let mut r = rig(&cfg, Provisioner::Ec2(api), settings(&cfg));
    r.launch("as-bad-subnet", 1);
    let done = r.finished().await;
    let e = done.error.expect("an error");
    assert!(e.contains("RunInstances") && e.contains("subnet"), "{e}");
    assert!(done.registered.is_empty());

    // Health gate: nothing listens on 127.0.1.x:app_port, so the host is never registered.
    let tmp2 = tempfile::tempdir().unwrap();
    let Some((_moto2, _proxy2, mut cfg, api, direct2)) = ec2_set_up(tmp2.path()).await else {
        return;
    };
    cfg.launch.health_check = true;
    cfg.launch.health_timeout = Duration::from_secs(1);
    cfg.launch.app_port = free_port("127.0.0.1");
    let mut r = rig(&cfg, Provisioner::Ec2(api), settings(&cfg));
    r.launch("as-unhealthy", 1);
    let e = r.finished().await.error.expect("an error");
    assert!(e.contains("did not accept TCP"), "{e}");
    assert!(r.hosts.load_strict().unwrap().is_empty());
    // The instance of the failed launch is terminated, not left running unregistered.
    wait_live(&direct2, 0).await;
    assert!(live(&direct).await.is_empty());
}

fn script(dir: &Path, name: &str, body: &str) -> CommandLine {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    CommandLine(vec![p.display().to_string()])
}

fn commands(up: CommandLine, down: CommandLine, timeout: Duration) -> Provisioner {
    Provisioner::Command(CommandProvisioner {
        up,
        down,
        timeout,
        // What the configuration's [aws] region and profile become.
        env: {
            let layout = autoscaler_actors::config::Layout::for_dir(Path::new("/srv/as"));
            let mut cfg = Config::defaults(&layout, Role::Master);
            cfg.aws.region = "eu-west-3".into();
            cfg.aws.profile = "fleet".into();
            CommandProvisioner::from_config(&cfg).env
        },
        secret: None,
    })
}

#[actix_rt::test]
async fn command_launcher() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), None);
    let none = CommandLine::default();
    // A script that prints the new hosts as JSON (it sees the decision and count, and the
    // configured AWS region and profile).
    let good = script(
        tmp.path(),
        "grow.sh",
        &format!(
            r#"echo "$AWS_REGION $AWS_DEFAULT_REGION $AWS_PROFILE" > {}; echo "[{{\"host\": \"127.0.1.50\", \"port\": 8081, \"instance_id\": \"$AUTOSCALER_DECISION\"}}]""#,
            tmp.path().join("aws-env").display()
        ),
    );
    let mut r = rig(
        &cfg,
        commands(good, none.clone(), Duration::from_secs(10)),
        settings(&cfg),
    );
    r.launch("as-cmd-1", 1);
    let done = r.finished().await;
    assert_eq!(done.error, None);
    let hosts = r.hosts(1).await;
    assert_eq!(hosts[0].host.to_string(), "127.0.1.50");
    assert_eq!(hosts[0].instance_id.as_deref(), Some("as-cmd-1"));
    assert_eq!(hosts[0].origin, Origin::Launched);
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("aws-env")).unwrap(),
        "eu-west-3 eu-west-3 fleet\n",
        "[aws] region and profile reach the command"
    );

    // A host_key in the command's JSON is recorded in known_hosts before registration.
    keygen(&tmp.path().join("hostkey"));
    let pub_key = std::fs::read_to_string(tmp.path().join("hostkey.pub")).unwrap();
    let b64 = pub_key.split_whitespace().nth(1).unwrap();
    let keyed = script(
        tmp.path(),
        "keyed.sh",
        &format!(
            r#"echo '{{"host": "127.0.1.53", "port": 80, "host_key": "{}"}}'"#,
            pub_key.trim()
        ),
    );
    let mut s = settings(&cfg);
    s.learn_host_keys = true;
    let mut r = rig(
        &cfg,
        commands(keyed, none.clone(), Duration::from_secs(10)),
        s,
    );
    r.launch("as-cmd-keyed", 1);
    assert_eq!(r.finished().await.error, None);
    let known = std::fs::read_to_string(&cfg.ssh.known_hosts).unwrap();
    assert!(
        known.contains(&format!("127.0.1.53 ssh-ed25519 {b64}")),
        "{known}"
    );

    // Garbage on stdout: a clear error naming the command; nothing registered.
    let tmp2 = tempfile::tempdir().unwrap();
    let cfg2 = config(tmp2.path(), None);
    let bad = script(tmp2.path(), "garbage.sh", "echo 'launched ok!'");
    let mut r = rig(
        &cfg2,
        commands(bad, none.clone(), Duration::from_secs(10)),
        settings(&cfg2),
    );
    r.launch("as-cmd-2", 1);
    let e = r.finished().await.error.expect("an error");
    assert!(
        e.contains("garbage.sh") && e.contains("expected JSON"),
        "{e}"
    );
    assert!(r.hosts.load_strict().unwrap().is_empty());

    // A command that hangs is killed at the timeout.
    let hang = script(tmp2.path(), "hang.sh", "exec sleep 60");
    let mut r = rig(
        &cfg2,
        commands(hang, none, Duration::from_millis(500)),
        settings(&cfg2),
    );
    r.launch("as-cmd-3", 1);
    let e = r.finished().await.error.expect("an error");
    assert!(
        e.contains("hang.sh") && e.contains("did not finish within 500ms"),
        "{e}"
    );
}

/// Defects: a host the scale-up command printed that fails the health gate kept running;
/// with no scale_down_command, scale-in logged "Terminated" though nothing was stopped.
#[actix_rt::test]
async fn the_command_launcher_cleans_up_and_says_what_it_did() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), None);
    cfg.launch.health_check = true;
    cfg.launch.health_timeout = Duration::from_secs(1);
    let port = free_port("127.0.0.1");
    let up = script(
        tmp.path(),
        "up.sh",
        &format!(r#"echo "{{\"host\": \"127.0.1.51\", \"port\": {port}}}""#),
    );
    let stopped = tmp.path().join("stopped");
    let down = script(
        tmp.path(),
        "down.sh",
        &format!(
            "echo \"$AUTOSCALER_HOST $AUTOSCALER_PORT\" >> {}",
            stopped.display()
        ),
    );
    let mut r = rig(
        &cfg,
        commands(up.clone(), down, Duration::from_secs(10)),
        settings(&cfg),
    );
    r.launch("as-unhealthy-cmd", 1);
    let e = r.finished().await.error.expect("an error");
    assert!(e.contains("did not accept TCP"), "{e}");
    assert_eq!(
        std::fs::read_to_string(&stopped).unwrap(),
        format!("127.0.1.51 {port}\n"),
        "the printed host is stopped"
    );

    // No scale_down_command: the drain says the host was not stopped.
    let tmp2 = tempfile::tempdir().unwrap();
    let cfg2 = config(tmp2.path(), None);
    let mut r = rig(
        &cfg2,
        commands(
            script(
                tmp2.path(),
                "up.sh",
                r#"echo '{"host": "127.0.1.52", "port": 80}'"#,
            ),
            CommandLine::default(),
            Duration::from_secs(10),
        ),
        settings(&cfg2),
    );
    r.launch("as-c", 1);
    assert_eq!(r.finished().await.error, None);
    let h = r.hosts(1).await.remove(0);
    r.launcher.do_send(DrainHost { host: h });
    r.hosts(0).await;
    r.log
        .wait_for("the host was not stopped", Duration::from_secs(5))
        .await;
    assert!(!r.log.text().contains("\"msg\":\"Terminated\""));
}

/// Defect: a scale-up command that started something and then failed (a non-zero exit, or
/// output that is not the contract's) left it running, with no scale-down run and no word.
/// Now a host its answer names (address and port, not registered) is stopped with the
/// scale-down command; anything else is said in the log, with the decision.
#[actix_rt::test]
async fn a_scale_up_command_that_fails_after_starting_something_is_undone() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), None);
    let stopped = tmp.path().join("stopped");
    let down = script(
        tmp.path(),
        "down.sh",
        &format!(
            "echo \"$AUTOSCALER_DECISION $AUTOSCALER_HOST $AUTOSCALER_PORT $AUTOSCALER_INSTANCE_ID\" >> {}",
            stopped.display()
        ),
    );
    // A host of the fleet, registered before: never a leftover.
    let fleet = Host::manual(HostName::parse("127.0.1.56").unwrap(), 80);
    HostsDir::new(&cfg.general.hosts_dir).add(&fleet).unwrap();
    let cases = [
        // Printed its instance, then failed: stopped, with everything it printed.
        (
            "exits.sh",
            r#"echo 'starting'; echo '{"host": "127.0.1.54", "port": 80, "instance_id": "i-0abc"}'; exit 3"#,
            "as-fail-1 127.0.1.54 80 i-0abc\n",
            "Stopped what a failed scale-up command printed",
        ),
        // Exit 0, but a port out of range: not a host the scale-down command can be given.
        (
            "badport.sh",
            r#"echo '{"host": "127.0.1.55", "port": 99999, "instance_id": "i-0def"}'"#,
            "",
            "without both address and port",
        ),
        // A registered host in its answer: left alone.
        (
            "fleet.sh",
            r#"echo '{"host": "127.0.1.56", "port": 80}'; exit 1"#,
            "",
            "printed a registered host; it is left alone",
        ),
        // JSON among its progress, then a failure: not its answer, nothing named.
        (
            "progress.sh",
            r#"echo '{"host": "127.0.1.57", "port": 80}'; echo 'quota exceeded'; exit 1"#,
            "",
            "keeps running unregistered",
        ),
    ];
    for (i, (name, body, want, said)) in cases.into_iter().enumerate() {
        let _ = std::fs::remove_file(&stopped);
        let mut r = rig(
            &cfg,
            commands(
                script(tmp.path(), name, body),
                down.clone(),
                Duration::from_secs(10),
            ),
            settings(&cfg),
        );
        let decision = format!("as-fail-{}", i + 1);
        r.launch(&decision, 1);
        assert!(r.finished().await.error.is_some());
        r.log.wait_for(said, Duration::from_secs(5)).await;
        assert!(r.log.text().contains(&decision), "{}", r.log.text());
        assert_eq!(
            std::fs::read_to_string(&stopped).unwrap_or_default(),
            want,
            "{name}"
        );
        let hosts = r.hosts.load_strict().unwrap();
        assert_eq!(hosts.len(), 1, "{name}: only the fleet's host: {hosts:?}");
    }
}

/// After a crash the command launcher resumes from what the command printed, or runs it again
/// with the same decision id (the command must then print the same host: idempotent).
#[actix_rt::test]
async fn command_launches_resume_after_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), None);
    let runs = tmp.path().join("runs");
    let up = script(
        tmp.path(),
        "up.sh",
        &format!(
            r#"echo "$AUTOSCALER_DECISION" >> {}; echo '{{"host": "127.0.1.61", "port": 80}}'"#,
            runs.display()
        ),
    );
    let printed = Launched {
        host: Host::launched(HostName::parse("127.0.1.60").unwrap(), 80, None),
        host_keys: vec![],
    };
    crate::common::write_intent(
        &cfg.general.state_dir,
        &Intent {
            decision_id: "as-printed".into(),
            count: 1,
            at_ms: 1,
            launched: vec![printed],
        },
    )
    .unwrap();
    crate::common::write_intent(
        &cfg.general.state_dir,
        &Intent {
            decision_id: "as-unprinted".into(),
            count: 1,
            at_ms: 1,
            launched: vec![],
        },
    )
    .unwrap();
    let mut r = rig(
        &cfg,
        commands(up, CommandLine::default(), Duration::from_secs(10)),
        settings(&cfg),
    );
    let mut resumed = r.reconciled().await.resumed;
    resumed.sort();
    assert_eq!(
        resumed,
        vec![
            ("as-printed".to_string(), 1),
            ("as-unprinted".to_string(), 1)
        ]
    );
    let mut done = vec![r.finished().await, r.finished().await];
    done.sort_by(|a, b| a.decision_id.cmp(&b.decision_id));
    assert!(done.iter().all(|d| d.error.is_none()), "{done:?}");
    let hosts: Vec<String> = r
        .hosts(2)
        .await
        .iter()
        .map(|h| h.host.to_string())
        .collect();
    assert_eq!(hosts, ["127.0.1.60", "127.0.1.61"]);
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "as-unprinted\n",
        "run again only where nothing was printed, with the same decision"
    );
    assert!(crate::common::intents_in(&cfg.general.state_dir).is_empty());
}

/// dry_run: the master starts and decides with no launch settings at all: a hot node gets a
/// scale-up decision, logged as a dry run, and nothing is launched.
#[actix_rt::test]
async fn dry_run_master_needs_no_launch_settings() {
    use autoscaler_actors::master::decider::GetDecisionStatus;
    use autoscaler_actors::master::messages::{CpuReported, NodeUp};
    use autoscaler_actors::report::CpuSample;
    let tmp = tempfile::tempdir().unwrap();
    autoscaler_actors::admin::init(tmp.path(), Role::Master, false).unwrap();
    let mut cfg = Config::load(&tmp.path().join("autoscaler.ini")).unwrap();
    assert!(cfg.scaling.dry_run && cfg.launch.image_id.is_empty());
    keygen(&cfg.ssh.identity_file);
    // The master also rewrites haproxy.cfg; never touch the machine's own HAProxy service.
    cfg.haproxy.reload_command = CommandLine(vec!["true".into()]);
    cfg.scaling.warmup = Duration::ZERO;
    cfg.scaling.scale_up_window = Duration::from_secs(1);
    let node = Host::manual(
        HostName::parse("127.0.0.1").unwrap(),
        free_port("127.0.0.1"),
    );
    HostsDir::new(&cfg.general.hosts_dir).add(&node).unwrap();
    let log = LogBuf::default();
    let m = autoscaler_actors::start_master(
        &cfg,
        Duration::from_millis(100),
        Duration::from_millis(100),
        &log.logger(),
    )
    .await
    .unwrap();
    // The node is hot (as its tunnel would say).
    m.decider.do_send(NodeUp {
        host: node.key(),
        hello: crate::common::hello("web", 1, Some(3_600_000)),
    });
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let mut seq = 0;
    while !log.text().contains("\"action\":\"scale_up\"") {
        assert!(
            std::time::Instant::now() < end,
            "no decision:\n{}",
            log.text()
        );
        m.decider.do_send(CpuReported {
            host: node.key(),
            sample: CpuSample {
                seq,
                ts_ms: 1,
                busy_pct: 97.0,
                cores: 2,
                age_ms: 0,
            },
        });
        seq += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let decision = log
        .text()
        .lines()
        .find(|l| l.contains("\"action\":\"scale_up\""))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .unwrap();
    assert_eq!(decision["dry_run"], true, "{decision}");
    let st = m.decider.send(GetDecisionStatus).await.unwrap();
    assert!(st.dry_run && st.in_flight.is_empty(), "{st:?}");
    assert!(
        st.last_action
            .as_ref()
            .is_some_and(|(a, _, _)| a == "scale_up 1"),
        "{st:?}"
    );
    assert!(m.launcher.is_none());
    // Without dry_run and without an AMI, the configuration itself is refused.
    cfg.scaling.dry_run = false;
    let text = cfg.to_ini_text();
    let e = Config::parse(&text, &tmp.path().join("autoscaler.ini"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[launch] image_id"), "{e}");
}
