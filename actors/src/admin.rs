//! The one-shot commands an operator runs before (or beside) the daemons: `init`, `generate`.
//! The binary parses flags and prints; the work and its error handling live here.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::adapters::files;
use crate::adapters::haproxy::{self, Check, HaproxyError, Installed, OnMissing, Validation};
use crate::adapters::host_store::HostStore;
use crate::adapters::hosts_dir::{AddOutcome, HostsDir, HostsError};
use crate::config::{Config, Layout, Role, CONFIG_FILE_NAME};
use crate::render::{self, RenderError};

/// Why a one-shot command failed.
#[derive(Debug, Error)]
pub enum AdminError {
    #[error("{0} already exists; it was left unchanged (use --force to overwrite it)")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Hosts(#[from] HostsError),
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Haproxy(#[from] HaproxyError),
    #[error(transparent)]
    Etcd(#[from] crate::adapters::etcd::EtcdError),
    #[error("[cluster] etcd_endpoints is empty: there is no etcd to import into")]
    NotClustered,
    #[error("a master answers on {socket} and {state_dir} holds launches or drains in flight; stop that master first, so that none of them is carried out twice")]
    MasterRunning { socket: PathBuf, state_dir: PathBuf },
    #[error(transparent)]
    Record(#[from] crate::adapters::records::RecordError),
}

/// The host list the configuration names, for an operator's command: hosts.d, or etcd with
/// `[cluster]` (written without the leader's guard: an operator's change, like editing
/// hosts.d).
pub async fn host_store(cfg: &Config) -> Result<HostStore, AdminError> {
    Ok(match cfg.cluster.enabled() {
        false => HostStore::Dir(HostsDir::new(&cfg.general.hosts_dir)),
        true => HostStore::Etcd {
            etcd: crate::adapters::etcd::Etcd::connect(
                &cfg.cluster,
                Some(cfg.cluster.etcd_timeout),
            )
            .await?,
            lead: None,
        },
    })
}

/// What `import-hosts` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Imported {
    pub added: usize,
    pub already: usize,
    pub updated: usize,
    /// Records of state_dir copied: launches and drains in flight, the guards' history.
    pub records: usize,
    /// Launched hosts whose SSH host keys (from this master's known_hosts) were shared, so
    /// every master checks them strictly.
    pub host_keys: usize,
}

/// The single master's records that must follow the hosts into etcd: a launch or drain in
/// flight left behind would be an instance nobody finishes or terminates, and the guards'
/// history keeps the cooldowns and the hourly launch cap.
const MOVED_RECORDS: [&str; 2] = [
    crate::master::launcher::intents::INTENTS,
    crate::master::launcher::intents::DRAINS,
];

/// Copies every host of hosts.d, state_dir's launches and drains in flight and the decider's
/// memory, and the known_hosts keys of the hosts it launched, into etcd (a master moving from one to several). Idempotent; hosts.d
/// and state_dir are left as they are, and a record etcd already has is not replaced. A host
/// file that cannot be read stops it before anything is written, and so does a master still
/// running here with launches or drains in flight.
pub async fn import_hosts(cfg: &Config) -> Result<Imported, AdminError> {
    use crate::adapters::records::Records;
    let hosts = HostsDir::new(&cfg.general.hosts_dir).load_strict()?;
    let files = Records::Files(cfg.general.state_dir.clone());
    let mut records = Vec::new();
    for kind in MOVED_RECORDS {
        for (name, v) in files.list::<serde_json::Value>(kind).await? {
            records.push((kind, name, v));
        }
    }
    // The keys this master learnt for the hosts it launched: other masters have never seen
    // those hosts, and under the strict policy could not reach them without.
    use crate::master::cluster_sync::{self, SharedKeys};
    let mut shared_keys = Vec::new();
    for h in hosts
        .iter()
        .filter(|h| h.origin == crate::hosts::Origin::Launched)
    {
        let (host, port) = (h.host.to_string(), h.ssh_port.unwrap_or(cfg.ssh.port));
        let keys = crate::adapters::known_hosts::keys_of(&cfg.ssh.known_hosts, &host, port)
            .map_err(|source| AdminError::Read {
                path: cfg.ssh.known_hosts.clone(),
                source,
            })?;
        if !keys.is_empty() {
            let keys = keys.iter().filter_map(|k| k.to_openssh().ok()).collect();
            let name = cluster_sync::record_name(&host, port);
            shared_keys.push((name, SharedKeys { host, port, keys }));
        }
    }
    let in_flight = !records.is_empty();
    if let Some(memory) = files.get::<serde_json::Value>("", "decider").await? {
        records.push(("", "decider".into(), memory));
    }
    let socket = &cfg.general.control_socket;
    if in_flight && std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Err(AdminError::MasterRunning {
            socket: socket.clone(),
            state_dir: cfg.general.state_dir.clone(),
        });
    }
    let HostStore::Etcd { etcd, .. } = host_store(cfg).await? else {
        return Err(AdminError::NotClustered);
    };
    let mut done = Imported::default();
    // Each record in one transaction that writes it only where etcd has none: a record a
    // running master wrote meanwhile is never replaced.
    for (kind, name, v) in records {
        let text = serde_json::to_vec(&v).unwrap_or_default();
        if etcd.put_if_absent(kind, &name, text).await? {
            done.records += 1;
        }
    }
    for (name, shared) in shared_keys {
        let text = serde_json::to_vec(&shared).unwrap_or_default();
        if etcd.put_if_absent(cluster_sync::KIND, &name, text).await? {
            done.host_keys += 1;
        }
    }
    let store = HostStore::Etcd { etcd, lead: None };
    for h in &hosts {
        match store.add(h).await? {
            AddOutcome::Added => done.added += 1,
            AddOutcome::AlreadyPresent => done.already += 1,
            AddOutcome::Updated => done.updated += 1,
        }
    }
    Ok(done)
}

/// What `init` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initialised {
    pub config_file: PathBuf,
    /// The report secret (`[node] secret_file`): made for a master, to be copied to nodes.
    pub report_secret: PathBuf,
    pub hosts_dir: PathBuf,
    /// True when an existing file was replaced (`--force`).
    pub replaced: bool,
}

