//! One function per subcommand: read what it needs, call the library, print the result.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use autoscaler_actors::adapters::haproxy::{Installed, Validation};
use autoscaler_actors::adapters::hosts_dir::AddOutcome;
use autoscaler_actors::admin::{self, AdminError, Output};
use autoscaler_actors::config::{Config, ConfigError, Role, CONFIG_FILE_NAME};
use autoscaler_actors::hosts::{parse_port, parse_report_socket, Host, HostKey, HostName};
use autoscaler_actors::master::control;
use clap::CommandFactory;
use slog::{info, warn, Logger};

use crate::cli::{Cli, Command, RoleArg};
use crate::daemon;

/// Runs the subcommand `cli` names.
pub fn run(cli: &Cli, log: &Logger) -> anyhow::Result<()> {
    match &cli.command {
        Command::Init { dir, role, force } => init(cli, dir.as_deref(), *role, *force, log),
        Command::AddHost {
            host,
            port,
            ssh_port,
            report_port,
            report_socket,
        } => add_host(
            cli,
            host,
            port,
            ssh_port.as_deref(),
            report_port.as_deref(),
            report_socket.as_deref(),
            log,
        ),
        Command::RemoveHost { host, port } => remove_host(cli, host, port, log),
        Command::ListHosts { json } => list_hosts(cli, *json, log),
        Command::Generate {
            output,
            no_validate,
        } => generate(cli, output.as_deref(), *no_validate, log),
        Command::Check { fleet } => check(cli, *fleet, log),
        Command::ImportHosts => import_hosts(cli, log),
        Command::Status { json } => status(cli, *json, log),
        Command::Simulate {
            trace,
            svg,
            launch_delay,
            holds,
        } => simulate(cli, trace, svg.as_deref(), *launch_delay, *holds, log),
        Command::Run => {
            let cfg = load(cli)?;
            let role = cfg.general.role;
            daemon::run(cfg, role, log)
        }
        Command::Master => daemon::run(load(cli)?, Role::Master, log),
        Command::Node => daemon::run(load(cli)?, Role::Node, log),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "autoscaler", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
    }
}

/// Runs `f` to its end on a runtime of its own (the one-shot commands are synchronous).
fn block<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn import_hosts(cli: &Cli, log: &Logger) -> anyhow::Result<()> {
    let cfg = load(cli)?;
    let done = block(async { Ok(admin::import_hosts(&cfg).await?) })?;
    info!(log, "Imported hosts.d into etcd"; "from" => %cfg.general.hosts_dir.display(),
        "added" => done.added, "already_there" => done.already, "updated" => done.updated,
        "records" => done.records, "records_from" => %cfg.general.state_dir.display(),
        "host_keys" => done.host_keys);
    Ok(())
}

fn load(cli: &Cli) -> Result<Config, ConfigError> {
    Config::load(&cli.config)
}

fn init(
    cli: &Cli,
    dir: Option<&std::path::Path>,
    role: RoleArg,
    force: bool,
    log: &Logger,
) -> anyhow::Result<()> {
    let role = match role {
        RoleArg::Master => Role::Master,
        RoleArg::Node => Role::Node,
    };
    let file = match dir {
        Some(d) => d.join(CONFIG_FILE_NAME),
        None => cli.config.clone(),
    };
    let done = admin::init_file(&file, role, force)?;
    match role {
        Role::Master => {
            info!(log, "Wrote configuration";
                "file" => %done.config_file.display(), "role" => %role,
                "hosts_dir" => %done.hosts_dir.display(), "replaced" => done.replaced);
            info!(log, "Report secret: copy it to every node (mode 0600, the agent's user)";
                "file" => %done.report_secret.display())
        }
        Role::Node => {
            info!(log, "Wrote configuration (the keys a node reads)";
                "file" => %done.config_file.display(), "role" => %role, "replaced" => done.replaced);
            info!(log, "Copy the master's report secret here (mode 0600, the agent's user)";
                "file" => %done.report_secret.display())
        }
    }
    if done.config_file != cli.config {
        info!(log, "Use it with --config or AUTOSCALER_CONFIG"; "config" => %done.config_file.display());
    }
    Ok(())
}

