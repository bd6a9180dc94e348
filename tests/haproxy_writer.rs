//! HaproxyWriter against a real HAProxy in master-worker mode, started here in a temp dir on
//! loopback: host changes become a validated config and a hitless reload; a config HAProxy
//! rejects never replaces the live one.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{free_port, tool, LogBuf, Proc};
use actix::Actor;
use autoscaler_actors::admin::{self, Output};
use autoscaler_actors::config::{CommandLine, Config, Role};
use autoscaler_actors::hosts::{Host, HostName};
use autoscaler_actors::master::haproxy_writer::HaproxyWriter;
use autoscaler_actors::master::messages::HostsChanged;
use autoscaler_actors::render::{HaproxyTemplate, HAPROXY_TEMPLATE};

/// `show servers state` of the backend, through the runtime API.
fn servers_state(sock: &Path) -> String {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return String::new();
    };
    let _ = s.write_all(b"show servers state app\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn host(port: u16) -> Host {
    Host::manual(HostName::parse("127.0.0.1").unwrap(), port)
}

async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn host_changes_reach_a_running_haproxy_and_bad_configs_never_do() {
    let Some(haproxy) = tool("haproxy") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    admin::init(dir, Role::Master, false).unwrap();
    let mut cfg = Config::load(&dir.join("autoscaler.ini")).unwrap();
    cfg.haproxy.bind = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    cfg.haproxy.debounce = Duration::from_millis(100);
    let pidfile = dir.join("haproxy.pid");
    cfg.haproxy.reload_command = CommandLine(vec![
        "sh".into(),
        "-c".into(),
        format!("kill -USR2 $(cat {})", pidfile.display()),
    ]);
    admin::generate(&cfg, &Output::File(cfg.haproxy.config_path.clone()), true).unwrap();
    let _haproxy = Proc(
        Command::new(&haproxy)
            .arg("-W")
            .arg("-f")
            .arg(&cfg.haproxy.config_path)
            .arg("-p")
            .arg(&pidfile)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let sock = cfg.haproxy.stats_socket.clone();
    wait_until("HAProxy's stats socket", Duration::from_secs(10), || {
        sock.exists() && pidfile.exists()
    })
    .await;

    // Backends that answer TCP on loopback, so health checks stay on this machine.
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (pa, pb) = (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    );
    let log = LogBuf::default();
    let cfg = Arc::new(cfg);
    let writer = HaproxyWriter::new(
        cfg.clone(),
        HaproxyTemplate::load(None).unwrap(),
        &log.logger(),
    )
    .start();

    writer.do_send(HostsChanged {
        hosts: Arc::new(vec![host(pa), host(pb)]),
    });
    let (na, nb) = (format!("127.0.0.1_{pa}"), format!("127.0.0.1_{pb}"));
    wait_until(
        "both servers live in HAProxy",
        Duration::from_secs(15),
        || {
            let s = servers_state(&sock);
            s.contains(&na) && s.contains(&nb)
        },
    )
    .await;
    log.wait_for("HAProxy reloaded", Duration::from_secs(5))
        .await;

    // A host leaves (drain before scale-in): gone from HAProxy after the reload.
    writer.do_send(HostsChanged {
        hosts: Arc::new(vec![host(pa)]),
    });
    wait_until(
        "the removed server gone from HAProxy",
        Duration::from_secs(15),
        || {
            let s = servers_state(&sock);
            s.contains(&na) && !s.contains(&nb)
        },
    )
    .await;
    let live = std::fs::read_to_string(&cfg.haproxy.config_path).unwrap();

    // A template HAProxy rejects: logged, live file untouched, HAProxy still serving the old one.
    let bad = HaproxyTemplate::from_source(
        "bad",
        &HAPROXY_TEMPLATE.replace(
            "balance roundrobin",
            "balance roundrobin\n    frobnicate yes",
        ),
    )
    .unwrap();
    let bad_writer = HaproxyWriter::new(cfg.clone(), bad, &log.logger()).start();
    bad_writer.do_send(HostsChanged {
        hosts: Arc::new(vec![host(pa), host(pb)]),
    });
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
    let s = servers_state(&sock);
    assert!(s.contains(&na) && !s.contains(&nb), "{s}");
    drop((a, b));
}
