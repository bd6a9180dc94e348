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
    /// How it exited, when it ran to its end.
    pub status: Option<String>,
    /// What it printed on standard error, then standard output.
    pub output: String,
}

/// Runs a user command: argv as configured (no shell), a clean environment plus PATH and the
/// AWS variables, `extra` on top, a timeout (the process is killed when it passes). Returns
/// standard output; a non-zero exit is an error carrying standard error.
pub async fn run(
    cmd: &CommandLine,
    extra: &[(&str, String)],
    timeout: Duration,
) -> Result<String, CommandFailed> {
    let command = cmd.to_string();
    let fail = |message: String| CommandFailed {
        command: command.clone(),
        message,
        not_found: false,
        status: None,
        output: String::new(),
    };
    let Some((program, args)) = cmd.0.split_first() else {
        return Err(fail("no command configured".into()));
    };
    let mut c = tokio::process::Command::new(program);
    c.args(args)
        .env_clear()
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    for (k, v) in std::env::vars() {
        if k == "PATH" || k == "HOME" || k.starts_with("AWS_") {
            c.env(k, v);
        }
    }
    for (k, v) in extra {
        c.env(k, v);
    }
    let out = match tokio::time::timeout(timeout, c.output()).await {
        Err(_) => {
            return Err(fail(format!(
                "did not finish within {}",
                humantime::format_duration(timeout)
            )))
        }
        Ok(Err(e)) => {
            return Err(CommandFailed {
                not_found: matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ),
                ..fail(format!("cannot run: {e}"))
            })
        }
        Ok(Ok(o)) => o,
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        return Err(CommandFailed {
            status: Some(out.status.to_string()),
            output: [stderr.as_str(), stdout.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("\n"),
            ..fail(format!("exited with {}: {stderr}", out.status))
        });
    }
    String::from_utf8(out.stdout).map_err(|_| fail("printed something that is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn commands_run_without_a_shell_with_timeout_and_clean_env() {
        let c: CommandLine = "sh -c 'echo \"$AUTOSCALER_COUNT $SECRET_SHOULD_NOT_PASS\"'"
            .parse()
            .unwrap();
        std::env::set_var("SECRET_SHOULD_NOT_PASS", "leak");
        let out = run(
            &c,
            &[("AUTOSCALER_COUNT", "2".into())],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(out.trim(), "2");
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
