//! CpuSampler (node role): reads this machine's busy CPU with sysinfo on a timer and sends a
//! numbered [`CpuSampled`] per tick.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::{Actor, AsyncContext, Context, Recipient};
use slog::{debug, o, Logger};
use sysinfo::{CpuRefreshKind, RefreshKind, System};

use super::report_link::CpuSampled;
use crate::report::CpuSample;

/// Samples busy CPU (everything but idle and iowait, over all cores) every `interval`.
pub struct CpuSampler {
    sys: System,
    interval: Duration,
    seq: u64,
    out: Vec<Recipient<CpuSampled>>,
    log: Logger,
}

impl CpuSampler {
    /// A sampler that sends each sample to every one of `out`. `interval` must be at least 200 ms (config validation
    /// ensures it): closer readings are meaningless.
    pub fn new(
        interval: Duration,
        out: Vec<Recipient<CpuSampled>>,
        log: &Logger,
    ) -> Result<CpuSampler, sysinfo::Error> {
        Ok(CpuSampler {
            sys: System::new_with_specifics(
                RefreshKind::nothing().with_cpu(CpuRefreshKind::nothing().with_usage()),
            )?,
            interval,
            seq: 0,
            out,
            log: log.new(o!("actor" => "CpuSampler")),
        })
    }

    fn sample(&mut self) -> CpuSample {
        self.sys.refresh_cpu_usage();
        let busy = f64::from(self.sys.global_cpu_usage());
        let sample = CpuSample {
            seq: self.seq,
            ts_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            // sysinfo can report a hair outside 0-100 from counter skew; the protocol cannot.
            busy_pct: if busy.is_finite() {
                busy.clamp(0.0, 100.0)
            } else {
                0.0
            },
            cores: self.sys.cpus().len().max(1) as u32,
            age_ms: 0,
        };
        self.seq += 1;
        sample
    }
}

impl Actor for CpuSampler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // The first reading has no previous one to compare with: take it now and discard it.
        self.sys.refresh_cpu_usage();
        debug!(self.log, "Sampling CPU"; "interval" => %humantime::format_duration(self.interval));
        ctx.run_interval(self.interval, |this, _| {
            let sample = this.sample();
            this.out.iter().for_each(|o| o.do_send(CpuSampled(sample)));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix::{Handler, Message};
    use tokio::sync::mpsc;

    struct Collect(mpsc::UnboundedSender<CpuSample>);
    impl Actor for Collect {
        type Context = Context<Self>;
    }
    impl Handler<CpuSampled> for Collect {
        type Result = <CpuSampled as Message>::Result;
        fn handle(&mut self, m: CpuSampled, _: &mut Context<Self>) {
            let _ = self.0.send(m.0);
        }
    }

    /// Real sysinfo readings: numbered from 0, in range, with this machine's core count.
    #[actix_rt::test]
    async fn samples_are_numbered_and_in_range() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink = Collect(tx).start();
        let log = Logger::root(slog::Discard, o!());
        let _sampler = CpuSampler::new(Duration::from_millis(200), vec![sink.recipient()], &log)
            .unwrap()
            .start();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        for want in 0..3 {
            let s = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(s.seq, want);
            assert!((0.0..=100.0).contains(&s.busy_pct), "{s:?}");
            assert_eq!(s.cores, cores);
            assert!(s.ts_ms > 1_700_000_000_000);
        }
    }
}
