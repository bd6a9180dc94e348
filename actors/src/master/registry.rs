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
use crate::adapters::host_store::{HostStore, Loaded};
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
    /// Reads of the store numbered so far, and the newest read taken: its number and (etcd)
    /// the store's revision it was made at.
    started_reads: u64,
    newest: (u64, Option<i64>),
    /// `started_reads` when the newest read was taken: a read numbered after that cannot
    /// have run beside it.
    taken_at: u64,
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
            started_reads: 0,
            newest: (0, None),
            taken_at: 0,
            hosts: Arc::new(Vec::new()),
            bad: BTreeMap::new(),
            subscribers,
            poll,
            unreadable: Outage::new(REPEAT_FAILURE_LOG),
            log: log.new(o!("actor" => "HostRegistry")),
        }
    }

    /// Numbers a read of the store: a rescan's as it starts, a registration's as it ends (its
    /// read follows its own write, so it is newer than any rescan started before). Of two
    /// reads the higher number is the newer (hosts.d), unless the store says which is (etcd's
    /// revision).
    fn read_number(&mut self) -> u64 {
        self.started_reads += 1;
        self.started_reads
    }

    /// Reloads the store in the background; announces the list if it changed (or `force`).
    fn rescan(&mut self, force: bool, ctx: &mut Context<Self>) {
        if self.scanning {
            return;
        }
        self.scanning = true;
        let store = self.store.clone();
        let n = self.read_number();
        ctx.spawn(async move { store.load_at().await }.into_actor(self).map(
            move |loaded, this, _| {
                this.scanning = false;
                this.apply(loaded, n, force);
            },
        ));
    }

    /// Takes what the store holds as the list; announces it if it changed (or `force`). A
    /// read older than one already taken (a rescan that started before a registration's read
    /// and ended after it) is dropped: it would undo what the newer one showed.
    fn apply(&mut self, loaded: Result<Loaded, HostsError>, n: u64, force: bool) {
        let (mut hosts, errors) = match loaded {
            Ok((hosts, errors, rev)) => {
                let older = match (rev, self.newest.1) {
                    // A lower revision from a read that cannot have run beside the newest
                    // one: etcd itself went back (restored from a snapshot). It is the truth
                    // now, or the list would never change again.
                    (Some(r), Some(newest)) if r < newest && n > self.taken_at => {
                        warn!(self.log, "The host store's revision went back (etcd restored?); taking what it holds now";
                            "revision" => r, "was" => newest);
                        false
                    }
                    (Some(r), Some(newest)) => r < newest,
                    _ => n < self.newest.0,
                };
                if older {
                    return;
                }
                self.newest = (n.max(self.newest.0), rev.or(self.newest.1));
                self.taken_at = self.started_reads;
                (hosts, errors)
            }
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
                let loaded = store.load_at().await;
                (host, outcome, loaded)
            }
            .into_actor(self)
            .map(move |(host, outcome, loaded), this, _| {
                let outcome = outcome?;
                info!(this.log, "Registered host"; "host" => %host.host, "port" => host.port, "outcome" => ?outcome);
                // Read after the write: newer than any rescan started before it.
                let n = this.read_number();
                this.apply(loaded, n, false);
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
                let loaded = store.load_at().await;
                (key, removed, loaded)
            }
            .into_actor(self)
            .map(move |(key, removed, loaded), this, _| {
                removed?;
                info!(this.log, "Deregistered host"; "host" => %key.host, "port" => key.port);
                let n = this.read_number();
                this.apply(loaded, n, false);
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

    /// Of two reads of the store, the newer one's list stands whatever order they end in:
    /// by etcd's revision when the store gives one, else by the order the reads started.
    #[test]
    fn an_older_read_never_replaces_a_newer_one() {
        let tmp = tempfile::tempdir().unwrap();
        let log = Logger::root(slog::Discard, o!());
        let a = Host::manual(HostName::parse("127.0.0.5").unwrap(), 80);
        let b = Host::manual(HostName::parse("127.0.0.6").unwrap(), 80);
        let keys = |r: &HostRegistry| -> Vec<String> {
            r.hosts.iter().map(|h| h.key().to_string()).collect()
        };
        let both = vec!["127.0.0.5 80".to_string(), "127.0.0.6 80".to_string()];
        let mut reg = HostRegistry::new(HostsDir::new(tmp.path()), vec![], POLL, &log);
        // etcd: the read at revision 7 ends first; one that started later but read at
        // revision 5 (before b was added) ends after it.
        let first = reg.read_number();
        let second = reg.read_number();
        reg.apply(
            Ok((vec![a.clone(), b.clone()], vec![], Some(7))),
            first,
            false,
        );
        reg.apply(Ok((vec![a.clone()], vec![], Some(5))), second, false);
        assert_eq!(keys(&reg), both);
        let third = reg.read_number();
        reg.apply(Ok((vec![b.clone()], vec![], Some(8))), third, false);
        assert_eq!(keys(&reg), vec!["127.0.0.6 80"]);
        // etcd restored from an older snapshot: a read numbered after the last one was taken
        // is the truth, whatever its revision.
        let fourth = reg.read_number();
        reg.apply(
            Ok((vec![a.clone(), b.clone()], vec![], Some(3))),
            fourth,
            false,
        );
        assert_eq!(keys(&reg), both);
        // hosts.d: the read started first ends last.
        let mut reg = HostRegistry::new(HostsDir::new(tmp.path()), vec![], POLL, &log);
        let first = reg.read_number();
        let second = reg.read_number();
        reg.apply(
            Ok((vec![a.clone(), b.clone()], vec![], None)),
            second,
            false,
        );
        reg.apply(Ok((vec![a.clone()], vec![], None)), first, false);
        assert_eq!(keys(&reg), both);
        let third = reg.read_number();
        reg.apply(Ok((vec![a], vec![], None)), third, false);
        assert_eq!(keys(&reg), vec!["127.0.0.5 80"]);
    }

    const POLL: Duration = Duration::from_secs(1);

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
