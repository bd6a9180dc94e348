//! A TCP forwarder on loopback that can cut the connection to its target, as a network
//! partition does: either closed (established connections shut down, new ones closed at once)
//! or a black hole (nothing gets through either way, and nothing is closed: packets dropped,
//! as a partition usually looks), until it heals; or slow (every byte delivered a fixed time
//! after it arrived: requests time out, nothing is lost or closed). Threads, bounded by the
//! connections it carries; everything stops when dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const OPEN: u8 = 0;
const CLOSED: u8 = 1;
const HOLE: u8 = 2;

pub struct Cut {
    /// `127.0.0.1:PORT` to connect to instead of the target.
    pub addr: String,
    mode: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    /// Added latency, in milliseconds (0: none).
    latency: Arc<AtomicU64>,
}

/// Copies `from` to `to` while the link is open; in a black hole, reads and drops. Each
/// chunk is written `latency` after it was read (by a writer thread, so delays do not add up).
fn pump(
    mut from: TcpStream,
    to: TcpStream,
    mode: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    latency: Arc<AtomicU64>,
) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, Vec<u8>)>();
    let mut out = to.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for (due, chunk) in rx {
            let now = std::time::Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if out.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; 16384];
    while !stop.load(Ordering::SeqCst) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if mode.load(Ordering::SeqCst) == HOLE {
                    continue;
                }
                let due = std::time::Instant::now()
                    + Duration::from_millis(latency.load(Ordering::SeqCst));
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = to.shutdown(Shutdown::Both);
}

impl Cut {
    pub fn to(target: &str) -> Cut {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (mode, stop) = (Arc::<AtomicU8>::default(), Arc::<AtomicBool>::default());
        let open = Arc::<Mutex<Vec<TcpStream>>>::default();
        let latency = Arc::<AtomicU64>::default();
        let (m, s, o, target) = (mode.clone(), stop.clone(), open.clone(), target.to_string());
        let l = latency.clone();
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = down.set_nonblocking(false);
                match m.load(Ordering::SeqCst) {
                    CLOSED => continue, // dropped: closed at once
                    HOLE => {
                        // Accepted, and never answered.
                        o.lock().unwrap().push(down);
                        continue;
                    }
                    _ => {}
                }
                let Ok(up) = TcpStream::connect(&target) else {
                    continue;
                };
                let mut kept = o.lock().unwrap();
                for (from, to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up.try_clone().unwrap(), down.try_clone().unwrap()),
                ] {
                    let (m, s, l) = (m.clone(), s.clone(), l.clone());
                    std::thread::spawn(move || pump(from, to, m, s, l));
                }
                kept.extend([down, up]);
            }
        });
        Cut {
            addr,
            mode,
            stop,
            open,
            latency,
        }
    }

    /// Every byte from now on is delivered `d` after it arrived, both ways (zero: at once).
    pub fn slow(&self, d: Duration) {
        self.latency.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// The partition starts: every carried connection is shut down, new ones are refused.
    pub fn cut(&self) {
        self.mode.store(CLOSED, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// The partition starts as a black hole: nothing gets through, nothing is closed; new
    /// connections are accepted and never answered.
    pub fn black_hole(&self) {
        self.mode.store(HOLE, Ordering::SeqCst);
    }

    /// The partition ends: a black hole's connections are closed (as a peer that finally
    /// times them out would), new ones go through.
    pub fn heal(&self) {
        if self.mode.swap(OPEN, Ordering::SeqCst) == HOLE {
            for s in self.open.lock().unwrap().drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}
