//! The node → master report protocol: newline-delimited JSON, one versioned frame per line.
//!
//! ```text
//! {"v":1,"type":"hello","node":"web-1","boot":8812734,"instance_id":"i-0abc","uptime_ms":93000}
//! {"v":1,"type":"cpu","seq":17,"ts_ms":1764537600000,"busy_pct":73.2,"cores":2}
//! {"v":1,"type":"cpu","seq":16,"ts_ms":1764537599000,"busy_pct":70.1,"cores":2,"age_ms":61000}
//! ```
//!
//! `age_ms` (optional, default 0) marks a sample resent from the node's buffer: how long ago,
//! on the node's clock, it was taken.
//!
//! **Authentication.** The master opens every channel with a challenge, and the agent's hello
//! answers it:
//!
//! ```text
//! master → node  {"v":1,"type":"challenge","nonce":"9f0c…(64 hex digits)"}
//! node → master  {"v":1,"type":"hello","node":"web-1","boot":8812734,"mac":"3a7e…"}
//! ```
//!
//! `mac` is HMAC-SHA256, keyed with the report secret (`[node] secret_file`, readable only by
//! the agent's user on a node), over the nonce, the node name and `boot` ([`auth_tag`]). A
//! local user of the node who can connect to the forwarded port but cannot read the secret
//! cannot produce it, and a captured hello does not answer another nonce.
//!
//! A channel starts with one `hello`; `boot` changes whenever the node agent restarts, so its
//! sequence numbers can start again from 0. `uptime_ms` (optional) is how long the node's
//! machine has been up: the master's warm-up counts from the node's boot. The node resends its buffer after every reconnect,
//! so the master drops samples it has already seen ([`SeqFilter`]). Anything malformed — an
//! oversized line, invalid UTF-8, an unknown version or type, an impossible value — is a
//! [`DecodeError`] that closes that one channel; it never panics and never touches other nodes.

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// Longest accepted line, newline excluded. Real frames are under 200 bytes.
pub const MAX_LINE: usize = 4096;

/// One CPU reading of a node.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CpuSample {
    /// Increases by one per sample since the agent started (see `boot`).
    pub seq: u64,
    /// When the sample was taken, milliseconds since the Unix epoch (node clock).
    pub ts_ms: u64,
    /// Busy CPU over all cores: everything but idle and iowait, 0–100.
    pub busy_pct: f64,
    /// Number of logical cores.
    pub cores: u32,
    /// How old the sample was when it was written to the link, on the node's own clock; 0 for a
    /// live sample, more for one resent from the buffer after an outage. Lets the master place
    /// it in time without comparing the two machines' clocks.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub age_ms: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The first frame on a channel: who is reporting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The node's name for itself (host name or `[node] name`).
    pub node: String,
    /// Identifies one run of the node agent; sequence numbers restart when it changes.
    pub boot: u64,
    /// The node's instance id, when it knows one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// How long the node's machine has been up when it sent this hello. Warm-up is about
    /// young machines: the master counts it from the node's own boot, not from when it first
    /// heard the node (which a master restart or an SSH blip would reset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// The answer to the channel's challenge ([`auth_tag`]), in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// The master's first line on a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// 32 random bytes in hex, fresh for every channel.
    pub nonce: String,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Frame {
    Hello(Hello),
    Cpu(CpuSample),
    /// Master → node only.
    Challenge(Challenge),
}

#[derive(Serialize)]
struct Envelope<'a> {
    v: u32,
    #[serde(flatten)]
    frame: &'a Frame,
}

/// Why a line was refused. Each closes the channel it arrived on.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum DecodeError {
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("line is not valid UTF-8")]
    NotUtf8,
    #[error("line is not a JSON object: {0}")]
    NotJson(String),
    #[error("missing or non-numeric protocol version \"v\"")]
    NoVersion,
    #[error("unsupported protocol version {0} (this master speaks {VERSION})")]
    Version(u64),
    #[error("bad frame: {0}")]
    BadFrame(String),
    #[error("busy_pct {0} is not a number between 0 and 100")]
    BadBusy(f64),
    #[error("cores must be at least 1")]
    NoCores,
    #[error("hello: {0}")]
    BadHello(String),
    #[error("first frame must be a hello")]
    NoHello,
    #[error("second hello on the same channel")]
    RepeatedHello,
    #[error("a challenge is the master's to send")]
    UnexpectedChallenge,
}

