//! Launching against a real EC2 API server (moto, started here on loopback) and with real
//! scale-up commands. Instances launch into a VPC 127.0.0.0/16 / subnet 127.0.1.0/24 made in
//! moto, so every address registered is 127.0.1.x and nothing leaves the machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{free_port, wait_for_tcp, Proc};
use actix::{Actor, Addr, Context, Handler};
use autoscaler_actors::adapters::ec2::{Ec2Api, InstanceInfo, SdkEc2};
use autoscaler_actors::adapters::hosts_dir::HostsDir;
use autoscaler_actors::config::{CommandLine, Config, Role, Secret};
use autoscaler_actors::hosts::{Host, HostName, Origin};
use autoscaler_actors::master::decider::LaunchFinished;
use autoscaler_actors::master::launcher::command::CommandProvisioner;
use autoscaler_actors::master::launcher::intents::{pending_intents, Intent};
use autoscaler_actors::master::launcher::{
    LaunchInstances, LaunchSettings, Launcher, LauncherOutputs, Provisioner, TerminateInstance,
};
use autoscaler_actors::master::registry::HostRegistry;
use slog::{o, Logger};
use tokio::sync::mpsc;

/// moto_server from $MOTO_SERVER or the repository's .venv-moto (scripts/install-deps.sh).
fn moto_bin() -> Option<PathBuf> {
    let p = std::env::var_os("MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-moto/bin/moto_server")
        });
    if p.is_file() {
        return Some(p);
    }
    eprintln!(
        "\n=============================================================\n\
         SKIPPED: moto_server not found at {}; this test needs the real EC2 API server.\n\
         Run scripts/install-deps.sh (bash .ci/run does) and test again.\n\
         =============================================================\n",
        p.display()
    );
    None
}

/// A moto server on loopback with a loopback VPC and subnet.
struct Moto {
    _proc: Proc,
    endpoint: String,
    subnet: String,
}

impl Moto {
    async fn start(bin: &Path) -> Moto {
        let port = free_port("127.0.0.1");
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let proc = Proc(child);
        wait_for_tcp(&format!("127.0.0.1:{port}"), "moto_server");
        let endpoint = format!("http://127.0.0.1:{port}");
        let client = client(&endpoint).await;
        let vpc = client
            .create_vpc()
            .cidr_block("127.0.0.0/16")
            .send()
            .await
            .unwrap();
        let vpc_id = vpc.vpc().unwrap().vpc_id().unwrap().to_string();
        let subnet = client
            .create_subnet()
            .vpc_id(vpc_id)
            .cidr_block("127.0.1.0/24")
            .send()
            .await
            .unwrap();
        Moto {
            _proc: proc,
            endpoint,
            subnet: subnet.subnet().unwrap().subnet_id().unwrap().to_string(),
        }
    }
}

async fn client(endpoint: &str) -> aws_sdk_ec2::Client {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await;
    aws_sdk_ec2::Client::new(&sdk)
}

fn config(dir: &Path, moto: Option<&Moto>) -> Config {
    autoscaler_actors::admin::init(dir, Role::Master, false).unwrap();
    let mut cfg = Config::load(&dir.join("autoscaler.ini")).unwrap();
    if let Some(m) = moto {
        cfg.aws.endpoint = m.endpoint.clone();
        cfg.aws.region = "us-east-1".into();
        cfg.aws.access_key_id = Secret::new("testing");
        cfg.aws.secret_access_key = Secret::new("testing");
        cfg.launch.subnet_id = m.subnet.clone();
    }
    cfg.launch.image_id = "ami-12c6146b".into();
    cfg.launch.group = "test-group".into();
    cfg.launch.app_port = 8080;
    cfg.launch.health_check = false;
    cfg.launch.launch_timeout = Duration::from_secs(20);
    cfg
}

