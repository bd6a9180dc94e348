//! The master's side of a report channel fed arbitrary bytes: line splitting, decoding,
//! channel state and duplicate filtering must never panic, whatever a node sends.
#![no_main]

use autoscaler_core::report::{decode, ChannelState, Frame, LineBuffer, SeqFilter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut lines = LineBuffer::default();
    let mut state = ChannelState::default();
    let mut filter = SeqFilter::default();
    // Feed in two chunks to exercise lines split across reads.
    let (a, b) = data.split_at(data.len() / 2);
    for chunk in [a, b] {
        let Ok(complete) = lines.push(chunk) else { return };
        for line in complete {
            match decode(&line).and_then(|f| state.accept(f)) {
                Ok(Frame::Cpu(s)) => {
                    assert!((0.0..=100.0).contains(&s.busy_pct) && s.cores > 0);
                    let boot = state.hello().map_or(0, |h| h.boot);
                    filter.check(boot, s.seq);
                }
                Ok(Frame::Hello(_)) => {}
                Err(_) => return,
            }
        }
    }
});
