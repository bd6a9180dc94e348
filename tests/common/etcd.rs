//! A real etcd (Debian's etcd-server) on loopback, one member, its data in a temp dir; it can
//! be stopped and started again on the same data (an outage). Killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, tool};

pub struct Etcd {
    pub endpoint: String,
    bin: PathBuf,
    peer_port: u16,
    /// Plain-HTTP /health and /metrics, whatever the client URLs are.
    metrics_port: u16,
    /// Flags beyond the one-member set-up (TLS).
    extra: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// A test CA, a server certificate for 127.0.0.1 and a client certificate, made with
/// `openssl` (EC P-256, valid a day).
pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    /// None (loudly) when openssl is not installed.
    pub fn make() -> Option<Certs> {
        let openssl = tool("openssl")?;
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new(&openssl)
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "1",
                "-subj",
                "/CN=autoscaler test CA",
            ],
        ]
        .concat());
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.path().join(format!("{name}.ext")), ext).unwrap();
            let (key, csr, pem, extfile) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            run(&[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                    "-subj",
                    &format!("/CN={name}"),
                ],
            ]
            .concat());
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "1",
                "-extfile",
                &extfile,
            ]);
        }
        // Private keys are credentials: only their owner reads them (the client refuses more).
        for key in ["ca.key", "server.key", "client.key"] {
            std::fs::set_permissions(
                dir.path().join(key),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
        }
        Some(Certs { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Etcd {
    /// A fresh member, healthy; None (loudly) when etcd is not installed.
    pub fn start() -> Option<Etcd> {
        Etcd::start_with(None)
    }

    /// A member serving its clients over TLS only, and only to clients with a certificate
    /// signed by `certs`' CA.
    pub fn start_tls(certs: &Certs) -> Option<Etcd> {
        Etcd::start_with(Some(certs))
    }

    fn start_with(tls: Option<&Certs>) -> Option<Etcd> {
        let bin = tool("etcd")?;
        let (client_port, peer_port, metrics_port) = (
            free_port("127.0.0.1"),
            free_port("127.0.0.1"),
            free_port("127.0.0.1"),
        );
        let (scheme, extra) = match tls {
            None => ("http", Vec::new()),
            Some(c) => (
                "https",
                vec![
                    "--cert-file".into(),
                    c.path("server.pem").display().to_string(),
                    "--key-file".into(),
                    c.path("server.key").display().to_string(),
                    "--client-cert-auth".into(),
                    "--trusted-ca-file".into(),
                    c.path("ca.pem").display().to_string(),
                ],
            ),
        };
        let mut e = Etcd {
            endpoint: format!("{scheme}://127.0.0.1:{client_port}"),
            bin,
            peer_port,
            metrics_port,
            extra,
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
        let p = self.peer_port;
        let child = Command::new(&self.bin)
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &self.endpoint,
                "--advertise-client-urls",
                &self.endpoint,
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{p}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{p}"),
                "--initial-cluster",
                &format!("t=http://127.0.0.1:{p}"),
                "--initial-cluster-state",
                "new",
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{}", self.metrics_port),
                "--log-level",
                "error",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("etcd.log")).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(20);
        while !self.healthy() {
            assert!(
                Instant::now() < end,
                "etcd not healthy within 20 s: {}",
                std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `/health` says true (the member has a leader and answers).
    pub fn healthy(&self) -> bool {
        super::http_get_try(&format!("127.0.0.1:{}", self.metrics_port), "/health")
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
