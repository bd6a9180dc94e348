//! The types of configuration values that are more than a number or a string: the choices
//! (role, policy, …), secrets, command lines and HAProxy targets. Each parses from the text a
//! user writes and displays back to text that parses to the same value.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Serialize, Serializer};

use crate::hosts::{parse_port, HostName};

/// A closed set of spellings. The first variant is the `Default` (only a blank starting point:
/// the key table sets every real default).
macro_rules! choice {
    ($(#[$m:meta])* $name:ident {
        $(#[$fm:meta])* $first:ident = $ftext:literal,
        $($(#[$vm:meta])* $variant:ident = $text:literal),* $(,)?
    }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub enum $name { $(#[$fm])* #[default] $first, $($(#[$vm])* $variant),* }

        impl $name {
            /// Every accepted spelling, for error messages.
            pub const CHOICES: &'static [&'static str] = &[$ftext, $($text),*];
            /// The spelling used in the file.
            pub fn as_str(self) -> &'static str {
                match self { $name::$first => $ftext, $($name::$variant => $text),* }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $ftext => Ok($name::$first),
                    $($text => Ok($name::$variant),)*
                    _ => Err(format!("one of: {}", Self::CHOICES.join(", "))),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

choice!(
    /// Which daemon this machine runs.
    Role {
        /// The HAProxy machine: hears nodes, decides, launches, rewrites HAProxy.
        Master = "master",
        /// A web server: samples its CPU and reports it.
        Node = "node",
    }
);

choice!(
    /// How the decider turns CPU into a desired node count.
    Policy {
        /// Scale up when any node's mean busy CPU over the window reaches the threshold.
        Instance = "instance",
        /// Target tracking: desired = ceil(n × mean / target), with a tolerance band.
        Cluster = "cluster",
    }
);

choice!(
    /// What to do with a host key that is not in known_hosts yet.
    HostKeyPolicy {
        /// Refuse the session (the default).
        Strict = "strict",
        /// Record the key on first contact, refuse a changed one (OpenSSH's accept-new).
        AcceptNew = "accept-new",
    }
);

choice!(
    /// How the launcher obtains new capacity: its two provisioners.
    ProvisionerKind {
        /// RunInstances through the AWS SDK.
        Ec2 = "ec2",
        /// A user command that prints the new host as JSON.
        Command = "command",
    }
);

/// A secret value (AWS keys): never printed, logged or serialised in clear.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The clear text, for the one place that needs it (the credentials provider).
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether a value was set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "<redacted>"
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "<redacted>" })
    }
}

/// A command line from the configuration: an argv, split with POSIX shell quoting rules but
/// never run through a shell (write `sh -c '…'` to get one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandLine(pub Vec<String>);

impl CommandLine {
    /// Whether no command was configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The argv with every `{name}` placeholder in `vars` replaced, argument by argument.
    pub fn expand(&self, vars: &[(&str, &str)]) -> Vec<String> {
        self.0
            .iter()
            .map(|arg| {
                vars.iter()
                    .fold(arg.clone(), |a, (k, v)| a.replace(&format!("{{{k}}}"), v))
            })
            .collect()
    }
}

impl FromStr for CommandLine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        shell_words::split(s)
            .map(CommandLine)
            .map_err(|e| format!("a command line with balanced quotes ({e})"))
    }
}

impl fmt::Display for CommandLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&shell_words::join(&self.0))
    }
}

impl Serialize for CommandLine {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// One HAProxy server that receives the generated configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HaproxyTarget {
    /// HAProxy on this machine, configured at `[haproxy] config_path`.
    Local,
    /// HAProxy on another machine, reached over SSH with the `[ssh]` settings.
    Ssh {
        user: Option<String>,
        host: HostName,
        port: Option<u16>,
        /// Its configuration file, when not `[haproxy] config_path`.
        path: Option<PathBuf>,
    },
}

/// A path that may appear in a command run on another machine: absolute, and made only of
/// characters no shell or HAProxy treats specially.
pub fn check_remote_path(p: &str) -> Result<PathBuf, String> {
    let ok = p.starts_with('/')
        && !p.contains("/../")
        && !p.ends_with("/..")
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '.' | '+' | '@'));
    match ok {
        true => Ok(PathBuf::from(p)),
        false => Err(format!(
            "{p:?} is not an absolute path of letters, digits, '/', '_', '-', '.', '+', '@'"
        )),
    }
}

impl FromStr for HaproxyTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const ACCEPTED: &str = "`local` or `[ssh://][user@]host[:port][/path/to/haproxy.cfg]`";
        if s == "local" {
            return Ok(HaproxyTarget::Local);
        }
        let rest = s.strip_prefix("ssh://").unwrap_or(s);
        let (user, rest) = match rest.split_once('@') {
            Some((u, h)) => {
                let user_ok = !u.is_empty()
                    && !u.starts_with('-')
                    && u.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
                if !user_ok {
                    return Err(format!("{ACCEPTED}; user {u:?} is not a valid user name"));
                }
                (Some(u.to_string()), h)
            }
            None => (None, rest),
        };
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        let path = path
            .map(check_remote_path)
            .transpose()
            .map_err(|e| format!("{ACCEPTED}; {e}"))?;
        let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
            let (h, after) = inner
                .split_once(']')
                .ok_or_else(|| format!("{ACCEPTED}; unbalanced '['"))?;
            match after {
                "" => (h, None),
                p => (
                    h,
                    Some(p.strip_prefix(':').ok_or_else(|| ACCEPTED.to_string())?),
                ),
            }
        } else if hostport.matches(':').count() == 1 {
            let (h, p) = hostport.split_once(':').unwrap_or((hostport, ""));
            (h, Some(p))
        } else {
            (hostport, None)
        };
        let host = HostName::parse(host).map_err(|e| format!("{ACCEPTED}; {e}"))?;
        let port = port
            .map(parse_port)
            .transpose()
            .map_err(|e| format!("{ACCEPTED}; {e}"))?;
        Ok(HaproxyTarget::Ssh {
            user,
            host,
            port,
            path,
        })
    }
}

impl fmt::Display for HaproxyTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HaproxyTarget::Local => f.write_str("local"),
            HaproxyTarget::Ssh {
                user,
                host,
                port,
                path,
            } => {
                f.write_str("ssh://")?;
                if let Some(u) = user {
                    write!(f, "{u}@")?;
                }
                match (host, port) {
                    (HostName::V6(ip), Some(p)) => write!(f, "[{ip}]:{p}")?,
                    (HostName::V6(ip), None) if path.is_some() => write!(f, "[{ip}]")?,
                    (h, Some(p)) => write!(f, "{h}:{p}")?,
                    (h, None) => write!(f, "{h}")?,
                }
                match path {
                    Some(p) => write!(f, "{}", p.display()),
                    None => Ok(()),
                }
            }
        }
    }
}

impl Serialize for HaproxyTarget {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}
