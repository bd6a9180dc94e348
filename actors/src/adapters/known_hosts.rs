//! The master's known_hosts file: keys of launched hosts, learnt from a channel bound to the
//! instance (its console output, or the scale-up command's output), are written before the
//! first connection and removed when the host goes, so a private address that EC2 hands out
//! again never meets a stale key. Every write goes through here under one lock, so a key
//! recorded by `accept-new` and a launched host's keys never overwrite each other.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Mutex;

use russh::keys::{Algorithm, PublicKey};

use super::files;

/// Serialises every read-modify-write of known_hosts files in this process.
static WRITE_LOCK: Mutex<()> = Mutex::new(());

/// The comment on every line autoscaler writes: a line for a host without it is the
/// operator's, and a key shared by another master never replaces it.
pub const LEARNT: &str = "autoscaler-learnt";

/// The first marker of cloud-init's host key block on the console.
const BEGIN_KEYS: &str = "-----BEGIN SSH HOST KEY KEYS-----";
const END_KEYS: &str = "-----END SSH HOST KEY KEYS-----";

/// How known_hosts names `host:port`: `host` for port 22, `[host]:port` otherwise.
pub fn host_pattern(host: &str, port: u16) -> String {
    match port {
        22 => host.to_string(),
        _ => format!("[{host}]:{port}"),
    }
}

/// A host key the master's SSH stack can check: Ed25519 or ECDSA (RSA is left out of the
/// stack, see the README).
fn usable(key: &PublicKey) -> bool {
    matches!(
        key.algorithm(),
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. }
    )
}

/// Parses `TYPE BASE64 [comment]` (as in a `.pub` file or cloud-init's block); None for
/// anything else, and for key types the SSH stack cannot check.
pub fn parse_key(line: &str) -> Option<PublicKey> {
    let mut words = line.split_whitespace();
    let (_alg, b64) = (words.next()?, words.next()?);
    russh::keys::parse_public_key_base64(b64)
        .ok()
        .filter(usable)
}

/// The host keys in the last "SSH HOST KEY KEYS" block that cloud-init printed on the
/// console (a machine that rebooted printed one per boot). Empty when there is none yet.
pub fn keys_from_console(console: &str) -> Vec<PublicKey> {
    let Some(start) = console.rfind(BEGIN_KEYS) else {
        return Vec::new();
    };
    let block = &console[start + BEGIN_KEYS.len()..];
    let Some(end) = block.find(END_KEYS) else {
        return Vec::new(); // The block is still being written.
    };
    block[..end].lines().filter_map(parse_key).collect()
}

/// The lines of `text` that do not name exactly `pattern` (comments and other hosts stay).
fn without(text: &str, pattern: &str) -> (String, usize) {
    let mut kept = String::new();
    let mut removed = 0;
    for line in text.lines() {
        let names = line.split_whitespace().next().unwrap_or("");
        let ours = !line.trim_start().starts_with('#') && names.split(',').any(|n| n == pattern);
        if ours {
            removed += 1;
        } else {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    (kept, removed)
}

fn rewrite(path: &Path, f: impl FnOnce(&str) -> String) -> io::Result<()> {
    let _guard = WRITE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let (text, mode) = match fs::read_to_string(path) {
        Ok(t) => (t, fs::metadata(path)?.permissions().mode() & 0o777),
        Err(e) if e.kind() == io::ErrorKind::NotFound => (String::new(), 0o644),
        Err(e) => return Err(e),
    };
    let next = f(&text);
    if next == text {
        return Ok(());
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        files::create_dir_all(dir, 0o700)?;
    }
    files::atomic_write(path, next.as_bytes(), mode)
}

fn key_line(pattern: &str, key: &PublicKey) -> io::Result<String> {
    let text = key
        .to_openssh()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    // TYPE BASE64, without the key's own comment: ours says who wrote the line.
    let mut words = text.split_whitespace();
    let (alg, b64) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    Ok(format!("{pattern} {alg} {b64} {LEARNT}\n"))
}

/// Whether known_hosts holds a line for exactly `host:port` that autoscaler did not write
/// (an operator pinned that host's key).
pub fn pinned(path: &Path, host: &str, port: u16) -> io::Result<bool> {
    let pattern = host_pattern(host, port);
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .map(str::trim_start)
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| {
            w.first()
                .is_some_and(|n| n.split(',').any(|n| n == pattern))
        })
        .any(|w| w.get(3) != Some(&LEARNT)))
}

/// The keys recorded for exactly `host:port` (plain entries; hashed ones cannot be matched
/// by name and are left out). A missing file holds none.
pub fn keys_of(path: &Path, host: &str, port: u16) -> io::Result<Vec<PublicKey>> {
    let pattern = host_pattern(host, port);
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .map(str::trim_start)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(char::is_whitespace))
        .filter(|(names, _)| names.split(',').any(|n| n == pattern))
        .filter_map(|(_, key)| parse_key(key))
        .collect())
}

/// Makes `keys` the only keys recorded for `host:port`.
pub fn replace(path: &Path, host: &str, port: u16, keys: &[PublicKey]) -> io::Result<()> {
    let pattern = host_pattern(host, port);
    let lines = keys
        .iter()
        .map(|k| key_line(&pattern, k))
        .collect::<io::Result<String>>()?;
    rewrite(path, |text| without(text, &pattern).0 + &lines)
}

/// Forgets every key recorded for `host:port`.
pub fn remove(path: &Path, host: &str, port: u16) -> io::Result<()> {
    let pattern = host_pattern(host, port);
    rewrite(path, |text| without(text, &pattern).0)
}

