//! ReportLink (node role): the node's side of the tunnel. Streams `hello` then one `cpu` frame
//! per sample to 127.0.0.1:report_port, where the master's SSH remote forward listens.
//!
//! The master speaks first: a challenge, which the hello answers with the report secret
//! ([`crate::report::auth_tag`]), so the master knows the reports are the agent's.
//!
//! The forward exists only while the master holds its SSH session, so the link reconnects with
//! jittered backoff. It keeps the last `[node] buffer` samples and resends them after every
//! reconnect (the master drops the ones it already has), so a short outage loses nothing; what
//! falls out of the buffer unsent is counted and logged.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Context, Handler, Message};
use slog::{info, o, warn, Logger};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::backoff::Backoff;
use crate::report::{auth_tag, decode, encode, CpuSample, Frame, Hello, LineBuffer};

const RECONNECT_BASE: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The node's CpuSampler took a sample.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct CpuSampled(pub CpuSample);

/// The node's link to the master.
pub struct ReportLink {
    tx: Option<mpsc::Sender<CpuSample>>,
    port: u16,
    hello: Hello,
    buffer: usize,
    secret: Option<Arc<Vec<u8>>>,
    log: Logger,
}

impl ReportLink {
    /// A link to 127.0.0.1:`port` introducing itself with `hello`, keeping `buffer` samples,
    /// proving `secret` (None: the hello carries no proof).
    pub fn new(
        port: u16,
        hello: Hello,
        buffer: usize,
        secret: Option<Arc<Vec<u8>>>,
        log: &Logger,
    ) -> ReportLink {
        ReportLink {
            tx: None,
            port,
            hello,
            buffer: buffer.max(1),
            secret,
            log: log.new(o!("actor" => "ReportLink", "port" => port)),
        }
    }
}

impl Actor for ReportLink {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        // The socket work runs as a plain tokio task; it ends when this actor (the sender) goes.
        let (tx, rx) = mpsc::channel(self.buffer);
        self.tx = Some(tx);
        let booted = machine_boot();
        tokio::spawn(run(
            rx,
            self.port,
            Greeting {
                hello: self.hello.clone(),
                booted,
                secret: self.secret.clone(),
            },
            self.buffer,
            self.log.clone(),
        ));
    }
}

impl Handler<CpuSampled> for ReportLink {
    type Result = ();

    fn handle(&mut self, msg: CpuSampled, _: &mut Context<Self>) {
        if let Some(tx) = &self.tx {
            if tx.try_send(msg.0).is_err() {
                // Only if the task is wedged writing for longer than `buffer` samples.
                warn!(self.log, "Link is not keeping up; sample dropped"; "seq" => msg.0.seq);
            }
        }
    }
}

/// The last `cap` samples, remembering which were written to a connection.
#[derive(Debug)]
pub struct Ring {
    samples: VecDeque<CpuSample>,
    cap: usize,
    /// Highest seq written to some connection.
    sent_upto: Option<u64>,
    /// Samples evicted before they were ever written, since the last report.
    dropped: u64,
    dropped_range: Option<(u64, u64)>,
}

impl Ring {
    /// An empty ring of `cap` samples.
    pub fn new(cap: usize) -> Ring {
        Ring {
            samples: VecDeque::with_capacity(cap),
            cap: cap.max(1),
            sent_upto: None,
            dropped: 0,
            dropped_range: None,
        }
    }

    /// Adds a sample, evicting the oldest when full.
    pub fn push(&mut self, s: CpuSample) {
        if self.samples.len() == self.cap {
            if let Some(old) = self.samples.pop_front() {
                if self.sent_upto.is_none_or(|u| old.seq > u) {
                    self.dropped += 1;
                    let (first, _) = self.dropped_range.unwrap_or((old.seq, old.seq));
                    self.dropped_range = Some((first, old.seq));
                }
            }
        }
        self.samples.push_back(s);
    }

    /// Every buffered sample, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &CpuSample> {
        self.samples.iter()
    }

    /// Records that everything up to `seq` was written.
    pub fn mark_sent(&mut self, seq: u64) {
        self.sent_upto = Some(self.sent_upto.map_or(seq, |u| u.max(seq)));
    }

    /// Takes the count (and seq range) of samples lost since the last call.
    pub fn take_dropped(&mut self) -> Option<(u64, u64, u64)> {
        let r = self.dropped_range.take().map(|(a, b)| (self.dropped, a, b));
        self.dropped = 0;
        r
    }
}

enum Ended {
    /// The actor stopped: shut down.
    Stopped,
    /// The connection broke: reconnect.
    Lost(String),
}

