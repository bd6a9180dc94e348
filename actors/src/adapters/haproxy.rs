//! HAProxy servers, on this machine or over SSH, behind one interface ([`Link`]): read the
//! live configuration, install a candidate that `[haproxy] check_command` accepted (written
//! next to the live file, validated there with that server's own HAProxy, renamed over it),
//! run the reload command, and talk to the runtime API on the stats socket (over SSH through a
//! Unix-socket forward of the same session). A configuration that fails validation never
//! replaces the live one. Commands run with a timeout; local ones with a clean environment.
//!
//! Remote servers need POSIX `sh`, `cat`, `mv` and `rm` and their own `haproxy`; nothing of
//! OpenSSH's client is used.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use russh::client;
use russh::keys::PublicKeyOrCertificate;
use russh::ChannelMsg;
use slog::Logger;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::files;
use super::process::{self, CommandFailed};
use super::ssh::{self, HostKeyCheck, SshError, SshSettings};
use crate::config::{CommandLine, HaproxyTarget, CONFIG_VAR};

/// Why a configuration was not installed, or a server not reached.
#[derive(Debug, Error)]
pub enum HaproxyError {
    #[error("HAProxy rejected the configuration (`{command}` exited with {status}):\n{output}")]
    Invalid {
        command: String,
        status: String,
        output: String,
    },
    #[error("the check program `{program}` is not installed on {server}; refusing to install a configuration nobody validated")]
    CheckMissing { program: String, server: String },
    #[error(transparent)]
    Command(#[from] CommandFailed),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("{server}: `{command}` failed: {message}")]
    Remote {
        server: String,
        command: String,
        message: String,
    },
    #[error("runtime API of {server} ({socket}): {message}")]
    Api {
        server: String,
        socket: String,
        message: String,
    },
    #[error("{server}: no new HAProxy worker answered within {waited:?} of the reload (worker {old} still answers): the new configuration did not load (a bind already in use? see HAProxy's log); retrying")]
    NotReloaded {
        server: String,
        old: u32,
        waited: Duration,
    },
}

/// The result of a validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validation {
    /// The check command accepted the file.
    Valid,
    /// The check command's program is not installed; the file was not checked.
    Skipped { program: String },
}

/// What a missing check program means: `generate` may still write a file for a machine
/// without HAProxy (and says so); the daemon refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissing {
    Skip,
    Refuse,
}

/// How a candidate is validated.
#[derive(Debug, Clone, Copy)]
pub struct Check<'a> {
    pub command: &'a CommandLine,
    pub timeout: Duration,
    pub on_missing: OnMissing,
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// The file was replaced; `validation` says whether it was checked.
    Replaced { validation: Validation },
    /// The live file already had exactly this content; nothing was written.
    Unchanged { validation: Validation },
}

/// Runs `check` on `file` (on this machine).
pub async fn validate(check: &Check<'_>, file: &Path) -> Result<Validation, HaproxyError> {
    let argv = check
        .command
        .expand(&[(CONFIG_VAR, &file.to_string_lossy())]);
    let program = argv.first().cloned().unwrap_or_default();
    match process::run(&CommandLine(argv), &[], check.timeout).await {
        Ok(_) => Ok(Validation::Valid),
        Err(e) if e.not_found => missing(check, &program, "this machine"),
        Err(e) => match e.status {
            Some(status) => Err(HaproxyError::Invalid {
                command: e.command,
                status: status.into(),
                output: e.output,
            }),
            None => Err(e.into()),
        },
    }
}

fn missing(check: &Check<'_>, program: &str, server: &str) -> Result<Validation, HaproxyError> {
    match check.on_missing {
        OnMissing::Skip => Ok(Validation::Skipped {
            program: program.to_string(),
        }),
        OnMissing::Refuse => Err(HaproxyError::CheckMissing {
            program: program.to_string(),
            server: server.to_string(),
        }),
    }
}

