//! The node → master report protocol: newline-delimited JSON, one versioned frame per line,
//! every frame the agent sends authenticated.
//!
//! ```text
//! master → node  {"v":2,"type":"challenge","nonce":"9f0c…(64 hex digits)"}
//! node → master  {"v":2,"type":"hello","node":"web-1","boot":8812734,"instance_id":"i-0abc",
//!                 "uptime_ms":93000,"interval_ms":1000,"buffer":300,"nonce":"51d2…","mac":"3a7e…"}
//! master → node  {"v":2,"type":"welcome","mac":"c0de…"}
//! node → master  {"v":2,"type":"cpu","seq":17,"ts_ms":1764537600000,"busy_pct":73.2,"cores":2,"mac":"77aa…"}
//! node → master  {"v":2,"type":"cpu","seq":16,"ts_ms":1764537599000,"busy_pct":70.1,"cores":2,"age_ms":61000,"mac":"…"}
//! ```
//!
//! **Both ends prove the report secret, and every sample is bound to its channel.** `K` is the
//! report secret (`[node] secret_file`; for a host the master launched, also the key derived
//! for that launch, [`launch_key`]). `via` names the forward the channel came through, as both
//! ends see it on the node: `tcp:9700` or `unix:/run/autoscaler/report.sock`.
//!
//! - The hello's `mac` is HMAC-SHA256(K, "hello", master nonce, via, the hello's line up to its
//!   `mac`) — so it covers the node's name, run (`boot`), instance id, its own nonce and every
//!   other field as sent.
//! - The master answers with a welcome: HMAC(K, "welcome", the same inputs). The agent sends
//!   no sample before it has checked it: whoever listens on the report port without the
//!   secret (a local user who bound it while the master's forward was down) learns nothing
//!   and gets nothing.
//! - Both derive the channel's session key S = HMAC(K, "session", the same inputs). Every
//!   `cpu` frame ends with `mac` = the first 16 bytes of HMAC(S, the line up to its `mac`).
//!
//! So a relayed hello is worth nothing: a local user who passes one master's challenge to the
//! agent and the agent's hello back cannot add a frame of their own (no S), a hello made for
//! one forward does not open another (`via` differs), and frames of one channel do not verify
//! on another. What a relay can still do is pass the agent's own frames along or drop them;
//! forwards to a Unix socket in a directory only the agent's user can open (`[node]
//! report_socket`) keep other users from connecting at all.
//!
//! `age_ms` (optional, default 0) marks a sample resent from the node's buffer: how long ago,
//! on the node's clock, it was taken. `boot` changes whenever the node agent restarts, so its
//! sequence numbers can start again from 0; the master drops samples it has already seen
//! ([`SeqFilter`]) and refuses jumps no agent could make. A channel carries at most
//! `buffer` resent samples plus a few live ones per `interval_ms` ([`MasterChannel`]).
//! Anything malformed — an oversized line, invalid UTF-8, an unknown version or type, an
//! impossible value, a MAC that does not verify — is a [`DecodeError`] that closes that one
//! channel; it never panics and never touches other nodes.

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;

/// The protocol version this build speaks.
pub const VERSION: u32 = 2;
/// Longest accepted line, newline excluded. Real frames are under 300 bytes.
pub const MAX_LINE: usize = 4096;
/// Bytes of a `cpu` frame's MAC (hex: twice as many characters).
pub const FRAME_MAC: usize = 16;
/// Live samples a channel may carry per `interval_ms`, on average.
pub const LIVE_PER_INTERVAL: u64 = 3;
/// Live samples a channel may carry at once beyond that rate.
pub const LIVE_BURST: u64 = 10;
/// The largest `buffer` a hello may declare.
pub const MAX_BUFFER: u64 = 100_000;
/// The shortest `interval_ms` a hello may declare (the agent samples at most 5 times a second).
pub const MIN_INTERVAL_MS: u64 = 200;

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

/// The agent's first frame on a channel: who is reporting, and the answer to the challenge.
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
    /// How often the agent samples: the master bounds the channel's rate by it.
    pub interval_ms: u64,
    /// How many buffered samples the agent may resend after it connects.
    pub buffer: u64,
    /// The agent's own nonce, fresh for every channel (hex).
    #[serde(default)]
    pub nonce: String,
}

