//! Launch intents: a decision is written to `state_dir/intents/` before any API call, so a
//! master killed mid-launch finds, on its next start, which decisions may have instances.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::LaunchError;
use crate::adapters::files;

/// A launch intent on disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Intent {
    pub decision_id: String,
    pub count: u32,
    pub at_ms: u64,
}

fn intents_dir(state: &Path) -> PathBuf {
    state.join("intents")
}

/// Records `i` durably; returns the file to remove once the launch is settled.
pub fn write_intent(state: &Path, i: &Intent) -> Result<PathBuf, LaunchError> {
    let dir = intents_dir(state);
    let path = dir.join(format!("{}.json", i.decision_id));
    let write = || -> std::io::Result<()> {
        files::create_dir_all(&dir, 0o700)?;
        files::atomic_write(
            &path,
            serde_json::to_string(i).unwrap_or_default().as_bytes(),
            0o600,
        )
    };
    write().map_err(|source| LaunchError::Intent {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Every intent left in the state directory (a launch that did not finish).
pub fn pending_intents(state: &Path) -> Vec<(PathBuf, Intent)> {
    let Ok(entries) = std::fs::read_dir(intents_dir(state)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            Some((e.path(), serde_json::from_str(&text).ok()?))
        })
        .collect()
}

/// Wall-clock milliseconds, for records that outlive the process.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intents_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let i = Intent {
            decision_id: "d-1".into(),
            count: 2,
            at_ms: 5,
        };
        let p = write_intent(tmp.path(), &i).unwrap();
        assert_eq!(pending_intents(tmp.path()), vec![(p, i)]);
    }
}
