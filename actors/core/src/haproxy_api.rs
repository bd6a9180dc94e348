//! HAProxy's runtime API (the stats socket) as text: the commands autoscaler sends and the
//! answers it reads, for HAProxy 2.6's dynamic servers. Pure; the socket is an adapter.
//!
//! The backend named `[haproxy] backend` belongs to autoscaler: every server in it comes from
//! the host list, so a server there that the list lacks is drained and removed.

use std::collections::BTreeMap;

use crate::render::ServerLine;

/// `srv_admin_state` bits (HAProxy's `SRV_ADMF_*`): forced, inherited, configured and
/// resolution maintenance; forced drain. Only the forced ones are what autoscaler sets.
const ADMIN_MAINT: u32 = 0x01 | 0x02 | 0x04 | 0x20;
const FORCED_MAINT: u32 = 0x01;
const FORCED_DRAIN: u32 = 0x08;

/// One server as `show servers state` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeServer {
    pub name: String,
    pub addr: String,
    pub port: u16,
    pub admin_state: u32,
}

impl RuntimeServer {
    /// Taken out of rotation through the runtime API (forced drain or maintenance, as
    /// autoscaler sets them and as `add server` leaves a new server): it gets no new
    /// requests until it is set ready. Resolution or configured maintenance is not this.
    pub fn leaving(&self) -> bool {
        self.admin_state & (FORCED_MAINT | FORCED_DRAIN) != 0
    }

    /// Whether HAProxy sends this server's traffic to `ip:port`.
    pub fn at(&self, ip: &str, port: u16) -> bool {
        self.addr == ip && self.port == port
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

/// The process id of the worker that answered `show info`.
pub fn parse_info_pid(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.strip_prefix("Pid: "))
        .and_then(|p| p.trim().parse().ok())
}

/// The workers HAProxy's master CLI lists in `show proc`: the current ones, and the old ones
/// a reload left behind (they keep their connections until those end or hard-stop-after).
pub fn parse_show_proc(text: &str) -> Result<(Vec<u32>, Vec<u32>), String> {
    let mut section = "";
    let (mut current, mut old) = (Vec::new(), Vec::new());
    let mut seen_header = false;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("#<PID>") {
            seen_header = true;
            continue;
        }
        if let Some(s) = line.strip_prefix("# ") {
            section = match s {
                "workers" => "workers",
                "old workers" => "old",
                _ => "other",
            };
            continue;
        }
        let mut w = line.split_whitespace();
        let (Some(pid), Some(kind)) = (w.next(), w.next()) else {
            continue;
        };
        if kind != "worker" {
            continue;
        }
        let pid = pid
            .parse()
            .map_err(|_| format!("show proc: bad pid in {line:?}"))?;
        match section {
            "workers" => current.push(pid),
            "old" => old.push(pid),
            _ => {}
        }
    }
    match seen_header {
        true => Ok((current, old)),
        false => Err(format!(
            "not an answer to show proc: {:?}",
            text.chars().take(80).collect::<String>()
        )),
    }
}

/// The server state file to load at the next reload, from `show servers state` (every
/// backend, format 1): the servers of `backend` that the plan keeps lose any admin state
/// (they come back ready, as the plan says, whatever a drain or an operator left), the ones
/// it drops are left out; health states and other backends stay as they are.
pub fn state_file(
    text: &str,
    backend: &str,
    keep: &std::collections::BTreeSet<&str>,
) -> Result<String, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    match lines.next().map(str::trim) {
        Some("1") => {}
        other => return Err(format!("unexpected servers state format: {other:?}")),
    }
    let mut out = String::from("1\n");
    for line in lines {
        if line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let mut f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 19 {
            return Err(format!("short servers state line: {line:?}"));
        }
        if f[1] == backend {
            if !keep.contains(f[3]) {
                continue;
            }
            f[6] = "0";
        }
        out.push_str(&f.join(" "));
        out.push('\n');
    }
    Ok(out)
}

/// `show stat` (CSV): the header's columns, and the rows of one backend (its servers, then
/// its BACKEND row), each split into fields.
struct StatRows<'a> {
    cols: Vec<&'a str>,
    rows: Vec<Vec<&'a str>>,
}

impl<'a> StatRows<'a> {
    fn of(text: &'a str, backend: &str) -> Result<StatRows<'a>, String> {
        let mut lines = text.lines();
        let header = lines
            .next()
            .and_then(|h| h.strip_prefix("# "))
            .ok_or("show stat: no header")?;
        let cols: Vec<&str> = header.split(',').collect();
        let px = cols
            .iter()
            .position(|c| *c == "pxname")
            .ok_or("show stat: no pxname column")?;
        let rows = lines
            .filter(|l| !l.is_empty())
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.get(px) == Some(&backend))
            .collect();
        Ok(StatRows { cols, rows })
    }