/// The master's first line on a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// 32 random bytes in hex, fresh for every channel.
    pub nonce: String,
}

/// The master's answer to a hello: proof that it holds the secret too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub mac: String,
}

/// A decoded frame (without its MAC; see [`MasterChannel`] and [`AgentChannel`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Frame {
    Hello(Hello),
    Cpu(CpuSample),
    /// Master → node only.
    Challenge(Challenge),
    /// Master → node only.
    Welcome(Welcome),
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
    #[error("unsupported protocol version {0} (this build speaks {VERSION}: run the same autoscaler release on the master and its nodes)")]
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
    #[error("a {0} is the master's to send")]
    MastersFrame(&'static str),
    #[error("the frame's MAC is missing or malformed")]
    NoMac,
    #[error("the hello does not prove the report secret")]
    Unauthenticated,
    #[error("the frame's MAC does not verify: not sent by this channel's agent")]
    Forged,
    #[error("the master's welcome does not prove the report secret")]
    NotTheMaster,
    #[error("the master's first line is not a challenge")]
    NoChallenge,
    #[error("more samples than the agent's interval and buffer allow")]
    TooMany,
    #[error("sequence number {seq} jumps past {limit}, more than the agent could have taken")]
    SeqJump { seq: u64, limit: u64 },
}

/// Encodes a frame as one line, newline included, without a MAC.
pub fn encode(frame: &Frame) -> String {
    let mut s = serde_json::to_string(&Envelope { v: VERSION, frame })
        .expect("frames always serialise (finite numbers, string keys)");
    s.push('\n');
    s
}

/// Encodes a frame with `mac` computed over the line up to it; the line ends `,"mac":"…"}\n`.
fn encode_with_mac(frame: &Frame, mac: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let mut s = serde_json::to_string(&Envelope { v: VERSION, frame })
        .expect("frames always serialise (finite numbers, string keys)");
    s.pop(); // the closing brace
    let tag = hex(&mac(s.as_bytes()));
    s.push_str(MAC_FIELD);
    s.push_str(&tag);
    s.push_str("\"}\n");
    s
}

const MAC_FIELD: &str = ",\"mac\":\"";

/// A line's MAC and the bytes it covers: the line must end with `,"mac":"<hex>"}` and the
/// MAC be `len` bytes long.
fn split_mac(line: &[u8], len: usize) -> Result<(&[u8], Vec<u8>), DecodeError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let body = line.strip_suffix(b"\"}").ok_or(DecodeError::NoMac)?;
    if body.len() < 2 * len + MAC_FIELD.len() {
        return Err(DecodeError::NoMac);
    }
    let (covered, rest) = body.split_at(body.len() - 2 * len - MAC_FIELD.len());
    let tag = rest
        .strip_prefix(MAC_FIELD.as_bytes())
        .and_then(|h| unhex(std::str::from_utf8(h).ok()?))
        .ok_or(DecodeError::NoMac)?;
    Ok((covered, tag))
}

/// Decodes one line (without its newline; a trailing `\r` is tolerated). A MAC in the line
/// is not checked here (see [`MasterChannel`], [`AgentChannel`]).
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
    let bad_hello = |m: &str| Err(DecodeError::BadHello(m.into()));
    match &frame {
        Frame::Cpu(s) if !(s.busy_pct.is_finite() && (0.0..=100.0).contains(&s.busy_pct)) => {
            Err(DecodeError::BadBusy(s.busy_pct))
        }
        Frame::Cpu(s) if s.cores == 0 => Err(DecodeError::NoCores),
        Frame::Hello(h)
            if h.node.is_empty() || h.node.len() > 255 || h.node.chars().any(char::is_control) =>
        {
            bad_hello("node must be 1-255 printable characters")
        }
        Frame::Hello(h)
            if h.instance_id
                .as_deref()
                .is_some_and(|i| crate::hosts::validate_instance_id(i).is_err()) =>
        {
            bad_hello("instance_id is not a valid instance id")
        }
        Frame::Hello(h) if h.interval_ms < MIN_INTERVAL_MS => {
            bad_hello("interval_ms must be at least 200")
        }
        Frame::Hello(h) if h.buffer > MAX_BUFFER => bad_hello("buffer must be at most 100000"),
        Frame::Hello(h) if h.nonce.len() != 64 || unhex(&h.nonce).is_none() => {
            bad_hello("nonce must be 64 hex digits")
        }
        _ => Ok(frame),
    }
}

