//! What a daemon needs beyond a configuration file that parses: the SSH identity, the files
//! it names, an AWS region, a template that renders. `autoscaler check` and the daemons' start
//! run the same checks, so `check` finds whatever would stop the master (as `sshd -t` and
//! `haproxy -c` do), and reports every problem at once, each naming the file, section and key.

use crate::adapters::secret::{self, SecretError};
use crate::config::{Config, ConfigError, Problem, ProvisionerKind, Role};
use crate::render::HaproxyTemplate;

fn problem(cfg: &Config, section: &str, key: &str, message: String) -> Problem {
    Problem {
        file: cfg.source.clone(),
        section: section.into(),
        key: Some(key.into()),
        message,
    }
}

/// Every problem that would stop `role` from starting with `cfg`.
pub async fn problems(cfg: &Config, role: Role) -> Vec<Problem> {
    let mut out = Vec::new();
    if let Some(configured) = &cfg.node.secret_file {
        let path = secret::location(configured);
        if let Err(e) = secret::read(&path) {
            let hint = match (role, &e) {
                (Role::Node, SecretError::Read { .. }) => {
                    "; copy the master's report secret here (mode 0600, readable by the agent's user)"
                        .to_string()
                }
                (Role::Master, SecretError::Read { .. }) => format!(
                    "; make one with: (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \\n' > {}) and copy it to the nodes",
                    path.display()
                ),
                _ => String::new(),
            };
            out.push(problem(cfg, "node", "secret_file", format!("{e}{hint}")));
        }
    }
    if role == Role::Node {
        // The agent makes a missing directory at start; one that exists must be its own.
        if let Some(dir) = cfg
            .node
            .report_socket
            .as_deref()
            .and_then(|s| std::path::Path::new(s).parent())
            .filter(|d| d.exists())
        {
            if let Err(e) = crate::node::report_dir::inspect(dir) {
                out.push(problem(cfg, "node", "report_socket", e.to_string()));
            }
        }
    }
    if role != Role::Master {
        return out;
    }
    if cfg.cluster.enabled() {
        for (key, e) in crate::adapters::etcd::file_problems(&cfg.cluster) {
            out.push(problem(cfg, "cluster", key, e.to_string()));
        }
    }
    let id = &cfg.ssh.identity_file;
    let keygen = format!("ssh-keygen -t ed25519 -N '' -f {}", id.display());
    match std::fs::metadata(id) {
        Err(e) => out.push(problem(
            cfg,
            "ssh",
            "identity_file",
            format!(
                "{}: {e}; create the master's key with: {keygen}",
                id.display()
            ),
        )),
        Ok(_) => {
            if let Err(e) = russh::keys::load_secret_key(id, None) {
                out.push(problem(
                    cfg,
                    "ssh",
                    "identity_file",
                    format!(
                        "{} cannot be used: {e} (Ed25519 or ECDSA without a passphrase; RSA is not supported); create one with: {keygen}",
                        id.display()
                    ),
                ));
            }
        }
    }
    match HaproxyTemplate::load(cfg.haproxy.template.as_deref()) {
        Err(e) => out.push(problem(cfg, "haproxy", "template", e.to_string())),
        Ok(t) => match t.plan(&cfg.haproxy, &cfg.general.hosts_dir, &[], &|_| None) {
            Err(e) => out.push(problem(cfg, "haproxy", "template", e.to_string())),
            Ok(plan) => out.extend(signal_problems(cfg, &plan.text)),
        },
    }
    let launching = !cfg.scaling.dry_run;
    if launching && cfg.launch.launcher == ProvisionerKind::Ec2 {
        if let Some(p) = &cfg.launch.user_data_file {
            if let Err(e) = std::fs::read(p) {
                out.push(problem(
                    cfg,
                    "launch",
                    "user_data_file",
                    format!("{}: {e}", p.display()),
                ));
            }
        }
        if region(cfg).await.is_none() {
            out.push(problem(
                cfg,
                "aws",
                "region",
                "no AWS region: set [aws] region (or AWS_REGION, or a region in the [aws] profile); \
                 autoscaler does not guess it"
                    .into(),
            ));
        }
    }
    out
}

