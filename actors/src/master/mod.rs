//! The master role: hears every node through SSH tunnels, decides, launches, and keeps HAProxy
//! in step with the registered hosts.
//!
//! ```text
//! HostRegistry ──HostsChanged──▶ TunnelManager ──SSH session + tcpip-forward per host
//! (hosts.d)   ╲                      │ forwarded channels, decoded in-process
//!    ▲         ╲HostsChanged         ├──NodeUp / NodeDown──▶ NodeStatus, ScaleDecider
//!    │          ▼                    └──samples ──▶ Heard ◀── read by NodeStatus, ScaleDecider
//!    │        ScaleDecider ──LaunchInstances / DrainHost──▶ Launcher (EC2 or command)
//!    │          ▲                                         │ intents, drains (state_dir),
//!    │          └──LaunchFinished / Reconciled────────────┤ reconciler at start and periodic
//!    └──RegisterHost / DeregisterHost / ListHosts─────────┘
//!
//! HostRegistry ──HostsChanged (debounced)──▶ HaproxyWriter ──plan──▶ one worker per HAProxy
//!                                            server (local, SSH): runtime API or validate +
//!                                            install + reload, retried until it runs the plan
//! Launcher ──WaitDrained──▶ HaproxyWriter (before terminating a drained host)
//! ```
//!
//! One actor per file; [`messages`] holds what several of them receive. [`start_master`] is
//! the only place that knows who talks to whom.

pub mod cluster_sync;
pub mod control;
pub mod decider;
pub mod haproxy_worker;
pub mod haproxy_writer;
pub mod heard;
pub mod launcher;
pub mod leadership;
pub mod messages;
pub mod node_status;
pub mod registry;
pub mod tunnels;

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, AsyncContext};
use slog::Logger;

use self::decider::{DeciderOutputs, ScaleDecider};
use self::haproxy_writer::HaproxyWriter;
use self::heard::Heard;
use self::launcher::{LaunchSettings, Launcher, LauncherOutputs, Provisioner};
use self::node_status::NodeStatus;
use self::registry::HostRegistry;
use self::tunnels::{TunnelError, TunnelManager, TunnelOutputs, TunnelSettings};
use crate::adapters::etcd::{Etcd, LeadCell};
use crate::adapters::host_store::HostStore;
use crate::adapters::hosts_dir::HostsDir;
use crate::adapters::records::Records;
use crate::adapters::ssh::SshSettings;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::render::HaproxyTemplate;
use crate::StartError;

