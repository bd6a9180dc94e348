//! Several masters on a real etcd (started here on loopback): the election, writes guarded by
//! the leader's lease, the shared host list, failover and outages, through the library and
//! through the master binary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler};
use autoscaler_actors::adapters::etcd::{current, Etcd, EtcdError, Lead, LeadCell};
use autoscaler_actors::config::{Cluster, Config, Layout, Role};
use autoscaler_actors::master::leadership::{self, Leading};
use tokio::sync::mpsc;

use crate::common::etcd::Etcd as EtcdServer;

fn cluster(server: &EtcdServer, ttl: Duration) -> Cluster {
    let mut c = Config::defaults(
        &Layout::for_dir(std::path::Path::new("/srv/as")),
        Role::Master,
    )
    .cluster;
    c.etcd_endpoints = vec![server.endpoint.clone()];
    c.group = format!("g{}", rand_suffix());
    c.lease_ttl = ttl;
    c.etcd_timeout = Duration::from_secs(2);
    c
}

fn rand_suffix() -> u32 {
    std::process::id() ^ (Instant::now().elapsed().subsec_nanos())
}

/// Guarded writes: only while the lead's election key lives; once its lease is revoked, the
/// same write (same key, same revision) is refused, and an unguarded (operator's) write is not.
#[actix_rt::test]
async fn a_deposed_leaders_writes_are_refused() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let c = cluster(&server, Duration::from_secs(5));
    let etcd = Etcd::connect(&c, Some(c.etcd_timeout)).await.unwrap();
    let mut client = etcd.client();
    let lease = client.lease_grant(5, None).await.unwrap().id();
    let won = client.campaign(etcd.election(), "m1", lease).await.unwrap();
    let key = won.leader().unwrap().clone();
    let lead = Lead {
        key: key.key().to_vec(),
        rev: key.rev(),
        lease,
    };
    etcd.put("intents", "d-1", b"{}".to_vec(), Some(&lead))
        .await
        .unwrap();
    assert_eq!(etcd.list("intents").await.unwrap().len(), 1);
    assert_eq!(etcd.leader().await.unwrap().as_deref(), Some("m1"));
    client.lease_revoke(lease).await.unwrap();
    let refused = etcd
        .put("intents", "d-2", b"{}".to_vec(), Some(&lead))
        .await;
    assert!(matches!(refused, Err(EtcdError::NotLeader)), "{refused:?}");
    let refused = etcd.delete("intents", "d-1", Some(&lead)).await;
    assert!(matches!(refused, Err(EtcdError::NotLeader)), "{refused:?}");
    assert_eq!(
        etcd.list("intents").await.unwrap().len(),
        1,
        "nothing written"
    );
    etcd.put("hosts", "h", b"x".to_vec(), None).await.unwrap();
    assert_eq!(etcd.leader().await.unwrap(), None, "nobody leads");
}

type Changes = mpsc::UnboundedReceiver<(usize, bool, Instant)>;

/// The next leadership change, within `limit`.
async fn next(rx: &mut Changes, limit: Duration) -> (usize, bool, Instant) {
    tokio::time::timeout(limit, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no leadership change within {limit:?}"))
        .unwrap()
}

struct Collect(mpsc::UnboundedSender<(usize, bool, Instant)>, usize);
impl Actor for Collect {
    type Context = Context<Self>;
}
impl Handler<Leading> for Collect {
    type Result = ();
    fn handle(&mut self, m: Leading, _: &mut Context<Self>) {
        let _ = self.0.send((self.1, m.0, Instant::now()));
    }
}

/// Three candidates: exactly one leads. Its process stops without a word (the task aborted,
/// its lease left to expire, as after SIGKILL): another leads after the lease expired, never
/// before. etcd stopped: the leader steps down within 2/3 of the TTL, before anyone else
/// could lead; back, someone leads again.
#[actix_rt::test]
async fn one_leader_failover_after_the_lease_and_step_down_without_etcd() {
    let Some(mut server) = EtcdServer::start() else {
        return;
    };
    let ttl = Duration::from_secs(2);
    let c = cluster(&server, ttl);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let log = crate::common::LogBuf::default();
    let mut cells: Vec<LeadCell> = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let sink = Collect(tx.clone(), i).start();
        let cell: LeadCell = Arc::default();
        cells.push(cell.clone());
        tasks.push(tokio::spawn(leadership::run(
            c.clone(),
            format!("m{i}"),
            cell,
            vec![sink.recipient()],
            log.logger(),
        )));
    }
    let (first, leading, _) = next(&mut rx, Duration::from_secs(10)).await;
    assert!(leading);
    let leaders = |cells: &[LeadCell]| cells.iter().filter(|c| current(c).is_some()).count();
    assert_eq!(leaders(&cells), 1);
    // Nobody else leads while it does.
    assert!(tokio::time::timeout(Duration::from_secs(3), rx.recv())
        .await
        .is_err());

    // The leader's process vanishes: no resign, no revoke.
    let killed = Instant::now();
    tasks[first].abort();
    cells[first].write().unwrap().take();
    let (second, leading, at) = next(&mut rx, ttl * 4).await;
    assert!(leading && second != first);
    let took = at - killed;
    assert!(
        took >= ttl - Duration::from_millis(300),
        "took over after {took:?}, before the lease expired"
    );
    assert_eq!(leaders(&cells), 1);

    // etcd goes away: the leader steps down on its own, within 2/3 of the TTL of its last
    // renewal (plus a check period).
    let outage = Instant::now();
    server.stop();
    let (who, leading, at) = next(&mut rx, ttl * 2).await;
    assert_eq!((who, leading), (second, false));
    assert!(
        at - outage <= ttl * 2 / 3 + Duration::from_millis(300),
        "stepped down after {:?}",
        at - outage
    );
    assert_eq!(leaders(&cells), 0);
    server.resume();
    let (_, leading, _) = next(&mut rx, Duration::from_secs(20)).await;
    assert!(leading);
    assert_eq!(leaders(&cells), 1);
    tasks.iter().for_each(|t| t.abort());
}
