//! HostRegistry (master role): the registered hosts, kept in hosts.d (one master) or etcd
//! (several, [`HostStore`]).
//!
//! Loads the store at start and rescans it every `poll` (so `autoscaler add-host` run beside
//! the daemon, or a registration by the leader, takes effect within that time); writes it for
//! [`RegisterHost`] / [`DeregisterHost`] (in etcd, only while this master leads).
//! Every change is announced as one [`HostsChanged`] with the full list. A host file that
//! becomes unreadable keeps its last good version in the list and is logged: an editor's
//! half-written file never takes a backend out of rotation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, Recipient, ResponseActFuture,
    WrapFuture,
};
use slog::{info, o, warn, Logger};

use super::messages::HostsChanged;
use crate::adapters::host_store::HostStore;
use crate::adapters::hosts_dir::{AddOutcome, HostsDir, HostsError};
use crate::hosts::{Host, HostKey};
use crate::outage::{Outage, Say};

/// How often hosts.d is rescanned by default.
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);

/// Registers a host (a launched instance): writes its file, then announces the new list.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<AddOutcome, HostsError>")]
pub struct RegisterHost(pub Host);

/// Removes a host (drain before scale-in): deletes its file, then announces the new list.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), HostsError>")]
pub struct DeregisterHost(pub HostKey);

/// The current list.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Arc<Vec<Host>>")]
pub struct ListHosts;

/// The registry actor.
pub struct HostRegistry {
    store: HostStore,
    /// A rescan is under way: the next tick skips.
    scanning: bool,
    hosts: Arc<Vec<Host>>,
    /// File name → error text, to log each bad file once.
    bad: BTreeMap<String, String>,
    subscribers: Vec<Recipient<HostsChanged>>,
    poll: Duration,
    /// The store cannot be read (an etcd outage): logged when it starts, once a minute while
    /// it lasts, and when it ends.
    unreadable: Outage,
    log: Logger,
}

/// How often a lasting failure to read the store is logged again.
const REPEAT_FAILURE_LOG: Duration = Duration::from_secs(60);

impl HostRegistry {
    /// A registry over `dir` announcing changes to `subscribers`.
    pub fn new(
        dir: HostsDir,
        subscribers: Vec<Recipient<HostsChanged>>,
        poll: Duration,
        log: &Logger,
    ) -> HostRegistry {
        HostRegistry::over(HostStore::Dir(dir), subscribers, poll, log)
    }

    /// A registry over any store.
    pub fn over(
        store: HostStore,
        subscribers: Vec<Recipient<HostsChanged>>,
        poll: Duration,
        log: &Logger,
    ) -> HostRegistry {
        HostRegistry {
            store,
            scanning: false,
            hosts: Arc::new(Vec::new()),
            bad: BTreeMap::new(),
            subscribers,
            poll,
            unreadable: Outage::new(REPEAT_FAILURE_LOG),
            log: log.new(o!("actor" => "HostRegistry")),
        }
    }

    /// Reloads the store in the background; announces the list if it changed (or `force`).
    fn rescan(&mut self, force: bool, ctx: &mut Context<Self>) {
        if self.scanning {
            return;
        }
        self.scanning = true;
        let store = self.store.clone();
        ctx.spawn(async move { store.load().await }.into_actor(self).map(
            move |loaded, this, _| {
                this.scanning = false;
                this.apply(loaded, force);
            },
        ));
    }

    /// Takes what the store holds as the list; announces it if it changed (or `force`).
    fn apply(&mut self, loaded: Result<(Vec<Host>, Vec<HostsError>), HostsError>, force: bool) {
        let (mut hosts, errors) = match loaded {
            Ok(r) => r,
            Err(e) => {
                match self.unreadable.failed(Instant::now()) {
                    Some(Say::Started) => {
                        warn!(self.log, "Cannot read the hosts; keeping the last list"; "store" => self.store.describe(), "error" => %e)
                    }
                    Some(Say::Lasting(d)) => {
                        warn!(self.log, "Still cannot read the hosts; keeping the last list"; "store" => self.store.describe(),
                            "for" => %humantime::format_duration(d), "error" => %e)
                    }
                    None => {}
                }
                return;
            }
        };
        if let Some(d) = self.unreadable.ended(Instant::now()) {
            info!(self.log, "Hosts readable again"; "store" => self.store.describe(),
                "after" => %humantime::format_duration(d));
        }
        let mut bad = BTreeMap::new();
        for e in errors {
            if let HostsError::BadFile { path, message } = &e {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if self.bad.get(&name) != Some(message) {
                    warn!(self.log, "Unreadable host file; keeping its last good version"; "error" => %e);
                }
                // Keep what this file said last time it could be read.
                if let Some(prev) = self.hosts.iter().find(|h| h.file_name() == name) {
                    hosts.push(prev.clone());
                }
                bad.insert(name, message.clone());
            }
        }
        self.bad = bad;
        hosts.sort_by_key(Host::key);
        hosts.dedup_by_key(|h| h.key());
        if force || *self.hosts != hosts {
            info!(self.log, "Hosts changed"; "count" => hosts.len());
            self.hosts = Arc::new(hosts);
            for s in &self.subscribers {
                s.do_send(HostsChanged {
                    hosts: self.hosts.clone(),
                });
            }
        }
    }
}

