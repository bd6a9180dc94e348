//! Reading, validating and writing `autoscaler.ini`: every message names the file, section
//! and key.

use super::*;
use crate::hosts::HostName;

fn path() -> PathBuf {
    PathBuf::from("/srv/as/autoscaler.ini")
}

fn defaults() -> Config {
    Config::defaults(&Layout::for_dir(Path::new("/srv/as")), Role::Master)
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, &path())
}

/// Parses `text` expecting failure; returns the problems as display lines.
fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => panic!("expected problems in:\n{text}"),
        Err(e) => {
            let p: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
            assert!(!p.is_empty(), "expected Invalid, got {e}");
            p
        }
    }
}

#[test]
fn empty_file_is_all_defaults() {
    assert_eq!(parse("").unwrap(), defaults());
}

#[test]
fn system_layout_uses_system_directories() {
    let l = Layout::for_dir(Path::new(DEFAULT_DIR));
    assert_eq!(l.state_dir, PathBuf::from("/var/lib/autoscaler"));
    assert_eq!(l.haproxy_config, PathBuf::from("/etc/haproxy/haproxy.cfg"));
    assert_eq!(l.hosts_dir, PathBuf::from("/etc/autoscaler/hosts.d"));
    let l = Layout::for_dir(Path::new("/tmp/x"));
    assert_eq!(l.hosts_dir, PathBuf::from("/tmp/x/hosts.d"));
    assert_eq!(l.state_dir, PathBuf::from("/tmp/x/state"));
    assert_eq!(l.haproxy_config, PathBuf::from("/tmp/x/haproxy.cfg"));
}

#[test]
fn rendered_defaults_parse_back_to_the_same_config() {
    for role in [Role::Master, Role::Node] {
        let cfg = Config::defaults(&Layout::for_dir(Path::new("/srv/as")), role);
        let text = cfg.to_ini_text();
        assert_eq!(parse(&text).unwrap(), cfg, "{text}");
        assert!(text.contains(&format!("\nrole = {role}\n")));
    }
}

#[test]
fn rendered_file_has_every_key_once_with_a_comment() {
    let text = defaults().to_ini_text();
    let keys = Config::known_keys();
    assert!(keys.len() > 60, "{} keys", keys.len());
    let lines: Vec<&str> = text.lines().collect();
    let mut section = "";
    let mut seen = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with('#') {
            continue;
        } else if let Some(s) = line.strip_prefix('[') {
            section = s.trim_end_matches(']');
        } else if let Some((k, _)) = line.split_once(" = ") {
            seen.push((section, k));
            let prev = lines[i - 1];
            assert!(
                prev.starts_with("# ") || prev.contains(" = "),
                "{k} has no comment"
            );
        }
    }
    let mut want: Vec<_> = keys.clone();
    want.sort();
    seen.sort();
    assert_eq!(seen, want);
}

#[test]
fn values_are_read() {
    let cfg = parse(
        "[autoscaler]\nrole = node\nhosts_dir = hosts\n\
         [node]\nsample_interval = 500ms\n\
         [scaling]\npolicy = cluster\nscale_up_threshold = 80%\ncooldown = 1h 30m\ndry_run = no\n\
         [launch]\nlauncher = command\nscale_up_command = /usr/local/bin/grow --zone 'eu west'\n\
         security_group_ids = sg-1, sg-2,\n\
         [haproxy]\nservers = local, ops@lb2.example.com:2222, ssh://[2001:db8::2]:22, lb3/srv/h.cfg\n\
         bind = *:80; *:443 ssl crt /etc/haproxy/site.pem\n",
    )
    .unwrap();
    assert_eq!(cfg.general.role, Role::Node);
    assert_eq!(cfg.general.hosts_dir, PathBuf::from("/srv/as/hosts"));
    assert_eq!(cfg.node.sample_interval, Duration::from_millis(500));
    assert_eq!(cfg.scaling.policy, Policy::Cluster);
    assert_eq!(cfg.scaling.scale_up_threshold, 80.0);
    assert_eq!(cfg.scaling.cooldown, Duration::from_secs(5400));
    assert!(!cfg.scaling.dry_run);
    assert_eq!(
        cfg.launch.scale_up_command.0,
        ["/usr/local/bin/grow", "--zone", "eu west"]
    );
    assert_eq!(cfg.launch.security_group_ids, ["sg-1", "sg-2"]);
    assert_eq!(
        cfg.haproxy.servers,
        vec![
            HaproxyTarget::Local,
            HaproxyTarget::Ssh {
                user: Some("ops".into()),
                host: HostName::parse("lb2.example.com").unwrap(),
                port: Some(2222),
                path: None,
            },
            HaproxyTarget::Ssh {
                user: None,
                host: HostName::parse("2001:db8::2").unwrap(),
                port: Some(22),
                path: None,
            },
            HaproxyTarget::Ssh {
                user: None,
                host: HostName::parse("lb3").unwrap(),
                port: None,
                path: Some("/srv/h.cfg".into()),
            },
        ]
    );
    assert_eq!(cfg.haproxy.servers[2].to_string(), "ssh://[2001:db8::2]:22");
    assert_eq!(cfg.haproxy.servers[3].to_string(), "ssh://lb3/srv/h.cfg");
    assert_eq!(
        cfg.haproxy.bind,
        ["*:80", "*:443 ssl crt /etc/haproxy/site.pem"]
    );
}

