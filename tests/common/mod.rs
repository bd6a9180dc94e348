//! Helpers shared by the integration tests: running the built binary in a temp dir, and
//! finding the real tools (HAProxy, sshd, moto) the edge tests need.
#![allow(dead_code)]

pub mod cut;
pub mod ec2_proxy;
pub mod etcd;
pub mod moto;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The built `autoscaler` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_autoscaler"))
}

/// A temp dir with `autoscaler init --dir` done in it; commands run with its config.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

/// Whatever still runs from the sandbox's directory when it goes (a scale command orphaned by
/// a SIGKILLed master, say) goes with it.
impl Drop for Sandbox {
    fn drop(&mut self) {
        kill_mentioning(self.dir.path());
    }
}

impl Sandbox {
    /// A fresh, initialised configuration directory (role master) with the master's SSH key
    /// made, as the README's set-up does.
    pub fn new() -> Sandbox {
        let s = Sandbox::without_key();
        if tool("ssh-keygen").is_some() {
            keygen(&s.path().join("id_ed25519"));
        }
        s
    }

    /// `autoscaler init` only: no SSH key yet.
    pub fn without_key() -> Sandbox {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = Sandbox { dir };
        let out = s.run(&["init", "--dir", s.path().to_str().unwrap()]);
        assert!(out.status.success(), "init failed: {}", stderr(&out));
        s
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> PathBuf {
        self.path().join("autoscaler.ini")
    }

    /// Runs the binary with this sandbox's configuration.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("AUTOSCALER_CONFIG", self.config())
            .env_remove("RUST_LOG")
            .output()
            .expect("run autoscaler")
    }