struct Collect(mpsc::UnboundedSender<LaunchFinished>);
impl Actor for Collect {
    type Context = Context<Self>;
}
impl Handler<LaunchFinished> for Collect {
    type Result = ();
    fn handle(&mut self, m: LaunchFinished, _: &mut Context<Self>) {
        let _ = self.0.send(m);
    }
}

struct Rig {
    launcher: Addr<Launcher>,
    finished: mpsc::UnboundedReceiver<LaunchFinished>,
    hosts: HostsDir,
}

fn rig(cfg: &Config, provisioner: Provisioner) -> Rig {
    let log = Logger::root(slog::Discard, o!());
    let hosts = HostsDir::new(&cfg.general.hosts_dir);
    let registry =
        HostRegistry::new(hosts.clone(), vec![], Duration::from_millis(100), &log).start();
    let (tx, finished) = mpsc::unbounded_channel();
    let sink = Collect(tx).start();
    let launcher = Launcher::new(
        provisioner,
        LaunchSettings::from_config(cfg),
        LauncherOutputs {
            register: registry.clone().recipient(),
            deregister: registry.clone().recipient(),
            list: registry.recipient(),
            finished: sink.recipient(),
        },
        &log,
    )
    .start();
    Rig {
        launcher,
        finished,
        hosts,
    }
}

impl Rig {
    async fn finished(&mut self) -> LaunchFinished {
        tokio::time::timeout(Duration::from_secs(30), self.finished.recv())
            .await
            .expect("LaunchFinished within 30 s")
            .unwrap()
    }

    /// Waits (bounded) until hosts.d holds `n` hosts.
    async fn hosts(&self, n: usize) -> Vec<Host> {
        for _ in 0..100 {
            let h = self.hosts.load_strict().unwrap();
            if h.len() == n {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "hosts.d never held {n} hosts: {:?}",
            self.hosts.load_strict().unwrap()
        );
    }
}

async fn group_instances(api: &SdkEc2) -> Vec<InstanceInfo> {
    api.describe(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.is_live())
        .collect()
}

#[actix_rt::test]
async fn launches_tags_registers_and_terminates() {
    let Some(bin) = moto_bin() else { return };
    let moto = Moto::start(&bin).await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), Some(&moto));
    let api = Arc::new(SdkEc2::new(&cfg.aws, &cfg.launch).await.unwrap());
    let mut r = rig(&cfg, Provisioner::Ec2(api.clone()));
    r.launcher.do_send(LaunchInstances {
        count: 2,
        decision_id: "as-test-1".into(),
    });
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
        assert!(h
            .instance_id
            .as_deref()
            .is_some_and(|i| i.starts_with("i-")));
    }
    let live = group_instances(&api).await;
    assert_eq!(live.len(), 2);
    assert!(
        live.iter()
            .all(|i| i.decision.as_deref() == Some("as-test-1")),
        "{live:?}"
    );
    assert!(
        pending_intents(&cfg.general.state_dir).is_empty(),
        "intent removed"
    );

    r.launcher.do_send(TerminateInstance {
        host: hosts[0].clone(),
    });
    for _ in 0..100 {
        if group_instances(&api).await.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let live = group_instances(&api).await;
    assert_eq!(live.len(), 1);
    assert_ne!(
        Some(live[0].instance_id.as_str()),
        hosts[0].instance_id.as_deref()
    );
}