/// Each bad file names its section and key, and says what is accepted.
#[test]
fn bad_values_name_section_and_key() {
    let cases: &[(&str, &str)] = &[
        ("[autoscaler]\nrole = boss\n", "[autoscaler] role: \"boss\" is not valid; expected one of: master, node"),
        ("[node]\nreport_port = 0\n", "[node] report_port: port \"0\""),
        ("[node]\nreport_port = 70000\n", "[node] report_port: port \"70000\""),
        ("[node]\nsample_interval = 100ms\n", "[node] sample_interval: 100ms is too short"),
        ("[node]\nsample_interval = fast\n", "[node] sample_interval: \"fast\" is not a duration"),
        ("[node]\nbuffer = -3\n", "[node] buffer: \"-3\" is not valid; expected a whole number"),
        ("[scaling]\nscale_up_threshold = 120\n", "[scaling] scale_up_threshold: \"120\" is not a percentage"),
        ("[scaling]\ntolerance = 1.5\n", "[scaling] tolerance: 1.5 is not in [0, 1)"),
        ("[scaling]\ntolerance = lots\n", "[scaling] tolerance: \"lots\" is not valid; expected a number"),
        ("[scaling]\nmin_nodes = 5\nmax_nodes = 2\n", "[scaling] min_nodes: 5 is above max_nodes (2)"),
        ("[scaling]\nscale_down_threshold = 80\n", "[scaling] scale_down_threshold: 80 must be below scale_up_threshold (75)"),
        ("[scaling]\ndry_run = maybe\n", "[scaling] dry_run: \"maybe\" is not true or false"),
        ("[scaling]\nmax_launches_per_hour = 0\n", "[scaling] max_launches_per_hour: must be at least 1"),
        ("[scaling]\ncooldown = 5 minutes later\n", "[scaling] cooldown: \"5 minutes later\" is not a duration"),
        ("[ssh]\nhost_key_policy = accept-all\n", "[ssh] host_key_policy: \"accept-all\" is not valid; expected one of: strict, accept-new"),
        ("[ssh]\nuser = -oProxyCommand=x\n", "[ssh] user: \"-oProxyCommand=x\" is not a valid user name"),
        ("[aws]\naccess_key_id = AKIAEXAMPLE\n", "[aws] secret_access_key: access_key_id and secret_access_key are set together"),
        ("[aws]\nendpoint = localhost:5000\n", "[aws] endpoint: \"localhost:5000\" is not an http:// or https:// URL"),
        ("[launch]\nlauncher = lambda\n", "[launch] launcher: \"lambda\" is not valid; expected one of: ec2, command"),
        ("[launch]\nscale_up_command = grow 'unbalanced\n", "[launch] scale_up_command: \"grow 'unbalanced\" is not valid; expected a command line with balanced quotes"),
        ("[scaling]\ndry_run = false\n", "[launch] image_id: an AMI id (or launch_template) is needed"),
        ("[scaling]\ndry_run = false\n[launch]\nlauncher = command\n", "[launch] scale_up_command: launcher = command needs a scale_up_command"),
        ("[haproxy]\nservers = local, bad host\n", "[haproxy] servers: \"bad host\" is not valid; expected `local` or `[ssh://][user@]host[:port][/path/to/haproxy.cfg]`"),
        ("[haproxy]\nservers = -x@lb\n", "[haproxy] servers: \"-x@lb\" is not valid"),
        ("[haproxy]\nservers =\n", "[haproxy] servers: needs at least one server"),
        ("[haproxy]\nbind = 80\n", "[haproxy] bind: \"80\" is not ADDRESS:PORT"),
        ("[haproxy]\nbind = *:80 ssl crt '/x'\n", "[haproxy] bind: \"*:80 ssl crt '/x'\": option \"'/x'\" has a character HAProxy would interpret"),
        ("[haproxy]\nservers = lb2/etc/haproxy\\ x.cfg\n", "[haproxy] servers: \"lb2/etc/haproxy\\\\ x.cfg\" is not valid"),
        ("[haproxy]\nuser = ha proxy\n", "[haproxy] user: \"ha proxy\" is not a name"),
        ("[haproxy]\ncommand_timeout = 0s\n", "[haproxy] command_timeout: must be longer than 0s"),
        ("[haproxy]\ncheck_command = haproxy -c\n", "[haproxy] check_command: must contain {config}"),
        ("[haproxy]\nbackend = web app\n", "[haproxy] backend: \"web app\" is not a name"),
        ("[haproxy]\nhealth_check_path = healthz\n", "[haproxy] health_check_path: \"healthz\" is not a URL path"),
        ("[haproxy]\ntemplate = /nonexistent/t.tera\n", "[haproxy] template: /nonexistent/t.tera is not a readable file"),
        ("[haproxy]\nconfig_path =\n", "[haproxy] config_path: must not be empty"),
    ];
    for (text, want) in cases {
        let got = problems(text);
        assert!(
            got.iter()
                .any(|p| p == &format!("/srv/as/autoscaler.ini: {want}")
                    || p.starts_with(&format!("/srv/as/autoscaler.ini: {want}"))),
            "for {text:?}\nwant: {want}\ngot:  {got:#?}"
        );
    }
}