impl Actor for HostRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.rescan(true, ctx);
        ctx.run_interval(self.poll, |this, ctx| this.rescan(false, ctx));
    }
}

impl Handler<RegisterHost> for HostRegistry {
    type Result = ResponseActFuture<Self, Result<AddOutcome, HostsError>>;

    fn handle(&mut self, msg: RegisterHost, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let host = msg.0;
        Box::pin(
            async move {
                let outcome = store.add(&host).await;
                let loaded = store.load().await;
                (host, outcome, loaded)
            }
            .into_actor(self)
            .map(|(host, outcome, loaded), this, _| {
                let outcome = outcome?;
                info!(this.log, "Registered host"; "host" => %host.host, "port" => host.port, "outcome" => ?outcome);
                this.apply(loaded, false);
                Ok(outcome)
            }),
        )
    }
}

impl Handler<DeregisterHost> for HostRegistry {
    type Result = ResponseActFuture<Self, Result<(), HostsError>>;

    fn handle(&mut self, msg: DeregisterHost, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let key = msg.0;
        Box::pin(
            async move {
                let removed = store.remove(&key).await;
                let loaded = store.load().await;
                (key, removed, loaded)
            }
            .into_actor(self)
            .map(|(key, removed, loaded), this, _| {
                removed?;
                info!(this.log, "Deregistered host"; "host" => %key.host, "port" => key.port);
                this.apply(loaded, false);
                Ok(())
            }),
        )
    }
}

impl Handler<ListHosts> for HostRegistry {
    type Result = Arc<Vec<Host>>;

    fn handle(&mut self, _: ListHosts, _: &mut Context<Self>) -> Self::Result {
        self.hosts.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::HostName;
    use tokio::sync::mpsc;

    struct Collect(mpsc::UnboundedSender<Arc<Vec<Host>>>);
    impl Actor for Collect {
        type Context = Context<Self>;
    }
    impl Handler<HostsChanged> for Collect {
        type Result = ();
        fn handle(&mut self, m: HostsChanged, _: &mut Context<Self>) {
            let _ = self.0.send(m.hosts);
        }
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<Arc<Vec<Host>>>) -> Vec<String> {
        let hosts = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        hosts.iter().map(|h| h.key().to_string()).collect()
    }

    /// A store that cannot be read (etcd away, here a hosts_dir that is a file) is logged
    /// when the failure starts, not at every rescan, and its end is logged too.
    #[actix_rt::test]
    async fn an_unreadable_store_is_logged_once_and_its_return() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("hosts.d");
        std::fs::write(&path, "not a directory").unwrap();
        let lines = crate::test_log::Lines::default();
        let log = Logger::root(lines.clone(), o!());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink = Collect(tx).start();
        let reg = HostRegistry::new(
            HostsDir::new(&path),
            vec![sink.recipient()],
            Duration::from_millis(20),
            &log,
        )
        .start();
        // About 25 rescans fail.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            lines.starting("Cannot read the hosts").len(),
            1,
            "{:#?}",
            lines.0.lock().unwrap()
        );
        assert!(lines.starting("Still cannot").is_empty());
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        HostsDir::new(&path)
            .add(&Host::manual(HostName::parse("127.0.0.5").unwrap(), 80))
            .unwrap();
        assert_eq!(next(&mut rx).await, vec!["127.0.0.5 80"]);
        let back = lines.starting("Hosts readable again");
        assert_eq!(back.len(), 1, "{:#?}", lines.0.lock().unwrap());
        drop(reg);
    }

    #[actix_rt::test]
    async fn announces_changes_from_messages_and_from_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = HostsDir::new(tmp.path());
        dir.add(&Host::manual(HostName::parse("127.0.0.5").unwrap(), 80))
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink = Collect(tx).start();
        let log = Logger::root(slog::Discard, o!());
        let reg = HostRegistry::new(
            dir.clone(),
            vec![sink.recipient()],
            Duration::from_millis(50),
            &log,
        )
        .start();
        assert_eq!(next(&mut rx).await, ["127.0.0.5 80"], "initial list");

        let h = Host::manual(HostName::parse("127.0.0.6").unwrap(), 81);
        assert_eq!(
            reg.send(RegisterHost(h.clone())).await.unwrap().unwrap(),
            AddOutcome::Added
        );
        assert_eq!(next(&mut rx).await, ["127.0.0.5 80", "127.0.0.6 81"]);

        // A file written by `autoscaler add-host` beside the daemon.
        dir.add(&Host::manual(HostName::parse("127.0.0.4").unwrap(), 80))
            .unwrap();
        assert_eq!(
            next(&mut rx).await,
            ["127.0.0.4 80", "127.0.0.5 80", "127.0.0.6 81"]
        );

        // A file that turns unreadable keeps its last good version: no announcement.
        std::fs::write(
            tmp.path().join("127.0.0.4_80.host"),
            "host = 127.0.0.4\nport = 8 0\n",
        )
        .unwrap();
        reg.send(DeregisterHost(h.key())).await.unwrap().unwrap();
        assert_eq!(next(&mut rx).await, ["127.0.0.4 80", "127.0.0.5 80"]);
        assert_eq!(reg.send(ListHosts).await.unwrap().len(), 2);
        assert!(
            reg.send(DeregisterHost(h.key())).await.unwrap().is_err(),
            "already gone"
        );
    }
}
