//! NodeStatus (master role): what the master currently knows of each node — up or down, the
//! last sample, when it was heard from. Logs transitions; answers [`ListNodes`]. The samples
//! themselves are read from the tunnels' book ([`Heard`]) when asked, not sent one by one.

use std::collections::BTreeMap;
use std::time::Instant;

use actix::{Actor, Context, Handler, Message};
use slog::{info, o, warn, Logger};

use super::heard::Heard;
use super::messages::{HostsChanged, NodeDown, NodeUp, TunnelProblem};
use crate::hosts::HostKey;
use crate::report::{CpuSample, Hello};

/// One node as the master sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub up: bool,
    pub hello: Option<Hello>,
    pub last_sample: Option<CpuSample>,
    pub last_seen: Option<Instant>,
    pub samples: u64,
    pub last_down_reason: Option<String>,
    /// Why it is not heard, as the tunnel last found (None once its agent is heard).
    pub problem: Option<String>,
}

/// Every node heard of so far.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "BTreeMap<HostKey, NodeView>")]
pub struct ListNodes;

/// The actor.
pub struct NodeStatus {
    nodes: BTreeMap<HostKey, NodeView>,
    /// The registered hosts, as the registry last said.
    known: std::collections::BTreeSet<HostKey>,
    /// The tunnels' samples: each node's last one, read when asked.
    heard: Heard,
    log: Logger,
}

impl NodeStatus {
    /// A NodeStatus that reads each node's last sample from `heard`.
    pub fn new(heard: Heard, log: &Logger) -> NodeStatus {
        NodeStatus {
            nodes: BTreeMap::new(),
            known: Default::default(),
            heard,
            log: log.new(o!("actor" => "NodeStatus")),
        }
    }

    fn entry(&mut self, host: &HostKey) -> &mut NodeView {
        self.nodes.entry(host.clone()).or_insert(NodeView {
            up: false,
            hello: None,
            last_sample: None,
            last_seen: None,
            samples: 0,
            last_down_reason: None,
            problem: None,
        })
    }
}

impl Actor for NodeStatus {
    type Context = Context<Self>;
}

impl Handler<NodeUp> for NodeStatus {
    type Result = ();
    fn handle(&mut self, m: NodeUp, _: &mut Context<Self>) {
        info!(self.log, "NodeUp"; "host" => %m.host.host, "port" => m.host.port, "node" => &m.hello.node);
        let v = self.entry(&m.host);
        v.up = true;
        v.problem = None;
        v.hello = Some(m.hello);
        v.last_seen = Some(Instant::now());
    }
}

impl Handler<TunnelProblem> for NodeStatus {
    type Result = ();
    fn handle(&mut self, m: TunnelProblem, _: &mut Context<Self>) {
        // A host that left the registry is not brought back by a late word about it; a node
        // that is heard has no problem, whatever a late message says.
        if !self.known.contains(&m.host) {
            return;
        }
        let v = self.entry(&m.host);
        if !v.up {
            v.problem = m.problem;
        }
    }
}

impl Handler<NodeDown> for NodeStatus {
    type Result = ();
    fn handle(&mut self, m: NodeDown, _: &mut Context<Self>) {
        warn!(self.log, "NodeDown"; "host" => %m.host.host, "port" => m.host.port, "reason" => &m.reason);
        let v = self.entry(&m.host);
        v.up = false;
        v.last_down_reason = Some(m.reason);
    }
}

impl Handler<HostsChanged> for NodeStatus {
    type Result = ();
    /// A host that left the registry is forgotten: its view would only grow stale.
    fn handle(&mut self, m: HostsChanged, _: &mut Context<Self>) {
        let keep: std::collections::BTreeSet<HostKey> = m.hosts.iter().map(|h| h.key()).collect();
        self.nodes.retain(|k, _| keep.contains(k));
        self.known = keep;
    }
}

impl Handler<ListNodes> for NodeStatus {
    type Result = actix::MessageResult<ListNodes>;
    fn handle(&mut self, _: ListNodes, _: &mut Context<Self>) -> Self::Result {
        for (host, (last, count)) in self.heard.last() {
            let Some((sample, at)) = last else { continue };
            if !self.known.contains(&host) {
                continue;
            }
            let at = at.into_std();
            let v = self.entry(&host);
            if v.last_seen.is_none_or(|seen| seen <= at) {
                v.last_seen = Some(at);
            }
            v.last_sample = Some(sample);
            v.samples = count;
        }
        actix::MessageResult(self.nodes.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::{Host, HostName};
    use crate::report::Hello;
    use actix::Actor;
    use std::sync::Arc;

    #[actix_rt::test]
    async fn forgets_hosts_that_left_the_registry() {
        let log = Logger::root(slog::Discard, o!());
        let s = NodeStatus::new(Heard::default(), &log).start();
        let h = |i: u8| Host::manual(HostName::parse(&format!("127.0.1.{i}")).unwrap(), 80);
        for i in [1, 2] {
            s.do_send(NodeUp {
                host: h(i).key(),
                hello: Hello {
                    node: "n".into(),
                    boot: 1,
                    instance_id: None,
                    uptime_ms: None,
                    interval_ms: 1000,
                    buffer: 0,
                    nonce: String::new(),
                },
            });
        }
        assert_eq!(s.send(ListNodes).await.unwrap().len(), 2);
        s.do_send(HostsChanged {
            hosts: Arc::new(vec![h(2)]),
        });
        let left: Vec<HostKey> = s.send(ListNodes).await.unwrap().into_keys().collect();
        assert_eq!(left, vec![h(2).key()]);
    }
}