/// Encodes a frame as one line, newline included.
pub fn encode(frame: &Frame) -> String {
    let mut s = serde_json::to_string(&Envelope { v: VERSION, frame })
        .expect("frames always serialise (finite numbers, string keys)");
    s.push('\n');
    s
}

/// Decodes one line (without its newline; a trailing `\r` is tolerated).
pub fn decode(line: &[u8]) -> Result<Frame, DecodeError> {
    if line.len() > MAX_LINE {
        return Err(DecodeError::TooLong);
    }
    let text = std::str::from_utf8(line).map_err(|_| DecodeError::NotUtf8)?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let obj = value
        .as_object()
        .ok_or_else(|| DecodeError::NotJson("not an object".into()))?;
    match obj.get("v").and_then(serde_json::Value::as_u64) {
        None => return Err(DecodeError::NoVersion),
        Some(v) if v != u64::from(VERSION) => return Err(DecodeError::Version(v)),
        Some(_) => {}
    }
    let frame: Frame =
        serde_json::from_value(value).map_err(|e| DecodeError::BadFrame(e.to_string()))?;
    match &frame {
        Frame::Cpu(s) if !(s.busy_pct.is_finite() && (0.0..=100.0).contains(&s.busy_pct)) => {
            Err(DecodeError::BadBusy(s.busy_pct))
        }
        Frame::Cpu(s) if s.cores == 0 => Err(DecodeError::NoCores),
        Frame::Hello(h)
            if h.node.is_empty() || h.node.len() > 255 || h.node.chars().any(char::is_control) =>
        {
            Err(DecodeError::BadHello(
                "node must be 1-255 printable characters".into(),
            ))
        }
        Frame::Hello(h)
            if h.instance_id
                .as_deref()
                .is_some_and(|i| crate::hosts::validate_instance_id(i).is_err()) =>
        {
            Err(DecodeError::BadHello(
                "instance_id is not a valid instance id".into(),
            ))
        }
        _ => Ok(frame),
    }
}

/// Per-channel state: a hello first, then samples.
#[derive(Debug, Default)]
pub struct ChannelState {
    hello: Option<Hello>,
}

impl ChannelState {
    /// Checks the frame against the channel's history.
    pub fn accept(&mut self, frame: Frame) -> Result<Frame, DecodeError> {
        match (&self.hello, &frame) {
            (None, Frame::Hello(h)) => {
                self.hello = Some(h.clone());
                Ok(frame)
            }
            (None, Frame::Cpu(_)) => Err(DecodeError::NoHello),
            (Some(_), Frame::Hello(_)) => Err(DecodeError::RepeatedHello),
            (Some(_), Frame::Cpu(_)) => Ok(frame),
            (_, Frame::Challenge(_)) => Err(DecodeError::UnexpectedChallenge),
        }
    }

    /// The hello received on this channel.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }
}

/// A fresh challenge nonce: 32 random bytes in hex.
pub fn new_nonce() -> String {
    hex(&rand::random::<[u8; 32]>())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn mac_over(secret: &[u8], nonce: &str, node: &str, boot: u64) -> Hmac<Sha256> {
    let mut m =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes keys of any length");
    // Length-prefixed fields: no two (nonce, node, boot) make the same message.
    for field in [nonce.as_bytes(), node.as_bytes(), &boot.to_be_bytes()] {
        m.update(&(field.len() as u64).to_be_bytes());
        m.update(field);
    }
    m
}

/// The `mac` an agent holding `secret` puts in its hello to answer `nonce`.
pub fn auth_tag(secret: &[u8], nonce: &str, hello: &Hello) -> String {
    hex(&mac_over(secret, nonce, &hello.node, hello.boot)
        .finalize()
        .into_bytes())
}

/// Whether `hello` answers `nonce` with `secret` (compared in constant time).
pub fn verify_hello(secret: &[u8], nonce: &str, hello: &Hello) -> bool {
    let Some(tag) = hello.mac.as_deref().and_then(unhex) else {
        return false;
    };
    mac_over(secret, nonce, &hello.node, hello.boot)
        .verify_slice(&tag)
        .is_ok()
}

/// Drops samples a node sends again (after a reconnect it resends its buffer) or out of order.
/// Kept per host across channels; a new `boot` starts the count again.
#[derive(Debug, Default, Clone)]
pub struct SeqFilter {
    last: Option<(u64, u64)>,
}

/// What [`SeqFilter::check`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// A new sample; `gap` samples were never received before it.
    New { gap: u64 },
    /// Already seen, or older than one already seen: dropped.
    Old,
}

