//! What the tunnels heard of each node, shared (master role). A sample is folded in where it
//! arrives — the tunnel's session task, under its node's own lock — and costs no message: the
//! decider takes the fresh samples once per tick, NodeStatus reads the last one when asked.
//! Events (a node up or down, the hosts changed) stay messages; samples, a thousand a second
//! at 200 nodes × 5 Hz, are state.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

// The runtime's clock: the decider's (tests pause it).
use tokio::time::Instant;

use crate::hosts::HostKey;
use crate::report::CpuSample;

/// Fresh samples kept per node until the decider takes them, beyond what the node's hello says
/// it may resend at once (its buffer): far more than a tick brings at any sane report
/// interval. The oldest give way, so a decider that stalls costs memory bounded by this, not
/// by its stall.
pub const MAX_FRESH: usize = 1024;
/// Most of a node's resend buffer the book makes room for (the hello may say up to 100,000).
pub const MAX_BUFFER_ROOM: usize = 4096;

/// A sample not yet taken by the decider.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fresh {
    /// The agent run (hello's boot) it comes from.
    pub boot: u64,
    /// When the master read it.
    pub arrived: Instant,
    pub sample: CpuSample,
}

/// One node's samples as heard.
#[derive(Debug, Default)]
pub struct NodeHeard {
    fresh: VecDeque<Fresh>,
    /// The last sample and when it was read, and how many were read in all.
    pub last: Option<(CpuSample, Instant)>,
    pub count: u64,
}

impl NodeHeard {
    /// A new sample (duplicates already removed by the channel), keeping at most `buffer` +
    /// [`MAX_FRESH`] fresh ones; false when the oldest had to give way.
    pub fn push(&mut self, boot: u64, sample: CpuSample, buffer: usize) -> bool {
        let arrived = Instant::now();
        let mut kept_all = true;
        while self.fresh.len() >= buffer.min(MAX_BUFFER_ROOM) + MAX_FRESH {
            self.fresh.pop_front();
            kept_all = false;
        }
        self.fresh.push_back(Fresh {
            boot,
            arrived,
            sample,
        });
        self.last = Some((sample, arrived));
        self.count += 1;
        kept_all
    }
}

/// One node's share of the book, held by each of its report channels.
pub type Feed = Arc<Mutex<NodeHeard>>;

/// Every node's samples; cheap to clone (one book shared by the tunnels, the decider and
/// NodeStatus).
#[derive(Debug, Clone, Default)]
pub struct Heard(Arc<Mutex<HashMap<HostKey, Feed>>>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data, still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Heard {
    /// `host`'s feed, made on first use.
    pub fn feed(&self, host: &HostKey) -> Feed {
        lock(&self.0).entry(host.clone()).or_default().clone()
    }

    /// Forgets the hosts `keep` says no to (they left the registry).
    pub fn retain(&self, keep: impl Fn(&HostKey) -> bool) {
        lock(&self.0).retain(|k, _| keep(k));
    }

    /// Takes every node's fresh samples, oldest first.
    pub fn take_fresh(&self) -> Vec<(HostKey, Vec<Fresh>)> {
        let feeds: Vec<(HostKey, Feed)> = lock(&self.0)
            .iter()
            .map(|(k, f)| (k.clone(), f.clone()))
            .collect();
        feeds
            .into_iter()
            .filter_map(|(k, f)| {
                // Taken whole: a burst (a resent buffer) leaves no capacity behind.
                let fresh: Vec<Fresh> = std::mem::take(&mut lock(&f).fresh).into();
                (!fresh.is_empty()).then_some((k, fresh))
            })
            .collect()
    }

    /// Each node's last sample with when it was read, and its count.
    pub fn last(&self) -> HashMap<HostKey, (Option<(CpuSample, Instant)>, u64)> {
        lock(&self.0)
            .iter()
            .map(|(k, f)| {
                let h = lock(f);
                (k.clone(), (h.last, h.count))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::HostName;

    fn key(port: u16) -> HostKey {
        HostKey {
            host: HostName::parse("127.0.0.1").unwrap(),
            port,
        }
    }

    fn sample(seq: u64, busy_pct: f64) -> CpuSample {
        CpuSample {
            seq,
            ts_ms: 0,
            busy_pct,
            cores: 2,
            age_ms: 0,
        }
    }

    #[test]
    fn fresh_samples_are_taken_once_and_the_last_stays() {
        let heard = Heard::default();
        let feed = heard.feed(&key(80));
        assert!(lock(&feed).push(1, sample(1, 10.0), 0));
        assert!(lock(&feed).push(1, sample(2, 20.0), 0));
        let taken = heard.take_fresh();
        assert_eq!(taken.len(), 1);
        let seqs: Vec<u64> = taken[0].1.iter().map(|f| f.sample.seq).collect();
        assert_eq!(seqs, [1, 2]);
        assert!(heard.take_fresh().is_empty(), "taken twice");
        let last = heard.last();
        let (s, count) = &last[&key(80)];
        assert_eq!((s.unwrap().0.seq, *count), (2, 2));
    }

    #[test]
    fn an_untaken_feed_keeps_the_nodes_buffer_and_more_then_only_the_newest() {
        let heard = Heard::default();
        let feed = heard.feed(&key(80));
        let buffer = 3000;
        let cap = buffer + MAX_FRESH;
        let kept: Vec<bool> = (0..(cap as u64 + 10))
            .map(|seq| lock(&feed).push(1, sample(seq, 1.0), buffer))
            .collect();
        assert!(
            kept[..cap].iter().all(|k| *k),
            "a whole resent buffer is kept"
        );
        assert!(kept[cap..].iter().all(|k| !k), "then each push lets one go");
        let taken = heard.take_fresh();
        let fresh = &taken[0].1;
        assert_eq!(fresh.len(), cap);
        assert_eq!(fresh[0].sample.seq, 10);
        assert_eq!(heard.last()[&key(80)].1, cap as u64 + 10);
    }

    #[test]
    fn a_node_cannot_claim_an_unbounded_buffer() {
        let heard = Heard::default();
        let feed = heard.feed(&key(80));
        let cap = MAX_BUFFER_ROOM + MAX_FRESH;
        for seq in 0..(cap as u64 + 1) {
            lock(&feed).push(1, sample(seq, 1.0), 100_000);
        }
        assert_eq!(heard.take_fresh()[0].1.len(), cap);
    }

    #[test]
    fn hosts_that_left_are_forgotten_and_one_feed_is_shared() {
        let heard = Heard::default();
        let a = heard.feed(&key(80));
        assert!(Arc::ptr_eq(&a, &heard.feed(&key(80))));
        heard.feed(&key(81));
        heard.retain(|k| k.port == 81);
        assert_eq!(
            heard.last().keys().map(|k| k.port).collect::<Vec<_>>(),
            [81]
        );
    }
}