    /// Where column `name` is.
    fn col(&self, name: &str) -> Result<usize, String> {
        self.cols
            .iter()
            .position(|c| *c == name)
            .ok_or(format!("show stat: no {name} column"))
    }
}

/// Current sessions per server of `backend`, from `show stat` (CSV).
pub fn parse_sessions(text: &str, backend: &str) -> Result<BTreeMap<String, u64>, String> {
    let stat = StatRows::of(text, backend)?;
    let (sv, scur) = (stat.col("svname")?, stat.col("scur")?);
    let mut out = BTreeMap::new();
    for f in &stat.rows {
        let name = f.get(sv).copied().unwrap_or("");
        if name == "BACKEND" || name == "FRONTEND" {
            continue;
        }
        let n = f.get(scur).and_then(|v| v.parse().ok()).unwrap_or(0);
        out.insert(name.to_string(), n);
    }
    Ok(out)
}

/// What one HAProxy server measures for the backend at one moment (`show stat BACKEND 6 -1`,
/// the BACKEND row and its servers): what users feel, whatever the nodes' CPU says.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LbSample {
    /// Requests (HTTP streams, or TCP sessions) per second sent to the backend, over the last
    /// second (`rate`).
    pub rate: f64,
    /// Requests in progress in the backend now (`scur`).
    pub sessions: f64,
    /// Requests waiting for a server: the backend's queue plus every server's (`qcur`).
    pub queue: f64,
    /// Average response time over the backend's last 1024 requests, in milliseconds
    /// (`rtime`, HTTP mode only); None where HAProxy does not measure it.
    pub rtime_ms: Option<f64>,
    /// Workers left by a reload may hold requests these figures do not count (they could
    /// not be asked): a lower bound, enough to scale up on, never to scale in on.
    pub partial: bool,
}

impl LbSample {
    /// Adds what an old worker (left by a reload) holds: its requests in progress and
    /// queue; its rate is what it still takes (none, once it stopped listening).
    pub fn add_old_worker(&mut self, old: &LbSample) {
        self.rate += old.rate;
        self.sessions += old.sessions;
        self.queue += old.queue;
    }
}

/// Parses `show stat BACKEND 6 -1` into the backend's [`LbSample`]. Columns are found by
/// their names in the header; a missing BACKEND row is an error (not "no load").
pub fn parse_stats(text: &str, backend: &str) -> Result<LbSample, String> {
    let stat = StatRows::of(text, backend)?;
    let col = |name: &str| stat.col(name);
    let sv = col("svname")?;
    let (qcur, scur, rate) = (col("qcur")?, col("scur")?, col("rate")?);
    let (rtime, mode) = (col("rtime").ok(), col("mode").ok());
    // A figure HAProxy always gives: a row cut short or a value that is not a number is an
    // answer that cannot be read, never a zero load.
    let num = |f: &[&str], i: usize, name: &str| -> Result<f64, String> {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or(format!("show stat: {name} of {backend} is not a number"))
    };
    let mut backend_row: Option<LbSample> = None;
    let mut server_queues = 0.0;
    for f in &stat.rows {
        if f.len() < stat.cols.len() {
            return Err(format!(
                "show stat: a row of {backend} has {} fields, the header {} (answer cut short?)",
                f.len(),
                stat.cols.len()
            ));
        }
        match f.get(sv).copied().unwrap_or("") {
            "BACKEND" => {
                let http = mode.and_then(|m| f.get(m)).is_none_or(|m| *m == "http");
                backend_row = Some(LbSample {
                    rate: num(f, rate, "rate")?,
                    sessions: num(f, scur, "scur")?,
                    queue: num(f, qcur, "qcur")?,
                    rtime_ms: match (rtime, http) {
                        (Some(i), true) => f.get(i).and_then(|v| v.parse().ok()),
                        _ => None,
                    },
                    partial: false,
                });
            }
            "FRONTEND" => {}
            _ => server_queues += num(f, qcur, "a server's qcur")?,
        }
    }
    let mut sample = backend_row.ok_or(format!("show stat: no BACKEND row for {backend}"))?;
    sample.queue += server_queues;
    Ok(sample)
}

/// The commands, and how to tell that HAProxy did what was asked.
pub mod command {
    use super::ServerLine;

    /// `show servers state BACKEND`.
    pub fn servers_state(backend: &str) -> String {
        format!("show servers state {backend}")
    }

    /// Every backend's servers, as the server state file holds them.
    pub const ALL_SERVERS_STATE: &str = "show servers state";