/// A fresh nonce: 32 random bytes in hex.
pub fn new_nonce() -> String {
    hex(&rand::random::<[u8; 32]>())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Lower-case hex only, as [`hex`] writes it: one spelling per value.
fn unhex(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// HMAC-SHA256 keyed by `key` over length-prefixed `parts`: no two lists of parts make the
/// same message.
fn mac_over(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut m =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    for p in parts {
        m.update(&(p.len() as u64).to_be_bytes());
        m.update(p);
    }
    m
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    mac_over(key, parts).finalize().into_bytes().into()
}

/// The report key of the hosts one launch decision started: what the master puts in their
/// user data (or hands the scale-up command) instead of the fleet's secret, so that a leaked
/// user data speaks for those hosts only. 64 hex digits, like the secret `init` writes.
pub fn launch_key(secret: &[u8], decision: &str) -> String {
    hex(&mac(secret, &[b"launch", decision.as_bytes()]))
}

/// What a hello's line (up to its MAC) proves, under `key`, for one channel.
struct Proofs {
    hello: [u8; 32],
    welcome: [u8; 32],
    session: [u8; 32],
}

fn proofs(key: &[u8], master_nonce: &str, via: &str, hello_covered: &[u8]) -> Proofs {
    let parts = |what: &'static [u8]| -> [u8; 32] {
        mac(
            key,
            &[what, master_nonce.as_bytes(), via.as_bytes(), hello_covered],
        )
    };
    Proofs {
        hello: parts(b"hello"),
        welcome: parts(b"welcome"),
        session: parts(b"session"),
    }
}

/// Compares two MACs in constant time.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The per-frame MAC under a session key: a keyed state cloned for each frame.
#[derive(Clone)]
struct FrameMac(Hmac<Sha256>);

impl FrameMac {
    fn new(session: &[u8; 32]) -> FrameMac {
        FrameMac(<Hmac<Sha256> as KeyInit>::new_from_slice(session).expect("any key length"))
    }

    fn tag(&self, covered: &[u8]) -> [u8; FRAME_MAC] {
        let mut m = self.0.clone();
        m.update(covered);
        let full = m.finalize().into_bytes();
        let mut out = [0u8; FRAME_MAC];
        out.copy_from_slice(&full[..FRAME_MAC]);
        out
    }
}

impl std::fmt::Debug for FrameMac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameMac")
    }
}

/// What the master learnt from one line of a channel.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The agent proved the secret: `welcome` is the line to send back.
    Hello {
        hello: Hello,
        /// Which of the candidate keys it proved (0: the first).
        key: usize,
        welcome: String,
    },
    /// An authenticated sample.
    Sample(CpuSample),
}

/// The master's side of one report channel: the challenge out, a hello that proves one of
/// the candidate keys, then samples that each carry the session's MAC, within the rate the
/// hello declared. Time is an input (milliseconds on any steady clock).
#[derive(Debug)]
pub struct MasterChannel {
    nonce: String,
    via: String,
    live: Option<Live>,
}

#[derive(Debug)]
struct Live {
    hello: Hello,
    mac: FrameMac,
    /// Resent samples the agent may still send (its declared buffer).
    resend_left: u64,
    /// Live-sample allowance (a token bucket), in thousandths of a sample.
    tokens_milli: u64,
    at_ms: u64,
}

impl MasterChannel {
    /// A channel through `via`; returns it and the challenge line to send first.
    pub fn open(via: &str) -> (MasterChannel, String) {
        let nonce = new_nonce();
        let line = encode(&Frame::Challenge(Challenge {
            nonce: nonce.clone(),
        }));
        (
            MasterChannel {
                nonce,
                via: via.to_string(),
                live: None,
            },
            line,
        )
    }

    /// The hello this channel accepted.
    pub fn hello(&self) -> Option<&Hello> {
        self.live.as_ref().map(|l| &l.hello)
    }