/// Installs `text` at `dest` on this machine: candidate in the same directory, fsync,
/// validate (unless `check` is None), rename (skipped when the live file is identical), fsync
/// of the directory. On any failure `dest` is left exactly as it was and the candidate is
/// removed.
pub async fn install(
    text: &str,
    dest: &Path,
    check: Option<&Check<'_>>,
) -> Result<Installed, HaproxyError> {
    let write_err = |source| HaproxyError::Write {
        path: dest.to_path_buf(),
        source,
    };
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".candidate")
        .permissions(std::fs::Permissions::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(write_err)?;
    tmp.write_all(text.as_bytes()).map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;
    let validation = match check {
        Some(c) => validate(c, tmp.path()).await?,
        None => Validation::Skipped {
            program: String::new(),
        },
    };
    if std::fs::read(dest).is_ok_and(|live| live == text.as_bytes()) {
        return Ok(Installed::Unchanged { validation });
    }
    tmp.persist(dest).map_err(|e| write_err(e.error))?;
    files::sync_dir(dir).map_err(write_err)?;
    Ok(Installed::Replaced { validation })
}

/// Validates `text` without installing it (for `generate --output -`): written to a temp
/// file, checked, removed.
pub async fn validate_text(text: &str, check: &Check<'_>) -> Result<Validation, HaproxyError> {
    let write_err = |source| HaproxyError::Write {
        path: std::env::temp_dir(),
        source,
    };
    let mut tmp = tempfile::Builder::new()
        .prefix("autoscaler-haproxy.")
        .suffix(".cfg")
        .tempfile()
        .map_err(write_err)?;
    tmp.write_all(text.as_bytes()).map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;
    validate(check, tmp.path()).await
}

/// russh's callbacks for a session to an HAProxy server: only the host key matters.
struct ServerClient {
    check: HostKeyCheck,
}

impl client::Handler for ServerClient {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(self.check.check(key))
    }
}

/// A connection to one HAProxy server.
pub enum Link {
    Local,
    Ssh(Remote),
}

/// An SSH session to a remote HAProxy server.
pub struct Remote {
    handle: client::Handle<ServerClient>,
    label: String,
}