fn add_host(
    cli: &Cli,
    host: &str,
    port: &str,
    ssh_port: Option<&str>,
    report_port: Option<&str>,
    report_socket: Option<&str>,
    log: &Logger,
) -> anyhow::Result<()> {
    // Everything the user typed is validated before the configuration is even read.
    let mut entry = Host::manual(HostName::parse(host)?, parse_port(port)?);
    entry.ssh_port = ssh_port.map(parse_port).transpose()?;
    entry.report_port = report_port.map(parse_port).transpose()?;
    entry.report_socket = report_socket.map(parse_report_socket).transpose()?;
    let cfg = load(cli)?;
    let key = entry.key();
    let (store, outcome) = block(async {
        let store = admin::host_store(&cfg).await?;
        let outcome = store.add(&entry).await?;
        Ok::<_, anyhow::Error>((store, outcome))
    })?;
    match outcome {
        AddOutcome::Added => {
            info!(log, "Added host"; "host" => %key.host, "port" => key.port,
                "store" => store.describe())
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

fn remove_host(cli: &Cli, host: &str, port: &str, log: &Logger) -> anyhow::Result<()> {
    let key = HostKey {
        host: HostName::parse(host)?,
        port: parse_port(port)?,
    };
    let cfg = load(cli)?;
    block(async {
        admin::host_store(&cfg).await?.remove(&key).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    info!(log, "Removed host"; "host" => %key.host, "port" => key.port);
    Ok(())
}

fn list_hosts(cli: &Cli, json: bool, log: &Logger) -> anyhow::Result<()> {
    let cfg = load(cli)?;
    let (hosts, errors) =
        block(async { Ok::<_, anyhow::Error>(admin::host_store(&cfg).await?.load().await?) })?;
    let mut out = std::io::stdout().lock();
    if json {
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

fn generate(
    cli: &Cli,
    output: Option<&std::path::Path>,
    no_validate: bool,
    log: &Logger,
) -> anyhow::Result<()> {
    let cfg = load(cli)?;
    let output = match output {
        Some(p) if p.as_os_str() == "-" => Output::Stdout,
        Some(p) => Output::File(p.to_path_buf()),
        None => Output::File(cfg.haproxy.config_path.clone()),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let generated = runtime.block_on(admin::generate(&cfg, &output, !no_validate));
    let done = generated.map_err(|e| match (e, &output) {
        (AdminError::Haproxy(e), Output::File(p)) => anyhow::anyhow!(
            "{e}\nThe previous configuration in {} was left in place.",
            p.display()
        ),
        (e, _) => e.into(),
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

fn status(cli: &Cli, json: bool, log: &Logger) -> anyhow::Result<()> {
    // The running master may run an older file than the one on disk: a file with problems
    // still names the socket.
    let socket = match Config::load_lenient(&cli.config) {
        Ok((cfg, problems)) => {
            if !problems.is_empty() {
                warn!(log, "The configuration file has problems (`autoscaler check`); asking the master anyway";
                    "file" => %cli.config.display(), "problems" => problems.len());
            }
            cfg.general.control_socket
        }
        // Not INI at all: the running master still answers where the file's line (or the
        // default) says.
        Err(e @ autoscaler_actors::config::ConfigError::Syntax { .. }) => {
            warn!(log, "The configuration file cannot be read (`autoscaler check`); asking the master anyway";
                "error" => %e);
            Config::control_socket_of(&cli.config)
        }
        Err(e) => return Err(e.into()),
    };
    let s = control::request(&socket, Duration::from_secs(10))?;
    let text = match json {
        true => serde_json::to_string_pretty(&s)? + "\n",
        false => s.to_table(),
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn simulate(
    cli: &Cli,
    trace_file: &std::path::Path,
    svg_file: Option<&std::path::Path>,
    launch_delay: Duration,
    holds: bool,
    log: &Logger,
) -> anyhow::Result<()> {
    use autoscaler_actors::simulate::{self, clock, EventKind, Settings, Trace};
    let cfg = load(cli)?;
    let text = std::fs::read_to_string(trace_file)
        .with_context(|| format!("cannot read the trace {}", trace_file.display()))?;
    let trace = Trace::parse(&text).with_context(|| format!("{}", trace_file.display()))?;
    let settings = Settings {
        sample_interval: cfg.node.sample_interval,
        tick: autoscaler_actors::master::decider::DEFAULT_TICK,
        launch_delay,
    };
    let (start, end) = trace.span();
    let outcome = simulate::run(&cfg.scaling, &trace, &settings);
    let mut out = std::io::stdout().lock();
    let nodes = match trace.nodes.len() {
        1 => "1 node".to_string(),
        n => format!("{n} nodes"),
    };
    let figures = match trace.backend.is_empty() {
        true => "",
        false => ", HAProxy figures",
    };
    writeln!(
        out,
        "Replaying {} ({nodes}{figures}, {}) with [scaling] of {}: policy {}, launch delay {}",
        trace_file.display(),
        clock(end - start),
        cfg.source.display(),
        cfg.scaling.policy,
        humantime::format_duration(launch_delay)
    )?;
    // A window is covered when its first sample is within stale_after of its start.
    let span = Duration::from_secs_f64((end - start).max(0.0)) + cfg.scaling.stale_after;
    for (key, window, what) in [
        ("scale_up_window", cfg.scaling.scale_up_window, "scale up"),
        (
            "scale_down_window",
            cfg.scaling.scale_down_window,
            "scale in",
        ),
    ] {
        if span < window {
            writeln!(
                out,
                "Note: the trace lasts {} and {key} is {}: no such window is ever covered, so \
                 nothing can {what} on the load",
                humantime::format_duration(Duration::from_secs_f64((end - start).max(0.0))),
                humantime::format_duration(window)
            )?;
        }
    }
    match (trace.backend.is_empty(), cfg.scaling.haproxy_signals()) {
        (true, true) => writeln!(
            out,
            "Note: [scaling] turns HAProxy signals on and the trace has no HAProxy columns \
             (requests, sessions, queue, rtime_ms): scale-ups come from the CPU only, and no \
             scale-in happens, as with a HAProxy server that does not answer"
        )?,
        (false, false) => writeln!(
            out,
            "Note: the trace has HAProxy columns and no HAProxy signal is on in [scaling] \
             (target_requests_per_node, target_sessions_per_node, scale_on_queue, \
             target_response_time): they are not used"
        )?,
        _ => {}
    }
    for e in &outcome.events {
        if holds || !matches!(e.kind, EventKind::Hold { .. }) {
            writeln!(out, "{e}")?;
        }
    }
    writeln!(out, "{}", outcome.summary(end - start))?;
    out.flush()?;
    if let Some(path) = svg_file {
        let title = format!(
            "{} replayed, policy {}",
            trace_file.file_name().unwrap_or_default().to_string_lossy(),
            cfg.scaling.policy
        );
        let svg = autoscaler_actors::plot::svg(&outcome, &cfg.scaling, &title)?;
        std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))?;
        info!(log, "Plot written"; "file" => %path.display());
    }
    Ok(())
}

/// Some registered host cannot be reached as the master reaches it (exit 69).
#[derive(Debug)]
pub struct FleetUnreachable(String);

impl std::fmt::Display for FleetUnreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FleetUnreachable {}

/// `check --fleet`: every registered host reached as the master reaches it, and whether the
/// running master (if one answers) hears its agent; a table (unless -q) and exit 69 when one
/// cannot be reached or is not heard.
fn check_fleet(
    cli: &Cli,
    cfg: &Config,
    runtime: &tokio::runtime::Runtime,
    log: &Logger,
) -> anyhow::Result<()> {
    if cfg.general.role != Role::Master {
        anyhow::bail!(
            "check --fleet runs on the master: {} is a node's file",
            cfg.source.display()
        );
    }
    let lines = runtime
        .block_on(autoscaler_actors::preflight::fleet(cfg, log))
        .map_err(|e| anyhow::anyhow!("cannot read the registered hosts: {e}"))?;
    let agents = agents_heard(cfg, &lines);
    let failed = lines
        .iter()
        .zip(&agents)
        .filter(|(l, a)| !l.ok() || a.is_err())
        .count();
    let reloads = runtime.block_on(autoscaler_actors::preflight::reloads(cfg));
    let unreloadable = reloads.iter().filter(|(_, r)| r.is_err()).count();
    if cli.quiet == 0 {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "\n# The fleet: {} host(s), {failed} not reachable as the master reaches them, or not heard by it",
            lines.len()
        )?;
        let width = lines
            .iter()
            .map(|l| l.host.len() + 1 + l.port.to_string().len())
            .max()
            .unwrap_or(4)
            .max(4);
        writeln!(out, "{:<width$}  {:<4}  REPORT FORWARD", "HOST", "SSH")?;
        for (l, agent) in lines.iter().zip(&agents) {
            let ssh = if l.ssh.starts_with("ok") {
                "ok"
            } else {
                "FAIL"
            };
            writeln!(
                out,
                "{:<width$}  {ssh:<4}  {}",
                format!("{}:{}", l.host, l.port),
                l.forward
            )?;
            if l.ssh != "ok" {
                writeln!(out, "{:<width$}        {}", "", l.ssh)?;
            }
            let (Ok(a) | Err(a)) = agent;
            writeln!(out, "{:<width$}        agent: {a}", "")?;
        }
        writeln!(
            out,
            "\n# HAProxy servers: {}, {unreloadable} cannot be reloaded as the master reloads them",
            reloads.len()
        )?;
        for (server, said) in &reloads {
            match said {
                Ok(s) => writeln!(out, "{server}  reload ok: {s}")?,
                Err(e) => writeln!(out, "{server}  reload FAIL: {e}")?,
            }
        }
    }
    for (server, said) in &reloads {
        if let Err(e) = said {
            slog::warn!(log, "HAProxy server cannot be reloaded as the master reloads it"; "server" => server, "error" => e);
        }
    }
    for (l, agent) in lines.iter().zip(&agents) {
        if !l.ok() {
            slog::warn!(log, "Host not reachable as the master reaches it"; "host" => &l.host, "port" => l.port,
                "ssh" => &l.ssh, "forward" => &l.forward);
        }
        if let Err(a) = agent {
            slog::warn!(log, "The running master does not hear this node's agent"; "host" => &l.host, "port" => l.port,
                "agent" => a);
        }
    }
    if failed > 0 || unreloadable > 0 {
        return Err(FleetUnreachable(format!(
            "{failed} of {} host(s) cannot be reached as the master reaches them, or are not heard by the running master; {unreloadable} of {} HAProxy server(s) cannot be reloaded",
            lines.len(),
            reloads.len()
        ))
        .into());
    }
    Ok(())
}

/// Whether the running master hears each host's agent (the report secret proven), as its
/// control socket says: Ok with what it heard, Err with why not. With no master running
/// there is nothing to ask: Ok, saying so (the forward above is what can be checked).
fn agents_heard(
    cfg: &Config,
    lines: &[autoscaler_actors::preflight::FleetLine],
) -> Vec<Result<String, String>> {
    use autoscaler_actors::master::control;
    let status = control::request(
        &cfg.general.control_socket,
        std::time::Duration::from_secs(3),
    );
    lines
        .iter()
        .map(|l| {
            let st = match &status {
                Err(e @ control::ControlError::NoMaster { .. }) => {
                    return Ok(format!("not checked: no master answers ({e})"))
                }
                // A master is there and does not answer as it should: that is a finding.
                Err(e) => return Err(format!("the running master did not say: {e}")),
                Ok(st) => st,
            };
            match st
                .nodes
                .iter()
                .find(|n| n.host == l.host && n.port == l.port)
            {
                None => Err("not known to the running master yet".into()),
                Some(n) if n.tunnel == "up" => Ok(match n.last_seen_s {
                    Some(s) => format!("heard by the running master ({s:.1}s ago)"),
                    None => "heard by the running master".into(),
                }),
                Some(n) => Err(format!(
                    "not heard by the running master: {}",
                    n.problem
                        .clone()
                        .unwrap_or_else(|| format!("tunnel {}", n.tunnel))
                )),
            }
        })
        .collect()
}

fn check(cli: &Cli, fleet: bool, log: &Logger) -> anyhow::Result<()> {
    let cfg = load(cli)?;
    // What start-up would trip on, too: the key, the files, the region, the template.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(autoscaler_actors::preflight::check(&cfg, cfg.general.role))?;
    let signals = cfg.scaling.haproxy_signals();
    if cfg.general.role == autoscaler_actors::config::Role::Master
        && (cfg.haproxy.runtime_api || signals)
    {
        let mut unreadable = Vec::new();
        for (server, said) in runtime.block_on(autoscaler_actors::preflight::runtime_sockets(&cfg))
        {
            match said {
                Ok(version) => {
                    info!(log, "HAProxy runtime API answers"; "server" => &server, "version" => version)
                }
                Err(why) => {
                    slog::warn!(log, "HAProxy runtime API unavailable"; "server" => &server, "error" => &why);
                    unreadable.push(format!("{server}: {why}"));
                }
            }
        }
        // Without a runtime API changes become reloads; the HAProxy signals cannot do without.
        if signals && !unreadable.is_empty() {
            anyhow::bail!(
                "{}: [scaling] HAProxy signals are on and read every [haproxy] server's runtime API \
                 once a second; a server that cannot be read holds every scale-in: {}",
                cfg.source.display(),
                unreadable.join("; ")
            );
        }
    }
    // -q: the verdict only (the exit code, and problems on standard error).
    if cli.quiet == 0 {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "# Effective configuration of {} (secrets redacted)",
            cfg.source.display()
        )
        .context("cannot print the configuration")?;
        out.write_all(cfg.to_ini_text().as_bytes())?;
        out.flush()?;
    }
    info!(log, "Configuration is valid"; "file" => %cfg.source.display(), "role" => %cfg.general.role);
    if fleet {
        check_fleet(cli, &cfg, &runtime, log)?;
    }
    Ok(())
}
