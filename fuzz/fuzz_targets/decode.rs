//! Both ends of a report channel fed arbitrary bytes: line splitting, decoding, the MAC
//! checks, the hello and welcome, the rate bound and the duplicate filter must never panic,
//! and nothing the input says may pass as the agent's unless it carries the session's MAC.
//!
//! The first byte picks the stage fuzzed: the master before the hello (arbitrary lines where
//! the agent's hello should be), the master after a real handshake (arbitrary lines where
//! samples should be), or the agent (an arbitrary challenge and welcome).
#![no_main]

use autoscaler_core::report::{
    AgentChannel, Event, Hello, LineBuffer, MasterChannel, SeqFilter,
};
use libfuzzer_sys::fuzz_target;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
const VIA: &str = "tcp:9700";

fn hello() -> Hello {
    Hello {
        node: "web-1".into(),
        boot: 42,
        instance_id: None,
        uptime_ms: Some(3_600_000),
        interval_ms: 1000,
        buffer: 4,
        nonce: String::new(),
    }
}

/// Feeds `data` to the master's channel in two chunks (lines split across reads).
fn feed(m: &mut MasterChannel, data: &[u8]) {
    let mut lines = LineBuffer::default();
    let mut filter = SeqFilter::default();
    let (a, b) = data.split_at(data.len() / 2);
    for (i, chunk) in [a, b].into_iter().enumerate() {
        let now = i as u64 * 1000;
        let _ = lines.each(chunk, |line| {
            match m.accept(line, &[KEY], now)? {
                Event::Hello { .. } => {
                    // Only a hello made with the key proves it; the fuzzer has no key.
                    panic!("an arbitrary line proved the secret: {line:?}");
                }
                Event::Sample(_) => {
                    // Only the session's MAC makes a sample, and the fuzzer cannot make one.
                    panic!("an arbitrary line passed as the agent's sample: {line:?}");
                }
            }
        });
        if let Some(h) = m.hello() {
            let _ = filter.check(h, u64::from(chunk.first().copied().unwrap_or(0)), now);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&stage, rest)) = data.split_first() else {
        return;
    };
    match stage % 3 {
        0 => {
            let (mut m, _) = MasterChannel::open(VIA);
            feed(&mut m, rest);
        }
        1 => {
            let (mut m, challenge) = MasterChannel::open(VIA);
            let (_a, line) =
                AgentChannel::answer(challenge.trim_end().as_bytes(), VIA, hello(), KEY).unwrap();
            assert!(matches!(
                m.accept(line.trim_end().as_bytes(), &[KEY], 0),
                Ok(Event::Hello { .. })
            ));
            feed(&mut m, rest);
        }
        _ => {
            let mut lines = LineBuffer::default();
            let Ok(got) = lines.push(rest) else { return };
            let mut it = got.into_iter();
            let Some(challenge) = it.next() else { return };
            if let Ok((mut a, _)) = AgentChannel::answer(&challenge, VIA, hello(), KEY) {
                if let Some(welcome) = it.next() {
                    // A welcome the fuzzer made cannot prove the key.
                    assert!(a.welcome(&welcome).is_err());
                }
            }
        }
    }
});
