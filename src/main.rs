//! The `autoscaler` binary: parses the command line, sets up logging, runs the subcommand
//! (one function each, in `subcommands`) and maps its error to an exit code.
#![forbid(unsafe_code)]

mod cli;
mod daemon;
mod logging;
mod subcommands;

use std::process::ExitCode;

use autoscaler_actors::config::ConfigError;
use autoscaler_actors::hosts::InvalidHost;
use autoscaler_actors::master::control::ControlError;
use clap::Parser;
use slog::error;

use crate::cli::{Cli, LogFormat};

/// sysexits.h: the input data was incorrect (a bad host or port).
const EX_DATAERR: u8 = 65;
/// sysexits.h: a service is unavailable (no master answers `status`).
const EX_UNAVAILABLE: u8 = 69;
/// sysexits.h: configuration error.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (log, guard) = logging::build(cli.log_format, cli.verbose, cli.quiet);
    let Err(e) = subcommands::run(&cli, &log) else {
        drop(log);
        drop(guard);
        return ExitCode::SUCCESS;
    };
    let code = exit_code(&e);
    match cli.log_format {
        LogFormat::Json => {
            error!(log, "Command failed"; "error" => said(&e), "exit_code" => code);
            drop(log);
            drop(guard);
        }
        LogFormat::Human => {
            // Flush queued log lines first so the error comes last.
            drop(guard);
            eprintln!("autoscaler: error: {}", said(&e));
        }
    }
    ExitCode::from(code)
}

/// The error and its causes, each said once: most of the project's errors already name their
/// cause (`cannot read PATH: CAUSE`), and `{:#}` would repeat it after them. A cause is left
/// out only when the error it causes already says it.
fn said(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    let mut previous = out.clone();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !previous.contains(&cause) {
            out = format!("{out}: {cause}");
        }
        previous = cause;
    }
    out
}

fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<ConfigError>().is_some() {
        EX_CONFIG
    } else if e.downcast_ref::<InvalidHost>().is_some() {
        EX_DATAERR
    } else if let Some(ControlError::NoMaster { .. }) = e.downcast_ref::<ControlError>() {
        EX_UNAVAILABLE
    } else if e.downcast_ref::<subcommands::FleetUnreachable>().is_some() {
        EX_UNAVAILABLE
    } else if etcd_error(e).is_some_and(|e| e.is_configuration()) {
        EX_CONFIG
    } else if etcd_error(e).is_some() {
        EX_UNAVAILABLE
    } else {
        1
    }
}

/// The etcd failure behind `e`, if it is one: etcd not reachable or refusing (the host list
/// is unavailable), or one of `[cluster]`'s files unusable (a configuration error).
fn etcd_error(e: &anyhow::Error) -> Option<&autoscaler_actors::adapters::etcd::EtcdError> {
    use autoscaler_actors::adapters::hosts_dir::HostsError;
    use autoscaler_actors::admin::AdminError;
    match (
        e.downcast_ref::<AdminError>(),
        e.downcast_ref::<HostsError>(),
    ) {
        (Some(AdminError::Etcd(x)), _) | (Some(AdminError::Hosts(HostsError::Etcd(x))), _) => {
            Some(x)
        }
        (_, Some(HostsError::Etcd(x))) => Some(x),
        _ => None,
    }
}
