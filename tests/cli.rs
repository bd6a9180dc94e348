//! The operator's commands, run as the built binary in temp dirs: init, add-host, list-hosts,
//! remove-host, generate (validated by the real HAProxy), check.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::common::{assert_fails, bin, stderr, stdout, tool, Sandbox};

#[test]
fn init_writes_a_private_complete_config_and_never_overwrites() {
    let s = Sandbox::new();
    let cfg = s.config();
    assert_eq!(
        fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(s.path().join("hosts.d").is_dir());
    let text = fs::read_to_string(&cfg).unwrap();
    let dir = s.path().display().to_string();
    for want in [
        "role = master\n".to_string(),
        format!("hosts_dir = {dir}/hosts.d\n"),
        format!("config_path = {dir}/haproxy.cfg\n"),
        format!("stats_socket = {dir}/haproxy.sock\n"),
        "dry_run = true\n".to_string(),
        "cooldown = 5m\n".to_string(),
    ] {
        assert!(text.contains(&want), "missing {want:?}");
    }
    // A second init refuses and leaves the (edited) file exactly as it was.
    fs::write(&cfg, format!("{text}\n# operator's note\n")).unwrap();
    let edited = fs::read(&cfg).unwrap();
    let out = s.run(&["init", "--dir", &dir]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(fs::read(&cfg).unwrap(), edited);
    // --force rewrites it, still 0600.
    let out = s.run(&["init", "--dir", &dir, "--force", "--role", "node"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("role = node\n") && !text.contains("operator's note"));
    // Only what a node reads: [autoscaler] role and [node].
    let sections: Vec<&str> = text.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(sections, ["[autoscaler]", "[node]"], "{text}");
    for absent in [
        "hosts_dir",
        "control_socket",
        "[scaling]",
        "[aws]",
        "secret_access_key",
    ] {
        assert!(!text.contains(absent), "{absent} in a node's file:\n{text}");
    }
    assert!(text.contains("report_socket = ") && text.contains("secret_file = "));
    assert!(text.len() < 4000, "{} bytes", text.len());
    // A node made in a fresh directory gets no hosts.d.
    let fresh = s.path().join("fresh-node");
    let out = s.run(&["init", "--dir", fresh.to_str().unwrap(), "--role", "node"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!fresh.join("hosts.d").exists());
    assert_eq!(
        fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // And what init wrote passes check.
    let out = s.run(&["check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("role = node"));
    // Quietly: the verdict only.
    let out = s.run(&["-q", "check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    assert_eq!(stderr(&out), "");
}

#[test]
fn add_list_remove_hosts() {
    let s = Sandbox::new();
    for (h, p) in [
        ("web-b.internal", "80"),
        ("127.0.0.2", "8080"),
        ("::1", "9000"),
        ("127.0.0.2", "80"),
    ] {
        let out = s.run(&["add-host", h, p]);
        assert!(out.status.success(), "{h} {p}: {}", stderr(&out));
    }
    let out = s.run(&["add-host", "127.0.0.2", "80"]);
    assert!(out.status.success());
    assert!(
        stderr(&out).contains("already registered; nothing changed"),
        "{}",
        stderr(&out)
    );
    let out = s.run(&["add-host", "WEB-B.internal", "80"]);
    assert!(
        stderr(&out).contains("already registered"),
        "names are case-insensitive"
    );

    let out = s.run(&["list-hosts"]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out),
        "127.0.0.2 80\n127.0.0.2 8080\n::1 9000\nweb-b.internal 80\n"
    );
    let out = s.run(&["list-hosts", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 4);
    assert_eq!(v[2]["host"], "::1");
    assert_eq!(v[2]["port"], 9000);
    assert_eq!(v[0]["origin"], "manual");

    let out = s.run(&[
        "add-host",
        "127.0.0.7",
        "80",
        "--ssh-port",
        "2222",
        "--report-port",
        "9701",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value =
        serde_json::from_slice(&s.run(&["list-hosts", "--json"]).stdout).unwrap();
    assert_eq!(v[2]["host"], "127.0.0.7");
    assert_eq!(
        (v[2]["ssh_port"].as_u64(), v[2]["report_port"].as_u64()),
        (Some(2222), Some(9701))
    );
    let out = s.run(&["add-host", "127.0.0.7", "81", "--ssh-port", "0"]);
    assert_eq!(out.status.code(), Some(65));
    // A report socket of its own; a path that is not one is refused before anything is
    // written.
    let out = s.run(&[
        "add-host",
        "127.0.0.7",
        "82",
        "--report-socket",
        "/run/autoscaler/reports/lb-2.sock",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value =
        serde_json::from_slice(&s.run(&["list-hosts", "--json"]).stdout).unwrap();
    assert_eq!(v[3]["report_socket"], "/run/autoscaler/reports/lb-2.sock");
    for bad in [
        "run/x.sock",
        "/run/x y.sock",
        "/run/../x.sock",
        "/run/x",
        "/r\nx.sock",
    ] {
        let out = s.run(&["add-host", "127.0.0.7", "83", "--report-socket", bad]);
        assert_fails(&out, 65, "report socket");
    }
    assert!(s.run(&["remove-host", "127.0.0.7", "82"]).status.success());
    assert!(s.run(&["remove-host", "127.0.0.7", "80"]).status.success());

    let out = s.run(&["remove-host", "127.0.0.2", "8080"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = s.run(&["remove-host", "127.0.0.2", "8080"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not registered"), "{}", stderr(&out));
    assert_eq!(
        stdout(&s.run(&["list-hosts"])),
        "127.0.0.2 80\n::1 9000\nweb-b.internal 80\n"
    );
}

#[test]
fn add_host_refuses_bad_input_and_writes_nothing() {
    let s = Sandbox::new();
    let hosts = [
        "web 1",
        "web1\nserver evil 192.0.2.66:80",
        "#comment",
        "\"quoted\"",
        "'quoted'",
        "-oProxyCommand=id",
        "web/../../etc",
        "web;id",
        "",
        "999.1.1.1",
    ];
    for h in hosts {
        let out = s.run(&["add-host", h, "80"]);
        assert_eq!(
            out.status.code(),
            Some(65),
            "{h:?} accepted: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("host"), "{h:?}: {}", stderr(&out));
    }
    for p in ["0", "65536", "-1", "80a", "", "8 0", "#80", "--80"] {
        let out = s.run(&["add-host", "web", p]);
        assert_eq!(
            out.status.code(),
            Some(65),
            "port {p:?} accepted: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("between 1 and 65535"),
            "{p:?}: {}",
            stderr(&out)
        );
    }
    assert_eq!(
        fs::read_dir(s.path().join("hosts.d")).unwrap().count(),
        0,
        "nothing written"
    );
}

#[test]
fn missing_or_broken_config_exits_78_naming_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args([
            "--config",
            tmp.path().join("none.ini").to_str().unwrap(),
            "list-hosts",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("autoscaler init"), "{}", stderr(&out));

    let s = Sandbox::new();
    s.set("scaling", "cooldown", "soon");
    s.set("haproxy", "bind", "port80");
    fs::write(
        s.config(),
        fs::read_to_string(s.config()).unwrap() + "[haproxy]\nconfig_pth = /x\n",
    )
    .unwrap();
    let out = s.run(&["check"]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let err = stderr(&out);
    let file = s.config().display().to_string();
    assert!(err.contains("3 problems"), "{err}");
    assert!(
        err.contains(&format!(
            "{file}: [scaling] cooldown: \"soon\" is not a duration"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{file}: [haproxy] bind: \"port80\"")),
        "{err}"
    );
    assert!(err.contains("did you mean config_path?"), "{err}");
    // Every command refuses a broken config, before writing anything.
    let out = s.run(&["add-host", "web", "80"]);
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(fs::read_dir(s.path().join("hosts.d")).unwrap().count(), 0);
}

/// An error names its cause once: "PATH: No such file" said three times over (each error
/// of the chain already names the next) was what a node without its report secret printed.
#[test]
fn an_error_says_its_cause_once() {
    let s = Sandbox::new();
    let key = s.path().join("report.key");
    fs::remove_file(&key).unwrap();
    let out = s.run(&["node"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    let path = key.display().to_string();
    assert_eq!(err.matches(&path).count(), 1, "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

#[test]
fn aws_keys_need_a_private_file_and_never_show() {
    let s = Sandbox::new();
    s.set("aws", "access_key_id", "AKIAIOSFODNN7EXAMPLE");
    s.set(
        "aws",
        "secret_access_key",
        "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY",
    );
    let out = s.run(&["check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let all = stdout(&out) + &stderr(&out);
    assert!(
        !all.contains("wJalrXUtnFEMI") && !all.contains("AKIAIOSFODNN7"),
        "{all}"
    );
    assert!(all.contains("secret_access_key = <redacted>"));
    fs::set_permissions(s.config(), fs::Permissions::from_mode(0o640)).unwrap();
    let out = s.run(&["check"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("wJalrXUtnFEMI"));
}

#[test]
fn json_logs_are_one_object_per_line() {
    let s = Sandbox::new();
    let out = s.run(&["--log-format", "json", "add-host", "127.0.0.9", "80"]);
    assert!(out.status.success());
    let line = stderr(&out);
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["msg"], "Added host");
    assert_eq!(v["host"], "127.0.0.9");
    let out = s.run(&["--log-format", "json", "-q", "add-host", "127.0.0.9", "81"]);
    assert_eq!(stderr(&out), "", "-q hides info records");
}

#[test]
fn generate_writes_a_config_the_real_haproxy_accepts() {
    let Some(haproxy) = tool("haproxy") else {
        return;
    };
    let s = Sandbox::new();
    let cfg_path = s.path().join("haproxy.cfg");
    // Zero hosts: still a valid configuration.
    let out = s.run(&["generate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Configuration is valid"),
        "{}",
        stderr(&out)
    );
    let check = |p: &std::path::Path| {
        Command::new(&haproxy)
            .args(["-c", "-q", "-f"])
            .arg(p)
            .status()
            .unwrap()
    };
    assert!(check(&cfg_path).success());
    // The server-state file the configuration loads is there for HAProxy's first start (a
    // missing one is a warning at every start until the first reload); one that exists is
    // left alone.
    let state = s.path().join("haproxy.state");
    assert_eq!(fs::read_to_string(&state).unwrap(), "1\n");
    fs::write(&state, "1\n# saved\n").unwrap();
    assert!(s.run(&["generate"]).status.success());
    assert_eq!(fs::read_to_string(&state).unwrap(), "1\n# saved\n");
    for (h, p) in [
        ("127.0.0.3", "8080"),
        ("127.0.0.2", "8080"),
        ("::1", "8081"),
    ] {
        assert!(s.run(&["add-host", h, p]).status.success());
    }
    let out = s.run(&["generate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(check(&cfg_path).success());
    let text = fs::read_to_string(&cfg_path).unwrap();
    let servers: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("server "))
        .collect();
    assert_eq!(
        servers,
        [
            "    server 127.0.0.2_8080 127.0.0.2:8080 check inter 2000ms fall 3 rise 2",
            "    server 127.0.0.3_8080 127.0.0.3:8080 check inter 2000ms fall 3 rise 2",
            "    server ::1_8081 [::1]:8081 check inter 2000ms fall 3 rise 2",
        ]
    );
    assert!(text.contains("option idle-close-on-response"));
    // Running it again changes nothing.
    let out = s.run(&["generate"]);
    assert!(
        stderr(&out).contains("Configuration unchanged"),
        "{}",
        stderr(&out)
    );
    // Standard output, and an explicit file.
    let out = s.run(&["generate", "--output", "-"]);
    assert_eq!(stdout(&out), text);
    let other = s.path().join("other.cfg");
    assert!(s
        .run(&["generate", "-o", other.to_str().unwrap()])
        .status
        .success());
    assert_eq!(fs::read_to_string(&other).unwrap(), text);
}

/// Several binds, one with TLS options, pass the real HAProxy's check.
#[test]
fn generate_accepts_several_binds_with_tls() {
    let (Some(haproxy), Some(openssl)) = (tool("haproxy"), tool("openssl")) else {
        return;
    };
    let s = Sandbox::new();
    let (key, crt, pem) = (
        s.path().join("k.pem"),
        s.path().join("c.pem"),
        s.path().join("site.pem"),
    );
    let st = Command::new(openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=test",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    fs::write(
        &pem,
        fs::read_to_string(&crt).unwrap() + &fs::read_to_string(&key).unwrap(),
    )
    .unwrap();
    s.set(
        "haproxy",
        "bind",
        &format!(
            "127.0.0.1:18080; [::1]:18080 v6only; 127.0.0.1:18443 ssl crt {} alpn h2,http/1.1",
            pem.display()
        ),
    );
    let out = s.run(&["generate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = fs::read_to_string(s.path().join("haproxy.cfg")).unwrap();
    assert!(
        text.contains(&format!(
            "    bind 127.0.0.1:18443 ssl crt {} alpn h2,http/1.1\n",
            pem.display()
        )),
        "{text}"
    );
    assert!(text.contains("    bind [::1]:18080 v6only\n"));
    let st = Command::new(haproxy)
        .args(["-c", "-q", "-f"])
        .arg(s.path().join("haproxy.cfg"))
        .status()
        .unwrap();
    assert!(st.success());
    // An option HAProxy's tokenizer would read differently is refused before anything runs.
    s.set("haproxy", "bind", "127.0.0.1:18080 crt /x#y");
    let out = s.run(&["generate"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("would interpret"), "{}", stderr(&out));
}

#[test]
fn generate_never_replaces_the_live_config_with_an_invalid_one() {
    let Some(_) = tool("haproxy") else { return };
    let s = Sandbox::new();
    assert!(s.run(&["add-host", "127.0.0.2", "8080"]).status.success());
    assert!(s.run(&["generate"]).status.success());
    let live = s.path().join("haproxy.cfg");
    let before = fs::read(&live).unwrap();
    // A template with a directive HAProxy does not know.
    let bad = s.path().join("bad.cfg.tera");
    let src = autoscaler_template().replace(
        "balance roundrobin",
        "balance roundrobin\n    frobnicate yes",
    );
    fs::write(&bad, src).unwrap();
    s.set("haproxy", "template", bad.to_str().unwrap());
    assert!(s.run(&["add-host", "127.0.0.3", "8080"]).status.success());
    let out = s.run(&["generate"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("HAProxy rejected the configuration"), "{err}");
    assert!(
        err.contains("frobnicate"),
        "HAProxy's own message is shown: {err}"
    );
    assert!(
        err.contains("previous configuration in") && err.contains("was left in place"),
        "{err}"
    );
    assert_eq!(fs::read(&live).unwrap(), before, "live file untouched");
    let strays: Vec<_> = fs::read_dir(s.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(strays.is_empty(), "candidate removed: {strays:?}");
    // --no-validate installs it anyway, and says so.
    let out = s.run(&["generate", "--no-validate"]);
    assert!(out.status.success());
    assert!(
        stderr(&out).contains("Validation skipped (--no-validate)"),
        "{}",
        stderr(&out)
    );
    assert!(fs::read_to_string(&live).unwrap().contains("frobnicate"));
}

#[test]
fn generate_refuses_when_a_host_file_is_unreadable() {
    let s = Sandbox::new();
    assert!(s.run(&["add-host", "127.0.0.2", "8080"]).status.success());
    assert!(s.run(&["generate", "--no-validate"]).status.success());
    let live = s.path().join("haproxy.cfg");
    let before = fs::read(&live).unwrap();
    fs::write(
        s.path().join("hosts.d/broken_80.host"),
        "host = bro ken\nport = 80\n",
    )
    .unwrap();
    let out = s.run(&["generate", "--no-validate"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("broken_80.host"), "{}", stderr(&out));
    assert_eq!(fs::read(&live).unwrap(), before);
    // list-hosts still shows the good ones and fails loudly about the bad one.
    let out = s.run(&["list-hosts"]);
    assert_eq!(stdout(&out), "127.0.0.2 8080\n");
    assert!(!out.status.success());
}

#[test]
fn generate_without_haproxy_installed_says_it_did_not_validate() {
    let s = Sandbox::new();
    s.set(
        "haproxy",
        "check_command",
        "/nonexistent/haproxy -c -f {config}",
    );
    let out = s.run(&["generate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Validation skipped: check command not installed"),
        "{}",
        stderr(&out)
    );
}

fn autoscaler_template() -> String {
    fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/templates/haproxy.cfg.tera"
    ))
    .unwrap()
}
