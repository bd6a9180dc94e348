//! The node role: every web server samples its own CPU and streams it to the master.
//!
//! ```text
//! CpuSampler ──CpuSampled──▶ ReportLink ──TCP 127.0.0.1:report_port──▶ (the master's SSH forward)
//! ```
//!
//! [`start_node`] is the only place that wires them.

pub mod cpu_sampler;
pub mod report_link;

use actix::{Actor, Addr};
use slog::Logger;

use self::cpu_sampler::CpuSampler;
use self::report_link::ReportLink;
use crate::config::Config;
use crate::report::Hello;
use crate::StartError;

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
        // Set on every (re)connect from the machine's boot time (see ReportLink).
        uptime_ms: None,
    };
    let link = ReportLink::new(cfg.node.report_port, hello, cfg.node.buffer, log).start();
    let sampler = CpuSampler::new(cfg.node.sample_interval, link.clone().recipient(), log)?.start();
    Ok(Node { sampler, link })
}
