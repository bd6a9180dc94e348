//! Sockets read on a shared beat instead of on every packet.
//!
//! Each SSH session from the master to a node carries one small packet per report. Read as
//! they arrive, every packet wakes a runtime worker from its sleep: at 1,000 reports a second
//! the master spent more on waking up (the kernel's task switch, the scheduler) than on the
//! reports. A [`Pacer`] watches its sockets on an epoll instance of its own, which sits in the
//! and, once every beat (`pace`), wakes every session whose socket became ready since the
//! last beat. Under load that is one wake-up per beat for all the sessions, whatever their
//! number, and one `epoll_wait` that does not block; a pacer with no socket does not beat. The
//! price is at most one beat of delay on each read, which a report (averaged over windows of
//! many seconds) and an SSH handshake (a few round trips) can afford.
//!
//! Writes go out at once; a write that finds the socket's buffer full waits for the beat that
//! sees it writable.

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Token};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Events taken from the pacer's epoll per system call.
const EVENTS: usize = 1024;

/// Paces the reads of the sockets it is given (see the module). Cheap to create: its epoll
/// instance and the task that beats are made with the first socket, on that caller's runtime,
/// and end when the pacer and all its sockets are dropped.
pub struct Pacer {
    pace: Duration,
    shared: OnceLock<Arc<Shared>>,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer").field("pace", &self.pace).finish()
    }
}

/// What the pacer's task and its sockets share.
struct Shared {
    registry: mio::Registry,
    slots: Mutex<Slots>,
    /// Told of each new socket (a pacer with none waits for one), and of the end.
    added: Arc<Notify>,
    /// Beats that woke at least one task.
    wakeups: AtomicU64,
}

impl Drop for Shared {
    /// The last socket and the pacer are gone: the task, perhaps waiting for a socket, ends.
    fn drop(&mut self) {
        self.added.notify_one();
    }
}

#[derive(Default)]
struct Slots {
    next: usize,
    by_token: HashMap<usize, Slot>,
}

/// One socket's two directions.
#[derive(Default)]
struct Slot {
    read: Side,
    write: Side,
}

/// A direction of a socket: the task waiting on it, and whether the socket became ready since
/// that task last looked (an edge the task must not miss).
#[derive(Default)]
struct Side {
    waker: Option<Waker>,
    ready: bool,
    /// The peer hung up or the socket failed: ready for good (no edge will come again).
    closed: bool,
}

#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

impl Slot {
    fn side(&mut self, dir: Dir) -> &mut Side {
        match dir {
            Dir::Read => &mut self.read,
            Dir::Write => &mut self.write,
        }
    }
}

impl Pacer {
    /// A pacer that waits `pace` between a socket becoming ready and waking its reader.
    pub fn new(pace: Duration) -> Pacer {
        Pacer {
            pace,
            shared: OnceLock::new(),
        }
    }

    pub fn pace(&self) -> Duration {
        self.pace
    }

    /// How many beats have woken at least one task: the wake-ups the pacer's sockets cost.
    pub fn wakeups(&self) -> u64 {
        self.shared
            .get()
            .map_or(0, |s| s.wakeups.load(Ordering::Relaxed))
    }

    /// `socket`, read on this pacer's beat. Must be called on a tokio runtime (the first call
    /// starts the beat there).
    pub fn stream(&self, socket: std::net::TcpStream) -> io::Result<PacedStream> {
        socket.set_nonblocking(true)?;
        let shared = match self.shared.get() {
            Some(s) => s.clone(),
            None => {
                let started = self.start()?;
                // Two first callers at once: one wins, the other's beat ends with its Arc.
                self.shared.get_or_init(|| started).clone()
            }
        };
        let mut io = MioStream::from_std(socket);
        let token = {
            let mut slots = lock(&shared.slots);
            let token = slots.next;
            slots.next += 1;
            slots.by_token.insert(token, Slot::default());
            token
        };
        shared.added.notify_one();
        if let Err(e) = shared.registry.register(
            &mut io,
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            lock(&shared.slots).by_token.remove(&token);
            return Err(e);
        }
        Ok(PacedStream {
            io,
            token,
            shared,
            drained: false,
        })
    }