    /// The command sent after every change: its answer (HAProxy's version) shows the change's
    /// answer is complete. An empty answer alone proves nothing (a closed connection is empty
    /// too).
    pub const SENTINEL: &str = "show version";

    /// `command` followed by [`SENTINEL`] on the same line.
    pub fn with_sentinel(command: &str) -> String {
        format!("{command}; {SENTINEL}")
    }

    /// The answer to the command before the sentinel: None unless the answer ends with the
    /// sentinel's (`version`, HAProxy's answer to `show version` alone).
    pub fn before_sentinel<'a>(answer: &'a str, version: &str) -> Option<&'a str> {
        let version = version.trim();
        if version.is_empty() {
            return None;
        }
        answer.trim_end().strip_suffix(version)
    }

    /// `set server BACKEND/NAME addr IP port PORT`.
    pub fn set_addr(backend: &str, name: &str, ip: &str, port: u16) -> String {
        format!("set server {backend}/{name} addr {ip} port {port}")
    }

    /// `show stat BACKEND 4 -1`: the backend's servers.
    pub fn stat(backend: &str) -> String {
        format!("show stat {backend} 4 -1")
    }

    /// `show stat BACKEND 6 -1`: the backend's own row and its servers'.
    pub fn stat_with_backend(backend: &str) -> String {
        format!("show stat {backend} 6 -1")
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

    /// Whether `answer` (what came before the sentinel) says `command` worked: `add server`
    /// and `del server` say so in words; `set server … addr` says what changed; the others
    /// answer nothing when they succeed.
    pub fn succeeded(command: &str, answer: &str) -> bool {
        let a = answer.trim();
        if command.starts_with("add server") {
            a.contains("New server registered")
        } else if command.starts_with("del server") {
            a.contains("Server deleted")
        } else if command.contains(" addr ") {
            a.contains("changed from") || a.contains("no need to change")
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

    /// `show stat app 6 -1` as HAProxy 2.6.12 answers it (columns cut after the ones read, and
    /// a queue added on s2 and on the backend).
    const STAT6: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo\n\
app,s1,0,0,4,5,,10,820,730,,0,,0,0,0,0,no check,1,1,0,,,31,,,1,3,1,,10,,2,12,,1,,,,0,10,0,0,0,0,,,,10,0,0,,,,,3,,,0,0,95,97,,,,,,,,,,,,127.0.0.1:18081,,http,\n\
app,s2,2,2,5,5,,40,820,2170,,0,,10,0,30,0,no check,1,1,0,,,31,,,1,3,2,,10,,2,13,,2,,,,0,0,0,0,0,0,,,,0,0,0,,,,,0,,,0,0,105,110,,,,,,,,,,,,127.0.0.1:18082,,http,\n\
app,BACKEND,3,3,12,12,999,20,1640,2900,0,0,,10,0,30,0,UP,2,2,0,,0,31,0,,1,3,0,,20,,1,25,,2,,,,0,10,0,0,10,0,,,,20,0,0,0,0,0,0,3,,,0,0,100,104,,,,,,,,,,,,,,http,roundrobin\n\
other,BACKEND,9,9,99,99,999,20,1640,2900,0,0,,10,0,30,0,UP,2,2,0,,0,31,0,,1,3,0,,20,,1,99,,2,,,,0,10,0,0,10,0,,,,20,0,0,0,0,0,0,3,,,0,0,999,999,,,,,,,,,,,,,,http,roundrobin\n";

    #[test]
    fn reads_the_backends_load() {
        let s = parse_stats(STAT6, "app").unwrap();
        assert_eq!(s.rate, 25.0);
        assert_eq!(s.sessions, 12.0);
        // The backend's queue and every server's.
        assert_eq!(s.queue, 3.0 + 2.0);
        assert_eq!(s.rtime_ms, Some(100.0));
        let other = parse_stats(STAT6, "other").unwrap();
        assert_eq!((other.rate, other.sessions), (99.0, 99.0));
        // No BACKEND row: an error, never "no load".
        assert!(parse_stats(STAT6, "web")
            .unwrap_err()
            .contains("no BACKEND row"));
        assert!(parse_stats("", "app").is_err());
        assert!(
            parse_stats("# pxname,svname,qcur,scur\napp,BACKEND,0,0\n", "app")
                .unwrap_err()
                .contains("no rate column")
        );
        // An answer cut short in the BACKEND row, or a figure that is not a number: an error,
        // never zeros.
        let cut = &STAT6[..STAT6.find("app,BACKEND,3,3,12").unwrap() + 30];
        assert!(
            parse_stats(cut, "app").unwrap_err().contains("cut short"),
            "{cut}"
        );
        let blank = STAT6.replace("app,BACKEND,3,3,12,", "app,BACKEND,3,3,,");
        assert!(parse_stats(&blank, "app")
            .unwrap_err()
            .contains("scur of app is not a number"));
        // TCP mode: HAProxy's rtime means nothing there.
        let tcp = STAT6.replace(",http,roundrobin", ",tcp,roundrobin");
        assert_eq!(parse_stats(&tcp, "app").unwrap().rtime_ms, None);
        // Garbage in a number is neither a huge load nor none.
        let bad = STAT6.replace("app,BACKEND,3,3,12", "app,BACKEND,3,3,NaN");
        assert!(parse_stats(&bad, "app").is_err());
    }

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
        // Resolution maintenance (0x20) is not a server autoscaler took out: an apply does not
        // count it as coming back every time.
        let rmaint = RuntimeServer {
            admin_state: 0x20,
            ..a.clone()
        };
        assert!(!rmaint.leaving() && rmaint.in_maintenance());
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
            ip: "127.0.1.5".into(),
            port: 80,
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
        let addr = command::set_addr("app", "web_80", "127.0.0.2", 80);
        assert_eq!(addr, "set server app/web_80 addr 127.0.0.2 port 80");
        // As HAProxy 2.6.12 answers it.
        assert!(command::succeeded(&addr, "IP changed from '127.0.0.1' to '127.0.0.2', port changed from '19994' to '19995' by 'stats socket command'\n"));
        assert!(command::succeeded(
            &addr,
            "no need to change the addr, no need to change the port by 'stats socket command'\n"
        ));
        assert!(
            !command::succeeded(&addr, "\n"),
            "an empty answer is not one of these"
        );
    }

    /// A change's answer counts only when HAProxy's answer to the sentinel follows it: an
    /// empty or cut-short answer is no answer.
    #[test]
    fn answers_end_with_the_sentinel() {
        let v = "2.6.12-1+deb12u4\n\n";
        let cmd = command::with_sentinel("set server app/x state ready");
        assert_eq!(cmd, "set server app/x state ready; show version");
        assert_eq!(
            command::before_sentinel("\n2.6.12-1+deb12u4\n\n", v),
            Some("\n")
        );
        assert_eq!(
            command::before_sentinel("No such server.\n\n2.6.12-1+deb12u4\n\n", v),
            Some("No such server.\n\n")
        );
        assert_eq!(command::before_sentinel("", v), None, "a closed connection");
        assert_eq!(command::before_sentinel("\n", v), None);
        assert_eq!(
            command::before_sentinel("New server registered.\n", v),
            None
        );
        assert_eq!(
            command::before_sentinel("anything", ""),
            None,
            "no version known"
        );
    }

    #[test]
    fn show_info_and_show_proc() {
        assert_eq!(
            parse_info_pid("Name: HAProxy\nVersion: 2.6.12\nPid: 669\nUptime: 0d\n"),
            Some(669)
        );
        assert_eq!(parse_info_pid("Unknown command\n"), None);
        let proc_ = "#<PID>          <type>          <reloads>       <uptime>        <version>      \n\
                     656             master          1 [failed: 0]   0d00h00m02s     2.6.12-1+deb12u4\n\
                     # workers\n669             worker          0               0d00h00m01s     2.6.12-1+deb12u4\n\
                     # old workers\n659             worker          1               0d00h00m02s     2.6.12-1+deb12u4\n\
                     # programs\n\n";
        assert_eq!(parse_show_proc(proc_), Ok((vec![669], vec![659])));
        assert!(parse_show_proc("Unknown command.\n").is_err());
    }

    /// The state file a reload loads: the plan's servers ready whatever their admin state
    /// (drain here), the ones it drops gone, other backends untouched.
    #[test]
    fn the_state_file_brings_back_no_admin_state() {
        let all = format!(
            "{}4 other 1 x 10.0.0.1 2 8 1 1 4 6 3 2 6 0 0 0 - 80 - 0 0 - - 0\n",
            STATE
        );
        let keep: std::collections::BTreeSet<&str> = ["127.0.0.3_18481"].into();
        let out = state_file(&all, "app", &keep).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "1");
        assert!(lines[1].starts_with("# be_id"));
        assert_eq!(
            &lines[2..],
            [
                "3 app 2 127.0.0.3_18481 127.0.0.3 2 0 1 1 4 6 3 2 6 0 0 0 - 18481 - 0 0 - - 0",
                "4 other 1 x 10.0.0.1 2 8 1 1 4 6 3 2 6 0 0 0 - 80 - 0 0 - - 0",
            ]
        );
        let reread = parse_servers_state(&out).unwrap();
        assert!(!reread["127.0.0.3_18481"].leaving());
        assert!(state_file("Permission denied.\n", "app", &keep).is_err());
    }
}
