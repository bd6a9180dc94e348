//! Running a role: the actix system on a tokio runtime (multi-thread for a master, one thread
//! for a node), signals, and the service manager's notifications (`Type=notify`: READY once
//! started, RELOADING/READY around a SIGHUP reload, STOPPING on the way out; nothing happens
//! without `$NOTIFY_SOCKET`).

use actix::Recipient;
use autoscaler_actors::config::{Config, Role, KEYS};
use autoscaler_actors::master::decider::{SetScaling, DEFAULT_TICK};
use autoscaler_actors::master::registry::DEFAULT_POLL;
use autoscaler_actors::{start_master, start_node};
use sd_notify::NotifyState;
use slog::{error, info, o, warn, Logger};
use tokio::signal::unix::{signal, SignalKind};

/// What a SIGHUP can change in the running daemon.
struct Reload {
    current: Config,
    role: Role,
    /// The decider, in master role: `[scaling]` applies to it live.
    scaling: Option<Recipient<SetScaling>>,
    /// A master started in dry-run has no launcher: leaving dry-run needs a restart.
    started_dry: bool,
}

/// Runs `role` until SIGTERM or SIGINT.
pub fn run(cfg: Config, role: Role, log: &Logger) -> anyhow::Result<()> {
    let log = log.new(o!("role" => role.as_str()));
    let system = actix::System::with_tokio_rt(move || {
        let mut rt = match role {
            // SSH sessions to every node, HAProxy servers, etcd: the tasks beside the actors
            // get the machine's cores.
            Role::Master => tokio::runtime::Builder::new_multi_thread(),
            // One sampler and one link: a thread does it (no idle workers to keep).
            Role::Node => tokio::runtime::Builder::new_current_thread(),
        };
        rt.enable_all()
            .thread_name("autoscaler")
            .build()
            .expect("tokio runtime")
    });
    let started = system.block_on({
        let log = log.clone();
        async move {
            let (handles, scaling): (Box<dyn std::any::Any>, _) = match role {
                Role::Master => {
                    let m = start_master(&cfg, DEFAULT_POLL, DEFAULT_TICK, &log).await?;
                    let scaling = Some(m.decider.clone().recipient());
                    (Box::new(m), scaling)
                }
                Role::Node => (Box::new(start_node(&cfg, &log)?), None),
            };
            info!(log, "Started"; "config" => %cfg.source.display(), "version" => env!("CARGO_PKG_VERSION"));
            let reload = Reload {
                started_dry: cfg.scaling.dry_run,
                current: cfg,
                role,
                scaling,
            };
            actix::spawn(wait_for_signals(reload, log.clone()));
            let _ = sd_notify::notify(false, &[NotifyState::Ready]);
            Ok::<_, autoscaler_actors::StartError>(handles)
        }
    });
    // Keep the actors' addresses alive for as long as the system runs. A configuration
    // problem found at start keeps its type: exit code 78, as `check` gives.
    let _handles = started.map_err(|e| match e {
        autoscaler_actors::StartError::Config(c) => anyhow::Error::from(c),
        other => other.into(),
    })?;
    system.run()?;
    info!(log, "Stopped");
    Ok(())
}

async fn wait_for_signals(mut reload: Reload, log: Logger) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        warn!(log, "Cannot install signal handlers; stop with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let _ = sd_notify::notify(false, &[NotifyState::Reloading]);
                reload_config(&mut reload, &log).await;
                let _ = sd_notify::notify(false, &[NotifyState::Ready]);
            }
        }
    }
    info!(log, "Stopping");
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    actix::System::current().stop();
}

/// SIGHUP: reads the configuration file again. A file with problems — or one a restart would
/// trip on — is refused, every problem logged, and the running configuration kept. Otherwise
/// each changed key is applied or logged as needing a restart: `[scaling]` applies live (the
/// decider's policy and guards), everything else at the next start.
async fn reload_config(r: &mut Reload, log: &Logger) {
    let path = r.current.source.clone();
    let next = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            error!(log, "Configuration not reloaded; the running one is kept"; "file" => %path.display(), "error" => %e);
            return;
        }
    };
    if let Err(e) = autoscaler_actors::preflight::check(&next, r.role).await {
        error!(log, "Configuration not reloaded (a restart with it would fail); the running one is kept";
            "file" => %path.display(), "error" => %e);
        return;
    }
    let changed: Vec<_> = KEYS
        .iter()
        .filter(|k| k.show(&r.current) != k.show(&next))
        .collect();
    // A secret shows redacted either way: compare it, and say only that it changed.
    let secret_changed =
        r.current.aws.secret_access_key.expose() != next.aws.secret_access_key.expose();
    if secret_changed {
        warn!(log, "Changed setting needs a restart to take effect"; "key" => "[aws] secret_access_key");
    }
    if changed.is_empty() && secret_changed {
        return;
    }
    if changed.is_empty() {
        info!(log, "Configuration reloaded: nothing changed"; "file" => %path.display());
        return;
    }
    let mut next_scaling = next.scaling.clone();
    if r.started_dry {
        next_scaling.dry_run = true;
    }
    let mut live = Vec::new();
    for k in changed {
        let name = format!("[{}] {}", k.section, k.name);
        let launcher_needed = k.section == "scaling" && k.name == "dry_run" && r.started_dry;
        match (k.is_live() && !launcher_needed, &r.scaling) {
            (true, Some(_)) => live.push(name),
            _ => warn!(log, "Changed setting needs a restart to take effect"; "key" => name,
                "running" => k.show(&r.current), "file" => k.show(&next)),
        }
    }
    if let (false, Some(decider)) = (live.is_empty(), &r.scaling) {
        decider.do_send(SetScaling(next_scaling.clone()));
        r.current.scaling = next_scaling;
        info!(log, "Configuration reloaded"; "applied" => live.join(", "), "file" => %path.display());
    }
}