/// What a remote command did.
struct Ran {
    status: u32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Link {
    /// Connects to `target` (nothing to do for the local one), within `[ssh] connect_timeout`.
    pub async fn connect(
        target: &HaproxyTarget,
        ssh_settings: Option<&Arc<SshSettings>>,
        log: &Logger,
    ) -> Result<Link, HaproxyError> {
        let HaproxyTarget::Ssh {
            user, host, port, ..
        } = target
        else {
            return Ok(Link::Local);
        };
        let settings = ssh_settings.ok_or_else(|| HaproxyError::Remote {
            server: target.to_string(),
            command: "connect".into(),
            message: "no SSH identity loaded".into(),
        })?;
        let mut s = SshSettings::clone(settings);
        if let Some(u) = user {
            s.user = u.clone();
        }
        let host = host.to_string();
        let port = port.unwrap_or(s.default_port);
        let check = HostKeyCheck::new(&s, &host, port, log);
        let client = ServerClient {
            check: check.clone(),
        };
        let handle = tokio::time::timeout(
            s.connect_timeout,
            ssh::connect(&s, &host, port, &check, client),
        )
        .await
        .map_err(|_| SshError::ConnectTimeout(s.connect_timeout))??;
        Ok(Link::Ssh(Remote {
            handle,
            label: target.to_string(),
        }))
    }

    /// The server's name in messages.
    pub fn label(&self) -> &str {
        match self {
            Link::Local => "local",
            Link::Ssh(r) => &r.label,
        }
    }

    /// Whether an SSH session is still usable.
    pub fn is_closed(&self) -> bool {
        match self {
            Link::Local => false,
            Link::Ssh(r) => r.handle.is_closed(),
        }
    }

    /// The file at `path`, or None when there is none.
    pub async fn read(
        &self,
        path: &Path,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, HaproxyError> {
        match self {
            Link::Local => match tokio::fs::read(path).await {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(HaproxyError::Write {
                    path: path.to_path_buf(),
                    source,
                }),
            },
            Link::Ssh(r) => r.read(path, timeout).await,
        }
    }

    /// Installs `text` at `dest` once `check`, run on that server, accepted it.
    pub async fn install(
        &self,
        text: &str,
        dest: &Path,
        check: &Check<'_>,
    ) -> Result<Installed, HaproxyError> {
        match self {
            Link::Local => install(text, dest, Some(check)).await,
            Link::Ssh(r) => r.install(text, dest, check).await,
        }
    }

    /// Runs `cmd` on that server (the reload command).
    pub async fn run(&self, cmd: &CommandLine, timeout: Duration) -> Result<(), HaproxyError> {
        match self {
            Link::Local => process::run(cmd, &[], timeout)
                .await
                .map(|_| ())
                .map_err(Into::into),
            Link::Ssh(r) => {
                let line = sh(&cmd.0.iter().map(String::as_str).collect::<Vec<_>>());
                let ran = r.exec(&line, None, timeout).await?;
                match ran.status {
                    0 => Ok(()),
                    _ => Err(r.failed(&line, &ran)),
                }
            }
        }
    }

    /// Sends one command to HAProxy's master CLI at `socket` (`haproxy -W -S`), which keeps a
    /// connection open until told to quit, and returns its answer.
    pub async fn master_cli(
        &self,
        socket: &Path,
        command: &str,
        timeout: Duration,
    ) -> Result<String, HaproxyError> {
        self.api(socket, &format!("{command}\nquit"), timeout).await
    }

    /// Removes the file at `path` on that server (a missing one is fine).
    pub async fn remove(&self, path: &Path, timeout: Duration) -> Result<(), HaproxyError> {
        match self {
            Link::Local => match tokio::fs::remove_file(path).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(HaproxyError::Write {
                    path: path.to_path_buf(),
                    source: e,
                }),
                _ => Ok(()),
            },
            Link::Ssh(r) => {
                let cmd = sh(&["rm", "-f", &p(path)]);
                let ran = r.exec(&cmd, None, timeout).await?;
                match ran.status {
                    0 => Ok(()),
                    _ => Err(r.failed(&cmd, &ran)),
                }
            }
        }
    }

    /// Sends one command to the runtime API at `socket` and returns HAProxy's answer.
    pub async fn api(
        &self,
        socket: &Path,
        command: &str,
        timeout: Duration,
    ) -> Result<String, HaproxyError> {
        let api_err = |message: String| HaproxyError::Api {
            server: self.label().to_string(),
            socket: socket.display().to_string(),
            message,
        };
        let line = format!("{command}\n");
        let talk = async {
            let mut answer = Vec::new();
            match self {
                Link::Local => {
                    let mut s = tokio::net::UnixStream::connect(socket).await?;
                    s.write_all(line.as_bytes()).await?;
                    s.read_to_end(&mut answer).await?;
                }
                Link::Ssh(r) => {
                    let ch = r
                        .handle
                        .channel_open_direct_streamlocal(socket.display().to_string())
                        .await
                        .map_err(|e| {
                            std::io::Error::other(format!(
                                "{e}: sshd could not open the socket for the SSH user. It must \
                                 be allowed to: the socket mode 660 with a group the user is \
                                 in (stats socket … mode 660 group G), and sshd's \
                                 AllowStreamLocalForwarding local or yes for that user"
                            ))
                        })?;
                    let mut s = ch.into_stream();
                    s.write_all(line.as_bytes()).await?;
                    s.flush().await?;
                    s.read_to_end(&mut answer).await?;
                }
            }
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
        };
        match tokio::time::timeout(timeout, talk).await {
            Err(_) => Err(api_err(format!(
                "no answer to {command:?} within {timeout:?}"
            ))),
            Ok(Err(e)) => Err(api_err(e.to_string())),
            Ok(Ok(a)) => Ok(a),
        }
    }

    /// Writes `data` to `path` on that server, atomically (the server state file).
    pub async fn write(
        &self,
        path: &Path,
        data: &[u8],
        timeout: Duration,
    ) -> Result<(), HaproxyError> {
        match self {
            Link::Local => {
                let (p, d) = (path.to_path_buf(), data.to_vec());
                tokio::task::spawn_blocking(move || files::atomic_write(&p, &d, 0o644))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|r| r)
                    .map_err(|source| HaproxyError::Write {
                        path: path.to_path_buf(),
                        source,
                    })
            }
            Link::Ssh(r) => {
                let tmp = format!("{}.autoscaler-tmp", p(path));
                let cmd = sh(&[
                    "sh",
                    "-c",
                    "umask 022 && cat > \"$1\" && mv -f \"$1\" \"$2\"",
                    "sh",
                    &tmp,
                    &p(path),
                ]);
                let ran = r.exec(&cmd, Some(data), timeout).await?;
                match ran.status {
                    0 => Ok(()),
                    _ => Err(r.failed(&cmd, &ran)),
                }
            }
        }
    }
}

