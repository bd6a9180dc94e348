//! Messages several of the master's actors receive. A message only one actor receives lives in
//! that actor's file.

use std::sync::Arc;

use actix::Message;

use crate::hosts::{Host, HostKey};
use crate::report::{CpuSample, Hello};

/// A node reported a sample over its tunnel (master role). Duplicates are already removed.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct CpuReported {
    pub host: HostKey,
    pub sample: CpuSample,
}

/// A node's agent said hello over a fresh tunnel channel.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct NodeUp {
    pub host: HostKey,
    pub hello: Hello,
}

/// Why a node is not heard (SSH refused, host key unknown, forward refused, a report channel
/// that did not prove the report secret), or None once it is: for `status`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct TunnelProblem {
    pub host: HostKey,
    pub problem: Option<String>,
}

/// A node stopped reporting: its session or channel died, or its samples went stale.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct NodeDown {
    pub host: HostKey,
    pub reason: String,
}

/// The registered hosts changed (or were loaded at start): the complete, sorted list.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct HostsChanged {
    pub hosts: Arc<Vec<Host>>,
}
