//! Running a command from the configuration (scale-up/-down commands, HAProxy reload): an argv,
//! never a shell string, with a clean environment and a timeout.

use std::time::Duration;

use thiserror::Error;

use crate::config::CommandLine;

/// A command that could not run, failed or timed out; names the command.
#[derive(Debug, Clone, Error)]
#[error("command `{command}`: {message}")]
pub struct CommandFailed {
    pub command: String,
    pub message: String,
    /// The program does not exist (or is not executable).
    pub not_found: bool,
    /// How it exited, when it ran to its end (boxed, as `stdout`: the error stays small).
    pub status: Option<Box<str>>,
    /// What it printed on standard error, then standard output.
    pub output: String,
    /// What it printed on standard output when it was started (and so may have started
    /// something before it failed): empty after a timeout. None when it did not run.
    pub stdout: Option<Box<str>>,
}

/// Runs a user command: argv as configured (no shell), a clean environment plus PATH and the
/// AWS variables, `extra` on top, a timeout (the process is killed when it passes). Returns
/// standard output; a non-zero exit is an error carrying standard error.
pub async fn run(
    cmd: &CommandLine,
    extra: &[(&str, String)],
    timeout: Duration,
) -> Result<String, CommandFailed> {
    run_with(cmd, extra, timeout, std::process::Stdio::null()).await
}

/// Where `setpriv` (util-linux) is, when this machine has it.
fn setpriv() -> Option<&'static str> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
}

/// [`run`], and never two runs holding `lock` at once on this machine, even across a crash of
/// the master: the lock file (flock) is the command's standard input, so the command and what
/// it starts in the foreground hold it until they exit — a command orphaned by a SIGKILLed
/// master still holds it, and the next run waits for it to end (up to `timeout`). The command
/// also gets a parent-death signal (SIGKILL when the master dies, through `setpriv
/// --pdeathsig`, where util-linux has it), so an orphan does not outlive its master anyway.
/// (A shell gives what it starts with `&` /dev/null as input: such a daemon does not hold the
/// lock.)
pub async fn run_exclusive(
    cmd: &CommandLine,
    extra: &[(&str, String)],
    timeout: Duration,
    lock: &std::path::Path,
) -> Result<String, CommandFailed> {
    let command = cmd.to_string();
    let fail = |message: String| CommandFailed {
        command: command.clone(),
        message,
        not_found: false,
        status: None,
        output: String::new(),
        stdout: None,
    };
    if let Some(dir) = lock.parent() {
        crate::adapters::files::create_dir_all(dir, 0o700)
            .map_err(|e| fail(format!("cannot make the lock directory: {e}")))?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock)
        .map_err(|e| fail(format!("cannot open its lock {}: {e}", lock.display())))?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(fail(format!(
                        "an earlier run of it (lock {}) still runs after {}",
                        lock.display(),
                        humantime::format_duration(timeout)
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(fail(format!("cannot lock {}: {e}", lock.display())))
            }
        }
    }
    let stdin = file
        .try_clone()
        .map_err(|e| fail(format!("cannot hand its lock on: {e}")))?;
    let wrapped = match setpriv() {
        Some(sp) => {
            let mut argv = vec![
                sp.to_string(),
                "--pdeathsig".into(),
                "KILL".into(),
                "--".into(),
            ];
            argv.extend(cmd.0.iter().cloned());
            CommandLine(argv)
        }
        None => cmd.clone(),
    };
    let out = run_with(&wrapped, extra, timeout, std::process::Stdio::from(stdin)).await;
    // Held until here, and by the command while it runs.
    drop(file);
    out.map_err(|mut e| {
        e.command = command.clone();
        e
    })
}

async fn run_with(
    cmd: &CommandLine,
    extra: &[(&str, String)],
    timeout: Duration,
    stdin: std::process::Stdio,
) -> Result<String, CommandFailed> {
    let command = cmd.to_string();
    let fail = |message: String| CommandFailed {
        command: command.clone(),
        message,
        not_found: false,
        status: None,
        output: String::new(),
        stdout: None,
    };
    let Some((program, args)) = cmd.0.split_first() else {
        return Err(fail("no command configured".into()));
    };
    let mut c = tokio::process::Command::new(program);
    c.args(args)
        .env_clear()
        .kill_on_drop(true)
        // Its own process group: what a script starts goes with it on a timeout.
        .process_group(0)
        .stdin(stdin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in std::env::vars() {
        if k == "PATH" || k == "HOME" || k.starts_with("AWS_") {
            c.env(k, v);
        }
    }
    for (k, v) in extra {
        c.env(k, v);
    }
    let child = c.spawn().map_err(|e| CommandFailed {
        not_found: matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
        ),
        ..fail(format!("cannot run: {e}"))
    })?;
    let group = GroupKill(child.id());
    let fail = |message: String| CommandFailed {
        stdout: Some(Box::default()),
        ..fail(message)
    };
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => {
            return Err(fail(format!(
                "did not finish within {}",
                humantime::format_duration(timeout)
            )))
        }
        Ok(Err(e)) => return Err(fail(format!("cannot run: {e}"))),
        Ok(Ok(o)) => o,
    };
    // It ran to its end: what it left running in the background is its business.
    group.disarm();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        return Err(CommandFailed {
            status: Some(out.status.to_string().into()),
            output: [stderr.as_str(), stdout.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("\n"),
            stdout: Some(stdout.as_str().into()),
            ..fail(format!("exited with {}: {stderr}", out.status))
        });
    }
    String::from_utf8(out.stdout).map_err(|_| fail("printed something that is not UTF-8".into()))
}

