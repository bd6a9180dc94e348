//! A fault-injecting HTTP proxy in front of moto, on loopback: the EC2 API as it misbehaves in
//! real life. Per API action it can throttle (503 RequestLimitExceeded), fail (500), answer
//! late, drop the connection before or after forwarding the call, or hold the call until
//! released; it can show running instances as `pending`, hide new instances from
//! DescribeInstances for a while (EC2's eventual consistency), and serve each instance's
//! console output (cloud-init's host key block, which moto does not print). It honours
//! RunInstances' ClientToken as EC2 does (moto does not): a repeated token gets the first
//! call's answer and launches nothing. It counts every call.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What to do with one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 503 RequestLimitExceeded, not forwarded.
    Throttle,
    /// 500 InternalError, not forwarded.
    ServerError,
    /// Forwarded, answered after this long.
    Slow(Duration),
    /// The connection is closed before the call reaches EC2.
    Drop,
    /// The call reaches EC2; the connection is closed before its answer.
    DropAnswer,
    /// Not forwarded (nor answered) until the action is released; never forwarded if the
    /// caller hangs up meanwhile (a master killed mid-call).
    Hold,
    /// Forwarded at once; answered once the action is released.
    HoldAnswer,
}

#[derive(Default)]
struct Rules {
    next: HashMap<String, VecDeque<Fault>>,
    always: HashMap<String, Fault>,
    pending: bool,
    console: HashMap<String, String>,
    console_default: Option<String>,
    counts: HashMap<String, usize>,
    /// Calls that reached EC2 (moto), per action.
    forwarded: HashMap<String, usize>,
    /// Held calls whose caller hung up before the release: never forwarded.
    abandoned: HashMap<String, usize>,
    /// RunInstances answers by ClientToken, with the parameters of the call that made them
    /// (its body less the token): a repeat with other parameters is refused, as EC2 does.
    tokens: HashMap<String, (String, Message)>,
    /// ClientTokens of RunInstances calls on their way to EC2: a repeat waits for the answer.
    in_flight: std::collections::HashSet<String>,
    /// Instances RunInstances created are hidden from DescribeInstances.
    hide_new: bool,
    /// The instances RunInstances created through this proxy.
    launched: Vec<String>,
}

