//! Running a role: the actix system on a multi-thread tokio runtime, and signal handling.

use autoscaler_actors::config::{Config, Role};
use autoscaler_actors::master::decider::DEFAULT_TICK;
use autoscaler_actors::master::registry::DEFAULT_POLL;
use autoscaler_actors::{start_master, start_node};
use slog::{info, o, warn, Logger};
use tokio::signal::unix::{signal, SignalKind};

/// Runs `role` until SIGTERM or SIGINT.
pub fn run(cfg: Config, role: Role, log: &Logger) -> anyhow::Result<()> {
    let log = log.new(o!("role" => role.as_str()));
    let system = actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("autoscaler")
            .build()
            .expect("tokio runtime")
    });
    let started = system.block_on({
        let log = log.clone();
        async move {
            let handles: Box<dyn std::any::Any> = match role {
                Role::Master => Box::new(start_master(&cfg, DEFAULT_POLL, DEFAULT_TICK, &log).await?),
                Role::Node => Box::new(start_node(&cfg, &log)?),
            };
            actix::spawn(wait_for_shutdown(log.clone()));
            info!(log, "Started"; "config" => %cfg.source.display(), "version" => env!("CARGO_PKG_VERSION"));
            Ok::<_, autoscaler_actors::StartError>(handles)
        }
    });
    // Keep the actors' addresses alive for as long as the system runs.
    let _handles = started?;
    system.run()?;
    info!(log, "Stopped");
    Ok(())
}

async fn wait_for_shutdown(log: Logger) {
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
                // hosts.d changes are picked up without a signal; the rest needs a restart.
                warn!(log, "SIGHUP: configuration reload is not supported; restart to apply autoscaler.ini changes");
            }
        }
    }
    info!(log, "Stopping");
    actix::System::current().stop();
}