#[test]
fn node_role_needs_no_launch_settings() {
    assert!(parse("[autoscaler]\nrole = node\n[scaling]\ndry_run = false\n").is_ok());
}

#[test]
fn every_problem_is_reported_at_once() {
    let got = problems(
        "[node]\nreport_port = x\n[scaling]\ncooldown = soon\nmax_nodes = 0\n[haproxy]\nbind = nowhere\nservrs = local\n",
    );
    // max_nodes = 0 is reported twice: on its own and as below min_nodes.
    assert_eq!(got.len(), 6, "{got:#?}");
}

#[test]
fn unknown_keys_and_sections_get_suggestions() {
    let got = problems("[scaling]\ncooldwn = 5m\n");
    assert_eq!(
        got,
        ["/srv/as/autoscaler.ini: [scaling]: unknown key \"cooldwn\"; did you mean cooldown?"]
    );
    let got = problems("[scaling]\nreport_port = 9000\n");
    assert_eq!(got, ["/srv/as/autoscaler.ini: [scaling]: unknown key \"report_port\"; report_port belongs in [node]"]);
    let got = problems("[scalling]\ncooldown = 5m\n");
    assert!(
        got[0].starts_with(
            "/srv/as/autoscaler.ini: [scalling]: unknown section; did you mean [scaling]?"
        ),
        "{got:?}"
    );
    let got = problems("role = master\n");
    assert_eq!(
        got,
        ["/srv/as/autoscaler.ini: \"role\" is outside any section; put it under its [section]"]
    );
    let got = problems("[haproxy]\nzzzzzzzz = 1\n");
    assert_eq!(
        got,
        ["/srv/as/autoscaler.ini: [haproxy]: unknown key \"zzzzzzzz\""]
    );
}