/// What keeps the HAProxy signals that are on from being read in the rendered `text`.
fn signal_problems(cfg: &Config, text: &str) -> Vec<Problem> {
    if !cfg.scaling.haproxy_signals() {
        return Vec::new();
    }
    let backend = &cfg.haproxy.backend;
    match crate::render::backend_mode(text, backend) {
        None => vec![problem(
            cfg,
            "haproxy",
            "backend",
            format!(
                "the HAProxy signals of [scaling] read backend {backend:?}, which the template does not define"
            ),
        )],
        Some(mode) if mode != "http" && cfg.scaling.target_response_time.is_some() => {
            vec![problem(
                cfg,
                "scaling",
                "target_response_time",
                format!(
                    "HAProxy measures response times in HTTP mode only, and backend {backend:?} runs in {mode} mode; \
                     use target_sessions_per_node or target_requests_per_node, or put `mode http` in the template"
                ),
            )]
        }
        Some(_) => Vec::new(),
    }
}

/// The region EC2 calls go to: `[aws] region`, else the environment, else the profile. Never
/// instance metadata: a region must be written down somewhere an operator can see.
pub async fn region(cfg: &Config) -> Option<String> {
    if !cfg.aws.region.is_empty() {
        return Some(cfg.aws.region.clone());
    }
    use aws_config::meta::region::ProvideRegion;
    let env = aws_config::environment::region::EnvironmentVariableRegionProvider::new();
    if let Some(r) = env.region().await {
        return Some(r.to_string());
    }
    let mut profile = aws_config::profile::ProfileFileRegionProvider::builder();
    if !cfg.aws.profile.is_empty() {
        profile = profile.profile_name(&cfg.aws.profile);
    }
    profile.build().region().await.map(|r| r.to_string())
}

/// Whether each HAProxy server's runtime API answers, reached as the master will reach it
/// (this machine's socket, or over SSH as the configured user): HAProxy's version, or why
/// not and how to fix it. A server whose runtime API does not answer gets every change by a
/// reload: not an error (HAProxy may be stopped just now), but worth saying.
pub async fn runtime_sockets(cfg: &Config) -> Vec<(String, Result<String, String>)> {
    let ssh = crate::adapters::ssh::SshSettings::from_config(cfg).ok();
    let said = each_server(cfg, ssh, |link| async move {
        let answer = link
            .api(&cfg.haproxy.stats_socket, "show version", PROBE_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        match answer.trim() {
            v if !v.is_empty() && !v.contains(char::is_whitespace) => Ok(v.to_string()),
            other => Err(format!("answered {other:?} to show version")),
        }
    })
    .await;
    said.into_iter()
        .map(|(server, said)| {
            let said = said.map_err(|e| {
                format!(
                    "{e}; every change there will be a reload. The socket needs `stats socket {} \
                     mode 660 level admin group G` with the master's user (local) or the SSH \
                     user in G",
                    cfg.haproxy.stats_socket.display()
                )
            });
            (server, said)
        })
        .collect()
}

/// How long one look at a HAProxy server may take.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `probe` run on a link to each HAProxy server, reached as the master reaches it (`ssh`
/// for the remote ones): what it said per server, or why the server could not be reached.
async fn each_server<Probe, Said>(
    cfg: &Config,
    ssh: Option<crate::adapters::ssh::SshSettings>,
    probe: Probe,
) -> Vec<(String, Result<String, String>)>
where
    Probe: Fn(crate::adapters::haproxy::Link) -> Said,
    Said: std::future::Future<Output = Result<String, String>>,
{
    use crate::adapters::haproxy::Link;
    let ssh = ssh.map(std::sync::Arc::new);
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let mut out = Vec::new();
    for target in &cfg.haproxy.servers {
        let said = match Link::connect(target, ssh.as_ref(), &log).await {
            Ok(link) => probe(link).await,
            Err(e) => Err(e.to_string()),
        };
        out.push((target.to_string(), said));
    }
    out
}

/// `s` made harmless for a check: under `accept-new`, a new host key goes to a copy of
/// known_hosts in `scratch`, never to the real one (a missing one stays missing).
fn writing_nothing(
    mut s: crate::adapters::ssh::SshSettings,
    scratch: &std::path::Path,
) -> Result<crate::adapters::ssh::SshSettings, String> {
    if s.policy == crate::config::HostKeyPolicy::AcceptNew {
        let copy = scratch.join("known_hosts");
        if let Err(e) = std::fs::copy(&s.known_hosts, &copy) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(format!("{}: {e}", s.known_hosts.display()));
            }
        }
        s.known_hosts = copy;
    }
    Ok(s)
}

