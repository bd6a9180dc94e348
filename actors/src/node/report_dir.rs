//! ReportDir (node role): the agent reports to every master whose forward appears in the
//! report socket directory (the directory of `[node] report_socket`).
//!
//! Each master asks the node's sshd — logged in as the agent's user — to create its own socket
//! there (`streamlocal-forward@openssh.com`, OpenSSH's `ssh -R /path:…`). The directory
//! belongs to the agent's user and nobody else may enter it (mode 0700, checked at start), so
//! no other local user can connect to a master's socket, nor put one of their own there. The
//! directory is looked at every second; each socket found gets its own [`ReportLink`] (its own
//! buffer), and every sample goes to each of them. A master added later is picked up without
//! a restart of the agent.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, AsyncContext, Context, Handler};
use slog::{info, o, warn, Logger};

use super::report_link::{CpuSampled, Endpoint, ReportLink};
use crate::adapters::files;
use crate::report::Hello;

/// How often the directory is looked at.
pub const SCAN_EVERY: Duration = Duration::from_secs(1);
/// Most masters one agent reports to.
pub const MAX_MASTERS: usize = 16;

/// Why the report socket directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ReportDirError {
    #[error("report socket directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("report socket directory {dir} belongs to uid {owner}, not to the agent's user (uid {me}): the masters' sockets must be reachable by the agent alone; chown it to the agent's user")]
    Owner { dir: PathBuf, owner: u32, me: u32 },
    #[error("report socket directory {dir} has mode {mode:o}: other local users could reach the masters' sockets; chmod 700 {dir}")]
    Open { dir: PathBuf, mode: u32 },
}

/// Creates `dir` (mode 0700) if it is missing, and checks that it belongs to this process's
/// user and is closed to everyone else.
pub fn prepare(dir: &Path) -> Result<(), ReportDirError> {
    files::create_dir_all(dir, 0o700).map_err(|source| ReportDirError::Io {
        dir: dir.to_path_buf(),
        source,
    })?;
    inspect(dir)
}

/// Checks that `dir` belongs to this process's user and is closed to everyone else (a
/// missing directory is an error here; [`prepare`] makes it).
pub fn inspect(dir: &Path) -> Result<(), ReportDirError> {
    let io = |source| ReportDirError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(dir).map_err(io)?;
    // The effective uid, without unsafe code: /proc/self belongs to it.
    let me = std::fs::metadata("/proc/self").map_err(io)?.uid();
    if meta.uid() != me {
        return Err(ReportDirError::Owner {
            dir: dir.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ReportDirError::Open {
            dir: dir.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// The actor: one [`ReportLink`] per master socket in `dir`.
pub struct ReportDir {
    dir: PathBuf,
    hello: Hello,
    buffer: usize,
    secret: Option<Arc<Vec<u8>>>,
    links: BTreeMap<PathBuf, Addr<ReportLink>>,
    full_logged: bool,
    log: Logger,
}

impl ReportDir {
    /// Watches `dir` (see [`prepare`]); links introduce themselves with `hello`, keep `buffer`
    /// samples each and prove `secret`.
    pub fn new(
        dir: &Path,
        hello: Hello,
        buffer: usize,
        secret: Option<Arc<Vec<u8>>>,
        log: &Logger,
    ) -> ReportDir {
        ReportDir {
            dir: dir.to_path_buf(),
            hello,
            buffer,
            secret,
            links: BTreeMap::new(),
            full_logged: false,
            log: log.new(o!("actor" => "ReportDir", "dir" => dir.display().to_string())),
        }
    }

    fn scan(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let is_socket = e.file_type().is_ok_and(|t| t.is_socket());
            let named = path.extension().is_some_and(|x| x == "sock");
            // `.name.sock`: not a master's (`check --fleet` tries a forward beside the real
            // one, and sshd leaves the socket behind); removed once nobody listens on it.
            if is_socket && e.file_name().to_string_lossy().starts_with('.') {
                // Asked without blocking: a listener with a full backlog must not stall the
                // agent (one thread does all of its work).
                actix::spawn(async move {
                    if tokio::net::UnixStream::connect(&path).await.is_err() {
                        let _ = std::fs::remove_file(&path);
                    }
                });
                continue;
            }
            if !is_socket || !named || self.links.contains_key(&path) {
                continue;
            }
            if self.links.len() >= MAX_MASTERS {
                if !self.full_logged {
                    warn!(self.log, "More master sockets than one agent reports to; ignoring the rest"; "limit" => MAX_MASTERS);
                    self.full_logged = true;
                }
                continue;
            }
            info!(self.log, "Found a master's forward"; "socket" => %path.display());
            let link = ReportLink::new(
                Endpoint::Unix(path.clone()),
                self.hello.clone(),
                self.buffer,
                self.secret.clone(),
                &self.log,
            )
            .start();
            self.links.insert(path, link);
        }
    }
}

impl Actor for ReportDir {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        info!(
            self.log,
            "Reporting to every master socket in the directory"
        );
        self.scan();
        ctx.run_interval(SCAN_EVERY, |this, _| this.scan());
    }
}

impl Handler<CpuSampled> for ReportDir {
    type Result = ();

    fn handle(&mut self, msg: CpuSampled, _: &mut Context<Self>) {
        for l in self.links.values() {
            l.do_send(msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_is_made_private_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("reports");
        prepare(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        let e = prepare(&dir).unwrap_err().to_string();
        assert!(e.contains("mode 750") && e.contains("chmod 700"), "{e}");
    }

    /// A `.name.sock` (what `check --fleet` leaves) is not a master's: no link to it, and it
    /// is removed once nobody listens on it; a master's socket gets its link.
    #[actix_rt::test]
    async fn dot_sockets_are_not_masters() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("reports");
        prepare(&dir).unwrap();
        let _master = std::os::unix::net::UnixListener::bind(dir.join("master.sock")).unwrap();
        drop(std::os::unix::net::UnixListener::bind(dir.join(".check-1.sock")).unwrap());
        let live = std::os::unix::net::UnixListener::bind(dir.join(".check-2.sock")).unwrap();
        let hello = Hello {
            node: "n".into(),
            boot: 1,
            instance_id: None,
            uptime_ms: None,
            interval_ms: 1000,
            buffer: 1,
            nonce: String::new(),
        };
        let log = Logger::root(slog::Discard, o!());
        let mut d = ReportDir::new(&dir, hello, 1, None, &log);
        d.scan();
        let linked: Vec<PathBuf> = d.links.keys().cloned().collect();
        assert_eq!(linked, [dir.join("master.sock")]);
        // The probes are asked in the background: give them a moment (bounded).
        for _ in 0..50 {
            if !dir.join(".check-1.sock").exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            !dir.join(".check-1.sock").exists(),
            "a stale probe is removed"
        );
        assert!(
            dir.join(".check-2.sock").exists(),
            "one still listened on is left"
        );
        drop(live);
    }
}
