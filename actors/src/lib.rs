//! autoscaler's library: the node and master roles, their actors, and the adapters they use
//! to reach the outside world. The binary (`src/` at the top of the repository) only parses
//! the command line, sets up logging and calls in here.
//!
//! # Roles
//!
//! - [`node`]: CpuSampler → ReportLink, on every web server ([`node::start_node`]).
//! - [`master`]: HostRegistry, TunnelManager, NodeStatus, ScaleDecider, the Launcher (EC2 or a
//!   command) and HaproxyWriter (with a worker per HAProxy server), on the HAProxy machine
//!   ([`master::start_master`]).
//!
//! # Layers
//!
//! Dependencies point one way: pure ← adapters ← actors ← binary.
//!
//! - Pure (crate `autoscaler-core`, re-exported here): [`config`], [`hosts`], [`report`],
//!   [`policy`], [`render`], [`backoff`] — no tokio, actix, AWS or SSH.
//! - [`adapters`]: EC2 (AWS SDK), SSH sessions and host keys (russh), known_hosts, running
//!   commands, atomic files, the hosts.d directory, HAProxy servers (local or over SSH).
//! - Actors: [`node`] and [`master`], one actor per file; [`admin`] holds the one-shot
//!   commands (`init`, `generate`).
//!
//! # Message flow
//!
//! ```text
//! node:    CpuSampler ──CpuSampled──▶ ReportLink ──TCP 127.0.0.1:report_port──▶ (sshd forward)
//!
//! master:  HostRegistry ──HostsChanged──▶ TunnelManager ──SSH session + tcpip-forward per host
//!          (hosts.d)   ╲                      │ forwarded channels, decoded in-process
//!             ▲         ╲HostsChanged         ├──NodeUp / NodeDown──▶ NodeStatus, ScaleDecider
//!             │          ▼                    └──samples ──▶ Heard ◀── read by NodeStatus, ScaleDecider
//!             │        ScaleDecider ──LaunchInstances / DrainHost──▶ Launcher (EC2 or command)
//!             │          ▲                                         │ intents, drains (state_dir),
//!             │          └──LaunchFinished / Reconciled────────────┤ reconciler at start and periodic
//!             └──RegisterHost / DeregisterHost / ListHosts─────────┘
//!
//!          HostRegistry ──HostsChanged (debounced)──▶ HaproxyWriter ──plan──▶ a worker per
//!                                                     HAProxy server (local or SSH): runtime
//!                                                     API, or haproxy -c + install + reload
//!          Launcher ──WaitDrained──▶ HaproxyWriter (a drained host's last session ended)
//! ```
//!
//! [`master::start_master`] and [`node::start_node`] are the only places that know who talks
//! to whom. Both must run inside an actix `System` built with `System::with_tokio_rt` on a
//! multi-thread tokio runtime: the SSH sessions and the node link are plain tokio tasks beside
//! the actors.
#![forbid(unsafe_code)]

pub use autoscaler_core::{
    backoff, config, haproxy_api, hosts, outage, policy, render, report, simulate,
};

pub mod adapters;
pub mod admin;
pub mod master;
pub mod metrics;
pub mod node;
pub mod plot;
pub mod preflight;
#[cfg(test)]
mod test_log;

pub use master::{start_master, Master};
pub use node::{start_node, Node};

use crate::adapters::ec2::Ec2Error;
use crate::master::tunnels::TunnelError;
use crate::render::RenderError;

/// Why a daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// What `autoscaler check` would also report (exit code 78).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error("cannot read this machine's CPU counters: {0}")]
    Cpu(#[from] sysinfo::Error),
    #[error(transparent)]
    Ec2(#[from] Ec2Error),
    #[error(transparent)]
    Template(#[from] RenderError),
    #[error(transparent)]
    Etcd(#[from] crate::adapters::etcd::EtcdError),
    #[error(transparent)]
    ReportDir(#[from] crate::node::report_dir::ReportDirError),
    /// The control socket or the metrics address cannot be bound.
    #[error("cannot listen on {what}: {source}")]
    Listen {
        what: String,
        source: std::io::Error,
    },
}
