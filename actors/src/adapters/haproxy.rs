//! Validating and installing haproxy.cfg: a candidate is written next to the live file,
//! checked with `[haproxy] check_command` (`haproxy -c -f {config}`), and renamed over the live
//! file only if the check passed. A config that fails validation never replaces the live one.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

use super::files;
use crate::config::{CommandLine, CONFIG_VAR};

/// Why a configuration was not installed.
#[derive(Debug, Error)]
pub enum HaproxyError {
    #[error("HAProxy rejected the configuration (`{command}` exited with {status}):\n{output}")]
    Invalid {
        command: String,
        status: String,
        output: String,
    },
    #[error("cannot run `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The result of a validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validation {
    /// The check command accepted the file.
    Valid,
    /// The check command's program is not installed; the file was not checked.
    Skipped { program: String },
}

/// Runs `check` with `{config}` replaced by `file`. A missing program is reported as
/// [`Validation::Skipped`], so `generate` works on a machine without HAProxy, and says so.
pub fn validate(check: &CommandLine, file: &Path) -> Result<Validation, HaproxyError> {
    let argv = check.expand(&[(CONFIG_VAR, &file.to_string_lossy())]);
    let command = shell_words::join(&argv);
    let Some((program, args)) = argv.split_first() else {
        return Err(HaproxyError::Spawn {
            command,
            source: io::Error::new(io::ErrorKind::InvalidInput, "empty command"),
        });
    };
    let out = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Validation::Skipped {
                program: program.clone(),
            })
        }
        Err(source) => return Err(HaproxyError::Spawn { command, source }),
    };
    if out.status.success() {
        return Ok(Validation::Valid);
    }
    let mut output = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        output.push('\n');
        output.push_str(stdout.trim_end());
    }
    Err(HaproxyError::Invalid {
        command,
        status: out.status.to_string(),
        output,
    })
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// The file was replaced; `validation` says whether it was checked.
    Replaced { validation: Validation },
    /// The live file already had exactly this content; nothing was written.
    Unchanged { validation: Validation },
}

/// Installs `text` at `dest`: candidate in the same directory, fsync, validate (unless `check`
/// is None), rename (skipped when the live file is identical), fsync of the directory. On any failure `dest` is left exactly as it was
/// and the candidate is removed.
pub fn install(
    text: &str,
    dest: &Path,
    check: Option<&CommandLine>,
) -> Result<Installed, HaproxyError> {
    let write_err = |source| HaproxyError::Write {
        path: dest.to_path_buf(),
        source,
    };
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".candidate")
        .permissions(fs::Permissions::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(write_err)?;
    tmp.write_all(text.as_bytes()).map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;
    let validation = match check {
        Some(c) => validate(c, tmp.path())?,
        None => Validation::Skipped {
            program: String::new(),
        },
    };
    if fs::read(dest).is_ok_and(|live| live == text.as_bytes()) {
        return Ok(Installed::Unchanged { validation });
    }
    tmp.persist(dest).map_err(|e| write_err(e.error))?;
    files::sync_dir(dir).map_err(write_err)?;
    Ok(Installed::Replaced { validation })
}

/// Validates `text` without installing it (for `generate --output -`): written to a temp file,
/// checked, removed.
pub fn validate_text(text: &str, check: &CommandLine) -> Result<Validation, HaproxyError> {
    let write_err = |source| HaproxyError::Write {
        path: std::env::temp_dir(),
        source,
    };
    let mut tmp = tempfile::Builder::new()
        .prefix("autoscaler-haproxy.")
        .suffix(".cfg")
        .tempfile()
        .map_err(write_err)?;
    tmp.write_all(text.as_bytes()).map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;
    validate(check, tmp.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(s: &str) -> CommandLine {
        s.parse().unwrap()
    }

    #[test]
    fn failed_check_leaves_live_file_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("haproxy.cfg");
        fs::write(&live, "good\n").unwrap();
        // A check that refuses anything containing "bad", as haproxy -c would a broken file.
        let check = cmd("sh -c '! grep -q bad \"$1\" || { echo \"[ALERT] bad line\" >&2; exit 1; }' check {config}");
        let e = install("bad\n", &live, Some(&check)).unwrap_err();
        assert!(
            matches!(&e, HaproxyError::Invalid { output, .. } if output.contains("[ALERT] bad line")),
            "{e}"
        );
        assert_eq!(fs::read_to_string(&live).unwrap(), "good\n");
        let left: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "candidate removed: {left:?}");
        assert_eq!(
            install("better\n", &live, Some(&check)).unwrap(),
            Installed::Replaced {
                validation: Validation::Valid
            }
        );
        assert_eq!(fs::read_to_string(&live).unwrap(), "better\n");
        assert_eq!(
            install("better\n", &live, Some(&check)).unwrap(),
            Installed::Unchanged {
                validation: Validation::Valid
            }
        );
    }

    #[test]
    fn missing_checker_is_reported_as_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("haproxy.cfg");
        let check = cmd("/nonexistent/haproxy -c -f {config}");
        assert_eq!(
            install("x\n", &live, Some(&check)).unwrap(),
            Installed::Replaced {
                validation: Validation::Skipped {
                    program: "/nonexistent/haproxy".into()
                }
            }
        );
    }

    #[test]
    fn placeholder_is_one_argument() {
        let tmp = tempfile::tempdir().unwrap();
        let odd = tmp.path().join("with space; $(id).cfg");
        fs::write(&odd, "x").unwrap();
        // test -f gets the whole path as one argument: no shell ever sees it.
        assert_eq!(
            validate(&cmd("test -f {config}"), &odd).unwrap(),
            Validation::Valid
        );
    }
}
