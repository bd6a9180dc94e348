//! README's "Your first fleet, step by step", followed as written on one machine: two web
//! servers in network namespaces of their own (each with its own mount namespace, so each has
//! its own report socket directory at the path the master forwards to), each with sshd set up
//! by step 3's settings, the agent, and a web server on port 8080; the master in a sandbox
//! directory (`init --dir`), HAProxy run by hand in master-worker mode and reloaded with a
//! signal, as step 5 says for machines without systemd. Where the README runs `systemctl`,
//! the test runs the same program directly.
//!
//! Where it differs from the README, and why: `/etc/autoscaler` is a sandbox directory (`init
//! --dir`), so the node's `report_socket` is set to the master's (with the system layout both
//! default to /run/autoscaler/reports/master.sock); everything runs as the test's user, which
//! stands in for `autoscaler` (step 3's `Match User`); HAProxy binds 127.0.0.1 and a free port
//! instead of *:80; step 7's thresholds, window and warm-up are set so that one busy core
//! scales up within seconds, and the scale-up command starts a web server on this machine
//! instead of calling a cloud.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{
    bin, current_user, free_port, mounted_over, readme_sshd_snippet, root, stderr, stdout, tool,
    MasterProc, Netns, Proc, Sandbox, Sshd,
};

/// One web server: its namespaces (sshd's), its agent and its application.
struct Web {
    ns: Netns,
    sshd: Sshd,
    _agent: Proc,
    _app: Proc,
    _dir: tempfile::TempDir,
}

/// `nsenter` into sshd's network and mount namespaces, then `argv`.
fn in_node(sshd: &Sshd, argv: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.args(["-t", &sshd.pid().unwrap().to_string(), "-m", "-n"])
        .args(argv);
    c
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
    stdout(&out)
}

