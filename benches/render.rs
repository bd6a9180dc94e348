//! Rendering haproxy.cfg for large fleets. Goal: rendering is under 1 % of HAProxy's own
//! `haproxy -c` time on the same file (benches/haproxy-check.sh measures that side).
//!
//! A target of the pure crate (`cargo bench -p autoscaler-core --bench render`), so it builds
//! without the AWS SDK or SSH stack.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::path::Path;

use autoscaler_core::config::{Config, Layout, Role};
use autoscaler_core::hosts::{Host, HostName};
use autoscaler_core::render::{HaproxyContext, HaproxyTemplate};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

/// `n` distinct loopback hosts, shuffled deterministically so sorting is part of the work.
fn hosts(n: u32) -> Vec<Host> {
    let mut v: Vec<Host> = (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 0)) + i);
            Host::manual(HostName::V4(ip), 8080)
        })
        .collect();
    // A fixed permutation (multiplicative step coprime with n).
    let len = v.len();
    let mut shuffled = Vec::with_capacity(len);
    for i in 0..len {
        shuffled.push(v[(i * 7919) % len].clone());
    }
    v.clear();
    shuffled
}

fn render(c: &mut Criterion) {
    let cfg = Config::defaults(&Layout::for_dir(Path::new("/etc/autoscaler")), Role::Master);
    let template = HaproxyTemplate::load(None).unwrap();
    let mut group = c.benchmark_group("render_haproxy");
    for n in [100u32, 1_000, 10_000] {
        let hosts = hosts(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &hosts, |b, hosts| {
            b.iter(|| {
                let ctx = HaproxyContext::new(
                    &cfg.haproxy,
                    &cfg.general.hosts_dir,
                    black_box(hosts),
                    &|_| None,
                );
                template.render(&ctx).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = render
}
criterion_main!(benches);
