//! HAProxy's runtime API (the stats socket) as text: the commands autoscaler sends and the
//! answers it reads, for HAProxy 2.6's dynamic servers. Pure; the socket is an adapter.
//!
//! The backend named `[haproxy] backend` belongs to autoscaler: every server in it comes from
//! the host list, so a server there that the list lacks is drained and removed.

use std::collections::BTreeMap;

use crate::render::ServerLine;

/// `srv_admin_state` bits (HAProxy's `SRV_ADMF_*`): forced, inherited, configured and
/// resolution maintenance; forced and inherited drain.
const ADMIN_MAINT: u32 = 0x01 | 0x02 | 0x04 | 0x20;
const ADMIN_DRAIN: u32 = 0x08 | 0x10;

/// One server as `show servers state` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeServer {
    pub name: String,
    pub addr: String,
    pub port: u16,
    pub admin_state: u32,
}

impl RuntimeServer {
    /// Taken out of rotation (drain or maintenance): it gets no new requests.
    pub fn leaving(&self) -> bool {
        self.admin_state & (ADMIN_MAINT | ADMIN_DRAIN) != 0
    }

    /// In maintenance: it may be deleted once it has no connections.
    pub fn in_maintenance(&self) -> bool {
        self.admin_state & ADMIN_MAINT != 0
    }
}

/// Parses `show servers state BACKEND` (format version 1): the servers by name.
pub fn parse_servers_state(text: &str) -> Result<BTreeMap<String, RuntimeServer>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    match lines.next().map(str::trim) {
        Some("1") => {}
        other => return Err(format!("unexpected servers state format: {other:?}")),
    }
    let mut out = BTreeMap::new();
    for line in lines.filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state ... srv_port (19th)
        if f.len() < 19 {
            return Err(format!("short servers state line: {line:?}"));
        }
        let admin_state = f[6]
            .parse()
            .map_err(|_| format!("bad admin state in {line:?}"))?;
        let port = f[18].parse().map_err(|_| format!("bad port in {line:?}"))?;
        out.insert(
            f[3].to_string(),
            RuntimeServer {
                name: f[3].to_string(),
                addr: f[4].to_string(),
                port,
                admin_state,
            },
        );
    }
    Ok(out)
}

/// Current sessions per server of `backend`, from `show stat` (CSV).
pub fn parse_sessions(text: &str, backend: &str) -> Result<BTreeMap<String, u64>, String> {
    let mut lines = text.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or("show stat: no header")?;
    let cols: Vec<&str> = header.split(',').collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or(format!("show stat: no {name} column"))
    };
    let (px, sv, scur) = (col("pxname")?, col("svname")?, col("scur")?);
    let mut out = BTreeMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        if f.get(px) != Some(&backend) {
            continue;
        }
        let name = f.get(sv).copied().unwrap_or("");
        if name == "BACKEND" || name == "FRONTEND" {
            continue;
        }
        let n = f.get(scur).and_then(|v| v.parse().ok()).unwrap_or(0);
        out.insert(name.to_string(), n);
    }
    Ok(out)
}

/// The commands, and how to tell that HAProxy did what was asked.
pub mod command {
    use super::ServerLine;

    /// `show servers state BACKEND`.
    pub fn servers_state(backend: &str) -> String {
        format!("show servers state {backend}")
    }

    /// `show stat BACKEND 4 -1`: the backend's servers.
    pub fn stat(backend: &str) -> String {
        format!("show stat {backend} 4 -1")
    }

    /// `add server BACKEND/NAME ADDR OPTIONS`: the server starts in maintenance.
    pub fn add(backend: &str, s: &ServerLine, options: &str) -> String {
        format!("add server {backend}/{} {} {options}", s.name, s.address)
            .trim_end()
            .to_string()
    }

    /// `set server BACKEND/NAME state ready|drain|maint`.
    pub fn set_state(backend: &str, name: &str, state: &str) -> String {
        format!("set server {backend}/{name} state {state}")
    }

    pub fn enable_health(backend: &str, name: &str) -> String {
        format!("enable health {backend}/{name}")
    }

    pub fn shutdown_sessions(backend: &str, name: &str) -> String {
        format!("shutdown sessions server {backend}/{name}")
    }

    pub fn delete(backend: &str, name: &str) -> String {
        format!("del server {backend}/{name}")
    }

    /// Whether `answer` says `command` worked: `add server` and `del server` say so in words;
    /// the others answer nothing when they succeed.
    pub fn succeeded(command: &str, answer: &str) -> bool {
        let a = answer.trim();
        if command.starts_with("add server") {
            a.contains("New server registered")
        } else if command.starts_with("del server") {
            a.contains("Server deleted")
        } else {
            a.is_empty()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `show servers state app` as HAProxy 2.6.12 answers it, a server draining.
    const STATE: &str = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n\
3 app 1 127.0.0.2_18481 127.0.0.2 2 0 1 1 1 6 3 2 6 0 0 0 - 18481 - 0 0 - - 0\n\
3 app 2 127.0.0.3_18481 127.0.0.3 2 8 1 1 4 6 3 2 6 0 0 0 - 18481 - 0 0 - - 0\n\n";

    const STAT: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot\napp,127.0.0.2_18481,0,0,3,5,,40\napp,127.0.0.3_18481,0,0,0,1,,2\napp,BACKEND,0,0,3,5,,42\nother,x,0,0,9,9,,9\n";

    #[test]
    fn reads_servers_state_and_sessions() {
        let s = parse_servers_state(STATE).unwrap();
        assert_eq!(s.len(), 2);
        let a = &s["127.0.0.2_18481"];
        assert_eq!(
            (a.addr.as_str(), a.port, a.leaving()),
            ("127.0.0.2", 18481, false)
        );
        let b = &s["127.0.0.3_18481"];
        assert!(b.leaving() && !b.in_maintenance(), "draining");
        assert!(parse_servers_state("1\n# header\n").unwrap().is_empty());
        assert!(parse_servers_state("No such backend.\n").is_err());
        assert!(parse_servers_state("1\n3 app 1 x\n").is_err());
        let n = parse_sessions(STAT, "app").unwrap();
        assert_eq!(
            n.into_iter().collect::<Vec<_>>(),
            [("127.0.0.2_18481".into(), 3), ("127.0.0.3_18481".into(), 0)]
        );
        assert!(parse_sessions("Unknown command\n", "app").is_err());
    }

    #[test]
    fn commands_and_their_answers() {
        let s = ServerLine {
            name: "127.0.1.5_80".into(),
            address: "127.0.1.5:80".into(),
        };
        let add = command::add("app", &s, "check inter 2000ms fall 3 rise 2");
        assert_eq!(
            add,
            "add server app/127.0.1.5_80 127.0.1.5:80 check inter 2000ms fall 3 rise 2"
        );
        assert!(command::succeeded(&add, "New server registered.\n\n"));
        assert!(!command::succeeded(
            &add,
            "'server app/x' : already exists\n"
        ));
        let del = command::delete("app", "127.0.1.5_80");
        assert!(command::succeeded(&del, "Server deleted.\n"));
        assert!(!command::succeeded(
            &del,
            "Only servers in maintenance mode can be deleted.\n"
        ));
        let drain = command::set_state("app", "127.0.1.5_80", "drain");
        assert!(command::succeeded(&drain, "\n"));
        assert!(!command::succeeded(&drain, "No such server.\n"));
    }
}
