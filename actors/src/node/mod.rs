//! The node role: every web server samples its own CPU and streams it to the master.
//!
//! ```text
//! CpuSampler ──CpuSampled──▶ ReportDir ──▶ ReportLink per master socket in the report socket
//!                                          directory ──Unix socket──▶ (a master's SSH forward)
//!     or, with [node] report_socket empty:
//! CpuSampler ──CpuSampled──▶ ReportLink ──TCP 127.0.0.1:report_port──▶ (the master's SSH forward)
//!            └─CpuSampled──▶ ReportLink per other_report_ports (one per further master)
//! ```
//!
//! [`start_node`] is the only place that wires them.

pub mod cpu_sampler;
pub mod report_dir;
pub mod report_link;

use actix::{Actor, Addr};
use slog::Logger;

use self::cpu_sampler::CpuSampler;
use self::report_dir::ReportDir;
use self::report_link::{CpuSampled, Endpoint, ReportLink};
use std::path::Path;
use std::sync::Arc;

use crate::adapters::secret;
use crate::config::Config;
use crate::report::Hello;
use crate::StartError;

/// The running node's actors.
pub struct Node {
    pub sampler: Addr<CpuSampler>,
    /// TCP: one link per master, report_port first, then other_report_ports.
    pub links: Vec<Addr<ReportLink>>,
    /// Unix sockets: the directory watcher that runs a link per master socket.
    pub dir: Option<Addr<ReportDir>>,
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
        // Set on every (re)connect from the machine's boot time (see ReportLink).
        uptime_ms: None,
        interval_ms: cfg.node.sample_interval.as_millis() as u64,
        buffer: cfg.node.buffer as u64,
        // Fresh on every connection (see AgentChannel).
        nonce: String::new(),
    };
    let secret = match &cfg.node.secret_file {
        Some(p) => Some(Arc::new(
            secret::read(&secret::location(p))
                .map_err(crate::master::tunnels::TunnelError::from)?,
        )),
        None => {
            slog::warn!(log, "Reports carry no proof ([node] secret_file is empty): a master with a secret refuses them");
            None
        }
    };
    let (links, dir) = match &cfg.node.report_socket {
        Some(socket) => {
            let dir = Path::new(socket).parent().unwrap_or(Path::new("/"));
            report_dir::prepare(dir)?;
            let d = ReportDir::new(dir, hello, cfg.node.buffer, secret, log).start();
            (Vec::new(), Some(d))
        }
        None => {
            let links: Vec<Addr<ReportLink>> = std::iter::once(cfg.node.report_port)
                .chain(cfg.node.other_report_ports.iter().copied())
                .map(|port| {
                    let endpoint = Endpoint::Tcp(port);
                    ReportLink::new(
                        endpoint,
                        hello.clone(),
                        cfg.node.buffer,
                        secret.clone(),
                        log,
                    )
                    .start()
                })
                .collect();
            (links, None)
        }
    };
    let out: Vec<actix::Recipient<CpuSampled>> = links
        .iter()
        .map(|l| l.clone().recipient())
        .chain(dir.iter().map(|d| d.clone().recipient()))
        .collect();
    let sampler = CpuSampler::new(cfg.node.sample_interval, out, log)?.start();
    Ok(Node {
        sampler,
        links,
        dir,
    })
}
