//! The `autoscaler` binary: parses the command line, sets up logging, calls the library.
#![forbid(unsafe_code)]

mod cli;
mod daemon;
mod logging;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use autoscaler_actors::commands::{self, CommandError, Output};
use autoscaler_actors::config::{Config, ConfigError, Role};
use autoscaler_actors::haproxy::{Installed, Validation};
use autoscaler_actors::hosts::{
    parse_port, AddOutcome, Host, HostKey, HostName, HostsDir, InvalidHost,
};
use clap::Parser;
use slog::{error, info, warn, Logger};

use crate::cli::{Cli, Command, LogFormat, RoleArg};

/// sysexits.h: the input data was incorrect (a bad host or port).
const EX_DATAERR: u8 = 65;
/// sysexits.h: configuration error.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (log, guard) = logging::build(cli.log_format, cli.verbose, cli.quiet);
    let result = run(&cli, &log);
    let code = match &result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(e);
            match cli.log_format {
                LogFormat::Json => {
                    error!(log, "Command failed"; "error" => format!("{e:#}"), "exit_code" => code)
                }
                LogFormat::Human => {
                    // Flush queued log lines first so the error comes last.
                    drop(guard);
                    eprintln!("autoscaler: error: {e:#}");
                    return ExitCode::from(code);
                }
            }
            ExitCode::from(code)
        }
    };
    drop(log);
    drop(guard);
    code
}

fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<ConfigError>().is_some() {
        EX_CONFIG
    } else if e.downcast_ref::<InvalidHost>().is_some() {
        EX_DATAERR
    } else {
        1
    }
}

fn run(cli: &Cli, log: &Logger) -> anyhow::Result<()> {
    match &cli.command {
        Command::Init { dir, role, force } => {
            let role = match role {
                RoleArg::Master => Role::Master,
                RoleArg::Node => Role::Node,
            };
            let done = commands::init(dir, role, *force)?;
            info!(log, "Wrote configuration";
                "file" => %done.config_file.display(), "role" => %role,
                "hosts_dir" => %done.hosts_dir.display(), "replaced" => done.replaced);
            if done.config_file != cli.config {
                info!(log, "Use it with --config or AUTOSCALER_CONFIG"; "config" => %done.config_file.display());
            }
            Ok(())
        }
        Command::AddHost {
            host,
            port,
            ssh_port,
            report_port,
        } => {
            let mut entry = Host::manual(HostName::parse(host)?, parse_port(port)?);
            entry.ssh_port = ssh_port.as_deref().map(parse_port).transpose()?;
            entry.report_port = report_port.as_deref().map(parse_port).transpose()?;
            let cfg = load(cli)?;
            let dir = HostsDir::new(&cfg.general.hosts_dir);
            let key = entry.key();
            match dir.add(&entry)? {
                AddOutcome::Added => {
                    info!(log, "Added host"; "host" => %key.host, "port" => key.port,
                    "file" => %dir.path().join(key.file_name()).display())
                }
                AddOutcome::AlreadyPresent => {
                    info!(log, "Host already registered; nothing changed";
                    "host" => %key.host, "port" => key.port)
                }
                AddOutcome::Updated => {
                    info!(log, "Updated host"; "host" => %key.host, "port" => key.port)
                }
            }
            Ok(())
        }
        Command::RemoveHost { host, port } => {
            let key = HostKey {
                host: HostName::parse(host)?,
                port: parse_port(port)?,
            };
            let cfg = load(cli)?;
            HostsDir::new(&cfg.general.hosts_dir).remove(&key)?;
            info!(log, "Removed host"; "host" => %key.host, "port" => key.port);
            Ok(())
        }
        Command::ListHosts { json } => {
            let cfg = load(cli)?;
            let (hosts, errors) = HostsDir::new(&cfg.general.hosts_dir).load()?;
            let mut out = std::io::stdout().lock();
            if *json {
                serde_json::to_writer_pretty(&mut out, &hosts)?;
                writeln!(out)?;
            } else {
                for h in &hosts {
                    writeln!(out, "{} {}", h.host, h.port)?;
                }
            }
            out.flush()?;
            for e in &errors {
                warn!(log, "Skipped unreadable host file"; "error" => %e);
            }
            match errors.len() {
                0 => Ok(()),
                n => anyhow::bail!(
                    "{n} host file(s) in {} could not be read",
                    cfg.general.hosts_dir.display()
                ),
            }
        }
        Command::Generate {
            output,
            no_validate,
        } => {
            let cfg = load(cli)?;
            let output = match output.as_deref() {
                Some(p) if p.as_os_str() == "-" => Output::Stdout,
                Some(p) => Output::File(p.to_path_buf()),
                None => Output::File(cfg.haproxy.config_path.clone()),
            };
            let done = commands::generate(&cfg, &output, !no_validate).map_err(|e| {
                match (e, &output) {
                    (CommandError::Haproxy(e), Output::File(p)) => {
                        anyhow::anyhow!(
                            "{e}\nThe previous configuration in {} was left in place.",
                            p.display()
                        )
                    }
                    (e, _) => e.into(),
                }
            })?;
            match &done.validation {
                None => warn!(log, "Validation skipped (--no-validate)"),
                Some(Validation::Skipped { program }) => {
                    warn!(log, "Validation skipped: check command not installed"; "program" => program)
                }
                Some(Validation::Valid) => {
                    info!(log, "Configuration is valid"; "servers" => done.servers)
                }
            }
            match (&output, &done.installed) {
                (Output::Stdout, _) => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(done.text.as_bytes())?;
                    out.flush()?;
                }
                (Output::File(p), Some(Installed::Unchanged { .. })) => {
                    info!(log, "Configuration unchanged"; "file" => %p.display())
                }
                (Output::File(p), _) => {
                    info!(log, "Wrote HAProxy configuration"; "file" => %p.display(), "servers" => done.servers)
                }
            }
            Ok(())
        }
        Command::Run => {
            let cfg = load(cli)?;
            let role = cfg.general.role;
            daemon::run(cfg, role, log)
        }
        Command::Master => daemon::run(load(cli)?, Role::Master, log),
        Command::Node => daemon::run(load(cli)?, Role::Node, log),
        Command::Check => {
            let cfg = load(cli)?;
            let text = cfg
                .to_ini_text()
                .context("cannot print the configuration")?;
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "# Effective configuration of {} (secrets redacted)",
                cfg.source.display()
            )?;
            out.write_all(text.as_bytes())?;
            out.flush()?;
            info!(log, "Configuration is valid"; "file" => %cfg.source.display(), "role" => %cfg.general.role);
            Ok(())
        }
    }
}

fn load(cli: &Cli) -> Result<Config, ConfigError> {
    Config::load(&cli.config)
}