/// Step 3 on one web server.
fn web_server(n: u8, reports: &Path, master: &Sandbox, sshd_bin: &Path) -> Web {
    let ns = Netns::create(n);
    let dir = tempfile::tempdir().unwrap();
    // The node's own /run/autoscaler/reports: its directory mounted over the master's path.
    // As the unit makes it (RuntimeDirectory, mode 0700).
    let own = dir.path().join("reports");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::set_permissions(&own, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut sshd = Sshd::start_wrapped(
        sshd_bin,
        &ns.inner,
        &master.path().join("id_ed25519.pub"),
        Some(&ns.name),
        &mounted_over(&own, reports),
    );
    // /etc/ssh/sshd_config.d/50-autoscaler.conf, as step 3 writes it.
    sshd.append_config(sshd_bin, &readme_sshd_snippet(&current_user()));
    // autoscaler init --role node; install -m 0600 report.key /etc/autoscaler/report.key
    let etc = dir.path().join("etc");
    sh(Command::new(bin()).args(["init", "--role", "node", "--dir", etc.to_str().unwrap()]));
    sh(Command::new("install").args([
        "-m",
        "0600",
        master.path().join("report.key").to_str().unwrap(),
        etc.join("report.key").to_str().unwrap(),
    ]));
    // The node's report socket is where the master forwards to (the same path on every node).
    let ini = etc.join("autoscaler.ini");
    let text = std::fs::read_to_string(&ini).unwrap();
    let text: String = text
        .lines()
        .map(|l| match l.split_once(" = ") {
            Some(("report_socket", _)) => {
                format!(
                    "report_socket = {}\n",
                    reports.join("master.sock").display()
                )
            }
            _ => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&ini, text).unwrap();
    // The agent, as the unit runs it, in the node's namespaces.
    let agent = Proc(
        in_node(&sshd, &[bin().to_str().unwrap(), "node"])
            .env("AUTOSCALER_CONFIG", &ini)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    // The web server on 8080.
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), format!("web-{n}\n")).unwrap();
    let app = Proc(
        in_node(
            &sshd,
            &[
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                &ns.inner,
                "--directory",
                www.to_str().unwrap(),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    Web {
        ns,
        sshd,
        _agent: agent,
        _app: app,
        _dir: dir,
    }
}

/// What `GET /` on `addr` answers (None while nothing does).
fn get(addr: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET / HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.starts_with("HTTP/1.0 200").then(|| {
        body.rsplit("\r\n\r\n")
            .next()
            .unwrap_or("")
            .trim()
            .to_string()
    })
}

/// Waits (bounded) until `f` says yes; panics with `what` and `detail()` otherwise.
fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool, detail: impl Fn() -> String) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < end,
            "{what} within {limit:?}: {}",
            detail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_first_fleet_as_the_readme_tells_it() {
    let (Some(sshd_bin), Some(haproxy), Some(keyscan), Some(_), Some(_), true) = (
        tool("sshd"),
        tool("haproxy"),
        tool("ssh-keyscan"),
        tool("ip"),
        tool("unshare"),
        root(),
    ) else {
        return;
    };
    // 2. The master's files: `autoscaler init` and `ssh-keygen` (the sandbox does both).
    let m = Sandbox::new();
    let front = free_port("127.0.0.1");
    m.set("ssh", "user", &current_user());
    m.set("haproxy", "bind", &format!("127.0.0.1:{front}"));
    let pidfile = m.path().join("haproxy.pid");
    m.set(
        "haproxy",
        "reload_command",
        &format!("sh -c 'kill -USR2 $(cat {})'", pidfile.display()),
    );
    let reports: PathBuf = m.path().join("reports");
    std::fs::create_dir_all(&reports).unwrap();
    // 3. Each web server.
    let webs = [
        web_server(41, &reports, &m, &sshd_bin),
        web_server(42, &reports, &m, &sshd_bin),
    ];
    // 4. Register them and trust their SSH keys.
    for w in &webs {
        let out = m.run(&["add-host", &w.ns.inner, "8080"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let addrs: Vec<&str> = webs.iter().map(|w| w.ns.inner.as_str()).collect();
    let keys = sh(Command::new(&keyscan).args(["-t", "ed25519"]).args(&addrs));
    std::fs::write(m.path().join("known_hosts"), &keys).unwrap();
    for w in &webs {
        assert!(keys.contains(w.sshd.known_hosts_line().trim()), "{keys}");
    }
    // 5. HAProxy: the first configuration, then HAProxy in master-worker mode by hand.
    let out = m.run(&["generate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let _haproxy = Proc(
        Command::new(&haproxy)
            .args(["-W", "-f"])
            .arg(m.path().join("haproxy.cfg"))
            .arg("-p")
            .arg(&pidfile)
            .arg("-S")
            .arg(m.path().join("haproxy-master.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lb = format!("127.0.0.1:{front}");
    let seen = std::cell::RefCell::new(std::collections::BTreeSet::new());
    until(
        Duration::from_secs(15),
        "HAProxy serving both web servers",
        || {
            seen.borrow_mut().extend(get(&lb));
            seen.borrow().len() == 2
        },
        || format!("{:?}", seen.borrow()),
    );
    assert_eq!(
        seen.into_inner().into_iter().collect::<Vec<_>>(),
        ["web-41", "web-42"]
    );
    // 6. Start the master and see that it works.
    let out = m.run(&["check", "--fleet"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(
        text.contains("local  reload ok: `sh` found; master CLI answers"),
        "{text}"
    );
    let master = MasterProc::spawn(&m.config(), &[]);
    master.wait_msg("Started");
    let status = || {
        let out = m.run(&["status", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    // "both hosts with TUNNEL up and a CPU figure, and local applied for HAProxy"
    let both_up = |st: &serde_json::Value| {
        st["nodes"].as_array().is_some_and(|n| {
            n.len() == 2
                && n.iter()
                    .all(|n| n["tunnel"] == "up" && n["last_cpu_pct"].is_number())
        }) && st["haproxy"][0]["server"] == "local"
            && st["haproxy"][0]["state"] == "applied"
    };
    until(
        Duration::from_secs(30),
        "both hosts up with a CPU figure and HAProxy applied in status",
        || both_up(&status()),
        || {
            let logs: Vec<String> = webs
                .iter()
                .map(|w| {
                    std::fs::read_to_string(w._dir.path().join("agent.log")).unwrap_or_default()
                })
                .collect();
            format!("{}\nagents:\n{}", status(), logs.join("\n"))
        },
    );
    // Now check --fleet also hears both agents through the running master.
    let out = m.run(&["check", "--fleet"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.matches("agent: heard by the running master").count(),
        2,
        "{text}"
    );

    // 7. Let it scale, with a command that starts a web server here and prints it.
    let www = m.path().join("www-new");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "web-new\n").unwrap();
    let up = m.path().join("scale-up.sh");
    let new_port = free_port("127.0.1.91");
    std::fs::write(
        &up,
        format!(
            "#!/bin/sh\nset -eu\necho \"starting a web server for $AUTOSCALER_DECISION\" >&2\n\
             setsid python3 -m http.server {new_port} --bind 127.0.1.91 --directory {} \
             </dev/null >/dev/null 2>&1 &\n\
             echo '{{\"host\": \"127.0.1.91\", \"port\": {new_port}, \"instance_id\": \"web-new\"}}'\n",
            www.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&up, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // One busy core is 100/cores % of the machine the agents measure: the threshold is set
    // at 60 % of that.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threshold = format!("{:.1}%", 60.0 / cores as f64);
    for (section, key, value) in [
        ("launch", "launcher", "command"),
        ("launch", "scale_up_command", up.to_str().unwrap()),
        ("scaling", "scale_up_threshold", threshold.as_str()),
        ("scaling", "scale_down_threshold", "0.5%"),
        ("scaling", "scale_up_window", "5s"),
        ("scaling", "warmup", "0s"),
        ("scaling", "max_nodes", "3"),
        ("scaling", "dry_run", "false"),
    ] {
        m.set(section, key, value);
    }
    // Leaving dry run needs a restart.
    master.terminate();
    master.wait_msg("Stopped");
    drop(master);
    let master = MasterProc::spawn(&m.config(), &[]);
    master.wait_msg("Started");
    // Load: one core busy on web-1 (bounded).
    let _load = Proc(
        in_node(
            &webs[0].sshd,
            &["timeout", "60", "sh", "-c", "while :; do :; done"],
        )
        .spawn()
        .unwrap(),
    );
    until(
        Duration::from_secs(60),
        "the new web server served through HAProxy",
        || get(&lb).as_deref() == Some("web-new"),
        || format!("{}\n{}", stdout(&m.run(&["status"])), master_log(&master)),
    );
    let hosts = stdout(&m.run(&["list-hosts"]));
    assert!(hosts.contains("127.0.1.91"), "{hosts}");
    master.terminate();
    // The scale-up command's web server goes with the sandbox (it names the sandbox's path).
}

fn master_log(m: &MasterProc) -> String {
    m.matching(|_| true)
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}
