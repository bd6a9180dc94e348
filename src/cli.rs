//! The command line (clap derive). Flags override the configuration file.

use std::path::PathBuf;

use autoscaler_actors::config::DEFAULT_CONFIG_PATH;
use clap::{Parser, Subcommand, ValueEnum};

/// Reactive scale-out for web servers behind HAProxy, without Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "autoscaler", version, about, propagate_version = true)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "AUTOSCALER_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,

    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Less log output (-q warnings, -qq errors only).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,

    #[command(subcommand)]
    pub command: Command,
}

/// How log records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Readable lines for a terminal.
    Human,
    /// One JSON object per line.
    Json,
}

/// A role `init` can write a configuration for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    Master,
    Node,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the configuration file (every key with its default) and create hosts.d beside it.
    Init {
        /// Configuration directory (the file is DIR/autoscaler.ini); without it, the file named
        /// by --config or $AUTOSCALER_CONFIG (default /etc/autoscaler/autoscaler.ini). Paths
        /// in the written file point inside that directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Role written into the file.
        #[arg(long, value_enum, default_value_t = RoleArg::Master)]
        role: RoleArg,
        /// Overwrite an existing autoscaler.ini.
        #[arg(long)]
        force: bool,
    },
    /// Register a backend host (writes one file into hosts_dir).
    AddHost {
        /// IPv4/IPv6 address or DNS name, kept as given (HAProxy resolves names).
        #[arg(allow_hyphen_values = true)]
        host: String,
        /// Application port HAProxy sends traffic to (1-65535).
        #[arg(allow_hyphen_values = true)]
        port: String,
        /// SSH port of this host, when it differs from [ssh] port.
        #[arg(long)]
        ssh_port: Option<String>,
        /// The node's report port, when it differs from [node] report_port: a TCP forward
        /// for this host.
        #[arg(long)]
        report_port: Option<String>,
        /// The node's report socket, when it differs from [node] report_socket (an absolute
        /// path ending in .sock).
        #[arg(long)]
        report_socket: Option<String>,
    },
    /// Remove a registered backend host.
    RemoveHost {
        #[arg(allow_hyphen_values = true)]
        host: String,
        #[arg(allow_hyphen_values = true)]
        port: String,
    },
    /// List registered hosts, one `HOST PORT` per line, sorted.
    ListHosts {
        /// Print a JSON array instead.
        #[arg(long)]
        json: bool,
    },
    /// Copy every host of hosts_dir, state_dir's launches and drains in flight and the
    /// guards' history, and the known_hosts keys of launched hosts, into etcd ([cluster]):
    /// the move from one master to several.
    /// Idempotent; hosts_dir and state_dir are left as they are.
    ImportHosts,
    /// Render the HAProxy configuration from hosts_dir, validate it and install it.
    Generate {
        /// Where to write it (default: [haproxy] config_path; `-` for standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Do not run [haproxy] check_command on the result.
        #[arg(long)]
        no_validate: bool,
    },
    /// Load and validate the configuration, print it with secrets redacted.
    Check {
        /// Also reach every registered host as the master does (SSH, host key, login, the
        /// report forward) and print a table; exit 69 when one cannot be reached.
        #[arg(long)]
        fleet: bool,
    },
    /// Ask the running master what it sees: nodes, decisions, launches, drains, HAProxy.
    Status {
        /// Print the master's JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Replay recorded CPU load through the policy the master runs, with this configuration's
    /// [scaling] settings, and print the decisions it would take.
    Simulate {
        /// CSV of `time,node,busy`: seconds from the start, node name, busy CPU % (a header
        /// row is allowed). Examples in contrib/traces/.
        #[arg(long)]
        trace: PathBuf,
        /// Also draw each node's CPU, the thresholds, the node count and the decisions.
        #[arg(long, value_name = "OUT.svg")]
        svg: Option<PathBuf>,
        /// How long a launch takes until the new node serves (boot, bootstrap, health check).
        #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
        launch_delay: std::time::Duration,
        /// Print every change of the reason the policy holds, too.
        #[arg(long)]
        holds: bool,
    },
    /// Run the daemon in the role `[autoscaler] role` names.
    Run,
    /// Run the master daemon (the HAProxy machine), whatever the configured role.
    Master,
    /// Run the node agent (a web server), whatever the configured role.
    Node,
    /// Print a completion script for SHELL (e.g. `autoscaler completions bash >
    /// /usr/share/bash-completion/completions/autoscaler`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `autoscaler man > /usr/share/man/man1/autoscaler.1`.
    Man,
}