#[actix_rt::test]
async fn restart_reconciles_intents_and_instances() {
    let Some(bin) = moto_bin() else { return };
    let moto = Moto::start(&bin).await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), Some(&moto));
    let api = Arc::new(SdkEc2::new(&cfg.aws, &cfg.launch).await.unwrap());
    let intents = cfg.general.state_dir.join("intents");
    std::fs::create_dir_all(&intents).unwrap();
    let write_intent = |id: &str| {
        let i = Intent {
            decision_id: id.into(),
            count: 1,
            at_ms: 1,
        };
        std::fs::write(
            intents.join(format!("{id}.json")),
            serde_json::to_string(&i).unwrap(),
        )
        .unwrap();
    };
    // Crash between the intent and the API call: an intent, no instance.
    write_intent("as-crash-before");
    // Crash after the call: an intent and its instance, not in hosts.d.
    write_intent("as-crash-after");
    let launched = api.run_instances(1, "as-crash-after").await.unwrap();
    // And a launched host whose instance has since been terminated elsewhere.
    let gone = api.run_instances(1, "as-old").await.unwrap();
    api.terminate(&gone[0].instance_id).await.unwrap();
    let stale = Host {
        host: HostName::parse("127.0.1.200").unwrap(),
        port: 8080,
        ssh_port: None,
        report_port: None,
        instance_id: Some(gone[0].instance_id.clone()),
        origin: Origin::Launched,
    };
    HostsDir::new(&cfg.general.hosts_dir).add(&stale).unwrap();
    // A host added by hand is never touched.
    let manual = Host::manual(HostName::parse("127.0.0.9").unwrap(), 80);
    HostsDir::new(&cfg.general.hosts_dir).add(&manual).unwrap();

    let r = rig(&cfg, Provisioner::Ec2(api.clone()));
    // Reconciliation runs in the background: wait (bounded) until it has settled.
    let mut hosts = Vec::new();
    for _ in 0..200 {
        hosts = r.hosts.load_strict().unwrap();
        let settled = pending_intents(&cfg.general.state_dir).is_empty()
            && !hosts.contains(&stale)
            && hosts.iter().any(|h| h.origin == Origin::Launched);
        if settled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(hosts.contains(&manual), "{hosts:?}");
    assert!(
        !hosts.contains(&stale),
        "host of a terminated instance removed: {hosts:?}"
    );
    let adopted: Vec<_> = hosts
        .iter()
        .filter(|h| h.origin == Origin::Launched)
        .collect();
    assert_eq!(adopted.len(), 1, "{hosts:?}");
    assert_eq!(
        adopted[0].instance_id.as_deref(),
        Some(launched[0].instance_id.as_str())
    );
    assert!(adopted[0].host.to_string().starts_with("127.0.1."));
    assert!(pending_intents(&cfg.general.state_dir).is_empty());
    // Exactly the expected instances exist: nothing was launched again.
    let live = group_instances(&api).await;
    assert_eq!(live.len(), 1, "{live:?}");
    drop(r);
}

#[actix_rt::test]
async fn api_errors_and_health_gate_failures_are_reported() {
    let Some(bin) = moto_bin() else { return };
    let moto = Moto::start(&bin).await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), Some(&moto));
    cfg.launch.subnet_id = "subnet-doesnotexist".into();
    let api = Arc::new(SdkEc2::new(&cfg.aws, &cfg.launch).await.unwrap());
    let mut r = rig(&cfg, Provisioner::Ec2(api));
    r.launcher.do_send(LaunchInstances {
        count: 1,
        decision_id: "as-bad-subnet".into(),
    });
    let done = r.finished().await;
    let e = done.error.expect("an error");
    assert!(e.contains("RunInstances") && e.contains("subnet"), "{e}");
    assert!(done.registered.is_empty());

    // Health gate: nothing listens on 127.0.1.x:app_port, so the host is never registered.
    let tmp2 = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp2.path(), Some(&moto));
    cfg.launch.health_check = true;
    cfg.launch.health_timeout = Duration::from_secs(1);
    cfg.launch.app_port = free_port("127.0.0.1");
    let api = Arc::new(SdkEc2::new(&cfg.aws, &cfg.launch).await.unwrap());
    let mut r = rig(&cfg, Provisioner::Ec2(api.clone()));
    r.launcher.do_send(LaunchInstances {
        count: 1,
        decision_id: "as-unhealthy".into(),
    });
    let done = r.finished().await;
    let e = done.error.expect("an error");
    assert!(e.contains("did not accept TCP"), "{e}");
    assert!(r.hosts.load_strict().unwrap().is_empty());
    // The instance of the failed launch is terminated, not left running unregistered.
    assert!(
        group_instances(&api).await.is_empty(),
        "{:?}",
        group_instances(&api).await
    );
}