    /// Replaces `key = …` in `[section]` of the sandbox's autoscaler.ini.
    pub fn set(&self, section: &str, key: &str, value: &str) {
        let text = std::fs::read_to_string(self.config()).unwrap();
        let mut out = String::new();
        let mut current = String::new();
        let mut done = false;
        for line in text.lines() {
            if let Some(s) = line.strip_prefix('[') {
                current = s.trim_end_matches(']').to_string();
            }
            if current == section && line.split_once(" = ").is_some_and(|(k, _)| k == key) {
                out.push_str(&format!("{key} = {value}\n"));
                done = true;
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        assert!(done, "[{section}] {key} not found");
        std::fs::write(self.config(), out).unwrap();
    }

    /// [`Sandbox::set`] for each `(section, key, value)`.
    pub fn set_all(&self, settings: &[Setting]) {
        for (section, key, value) in settings {
            self.set(section, key, value);
        }
    }
}

/// One `[section] key = value` of autoscaler.ini.
pub type Setting = (&'static str, &'static str, String);

/// A master that keeps a floor of one node (at most three), launching for it without
/// health-gating the launched hosts, and leaves this machine's HAProxy alone.
pub fn floor_master() -> Vec<Setting> {
    vec![
        ("ssh", "user", current_user()),
        ("scaling", "dry_run", "false".into()),
        ("scaling", "min_nodes", "1".into()),
        ("scaling", "max_nodes", "3".into()),
        ("launch", "app_port", "8080".into()),
        ("launch", "health_check", "false".into()),
        ("launch", "launch_timeout", "60s".into()),
        ("launch", "health_timeout", "60s".into()),
        ("haproxy", "reload_command", "true".into()),
        ("haproxy", "check_command", "test -f {config}".into()),
        ("haproxy", "debounce", "100ms".into()),
    ]
}

/// A master that acts on a hot node at once and leaves this machine's HAProxy alone: no
/// warm-up, 2 s windows, not a dry run, the command launcher running `scale_up_command`
/// with no health gate, reports over TCP on `report_port`, new host keys accepted.
pub fn quick_command_master(report_port: u16, scale_up_command: &Path) -> Vec<Setting> {
    vec![
        ("ssh", "user", current_user()),
        ("ssh", "host_key_policy", "accept-new".into()),
        ("node", "report_socket", String::new()),
        ("node", "report_port", report_port.to_string()),
        ("scaling", "dry_run", "false".into()),
        ("scaling", "warmup", "0s".into()),
        ("scaling", "scale_up_window", "2s".into()),
        ("scaling", "stale_after", "2s".into()),
        ("launch", "launcher", "command".into()),
        (
            "launch",
            "scale_up_command",
            scale_up_command.display().to_string(),
        ),
        ("launch", "health_check", "false".into()),
        ("haproxy", "reload_command", "true".into()),
        ("haproxy", "debounce", "100ms".into()),
    ]
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts that a command exited with `code` and said `needle` on standard error (both shown
/// when not); returns what it said there.
#[track_caller]
pub fn assert_fails(out: &Output, code: i32, needle: &str) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(needle), "no {needle:?} in: {err}");
    err
}

/// Set to `1` by the README's test command (scripts/test.sh, and so CI): a test that cannot
/// find what it needs fails, naming the package that provides it, instead of skipping.
pub const STRICT_ENV: &str = "AUTOSCALER_TEST_STRICT";

/// Whether a missing tool fails the test ([`STRICT_ENV`]).
pub fn strict() -> bool {
    std::env::var_os(STRICT_ENV).is_some_and(|v| v == "1")
}

/// Something a test needs is not here: `what` is missing, `fix` says how to get it. Under the
/// README's test command ([`strict`]) the test fails; under a bare `cargo test` it says so
/// loudly (shown with `--nocapture`) and the caller returns early.
#[track_caller]
pub fn unavailable(what: &str, fix: &str) {
    unavailable_in(strict(), what, fix)
}

#[track_caller]
pub(crate) fn unavailable_in(strict: bool, what: &str, fix: &str) {
    if strict {
        panic!("{what}: {fix} (scripts/test.sh installs it; {STRICT_ENV}=1 makes this a failure)");
    }
    eprintln!(
        "\n=============================================================\n\
         SKIPPED: {what}: {fix}.\n\
         bash scripts/test.sh installs everything and never skips.\n\
         =============================================================\n"
    );
}

/// The Debian package of each program the tests use.
pub const PACKAGES: &[(&str, &str)] = &[
    ("haproxy", "haproxy"),
    ("sshd", "openssh-server"),
    ("ssh-keygen", "openssh-client"),
    ("ssh", "openssh-client"),
    ("ssh-keyscan", "openssh-client"),
    ("ip", "iproute2"),
    ("etcd", "etcd-server"),
    ("promtool", "prometheus"),
    ("cloud-init", "cloud-init"),
    ("systemd-analyze", "systemd"),
    ("groff", "groff-base"),
    ("openssl", "openssl"),
    ("unshare", "util-linux"),
    ("setpriv", "util-linux"),
    ("nsenter", "util-linux"),
    ("bash", "bash"),
    ("nft", "nftables"),
];

/// Finds a program on PATH or at one of the usual sbin paths. When it is not there, see
/// [`unavailable`]: a failure under the test command, a loud skip (None) otherwise.
#[track_caller]
pub fn tool(name: &str) -> Option<PathBuf> {
    tool_in(strict(), name)
}

#[track_caller]
pub(crate) fn tool_in(strict: bool, name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    let found = dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file());
    if found.is_none() {
        let package = PACKAGES
            .iter()
            .find(|(tool, _)| *tool == name)
            .map_or("its package", |(_, p)| p);
        unavailable_in(
            strict,
            &format!("`{name}` is not installed; this test needs the real one"),
            &format!("apt-get install {package}"),
        );
    }
    found
}

/// Whether this process runs as root (network namespaces, the test user and HAProxy's
/// privileged set-ups need it). When not, see [`unavailable`].
#[track_caller]
pub fn root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    let is_root = String::from_utf8_lossy(&out.stdout).trim() == "0";
    if !is_root {
        unavailable(
            "this test needs root (network namespaces, a test user)",
            "run the tests as root",
        );
    }
    is_root
}

/// A port nothing listens on now on `ip`, outside the kernel's ephemeral range. A port the
/// kernel handed out (bind to port 0) is one it may hand to any outgoing connection a moment
/// later, an SSH session or HTTP client of another test, and a server started on it then
/// fails with "address already in use" (seen with an etcd restarted on its port). Outside the
/// range only explicit binds take ports, and within this process no port is offered twice.
/// A machine whose range leaves no room outside it gets a port of the kernel's choosing.
pub fn free_port(ip: &str) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let mut bounds = range
        .iter()
        .flat_map(|r| r.split_whitespace())
        .map(|n| n.parse::<u32>().ok());
    let (low, high) = match (bounds.next().flatten(), bounds.next().flatten()) {
        (Some(l), Some(h)) => (l, h),
        _ => (32_768, 60_999),
    };
    // Below the range (and below 30000, where Kubernetes puts its node ports), else above it.
    let (first, end) = match (10_000, low.min(30_000)) {
        (f, e) if e >= f + 2_000 => (f, e),
        _ => (high + 1, 65_536),
    };
    if end < first + 2_000 {
        return std::net::TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let span = end - first;
    // Another test process (a second `cargo test`) starts elsewhere in the span.
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (first + (start + n) % span) as u16;
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip} in {first}..{end}");
}