#[test]
fn repeated_keys_and_sections() {
    let got = problems("[scaling]\ncooldown = 1m\ncooldown = 2m\n");
    assert!(
        got[0].contains("[scaling] cooldown: is set 2 times"),
        "{got:?}"
    );
    // A section that appears twice is merged; a key in each is still a repeat.
    let got = problems("[scaling]\ncooldown = 1m\n[node]\n[scaling]\ncooldown = 2m\n");
    assert!(
        got[0].contains("[scaling] cooldown: is set 2 times"),
        "{got:?}"
    );
    let cfg = parse("[scaling]\ncooldown = 1m\n[node]\n[scaling]\nwarmup = 2m\n").unwrap();
    assert_eq!(cfg.scaling.cooldown, Duration::from_secs(60));
}

#[test]
fn syntax_error_names_the_line() {
    let got = problems("[node]\nreport_port = 1\n[scaling\ncooldown = 1m\n");
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with(
            "/srv/as/autoscaler.ini: line 3: section header \"[scaling\" must be one line"
        ),
        "{got:?}"
    );
    // The rest of the file is checked in the same go: every problem at once.
    let got = problems("[node]\nreport_port = x\n[scaling\ncooldown = soon\n");
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got[0].contains("line 3: section header"), "{got:?}");
    assert!(
        got.iter().any(|p| p.contains("[node] report_port")),
        "{got:?}"
    );
    assert!(
        got.iter().any(|p| p.contains("[scaling] cooldown")),
        "{got:?}"
    );
    let got = problems("[node]\nreport_port = x\nthis is not ini\n");
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got[0].contains("line 3: \"this is not ini\" is not `key = value`"),
        "{got:?}"
    );
}

#[test]
fn secrets_are_redacted_everywhere() {
    let cfg = parse("[aws]\naccess_key_id = AKIAIOSFODNN7EXAMPLE\nsecret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n").unwrap();
    assert_eq!(
        cfg.aws.secret_access_key.expose(),
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    );
    let shown = [
        cfg.to_ini_text(),
        format!("{cfg:?}"),
        serde_json::to_string(&cfg).unwrap(),
    ];
    for s in shown {
        assert!(
            !s.contains("wJalrXUtnFEMI") && !s.contains("AKIAIOSFODNN7"),
            "{s}"
        );
        assert!(s.contains("<redacted>"));
    }
}

#[test]
fn loose_file_with_keys_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("autoscaler.ini");
    let text = "[aws]\naccess_key_id = AKIAEXAMPLE\nsecret_access_key = s3cr3t\n";
    fs::write(&p, text).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    let e = Config::load(&p).unwrap_err();
    assert!(
        matches!(e, ConfigError::Insecure { mode: 0o644, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("chmod 600"), "{e}");
    assert!(!e.to_string().contains("s3cr3t"));
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(Config::load(&p).is_ok());
    // Without keys, a world-readable file is fine.
    fs::write(&p, "[scaling]\ncooldown = 1m\n").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(Config::load(&p).is_ok());
}

#[test]
fn missing_file_says_how_to_create_one() {
    let e = Config::load(Path::new("/nonexistent/autoscaler.ini")).unwrap_err();
    assert!(e.to_string().contains("autoscaler init"), "{e}");
}

#[test]
fn command_line_placeholders_stay_single_arguments() {
    let c: CommandLine = "haproxy -c -f {config}".parse().unwrap();
    assert_eq!(
        c.expand(&[("config", "/tmp/a b.cfg")]),
        ["haproxy", "-c", "-f", "/tmp/a b.cfg"]
    );
    assert_eq!(c.to_string(), "haproxy -c -f {config}");
    let c: CommandLine = "sh -c 'kill -USR2 $(cat /run/h.pid)'".parse().unwrap();
    assert_eq!(c.0, ["sh", "-c", "kill -USR2 $(cat /run/h.pid)"]);
    assert_eq!(c.to_string().parse::<CommandLine>().unwrap(), c);
}

/// The file `autoscaler init` writes for the system layout.
#[test]
fn init_file_golden() {
    let c = Config::defaults(&Layout::for_dir(Path::new(DEFAULT_DIR)), Role::Master);
    crate::golden::check("autoscaler.ini", &c.to_ini_text());
}