/// The running master's actors.
pub struct Master {
    pub registry: Addr<HostRegistry>,
    pub tunnels: Addr<TunnelManager>,
    pub status: Addr<NodeStatus>,
    pub decider: Addr<ScaleDecider>,
    /// None in dry-run: nothing is launched, and no launch settings are needed.
    pub launcher: Option<Addr<Launcher>>,
    pub writer: Addr<HaproxyWriter>,
    pub metrics: Arc<Metrics>,
    /// Several masters: the election and the known_hosts sync (aborted on drop).
    pub cluster_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Master {
    fn drop(&mut self) {
        self.cluster_tasks.iter().for_each(|t| t.abort());
    }
}

/// Starts the master role. `poll` is how often hosts.d is rescanned, `tick` how often the
/// policy runs. Must run inside the actix system (it builds the EC2 client, hence async).
pub async fn start_master(
    cfg: &Config,
    poll: Duration,
    tick: Duration,
    log: &Logger,
) -> Result<Master, StartError> {
    crate::preflight::check(cfg, crate::config::Role::Master).await?;
    let socket = &cfg.general.control_socket;
    let control = control::bind(socket).map_err(|source| StartError::Listen {
        what: format!("control socket {}", socket.display()),
        source,
    })?;
    // One SSH identity for every session: tunnels to nodes, remote HAProxy servers.
    let ssh = Arc::new(SshSettings::from_config(cfg).map_err(TunnelError::from)?);
    let metrics = Arc::new(Metrics::new());
    let mut tunnel_settings = TunnelSettings::with_ssh(cfg, ssh.clone());
    tunnel_settings.metrics = metrics.clone();
    tunnel_settings.secret = tunnels::report_secret(cfg)?;
    if tunnel_settings.secret.is_none() {
        slog::warn!(log, "Reports are not authenticated ([node] secret_file is empty): any local user of a node can send reports to this master");
    }
    // Several masters: etcd holds the hosts and records, and elects who acts.
    let cluster = match cfg.cluster.enabled() {
        false => None,
        true => {
            let etcd = Etcd::connect(&cfg.cluster, Some(cfg.cluster.etcd_timeout)).await?;
            let lead: LeadCell = Arc::default();
            Some((etcd, lead, leadership::name_of(&cfg.cluster)))
        }
    };
    let records = match &cluster {
        Some((etcd, lead, _)) => Records::Etcd {
            etcd: etcd.clone(),
            lead: lead.clone(),
        },
        None => Records::Files(cfg.general.state_dir.clone()),
    };
    let host_store = match &cluster {
        Some((etcd, lead, _)) => HostStore::Etcd {
            etcd: etcd.clone(),
            lead: Some(lead.clone()),
        },
        None => HostStore::Dir(HostsDir::new(&cfg.general.hosts_dir)),
    };
    let provisioner = match cfg.scaling.dry_run {
        true => None,
        false => Some(Provisioner::from_config(cfg).await?),
    };
    let template = HaproxyTemplate::load(cfg.haproxy.template.as_deref())?;
    if cfg.haproxy.runtime_api {
        // Said at start rather than found at the first change: a socket the master cannot
        // use makes every change a reload.
        let (probe, log) = (cfg.clone(), log.clone());
        tokio::spawn(async move {
            for (server, said) in crate::preflight::runtime_sockets(&probe).await {
                if let Err(why) = said {
                    slog::warn!(log, "HAProxy runtime API unavailable"; "server" => server, "error" => why);
                }
            }
        });
    }
    // Registry, decider, writer and launcher address each other: make the contexts (and so
    // the addresses) first, start the actors once everyone has what it needs.
    let registry_ctx = actix::Context::<HostRegistry>::new();
    let registry = registry_ctx.address();
    let decider_ctx = actix::Context::<ScaleDecider>::new();
    let decider = decider_ctx.address();
    // Set while a HAProxy signal is on (the decider keeps it current across reloads): the
    // HAProxy workers then read each server's backend load.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = HaproxyWriter::new(Arc::new(cfg.clone()), template, Some(ssh), log)
        .with_metrics(metrics.clone())
        .with_load_to(decider.clone().recipient())
        .with_sampling(sampling.clone())
        .start();
    // The tunnels fold every sample into this book; NodeStatus and the decider read it.
    let heard = Heard::default();
    let status = NodeStatus::new(heard.clone(), log).start();
    // With several masters: the leadership task stops the launcher's work directly when the
    // lease is lost.
    let acting = launcher::Acting::new(cluster.is_none());
    let launcher = provisioner.map(|p| {
        let l = Launcher::new(
            p,
            LaunchSettings::from_config(cfg),
            LauncherOutputs {
                register: registry.clone().recipient(),
                deregister: registry.clone().recipient(),
                list: registry.clone().recipient(),
                finished: decider.clone().recipient(),
                reconciled: decider.clone().recipient(),
                drained: Some(writer.clone().recipient()),
            },
            log,
        )
        .with_metrics(metrics.clone())
        .with_records(records.clone());
        match cluster.is_some() {
            true => l.following(acting.clone()).start(),
            false => l.start(),
        }
    });
    let outputs = launcher.as_ref().map(|l| DeciderOutputs {
        launch: l.clone().recipient(),
        drain: l.clone().recipient(),
    });
    // The guards' memory only matters when decisions act.
    let memory = launcher
        .as_ref()
        .map(|_| cfg.general.state_dir.join("decider.json"));
    let decider_actor = ScaleDecider::new(cfg.scaling.clone(), outputs, memory, tick, log)
        .with_metrics(metrics.clone())
        .with_samples(heard.clone())
        .with_balancers(cfg.haproxy.servers.iter().map(|t| t.to_string()), sampling);
    decider_ctx.run(match cluster.is_some() {
        true => decider_actor.following(records.clone()),
        false => decider_actor,
    });
    let tunnels = TunnelManager::new(
        tunnel_settings,
        TunnelOutputs {
            samples: heard,
            up: vec![status.clone().recipient(), decider.clone().recipient()],
            down: vec![status.clone().recipient(), decider.clone().recipient()],
            problem: vec![status.clone().recipient()],
        },
        log,
    )
    .start();
    registry_ctx.run(HostRegistry::over(
        host_store,
        vec![
            tunnels.clone().recipient(),
            decider.clone().recipient(),
            writer.clone().recipient(),
            status.clone().recipient(),
        ],
        poll,
        log,
    ));
    let sources = control::Sources {
        registry: registry.clone(),
        nodes: status.clone(),
        decider: decider.clone(),
        writer: writer.clone(),
        records: records.clone(),
        cluster: cluster.clone(),
    };
    if let Some(addr) = cfg.general.metrics_address {
        crate::metrics::serve(addr, metrics.clone(), sources.clone(), log).map_err(|source| {
            StartError::Listen {
                what: format!("metrics address {addr} ([autoscaler] metrics_address)"),
                source,
            }
        })?;
    }
    control::serve(control, sources, log);
    // The election last: leading starts once everyone it tells is running.
    let election = cluster.map(|(etcd, lead, name)| {
        let mut subscribers = vec![decider.clone().recipient()];
        if let Some(l) = &launcher {
            subscribers.push(l.clone().recipient());
        }
        let sync = tokio::spawn(cluster_sync::known_hosts(
            etcd,
            cfg.ssh.known_hosts.clone(),
            cfg.ssh.port,
            poll,
            log.clone(),
        ));
        let run = tokio::spawn(leadership::run(
            cfg.cluster.clone(),
            name,
            lead,
            subscribers,
            acting.clone(),
            log.clone(),
        ));
        vec![run, sync]
    });
    Ok(Master {
        registry,
        tunnels,
        status,
        decider,
        launcher,
        writer,
        metrics,
        cluster_tasks: election.unwrap_or_default(),
    })
}