/// Whether each HAProxy server can be reloaded as the master will reload it, reached as the
/// master reaches it: the reload command's program is there (an executable, or a shell
/// builtin). The master CLI (`[haproxy] master_socket`) is looked at too: through it the
/// master tells which old workers still hold sessions, but reloads are confirmed through the
/// stats socket and drains wait `drain_timeout` without it, so one that does not answer is a
/// note, and only a wrong answer a failure. Nothing is reloaded, and nothing written: under
/// `accept-new` a new host key goes to a copy of known_hosts.
pub async fn reloads(cfg: &Config) -> Vec<(String, Result<String, String>)> {
    use crate::config::CommandLine;
    let scratch = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return unlooked(cfg, &e.to_string()),
    };
    let ssh = match crate::adapters::ssh::SshSettings::from_config(cfg)
        .ok()
        .map(|s| writing_nothing(s, scratch.path()))
        .transpose()
    {
        Ok(s) => s,
        Err(e) => return unlooked(cfg, &e),
    };
    each_server(cfg, ssh, |link| async move {
            let program = cfg.haproxy.reload_command.0.first().cloned().unwrap_or_default();
            // A path must be an executable file; a bare name anything the shell would run.
            let find = CommandLine(vec![
                "sh".into(),
                "-c".into(),
                "p=$(command -v \"$1\") || exit 127; case $p in /*) test -f \"$p\" && test -x \"$p\" || exit 126;; esac".into(),
                "sh".into(),
                program.clone(),
            ]);
            link.run(&find, PROBE_TIMEOUT).await.map_err(|e| {
                format!("the reload command's program `{program}` cannot be found or run there ([haproxy] reload_command): {e}")
            })?;
            let Some(socket) = &cfg.haproxy.master_socket else {
                return Ok(format!("`{program}` found; no master_socket"));
            };
            match link.master_cli(socket, "show proc", PROBE_TIMEOUT).await {
                Err(e) => Ok(format!(
                    "`{program}` found; note: the master CLI at {} does not answer ({e}), so a drain waits the whole drain_timeout (HAProxy's `-S {}`, with `mode 660 group G` for an SSH user in G)",
                    socket.display(),
                    socket.display()
                )),
                Ok(answer) if answer.contains("master") => {
                    Ok(format!("`{program}` found; master CLI answers"))
                }
                Ok(answer) => Err(format!(
                    "the master CLI at {} answered {:?} to show proc: is master_socket HAProxy's master CLI?",
                    socket.display(),
                    answer.trim()
                )),
            }
    })
    .await
}

/// Every HAProxy server with the same reason it could not be looked at.
fn unlooked(cfg: &Config, why: &str) -> Vec<(String, Result<String, String>)> {
    cfg.haproxy
        .servers
        .iter()
        .map(|t| (t.to_string(), Err(why.to_string())))
        .collect()
}

/// [`problems`] as an error, for the daemons' start.
pub async fn check(cfg: &Config, role: Role) -> Result<(), ConfigError> {
    let p = problems(cfg, role).await;
    match p.is_empty() {
        true => Ok(()),
        false => Err(ConfigError::Invalid(p)),
    }
}

/// One registered host as `check --fleet` found it: reached over SSH with the master's
/// identity and known_hosts, and allowed the remote forward its reports come through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetLine {
    pub host: String,
    pub port: u16,
    /// "ok" (perhaps with a note), or what failed (with what to do).
    pub ssh: String,
    /// "ok", "-" when SSH failed, or why the forward was refused.
    pub forward: String,
}