impl SeqFilter {
    /// Records `seq` of run `boot` if it is new.
    pub fn check(&mut self, boot: u64, seq: u64) -> SeqVerdict {
        match self.last {
            Some((b, last)) if b == boot && seq <= last => SeqVerdict::Old,
            Some((b, last)) if b == boot => {
                self.last = Some((boot, seq));
                SeqVerdict::New {
                    gap: seq - last - 1,
                }
            }
            _ => {
                self.last = Some((boot, seq));
                SeqVerdict::New { gap: 0 }
            }
        }
    }
}

/// Splits a byte stream into lines with a length limit; a line over the limit is an error as
/// soon as the limit is passed, without buffering the rest of it.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
}

impl LineBuffer {
    /// Appends bytes and returns every complete line (newline stripped).
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, DecodeError> {
        let mut lines = Vec::new();
        for chunk in bytes.split_inclusive(|&b| b == b'\n') {
            match chunk.strip_suffix(b"\n") {
                Some(rest) => {
                    self.buf.extend_from_slice(rest);
                    if self.buf.len() > MAX_LINE {
                        return Err(DecodeError::TooLong);
                    }
                    lines.push(std::mem::take(&mut self.buf));
                }
                None => {
                    self.buf.extend_from_slice(chunk);
                    if self.buf.len() > MAX_LINE {
                        return Err(DecodeError::TooLong);
                    }
                }
            }
        }
        Ok(lines)
    }