/// The proxy; stops when dropped.
pub struct Ec2Proxy {
    pub endpoint: String,
    rules: Arc<Mutex<Rules>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Ec2Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Ec2Proxy {
    /// A proxy on 127.0.0.1 forwarding to `upstream` (`http://127.0.0.1:PORT`).
    pub async fn start(upstream: &str) -> Ec2Proxy {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let rules: Arc<Mutex<Rules>> = Arc::default();
        let r = rules.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, upstream.clone(), r.clone()));
            }
        });
        Ec2Proxy {
            endpoint,
            rules,
            task,
        }
    }

    fn rules(&self) -> std::sync::MutexGuard<'_, Rules> {
        self.rules.lock().unwrap()
    }

    /// The next calls of `action` meet `faults`, one each, in order.
    pub fn fail_next(&self, action: &str, faults: &[Fault]) {
        self.rules()
            .next
            .entry(action.into())
            .or_default()
            .extend(faults);
    }

    /// Every call of `action` meets `fault` until [`Ec2Proxy::release`].
    pub fn fail_always(&self, action: &str, fault: Fault) {
        self.rules().always.insert(action.into(), fault);
    }

    /// Ends [`Ec2Proxy::fail_always`] for `action`; held calls go on.
    pub fn release(&self, action: &str) {
        self.rules().always.remove(action);
    }

    /// From now on, DescribeInstances does not show an instance RunInstances created, until
    /// [`Ec2Proxy::show_new_instances`] (EC2's eventual consistency, for as long as a test
    /// needs however slow the machine).
    pub fn hide_new_instances(&self) {
        self.rules().hide_new = true;
    }

    /// DescribeInstances shows every instance again.
    pub fn show_new_instances(&self) {
        self.rules().hide_new = false;
    }

    /// The ClientTokens RunInstances was called with, each once.
    pub fn tokens(&self) -> Vec<String> {
        let mut t: Vec<String> = self.rules().tokens.keys().cloned().collect();
        t.sort();
        t
    }

    /// While true, DescribeInstances shows running instances as pending.
    pub fn hold_pending(&self, on: bool) {
        self.rules().pending = on;
    }

    /// What GetConsoleOutput returns for `instance_id` (or, with None, for any instance).
    pub fn set_console(&self, instance_id: Option<&str>, text: &str) {
        match instance_id {
            Some(id) => {
                self.rules().console.insert(id.into(), text.into());
            }
            None => self.rules().console_default = Some(text.into()),
        }
    }

    /// How many calls of `action` arrived.
    pub fn count(&self, action: &str) -> usize {
        self.rules().counts.get(action).copied().unwrap_or(0)
    }

    /// How many calls of `action` reached EC2.
    pub fn forwarded(&self, action: &str) -> usize {
        self.rules().forwarded.get(action).copied().unwrap_or(0)
    }

    /// Waits (bounded) until `n` held calls of `action` were abandoned by their caller: from
    /// then on they can never reach EC2.
    pub async fn wait_abandoned(&self, action: &str, n: usize, limit: Duration) {
        let end = std::time::Instant::now() + limit;
        while self.rules().abandoned.get(action).copied().unwrap_or(0) < n {
            assert!(
                std::time::Instant::now() < end,
                "no held {action} was abandoned within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) until `n` calls of `action` arrived.
    pub async fn wait_for(&self, action: &str, n: usize, limit: Duration) {
        let end = std::time::Instant::now() + limit;
        while self.count(action) < n {
            assert!(
                std::time::Instant::now() < end,
                "{action} was called {} times, not {n}, within {limit:?}",
                self.count(action)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One parsed HTTP/1.1 message: head lines and body.
#[derive(Clone)]
struct Message {
    head: Vec<String>,
    body: Vec<u8>,
}

impl Message {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.iter().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for line in &self.head {
            let name = line.split(':').next().unwrap_or("").trim();
            if ["content-length", "connection", "transfer-encoding"]
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
            {
                continue;
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", self.body.len()).as_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

/// Reads one request (Content-Length body) from a keep-alive client connection.
async fn read_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Message> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<String> = String::from_utf8_lossy(&buf[..end])
                .split("\r\n")
                .map(String::from)
                .collect();
            let mut m = Message { head, body: vec![] };
            let len: usize = m
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 8192];
                let n = conn.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            m.body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Some(m);
        }
        let mut chunk = [0u8; 8192];
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends `req` to moto on a fresh connection and reads its whole answer; counts it as
/// forwarded once it is written.
async fn forward(
    upstream: &str,
    req: &Message,
    action: &str,
    rules: &Arc<Mutex<Rules>>,
) -> Option<Message> {
    let mut up = TcpStream::connect(upstream).await.ok()?;
    up.write_all(&req.to_bytes()).await.ok()?;
    *rules
        .lock()
        .unwrap()
        .forwarded
        .entry(action.to_string())
        .or_default() += 1;
    let mut raw = Vec::new();
    up.read_to_end(&mut raw).await.ok()?;
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head: Vec<String> = String::from_utf8_lossy(&raw[..end])
        .split("\r\n")
        .map(String::from)
        .collect();
    Some(Message {
        head,
        body: raw[end + 4..].to_vec(),
    })
}

fn error(status: &str, code: &str) -> Message {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>injected by the test proxy</Message></Error></Errors><RequestID>proxy</RequestID></Response>"
    );
    Message {
        head: vec![
            format!("HTTP/1.1 {status}"),
            "Content-Type: text/xml".into(),
        ],
        body: body.into_bytes(),
    }
}

/// A RunInstances call's parameters, less its ClientToken (and the SDK's per-call fields).
fn token_params(body: &str) -> String {
    let mut kv: Vec<&str> = body
        .split('&')
        .filter(|kv| !kv.starts_with("ClientToken="))
        .collect();
    kv.sort_unstable();
    kv.join("&")
}

/// Takes a ClientToken out of the calls in flight when the call ends, however it ends.
struct InFlight(String, Arc<Mutex<Rules>>);
impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut r) = self.1.lock() {
            r.in_flight.remove(&self.0);
        }
    }
}

fn param<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    body.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then_some(v)
    })
}