/// When this machine booted, on the monotonic clock (None if the uptime is unknown).
fn machine_boot() -> Option<std::time::Instant> {
    let up = Duration::from_secs(sysinfo::System::uptime().ok()?);
    std::time::Instant::now().checked_sub(up)
}

/// What the agent says first on every connection.
struct Greeting {
    hello: Hello,
    /// When the machine booted: the hello carries its uptime.
    booted: Option<std::time::Instant>,
    secret: Option<Arc<Vec<u8>>>,
}

/// How long the agent waits for the master's challenge on a new connection.
const CHALLENGE_TIMEOUT: Duration = Duration::from_secs(10);

async fn run(
    mut rx: mpsc::Receiver<CpuSample>,
    port: u16,
    mut greeting: Greeting,
    cap: usize,
    log: Logger,
) {
    let mut ring = Ring::new(cap);
    let mut backoff = Backoff::new(RECONNECT_BASE, RECONNECT_MAX);
    let mut waiting_logged = false;
    loop {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(stream) => {
                if let Some((n, first, last)) = ring.take_dropped() {
                    warn!(log, "Samples dropped while the master was unreachable";
                        "count" => n, "first_seq" => first, "last_seq" => last, "buffer" => cap);
                }
                info!(log, "Connected to the master's tunnel"; "port" => port, "resending" => ring.samples.len());
                backoff.reset();
                waiting_logged = false;
                // The node's age, so the master's warm-up counts from this machine's boot.
                greeting.hello.uptime_ms = greeting.booted.map(|b| b.elapsed().as_millis() as u64);
                match serve(stream, &mut rx, &mut ring, &greeting).await {
                    Ended::Stopped => return,
                    Ended::Lost(why) => {
                        warn!(log, "Link to the master lost; reconnecting"; "error" => why)
                    }
                }
            }
            Err(e) => {
                if !waiting_logged {
                    info!(log, "Waiting for the master's tunnel"; "port" => port, "error" => %e);
                    waiting_logged = true;
                }
            }
        }
        let sleep = tokio::time::sleep(backoff.next_delay());
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                s = rx.recv() => match s {
                    Some(s) => ring.push(s),
                    None => return,
                },
            }
        }
    }
}

/// Reads the master's challenge: the first line on the connection.
async fn challenge(rd: &mut tokio::net::tcp::OwnedReadHalf) -> Result<String, String> {
    let mut lines = LineBuffer::default();
    let mut buf = [0u8; 512];
    let read = async {
        loop {
            let n = rd.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before the master's challenge".to_string());
            }
            if let Some(line) = lines
                .push(&buf[..n])
                .map_err(|e| e.to_string())?
                .into_iter()
                .next()
            {
                return match decode(&line) {
                    Ok(Frame::Challenge(c)) => Ok(c.nonce),
                    Ok(_) => Err("the master's first line is not a challenge".to_string()),
                    Err(e) => Err(format!("the master's challenge: {e}")),
                };
            }
        }
    };
    tokio::time::timeout(CHALLENGE_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| Err("no challenge from the master".to_string()))
}

