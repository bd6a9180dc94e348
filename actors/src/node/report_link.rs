//! ReportLink (node role): the node's side of one master's forward. Streams a hello, then one
//! `cpu` frame per sample, to the forward: a Unix socket (`[node] report_socket`: one link per
//! master socket in that directory, see [`super::report_dir`]) or 127.0.0.1:report_port.
//!
//! The master speaks first: a challenge, which the hello answers with the report secret; the
//! master's welcome proves it holds the secret too, and only then do samples go out, each
//! with the channel's MAC ([`crate::report`]). Whoever else listens on the forward's address
//! (a local user who bound the TCP port while no master held it) gets a hello it cannot use
//! and nothing more.
//!
//! The forward exists only while the master holds its SSH session, so the link reconnects with
//! jittered backoff; the backoff starts again only once a master has welcomed the link, so a
//! master that keeps refusing it (a different report secret) is not hammered, and the reason
//! is logged once. A socket nobody listens on any more (sshd leaves it behind when the
//! master's session ends, and would then refuse to create it again) is removed, so the
//! master's next forward can take its place. The link keeps the last `[node] buffer` samples
//! and resends them after every reconnect (the master drops the ones it already has), so a
//! short outage loses nothing; what falls out of the buffer unsent is counted and logged.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Context, Handler, Message};
use slog::{debug, info, o, warn, Logger};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::backoff::Backoff;
use crate::report::{AgentChannel, CpuSample, DecodeError, Hello, LineBuffer};

const RECONNECT_BASE: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Backoff cap while the master keeps refusing the link.
const REFUSED_MAX: Duration = Duration::from_secs(60);

/// The node's CpuSampler took a sample.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct CpuSampled(pub CpuSample);

/// Where a master's forward appears on the node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// 127.0.0.1:port.
    Tcp(u16),
    /// A Unix socket.
    Unix(PathBuf),
}