/// Kills a command's whole process group when dropped before [`GroupKill::disarm`]: on a
/// timeout, or when the task running it is aborted (a master stepping down), the script's
/// children (`aws …`, `sleep`) stop with it instead of running on unattended.
struct GroupKill(Option<u32>);

impl GroupKill {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            // The group may be gone already (ESRCH): nothing left to stop.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Instant;

    fn alive(pid: &str) -> bool {
        // A zombie (not yet reaped by init) has stopped running, too.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    }

    /// Waits (bounded) until `pid` has stopped; false if it still runs after 5 s.
    async fn stops(pid: &str) -> bool {
        for _ in 0..100 {
            if !alive(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// A script that starts a child and waits: `sleep` stands for `aws ec2 …`. On a timeout
    /// and when the task running it is aborted, the child stops too; a script that finishes
    /// keeps what it started in the background.
    #[tokio::test]
    async fn a_timed_out_or_abandoned_command_takes_its_children_with_it() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("child.pid");
        let script = |wait: &str| -> CommandLine {
            CommandLine(vec![
                "sh".into(),
                "-c".into(),
                format!("sleep 60 & echo $! > {}; {wait}", pidfile.display()),
            ])
        };
        let e = run(&script("wait"), &[], Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(e.message.contains("did not finish"), "{e}");
        let child = std::fs::read_to_string(&pidfile).unwrap();
        assert!(
            stops(child.trim()).await,
            "the script's child survived the timeout"
        );

        std::fs::remove_file(&pidfile).unwrap();
        let cmd = script("wait");
        let task = tokio::spawn(async move { run(&cmd, &[], Duration::from_secs(60)).await });
        while !pidfile.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        task.abort();
        let _ = task.await;
        let child = std::fs::read_to_string(&pidfile).unwrap();
        assert!(
            stops(child.trim()).await,
            "the script's child survived the abort"
        );

        std::fs::remove_file(&pidfile).unwrap();
        // A daemon started as one should (its output not on the command's pipes).
        let daemon = CommandLine(vec![
            "sh".into(),
            "-c".into(),
            format!("sleep 60 >/dev/null 2>&1 & echo $! > {}", pidfile.display()),
        ]);
        let done = run(&daemon, &[], Duration::from_secs(10)).await.unwrap();
        assert_eq!(done, "");
        let child = std::fs::read_to_string(&pidfile).unwrap();
        assert!(
            alive(child.trim()),
            "a finished script's background child was killed"
        );
        let _ = std::process::Command::new("kill")
            .arg(child.trim())
            .status();
    }

    /// The names of the variables `env` printed, minus those a shell sets for itself.
    pub(crate) fn env_names(printed: &str) -> Vec<String> {
        printed
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_string()))
            .filter(|k| !["PWD", "OLDPWD", "SHLVL", "_"].contains(&k.as_str()))
            .collect()
    }

    /// Asserts a command saw only what the master passes on (PATH, HOME, AWS_*) and `given`,
    /// while this test process has other variables (cargo sets CARGO_*): checked against the
    /// process's own environment, without changing it.
    pub(crate) fn assert_clean(seen: &[String], given: &[&str]) {
        let kept = |k: &str| k == "PATH" || k == "HOME" || k.starts_with("AWS_");
        assert!(
            std::env::vars().any(|(k, _)| !kept(&k)),
            "the test needs a variable to keep out"
        );
        for g in given {
            assert!(seen.iter().any(|k| k == g), "{g} not passed: {seen:?}");
        }
        for k in seen {
            assert!(
                kept(k) || given.contains(&k.as_str()),
                "{k} leaked into the command"
            );
        }
    }

    #[tokio::test]
    async fn commands_run_without_a_shell_with_timeout_and_clean_env() {
        let c: CommandLine = "env".parse().unwrap();
        let out = run(
            &c,
            &[("AUTOSCALER_COUNT", "2".into())],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(out.contains("AUTOSCALER_COUNT=2\n"), "{out}");
        assert_clean(&env_names(&out), &["AUTOSCALER_COUNT"]);
        let hang: CommandLine = "sleep 30".parse().unwrap();
        let t = Instant::now();
        let e = run(&hang, &[], Duration::from_millis(300))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not finish within 300ms"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        let fail: CommandLine = "sh -c 'echo nope >&2; exit 3'".parse().unwrap();
        let e = run(&fail, &[], Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("exit status: 3") && e.contains("nope") && e.contains("sh -c"),
            "{e}"
        );
    }
}
