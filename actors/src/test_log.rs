//! Unit tests' log capture: every record as one "msg key=value …" line.

use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Lines(pub Arc<Mutex<Vec<String>>>);

struct Kv(String);

impl slog::Serializer for Kv {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
        self.0.push_str(&format!(" {key}={val}"));
        Ok(())
    }
}

impl slog::Drain for Lines {
    type Ok = ();
    type Err = slog::Never;
    fn log(&self, r: &slog::Record, kv: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let mut line = Kv(r.msg().to_string());
        let _ = slog::KV::serialize(&r.kv(), r, &mut line);
        let _ = slog::KV::serialize(kv, r, &mut line);
        self.0.lock().unwrap().push(line.0);
        Ok(())
    }
}

impl Lines {
    /// The lines logged so far that start with `msg`.
    pub fn starting(&self, msg: &str) -> Vec<String> {
        let all = self.0.lock().unwrap();
        all.iter().filter(|l| l.starts_with(msg)).cloned().collect()
    }
}
