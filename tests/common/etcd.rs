//! A real etcd (Debian's etcd-server) on loopback, one member, its data in a temp dir; it can
//! be stopped and started again on the same data (an outage). Killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, tool};

pub struct Etcd {
    pub endpoint: String,
    bin: PathBuf,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Etcd {
    /// A fresh member, healthy; None (loudly) when etcd is not installed.
    pub fn start() -> Option<Etcd> {
        let bin = tool("etcd")?;
        let (client_port, peer_port) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
        let mut e = Etcd {
            endpoint: format!("http://127.0.0.1:{client_port}"),
            bin,
            client_port,
            peer_port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        e.resume();
        Some(e)
    }

    /// Starts the member again on its data (after [`Etcd::stop`]) and waits until it is
    /// healthy.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd is running already");
        let (c, p) = (self.client_port, self.peer_port);
        let child = Command::new(&self.bin)
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{c}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{c}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{p}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{p}"),
                "--initial-cluster",
                &format!("t=http://127.0.0.1:{p}"),
                "--initial-cluster-state",
                "new",
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("etcd.log")).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(20);
        while !self.healthy() {
            assert!(Instant::now() < end, "etcd not healthy within 20 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `/health` says true (the member has a leader and answers).
    pub fn healthy(&self) -> bool {
        super::http_get_try(&format!("127.0.0.1:{}", self.client_port), "/health")
            .is_some_and(|(code, body)| code == 200 && body.contains("\"health\":\"true\""))
    }

    /// SIGKILL: an outage (the data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