    fn start(&self) -> io::Result<Arc<Shared>> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let added = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            registry,
            slots: Mutex::default(),
            added: added.clone(),
            wakeups: AtomicU64::new(0),
        });
        tokio::spawn(beat(poll, Arc::downgrade(&shared), added, self.pace));
        Ok(shared)
    }
}

/// The pacer's task: once every beat, wakes the tasks of every socket that became ready
/// since the last; waits for a socket while it has none, and ends with the pacer.
async fn beat(mut poll: mio::Poll, shared: Weak<Shared>, added: Arc<Notify>, pace: Duration) {
    let mut events = Events::with_capacity(EVENTS);
    let mut wake = Vec::new();
    loop {
        let idle = match shared.upgrade() {
            Some(s) => lock(&s.slots).by_token.is_empty(),
            None => return,
        };
        if idle {
            // Woken by the next socket, or by the end (the upgrade above then fails).
            added.notified().await;
            continue;
        }
        tokio::time::sleep(pace).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut woke = false;
        loop {
            match poll.poll(&mut events, Some(Duration::ZERO)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
            let mut taken = 0;
            {
                let mut slots = lock(&shared.slots);
                for event in events.iter() {
                    taken += 1;
                    let Some(slot) = slots.by_token.get_mut(&event.token().0) else {
                        continue;
                    };
                    // An error or a hang-up ends both directions: each side's next call
                    // returns it.
                    let broken = event.is_error();
                    if broken || event.is_readable() || event.is_read_closed() {
                        wake.extend(fire(&mut slot.read, broken || event.is_read_closed()));
                    }
                    if broken || event.is_writable() || event.is_write_closed() {
                        wake.extend(fire(&mut slot.write, broken || event.is_write_closed()));
                    }
                }
            }
            for w in wake.drain(..) {
                woke = true;
                w.wake();
            }
            if taken < EVENTS {
                break;
            }
        }
        if woke {
            shared.wakeups.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Marks `side` ready; its waiting task, to wake once the lock is released.
fn fire(side: &mut Side, closed: bool) -> Option<Waker> {
    side.ready = true;
    side.closed |= closed;
    side.waker.take()
}

fn lock(m: &Mutex<Slots>) -> MutexGuard<'_, Slots> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A TCP stream whose readiness comes from its [`Pacer`]'s beat.
pub struct PacedStream {
    io: MioStream,
    token: usize,
    shared: Arc<Shared>,
    /// The last read returned less than it asked for: the socket had nothing more then, and
    /// anything that comes later brings an edge of its own, so the next read waits for that
    /// edge instead of asking the kernel only to hear "would block" (a system call per packet).
    drained: bool,
}

impl std::fmt::Debug for PacedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacedStream")
            .field("peer", &self.io.peer_addr().ok())
            .finish()
    }
}

impl PacedStream {
    /// Forgets an edge already seen: the caller is about to try the socket itself.
    fn begin(&self, dir: Dir) {
        if let Some(slot) = lock(&self.shared.slots).by_token.get_mut(&self.token) {
            slot.side(dir).ready = false;
        }
    }

    /// After the socket said "would block" (or a short read): true if it became ready since
    /// [`begin`](Self::begin) or was closed (try again), else the task is parked until the
    /// beat that sees it ready.
    fn park(&self, dir: Dir, waker: &Waker) -> bool {
        let mut slots = lock(&self.shared.slots);
        let Some(slot) = slots.by_token.get_mut(&self.token) else {
            return true;
        };
        let side = slot.side(dir);
        if std::mem::take(&mut side.ready) || side.closed {
            return true;
        }
        match &mut side.waker {
            Some(w) if w.will_wake(waker) => {}
            w => *w = Some(waker.clone()),
        }
        false
    }

    /// Runs `op` on the socket until it does not block, parking when it does.
    fn attempt<T>(
        &self,
        dir: Dir,
        cx: &Context<'_>,
        mut op: impl FnMut(&MioStream) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        self.begin(dir);
        self.retry(dir, cx, &mut op)
    }

    /// As [`attempt`](Self::attempt), the socket's last edge already taken.
    fn retry<T>(
        &self,
        dir: Dir,
        cx: &Context<'_>,
        op: &mut impl FnMut(&MioStream) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            match op(&self.io) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.park(dir, cx.waker()) {
                        return Poll::Pending;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                done => return Poll::Ready(done),
            }
        }
    }
}

impl AsyncRead for PacedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let want = buf.remaining();
        let mut read = |mut io: &MioStream| io.read(buf.initialize_unfilled());
        let done = if this.drained {
            // Parked at once unless an edge came since the short read.
            if !this.park(Dir::Read, cx.waker()) {
                return Poll::Pending;
            }
            this.retry(Dir::Read, cx, &mut read)
        } else {
            this.attempt(Dir::Read, cx, read)
        };
        let n = match done {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                this.drained = false;
                return Poll::Pending;
            }
        };
        this.drained = n > 0 && n < want;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for PacedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.attempt(Dir::Write, cx, |mut io| io.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.attempt(Dir::Write, cx, |mut io| io.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(match self.io.shutdown(Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
            _ => Ok(()),
        })
    }
}