async fn serve(mut conn: TcpStream, upstream: String, rules: Arc<Mutex<Rules>>) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut conn, &mut buf).await {
        let body = String::from_utf8_lossy(&req.body).into_owned();
        let action = param(&body, "Action").unwrap_or("").to_string();
        let fault = {
            let mut r = rules.lock().unwrap();
            *r.counts.entry(action.clone()).or_default() += 1;
            let queued = r.next.get_mut(&action).and_then(VecDeque::pop_front);
            queued.or_else(|| r.always.get(&action).copied())
        };
        // A repeated ClientToken gets the first answer, and launches nothing (as EC2 does);
        // with other parameters, IdempotentParameterMismatch. A repeat of a call still on its
        // way waits for it.
        let token = (action == "RunInstances")
            .then(|| param(&body, "ClientToken").map(String::from))
            .flatten();
        let params = token_params(&body);
        if let Some(t) = &token {
            let give_up = std::time::Instant::now() + Duration::from_secs(60);
            let first = loop {
                let seen = {
                    let mut r = rules.lock().unwrap();
                    if std::time::Instant::now() > give_up {
                        Some(Some((
                            params.clone(),
                            error("500 Internal Server Error", "InternalError"),
                        )))
                    } else if let Some(first) = r.tokens.get(t).cloned() {
                        Some(Some(first))
                    } else if r.in_flight.insert(t.clone()) {
                        Some(None)
                    } else {
                        None
                    }
                };
                match seen {
                    Some(first) => break first,
                    None => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            if let Some((first_params, answer)) = first {
                let answer = match first_params == params {
                    true => answer,
                    false => error("400 Bad Request", "IdempotentParameterMismatch"),
                };
                if conn.write_all(&answer.to_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
        }
        // Whatever happens to this call, a repeat of its token no longer waits for it.
        let _done = token.clone().map(|t| InFlight(t, rules.clone()));
        let held = |rules: &Arc<Mutex<Rules>>| {
            rules.lock().unwrap().always.get(&action).copied() == Some(fault.unwrap_or(Fault::Hold))
        };
        let answer = match fault {
            Some(Fault::Throttle) => error("503 Service Unavailable", "RequestLimitExceeded"),
            Some(Fault::ServerError) => error("500 Internal Server Error", "InternalError"),
            Some(Fault::Drop) => return,
            Some(Fault::Hold) => {
                while held(&rules) {
                    let mut byte = [0u8; 1];
                    match tokio::time::timeout(Duration::from_millis(20), conn.read(&mut byte))
                        .await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            // The caller is gone.
                            *rules.lock().unwrap().abandoned.entry(action).or_default() += 1;
                            return;
                        }
                        _ => {}
                    }
                }
                let Some(a) = forward(&upstream, &req, &action, &rules).await else {
                    return;
                };
                a
            }
            other => {
                let Some(a) = forward(&upstream, &req, &action, &rules).await else {
                    return;
                };
                if let Some(t) = &token {
                    // EC2 remembers the token whether or not its answer reaches the caller.
                    if a.head.first().is_some_and(|l| l.contains(" 200 ")) {
                        let mut r = rules.lock().unwrap();
                        r.tokens.insert(t.clone(), (params.clone(), a.clone()));
                    }
                }
                match other {
                    Some(Fault::DropAnswer) => return,
                    Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
                    Some(Fault::HoldAnswer) => {
                        while held(&rules) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    _ => {}
                }
                a
            }
        };
        if action == "RunInstances" && answer.head.first().is_some_and(|l| l.contains(" 200 ")) {
            let mut r = rules.lock().unwrap();
            if let Some(t) = token {
                r.tokens.insert(t, (params, answer.clone()));
            }
            let text = String::from_utf8_lossy(&answer.body).into_owned();
            r.launched.extend(tag_values(&text, "instanceId"));
        }
        let answer = rewrite(&action, &body, answer, &rules);
        if conn.write_all(&answer.to_bytes()).await.is_err() {
            return;
        }
    }
}

/// The text of every `<tag>…</tag>` in `xml`.
fn tag_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split_once(&close).map(|(v, _)| v.to_string()))
        .collect()
}

/// DescribeInstances' answer without the reservations that hold an instance of `hidden`.
fn without_reservations(xml: &str, hidden: &[String]) -> String {
    let Some(start) = xml.find("<reservationSet>") else {
        return xml.to_string();
    };
    let inner_start = start + "<reservationSet>".len();
    let Some(end) = xml[inner_start..]
        .find("</reservationSet>")
        .map(|e| inner_start + e)
    else {
        return xml.to_string();
    };
    // Split the set into its top-level <item>s by nesting depth.
    let body = &xml[inner_start..end];
    let mut items = Vec::new();
    let (mut depth, mut from, mut i) = (0usize, 0usize, 0usize);
    while i < body.len() {
        if body[i..].starts_with("<item>") {
            if depth == 0 {
                from = i;
            }
            depth += 1;
            i += "<item>".len();
        } else if body[i..].starts_with("</item>") {
            depth = depth.saturating_sub(1);
            i += "</item>".len();
            if depth == 0 {
                items.push(&body[from..i]);
            }
        } else {
            i += body[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    let kept: String = items
        .into_iter()
        .filter(|item| {
            !tag_values(item, "instanceId")
                .iter()
                .any(|id| hidden.contains(id))
        })
        .collect();
    format!("{}{kept}{}", &xml[..inner_start], &xml[end..])
}

/// Shows instances as pending, hides new ones, and serves console output, where the rules
/// say so.
fn rewrite(action: &str, req: &str, mut answer: Message, rules: &Arc<Mutex<Rules>>) -> Message {
    let r = rules.lock().unwrap();
    let text = String::from_utf8_lossy(&answer.body).into_owned();
    let text = match action {
        "DescribeInstances" if r.hide_new => without_reservations(&text, &r.launched),
        _ => text,
    };
    let text = match action {
        "DescribeInstances" if r.pending => text.replace(
            "<instanceState><code>16</code><name>running</name></instanceState>",
            "<instanceState><code>0</code><name>pending</name></instanceState>",
        ),
        "GetConsoleOutput" => {
            let id = param(req, "InstanceId").unwrap_or("");
            let Some(console) = r.console.get(id).or(r.console_default.as_ref()) else {
                return answer;
            };
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD.encode(console);
            match (text.find("<output>"), text.find("</output>")) {
                (Some(a), Some(b)) => format!("{}<output>{b64}{}", &text[..a], &text[b..]),
                _ => text,
            }
        }
        _ => text,
    };
    answer.body = text.into_bytes();
    answer
}
