//! What the report benches (report-floor, report-ssh) share: the report line they send, their
//! command line, how a run is printed and checked, and the CPU of a runtime's workers only.
use std::time::Duration;

/// A report frame as the agent sends it (protocol v2), newline included.
pub const LINE: &[u8] = b"{\"v\":2,\"type\":\"cpu\",\"seq\":1234,\"ts_ms\":1764700000000,\"busy_pct\":42.0,\"cores\":2,\"mac\":\"00112233445566778899aabbccddeeff\"}\n";

/// N connections, each carrying RATE lines a second for DURATION seconds.
pub struct Load {
    pub n: usize,
    pub rate: u64,
    pub dur: Duration,
}

impl Load {
    /// `[N=200] [RATE=5] [DURATION=20]` from the command line; None when `cargo bench --
    /// FILTER` hands this bench a filter that does not name `bench`.
    pub fn from_args(bench: &str) -> Option<Load> {
        let words: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with('-'))
            .collect();
        if let Some(filter) = words.iter().find(|w| w.parse::<u64>().is_err()) {
            if !bench.contains(filter.as_str()) {
                return None;
            }
        }
        let args: Vec<u64> = words.iter().filter_map(|w| w.parse().ok()).collect();
        let arg = |i: usize, default: u64| args.get(i).copied().unwrap_or(default);
        let (n, rate, secs) = (arg(0, 200), arg(1, 5), arg(2, 20));
        assert!(
            n > 0 && rate > 0 && secs > 0,
            "N, RATE and DURATION must be positive"
        );
        Some(Load {
            n: n as usize,
            rate,
            dur: Duration::from_secs(secs),
        })
    }
}

/// What one run sent and read, and what it cost the counted workers.
pub struct Run {
    pub sent: u64,
    pub read: u64,
    pub cpu: Duration,
    pub switches: u64,
}

impl Run {
    /// Prints the run (`what`: the connections' kind) and checks that every line was read.
    pub fn report(&self, load: &Load, what: &str, spread: bool) {
        println!(
            "{:>6}: {} {what} x {} Hz, {} s: {} lines read of {}, worker CPU {:.3} s = {:.1} us per line, {:.2} context switches per line",
            if spread { "spread" } else { "burst" },
            load.n,
            load.rate,
            load.dur.as_secs(),
            self.read,
            self.sent,
            self.cpu.as_secs_f64(),
            self.cpu.as_secs_f64() * 1e6 / self.read.max(1) as f64,
            self.switches as f64 / self.read.max(1) as f64,
        );
        if self.cpu < Duration::from_millis(100) {
            println!("        under 10 ticks of CPU: too short a run to read (raise N, RATE or DURATION)");
        }
        assert_eq!(self.read, self.sent, "every line sent is read");
    }
}

/// utime + stime (in USER_HZ ticks: 10 ms) and context switches of every thread of this
/// process named `name`.
pub fn threads(name: &str) -> (Duration, u64) {
    let tick = 100.0; // USER_HZ: 100 on every Linux architecture the project builds for
    let (mut ticks, mut switches) = (0u64, 0u64);
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = task.expect("a task").path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).expect("task stat");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat has a comm")
            .1
            .split_whitespace()
            .collect();
        ticks +=
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        let status = std::fs::read_to_string(dir.join("status")).expect("task status");
        for l in status.lines() {
            if l.starts_with("voluntary_ctxt_switches")
                || l.starts_with("nonvoluntary_ctxt_switches")
            {
                switches += l
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
            }
        }
    }
    (Duration::from_secs_f64(ticks as f64 / tick), switches)
}
