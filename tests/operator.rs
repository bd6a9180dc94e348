//! What an operator runs and reads, through the binary: `check` as strict as start-up, the
//! configuration pitfalls, `init` honouring --config, completions and the man page, the
//! service manager's notifications and SIGHUP reloads.

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use crate::common::{bin, stderr, stdout, tool, MasterProc, Sandbox};

#[test]
fn check_exits_78_for_what_would_stop_the_master() {
    if tool("ssh-keygen").is_none() {
        return;
    }
    let s = Sandbox::without_key();
    let key = s.path().join("id_ed25519");
    let out = s.run(&["check"]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("[ssh] identity_file"), "{err}");
    let hint = format!("ssh-keygen -t ed25519 -N '' -f {}", key.display());
    assert!(err.contains(&hint), "{err}");
    // The command it names is the one that fixes it.
    let (prog, args) = ("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f"]);
    assert!(Command::new(prog)
        .args(args)
        .arg(&key)
        .status()
        .unwrap()
        .success());
    assert!(s.run(&["check"]).status.success());
    // A key in a format russh cannot use is found too.
    fs::write(&key, "-----BEGIN NONSENSE-----\n").unwrap();
    let err = stderr(&s.run(&["check"]));
    assert!(err.contains("cannot be used"), "{err}");
    fs::remove_file(&key).unwrap();
    crate::common::keygen(&key);

    // A template that does not render, a user-data file that does not exist, an unresolvable
    // region: every problem at once, each naming its key.
    fs::write(
        s.path().join("bad.cfg.tera"),
        "global\n{{ no_such_variable }}\n",
    )
    .unwrap();
    s.set("haproxy", "template", "bad.cfg.tera");
    s.set("scaling", "dry_run", "false");
    s.set("launch", "image_id", "ami-12345678");
    s.set("launch", "user_data_file", "missing-user-data.yaml");
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("check")
        .env("AUTOSCALER_CONFIG", s.config())
        .env("HOME", home.path())
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_CONFIG_FILE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let err = stderr(&out);
    for key in [
        "[haproxy] template",
        "[launch] user_data_file",
        "[aws] region",
    ] {
        assert!(err.contains(key), "{key} missing: {err}");
    }
    assert!(err.contains("3 problems"), "{err}");
    // The region can come from the environment, as for the aws CLI.
    let out = Command::new(bin())
        .arg("check")
        .env("AUTOSCALER_CONFIG", s.config())
        .env("HOME", home.path())
        .env("AWS_REGION", "eu-west-3")
        .output()
        .unwrap();
    assert!(!stderr(&out).contains("[aws] region"), "{}", stderr(&out));
}

