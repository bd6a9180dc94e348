//! The host registry's cost: one write to hosts.d (one master) against one write to etcd
//! guarded by the leader's lease (several masters, `[cluster]`), each next to 1,000
//! registered hosts; and the decider's memory, written after every acting decision.
//!
//! etcd (Debian's etcd-server) is started here on loopback, its data in a temp dir, as the
//! tests do; without it the etcd cases are skipped with a message.
//! `cargo bench -p autoscaler --bench store`

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use autoscaler_actors::adapters::etcd::{Etcd, Lead};
use autoscaler_actors::adapters::host_store::HostStore;
use autoscaler_actors::adapters::hosts_dir::HostsDir;
use autoscaler_actors::adapters::records::Records;
use autoscaler_actors::config::{Config, Layout, Role};
use autoscaler_actors::hosts::{Host, HostName};
use criterion::{criterion_group, criterion_main, Criterion};

const REGISTERED: u32 = 1_000;

fn host(i: u32) -> Host {
    Host::manual(
        HostName::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 2, 0, 0)) + i)),
        8080,
    )
}

/// The member and its data directory (removed after it is killed).
struct EtcdProc {
    child: Child,
    _data: tempfile::TempDir,
}

impl Drop for EtcdProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A one-member etcd on loopback, or None (with a message) when it is not installed.
fn start_etcd() -> Option<(EtcdProc, String)> {
    let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(bin) = bin else {
        eprintln!("SKIPPED: etcd is not installed (scripts/install-deps.sh installs etcd-server)");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let (c, p) = (free_port(), free_port());
    let child = Command::new(bin)
        .args(["--name", "b", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &format!("http://127.0.0.1:{c}")])
        .args(["--advertise-client-urls", &format!("http://127.0.0.1:{c}")])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{p}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{p}"),
        ])
        .args(["--initial-cluster", &format!("b=http://127.0.0.1:{p}")])
        .args(["--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Some((
        EtcdProc { child, _data: dir },
        format!("http://127.0.0.1:{c}"),
    ))
}

fn registry_writes(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("registry_write");
    group.sample_size(30);

    // hosts.d: a file written atomically (temp file, fsync, rename) and one removed.
    let dir = tempfile::tempdir().unwrap();
    let hosts_d = HostsDir::new(dir.path().join("hosts.d"));
    for i in 0..REGISTERED {
        hosts_d.add(&host(i)).unwrap();
    }
    // The master's poll of hosts.d, once a second: by a fresh reader (every file stat'ed,
    // read and parsed: the cost before the stamp cache, plus a statx and a clone per file),
    // and with nothing changed since the last poll.
    group.bench_function("hosts.d load 1,000 hosts, first", |b| {
        b.iter(|| HostsDir::new(hosts_d.path()).load().unwrap().0.len())
    });
    // Settled: older than the window in which a file is read whatever its stamp.
    std::thread::sleep(Duration::from_millis(2100));
    hosts_d.load().unwrap();
    group.bench_function("hosts.d load 1,000 hosts, unchanged", |b| {
        b.iter(|| hosts_d.load().unwrap().0.len())
    });
    let store = HostStore::Dir(hosts_d);
    let extra = host(REGISTERED + 1);
    group.bench_function("hosts.d add+remove", |b| {
        b.iter(|| {
            rt.block_on(async {
                store.add(&extra).await.unwrap();
                store.remove(&extra.key()).await.unwrap();
            })
        })
    });

    let Some((_etcd, endpoint)) = start_etcd() else {
        return;
    };
    let mut cluster = Config::defaults(&Layout::for_dir(Path::new("/srv/b")), Role::Master).cluster;
    cluster.etcd_endpoints = vec![endpoint];
    cluster.group = "bench".into();
    let (etcd, lead) = rt.block_on(async {
        let end = Instant::now() + Duration::from_secs(20);
        let etcd = loop {
            match Etcd::connect(&cluster, Some(Duration::from_secs(2))).await {
                Ok(e) if e.leader().await.is_ok() => break e,
                _ if Instant::now() < end => tokio::time::sleep(Duration::from_millis(100)).await,
                other => panic!("etcd never answered: {:?}", other.err()),
            }
        };
        let mut client = etcd.client();
        let lease = client.lease_grant(60, None).await.unwrap().id();
        let won = client.campaign(etcd.election(), "b", lease).await.unwrap();
        let key = won.leader().unwrap().clone();
        let lead = Lead {
            key: key.key().to_vec(),
            rev: key.rev(),
            lease,
            valid_until: std::time::Instant::now() + std::time::Duration::from_secs(3600),
        };
        (etcd, lead)
    });
    let cell = Arc::new(RwLock::new(Some(lead)));
    let store = HostStore::Etcd {
        etcd: etcd.clone(),
        lead: Some(cell.clone()),
    };
    rt.block_on(async {
        for i in 0..REGISTERED {
            store.add(&host(i)).await.unwrap();
        }
    });
    group.bench_function("etcd add+remove (lease-guarded)", |b| {
        b.iter(|| {
            rt.block_on(async {
                store.add(&extra).await.unwrap();
                store.remove(&extra.key()).await.unwrap();
            })
        })
    });
    group.bench_function("etcd list 1,000 hosts", |b| {
        b.iter(|| rt.block_on(async { store.load().await.unwrap().0.len() }))
    });
    group.finish();

    // The decider's memory after an acting decision.
    let mut group = c.benchmark_group("decider_memory_write");
    group.sample_size(30);
    let memory = serde_json::json!({"launches_ms": [1, 2, 3], "last_scale_up_ms": 3});
    let files = Records::Files(dir.path().join("state"));
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    group.bench_function("state_dir", |b| {
        b.iter(|| rt.block_on(files.put("", "decider", &memory)).unwrap())
    });
    let shared = Records::Etcd { etcd, lead: cell };
    group.bench_function("etcd (lease-guarded)", |b| {
        b.iter(|| rt.block_on(shared.put("", "decider", &memory)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, registry_writes);
criterion_main!(benches);
