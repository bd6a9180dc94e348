//! What russh alone costs the master per report: report-floor's reader (tokio multi-thread,
//! one worker per core, loopback TCP read through a 4 KiB buffer) with an SSH session on
//! each connection, set up as the master's are — the client side (the master) asks for a
//! remote forward, the server side (standing in for sshd) opens a forwarded-tcpip channel on
//! it and sends one report-sized line per `CHANNEL_DATA` packet, in the cipher russh prefers
//! (ChaCha20-Poly1305, as with OpenSSH's sshd). The client's handler only counts lines in
//! russh's `Handler::data`: no frame decoding, MAC or book (the master's own work on a report).
//!
//! Next to report-floor in one invocation, it splits the master's CPU per report
//! (benches/master-fanin.sh) three ways: the floor (kernel, wake-ups, tokio), russh's packet
//! handling (this minus the floor), and the project's own (the master minus this).
//!
//! N sessions, each carrying RATE lines a second for DURATION seconds, in the same two
//! arrival patterns as report-floor (burst: every channel's line at once; spread: evenly
//! spaced). CPU is the client runtime's worker threads' (utime + stime from /proc), not the
//! server side's, which runs on a runtime of its own.
//! Usage: `cargo bench --bench report-ssh -- [N=200] [RATE=5] [DURATION=20]` (needs
//! `ssh-keygen`); a filter that does not name this bench skips it.
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};
use russh::{client, server, ChannelId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "report_load.rs"]
mod report_load;
use report_load::{Load, Run, LINE};

const WORKER: &str = "ssh-worker";

fn main() {
    let Some(load) = Load::from_args("report-ssh") else {
        return;
    };
    let keys = tempfile::tempdir().expect("a directory for throwaway keys");
    let key = |name: &str| -> PrivateKey {
        let path = keys.path().join(name);
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&path)
            .status()
            .expect("ssh-keygen (openssh-client)");
        assert!(st.success(), "ssh-keygen failed");
        russh::keys::load_secret_key(&path, None).expect("a key ssh-keygen wrote")
    };
    let (host_key, user_key) = (key("host"), Arc::new(key("user")));
    for spread in [false, true] {
        run(load.n, load.rate, load.dur, spread, &host_key, &user_key).report(
            &load,
            "SSH sessions",
            spread,
        );
    }
}

/// The stand-in for sshd: accepts any key, grants every forward and hands the session's
/// handle to the driver, which opens the forwarded channel on it.
struct Server {
    granted: Arc<Mutex<Vec<(server::Handle, u32)>>>,
}

impl server::Handler for Server {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: server::VerifiedPublicKey<'_>,
    ) -> Result<server::Auth, Self::Error> {
        Ok(server::Auth::Accept)
    }

    async fn tcpip_forward(
        &mut self,
        _address: &str,
        port: &mut u32,
        session: &mut server::Session,
    ) -> Result<bool, Self::Error> {
        self.granted
            .lock()
            .expect("granted")
            .push((session.handle(), *port));
        Ok(true)
    }
}

/// The master's side, doing nothing with a report but count its lines.
struct Master {
    lines: Arc<AtomicU64>,
    channels: Vec<russh::ChannelWriteHalf<client::Msg>>,
}

impl client::Handler for Master {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        // The writing half kept and the reading half dropped, as the master does: russh
        // offers each data message to the channel's queue (a failed send once its reader is
        // gone) before `Handler::data`; a reader kept and never read would fill the queue
        // (100 messages) and stall the session.
        let (_read, write) = channel.split();
        self.channels.push(write);
        Ok(())
    }

    async fn data(
        &mut self,
        _channel: ChannelId,
        data: &[u8],
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let n = data.iter().filter(|b| **b == b'\n').count();
        self.lines.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }
}