    /// Bytes of an unfinished line (non-empty at end of stream means a truncated frame).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(seq: u64, busy: f64) -> Frame {
        Frame::Cpu(CpuSample {
            seq,
            ts_ms: 1_764_537_600_000u64.wrapping_add(seq),
            busy_pct: busy,
            cores: 2,
            age_ms: seq % 3 * 1000,
        })
    }

    fn hello() -> Frame {
        Frame::Hello(Hello {
            node: "web-1".into(),
            boot: 42,
            instance_id: Some("i-0abc".into()),
            uptime_ms: Some(93_000),
            mac: None,
        })
    }

    #[test]
    fn round_trip() {
        for f in [hello(), cpu(0, 0.0), cpu(17, 73.2), cpu(u64::MAX, 100.0)] {
            let line = encode(&f);
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
            assert!(line.starts_with("{\"v\":1,"), "{line}");
            assert_eq!(decode(line.trim_end().as_bytes()).unwrap(), f);
        }
        let h = Frame::Hello(Hello {
            node: "n".into(),
            boot: 1,
            instance_id: None,
            uptime_ms: None,
            mac: None,
        });
        assert_eq!(
            encode(&h),
            "{\"v\":1,\"type\":\"hello\",\"node\":\"n\",\"boot\":1}\n"
        );
    }

    #[test]
    fn accepts_documented_examples_and_unknown_fields() {
        let ok = [
            r#"{"v":1,"type":"cpu","seq":17,"ts_ms":1764537600000,"busy_pct":73.2,"cores":2}"#,
            r#"{"type":"cpu","v":1,"seq":17,"ts_ms":1,"busy_pct":73,"cores":2,"future":"field"}"#,
            "{\"v\":1,\"type\":\"hello\",\"node\":\"10.0.0.5:80\",\"boot\":7}\r",
        ];
        for line in ok {
            decode(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }

    #[test]
    fn refuses_bad_lines() {
        let long = format!(
            r#"{{"v":1,"type":"hello","node":"{}","boot":1}}"#,
            "a".repeat(MAX_LINE)
        );
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (long.into_bytes(), "longer than"),
            (b"\xff\xfe{}".to_vec(), "UTF-8"),
            (
                br#"{"v":1,"type":"cpu","seq":1,"#.to_vec(),
                "not a JSON object",
            ),
            (b"".to_vec(), "not a JSON object"),
            (b"[1,2]".to_vec(), "not a JSON object"),
            (b"garbage".to_vec(), "not a JSON object"),
            (
                br#"{"type":"cpu","seq":1,"ts_ms":1,"busy_pct":1,"cores":1}"#.to_vec(),
                "version",
            ),
            (br#"{"v":"1","type":"cpu"}"#.to_vec(), "version"),
            (
                br#"{"v":2,"type":"cpu","seq":1,"ts_ms":1,"busy_pct":1,"cores":1}"#.to_vec(),
                "unsupported protocol version 2",
            ),
            (br#"{"v":1,"type":"mem","seq":1}"#.to_vec(), "bad frame"),
            (
                br#"{"v":1,"seq":1,"ts_ms":1,"busy_pct":1,"cores":1}"#.to_vec(),
                "bad frame",
            ),
            (
                br#"{"v":1,"type":"cpu","seq":-1,"ts_ms":1,"busy_pct":1,"cores":1}"#.to_vec(),
                "bad frame",
            ),
            (
                br#"{"v":1,"type":"cpu","seq":1,"ts_ms":1,"busy_pct":"high","cores":1}"#.to_vec(),
                "bad frame",
            ),
            (
                br#"{"v":1,"type":"cpu","seq":1,"ts_ms":1,"cores":1}"#.to_vec(),
                "bad frame",
            ),
            (
                br#"{"v":1,"type":"cpu","seq":1,"ts_ms":1,"busy_pct":-0.1,"cores":1}"#.to_vec(),
                "busy_pct -0.1",
            ),
            (
                br#"{"v":1,"type":"cpu","seq":1,"ts_ms":1,"busy_pct":100.01,"cores":1}"#.to_vec(),
                "busy_pct 100.01",
            ),
            (
                br#"{"v":1,"type":"cpu","seq":1,"ts_ms":1,"busy_pct":1e999,"cores":1}"#.to_vec(),
                "not a JSON object",
            ),
            (
                br#"{"v":1,"type":"cpu","seq":1,"ts_ms":1,"busy_pct":NaN,"cores":1}"#.to_vec(),
                "not a JSON object",
            ),
            (
                br#"{"v":1,"type":"cpu","seq":1,"ts_ms":1,"busy_pct":5,"cores":0}"#.to_vec(),
                "cores",
            ),
            (
                br#"{"v":1,"type":"hello","node":"","boot":1}"#.to_vec(),
                "hello: node",
            ),
            (
                b"{\"v\":1,\"type\":\"hello\",\"node\":\"a\\nb\",\"boot\":1}".to_vec(),
                "hello: node",
            ),
            (
                br#"{"v":1,"type":"hello","node":"a","boot":1,"instance_id":"i 1"}"#.to_vec(),
                "instance_id",
            ),
            (br#"{"v":1,"type":"hello","boot":1}"#.to_vec(), "bad frame"),
        ];
        for (line, want) in cases {
            let e = decode(&line).unwrap_err().to_string();
            assert!(
                e.contains(want),
                "{:?}: {e}",
                String::from_utf8_lossy(&line)
            );
        }
    }

    #[test]
    fn channel_needs_one_hello_first() {
        let mut ch = ChannelState::default();
        assert_eq!(ch.accept(cpu(1, 5.0)), Err(DecodeError::NoHello));
        assert!(ch.accept(hello()).is_ok());
        assert_eq!(ch.hello().unwrap().node, "web-1");
        assert!(ch.accept(cpu(1, 5.0)).is_ok());
        assert_eq!(ch.accept(hello()), Err(DecodeError::RepeatedHello));
    }

    #[test]
    fn duplicate_and_out_of_order_samples_are_dropped() {
        let mut f = SeqFilter::default();
        assert_eq!(f.check(1, 5), SeqVerdict::New { gap: 0 });
        assert_eq!(f.check(1, 6), SeqVerdict::New { gap: 0 });
        assert_eq!(f.check(1, 6), SeqVerdict::Old, "duplicate");
        assert_eq!(f.check(1, 3), SeqVerdict::Old, "out of order");
        assert_eq!(f.check(1, 10), SeqVerdict::New { gap: 3 });
        // The agent restarted: its count starts again.
        assert_eq!(f.check(2, 0), SeqVerdict::New { gap: 0 });
        assert_eq!(f.check(2, 1), SeqVerdict::New { gap: 0 });
        assert_eq!(f.check(2, 0), SeqVerdict::Old);
    }

    #[test]
    fn line_buffer_splits_and_limits() {
        let mut b = LineBuffer::default();
        assert_eq!(b.push(b"ab").unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(b.pending(), 2);
        assert_eq!(
            b.push(b"c\nde\n\nf").unwrap(),
            vec![b"abc".to_vec(), b"de".to_vec(), b"".to_vec()]
        );
        assert_eq!(b.pending(), 1);
        let mut b = LineBuffer::default();
        assert_eq!(b.push(&vec![b'x'; MAX_LINE]).unwrap().len(), 0);
        assert_eq!(
            b.push(b"x"),
            Err(DecodeError::TooLong),
            "refused before the newline arrives"
        );
        let mut b = LineBuffer::default();
        let mut exact = vec![b'y'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(b.push(&exact).unwrap().len(), 1);
    }

    /// Random byte soup and random mutations of valid frames never panic the decoder.
    #[test]
    fn decoder_survives_arbitrary_input() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let seeds = [encode(&hello()), encode(&cpu(3, 12.5))];
        for i in 0..20_000 {
            let mut line: Vec<u8> = if i % 2 == 0 {
                (0..rng.random_range(0..64)).map(|_| rng.random()).collect()
            } else {
                seeds[(i / 2) % 2].clone().into_bytes()
            };
            for _ in 0..rng.random_range(0..4) {
                if line.is_empty() {
                    break;
                }
                let at = rng.random_range(0..line.len());
                line[at] = rng.random();
            }
            let mut ch = ChannelState::default();
            let mut lb = LineBuffer::default();
            if let Ok(lines) = lb.push(&line) {
                for l in lines {
                    if let Ok(f) = decode(&l) {
                        let _ = ch.accept(f);
                    }
                }
            }
            let _ = decode(&line);
        }
    }

    #[test]
    fn a_hello_proves_it_holds_the_secret() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let nonce = new_nonce();
        assert_eq!(nonce.len(), 64);
        assert_ne!(nonce, new_nonce(), "fresh every time");
        let mut h = Hello {
            node: "web-1".into(),
            boot: 42,
            instance_id: None,
            uptime_ms: None,
            mac: None,
        };
        assert!(!verify_hello(secret, &nonce, &h), "no mac");
        h.mac = Some(auth_tag(secret, &nonce, &h));
        assert!(verify_hello(secret, &nonce, &h));
        // Through the codec too.
        let line = encode(&Frame::Hello(h.clone()));
        let Frame::Hello(back) = decode(line.trim_end().as_bytes()).unwrap() else {
            panic!()
        };
        assert!(verify_hello(secret, &nonce, &back));
        // Another secret, another nonce, another node or run, a mangled tag: refused.
        assert!(!verify_hello(b"another secret", &nonce, &h));
        assert!(!verify_hello(secret, &new_nonce(), &h));
        let other = Hello {
            node: "web-2".into(),
            ..h.clone()
        };
        assert!(!verify_hello(secret, &nonce, &other));
        let other = Hello {
            boot: 43,
            ..h.clone()
        };
        assert!(!verify_hello(secret, &nonce, &other));
        for bad in ["", "zz", "abc", &"0".repeat(64)] {
            let other = Hello {
                mac: Some(bad.to_string()),
                ..h.clone()
            };
            assert!(!verify_hello(secret, &nonce, &other), "{bad:?}");
        }
    }

    #[test]
    fn challenges_go_one_way() {
        let c = Frame::Challenge(Challenge { nonce: "ab".into() });
        let line = encode(&c);
        assert_eq!(line, "{\"v\":1,\"type\":\"challenge\",\"nonce\":\"ab\"}\n");
        assert_eq!(decode(line.trim_end().as_bytes()).unwrap(), c);
        let mut st = ChannelState::default();
        assert_eq!(st.accept(c), Err(DecodeError::UnexpectedChallenge));
    }
}