/// Records one more key for `host:port` (accept-new).
pub fn learn(path: &Path, host: &str, port: u16, key: &PublicKey) -> io::Result<()> {
    let line = key_line(&host_pattern(host, port), key)?;
    rewrite(path, |text| {
        let mut t = text.to_string();
        if !t.is_empty() && !t.ends_with('\n') {
            t.push('\n');
        }
        t + &line
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMbXjn3SmRtduL4M5Cqz4Xj2OEb1jRhqpXMK6rYyJLud";

    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDIH23XYU8KPy5Abz81NY1gn207jX+PFUCfXhJLugtfefxHsAOKgEP6mqzyb26mzVhuSyx1lvUAdLFZszSndj96ja4vBJOcVwfkV3g4kRrRSZ1DybAaR9UNAgDmDaZvosxHttYWMcH0+hkgvlwNjqzDVob+nKuuEhl3kwiA3nvddQ==";

    fn key(line: &str) -> PublicKey {
        parse_key(line).unwrap()
    }

    /// cloud-init's block as EC2 shows it: other console lines around it, a comment on each
    /// key, an RSA key the SSH stack does not use; after a reboot, the last block counts.
    #[test]
    fn console_blocks_give_the_last_boots_keys() {
        let ecdsa = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBD1Pb6qTXxb0q0Fn3wqtWI/AbJ0XVwVovV+FR4KNuPY2yYsrp8Yt3GCtI8pevkRFLmMp1yiMLY8ku4PQzyGsyUY=";
        let console = format!(
            "[   12.1] cloud-init[620]: ec2: #############\n{BEGIN_KEYS}\n{ED} root@old\n{END_KEYS}\n\
             reboot\n{BEGIN_KEYS}\nssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDIH23XYU8KPy5Abz81NY1gn207jX+PFUCfXhJLugtfefxHsAOKgEP6mqzyb26mzVhuSyx1lvUAdLFZszSndj96ja4vBJOcVwfkV3g4kRrRSZ1DybAaR9UNAgDmDaZvosxHttYWMcH0+hkgvlwNjqzDVob+nKuuEhl3kwiA3nvddQ== root@ip\n{ecdsa} root@ip-10\n{ED} root@ip-10\n{END_KEYS}\n\
             [   30.0] cloud-init[900]: Cloud-init v. 22.4 finished\n"
        );
        let keys = keys_from_console(&console);
        assert_eq!(keys, vec![key(ecdsa), key(ED)]);
        assert!(keys_from_console("Linux version 6.1\nno keys yet\n").is_empty());
        let half = format!("{BEGIN_KEYS}\n{ED} root@ip\n");
        assert!(
            keys_from_console(&half).is_empty(),
            "a block without its end is still being written"
        );
    }

    #[test]
    fn replace_remove_learn_touch_only_their_host() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("known_hosts");
        let other = "# operator's note\n10.0.0.9 ssh-ed25519 AAAAother\n[127.0.1.5]:2200 ssh-ed25519 AAAAkeep\n";
        fs::write(&path, other).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        replace(&path, "127.0.1.5", 22, &[key(ED)]).unwrap();
        replace(&path, "127.0.1.5", 22, &[key(ED)]).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!("{other}127.0.1.5 {ED} {LEARNT}\n"),
            "replaced, not duplicated"
        );
        assert!(
            !pinned(&path, "127.0.1.5", 22).unwrap(),
            "autoscaler's line"
        );
        assert!(
            pinned(&path, "127.0.1.5", 2200).unwrap(),
            "the operator's line"
        );
        assert!(!pinned(&path, "127.0.1.77", 22).unwrap(), "no line");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // russh reads what was written.
        assert!(russh::keys::check_known_hosts_path("127.0.1.5", 22, &key(ED), &path).unwrap());
        remove(&path, "127.0.1.5", 22).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), other);
        learn(&path, "127.0.1.6", 2222, &key(ED)).unwrap();
        assert!(fs::read_to_string(&path)
            .unwrap()
            .ends_with(&format!("[127.0.1.6]:2222 {ED} {LEARNT}\n")));
        assert!(parse_key(RSA).is_none(), "RSA is not used by the SSH stack");
        assert!(parse_key("garbage").is_none());
    }

    /// Exactly `host:port`'s plain entries: not another port, not a longer name, not a
    /// comment or a hashed entry, not a key type the stack cannot use.
    #[test]
    fn keys_of_finds_exactly_one_hosts_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("known_hosts");
        assert_eq!(keys_of(&path, "127.0.1.5", 22).unwrap(), []);
        let ecdsa = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBD1Pb6qTXxb0q0Fn3wqtWI/AbJ0XVwVovV+FR4KNuPY2yYsrp8Yt3GCtI8pevkRFLmMp1yiMLY8ku4PQzyGsyUY=";
        fs::write(
            &path,
            format!(
                "# 127.0.1.5 {ED}\n127.0.1.50 {ED}\n[127.0.1.5]:2222 {ED}\n|1|abc=|def= {ED}\n\
                 web,127.0.1.5 {ecdsa} comment\n127.0.1.5 {RSA}\n"
            ),
        )
        .unwrap();
        assert_eq!(keys_of(&path, "127.0.1.5", 22).unwrap(), [key(ecdsa)]);
        assert_eq!(keys_of(&path, "127.0.1.5", 2222).unwrap(), [key(ED)]);
        assert_eq!(keys_of(&path, "127.0.1.6", 22).unwrap(), []);
    }
}
