//! The report channel's cost per sample on the master's side: decoding a `cpu` line alone,
//! and taking it on an authenticated channel (the MAC checked, the rate counted) — what the
//! protocol's authentication adds to every report.
//!
//! A target of the pure crate: `cargo bench -p autoscaler-core --bench report`.

use std::hint::black_box;

use autoscaler_core::report::{
    decode, encode, AgentChannel, CpuSample, Event, Frame, Hello, MasterChannel,
};
use criterion::{criterion_group, criterion_main, Criterion};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn sample(seq: u64) -> CpuSample {
    CpuSample {
        seq,
        ts_ms: 1_764_537_600_000 + seq * 1000,
        busy_pct: 42.5,
        cores: 8,
        age_ms: 0,
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("report");
    let plain = encode(&Frame::Cpu(sample(17)));
    g.bench_function("decode a cpu line", |b| {
        b.iter(|| decode(black_box(plain.trim_end().as_bytes())).unwrap())
    });
    let (mut m, challenge) = MasterChannel::open("tcp:9700");
    let hello = Hello {
        node: "web-1".into(),
        boot: 1,
        instance_id: None,
        uptime_ms: Some(3_600_000),
        interval_ms: 1000,
        buffer: 300,
        nonce: String::new(),
    };
    let (a, line) =
        AgentChannel::answer(challenge.trim_end().as_bytes(), "tcp:9700", hello, KEY).unwrap();
    let Ok(Event::Hello { .. }) = m.accept(line.trim_end().as_bytes(), &[KEY], 0) else {
        panic!("no hello")
    };
    let maced = a.sample(&sample(17));
    // Time moves a second per sample so the rate bound never refuses one.
    let mut now = 0u64;
    g.bench_function("accept a cpu line on an authenticated channel", |b| {
        b.iter(|| {
            now += 1000;
            m.accept(black_box(maced.trim_end().as_bytes()), &[], now)
                .unwrap()
        })
    });
    g.bench_function("make a cpu line (agent)", |b| {
        b.iter(|| a.sample(black_box(&sample(17))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