impl Drop for PacedStream {
    fn drop(&mut self) {
        let _ = self.shared.registry.deregister(&mut self.io);
        lock(&self.shared.slots).by_token.remove(&self.token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair on loopback: (the paced end, the plain peer).
    fn pair(pacer: &Pacer) -> (PacedStream, tokio::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        theirs.set_nonblocking(true).unwrap();
        (
            pacer.stream(ours).unwrap(),
            tokio::net::TcpStream::from_std(theirs).unwrap(),
        )
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    const BOUND: Duration = Duration::from_secs(20);

    /// Megabytes both ways at once: the paced side's writes fill the socket buffer and wait
    /// for the beat that sees it drained, its reads wait for the beat that sees data; nothing
    /// is lost, reordered or stuck.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_transfers_both_ways_arrive_whole() {
        let pacer = Pacer::new(Duration::from_millis(5));
        let (ours, theirs) = pair(&pacer);
        let (mut our_rd, mut our_wr) = tokio::io::split(ours);
        let (mut their_rd, mut their_wr) = theirs.into_split();
        let out = pattern(8 << 20, 1);
        let back = pattern(8 << 20, 7);
        let (o, b) = (out.clone(), back.clone());
        let work = async move {
            let send = tokio::spawn(async move {
                our_wr.write_all(&o).await.unwrap();
                our_wr.shutdown().await.unwrap();
            });
            let answer = tokio::spawn(async move {
                their_wr.write_all(&b).await.unwrap();
                their_wr.shutdown().await.unwrap();
            });
            let mut got_there = Vec::new();
            let mut got_back = Vec::new();
            let (r1, r2) = tokio::join!(
                their_rd.read_to_end(&mut got_there),
                our_rd.read_to_end(&mut got_back)
            );
            r1.unwrap();
            r2.unwrap();
            send.await.unwrap();
            answer.await.unwrap();
            (got_there, got_back)
        };
        let (got_there, got_back) = tokio::time::timeout(BOUND, work).await.expect("stuck");
        assert!(got_there == out, "paced writes arrived changed");
        assert!(got_back == back, "paced reads returned changed data");
    }

    /// Packets that arrive on many sockets within one beat are read after one wake-up, not
    /// one each: what the pacer is for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn packets_on_many_sockets_cost_one_wake_up_per_beat() {
        const N: usize = 50;
        let pacer = Pacer::new(Duration::from_millis(200));
        let mut ours = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..N {
            let (o, t) = pair(&pacer);
            ours.push(o);
            peers.push(t);
        }
        // Every reader parked, and the writable edges of the new sockets taken.
        let readers: Vec<_> = ours
            .into_iter()
            .map(|mut o| {
                tokio::spawn(async move {
                    let mut b = [0u8; 16];
                    let n = o.read(&mut b).await.unwrap();
                    b[..n].to_vec()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = pacer.wakeups();
        for (i, p) in peers.iter_mut().enumerate() {
            p.write_all(format!("report {i}").as_bytes()).await.unwrap();
        }
        for (i, r) in readers.into_iter().enumerate() {
            let got = tokio::time::timeout(BOUND, r)
                .await
                .expect("stuck")
                .unwrap();
            assert_eq!(got, format!("report {i}").as_bytes());
        }
        let cost = pacer.wakeups() - before;
        // The writes take well under a beat; they may straddle one.
        assert!((1..=2).contains(&cost), "{N} packets took {cost} wake-ups");
    }

    /// Round trips one small message at a time: every read is short, so the next one waits
    /// for the socket's next edge instead of asking the kernel; none is missed.
    #[tokio::test]
    async fn a_read_after_a_short_read_waits_for_the_next_packet() {
        let pacer = Pacer::new(Duration::from_millis(1));
        let (mut ours, mut theirs) = pair(&pacer);
        let work = async {
            for i in 0..200u32 {
                theirs.write_all(&i.to_be_bytes()).await.unwrap();
                let mut b = [0u8; 64];
                let n = ours.read(&mut b).await.unwrap();
                assert_eq!(&b[..n], i.to_be_bytes());
                assert!(ours.drained, "a short read left the stream undrained");
                ours.write_all(&b[..n]).await.unwrap();
                let mut back = [0u8; 4];
                theirs.read_exact(&mut back).await.unwrap();
                assert_eq!(back, i.to_be_bytes());
            }
        };
        tokio::time::timeout(BOUND, work).await.expect("stuck");
    }

    /// The peer's end of the stream and a reset both reach the reader.
    #[tokio::test]
    async fn a_hang_up_and_a_reset_reach_the_reader() {
        let pacer = Pacer::new(Duration::from_millis(5));
        let (mut ours, theirs) = pair(&pacer);
        let read = tokio::spawn(async move {
            let mut all = Vec::new();
            ours.read_to_end(&mut all).await.map(|_| all)
        });
        let mut theirs = theirs;
        theirs.write_all(b"last words").await.unwrap();
        drop(theirs);
        let got = tokio::time::timeout(BOUND, read).await.expect("stuck");
        assert_eq!(got.unwrap().unwrap(), b"last words");

        let (mut ours, theirs) = pair(&pacer);
        // A close with data left unread makes the kernel answer with a reset.
        ours.write_all(b"never read").await.unwrap();
        let mut peek = [0u8; 1];
        theirs.peek(&mut peek).await.unwrap();
        let read = tokio::spawn(async move {
            let mut b = [0u8; 8];
            ours.read(&mut b).await
        });
        drop(theirs);
        let got = tokio::time::timeout(BOUND, read)
            .await
            .expect("stuck")
            .unwrap();
        match got {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            Ok(n) => panic!("a reset read as {n} bytes"),
        }
    }

    /// The race a pacer must not lose: the socket said "would block", then, before its reader
    /// parked, data came and the beat took the socket's only edge. The reader must try again
    /// instead of sleeping until some later packet.
    #[tokio::test]
    async fn an_edge_between_would_block_and_parking_is_not_lost() {
        let pacer = Pacer::new(Duration::from_millis(1));
        let (ours, mut theirs) = pair(&pacer);
        ours.begin(Dir::Read);
        let mut b = [0u8; 8];
        let would_block = (&ours.io).read(&mut b).unwrap_err();
        assert_eq!(would_block.kind(), io::ErrorKind::WouldBlock);
        theirs.write_all(b"late").await.unwrap();
        let deadline = tokio::time::Instant::now() + BOUND;
        while !lock(&ours.shared.slots).by_token[&ours.token].read.ready {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the beat never saw the data"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(ours.park(Dir::Read, Waker::noop()), "parked past the edge");
        let n = (&ours.io).read(&mut b).unwrap();
        assert_eq!(&b[..n], b"late");
    }

    /// The beat is a task while the pacer or a socket lives, and no longer.
    #[tokio::test]
    async fn the_beat_ends_with_the_pacer_and_its_sockets() {
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.num_alive_tasks();
        let pacer = Pacer::new(Duration::from_millis(5));
        let (ours, theirs) = pair(&pacer);
        assert_eq!(metrics.num_alive_tasks(), before + 1, "no beat started");
        drop(pacer);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            metrics.num_alive_tasks(),
            before + 1,
            "the beat ended under a live socket"
        );
        drop((ours, theirs));
        let deadline = tokio::time::Instant::now() + BOUND;
        while metrics.num_alive_tasks() > before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the beat outlived its pacer"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
