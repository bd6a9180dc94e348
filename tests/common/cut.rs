//! A TCP forwarder on loopback that can cut the connection to its target, as a network
//! partition does: established connections are shut down and new ones closed at once, until
//! it heals. Threads, bounded by the connections it carries; everything stops when dropped.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Cut {
    /// `127.0.0.1:PORT` to connect to instead of the target.
    pub addr: String,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Cut {
    pub fn to(target: &str) -> Cut {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (cut, stop) = (Arc::<AtomicBool>::default(), Arc::<AtomicBool>::default());
        let open = Arc::<Mutex<Vec<TcpStream>>>::default();
        let (c, s, o, target) = (cut.clone(), stop.clone(), open.clone(), target.to_string());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let _ = down.set_nonblocking(false);
                let Ok(up) = TcpStream::connect(&target) else {
                    continue;
                };
                let mut kept = o.lock().unwrap();
                for (mut from, mut to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up.try_clone().unwrap(), down.try_clone().unwrap()),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
                kept.extend([down, up]);
            }
        });
        Cut {
            addr,
            cut,
            stop,
            open,
        }
    }

    /// The partition starts: every carried connection is shut down, new ones are refused.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// The partition ends.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}