/// Waits (bounded) until `addr` accepts TCP.
pub fn wait_for_tcp(addr: &str, what: &str) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("{what} did not start listening on {addr} within 5s");
}

/// The login name tests use for SSH (sshd runs as root here and lets this user in).
pub fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// An unprivileged system user whose login shell is /bin/sh, for tests that run commands over
/// SSH: root's shell start-up files on a development machine (pyenv, say) are nothing a test
/// should depend on. Created on first use (tests run as root); None, loudly, when it cannot be.
pub fn shell_user() -> Option<String> {
    const NAME: &str = "as-test";
    let exists = Command::new("id")
        .arg(NAME)
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        let made = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/",
                "--shell",
                "/bin/sh",
                NAME,
            ])
            .status()
            .is_ok_and(|s| s.success());
        if !made {
            unavailable(
                &format!("cannot create the test user {NAME}"),
                "run the tests as root",
            );
            return None;
        }
    }
    // No password, but not locked: sshd refuses a locked account even for keys.
    let _ = Command::new("usermod").args(["-p", "*", NAME]).status();
    Some(NAME.to_string())
}

/// `ssh-keygen -t ed25519` into `path` (and `path.pub`).
pub fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A real OpenSSH server on loopback (or inside a network namespace), with throwaway keys,
/// killed on drop.
pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub port: u16,
    pub netns: Option<String>,
    /// A command line sshd is run under (e.g. `unshare -m …`), which ends by exec'ing it.
    pub wrapper: Vec<String>,
    child: Option<std::process::Child>,
}

impl Sshd {
    /// Starts sshd on `addr` (port chosen here unless given), trusting `client_pub`.
    pub fn start(
        sshd: &Path,
        addr: &str,
        port: Option<u16>,
        client_pub: &Path,
        netns: Option<&str>,
    ) -> Sshd {
        let dir = tempfile::tempdir().unwrap();
        keygen(&dir.path().join("host_ed25519"));
        std::fs::copy(client_pub, dir.path().join("authorized_keys")).unwrap();
        let port = port.unwrap_or_else(|| if netns.is_some() { 22 } else { free_port(addr) });
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("sshd_config"),
            format!(
                "Port {port}\nListenAddress {addr}\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nAllowTcpForwarding yes\nGatewayPorts no\n\
                 StrictModes no\nPermitRootLogin prohibit-password\nClientAliveInterval 2\n"
            ),
        )
        .unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let mut s = Sshd {
            dir,
            addr: addr.to_string(),
            port,
            netns: netns.map(String::from),
            wrapper: Vec::new(),
            child: None,
        };
        s.spawn(sshd);
        s
    }

    /// Like [`Sshd::start`], with sshd run under `wrapper` (its process id is sshd's, so the
    /// wrapper must exec sshd).
    pub fn start_wrapped(
        sshd: &Path,
        addr: &str,
        client_pub: &Path,
        netns: Option<&str>,
        wrapper: &[String],
    ) -> Sshd {
        let mut s = Sshd::start(sshd, addr, None, client_pub, netns);
        s.stop();
        s.wrapper = wrapper.to_vec();
        s.spawn(sshd);
        s
    }

    /// sshd's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn spawn(&mut self, sshd: &Path) {
        let d = self.dir.path();
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(ns) = &self.netns {
            argv.extend(["ip", "netns", "exec", ns.as_str()].map(Into::into));
        }
        argv.extend(self.wrapper.iter().map(Into::into));
        argv.push(sshd.into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd.arg("-D")
            .arg("-f")
            .arg(d.join("sshd_config"))
            .arg("-E")
            .arg(d.join("sshd.log"));
        self.child = Some(cmd.spawn().expect("start sshd"));
        if self.netns.is_none() {
            wait_for_tcp(&format!("{}:{}", self.addr, self.port), "sshd");
        } else {
            // Reachable from the root namespace over the veth pair.
            wait_for_tcp(
                &format!("{}:{}", self.addr, self.port),
                "sshd in its namespace",
            );
        }
    }

    /// The known_hosts line for this server.
    pub fn known_hosts_line(&self) -> String {
        let key = std::fs::read_to_string(self.dir.path().join("host_ed25519.pub")).unwrap();
        let mut it = key.split_whitespace();
        let (alg, b64) = (it.next().unwrap(), it.next().unwrap());
        if self.port == 22 {
            format!("{} {alg} {b64}\n", self.addr)
        } else {
            format!("[{}]:{} {alg} {b64}\n", self.addr, self.port)
        }
    }

    /// Kills sshd and every session process it started (they hold the forwards).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_tree(c.id());
            let _ = c.wait();
        }
        for _ in 0..100 {
            if std::net::TcpStream::connect((self.addr.as_str(), self.port)).is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Adds `text` at the end of its configuration (a `Match` block, say) and restarts it.
    pub fn append_config(&mut self, sshd: &Path, text: &str) {
        let conf = self.dir.path().join("sshd_config");
        let old = std::fs::read_to_string(&conf).unwrap();
        std::fs::write(&conf, format!("{old}{text}\n")).unwrap();
        self.restart(sshd);
    }

    /// Starts it again with the same keys and port.
    pub fn restart(&mut self, sshd: &Path) {
        self.stop();
        self.spawn(sshd);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A child process killed on drop, with every process it started.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        kill_tree(self.0.id());
        let _ = self.0.wait();
    }
}

