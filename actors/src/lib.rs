//! autoscaler's library: configuration, the host registry, HAProxy rendering and the actors of
//! the master and node daemons.
//!
//! # Layout
//!
//! - [`config`]: `autoscaler.ini` → typed [`config::Config`], every problem reported at once.
//! - [`hosts`]: host/port validation and the `hosts.d` directory (one file per backend).
//! - [`render`]: tera templates → haproxy.cfg and autoscaler.ini.
//! - [`haproxy`]: validating a candidate haproxy.cfg and installing it without ever replacing a
//!   good config with a bad one.
//! - [`commands`]: `init` and `generate`, the one-shot commands behind the binary.
//! - [`report`]: the node → master report protocol (codec, pure).
//! - [`messages`]: messages shared by several actors.
//! - [`policy`]: the scaling decision as a pure function of samples, history and time.
//! - Actors, one per file: [`cpu_sampler`], [`report_link`] (node); [`host_registry`],
//!   [`tunnel_manager`], [`node_status`], [`scale_decider`], [`ec2_launcher`],
//!   [`haproxy_writer`] (master).
//! - [`command`]: running configured commands (argv, clean environment, timeout).
//! - [`ec2_api`]: the EC2 calls behind one small trait, implemented with the AWS SDK.
//! - [`fsutil`], [`backoff`]: atomic writes; jittered reconnect delays.
//!
//! # Message flow
//!
//! ```text
//! node:    CpuSampler ──CpuSampled──▶ ReportLink ──TCP 127.0.0.1:report_port──▶ (sshd forward)
//!
//! master:  HostRegistry ──HostsChanged──▶ TunnelManager ──SSH session + tcpip-forward per host
//!          (hosts.d)   ╲                      │ forwarded channels, decoded in-process
//!             ▲         ╲HostsChanged         ├──NodeUp / NodeDown──▶ NodeStatus, ScaleDecider
//!             │          ▼                    └──CpuReported───────▶ NodeStatus, ScaleDecider
//!             │        ScaleDecider ──LaunchInstances / TerminateInstance──▶ Ec2Launcher
//!             │          ▲   └──DeregisterHost (drain)──▶ HostRegistry
//!             │          └──────LaunchFinished────────────── Ec2Launcher
//!             └──RegisterHost / DeregisterHost / ListHosts── Ec2Launcher
//!
//!          HostRegistry ──HostsChanged (debounced)──▶ HaproxyWriter: render, haproxy -c,
//!                                                     install atomically, reload
//! ```
//!
//! [`start_master`] and [`start_node`] are the only places that know who talks to whom. Both
//! must run inside an actix `System` built with `System::with_tokio_rt` on a multi-thread tokio
//! runtime: the SSH sessions and the node link are plain tokio tasks beside the actors.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod command;
pub mod commands;
pub mod config;
pub mod cpu_sampler;
pub mod ec2_api;
pub mod ec2_launcher;
pub mod fsutil;
pub mod haproxy;
pub mod haproxy_writer;
pub mod host_registry;
pub mod hosts;
pub mod messages;
pub mod node_status;
pub mod policy;
pub mod render;
pub mod report;
pub mod report_link;
pub mod scale_decider;
pub mod tunnel_manager;

use std::time::Duration;

use actix::{Actor, Addr, AsyncContext};
use slog::Logger;

use crate::config::Config;
use crate::cpu_sampler::CpuSampler;
use crate::ec2_api::Ec2Error;
use crate::ec2_launcher::{Backend, Ec2Launcher, LaunchSettings, LauncherOutputs};
use crate::haproxy_writer::HaproxyWriter;
use crate::host_registry::HostRegistry;
use crate::hosts::HostsDir;
use crate::node_status::NodeStatus;
use crate::render::{HaproxyTemplate, RenderError};
use crate::report::Hello;
use crate::report_link::ReportLink;
use crate::scale_decider::{DeciderOutputs, ScaleDecider};
use crate::tunnel_manager::{TunnelError, TunnelManager, TunnelOutputs, TunnelSettings};