impl FleetLine {
    /// SSH "ok" may carry a note ("ok (host key not known yet: …)").
    pub fn ok(&self) -> bool {
        self.ssh.starts_with("ok") && self.forward == "ok"
    }
}

/// `check --fleet`: every registered host, reached as the master reaches it. Nothing is
/// written: a host key that is not known is a finding (with the ssh-keyscan line), even
/// under `host_key_policy = accept-new` (the master would record it on first contact). The
/// forward is tried beside the real one (a TCP port sshd chooses, or a socket of another
/// name in the report directory), so a running master is not disturbed.
pub async fn fleet(cfg: &Config, log: &slog::Logger) -> Result<Vec<FleetLine>, String> {
    use crate::master::tunnels::TunnelSettings;
    let (hosts, errors) = crate::admin::host_store(cfg)
        .await
        .map_err(|e| e.to_string())?
        .load()
        .await
        .map_err(|e| e.to_string())?;
    if let Some(e) = errors.first() {
        return Err(e.to_string());
    }
    let tunnels = TunnelSettings::from_config(cfg).map_err(|e| e.to_string())?;
    let accept_new = tunnels.ssh.policy == crate::config::HostKeyPolicy::AcceptNew;
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ssh_settings = writing_nothing((*tunnels.ssh).clone(), scratch.path())?;
    // Connect, log in, ask for the forward, go: all of it within twice the connect timeout.
    let limit = ssh_settings.connect_timeout * 2;
    let mut out = Vec::new();
    for h in &hosts {
        let (port, forward) = tunnels.route(h);
        let host = h.host.to_string();
        let before = std::fs::read_to_string(&ssh_settings.known_hosts).unwrap_or_default();
        let mut line =
            match tokio::time::timeout(limit, probe(&ssh_settings, &host, port, &forward, log))
                .await
            {
                Ok(line) => line,
                Err(_) => FleetLine {
                    host: host.clone(),
                    port: h.port,
                    ssh: format!(
                        "no answer within {} on port {port}",
                        humantime::format_duration(limit)
                    ),
                    forward: "-".into(),
                },
            };
        line.port = h.port;
        if accept_new && line.ssh == "ok" {
            let after = std::fs::read_to_string(&ssh_settings.known_hosts).unwrap_or_default();
            if after != before {
                line.ssh = "ok (host key not known yet: host_key_policy = accept-new records it on the master's first contact)".into();
            }
        }
        out.push(line);
    }
    Ok(out)
}

/// Reaches `host:port` as the master does and asks for a forward beside `forward`.
async fn probe(
    ssh_settings: &crate::adapters::ssh::SshSettings,
    host: &str,
    port: u16,
    forward: &crate::master::tunnels::Forward,
    log: &slog::Logger,
) -> FleetLine {
    use crate::adapters::ssh::{self, HostKeyCheck};
    use crate::master::tunnels::Forward;
    let mut line = FleetLine {
        host: host.to_string(),
        port: 0,
        ssh: "ok".into(),
        forward: "-".into(),
    };
    let check = HostKeyCheck::new(ssh_settings, host, port, log);
    let client = CheckClient {
        check: check.clone(),
    };
    let handle = match ssh::connect(ssh_settings, host, port, &check, client).await {
        Err(e) => {
            line.ssh = e.to_string();
            return line;
        }
        Ok(h) => h,
    };
    line.forward = match forward {
        Forward::Tcp(_) => match handle.tcpip_forward("127.0.0.1", 0).await {
            Ok(_) => "ok".into(),
            Err(e) => format!(
                "TCP forward refused ({e}): sshd must allow it for {} (AllowTcpForwarding remote or yes, and no PermitListen none)",
                ssh_settings.user
            ),
        },
        Forward::Unix(path) => {
            // A dotfile: the agent does not take it for a master's socket, and removes it
            // once nobody listens on it.
            let probe = std::path::Path::new(path)
                .with_file_name(format!(".check-{:08x}.sock", rand::random::<u32>()));
            let probe = probe.display().to_string();
            match handle.streamlocal_forward(probe.clone()).await {
                Ok(()) => {
                    let _ = handle.cancel_streamlocal_forward(probe).await;
                    "ok".into()
                }
                Err(e) => format!(
                    "forward to a socket in {} refused ({e}): the directory must exist and belong to {} (is the agent running?), and sshd allow AllowStreamLocalForwarding remote for that user, with AllowTcpForwarding not `no` (it refuses socket forwards too; `remote` with PermitListen none forwards no TCP port)",
                    std::path::Path::new(path)
                        .parent()
                        .map(|d| d.display().to_string())
                        .unwrap_or_default(),
                    ssh_settings.user
                ),
            }
        }
    };
    let _ = handle
        .disconnect(russh::Disconnect::ByApplication, "", "")
        .await;
    line
}