fn run(
    n: usize,
    rate: u64,
    dur: Duration,
    spread: bool,
    host_key: &PrivateKey,
    user_key: &Arc<PrivateKey>,
) -> Run {
    let master_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(WORKER)
        .build()
        .expect("tokio runtime");
    let sshd_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sshd-stand-in")
        .build()
        .expect("tokio runtime");
    let granted = Arc::new(Mutex::new(Vec::new()));
    let listener = sshd_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("listen on loopback");
    let addr = listener.local_addr().expect("local address");
    let config = Arc::new(server::Config {
        keys: vec![host_key.clone()],
        ..Default::default()
    });
    let to_grant = granted.clone();
    sshd_rt.spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let _ = socket.set_nodelay(true);
            let (config, granted) = (config.clone(), to_grant.clone());
            tokio::spawn(async move {
                if let Ok(session) = server::run_stream(config, socket, Server { granted }).await {
                    let _ = session.await;
                }
            });
        }
    });
    let lines = Arc::new(AtomicU64::new(0));
    // The master's sessions: its client configuration (keepalive as `[ssh] keepalive`'s
    // default, 15 s), its buffered read of the socket, a forward each.
    let handles = master_rt.block_on(async {
        let config = Arc::new(client::Config {
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 3,
            ..Default::default()
        });
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let socket = tokio::net::TcpStream::connect(addr)
                .await
                .expect("connect to the SSH stand-in");
            socket.set_nodelay(true).expect("TCP_NODELAY");
            let stream = tokio::io::BufReader::with_capacity(4096, socket);
            let master = Master {
                lines: lines.clone(),
                channels: Vec::new(),
            };
            let mut h = client::connect_stream(config.clone(), stream, master)
                .await
                .expect("SSH handshake");
            let auth = h
                .authenticate_publickey("bench", PrivateKeyWithHashAlg::new(user_key.clone(), None))
                .await
                .expect("authentication");
            assert!(auth.success(), "the stand-in accepts any key");
            h.tcpip_forward("127.0.0.1", 10_000 + i as u32)
                .await
                .expect("remote forward");
            handles.push(h);
        }
        handles
    });
    let sessions: Vec<(server::Handle, u32)> =
        std::mem::take(&mut *granted.lock().expect("granted"));
    assert_eq!(sessions.len(), n, "every forward granted");
    // One forwarded channel per session, as an agent's connection makes.
    let channels: Vec<russh::Channel<server::Msg>> = sshd_rt.block_on(async {
        let mut out = Vec::with_capacity(n);
        for (h, port) in &sessions {
            let ch = h
                .channel_open_forwarded_tcpip("127.0.0.1", *port, "127.0.0.1", 40_000)
                .await
                .expect("forwarded channel opened");
            out.push(ch);
        }
        out
    });
    std::thread::sleep(Duration::from_millis(500));
    let (cpu0, sw0) = report_load::threads(WORKER);
    let period = Duration::from_secs(1) / rate as u32;
    let sent = sshd_rt.block_on(async {
        let start = tokio::time::Instant::now();
        let mut tick = start;
        let mut sent = 0u64;
        while tick - start < dur {
            for (i, ch) in channels.iter().enumerate() {
                ch.data(LINE).await.expect("a line sent");
                sent += 1;
                if spread {
                    tokio::time::sleep_until(tick + period * (i as u32 + 1) / n as u32).await;
                }
            }
            tick += period;
            tokio::time::sleep_until(tick).await;
        }
        sent
    });
    // Every line in before the count stops (bounded: 5 s).
    let deadline = Instant::now() + Duration::from_secs(5);
    while lines.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (cpu1, sw1) = report_load::threads(WORKER);
    drop(channels);
    drop(handles);
    master_rt.shutdown_timeout(Duration::from_secs(1));
    sshd_rt.shutdown_timeout(Duration::from_secs(1));
    Run {
        sent,
        read: lines.load(Ordering::Relaxed),
        cpu: cpu1.saturating_sub(cpu0),
        switches: sw1.saturating_sub(sw0),
    }
}