    /// Takes one line. Before the hello, `keys` are the secrets the agent may prove (the
    /// fleet's, and the host's launch key); afterwards they are not used.
    pub fn accept(
        &mut self,
        line: &[u8],
        keys: &[&[u8]],
        now_ms: u64,
    ) -> Result<Event, DecodeError> {
        let frame = decode(line)?;
        match (&mut self.live, frame) {
            (_, Frame::Challenge(_)) => Err(DecodeError::MastersFrame("challenge")),
            (_, Frame::Welcome(_)) => Err(DecodeError::MastersFrame("welcome")),
            (None, Frame::Cpu(_)) => Err(DecodeError::NoHello),
            (Some(_), Frame::Hello(_)) => Err(DecodeError::RepeatedHello),
            (None, Frame::Hello(hello)) => {
                let (covered, tag) = split_mac(line, 32)?;
                let proven = keys.iter().enumerate().find_map(|(i, k)| {
                    let p = proofs(k, &self.nonce, &self.via, covered);
                    same(&p.hello, &tag).then_some((i, p))
                });
                let Some((key, p)) = proven else {
                    return Err(DecodeError::Unauthenticated);
                };
                let welcome = encode(&Frame::Welcome(Welcome {
                    mac: hex(&p.welcome),
                }));
                self.live = Some(Live {
                    resend_left: hello.buffer,
                    tokens_milli: LIVE_BURST * 1000,
                    at_ms: now_ms,
                    mac: FrameMac::new(&p.session),
                    hello: hello.clone(),
                });
                Ok(Event::Hello {
                    hello,
                    key,
                    welcome,
                })
            }
            (Some(live), Frame::Cpu(sample)) => {
                let (covered, tag) = split_mac(line, FRAME_MAC)?;
                if !same(&live.mac.tag(covered), &tag) {
                    return Err(DecodeError::Forged);
                }
                live.spend(&sample, now_ms)?;
                Ok(Event::Sample(sample))
            }
        }
    }
}

impl Live {
    /// Counts `s` against what the hello declared: its buffer for resent samples, a few per
    /// interval for live ones.
    fn spend(&mut self, s: &CpuSample, now_ms: u64) -> Result<(), DecodeError> {
        if s.age_ms > 0 && self.resend_left > 0 {
            self.resend_left -= 1;
            return Ok(());
        }
        let interval = self.hello.interval_ms.max(MIN_INTERVAL_MS);
        let earned = now_ms.saturating_sub(self.at_ms) * LIVE_PER_INTERVAL * 1000 / interval;
        self.tokens_milli = (self.tokens_milli + earned).min(LIVE_BURST * 1000);
        // Only whole elapsed thousandths are earned: keep the remainder's time.
        if earned > 0 {
            self.at_ms = now_ms;
        }
        match self.tokens_milli >= 1000 {
            true => {
                self.tokens_milli -= 1000;
                Ok(())
            }
            false => Err(DecodeError::TooMany),
        }
    }
}

/// The agent's side of one report channel: reads the challenge, says hello, checks the
/// master's welcome, then MACs every sample it sends.
#[derive(Debug)]
pub struct AgentChannel {
    welcome: [u8; 32],
    mac: FrameMac,
    /// The welcome was checked.
    welcomed: bool,
}

impl AgentChannel {
    /// Answers the challenge line `challenge` on forward `via` with `hello` (its nonce is
    /// filled in here) under `key`; returns the channel and the hello line to send.
    pub fn answer(
        challenge: &[u8],
        via: &str,
        mut hello: Hello,
        key: &[u8],
    ) -> Result<(AgentChannel, String), DecodeError> {
        let Frame::Challenge(c) = decode(challenge)? else {
            return Err(DecodeError::NoChallenge);
        };
        if c.nonce.len() != 64 || unhex(&c.nonce).is_none() {
            return Err(DecodeError::NoChallenge);
        }
        hello.nonce = new_nonce();
        let mut proofs_made = None;
        let line = encode_with_mac(&Frame::Hello(hello), |covered| {
            let p = proofs(key, &c.nonce, via, covered);
            let tag = p.hello.to_vec();
            proofs_made = Some(p);
            tag
        });
        let p = proofs_made.expect("the MAC was computed");
        Ok((
            AgentChannel {
                welcome: p.welcome,
                mac: FrameMac::new(&p.session),
                welcomed: false,
            },
            line,
        ))
    }