/// russh's callbacks for a `check --fleet` session: the host key check only.
struct CheckClient {
    check: crate::adapters::ssh::HostKeyCheck,
}

impl russh::client::Handler for CheckClient {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(self.check.check(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Layout;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn cfg(dir: &Path) -> Config {
        let mut c = Config::defaults(&Layout::for_dir(dir), Role::Master);
        c.source = dir.join("autoscaler.ini");
        c
    }

    #[tokio::test]
    async fn the_report_secret_must_be_there_and_private() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path());
        let secret = c.node.secret_file.clone().unwrap();
        for role in [Role::Master, Role::Node] {
            let p = problems(&c, role).await;
            let p = p
                .iter()
                .find(|p| p.key.as_deref() == Some("secret_file"))
                .unwrap();
            let hint = match role {
                Role::Master => "od -An -tx1 -N32 /dev/urandom",
                Role::Node => "copy the master's report secret here",
            };
            assert!(p.message.contains(hint), "{role}: {p}");
        }
        std::fs::write(&secret, "a".repeat(64)).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
        let p = problems(&c, Role::Node).await;
        assert!(p[0].message.contains("chmod 600"), "{p:?}");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(problems(&c, Role::Node).await.is_empty());
        // A report socket directory others may enter is a node's problem too.
        let dir = Path::new(c.node.report_socket.as_deref().unwrap())
            .parent()
            .unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = problems(&c, Role::Node).await;
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].to_string().contains("[node] report_socket") && p[0].message.contains("chmod 700"),
            "{p:?}"
        );
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(problems(&c, Role::Node).await.is_empty());
    }

    #[tokio::test]
    async fn finds_what_start_up_would_trip_on() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg(tmp.path());
        c.node.secret_file = None;
        let p: Vec<String> = problems(&c, Role::Master)
            .await
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].contains("[ssh] identity_file")
                && p[0].contains(&format!(
                    "ssh-keygen -t ed25519 -N '' -f {}",
                    c.ssh.identity_file.display()
                )),
            "{p:?}"
        );
        assert!(
            problems(&c, Role::Node).await.is_empty(),
            "a node needs none of it"
        );
        std::fs::write(&c.ssh.identity_file, "not a key").unwrap();
        let p = problems(&c, Role::Master).await;
        assert!(p[0].message.contains("cannot be used"), "{p:?}");
        c.scaling.dry_run = false;
        c.launch.image_id = "ami-1".into();
        c.launch.user_data_file = Some(tmp.path().join("missing.yaml"));
        c.aws.region = "eu-west-3".into();
        let keys: Vec<String> = problems(&c, Role::Master)
            .await
            .iter()
            .filter_map(|p| p.key.clone())
            .collect();
        assert_eq!(keys, ["identity_file", "user_data_file"]);
    }

    /// A response-time target needs a backend in HTTP mode, and every HAProxy signal a
    /// backend the template defines; with the signals off neither matters.
    #[tokio::test]
    async fn haproxy_signals_need_a_backend_that_measures_them() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg(tmp.path());
        c.node.secret_file = None;
        let tcp = tmp.path().join("tcp.cfg.tera");
        let src = crate::render::HAPROXY_TEMPLATE.replace("    mode http\n", "    mode tcp\n");
        assert_ne!(src, crate::render::HAPROXY_TEMPLATE);
        std::fs::write(&tcp, src).unwrap();
        c.haproxy.template = Some(tcp);
        let about = |p: Vec<Problem>| -> Vec<String> {
            p.into_iter()
                .filter(|p| p.key.as_deref() != Some("identity_file"))
                .map(|p| p.to_string())
                .collect()
        };
        assert_eq!(
            about(problems(&c, Role::Master).await),
            Vec::<String>::new()
        );
        c.scaling.target_sessions_per_node = Some(20.0);
        assert_eq!(
            about(problems(&c, Role::Master).await),
            Vec::<String>::new()
        );
        c.scaling.target_response_time = Some(std::time::Duration::from_millis(200));
        let p = about(problems(&c, Role::Master).await);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("[scaling] target_response_time") && p[0].contains("tcp mode"),
            "{p:?}"
        );
        c.haproxy.template = None;
        assert_eq!(
            about(problems(&c, Role::Master).await),
            Vec::<String>::new()
        );
        c.haproxy.backend = "web".into();
        assert_eq!(
            about(problems(&c, Role::Master).await),
            Vec::<String>::new()
        );
        c.haproxy.template = Some(tmp.path().join("other.cfg.tera"));
        std::fs::write(
            c.haproxy.template.as_ref().unwrap(),
            "defaults\n    mode http\nbackend app\n{% for s in servers %}    server {{ s.name }} {{ s.address }}\n{% endfor %}",
        )
        .unwrap();
        let p = about(problems(&c, Role::Master).await);
        assert!(
            p.len() == 1 && p[0].contains("[haproxy] backend") && p[0].contains("\"web\""),
            "{p:?}"
        );
    }

    /// `[cluster]`'s files are read as the etcd connection reads them: a credential another
    /// user may read, a certificate that is not PEM, an empty password are each named.
    #[tokio::test]
    async fn etcd_credentials_are_private_and_usable() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg(tmp.path());
        c.node.secret_file = None;
        // The problems in [cluster] (the identity key is missing here; another test's case).
        async fn cluster(c: &Config) -> Vec<(String, String)> {
            problems(c, Role::Master)
                .await
                .into_iter()
                .filter(|p| p.section == "cluster")
                .map(|p| (p.key.unwrap_or_default(), p.message))
                .collect()
        }
        let file = |name: &str, text: &str, mode: u32| {
            let p = tmp.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            Some(p)
        };
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        c.cluster.etcd_endpoints = vec!["https://127.0.0.1:2379".into()];
        c.cluster.etcd_ca_file = file("ca.pem", pem, 0o644);
        c.cluster.etcd_cert_file = file("client.pem", "garbage", 0o644);
        c.cluster.etcd_key_file = file("client.key", "-----BEGIN PRIVATE KEY-----\n", 0o640);
        c.cluster.etcd_user = "autoscaler".into();
        c.cluster.etcd_password_file = file("etcd.password", "\n", 0o600);
        let p = cluster(&c).await;
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["etcd_cert_file", "etcd_key_file", "etcd_password_file"],
            "{p:#?}"
        );
        assert!(p[0].1.contains("not PEM"), "{p:#?}");
        assert!(
            p[1].1.contains("mode 640") && p[1].1.contains("chmod 600"),
            "{p:#?}"
        );
        assert!(p[2].1.contains("empty"), "{p:#?}");
        c.cluster.etcd_cert_file = file("client.pem", pem, 0o644);
        c.cluster.etcd_key_file = file("client.key", "-----BEGIN PRIVATE KEY-----\n", 0o600);
        c.cluster.etcd_password_file = file("etcd.password", "pw\n", 0o600);
        assert_eq!(cluster(&c).await, []);
        // Without [cluster], its files are not looked at.
        c.cluster.etcd_endpoints.clear();
        c.cluster.etcd_password_file = file("etcd.password", "pw\n", 0o644);
        assert_eq!(cluster(&c).await, []);
    }
}
