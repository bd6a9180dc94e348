//! The report secret (`[node] secret_file`): the key agents prove they hold on every report
//! channel ([`crate::report::auth_tag`]). Like an SSH private key, a file others can read is
//! refused. A systemd credential is the exception for its group bits: the service manager
//! keeps it in a directory only the service reaches and may show an ACL mask there (mode 0440);
//! readable by everyone it is still refused.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The name of the secret among systemd credentials (`LoadCredential=report.key:…`).
pub const CREDENTIAL: &str = "report.key";
/// Fewest characters of secret accepted (`autoscaler init` writes 64 hex digits).
pub const MIN_LEN: usize = 32;

/// Why the secret cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is readable by others (mode {mode:o}): chmod 600 {path}")]
    Loose { path: PathBuf, mode: u32 },
    #[error("{path} holds {len} characters; a report secret has at least {MIN_LEN} (autoscaler init writes 64 hex digits)")]
    Short { path: PathBuf, len: usize },
}

/// Where the secret is read from: the systemd credential when the service manager passes one
/// (`$CREDENTIALS_DIRECTORY/report.key`), else `configured`.
pub fn location(configured: &Path) -> PathBuf {
    std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(|d| Path::new(&d).join(CREDENTIAL))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| configured.to_path_buf())
}

/// Reads the secret at `path` (see [`location`]): its text without surrounding whitespace.
pub fn read(path: &Path) -> Result<Vec<u8>, SecretError> {
    let read_err = |source| SecretError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o777;
    let credential = std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(PathBuf::from)
        .is_some_and(|d| d.is_absolute() && path.parent() == Some(&d) && private_dir(&d));
    if too_open(mode, credential) {
        return Err(SecretError::Loose {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    let secret = text.trim();
    match secret.len() < MIN_LEN {
        true => Err(SecretError::Short {
            path: path.to_path_buf(),
            len: secret.len(),
        }),
        false => Ok(secret.as_bytes().to_vec()),
    }
}

/// A directory nobody but its owner and group may enter (systemd's credentials directory).
fn private_dir(d: &Path) -> bool {
    std::fs::metadata(d).is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o007 == 0)
}

/// Whether a secret file with `mode` can be read by others than its owner: for a systemd
/// `credential`, only "everyone" counts (its directory is the service's alone).
fn too_open(mode: u32, credential: bool) -> bool {
    mode & if credential { 0o007 } else { 0o077 } != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_may_show_group_bits_never_world_bits() {
        for (mode, credential, open) in [
            (0o600, false, false),
            (0o400, false, false),
            (0o640, false, true),
            (0o604, false, true),
            (0o400, true, false),
            (0o440, true, false),
            (0o444, true, true),
            (0o404, true, true),
        ] {
            assert_eq!(
                too_open(mode, credential),
                open,
                "{mode:o} credential={credential}"
            );
        }
    }

    #[test]
    fn only_a_private_long_enough_file_is_a_secret() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("report.key");
        assert!(matches!(read(&p), Err(SecretError::Read { .. })));
        std::fs::write(&p, format!("{}\n", "a".repeat(64))).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read(&p).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read(&p).unwrap(), "a".repeat(64).into_bytes());
        std::fs::write(&p, "short\n").unwrap();
        assert!(matches!(read(&p), Err(SecretError::Short { len: 5, .. })));
    }
}