/// A network namespace with a veth pair: 10.200.N.1 on the host side, 10.200.N.2 inside, N
/// a subnet no interface of this machine has yet (so two runs of the suite, or two tests,
/// never share one). Deleted on drop (the veth pair goes with it).
pub struct Netns {
    pub name: String,
    pub inner: String,
    host_if: String,
}

impl Netns {
    /// A new namespace; `n` tells a test's namespaces apart in their names.
    pub fn create(n: u8) -> Netns {
        let name = format!("as-test-{}-{n}", std::process::id());
        let host_if = format!("asv{}h{n}", std::process::id() % 10000);
        let ns_if = format!("asv{}n{n}", std::process::id() % 10000);
        let sh = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("ip");
            assert!(st.success(), "ip {args:?} failed");
        };
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        // Choosing a free subnet and taking it is one step for every process on the machine.
        let lock = std::fs::File::create(std::env::temp_dir().join("autoscaler-test-netns.lock"))
            .expect("the subnet lock file");
        lock.lock().expect("the subnet lock");
        let used = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .expect("ip addr");
        let used = String::from_utf8_lossy(&used.stdout).into_owned();
        let subnet = (1..=254u8)
            .map(|k| k.wrapping_add((std::process::id() % 251) as u8).max(1))
            .find(|k| !used.contains(&format!(" 10.200.{k}.")))
            .expect("a free 10.200.N.0/24 subnet");
        sh(&["netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            inner: format!("10.200.{subnet}.2"),
            host_if: host_if.clone(),
        };
        sh(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        sh(&["link", "set", &ns_if, "netns", &name]);
        sh(&[
            "addr",
            "add",
            &format!("10.200.{subnet}.1/24"),
            "dev",
            &host_if,
        ]);
        drop(lock);
        sh(&["link", "set", &host_if, "up"]);
        sh(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("10.200.{subnet}.2/24"),
            "dev",
            &ns_if,
        ]);
        sh(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"]);
        sh(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").arg("-9").arg(pid).status();
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// SIGKILLs `pid` and all its descendants (found through /proc), children first collected so
/// none is reparented away before it is found.
pub fn kill_tree(pid: u32) {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                    continue;
                };
                // Field 4 (after the parenthesised command name) is the parent pid.
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1))
                    .and_then(|x| x.parse::<u32>().ok());
                if ppid == Some(parent) && !all.contains(&p) {
                    all.push(p);
                }
            }
        }
        i += 1;
    }
    for p in all {
        let _ = Command::new("kill")
            .args(["-9", &p.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// SIGKILLs every process (and its descendants) whose command line mentions `path`: scripts a
/// test wrote there and that outlived whoever started them.
pub fn kill_mentioning(path: &Path) {
    let needle = path.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let me = std::process::id();
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if pid != me && cmdline.windows(needle.len()).any(|w| w == needle) {
            kill_tree(pid);
        }
    }
}

/// Log records of in-process actors, as JSON lines, for asserting on what they say.
#[derive(Clone, Default)]
pub struct LogBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl LogBuf {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    pub fn logger(&self) -> slog::Logger {
        use slog::Drain;
        let drain = slog_json::Json::new(self.clone())
            .add_default_keys()
            .build();
        slog::Logger::root(std::sync::Mutex::new(drain).map(slog::Fuse), slog::o!())
    }
    /// Waits (bounded) until the log contains `needle`.
    pub async fn wait_for(&self, needle: &str, limit: std::time::Duration) {
        self.wait_for_count(needle, 1, limit).await
    }

    /// Waits (bounded) until the log contains `needle` at least `n` times.
    pub async fn wait_for_count(&self, needle: &str, n: usize, limit: std::time::Duration) {
        let end = std::time::Instant::now() + limit;
        while self.text().matches(needle).count() < n {
            assert!(
                std::time::Instant::now() < end,
                "log never said {needle:?} {n} times:\n{}",
                self.text()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// `autoscaler master` as a process, its JSON log records read as they come.
pub struct MasterProc {
    pub proc: Proc,
    records: std::sync::mpsc::Receiver<serde_json::Value>,
    /// Every record read so far.
    seen: std::sync::Mutex<Vec<serde_json::Value>>,
}

impl MasterProc {
    pub fn spawn(config: &Path, extra: &[&str]) -> MasterProc {
        MasterProc::spawn_with_env(config, extra, &[])
    }

    /// [`MasterProc::spawn`] with more environment variables.
    pub fn spawn_with_env(
        config: &Path,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> MasterProc {
        let mut proc = Proc(
            Command::new(bin())
                .args(["--log-format", "json"])
                .args(extra)
                .arg("master")
                .env("AUTOSCALER_CONFIG", config)
                .envs(env.iter().copied())
                .stderr(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let (tx, records) = std::sync::mpsc::channel();
        let stderr = proc.0.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        MasterProc {
            proc,
            records,
            seen: Default::default(),
        }
    }

    /// The next record matching `pred` within 20 s, skipping others.
    pub fn wait(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            match self
                .records
                .recv_timeout(end.saturating_duration_since(Instant::now()))
            {
                Ok(v) => {
                    self.seen.lock().unwrap().push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!("master never logged {what}"),
            }
        }
    }

    /// The next record with message `msg`.
    pub fn wait_msg(&self, msg: &str) -> serde_json::Value {
        self.wait(msg, |v| v["msg"] == msg)
    }

    pub fn terminate(&self) {
        Command::new("kill")
            .args(["-TERM", &self.proc.0.id().to_string()])
            .status()
            .unwrap();
    }
}

impl MasterProc {
    /// SIGKILL: no clean-up of any kind, as a crash or the OOM killer would do.
    pub fn kill(mut self) {
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
    }

    /// Waits (bounded: 40 s) until some record logged so far matches `pred`; records are
    /// not consumed, unlike [`MasterProc::wait`].
    pub async fn logged(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let end = Instant::now() + Duration::from_secs(40);
        while self.matching(&pred).is_empty() {
            assert!(Instant::now() < end, "the master never logged {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// [`MasterProc::logged`], for a test without a runtime.
    pub fn logged_blocking(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let end = Instant::now() + Duration::from_secs(40);
        while self.matching(&pred).is_empty() {
            assert!(Instant::now() < end, "the master never logged {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every record logged so far that matches `pred`, without waiting.
    pub fn matching(&self, pred: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        let mut seen = self.seen.lock().unwrap();
        seen.extend(self.records.try_iter());
        seen.iter().filter(|v| pred(v)).cloned().collect()
    }
}

/// Copies a report secret to `to`, mode 0600, as an operator copies the master's to a node.
pub fn copy_secret(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
    std::fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

/// One line from `s`, read byte by byte (nothing past it is consumed).
fn read_line(s: &mut impl std::io::Read) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        line.push(byte[0]);
    }
    line.pop();
    Ok(line)
}

/// The agent's handshake on `s`, a connection to the master's forward `via` (`tcp:PORT`):
/// reads the challenge, says `hello` proving the report secret at `secret` (None: the empty
/// key of a master without a secret), and checks the master's welcome. The channel to send
/// samples with, or Err when the master did not accept the hello (or is not a master).
pub fn handshake(
    s: &mut (impl std::io::Read + std::io::Write),
    hello: autoscaler_actors::report::Hello,
    secret: Option<&Path>,
    via: &str,
) -> std::io::Result<autoscaler_actors::report::AgentChannel> {
    use autoscaler_actors::report::AgentChannel;
    let key = match secret {
        Some(p) => std::fs::read_to_string(p)?.trim().as_bytes().to_vec(),
        None => Vec::new(),
    };
    let challenge = read_line(s)?;
    let (mut ch, line) =
        AgentChannel::answer(&challenge, via, hello, &key).map_err(std::io::Error::other)?;
    s.write_all(line.as_bytes())?;
    let welcome = read_line(s)?;
    ch.welcome(&welcome).map_err(std::io::Error::other)?;
    Ok(ch)
}

/// A hello as the agent sends it, sampling every 200 ms.
pub fn hello(node: &str, boot: u64, uptime_ms: Option<u64>) -> autoscaler_actors::report::Hello {
    autoscaler_actors::report::Hello {
        node: node.into(),
        boot,
        instance_id: None,
        uptime_ms,
        interval_ms: 200,
        buffer: 16,
        nonce: String::new(),
    }
}

/// A sample of `busy` % numbered `seq`, taken now.
pub fn sample(seq: u64, busy: f64) -> autoscaler_actors::report::CpuSample {
    autoscaler_actors::report::CpuSample {
        seq,
        ts_ms: 1,
        busy_pct: busy,
        cores: 2,
        age_ms: 0,
    }
}

/// A stand-in node agent: connects to 127.0.0.1:`port` (a master's forward), proves the
/// report secret at `secret`, says hello (an hour-old machine) and reports `busy` % every
/// 200 ms; reconnects while the forward is away. Stops when dropped.
pub struct FakeAgent {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeAgent {
    pub fn start(port: u16, busy: f64, secret: &Path) -> FakeAgent {
        FakeAgent::start_as(port, busy, secret, 1000 + u64::from(port))
    }

    /// [`FakeAgent::start`] as the agent run `boot` (two of them on one port are two agents
    /// taking turns).
    pub fn start_as(port: u16, busy: f64, secret: &Path, boot: u64) -> FakeAgent {
        let secret = secret.to_path_buf();
        use std::io::Write;
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seq = 0u64;
            // Bounded: at most ten minutes, whatever the test does.
            let end = std::time::Instant::now() + std::time::Duration::from_secs(600);
            while !flag.load(Ordering::SeqCst) && std::time::Instant::now() < end {
                let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                };
                let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                let me = hello(&format!("fake-{port}"), boot, Some(3_600_000));
                let Ok(ch) = handshake(&mut s, me, Some(&secret), &format!("tcp:{port}")) else {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                };
                while !flag.load(Ordering::SeqCst) {
                    if s.write_all(ch.sample(&sample(seq, busy)).as_bytes())
                        .is_err()
                    {
                        break;
                    }
                    seq += 1;
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            }
        });
        FakeAgent {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `GET path` on `addr` (HTTP/1.0, so the server closes): the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_get_accept(addr, path, "*/*")
}

/// [`http_get`], or None when nothing answers.
pub fn http_get_try(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// [`http_get`] with an `Accept` header.
pub fn http_get_accept(addr: &str, path: &str, accept: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

/// Runs `cmd` with `text` on its standard input; its output and status.
pub fn output_with_stdin(cmd: &mut Command, text: &str) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `promtool check metrics` on `text`: None when it is clean, else what promtool said.
pub fn promtool_check(promtool: &Path, text: &str) -> Option<String> {
    let out = output_with_stdin(Command::new(promtool).args(["check", "metrics"]), text);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    match out.status.success() && said.trim().is_empty() {
        true => None,
        false => Some(said),
    }
}

/// The launch intents on disk in a state directory (`intents/*.json`), as the reconciler
/// reads them.
pub fn intents_in(state: &Path) -> Vec<autoscaler_actors::master::launcher::intents::Intent> {
    json_values(&state.join("intents"))
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect()
}

/// The drain records on disk in a state directory.
pub fn drains_in(state: &Path) -> Vec<autoscaler_actors::master::launcher::intents::Drain> {
    json_values(&state.join("drains"))
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect()
}

/// Writes a launch intent as a master killed after writing it would have left it.
pub fn write_intent(
    state: &Path,
    i: &autoscaler_actors::master::launcher::intents::Intent,
) -> std::io::Result<()> {
    let dir = state.join("intents");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join(format!("{}.json", i.decision_id)),
        serde_json::to_vec(i).unwrap(),
    )
}

fn json_values(dir: &Path) -> Vec<serde_json::Value> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter_map(|p| serde_json::from_slice(&std::fs::read(p).ok()?).ok())
        .collect()
}

/// An HTTP backend on `ip` (a port chosen here) answering every request with `body` after
/// `hold` (CPU idle meanwhile), or once [`HttpBackend::release`]d if started with
/// [`HttpBackend::gated`]; counts what it served; stops when dropped.
pub struct HttpBackend {
    pub addr: String,
    pub port: u16,
    served: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    gate: std::sync::Arc<Gate>,
}

/// Holds answers until opened (at most a minute: a test that forgets cannot hang).
#[derive(Default)]
struct Gate {
    open: std::sync::Mutex<bool>,
    changed: std::sync::Condvar,
}

impl Gate {
    fn wait(&self) {
        let open = self.open.lock().unwrap();
        let _open = self
            .changed
            .wait_timeout_while(open, Duration::from_secs(60), |open| !*open)
            .unwrap();
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.changed.notify_all();
    }
}

impl HttpBackend {
    pub fn start(ip: &str, body: &str, hold: Duration) -> HttpBackend {
        Self::serve(ip, body, Some(hold))
    }

    /// A backend that answers only once [`HttpBackend::release`]d: a request stays in flight
    /// for as long as a test needs, however slow the machine.
    pub fn gated(ip: &str, body: &str) -> HttpBackend {
        Self::serve(ip, body, None)
    }

    /// Lets every held request (and every later one) be answered.
    pub fn release(&self) {
        self.gate.open();
    }

    fn serve(ip: &str, body: &str, hold: Option<Duration>) -> HttpBackend {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let l = std::net::TcpListener::bind((ip, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let gate = std::sync::Arc::new(Gate::default());
        let (flag, count, held) = (stop.clone(), served.clone(), gate.clone());
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut c) = conn else { continue };
                let (count, answer, held) = (count.clone(), answer.clone(), held.clone());
                std::thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut buf = [0u8; 4096];
                    let mut req = Vec::new();
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => return, // a TCP health check
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    match hold {
                        Some(hold) => std::thread::sleep(hold),
                        None => held.wait(),
                    }
                    if c.write_all(answer.as_bytes()).is_ok() {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        HttpBackend {
            addr: ip.to_string(),
            port,
            served,
            stop,
            gate,
        }
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.gate.open();
        let _ = std::net::TcpStream::connect((self.addr.as_str(), self.port));
    }
}

/// A wrapper ([`Sshd::start_wrapped`]) that runs its command in a mount namespace of its own
/// where `dir` is mounted over `over`: the same path, another directory, as on another
/// machine.
pub fn mounted_over(dir: &Path, over: &Path) -> Vec<String> {
    let bind = format!(
        "mount --bind {} {} && exec \"$@\"",
        dir.display(),
        over.display()
    );
    [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        &bind,
        "sh",
    ]
    .map(String::from)
    .to_vec()
}

/// The node's sshd settings as README step 3 writes them (`50-autoscaler.conf`), with `user`
/// standing in for `autoscaler`.
pub fn readme_sshd_snippet(user: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = "cat > /etc/ssh/sshd_config.d/50-autoscaler.conf <<'EOF'\n";
    let snippet = readme
        .split_once(start)
        .and_then(|(_, rest)| rest.split_once("\nEOF\n"))
        .map(|(s, _)| s.to_string())
        .expect("README step 3 writes 50-autoscaler.conf");
    assert!(snippet.contains("Match User autoscaler"), "{snippet}");
    snippet.replace("Match User autoscaler", &format!("Match User {user}"))
}