fn script(dir: &Path, name: &str, body: &str) -> CommandLine {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    CommandLine(vec![p.display().to_string()])
}

#[actix_rt::test]
async fn command_launcher() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), None);
    let command = |up: CommandLine, timeout: Duration| {
        Provisioner::Command(CommandProvisioner {
            up,
            down: CommandLine::default(),
            timeout,
        })
    };
    // A script that prints the new hosts as JSON (it sees the decision and count).
    let good = script(
        tmp.path(),
        "grow.sh",
        r#"echo "[{\"host\": \"127.0.1.50\", \"port\": 8081, \"instance_id\": \"$AUTOSCALER_DECISION\"}]""#,
    );
    let mut r = rig(&cfg, command(good, Duration::from_secs(10)));
    r.launcher.do_send(LaunchInstances {
        count: 1,
        decision_id: "as-cmd-1".into(),
    });
    let done = r.finished().await;
    assert_eq!(done.error, None);
    let hosts = r.hosts(1).await;
    assert_eq!(hosts[0].host.to_string(), "127.0.1.50");
    assert_eq!(hosts[0].instance_id.as_deref(), Some("as-cmd-1"));
    assert_eq!(hosts[0].origin, Origin::Launched);

    // Garbage on stdout: a clear error naming the command; nothing registered.
    let tmp2 = tempfile::tempdir().unwrap();
    let cfg2 = config(tmp2.path(), None);
    let bad = script(tmp2.path(), "garbage.sh", "echo 'launched ok!'");
    let mut r = rig(&cfg2, command(bad, Duration::from_secs(10)));
    r.launcher.do_send(LaunchInstances {
        count: 1,
        decision_id: "as-cmd-2".into(),
    });
    let e = r.finished().await.error.expect("an error");
    assert!(
        e.contains("garbage.sh") && e.contains("expected JSON"),
        "{e}"
    );
    assert!(r.hosts.load_strict().unwrap().is_empty());

    // A command that hangs is killed at the timeout.
    let hang = script(tmp2.path(), "hang.sh", "exec sleep 60");
    let mut r = rig(&cfg2, command(hang, Duration::from_millis(500)));
    r.launcher.do_send(LaunchInstances {
        count: 1,
        decision_id: "as-cmd-3".into(),
    });
    let e = r.finished().await.error.expect("an error");
    assert!(
        e.contains("hang.sh") && e.contains("did not finish within 500ms"),
        "{e}"
    );
}

/// dry_run: the master starts and decides with no launch settings at all.
#[actix_rt::test]
async fn dry_run_master_needs_no_launch_settings() {
    let tmp = tempfile::tempdir().unwrap();
    autoscaler_actors::admin::init(tmp.path(), Role::Master, false).unwrap();
    let mut cfg = Config::load(&tmp.path().join("autoscaler.ini")).unwrap();
    assert!(cfg.scaling.dry_run && cfg.launch.image_id.is_empty());
    crate::common::keygen(&cfg.ssh.identity_file);
    // The master also rewrites haproxy.cfg; never touch the machine's own HAProxy service.
    cfg.haproxy.reload_command = CommandLine(vec!["true".into()]);
    let log = Logger::root(slog::Discard, o!());
    let m = autoscaler_actors::start_master(
        &cfg,
        Duration::from_secs(1),
        Duration::from_millis(100),
        &log,
    )
    .await
    .unwrap();
    assert!(m.launcher.is_none());
    // Without dry_run and without an AMI, the configuration itself is refused.
    cfg.scaling.dry_run = false;
    let text = cfg.to_ini_text();
    let e = Config::parse(&text, &tmp.path().join("autoscaler.ini"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[launch] image_id"), "{e}");
}
