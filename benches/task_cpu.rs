//! CPU time and context switches of this process's threads of one name, from /proc (shared
//! by the benches that count a runtime's workers only).
use std::time::Duration;

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