async fn serve(
    stream: TcpStream,
    rx: &mut mpsc::Receiver<CpuSample>,
    ring: &mut Ring,
    greeting: &Greeting,
) -> Ended {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let nonce = match challenge(&mut rd).await {
        Ok(n) => n,
        Err(e) => return Ended::Lost(e),
    };
    let mut hello = greeting.hello.clone();
    hello.mac = greeting
        .secret
        .as_deref()
        .map(|secret| auth_tag(secret, &nonce, &hello));
    let mut out = encode(&Frame::Hello(hello));
    let mut last = None;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for s in ring.iter() {
        // Resent samples say how old they are; the master places them in time by that.
        let resent = CpuSample {
            age_ms: now.saturating_sub(s.ts_ms),
            ..*s
        };
        out.push_str(&encode(&Frame::Cpu(resent)));
        last = Some(s.seq);
    }
    if let Err(e) = wr.write_all(out.as_bytes()).await {
        return Ended::Lost(e.to_string());
    }
    if let Some(seq) = last {
        ring.mark_sent(seq);
    }
    let mut scratch = [0u8; 256];
    loop {
        tokio::select! {
            s = rx.recv() => {
                let Some(s) = s else { return Ended::Stopped };
                ring.push(s);
                if let Err(e) = wr.write_all(encode(&Frame::Cpu(s)).as_bytes()).await {
                    return Ended::Lost(e.to_string());
                }
                ring.mark_sent(s.seq);
            }
            // The master sends nothing more; a read only tells that the forward went away.
            r = rd.read(&mut scratch) => match r {
                Ok(0) => return Ended::Lost("closed by the master".into()),
                Ok(_) => {}
                Err(e) => return Ended::Lost(e.to_string()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{new_nonce, verify_hello, Challenge};
    use tokio::net::TcpListener;

    /// Accepts the agent's next connection and challenges it, as the master does.
    async fn accept(listener: &TcpListener, nonce: &str) -> TcpStream {
        let (mut conn, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let c = encode(&Frame::Challenge(Challenge {
            nonce: nonce.into(),
        }));
        conn.write_all(c.as_bytes()).await.unwrap();
        conn
    }

    fn s(seq: u64) -> CpuSample {
        CpuSample {
            seq,
            ts_ms: seq,
            busy_pct: 1.0,
            cores: 1,
            age_ms: 0,
        }
    }

    #[test]
    fn ring_counts_only_unsent_evictions() {
        let mut r = Ring::new(3);
        for i in 0..3 {
            r.push(s(i));
        }
        r.mark_sent(1);
        r.push(s(3)); // evicts 0: sent
        r.push(s(4)); // evicts 1: sent
        assert_eq!(r.take_dropped(), None);
        r.push(s(5)); // evicts 2: never sent
        r.push(s(6)); // evicts 3
        assert_eq!(r.take_dropped(), Some((2, 2, 3)));
        assert_eq!(r.take_dropped(), None);
        assert_eq!(r.iter().map(|x| x.seq).collect::<Vec<_>>(), [4, 5, 6]);
    }

    async fn read_frames(stream: &mut TcpStream, n: usize) -> Vec<Frame> {
        let mut lb = LineBuffer::default();
        let mut frames = Vec::new();
        let mut buf = [0u8; 4096];
        while frames.len() < n {
            let k = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(k > 0, "closed early");
            for l in lb.push(&buf[..k]).unwrap() {
                frames.push(decode(&l).unwrap());
            }
        }
        frames
    }

    /// Against a real loopback listener standing in for the forward: samples buffered while
    /// nobody listens arrive after connecting; after the listener drops the connection, the
    /// link reconnects and resends its buffer after a new hello.
    #[tokio::test]
    async fn buffers_reconnects_and_resends() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel(16);
        let hello = Hello {
            node: "n1".into(),
            boot: 9,
            instance_id: None,
            uptime_ms: None,
            mac: None,
        };
        let log = Logger::root(slog::Discard, o!());
        let secret = Arc::new(b"a report secret of at least 32 chars".to_vec());
        let greeting = Greeting {
            hello: hello.clone(),
            booted: Some(std::time::Instant::now() - Duration::from_secs(3600)),
            secret: Some(secret.clone()),
        };
        let task = tokio::spawn(run(rx, port, greeting, 4, log));
        for i in 0..6 {
            tx.send(s(i)).await.unwrap();
        }
        let nonce = new_nonce();
        let mut conn = accept(&listener, &nonce).await;
        let frames = read_frames(&mut conn, 1).await;
        let Frame::Hello(said) = &frames[0] else {
            panic!("{frames:?}")
        };
        assert!(
            verify_hello(&secret, &nonce, said),
            "the hello answers the challenge"
        );
        assert!(
            said.uptime_ms.is_some_and(|u| u >= 3_600_000),
            "the hello says how long the machine has been up: {said:?}"
        );
        assert_eq!(said.boot, hello.boot);
        // Samples 0-5 raced with the connect: whatever was buffered comes first, in order.
        tx.send(s(6)).await.unwrap();
        let mut seqs = Vec::new();
        while seqs.last() != Some(&6) {
            for f in read_frames(&mut conn, 1).await {
                if let Frame::Cpu(c) = f {
                    seqs.push(c.seq);
                }
            }
        }
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        drop(conn);
        tx.send(s(7)).await.unwrap();
        // A new connection, a new challenge, a new answer.
        let second = new_nonce();
        let mut conn = accept(&listener, &second).await;
        let frames = read_frames(&mut conn, 5).await;
        assert!(matches!(&frames[0], Frame::Hello(h) if h.boot == hello.boot
            && verify_hello(&secret, &second, h) && !verify_hello(&secret, &nonce, h)));
        let resent: Vec<u64> = frames[1..]
            .iter()
            .map(|f| match f {
                Frame::Cpu(c) => c.seq,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            resent,
            [4, 5, 6, 7],
            "the last `buffer` samples, oldest first"
        );
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