    /// Checks the master's welcome line; Ok once it proves the secret.
    pub fn welcome(&mut self, line: &[u8]) -> Result<(), DecodeError> {
        match decode(line)? {
            Frame::Welcome(w) if unhex(&w.mac).is_some_and(|tag| same(&tag, &self.welcome)) => {
                self.welcomed = true;
                Ok(())
            }
            Frame::Welcome(_) => Err(DecodeError::NotTheMaster),
            _ => Err(DecodeError::BadFrame(
                "expected the master's welcome".into(),
            )),
        }
    }

    /// One sample as a line carrying the session's MAC. Only after the welcome.
    pub fn sample(&self, s: &CpuSample) -> String {
        debug_assert!(self.welcomed, "samples go out only after the welcome");
        encode_with_mac(&Frame::Cpu(*s), |covered| self.mac.tag(covered).to_vec())
    }
}

/// Drops samples a node sends again (after a reconnect it resends its buffer) or out of order,
/// and refuses sequence numbers no agent could have reached. Kept per host across channels; a
/// new `boot` starts the count again.
#[derive(Debug, Default, Clone)]
pub struct SeqFilter {
    /// (boot, last seq, when it arrived in ms).
    last: Option<(u64, u64, u64)>,
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
    /// Records `seq` of the run `hello` describes, arrived at `now_ms`, if it is new. A seq
    /// beyond what the agent can have taken since its last one (or, for the first one heard,
    /// since its machine booted) at `interval_ms` a sample, plus its buffer, is refused.
    pub fn check(
        &mut self,
        hello: &Hello,
        seq: u64,
        now_ms: u64,
    ) -> Result<SeqVerdict, DecodeError> {
        let interval = hello.interval_ms.max(MIN_INTERVAL_MS);
        let slack = |elapsed_ms: u64| 2 * (elapsed_ms / interval) + hello.buffer + 16;
        match self.last {
            Some((b, last, _)) if b == hello.boot && seq <= last => Ok(SeqVerdict::Old),
            Some((b, last, at)) if b == hello.boot => {
                let limit = last.saturating_add(slack(now_ms.saturating_sub(at)));
                if seq > limit {
                    return Err(DecodeError::SeqJump { seq, limit });
                }
                self.last = Some((hello.boot, seq, now_ms));
                Ok(SeqVerdict::New {
                    gap: seq - last - 1,
                })
            }
            _ => {
                if let Some(up) = hello.uptime_ms {
                    let limit = slack(up);
                    if seq > limit {
                        return Err(DecodeError::SeqJump { seq, limit });
                    }
                }
                self.last = Some((hello.boot, seq, now_ms));
                Ok(SeqVerdict::New { gap: 0 })
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
        self.each(bytes, |l| {
            lines.push(l.to_vec());
            Ok(())
        })?;
        Ok(lines)
    }

    /// Appends bytes and calls `f` with every complete line (newline stripped), stopping at
    /// the first error; lines that arrive whole in `bytes` are not copied.
    pub fn each(
        &mut self,
        bytes: &[u8],
        mut f: impl FnMut(&[u8]) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        for chunk in bytes.split_inclusive(|&b| b == b'\n') {
            match chunk.strip_suffix(b"\n") {
                Some(rest) if self.buf.is_empty() => {
                    if rest.len() > MAX_LINE {
                        return Err(DecodeError::TooLong);
                    }
                    f(rest)?;
                }
                Some(rest) => {
                    self.buf.extend_from_slice(rest);
                    if self.buf.len() > MAX_LINE {
                        return Err(DecodeError::TooLong);
                    }
                    let line = std::mem::take(&mut self.buf);
                    f(&line)?;
                }
                None => {
                    self.buf.extend_from_slice(chunk);
                    if self.buf.len() > MAX_LINE {
                        return Err(DecodeError::TooLong);
                    }
                }
            }
        }
        Ok(())
    }

    /// Bytes of an unfinished line (non-empty at end of stream means a truncated frame).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests;
