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
//!   [`tunnel_manager`], [`node_status`] (master).
//! - [`fsutil`], [`backoff`]: atomic writes; jittered reconnect delays.
//!
//! # Message flow
//!
//! ```text
//! node:    CpuSampler ──CpuSampled──▶ ReportLink ──TCP 127.0.0.1:report_port──▶ (sshd forward)
//!
//! master:  HostRegistry ──HostsChanged──▶ TunnelManager ──SSH session + tcpip-forward per host
//!          (hosts.d)                          │ forwarded channels, decoded in-process
//!                                             ├──NodeUp / NodeDown──▶ NodeStatus
//!                                             └──CpuReported───────▶ NodeStatus
//! ```
//!
//! [`start_master`] and [`start_node`] are the only places that know who talks to whom. Both
//! must run inside an actix `System` built with `System::with_tokio_rt` on a multi-thread tokio
//! runtime: the SSH sessions and the node link are plain tokio tasks beside the actors.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod commands;
pub mod config;
pub mod cpu_sampler;
pub mod fsutil;
pub mod haproxy;
pub mod host_registry;
pub mod hosts;
pub mod messages;
pub mod node_status;
pub mod policy;
pub mod render;
pub mod report;
pub mod report_link;
pub mod tunnel_manager;

use std::time::Duration;

use actix::{Actor, Addr};
use slog::Logger;

use crate::config::Config;
use crate::cpu_sampler::CpuSampler;
use crate::host_registry::HostRegistry;
use crate::hosts::HostsDir;
use crate::node_status::NodeStatus;
use crate::report::Hello;
use crate::report_link::ReportLink;
use crate::tunnel_manager::{TunnelError, TunnelManager, TunnelOutputs, TunnelSettings};

/// The running master's actors.
pub struct Master {
    pub registry: Addr<HostRegistry>,
    pub tunnels: Addr<TunnelManager>,
    pub status: Addr<NodeStatus>,
}

/// Why a daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error("cannot read this machine's CPU counters: {0}")]
    Cpu(#[from] sysinfo::Error),
}

/// Starts the master role: registry → tunnels → status. `poll` is how often hosts.d is rescanned.
pub fn start_master(cfg: &Config, poll: Duration, log: &Logger) -> Result<Master, StartError> {
    let settings = TunnelSettings::from_config(cfg)?;
    let status = NodeStatus::new(log).start();
    let tunnels = TunnelManager::new(
        settings,
        TunnelOutputs {
            cpu: status.clone().recipient(),
            up: status.clone().recipient(),
            down: status.clone().recipient(),
        },
        log,
    )
    .start();
    let registry = HostRegistry::new(
        HostsDir::new(&cfg.general.hosts_dir),
        vec![tunnels.clone().recipient()],
        poll,
        log,
    )
    .start();
    Ok(Master {
        registry,
        tunnels,
        status,
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
