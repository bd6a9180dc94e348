//! Helpers shared by the integration tests: running the built binary in a temp dir, and
//! finding the real tools (HAProxy, sshd, moto) the edge tests need.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The built `autoscaler` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_autoscaler"))
}

/// A temp dir with `autoscaler init --dir` done in it; commands run with its config.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    /// A fresh, initialised configuration directory (role master).
    pub fn new() -> Sandbox {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = Sandbox { dir };
        let out = s.run(&["init", "--dir", s.path().to_str().unwrap()]);
        assert!(out.status.success(), "init failed: {}", stderr(&out));
        s
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> PathBuf {
        self.path().join("autoscaler.ini")
    }

    /// Runs the binary with this sandbox's configuration.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("AUTOSCALER_CONFIG", self.config())
            .env_remove("RUST_LOG")
            .output()
            .expect("run autoscaler")
    }

    /// Replaces `key = …` in `[section]` of the sandbox's autoscaler.ini.
    pub fn set(&self, section: &str, key: &str, value: &str) {
        let text = std::fs::read_to_string(self.config()).unwrap();
        let mut out = String::new();
        let mut current = String::new();
        let mut done = false;
        for line in text.lines() {
            if let Some(s) = line.strip_prefix('[') {
                current = s.trim_end_matches(']').to_string();
            }
            if current == section && line.split_once(" = ").is_some_and(|(k, _)| k == key) {
                out.push_str(&format!("{key} = {value}\n"));
                done = true;
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        assert!(done, "[{section}] {key} not found");
        std::fs::write(self.config(), out).unwrap();
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Finds a program on PATH or at one of the usual sbin paths. A test that needs it and does not
/// find it says so loudly and returns early; `.ci/run` installs every such tool.
pub fn tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    let found = dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file());
    if found.is_none() {
        eprintln!(
            "\n=============================================================\n\
             SKIPPED: `{name}` is not installed; this test needs the real one.\n\
             Install it (bash .ci/run does) and run the tests again.\n\
             =============================================================\n"
        );
    }
    found
}
