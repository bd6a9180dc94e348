//! Scaling on what HAProxy measures, end to end: the master binary, a real HAProxy in
//! master-worker mode, a real sshd per node with stand-in agents reporting idle CPU, and a
//! backend that answers slowly. The master reads HAProxy's figures through the runtime API
//! and scales up on the requests in progress while the CPU stays idle, then back in once the
//! load stops.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{
    free_port, stderr, stdout, tool, FakeAgent, HttpBackend, MasterProc, Proc, Sandbox, Sshd,
};
use autoscaler_actors::haproxy_api::{parse_stats, LbSample};

/// `workers` clients, each sending one request after another through HAProxy's frontend
/// until stopped (at most `limit`); counts the answers that were not a 200.
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(front: u16, workers: usize, limit: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let end = Instant::now() + limit;
        let threads = (0..workers)
            .map(|_| {
                let (stop, failed) = (stop.clone(), failed.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                        let ok = (|| -> std::io::Result<bool> {
                            let mut s = TcpStream::connect(("127.0.0.1", front))?;
                            s.set_read_timeout(Some(Duration::from_secs(10)))?;
                            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
                            let mut out = String::new();
                            s.read_to_string(&mut out)?;
                            Ok(out.starts_with("HTTP/1.1 200"))
                        })();
                        if !matches!(ok, Ok(true)) {
                            failed.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            failed,
            threads,
        }
    }

    /// Stops the clients; the requests that failed.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.failed.load(Ordering::SeqCst)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One runtime API command on `sock`, answered.
fn api(sock: &Path, cmd: &str) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Every second, what HAProxy measures for `backend` (as the master reads it), with the
/// time since the recorder started; until stopped (at most two minutes).
struct Recorder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(f64, LbSample)>>>,
}

impl Recorder {
    fn start(sock: PathBuf, backend: &str) -> Recorder {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, backend) = (stop.clone(), backend.to_string());
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut rows = Vec::new();
            while !flag.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(120) {
                let text = api(&sock, &format!("show stat {backend} 6 -1"));
                rows.push((
                    t0.elapsed().as_secs_f64().round(),
                    parse_stats(&text, &backend).unwrap(),
                ));
                std::thread::sleep(Duration::from_secs(1));
            }
            rows
        });
        Recorder {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<(f64, LbSample)> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The servers HAProxy has in `backend` (`show servers state`).
fn servers(sock: &Path, backend: &str) -> Vec<String> {
    api(sock, &format!("show servers state {backend}"))
        .lines()
        .filter(|l| !l.starts_with('#') && l.split_whitespace().count() > 4)
        .map(|l| l.split_whitespace().nth(3).unwrap().to_string())
        .collect()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The acceptance run of the HAProxy signals: a backend that takes 100 ms per request at
/// idle CPU (5 %, far under the 75 % threshold) under six clients — six requests in
/// progress against a target of four per node: the master adds a node on `sessions`, the
/// new node serves, and once the load stops the fleet is scaled back in and the launched
/// node leaves HAProxy, though the scale-up `cooldown` (5 m) still runs: only
/// `scale_down_cooldown` (1 s) holds a scale-in. `status` and `/metrics` show the signals
/// against their targets, and each guard by name.
/// With `AUTOSCALER_RECORD_TRACE=FILE` the run's figures are written there as a trace for
/// `autoscaler simulate` (contrib/traces/slow-backend.csv was made so).
#[test]
fn a_slow_backend_at_idle_cpu_scales_up_on_concurrency_and_back_in() {
    let (Some(sshd_bin), Some(haproxy)) = (tool("sshd"), tool("haproxy")) else {
        return;
    };
    let s = Sandbox::new();
    let dir = s.path();
    let client_pub = dir.join("id_ed25519.pub");
    let (node_ip, new_ip) = ("127.0.2.41", "127.0.2.42");
    let node_sshd = Sshd::start(&sshd_bin, node_ip, None, &client_pub, None);
    let new_sshd = Sshd::start(&sshd_bin, new_ip, None, &client_pub, None);
    let node_app = HttpBackend::start(node_ip, "ok", Duration::from_millis(100));
    let new_app = HttpBackend::start(new_ip, "ok", Duration::from_millis(100));
    let (report_port, new_report_port) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let front = free_port("127.0.0.1");
    let metrics = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    // The "launch": the second machine is already up; the command names it.
    let grow = dir.join("grow.sh");
    std::fs::write(
        &grow,
        format!(
            "#!/bin/sh\necho '{{\"host\": \"{new_ip}\", \"port\": {}, \"ssh_port\": {}, \"report_port\": {new_report_port}, \"instance_id\": \"'\"$AUTOSCALER_DECISION\"'\"}}'\n",
            new_app.port, new_sshd.port
        ),
    )
    .unwrap();
    std::fs::set_permissions(&grow, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    s.set_all(&crate::common::quick_command_master(report_port, &grow));
    let sock = dir.join("admin.sock");
    let cfg_path = dir.join("haproxy.cfg");
    for (section, key, value) in [
        ("autoscaler", "metrics_address", metrics.clone()),
        ("scaling", "target_sessions_per_node", "4".into()),
        ("scaling", "target_response_time", "1s".into()),
        ("scaling", "scale_up_window", "3s".into()),
        ("scaling", "scale_down_window", "4s".into()),
        // A long scale-up cooldown does not hold the scale-in: scale_down_cooldown does.
        ("scaling", "cooldown", "5m".into()),
        ("scaling", "scale_down_cooldown", "1s".into()),
        ("scaling", "max_nodes", "2".into()),
        ("scaling", "drain_timeout", "10s".into()),
        ("haproxy", "config_path", cfg_path.display().to_string()),
        ("haproxy", "bind", format!("127.0.0.1:{front}")),
        (
            "haproxy",
            "check_command",
            format!("{} -c -f {{config}}", haproxy.display()),
        ),
        (
            "haproxy",
            "reload_command",
            format!(
                "sh -c 'kill -USR2 $(cat {})'",
                dir.join("haproxy.pid").display()
            ),
        ),
        ("haproxy", "stats_socket", sock.display().to_string()),
        (
            "haproxy",
            "master_socket",
            dir.join("haproxy-master.sock").display().to_string(),
        ),
        (
            "haproxy",
            "server_state_file",
            dir.join("server-state").display().to_string(),
        ),
        ("haproxy", "user", String::new()),
        ("haproxy", "group", String::new()),
        ("haproxy", "chroot", String::new()),
        ("haproxy", "check_interval", "500ms".into()),
    ] {
        s.set(section, key, &value);
    }
    let out = s.run(&[
        "add-host",
        node_ip,
        &node_app.port.to_string(),
        "--ssh-port",
        &node_sshd.port.to_string(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = s.run(&["generate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let _lb = Proc(
        Command::new(&haproxy)
            .arg("-W")
            .arg("-f")
            .arg(&cfg_path)
            .arg("-p")
            .arg(dir.join("haproxy.pid"))
            .arg("-S")
            .arg(dir.join("haproxy-master.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("HAProxy answers", Duration::from_secs(10), || {
        UnixStream::connect(&sock).is_ok() && dir.join("haproxy.pid").exists()
    });
    let secret = dir.join("report.key");
    let _agents = (
        FakeAgent::start(report_port, 5.0, &secret),
        FakeAgent::start(new_report_port, 5.0, &secret),
    );
    let master = MasterProc::spawn(&s.config(), &[]);
    master.wait_msg("Tunnel up");

    let recorder = Recorder::start(sock.clone(), "app");
    std::thread::sleep(Duration::from_secs(3));
    let load = Load::start(front, 6, Duration::from_secs(60));
    let started = Instant::now();
    let up = master.wait("a scale-up decision", |v| {
        v["msg"] == "Decision" && v["action"] == "scale_up"
    });
    let decided_after = started.elapsed();
    assert_eq!(up["signal"], "sessions", "{up}");
    assert_eq!(up["count"], 1, "{up}");
    assert!(
        up["reason"]
            .as_str()
            .unwrap()
            .contains("requests in progress over 3s (1 HAProxy server(s)) at 4 per node"),
        "{up}"
    );
    master.wait("the launched node in HAProxy", |v| {
        v["servers"] == 2 && v["msg"] == "HAProxy servers changed through the runtime API"
    });
    // The launched node takes its share of the requests.
    let before = new_app.served();
    wait_until("the launched node serves", Duration::from_secs(10), || {
        new_app.served() > before + 10
    });
    // What status and /metrics say while the load runs.
    let out = s.run(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let signal = |name: &str| {
        st["signals"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["signal"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing: {st}"))
    };
    let sessions = signal("sessions");
    assert_eq!(
        (
            &sessions["target"],
            &sessions["covered"],
            &sessions["missing"]
        ),
        (
            &serde_json::json!(4.0),
            &serde_json::json!(1),
            &serde_json::json!(0)
        ),
        "{st}"
    );
    let in_progress = sessions["value"].as_f64().unwrap();
    assert!((4.0..=7.0).contains(&in_progress), "{st}");
    assert_eq!(sessions["desired"], 2, "{st}");
    let rtime = signal("response_time")["value"].as_f64().unwrap();
    assert!((90.0..1000.0).contains(&rtime), "{st}");
    // The CPU stays idle: the node that carried the load reported 5 %.
    let first = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["host"] == node_ip)
        .cloned()
        .unwrap();
    assert_eq!(first["last_cpu_pct"], 5.0, "{st}");
    let table = stdout(&s.run(&["status"]));
    // Each guard by name, with the time it has left.
    assert!(table.contains("cooldown (no scale-up): "), "{table}");
    assert!(
        table.contains("launches in the last hour: 1 of max_launches_per_hour 6\n"),
        "{table}"
    );
    assert!(
        st["cooldown_left_s"].as_f64().unwrap() > 240.0
            && st["scale_down_cooldown_left_s"]
                .as_f64()
                .is_none_or(|left| left <= 1.0)
            && st["hourly_cap_left_s"].is_null(),
        "{st}"
    );
    assert!(
        table.contains("signal sessions: ")
            && table.contains("(target 4 per node; asks for 2 nodes; 1 HAProxy server(s))"),
        "{table}"
    );
    let (code, text) = crate::common::http_get(&metrics, "/metrics");
    assert_eq!(code, 200, "{text}");
    for want in [
        "autoscaler_haproxy_signal_target{signal=\"sessions\"} 4.0",
        "autoscaler_haproxy_signal_desired_nodes{signal=\"sessions\"} 2",
        "autoscaler_haproxy_signal_target{signal=\"response_time\"} 1000.0",
        "autoscaler_haproxy_signal_servers_silent 0",
        "autoscaler_decisions_total{action=\"scale_up\",reason=\"sessions\"} 1",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    if let Some(promtool) = tool("promtool") {
        let problem = crate::common::promtool_check(&promtool, &text);
        assert!(problem.is_none(), "{problem:?}");
    }

    // The load stops: after the scale-down window the launched node goes.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(load.stop(), 0, "requests failed under the load");
    let down = master.wait("a scale-in decision", |v| {
        v["msg"] == "Decision" && v["action"] == "scale_down"
    });
    assert_eq!(down["host"], new_ip, "{down}");
    wait_until(
        "the launched node leaves HAProxy",
        Duration::from_secs(20),
        || servers(&sock, "app").len() == 1,
    );
    assert_eq!(
        master
            .matching(|v| v["msg"] == "Decision" && v["action"] == "scale_up")
            .len(),
        1,
        "one scale-up for the whole run"
    );
    std::thread::sleep(Duration::from_secs(2));
    let rows = recorder.stop();
    let peak = rows.iter().map(|(_, r)| r.sessions).fold(0.0, f64::max);
    assert!((5.0..=7.0).contains(&peak), "{rows:?}");
    eprintln!(
        "scale-up decided {decided_after:?} after the load started; {} requests served",
        node_app.served() + new_app.served()
    );
    // The figures as a trace `autoscaler simulate` reads.
    let mut trace = String::from(
        "# Recorded by tests/signals.rs (a_slow_backend_at_idle_cpu_scales_up_on_concurrency_and_back_in):\n\
         # HAProxy 2.6 in front of a backend answering in 100 ms, six clients from 0:03 until the\n\
         # scale-in; the nodes' CPU is what their agents reported (idle). Figures read every second\n\
         # with `show stat app 6 -1`, as the master reads them.\n\
         time,node,busy,requests,sessions,queue,rtime_ms\n",
    );
    for (t, r) in &rows {
        trace += &format!(
            "{t},web-1,5,{},{},{},{}\n",
            r.rate,
            r.sessions,
            r.queue,
            r.rtime_ms.map(|x| x.to_string()).unwrap_or_default()
        );
    }
    let parsed = autoscaler_actors::simulate::Trace::parse(&trace).unwrap();
    assert_eq!(parsed.backend.len(), rows.len());
    if let Some(to) = std::env::var_os("AUTOSCALER_RECORD_TRACE") {
        std::fs::write(&to, &trace).unwrap();
    }
    master.terminate();
}
