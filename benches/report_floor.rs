//! The floor under the master's CPU per report: what a tokio reader on the master's kind of
//! runtime (multi-thread, one worker per core) spends on a report-sized line arriving on a
//! loopback TCP connection when it does nothing with it. No SSH, no decoding: the `recv` copy,
//! epoll, the wake-up of a parked worker and tokio's I/O driver, which the master pays for
//! every report on top of russh's packet handling and its own (benches/master-fanin.sh). (On
//! loopback, TCP's receive processing runs in the writer's context, which is not counted,
//! just as the master's figure does not count sshd's.)
//!
//! N connections, each carrying RATE lines a second for DURATION seconds from a writer
//! thread, in two arrival patterns:
//! - burst: every connection's line at once, RATE times a second (as master-fanin.sh's
//!   generator writes, so reads batch: one wake-up serves many lines);
//! - spread: the lines evenly spaced, as independent nodes report (a wake-up per line).
//!
//! CPU is the runtime's worker threads' (utime + stime from /proc, in 10 ms ticks: with
//! 20,000 lines, 0.5 µs per line), not the writer's.
//! Usage: `cargo bench --bench report-floor -- [N=200] [RATE=5] [DURATION=20]`; a filter
//! that does not name this bench (`cargo bench -- render`) skips it.
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

#[path = "report_load.rs"]
mod report_load;
use report_load::{Load, Run, LINE};

const WORKER: &str = "floor-worker";

fn main() {
    let Some(load) = Load::from_args("report-floor") else {
        return;
    };
    for spread in [false, true] {
        run(load.n, load.rate, load.dur, spread).report(&load, "connections", spread);
    }
}

fn run(n: usize, rate: u64, dur: Duration, spread: bool) -> Run {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(WORKER)
        .build()
        .expect("tokio runtime");
    let read = Arc::new(AtomicU64::new(0));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("listen on loopback");
    let addr = listener.local_addr().expect("local address");
    let counter = read.clone();
    rt.spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::with_capacity(4096, socket).lines();
                while let Ok(Some(_)) = lines.next_line().await {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let mut conns: Vec<TcpStream> = (0..n)
        .map(|_| {
            let c = TcpStream::connect(addr).expect("connect to the reader");
            c.set_nodelay(true).expect("TCP_NODELAY");
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (cpu0, sw0) = report_load::threads(WORKER);
    let start = Instant::now();
    let period = Duration::from_secs(1) / rate as u32;
    let mut sent = 0u64;
    let mut tick = start;
    while tick - start < dur {
        for (i, c) in conns.iter_mut().enumerate() {
            c.write_all(LINE).expect("write a line");
            sent += 1;
            if spread {
                pause_until(tick + period * (i as u32 + 1) / n as u32);
            }
        }
        tick += period;
        pause_until(tick);
    }
    // Every line in before the count stops (bounded: 5 s).
    let deadline = Instant::now() + Duration::from_secs(5);
    while read.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (cpu1, sw1) = report_load::threads(WORKER);
    drop(conns);
    rt.shutdown_timeout(Duration::from_secs(1));
    Run {
        sent,
        read: read.load(Ordering::Relaxed),
        cpu: cpu1.saturating_sub(cpu0),
        switches: sw1.saturating_sub(sw0),
    }
}

fn pause_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}
