//! The hosts.d directory: the single-master registry's durable state, one small file per host
//! (the format is [`Host::to_file_text`]), each written atomically.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;

use super::files;
use crate::hosts::{Host, HostKey, HOST_FILE_SUFFIX};

/// Errors of the hosts.d directory.
#[derive(Debug, Error)]
pub enum HostsError {
    #[error("cannot read hosts directory {path}: {source}")]
    ReadDir { path: PathBuf, source: io::Error },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("host {0} is not registered (see `autoscaler list-hosts`)")]
    NotFound(HostKey),
    #[error(transparent)]
    Etcd(#[from] super::etcd::EtcdError),
}

/// What [`HostsDir::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddOutcome {
    /// A new file was written.
    Added,
    /// The same host and port were already registered; nothing changed.
    AlreadyPresent,
    /// The host was present with other details (origin, instance id); its file was rewritten.
    Updated,
}

/// What a file read within this long of its last change said is not kept: the file system's
/// clock moves in ticks (a second on some), and a rewrite of the same size within the tick of
/// that change would keep the stamp (the "racily clean" case git knows). Such a file is read
/// again at the next load. Assumes hosts.d on a local file system, whose clock is this one's.
const RACY: Duration = Duration::from_secs(2);

/// The hosts.d directory: one file per host, written atomically.
#[derive(Debug, Clone)]
pub struct HostsDir {
    dir: PathBuf,
    /// What host files said, by name, with their stamps when read (shared by clones): the
    /// master reads hosts.d every second, and a file whose stamp did not change since is not
    /// opened and parsed again.
    seen: Arc<Mutex<Seen>>,
}

#[derive(Debug, Default)]
struct Seen {
    /// Only files that had settled when read (see [`RACY`]), and only what their text said:
    /// a failed read is tried again at the next load.
    files: HashMap<String, (Stamp, Result<Host, String>)>,
    /// Files opened and read, over all loads.
    reads: u64,
}

/// What a host file's inode says about it: any write or change of owner or mode moves
/// `ctime`, which nothing but the kernel sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Changed within `racy` of `now` (or in its future).
    fn recent(&self, now: SystemTime, racy: Duration) -> bool {
        let ctime = UNIX_EPOCH
            + Duration::from_secs(self.ctime.0.max(0) as u64)
            + Duration::from_nanos(self.ctime.1.max(0) as u64);
        now.duration_since(ctime).map_or(true, |age| age < racy)
    }
}

/// What the host file at `path` says, read at `read_at`, with the stamp to keep it under:
/// that of the inode it was read from (not of whatever its name points to a moment before
/// or after), and none when the read failed or the file had not settled (see [`RACY`]).
fn read_host(
    path: &Path,
    read_at: SystemTime,
    racy: Duration,
) -> (Option<Stamp>, Result<Host, String>) {
    let read = || -> io::Result<(Stamp, String)> {
        let mut file = fs::File::open(path)?;
        let stamp = Stamp::of(&file.metadata()?);
        let mut text = String::new();
        io::Read::read_to_string(&mut file, &mut text)?;
        Ok((stamp, text))
    };
    match read() {
        Ok((stamp, text)) => (
            (!stamp.recent(read_at, racy)).then_some(stamp),
            Host::from_file_text(&text),
        ),
        Err(e) => (None, Err(e.to_string())),
    }
}

