//! A failure that lasts (etcd away, a store unreadable) is logged when it starts, again once
//! every `every` while it lasts, and when it ends — not at every retry. The caller logs; this
//! only says when, with the time given as input.

use std::time::{Duration, Instant};

/// What a failure at this moment should log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Say {
    /// The first failure after a success (or ever).
    Started,
    /// It still fails, for this long (whole seconds): the periodic reminder.
    Lasting(Duration),
}

/// An ongoing failure: since when, and when it was last logged.
#[derive(Debug, Clone)]
pub struct Outage {
    every: Duration,
    state: Option<(Instant, Instant)>,
}

impl Outage {
    /// Reminders every `every` while a failure lasts.
    pub fn new(every: Duration) -> Outage {
        Outage { every, state: None }
    }

    /// A failure at `now`: what to log, if anything.
    pub fn failed(&mut self, now: Instant) -> Option<Say> {
        match &mut self.state {
            None => {
                self.state = Some((now, now));
                Some(Say::Started)
            }
            Some((since, logged)) if now.duration_since(*logged) >= self.every => {
                *logged = now;
                Some(Say::Lasting(whole_seconds(now.duration_since(*since))))
            }
            Some(_) => None,
        }
    }

    /// A success at `now`: how long the failure it ends lasted (whole seconds), if one did.
    pub fn ended(&mut self, now: Instant) -> Option<Duration> {
        let (since, _) = self.state.take()?;
        Some(whole_seconds(now.duration_since(since)))
    }
}

fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn said_when_it_starts_once_per_period_and_when_it_ends() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut o = Outage::new(Duration::from_secs(60));
        assert_eq!(o.ended(at(0)), None, "nothing to end");
        assert_eq!(o.failed(at(0)), Some(Say::Started));
        assert_eq!(o.failed(at(1_000)), None);
        assert_eq!(o.failed(at(59_999)), None);
        assert_eq!(
            o.failed(at(60_500)),
            Some(Say::Lasting(Duration::from_secs(60)))
        );
        assert_eq!(
            o.failed(at(61_000)),
            None,
            "the next reminder a period later"
        );
        assert_eq!(
            o.failed(at(120_500)),
            Some(Say::Lasting(Duration::from_secs(120)))
        );
        assert_eq!(o.ended(at(125_900)), Some(Duration::from_secs(125)));
        assert_eq!(o.ended(at(126_000)), None);
        assert_eq!(o.failed(at(127_000)), Some(Say::Started), "a new outage");
    }
}