/// A path as one shell word's text.
fn p(path: &Path) -> String {
    path.display().to_string()
}

/// A command line for the remote shell: every argument quoted.
fn sh(argv: &[&str]) -> String {
    shell_words::join(argv)
}

impl Remote {
    async fn exec(
        &self,
        cmd: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Ran, HaproxyError> {
        let run = async {
            let mut ch = self.handle.channel_open_session().await?;
            ch.exec(true, cmd).await?;
            if let Some(data) = stdin {
                ch.data(data).await?;
            }
            ch.eof().await?;
            let (mut stdout, mut stderr, mut status) = (Vec::new(), Vec::new(), None);
            while let Some(msg) = ch.wait().await {
                match msg {
                    ChannelMsg::Data { data } => stdout.extend_from_slice(&data),
                    ChannelMsg::ExtendedData { data, .. } => stderr.extend_from_slice(&data),
                    ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    _ => {}
                }
            }
            Ok::<_, russh::Error>(Ran {
                // No exit status: the session died under it.
                status: status.unwrap_or(255),
                stdout,
                stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
            })
        };
        match tokio::time::timeout(timeout, run).await {
            Err(_) => Err(HaproxyError::Remote {
                server: self.label.clone(),
                command: cmd.to_string(),
                message: format!("did not finish within {timeout:?}"),
            }),
            Ok(Err(e)) => Err(SshError::from(e).into()),
            Ok(Ok(r)) => Ok(r),
        }
    }

    fn failed(&self, cmd: &str, ran: &Ran) -> HaproxyError {
        HaproxyError::Remote {
            server: self.label.clone(),
            command: cmd.to_string(),
            message: format!("exit status {}: {}", ran.status, ran.stderr),
        }
    }

    async fn read(&self, path: &Path, timeout: Duration) -> Result<Option<Vec<u8>>, HaproxyError> {
        let cmd = sh(&["sh", "-c", "test ! -e \"$1\" || cat \"$1\"", "sh", &p(path)]);
        let ran = self.exec(&cmd, None, timeout).await?;
        match ran.status {
            0 if ran.stdout.is_empty() && !self.exists(path, timeout).await? => Ok(None),
            0 => Ok(Some(ran.stdout)),
            _ => Err(self.failed(&cmd, &ran)),
        }
    }

    async fn exists(&self, path: &Path, timeout: Duration) -> Result<bool, HaproxyError> {
        let cmd = sh(&["test", "-e", &p(path)]);
        Ok(self.exec(&cmd, None, timeout).await?.status == 0)
    }

    async fn install(
        &self,
        text: &str,
        dest: &Path,
        check: &Check<'_>,
    ) -> Result<Installed, HaproxyError> {
        let dir = dest.parent().unwrap_or(Path::new("/"));
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.{:08x}.candidate", rand::random::<u32>()));
        let t = check.timeout;
        let upload = sh(&["sh", "-c", "umask 022 && cat > \"$1\"", "sh", &p(&tmp)]);
        let ran = self.exec(&upload, Some(text.as_bytes()), t).await?;
        if ran.status != 0 {
            return Err(self.failed(&upload, &ran));
        }
        let result = self.validate_and_move(text, dest, &tmp, check).await;
        if !matches!(result, Ok(Installed::Replaced { .. })) {
            let _ = self.exec(&sh(&["rm", "-f", &p(&tmp)]), None, t).await;
        }
        result
    }

    async fn validate_and_move(
        &self,
        text: &str,
        dest: &Path,
        tmp: &Path,
        check: &Check<'_>,
    ) -> Result<Installed, HaproxyError> {
        let t = check.timeout;
        let argv = check.command.expand(&[(CONFIG_VAR, &p(tmp))]);
        let line = sh(&argv.iter().map(String::as_str).collect::<Vec<_>>());
        let ran = self.exec(&line, None, t).await?;
        let validation = match ran.status {
            0 => Validation::Valid,
            // The shell's "command not found" / "not executable".
            126 | 127 => missing(check, argv.first().map_or("", String::as_str), &self.label)?,
            status => {
                let mut output = ran.stderr.clone();
                let stdout = String::from_utf8_lossy(&ran.stdout);
                if !stdout.trim().is_empty() {
                    output.push('\n');
                    output.push_str(stdout.trim_end());
                }
                return Err(HaproxyError::Invalid {
                    command: format!("{} on {}", line, self.label),
                    status: format!("exit status: {status}"),
                    output,
                });
            }
        };
        if self
            .read(dest, t)
            .await?
            .is_some_and(|b| b == text.as_bytes())
        {
            return Ok(Installed::Unchanged { validation });
        }
        let mv = sh(&["mv", "-f", &p(tmp), &p(dest)]);
        let ran = self.exec(&mv, None, t).await?;
        match ran.status {
            0 => Ok(Installed::Replaced { validation }),
            _ => Err(self.failed(&mv, &ran)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(s: &str) -> CommandLine {
        s.parse().unwrap()
    }

    fn check(c: &CommandLine, on_missing: OnMissing) -> Check<'_> {
        Check {
            command: c,
            timeout: Duration::from_secs(10),
            on_missing,
        }
    }

    #[tokio::test]
    async fn failed_check_leaves_live_file_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("haproxy.cfg");
        std::fs::write(&live, "good\n").unwrap();
        // A check that refuses anything containing "bad", as haproxy -c would a broken file.
        let c = cmd("sh -c '! grep -q bad \"$1\" || { echo \"[ALERT] bad line\" >&2; exit 1; }' check {config}");
        let c = check(&c, OnMissing::Refuse);
        let e = install("bad\n", &live, Some(&c)).await.unwrap_err();
        assert!(
            matches!(&e, HaproxyError::Invalid { output, .. } if output.contains("[ALERT] bad line")),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&live).unwrap(), "good\n");
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "candidate removed: {left:?}");
        assert_eq!(
            install("better\n", &live, Some(&c)).await.unwrap(),
            Installed::Replaced {
                validation: Validation::Valid
            }
        );
        assert_eq!(std::fs::read_to_string(&live).unwrap(), "better\n");
        assert_eq!(
            install("better\n", &live, Some(&c)).await.unwrap(),
            Installed::Unchanged {
                validation: Validation::Valid
            }
        );
    }

