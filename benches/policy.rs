//! The policy's cost: one decision over a fleet (the master runs one every second), and a
//! day of recorded load replayed by `autoscaler simulate`.
//!
//! A target of the pure crate: `cargo bench -p autoscaler-core --bench policy`.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use autoscaler_core::config::{Config, Layout, Role, Scaling};
use autoscaler_core::hosts::{HostKey, HostName};
use autoscaler_core::policy::{decide, History, NodeInput};
use autoscaler_core::simulate::{self, Settings, Trace};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn scaling() -> Scaling {
    let mut s =
        Config::defaults(&Layout::for_dir(Path::new("/etc/autoscaler")), Role::Master).scaling;
    s.dry_run = false;
    s
}

/// `n` nodes, each with the samples the decider keeps at the defaults (one a second over the
/// 10-minute scale-down window plus staleness): 610 samples, a steady 40-60 %.
fn fleet(n: u32, now: u64) -> Vec<NodeInput> {
    (0..n)
        .map(|i| NodeInput {
            key: HostKey {
                host: HostName::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 0)) + i)),
                port: 8080,
            },
            up: true,
            born_ms: Some(0),
            samples: (0..610u64)
                .map(|s| {
                    (
                        now - (609 - s) * 1000,
                        40.0 + ((s * 7 + u64::from(i)) % 20) as f64,
                    )
                })
                .collect(),
            launched: i % 2 == 0,
            registered_ms: u64::from(i),
        })
        .collect()
}

fn one_decision(c: &mut Criterion) {
    let cfg = scaling();
    let now = 24 * 3_600_000;
    let hist = History::default();
    let mut group = c.benchmark_group("decide");
    for n in [10u32, 100, 1_000] {
        let nodes = fleet(n, now);
        group.bench_with_input(BenchmarkId::from_parameter(n), &nodes, |b, nodes| {
            b.iter(|| decide(black_box(&cfg), black_box(nodes), &hist, now))
        });
    }
    group.finish();
}

fn replay_a_day(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/traces/daily.csv");
    let trace = Trace::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cfg = scaling();
    let mut group = c.benchmark_group("simulate");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    group.bench_function("daily.csv (24 h, 3 nodes)", |b| {
        b.iter(|| simulate::run(black_box(&cfg), &trace, &Settings::default()))
    });
    group.finish();
}

criterion_group!(benches, one_decision, replay_a_day);
criterion_main!(benches);