/// A value that starts with a quote keeps it: the command line reaches the launcher as
/// written, and `check` prints a line that reads back to the same value.
#[test]
fn a_quoted_command_round_trips_through_check() {
    let s = Sandbox::new();
    let line = r#""/opt/my tools/up" --n 2 'a b'"#;
    s.set("launch", "scale_up_command", line);
    let out = s.run(&["check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    let shown = printed
        .lines()
        .find(|l| l.starts_with("scale_up_command = "))
        .unwrap();
    // Feed `check`'s own output back as the configuration: it must parse to the same text.
    let again = Sandbox::new();
    let body: String = printed
        .lines()
        .filter(|l| !l.starts_with("# Effective"))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .replace(
            &format!("identity_file = {}", s.path().join("id_ed25519").display()),
            &format!(
                "identity_file = {}",
                again.path().join("id_ed25519").display()
            ),
        );
    fs::write(again.config(), body).unwrap();
    let out = again.run(&["check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reshown = stdout(&out);
    assert!(reshown.lines().any(|l| l == shown), "{shown}\n{reshown}");
    // And the words are the ones a shell would make of it.
    let words = autoscaler_actors::config::Config::load(&s.config())
        .unwrap()
        .launch
        .scale_up_command;
    assert_eq!(words.0, ["/opt/my tools/up", "--n", "2", "a b"]);
}

#[test]
fn zero_durations_mean_off_or_are_refused() {
    let s = Sandbox::new();
    s.set("ssh", "keepalive", "0s");
    let out = s.run(&["check"]);
    assert!(
        out.status.success(),
        "keepalive 0s is off: {}",
        stderr(&out)
    );
    for (section, key) in [
        ("launch", "command_timeout"),
        ("haproxy", "command_timeout"),
    ] {
        let s = Sandbox::new();
        s.set(section, key, "0s");
        let out = s.run(&["check"]);
        assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("[{section}] {key}")),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn health_check_path_refuses_what_haproxy_would_interpret() {
    for bad in ["/a b", "/x#y", "/${HOME}", "/q\"uote", "health"] {
        let s = Sandbox::new();
        s.set("haproxy", "health_check_path", bad);
        let out = s.run(&["check"]);
        assert_eq!(out.status.code(), Some(78), "{bad:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("[haproxy] health_check_path"),
            "{}",
            stderr(&out)
        );
    }
    let s = Sandbox::new();
    s.set("haproxy", "health_check_path", "/healthz?full=1");
    assert!(s.run(&["check"]).status.success());
    // Paths get the control-character check every string gets.
    let s = Sandbox::new();
    s.set("autoscaler", "state_dir", "/var/lib/a\u{1b}[2Jb");
    let out = s.run(&["check"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("control character"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn init_writes_where_config_points() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("etc").join("as.ini");
    let out = Command::new(bin())
        .arg("init")
        .env("AUTOSCALER_CONFIG", &file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(file.exists(), "init ignored $AUTOSCALER_CONFIG");
    assert!(tmp.path().join("etc/hosts.d").is_dir());
    let other = tmp.path().join("other.ini");
    let out = Command::new(bin())
        .args([
            "--config",
            other.to_str().unwrap(),
            "init",
            "--role",
            "node",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(fs::read_to_string(&other).unwrap().contains("role = node"));
    // And the commands that follow read what init wrote.
    let out = Command::new(bin())
        .args(["list-hosts"])
        .env("AUTOSCALER_CONFIG", &file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn completions_and_man_page_come_from_the_command_line_definition() {
    let run = |args: &[&str]| Command::new(bin()).args(args).output().unwrap();
    let bash = run(&["completions", "bash"]);
    assert!(bash.status.success());
    let bash = stdout(&bash);
    for word in ["add-host", "status", "generate", "--config", "complete -F"] {
        assert!(bash.contains(word), "{word} missing from bash completions");
    }
    if let Some(bash_bin) = tool("bash") {
        // The script loads in a real bash.
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("c.bash");
        fs::write(&f, &bash).unwrap();
        let st = Command::new(bash_bin)
            .arg("-c")
            .arg(format!("source {} && complete -p autoscaler", f.display()))
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", stderr(&st));
    }
    let zsh = stdout(&run(&["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef autoscaler"), "{zsh}");
    let man = run(&["man"]);
    assert!(man.status.success());
    let man = stdout(&man);
    assert!(man.contains(".TH autoscaler 1"), "{man}");
    assert!(man.contains("add\\-host"), "subcommands listed");
    if let Some(groff) = tool("groff") {
        let out = crate::common::output_with_stdin(
            Command::new(groff).args(["-man", "-Tutf8", "-ww", "-z"]),
            &man,
        );
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{}",
            stderr(&out)
        );
    }
}

/// Reads notifications the master sends to `$NOTIFY_SOCKET`.
struct Notifications(UnixDatagram);

impl Notifications {
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.0.recv(&mut buf).expect("no notification within 20 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

fn hup(m: &MasterProc) {
    let st = Command::new("kill")
        .args(["-HUP", &m.proc.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Type=notify: READY once started, RELOADING then READY around a SIGHUP, STOPPING on the way
/// out. A valid file's [scaling] applies live, other changes are logged as needing a restart,
/// and a file with problems is refused with every problem logged, the running one kept.
#[test]
fn notifies_systemd_and_reloads_on_sighup() {
    if tool("haproxy").is_none() || tool("ssh-keygen").is_none() {
        return;
    }
    let s = Sandbox::new();
    s.set("haproxy", "reload_command", "true");
    let sock = s.path().join("notify.sock");
    let notes = Notifications(UnixDatagram::bind(&sock).unwrap());
    notes
        .0
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let master =
        MasterProc::spawn_with_env(&s.config(), &[], &[("NOTIFY_SOCKET", sock.as_os_str())]);
    assert_eq!(notes.next().trim(), "READY=1");
    master.wait_msg("Started");
    let status = |s: &Sandbox| -> serde_json::Value {
        let out = s.run(&["status", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(status(&s)["policy"], "instance");

    // A live change and one that needs a restart.
    s.set("scaling", "policy", "cluster");
    s.set("ssh", "port", "2222");
    hup(&master);
    assert_eq!(notes.next().trim(), "RELOADING=1");
    let restart = master.wait_msg("Changed setting needs a restart to take effect");
    assert_eq!(restart["key"], "[ssh] port", "{restart}");
    let applied = master.wait_msg("Configuration reloaded");
    assert!(
        applied["applied"]
            .as_str()
            .unwrap()
            .contains("[scaling] policy"),
        "{applied}"
    );
    assert_eq!(notes.next().trim(), "READY=1");
    assert_eq!(status(&s)["policy"], "cluster", "applied live");

    // A file with problems is refused, every one named, and the running policy kept.
    s.set("scaling", "policy", "instance");
    s.set("scaling", "scale_up_threshold", "150");
    s.set("scaling", "cooldown", "soon");
    hup(&master);
    assert_eq!(notes.next().trim(), "RELOADING=1");
    let refused = master.wait_msg("Configuration not reloaded; the running one is kept");
    let err = refused["error"].as_str().unwrap();
    assert!(
        err.contains("[scaling] scale_up_threshold") && err.contains("[scaling] cooldown"),
        "{refused}"
    );
    assert_eq!(notes.next().trim(), "READY=1");
    assert_eq!(status(&s)["policy"], "cluster", "old configuration kept");

    // A file that is not INI any more (a broken section header, a line that is not `key =
    // value`) and has a bad value besides: refused on SIGHUP with every problem at once, and
    // `status` still reaches the running master (it used to stop at the file, exit 78).
    let good = fs::read_to_string(s.config()).unwrap();
    let broken = good
        .replace("[scaling]", "[scaling")
        .replace("cooldown = soon", "cooldown = later")
        + "this is not ini\n";
    fs::write(s.config(), broken).unwrap();
    hup(&master);
    assert_eq!(notes.next().trim(), "RELOADING=1");
    let refused = master.wait_msg("Configuration not reloaded; the running one is kept");
    let err = refused["error"].as_str().unwrap();
    assert!(
        err.contains("section header \"[scaling\"")
            && err.contains("\"this is not ini\" is not `key = value`")
            && err.contains("[scaling] cooldown"),
        "{refused}"
    );
    assert_eq!(notes.next().trim(), "READY=1");
    let out = s.run(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["policy"], "cluster");
    fs::write(s.config(), good).unwrap();

    master.terminate();
    assert_eq!(notes.next().trim(), "STOPPING=1");
    master.wait_msg("Stopped");
}

/// `simulate` replays a shipped trace through the policy with the file's [scaling], prints the
/// decisions and draws a plot that an XML parser accepts.
#[test]
fn simulate_replays_a_trace_with_the_configured_policy() {
    let s = Sandbox::new();
    let trace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/traces/spike.csv");
    let svg = s.path().join("spike.svg");
    let out = s.run(&[
        "simulate",
        "--trace",
        trace.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let up = text
        .lines()
        .find(|l| l.contains("scale-up +1"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(up.contains("(threshold 75%)"), "{text}");
    assert!(text.contains("ready        new-1 serves"), "{text}");
    assert!(text.contains("scale-in     new-1"), "{text}");
    assert!(
        text.contains("1 scale-ups (1 instances), 1 scale-ins, at most 4 nodes"),
        "{text}"
    );
    let plot = fs::read_to_string(&svg).unwrap();
    assert!(plot.contains("scale_up_threshold 75%") && plot.contains("new-1"));
    if let Some(python) = tool("python3") {
        let st = Command::new(python)
            .args([
                "-c",
                "import sys, xml.etree.ElementTree as E; E.parse(sys.argv[1])",
            ])
            .arg(&svg)
            .output()
            .unwrap();
        assert!(st.status.success(), "not well-formed XML: {}", stderr(&st));
    }

    // The configuration's settings are the ones replayed: a higher threshold, no scale-up.
    s.set("scaling", "scale_up_threshold", "99");
    let out = s.run(&["simulate", "--trace", trace.to_str().unwrap(), "--holds"]);
    let text = stdout(&out);
    assert!(!text.contains("scale-up +"), "{text}");
    assert!(text.contains("hold         load within bounds"), "{text}");
    assert!(text.contains("0 scale-ups"), "{text}");

    // The trace recorded from a slow backend at idle CPU: with no HAProxy signal on, its
    // HAProxy columns are noted and nothing scales; with a sessions target, the replay
    // scales up on them and the plot shows them against the target.
    let slow =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/traces/slow-backend.csv");
    s.set("scaling", "scale_up_threshold", "75");
    let out = s.run(&["simulate", "--trace", slow.to_str().unwrap()]);
    let text = stdout(&out);
    assert!(text.contains("(1 node, HAProxy figures, 0:"), "{text}");
    assert!(
        text.contains("and scale_up_window is 1m: no such window is ever covered"),
        "{text}"
    );
    for (k, v) in [
        ("scale_up_window", "3s"),
        ("scale_down_window", "4s"),
        ("warmup", "0s"),
        ("cooldown", "2s"),
        ("scale_down_cooldown", "1s"),
    ] {
        s.set("scaling", k, v);
    }
    let replay = |s: &Sandbox| {
        let svg = s.path().join("slow.svg");
        let out = s.run(&[
            "simulate",
            "--trace",
            slow.to_str().unwrap(),
            "--launch-delay",
            "2s",
            "--svg",
            svg.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        (stdout(&out), fs::read_to_string(&svg).unwrap())
    };
    let (text, _) = replay(&s);
    assert!(
        text.contains("the trace has HAProxy columns and no HAProxy signal is on"),
        "{text}"
    );
    assert!(text.contains("0 scale-ups"), "{text}");
    s.set("scaling", "target_sessions_per_node", "4");
    let (text, plot) = replay(&s);
    let up = text
        .lines()
        .find(|l| l.contains("scale-up +1"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        up.contains("[sessions]") && up.contains("at 4 per node"),
        "{text}"
    );
    assert!(text.contains("scale-in     new-1"), "{text}");
    assert!(plot.contains("sessions per node, % of 4"));
    s.set("scaling", "target_sessions_per_node", "");

    // A broken trace names its line.
    let bad = s.path().join("bad.csv");
    fs::write(&bad, "time,node,busy\n0,web-1,10\n5,web-1,lots\n").unwrap();
    let out = s.run(&["simulate", "--trace", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("line 3: busy \"lots\" is not a number"),
        "{}",
        stderr(&out)
    );
}