    /// `generate` may write without HAProxy installed (and says so); the daemon refuses.
    #[tokio::test]
    async fn a_missing_checker_is_skipped_or_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("haproxy.cfg");
        let c = cmd("/nonexistent/haproxy -c -f {config}");
        assert_eq!(
            install("x\n", &live, Some(&check(&c, OnMissing::Skip)))
                .await
                .unwrap(),
            Installed::Replaced {
                validation: Validation::Skipped {
                    program: "/nonexistent/haproxy".into()
                }
            }
        );
        let e = install("y\n", &live, Some(&check(&c, OnMissing::Refuse)))
            .await
            .unwrap_err();
        assert!(matches!(e, HaproxyError::CheckMissing { .. }), "{e}");
        assert_eq!(
            std::fs::read_to_string(&live).unwrap(),
            "x\n",
            "nothing installed"
        );
    }

    #[tokio::test]
    async fn the_check_runs_with_a_timeout_and_a_clean_environment() {
        let tmp = tempfile::tempdir().unwrap();
        let odd = tmp.path().join("with space; $(id).cfg");
        std::fs::write(&odd, "x").unwrap();
        // test -f gets the whole path as one argument: no shell ever sees it.
        let c = cmd("test -f {config}");
        assert_eq!(
            validate(&check(&c, OnMissing::Refuse), &odd).await.unwrap(),
            Validation::Valid
        );
        let seen = tmp.path().join("env");
        let c = cmd(&format!(
            "sh -c 'env > {}' check {{config}}",
            seen.display()
        ));
        assert_eq!(
            validate(&check(&c, OnMissing::Refuse), &odd).await.unwrap(),
            Validation::Valid
        );
        let seen =
            crate::adapters::process::tests::env_names(&std::fs::read_to_string(&seen).unwrap());
        crate::adapters::process::tests::assert_clean(&seen, &[]);
        let c = cmd("sh -c 'sleep 30' check {config}");
        let mut short = check(&c, OnMissing::Refuse);
        short.timeout = Duration::from_millis(200);
        let e = validate(&short, &odd).await.unwrap_err().to_string();
        assert!(e.contains("did not finish within 200ms"), "{e}");
    }
}