/// The running master's actors.
pub struct Master {
    pub registry: Addr<HostRegistry>,
    pub tunnels: Addr<TunnelManager>,
    pub status: Addr<NodeStatus>,
    pub decider: Addr<ScaleDecider>,
    /// None in dry-run: nothing is launched, and no launch settings are needed.
    pub launcher: Option<Addr<Ec2Launcher>>,
    pub writer: Addr<HaproxyWriter>,
}

/// Why a daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error("cannot read this machine's CPU counters: {0}")]
    Cpu(#[from] sysinfo::Error),
    #[error(transparent)]
    Ec2(#[from] Ec2Error),
    #[error(transparent)]
    Template(#[from] RenderError),
}

/// Starts the master role. `poll` is how often hosts.d is rescanned, `tick` how often the
/// policy runs. Must run inside the actix system (it builds the EC2 client, hence async).
pub async fn start_master(
    cfg: &Config,
    poll: Duration,
    tick: Duration,
    log: &Logger,
) -> Result<Master, StartError> {
    let tunnel_settings = TunnelSettings::from_config(cfg)?;
    let backend = match cfg.scaling.dry_run {
        true => None,
        false => Some(Backend::from_config(cfg).await?),
    };
    let template = HaproxyTemplate::load(cfg.haproxy.template.as_deref())?;
    let writer = HaproxyWriter::new(std::sync::Arc::new(cfg.clone()), template, log).start();
    let status = NodeStatus::new(log).start();
    // Registry, decider and launcher address each other: make the contexts (and so the
    // addresses) first, start the actors once everyone has what it needs.
    let registry_ctx = actix::Context::<HostRegistry>::new();
    let registry = registry_ctx.address();
    let decider_ctx = actix::Context::<ScaleDecider>::new();
    let decider = decider_ctx.address();
    let launcher = backend.map(|b| {
        Ec2Launcher::new(
            b,
            LaunchSettings::from_config(cfg),
            LauncherOutputs {
                register: registry.clone().recipient(),
                deregister: registry.clone().recipient(),
                list: registry.clone().recipient(),
                finished: decider.clone().recipient(),
            },
            log,
        )
        .start()
    });
    let outputs = launcher.as_ref().map(|l| DeciderOutputs {
        launch: l.clone().recipient(),
        terminate: l.clone().recipient(),
        deregister: registry.clone().recipient(),
    });
    decider_ctx.run(ScaleDecider::new(cfg.scaling.clone(), outputs, tick, log));
    let tunnels = TunnelManager::new(
        tunnel_settings,
        TunnelOutputs {
            cpu: vec![status.clone().recipient(), decider.clone().recipient()],
            up: vec![status.clone().recipient(), decider.clone().recipient()],
            down: vec![status.clone().recipient(), decider.clone().recipient()],
        },
        log,
    )
    .start();
    registry_ctx.run(HostRegistry::new(
        HostsDir::new(&cfg.general.hosts_dir),
        vec![
            tunnels.clone().recipient(),
            decider.clone().recipient(),
            writer.clone().recipient(),
        ],
        poll,
        log,
    ));
    Ok(Master {
        registry,
        tunnels,
        status,
        decider,
        launcher,
        writer,
    })
}

/// The running node's actors.
pub struct Node {
    pub sampler: Addr<CpuSampler>,
    pub link: Addr<ReportLink>,
}

/// Starts the node role: CpuSampler → ReportLink.
pub fn start_node(cfg: &Config, log: &Logger) -> Result<Node, StartError> {
    let node_name = match cfg.node.name.as_str() {
        "" => sysinfo::System::host_name().unwrap_or_else(|_| "unknown".into()),
        name => name.to_string(),
    };
    let hello = Hello {
        node: node_name,
        boot: rand::random(),
        instance_id: Some(cfg.node.instance_id.clone()).filter(|i| !i.is_empty()),
    };
    let link = ReportLink::new(cfg.node.report_port, hello, cfg.node.buffer, log).start();
    let sampler = CpuSampler::new(cfg.node.sample_interval, link.clone().recipient(), log)?.start();
    Ok(Node { sampler, link })
}