impl HostsDir {
    /// A hosts directory at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> HostsDir {
        HostsDir {
            dir: dir.into(),
            seen: Arc::default(),
        }
    }

    /// Where it lives.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Every host file, each read unless its stamp is the one it had when last read. Files
    /// that cannot be parsed are returned as errors beside the hosts that could, so a caller
    /// decides whether one bad file stops it; the hosts are sorted by address and port.
    pub fn load(&self) -> Result<(Vec<Host>, Vec<HostsError>), HostsError> {
        self.load_with(RACY, SystemTime::now)
    }

    /// [`HostsDir::load`], with the racy window and the clock given.
    fn load_with(
        &self,
        racy: Duration,
        clock: impl Fn() -> SystemTime,
    ) -> Result<(Vec<Host>, Vec<HostsError>), HostsError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
            Err(source) => {
                return Err(HostsError::ReadDir {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let mut hosts = BTreeMap::new();
        let mut errors = Vec::new();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut files = HashMap::with_capacity(seen.files.len());
        for entry in entries {
            let entry = entry.map_err(|source| HostsError::ReadDir {
                path: self.dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !name.ends_with(HOST_FILE_SUFFIX) {
                continue;
            }
            let path = entry.path();
            let cached = seen.files.remove(name);
            // Followed as the read follows it: a host file may be a link.
            let parsed = match fs::metadata(&path) {
                Err(e) => Err(e.to_string()),
                // A FIFO would block the read, and the registry with it.
                Ok(m) if !m.is_file() => Err("not a regular file".to_string()),
                Ok(m) => {
                    let (stamp, parsed) = match cached {
                        Some((was, parsed)) if was == Stamp::of(&m) => (Some(was), parsed),
                        _ => {
                            seen.reads += 1;
                            read_host(&path, clock(), racy)
                        }
                    };
                    if let Some(stamp) = stamp {
                        files.insert(name.to_string(), (stamp, parsed.clone()));
                    }
                    parsed
                }
            };
            match parsed {
                Ok(h) if h.file_name() != name => errors.push(HostsError::BadFile {
                    path,
                    message: format!(
                        "describes {} but is named {name}; expected {}",
                        h.key(),
                        h.file_name()
                    ),
                }),
                Ok(h) => {
                    hosts.insert(h.key(), h);
                }
                Err(message) => errors.push(HostsError::BadFile { path, message }),
            }
        }
        // Files gone since are forgotten.
        seen.files = files;
        Ok((hosts.into_values().collect(), errors))
    }

    /// Reads every host file and fails on the first one that cannot be parsed.
    pub fn load_strict(&self) -> Result<Vec<Host>, HostsError> {
        let (hosts, mut errors) = self.load()?;
        match errors.is_empty() {
            true => Ok(hosts),
            false => Err(errors.remove(0)),
        }
    }

    /// Registers a host: writes its file atomically unless an identical one is there.
    pub fn add(&self, host: &Host) -> Result<AddOutcome, HostsError> {
        let path = self.dir.join(host.file_name());
        let existing = fs::read_to_string(&path)
            .ok()
            .and_then(|t| Host::from_file_text(&t).ok());
        let outcome = match existing {
            Some(h) if &h == host => return Ok(AddOutcome::AlreadyPresent),
            Some(_) => AddOutcome::Updated,
            None => AddOutcome::Added,
        };
        files::create_dir_all(&self.dir, 0o755).map_err(|source| HostsError::Write {
            path: self.dir.clone(),
            source,
        })?;
        files::atomic_write(&path, host.to_file_text().as_bytes(), 0o644)
            .map_err(|source| HostsError::Write { path, source })?;
        Ok(outcome)
    }

    /// Removes a host's file; a host that is not registered is an error.
    pub fn remove(&self, key: &HostKey) -> Result<(), HostsError> {
        let path = self.dir.join(key.file_name());
        match fs::remove_file(&path) {
            Ok(()) => {
                files::sync_dir(&self.dir).map_err(|source| HostsError::Write {
                    path: self.dir.clone(),
                    source,
                })?;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(HostsError::NotFound(key.clone())),
            Err(source) => Err(HostsError::Write { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::{HostName, Origin};

    fn reads(dir: &HostsDir) -> u64 {
        dir.seen.lock().unwrap().reads
    }

    fn kept(dir: &HostsDir) -> usize {
        dir.seen.lock().unwrap().files.len()
    }

    /// Rewrites `path` in place (same inode) with `text`, after a pause long enough for the
    /// file system's clock to move on (the racy window's own case is the other test's).
    fn rewrite_in_place(path: &Path, text: &str) {
        std::thread::sleep(Duration::from_millis(30));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .unwrap();
        io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    }

    /// A load reads only the files that changed since they were read: new, replaced, or
    /// rewritten in place even at the same size; files removed are forgotten.
    #[test]
    fn a_load_reads_only_what_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = HostsDir::new(tmp.path().join("hosts.d"));
        // Every read counts as settled, however new the file.
        let load = || dir.load_with(Duration::ZERO, SystemTime::now).unwrap();
        let hosts: Vec<Host> = (0..3)
            .map(|i| Host::manual(HostName::parse(&format!("web-{i}")).unwrap(), 80))
            .collect();
        for h in &hosts {
            dir.add(h).unwrap();
        }
        let (first, errors) = load();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(first, hosts);
        assert_eq!(reads(&dir), 3);
        assert_eq!(load().0, hosts);
        assert_eq!(reads(&dir), 3, "unchanged files were read again");
        // Replaced (add-host writes a new file and renames it over the old one).
        let mut launched = hosts[1].clone();
        launched.origin = Origin::Launched;
        assert_eq!(dir.add(&launched).unwrap(), AddOutcome::Updated);
        assert_eq!(load().0[1], launched);
        assert_eq!(reads(&dir), 4);
        // Rewritten in place at the same size, to something that no longer parses.
        let path = dir.path().join(hosts[2].file_name());
        let text = hosts[2].to_file_text();
        let broken = text.replace("host = ", "hxst = ");
        assert_eq!(broken.len(), text.len());
        rewrite_in_place(&path, &broken);
        let (loaded, errors) = load();
        assert_eq!(loaded.len(), 2);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(reads(&dir), 5);
        // And back: read again, good again.
        rewrite_in_place(&path, &text);
        assert_eq!(load().0.len(), 3);
        assert_eq!(reads(&dir), 6);
        // Removed: forgotten.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(load().0.len(), 2);
        assert_eq!(kept(&dir), 2);
    }

    /// What a file said when read within the racy window of its last change is not kept: a
    /// same-size rewrite within the file system's clock tick would keep its stamp. Read again
    /// later, once settled, it is kept.
    #[test]
    fn a_file_read_just_after_a_change_is_read_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = HostsDir::new(tmp.path().join("hosts.d"));
        let h = Host::manual(HostName::parse("web-a").unwrap(), 8080);
        dir.add(&h).unwrap();
        let t0 = SystemTime::now();
        let at = |t: SystemTime| dir.load_with(RACY, move || t).unwrap();
        assert_eq!(at(t0).0, vec![h.clone()]);
        assert_eq!(at(t0).0, vec![h.clone()]);
        assert_eq!(reads(&dir), 2, "a file read just after its change was kept");
        assert_eq!(kept(&dir), 0);
        let later = t0 + RACY + Duration::from_secs(1);
        assert_eq!(at(later).0, vec![h.clone()]);
        assert_eq!(reads(&dir), 3);
        assert_eq!(at(later).0, vec![h.clone()]);
        assert_eq!(reads(&dir), 3, "a settled file was read again");
        assert_eq!(kept(&dir), 1);
    }

    /// A FIFO named like a host file is refused, not read: reading one blocks until a writer
    /// comes, and the master's registry with it.
    #[test]
    fn a_fifo_in_hosts_d_is_refused_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = HostsDir::new(tmp.path().join("hosts.d"));
        let h = Host::manual(HostName::parse("web-a").unwrap(), 8080);
        dir.add(&h).unwrap();
        let fifo = dir.path().join("web-b_80.host");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        let d = dir.clone();
        std::thread::spawn(move || tx.send(d.load().unwrap()));
        let (hosts, errors) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("load blocked on a FIFO");
        assert_eq!(hosts, vec![h]);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().contains("not a regular file"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn dir_add_list_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = HostsDir::new(tmp.path().join("hosts.d"));
        assert_eq!(dir.load().unwrap().0, vec![]);
        let b = Host::manual(HostName::parse("web-b").unwrap(), 80);
        let a = Host::manual(HostName::parse("web-a").unwrap(), 8080);
        assert_eq!(dir.add(&b).unwrap(), AddOutcome::Added);
        assert_eq!(dir.add(&a).unwrap(), AddOutcome::Added);
        assert_eq!(dir.add(&a).unwrap(), AddOutcome::AlreadyPresent);
        let mut launched = a.clone();
        launched.origin = Origin::Launched;
        assert_eq!(dir.add(&launched).unwrap(), AddOutcome::Updated);
        // Temp files and strays are ignored.
        fs::write(dir.path().join(".web-c_80.host.tmp"), "junk").unwrap();
        fs::write(dir.path().join("README"), "junk").unwrap();
        let (hosts, errors) = dir.load().unwrap();
        assert!(errors.is_empty());
        assert_eq!(hosts, vec![launched.clone(), b.clone()]);
        dir.remove(&b.key()).unwrap();
        assert!(matches!(dir.remove(&b.key()), Err(HostsError::NotFound(_))));
        assert_eq!(dir.load_strict().unwrap(), vec![launched]);
    }

    #[test]
    fn dir_reports_bad_files_without_losing_good_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = HostsDir::new(tmp.path());
        let good = Host::manual(HostName::parse("10.1.2.3").unwrap(), 80);
        dir.add(&good).unwrap();
        fs::write(
            tmp.path().join("broken_80.host"),
            "host = bro ken\nport = 80\n",
        )
        .unwrap();
        fs::write(tmp.path().join("other_80.host"), "host = web\nport = 80\n").unwrap();
        let (hosts, errors) = dir.load().unwrap();
        assert_eq!(hosts, vec![good]);
        assert_eq!(errors.len(), 2);
        let all: String = errors.iter().map(|e| e.to_string()).collect();
        assert!(all.contains("broken_80.host"), "{all}");
        assert!(
            all.contains("is named other_80.host; expected web_80.host"),
            "{all}"
        );
        assert!(dir.load_strict().is_err());
    }
}