impl Endpoint {
    /// The channel's name in the protocol (`via`), as the master names the same forward.
    pub fn via(&self) -> String {
        match self {
            Endpoint::Tcp(p) => format!("tcp:{p}"),
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(p) => write!(f, "127.0.0.1:{p}"),
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The node's link to one master.
pub struct ReportLink {
    tx: Option<mpsc::Sender<CpuSample>>,
    endpoint: Endpoint,
    hello: Hello,
    buffer: usize,
    secret: Arc<Vec<u8>>,
    log: Logger,
}

impl ReportLink {
    /// A link to `endpoint` introducing itself with `hello`, keeping `buffer` samples, proving
    /// `secret` (None: the empty key, which only a master without a secret accepts).
    pub fn new(
        endpoint: Endpoint,
        hello: Hello,
        buffer: usize,
        secret: Option<Arc<Vec<u8>>>,
        log: &Logger,
    ) -> ReportLink {
        ReportLink {
            tx: None,
            log: log.new(o!("actor" => "ReportLink", "master" => endpoint.to_string())),
            endpoint,
            hello,
            buffer: buffer.max(1),
            secret: secret.unwrap_or_default(),
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
            self.endpoint.clone(),
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
    /// The connection broke after the master welcomed the link: reconnect soon.
    Lost(String),
    /// The other end is not (or not yet) a master that accepts this agent: back off.
    Refused(String),
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
    secret: Arc<Vec<u8>>,
}

/// How long the agent waits for each of the master's first two lines on a new connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to a master's forward, either kind.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Connects to `endpoint`. A Unix socket that refuses (nobody listens: left behind by sshd
/// after the master's session ended) is removed, so the master's next forward can bind it.
async fn connect(endpoint: &Endpoint, log: &Logger) -> std::io::Result<Box<dyn Conn>> {
    match endpoint {
        Endpoint::Tcp(port) => {
            let s = tokio::net::TcpStream::connect(("127.0.0.1", *port)).await?;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
        Endpoint::Unix(path) => match tokio::net::UnixStream::connect(path).await {
            Ok(s) => Ok(Box::new(s)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                if std::fs::remove_file(path).is_ok() {
                    debug!(log, "Removed a report socket nobody listens on"; "socket" => %path.display());
                }
                Err(e)
            }
            Err(e) => Err(e),
        },
    }
}

async fn run(
    mut rx: mpsc::Receiver<CpuSample>,
    endpoint: Endpoint,
    mut greeting: Greeting,
    cap: usize,
    log: Logger,
) {
    let mut ring = Ring::new(cap);
    let mut backoff = Backoff::new(RECONNECT_BASE, RECONNECT_MAX);
    let mut waiting_logged = false;
    let mut refusal_logged: Option<String> = None;
    // Whether `backoff` is the refusals' (up to a minute) rather than the reconnects'.
    let mut refused = false;
    let via = endpoint.via();
    loop {
        match connect(&endpoint, &log).await {
            Ok(stream) => {
                waiting_logged = false;
                // The node's age, so the master's warm-up counts from this machine's boot.
                greeting.hello.uptime_ms = greeting.booted.map(|b| b.elapsed().as_millis() as u64);
                match serve(stream, &via, &mut rx, &mut ring, &greeting, &log).await {
                    Ended::Stopped => return,
                    Ended::Lost(why) => {
                        backoff = Backoff::new(RECONNECT_BASE, RECONNECT_MAX);
                        refused = false;
                        refusal_logged = None;
                        warn!(log, "Link to the master lost; reconnecting"; "error" => why)
                    }
                    Ended::Refused(why) => {
                        // Said once per reason; the backoff grows to a minute meanwhile
                        // (from its start, whatever connects failed before the first).
                        if !std::mem::replace(&mut refused, true) {
                            backoff = Backoff::new(RECONNECT_BASE, REFUSED_MAX);
                        }
                        if refusal_logged.as_deref() != Some(why.as_str()) {
                            warn!(log, "The master's forward did not accept this agent; retrying with backoff"; "error" => &why);
                            refusal_logged = Some(why);
                        }
                    }
                }
            }
            Err(e) => {
                // The forward is gone, and whatever refused the agent with it (a renewal, a
                // restart): the next one is waited for at the reconnects' pace.
                if std::mem::replace(&mut refused, false) {
                    backoff = Backoff::new(RECONNECT_BASE, RECONNECT_MAX);
                }
                if !waiting_logged {
                    info!(log, "Waiting for the master's forward"; "error" => %e);
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

/// Reads one line (the master's), bounded in time and length.
async fn read_line(
    rd: &mut (impl AsyncRead + Unpin),
    lines: &mut LineBuffer,
    ready: &mut VecDeque<Vec<u8>>,
    what: &str,
) -> Result<Vec<u8>, String> {
    let mut buf = [0u8; 512];
    let read = async {
        loop {
            if let Some(l) = ready.pop_front() {
                return Ok(l);
            }
            let n = rd.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("closed before the master's {what}"));
            }
            ready.extend(lines.push(&buf[..n]).map_err(|e| e.to_string())?);
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| Err(format!("no {what} from the master within 10s")))
}

async fn serve(
    stream: Box<dyn Conn>,
    via: &str,
    rx: &mut mpsc::Receiver<CpuSample>,
    ring: &mut Ring,
    greeting: &Greeting,
    log: &Logger,
) -> Ended {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut lines = LineBuffer::default();
    let mut ready = VecDeque::new();
    let challenge = match read_line(&mut rd, &mut lines, &mut ready, "challenge").await {
        Ok(l) => l,
        Err(e) => return Ended::Refused(e),
    };
    let (mut channel, hello) =
        match AgentChannel::answer(&challenge, via, greeting.hello.clone(), &greeting.secret) {
            Ok(c) => c,
            Err(e) => return Ended::Refused(format!("the master's challenge: {e}")),
        };
    if let Err(e) = wr.write_all(hello.as_bytes()).await {
        return Ended::Refused(e.to_string());
    }
    let welcome = match read_line(&mut rd, &mut lines, &mut ready, "welcome").await {
        Ok(l) => l,
        Err(e) => {
            return Ended::Refused(format!(
                "{e}: does this node's report secret ([node] secret_file) match the master's?"
            ))
        }
    };
    match channel.welcome(&welcome) {
        Ok(()) => {}
        Err(e @ DecodeError::NotTheMaster) => {
            return Ended::Refused(format!(
                "{e}: something other than a master listens on {via}"
            ))
        }
        Err(e) => return Ended::Refused(e.to_string()),
    }
    if let Some((n, first, last)) = ring.take_dropped() {
        warn!(log, "Samples dropped while the master was unreachable";
            "count" => n, "first_seq" => first, "last_seq" => last, "buffer" => ring.cap);
    }
    info!(log, "Reporting to the master"; "resending" => ring.samples.len());
    let mut out = String::new();
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
        out.push_str(&channel.sample(&resent));
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
                if let Err(e) = wr.write_all(channel.sample(&s).as_bytes()).await {
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
    use crate::report::{Event, MasterChannel};

    const SECRET: &[u8] = b"a report secret of at least 32 chars";

    /// A stand-in master on an accepted connection: challenge, hello checked, welcome.
    struct Stand<S> {
        conn: S,
        ch: MasterChannel,
        lines: LineBuffer,
        hello: Hello,
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> Stand<S> {
        async fn greet(mut conn: S, via: &str, keys: &[&[u8]]) -> Result<Stand<S>, DecodeError> {
            let (mut ch, challenge) = MasterChannel::open(via);
            conn.write_all(challenge.as_bytes()).await.unwrap();
            let mut lines = LineBuffer::default();
            let mut buf = [0u8; 4096];
            loop {
                let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "closed before the hello");
                if let Some(line) = lines.push(&buf[..n]).unwrap().into_iter().next() {
                    let Event::Hello { hello, welcome, .. } = ch.accept(&line, keys, 0)? else {
                        unreachable!()
                    };
                    conn.write_all(welcome.as_bytes()).await.unwrap();
                    return Ok(Stand {
                        conn,
                        ch,
                        lines,
                        hello,
                    });
                }
            }
        }

        /// The next `n` samples, verified.
        async fn samples(&mut self, n: usize) -> Vec<CpuSample> {
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            while out.len() < n {
                let k = tokio::time::timeout(Duration::from_secs(5), self.conn.read(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(k > 0, "closed early");
                for l in self.lines.push(&buf[..k]).unwrap() {
                    match self.ch.accept(&l, &[], 0).unwrap() {
                        Event::Sample(s) => out.push(s),
                        other => panic!("{other:?}"),
                    }
                }
            }
            out
        }
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

    fn hello() -> Hello {
        Hello {
            node: "n1".into(),
            boot: 9,
            instance_id: None,
            uptime_ms: None,
            interval_ms: 1000,
            buffer: 4,
            nonce: String::new(),
        }
    }

    fn greeting(secret: &[u8]) -> Greeting {
        Greeting {
            hello: hello(),
            booted: Some(std::time::Instant::now() - Duration::from_secs(3600)),
            secret: Arc::new(secret.to_vec()),
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

    /// Against a real loopback listener standing in for the forward: samples buffered while
    /// nobody listens arrive after the welcome; after the listener drops the connection, the
    /// link reconnects and resends its buffer after a new hello.
    #[tokio::test]
    async fn buffers_reconnects_and_resends() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel(16);
        let log = Logger::root(slog::Discard, o!());
        let task = tokio::spawn(run(rx, Endpoint::Tcp(port), greeting(SECRET), 4, log));
        for i in 0..6 {
            tx.send(s(i)).await.unwrap();
        }
        let via = format!("tcp:{port}");
        let (conn, _) = listener.accept().await.unwrap();
        let mut m = Stand::greet(conn, &via, &[SECRET]).await.unwrap();
        assert!(
            m.hello.uptime_ms.is_some_and(|u| u >= 3_600_000),
            "the hello says how long the machine has been up: {:?}",
            m.hello
        );
        assert_eq!(m.hello.boot, 9);
        // Samples 0-5 raced with the connect: whatever was buffered comes first, in order.
        tx.send(s(6)).await.unwrap();
        let mut seqs = Vec::new();
        while seqs.last() != Some(&6) {
            seqs.extend(m.samples(1).await.iter().map(|c| c.seq));
        }
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        drop(m);
        tx.send(s(7)).await.unwrap();
        // A new connection, a new challenge, a new answer; the buffer comes again.
        let (conn, _) = listener.accept().await.unwrap();
        let mut m = Stand::greet(conn, &via, &[SECRET]).await.unwrap();
        let resent: Vec<u64> = m.samples(4).await.iter().map(|c| c.seq).collect();
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

    /// Something that is not a master (it cannot make the welcome) gets a hello and nothing
    /// else: no sample, and the link backs off instead of reconnecting at once.
    #[tokio::test]
    async fn nothing_goes_to_a_listener_without_the_secret() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel(16);
        let log = Logger::root(slog::Discard, o!());
        let _task = tokio::spawn(run(rx, Endpoint::Tcp(port), greeting(SECRET), 4, log));
        for i in 0..3 {
            tx.send(s(i)).await.unwrap();
        }
        let mut accepted = Vec::new();
        let start = std::time::Instant::now();
        // Four connections: the squatter's own challenge, a fake welcome, then reading what
        // else comes (nothing: the link closes it).
        for _ in 0..4 {
            let (mut conn, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
                .await
                .unwrap()
                .unwrap();
            accepted.push(start.elapsed());
            let (_, challenge) = MasterChannel::open(&format!("tcp:{port}"));
            conn.write_all(challenge.as_bytes()).await.unwrap();
            let fake =
                crate::report::encode(&crate::report::Frame::Welcome(crate::report::Welcome {
                    mac: "00".repeat(32),
                }));
            conn.write_all(fake.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut got))
                .await
                .unwrap()
                .unwrap();
            let text = String::from_utf8_lossy(&got);
            assert_eq!(text.lines().count(), 1, "only the hello: {text}");
            assert!(text.contains("\"type\":\"hello\""), "{text}");
        }
        // Backoff: 0.1-0.2, 0.2-0.4, 0.4-0.8 s between the attempts.
        let waited = accepted[3] - accepted[0];
        assert!(waited >= Duration::from_millis(700), "{accepted:?}");
    }

    /// An agent that waited for the forward before it was refused (a wrong secret: the
    /// connection closed after its hello, no welcome) backs off up to a minute, not at the
    /// reconnects' pace (5 s at most) its failed connects had set. Once the forward is gone
    /// (a renewal, a restart), the next one is waited for at the reconnects' pace again.
    /// Paused time: the backoff's sleeps pass at once. The port is held by a bound socket
    /// that does not listen (connects are refused) whenever nobody listens.
    #[tokio::test(start_paused = true)]
    async fn refusals_back_off_past_the_reconnect_cap() {
        use tokio::io::AsyncBufReadExt;
        let bound = || {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.set_reuseaddr(true).unwrap();
            s
        };
        let socket = bound();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let (_tx, rx) = mpsc::channel(16);
        let log = Logger::root(slog::Discard, o!());
        let _task = tokio::spawn(run(
            rx,
            Endpoint::Tcp(addr.port()),
            greeting(SECRET),
            4,
            log,
        ));
        // 0.1-0.2, 0.2-0.4, 0.4-0.8, 0.8-1.6 s: three or four failed connects.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let listener = socket.listen(16).unwrap();
        // Each connection refused: the challenge, the hello read, closed without a welcome.
        let refuse = |conn: tokio::net::TcpStream| async move {
            let mut conn = tokio::io::BufReader::new(conn);
            let (_, challenge) = MasterChannel::open(&format!("tcp:{}", addr.port()));
            let _ = conn.get_mut().write_all(challenge.as_bytes()).await;
            let mut hello = String::new();
            let _ = conn.read_line(&mut hello).await;
        };
        let mut at = Vec::new();
        for _ in 0..8 {
            let (conn, _) = listener.accept().await.unwrap();
            at.push(tokio::time::Instant::now());
            refuse(conn).await;
        }
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        // From 0.1-0.2 s doubling: the seventh wait is 6.4-12.8 s.
        assert!(
            gaps.iter().any(|g| *g > RECONNECT_MAX),
            "refusals retried at the reconnect pace: {gaps:?}"
        );
        // The forward goes away for a while (the agent's next tries fail to connect), then
        // comes back: it is found within the reconnects' cap, not the refusals' minute.
        drop(listener);
        let socket = bound();
        socket.bind(addr).unwrap();
        tokio::time::sleep(Duration::from_secs(40)).await;
        let listener = socket.listen(16).unwrap();
        let back = tokio::time::Instant::now();
        let _conn = listener.accept().await.unwrap();
        assert!(
            back.elapsed() <= RECONNECT_MAX,
            "the forward found {:?} after it came back",
            back.elapsed()
        );
    }

    /// Unix sockets: a socket nobody listens on (left behind by sshd) is removed, and the
    /// link reports once a master listens there again.
    #[tokio::test]
    async fn a_stale_socket_is_removed_and_the_link_reports_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        // A socket file with no listener: bound, then closed.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (tx, rx) = mpsc::channel(16);
        let log = Logger::root(slog::Discard, o!());
        let endpoint = Endpoint::Unix(path.clone());
        let via = endpoint.via();
        let _task = tokio::spawn(run(rx, endpoint, greeting(SECRET), 4, log));
        tx.send(s(0)).await.unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while path.exists() {
            assert!(std::time::Instant::now() < end, "the stale socket stayed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (conn, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut m = Stand::greet(conn, &via, &[SECRET]).await.unwrap();
        assert_eq!(m.samples(1).await[0].seq, 0);
    }
}