/// Creates `dir`, its hosts.d and state directories, and `dir/autoscaler.ini` (mode 0600)
/// rendered with every default for `role`. An existing file is kept unless `force`.
pub fn init(dir: &Path, role: Role, force: bool) -> Result<Initialised, AdminError> {
    init_file(&dir.join(CONFIG_FILE_NAME), role, force)
}

/// [`init`] for a configuration file of any name: its directory is the configuration
/// directory.
pub fn init_file(file: &Path, role: Role, force: bool) -> Result<Initialised, AdminError> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let layout = Layout::for_dir(dir);
    let cfg = Config::defaults(&layout, role);
    let text = cfg.to_ini_text();
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AdminError::Write { path, source }
    };
    files::create_dir_all(dir, 0o755).map_err(write_err(dir))?;
    let file = file.to_path_buf();
    let existed = file.exists();
    if existed && !force {
        return Err(AdminError::Exists(file));
    }
    // Directories first: if one cannot be created, no config points at it.
    if role == Role::Master {
        files::create_dir_all(&layout.hosts_dir, 0o755).map_err(write_err(&layout.hosts_dir))?;
        files::create_dir_all(&layout.state_dir, 0o700).map_err(write_err(&layout.state_dir))?;
        // The report secret nodes prove they hold; an existing one is kept (nodes have it).
        let secret = &layout.report_secret;
        let text = format!("{}\n", crate::report::new_nonce());
        match files::create_new(secret, text.as_bytes(), 0o600) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(AdminError::Write {
                    path: secret.clone(),
                    source: e,
                })
            }
            _ => {}
        }
    }
    if force {
        files::atomic_write(&file, text.as_bytes(), 0o600).map_err(write_err(&file))?;
    } else {
        files::create_new(&file, text.as_bytes(), 0o600).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => AdminError::Exists(file.clone()),
            _ => AdminError::Write {
                path: file.clone(),
                source: e,
            },
        })?;
    }
    Ok(Initialised {
        config_file: file,
        report_secret: layout.report_secret,
        hosts_dir: layout.hosts_dir,
        replaced: existed,
    })
}

/// Where `generate` puts the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Standard output: the text is returned, nothing is written.
    Stdout,
    /// A file, replaced atomically.
    File(PathBuf),
}

/// What `generate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The rendered configuration.
    pub text: String,
    /// Number of servers in it.
    pub servers: usize,
    /// None when validation was turned off.
    pub validation: Option<Validation>,
    /// For a file output: whether it was replaced or already identical.
    pub installed: Option<Installed>,
}

/// Renders the HAProxy configuration from hosts_dir, validates it (unless `validate` is
/// false; a machine without HAProxy gets the file and a [`Validation::Skipped`]) and installs
/// it. A host file that cannot be read stops it (a config silently missing a backend would be
/// worse); a failed validation leaves the output untouched.
/// An empty server-state file (its version line only) where none is yet, so HAProxy's first
/// start with the generated configuration loads it without a warning; an existing one is
/// left alone.
fn seed_state_file(path: &Path) -> Result<(), AdminError> {
    // HAProxy's own directory (/var/lib/haproxy): its creation is the package's.
    if path
        .parent()
        .is_some_and(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        return Ok(());
    }
    match files::create_new(path, b"1\n", 0o644) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(AdminError::Write {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

pub async fn generate(
    cfg: &Config,
    output: &Output,
    validate: bool,
) -> Result<Generated, AdminError> {
    let (hosts, mut errors) = host_store(cfg).await?.load().await?;
    if !errors.is_empty() {
        return Err(errors.remove(0).into());
    }
    let text = render::render_haproxy(cfg, &hosts, &crate::adapters::resolve::lookup_blocking)?;
    let check = Check {
        command: &cfg.haproxy.check_command,
        timeout: cfg.haproxy.command_timeout,
        on_missing: OnMissing::Skip,
    };
    let check = validate.then_some(&check);
    let (validation, installed) = match output {
        Output::Stdout => (
            match check {
                Some(c) => Some(haproxy::validate_text(&text, c).await?),
                None => None,
            },
            None,
        ),
        Output::File(path) => {
            let installed = haproxy::install(&text, path, check).await?;
            if *path == cfg.haproxy.config_path {
                seed_state_file(&cfg.haproxy.server_state_file)?;
            }
            let (Installed::Replaced { validation } | Installed::Unchanged { validation }) =
                &installed;
            (validate.then(|| validation.clone()), Some(installed))
        }
    };
    Ok(Generated {
        text,
        servers: hosts.len(),
        validation,
        installed,
    })
}
