//! Kinds of configuration value: how a key's text becomes a typed value, how the value is
//! written back (for `autoscaler init` and `check`), and what "too low" means for a bounded one.
//!
//! A kind checks everything about one value on its own (a port is 1–65535, a bind address is
//! ADDRESS:PORT, a check command contains `{config}`); rules between several keys live in
//! `Config::validate`. Every message says what was wrong and what is accepted; the reader adds
//! the file, section and key.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use super::values::{CommandLine, HaproxyTarget, Secret};
use super::CONFIG_PLACEHOLDER;
use crate::hosts::{parse_port, HostName};

/// Where a value is read: relative paths in a file are relative to the file's directory;
/// defaults and bounds are taken as they are.
#[derive(Debug, Clone, Copy)]
pub struct Cx<'a> {
    pub base: Option<&'a Path>,
}

impl Cx<'_> {
    /// For defaults and bounds, which are never relative to a file.
    pub const PLAIN: Cx<'static> = Cx { base: None };
}

/// One kind of value.
pub trait Kind {
    type Value;
    /// The value's text is taken exactly as written, quotes included (command lines, which
    /// have their own quoting). Other kinds lose one pair of quotes around the whole value.
    const RAW: bool = false;
    /// Parses the key's text (already trimmed).
    fn parse(text: &str, cx: &Cx) -> Result<Self::Value, String>;
    /// The text that parses back to `v`.
    fn show(v: &Self::Value) -> String;
    /// Why `shown` is under the key's bound `limit` (inclusive or not).
    fn too_low(shown: &str, limit: &str, inclusive: bool) -> String {
        let _ = shown;
        match inclusive {
            true => format!("must be at least {limit}"),
            false => format!("must be above {limit}"),
        }
    }
}

/// A lower bound, written in the key's own notation ("1", "200ms").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The value may equal the limit.
    AtLeast(&'static str),
    /// The value must exceed the limit.
    Above(&'static str),
}

impl Bound {
    /// The bound as words, for documentation.
    pub fn describe(&self) -> String {
        match self {
            Bound::AtLeast(l) => format!("at least {l}"),
            Bound::Above(l) => format!("above {l}"),
        }
    }
}

/// Checks `v` against `bound`; `why` (may be empty) is added to the message.
pub fn check_bound<K: Kind>(v: &K::Value, bound: Bound, why: &str) -> Result<(), String>
where
    K::Value: PartialOrd,
{
    let (limit, inclusive) = match bound {
        Bound::AtLeast(l) => (l, true),
        Bound::Above(l) => (l, false),
    };
    let floor = K::parse(limit, &Cx::PLAIN)
        .unwrap_or_else(|e| panic!("bound {limit:?} of the key table does not parse: {e}"));
    let ok = match inclusive {
        true => *v >= floor,
        false => *v > floor,
    };
    match ok {
        true => Ok(()),
        false => Err(K::too_low(&K::show(v), limit, inclusive) + why),
    }
}

/// The value without one pair of matching quotes around all of it (`"web 1"` → `web 1`).
pub fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            if !inner.contains(q) {
                return inner;
            }
        }
    }
    v
}

/// The text of a shown value as the file must hold it to read it back: quoted when it starts
/// or ends with a quote or a space.
pub fn quote_if_needed(v: String) -> String {
    let edge = |c: char| c.is_whitespace() || c == '"' || c == '\'';
    let needs = v.starts_with(edge) || v.ends_with(edge);
    match (needs, v.contains('"')) {
        (false, _) => v,
        (true, false) => format!("\"{v}\""),
        (true, true) => format!("'{v}'"),
    }
}

/// Text without control characters (every string kind starts here).
fn text(v: &str) -> Result<String, String> {
    match v.chars().any(char::is_control) {
        true => Err("contains a control character".into()),
        false => Ok(v.to_string()),
    }
}

/// A string kind: text without control characters, then `rule` (which gets it owned and
/// returns it, or says what is wrong).
macro_rules! string_kind {
    ($(#[$m:meta])* $name:ident, $rule:expr) => {
        $(#[$m])*
        pub struct $name;
        impl Kind for $name {
            type Value = String;
            fn parse(v: &str, _: &Cx) -> Result<String, String> {
                let rule: fn(String) -> Result<String, String> = $rule;
                rule(text(v)?)
            }
            fn show(v: &String) -> String {
                v.clone()
            }
        }
    };
}

string_kind!(
    /// A free-form string.
    Text,
    Ok
);

string_kind!(
    /// A login name that cannot be taken for an option.
    UserName,
    |v| match v.is_empty() || v.starts_with('-') || v.contains(char::is_whitespace) {
        true => Err(format!("{v:?} is not a valid user name")),
        false => Ok(v),
    }
);

string_kind!(
    /// The `autoscaler:group` tag value.
    GroupTag,
    |v| match v.is_empty() || v.len() > 128 {
        true => Err("must be 1 to 128 characters (the autoscaler:group tag)".into()),
        false => Ok(v),
    }
);

string_kind!(
    /// An http:// or https:// URL, or empty.
    UrlOrEmpty,
    |v| match v.is_empty() || v.starts_with("http://") || v.starts_with("https://") {
        true => Ok(v),
        false => Err(format!("{v:?} is not an http:// or https:// URL")),
    }
);

string_kind!(
    /// A word that may appear in haproxy.cfg as a name.
    ConfigWord,
    |v| {
        let ok = !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        match ok {
            true => Ok(v),
            false => Err(format!(
                "{v:?} is not a name of letters, digits, '_', '-', '.'"
            )),
        }
    }
);

string_kind!(
    /// An HTTP path for health checks, or empty: only characters a URL path may hold that
    /// HAProxy's tokenizer takes literally (no space, quote, backslash, `#` or `$`).
    UrlPath,
    |v| {
        let ok = v.is_empty()
            || (v.starts_with('/')
                && v.chars().all(|c| {
                    c.is_ascii_alphanumeric() || "-._~/?=&%+:@!*(),;".contains(c)
                }));
        match ok {
            true => Ok(v),
            false => Err(format!(
                "{v:?} is not a URL path (starts with '/'; letters, digits and -._~/?=&%+:@!*(),; only)"
            )),
        }
    }
);

/// One `bind` line: `ADDR:PORT` (ADDR is `*`, empty, an IP literal — IPv6 in brackets or bare
/// — or a name), then HAProxy bind options (`ssl crt /etc/haproxy/site.pem alpn h2,http/1.1`),
/// each a word of characters HAProxy's tokenizer and the config file take literally.
fn check_bind(bind: &str) -> Result<String, String> {
    let bind = text(bind.trim())?;
    let accepted =
        "ADDRESS:PORT [options], e.g. *:80, [::]:80 v4v6 or *:443 ssl crt /etc/haproxy/site.pem";
    let mut words = bind.split_whitespace();
    let address = words.next().unwrap_or("");
    let (addr, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("{bind:?} is not {accepted}"))?;
    parse_port(port).map_err(|e| format!("{bind:?} is not {accepted}: {e}"))?;
    if !(addr.is_empty() || addr == "*" || addr == "::" || addr == "[::]") {
        HostName::parse(addr).map_err(|e| format!("{bind:?} is not {accepted}: {e}"))?;
    }
    for w in words {
        let ok = w
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.,:/=+@".contains(c));
        if !ok {
            return Err(format!(
                "{bind:?}: option {w:?} has a character HAProxy would interpret (use letters, digits and _-.,:/=+@)"
            ));
        }
    }
    Ok(bind.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// HAProxy's frontend addresses: one or more `bind` lines, separated by `;`.
pub struct Binds;
impl Kind for Binds {
    type Value = Vec<String>;
    fn parse(v: &str, _: &Cx) -> Result<Vec<String>, String> {
        let binds = v
            .split(';')
            .filter(|b| !b.trim().is_empty())
            .map(check_bind)
            .collect::<Result<Vec<_>, _>>()?;
        match binds.is_empty() {
            true => Err("needs at least one ADDRESS:PORT, e.g. *:80".into()),
            false => Ok(binds),
        }
    }
    fn show(v: &Vec<String>) -> String {
        v.join("; ")
    }
}

/// A user or group name for HAProxy's `user`/`group`, or empty for none.
pub struct OptionalName;
impl Kind for OptionalName {
    type Value = String;
    fn parse(v: &str, cx: &Cx) -> Result<String, String> {
        match v.is_empty() {
            true => Ok(String::new()),
            false => ConfigWord::parse(v, cx),
        }
    }
    fn show(v: &String) -> String {
        v.clone()
    }
}

/// A secret string: shown redacted.
pub struct SecretText;
impl Kind for SecretText {
    type Value = Secret;
    fn parse(v: &str, _: &Cx) -> Result<Secret, String> {
        text(v).map(Secret::new)
    }
    fn show(v: &Secret) -> String {
        match v.is_empty() {
            true => String::new(),
            false => "<redacted>".into(),
        }
    }
}

/// A report socket path on a node ([`crate::hosts::validate_report_socket`]); empty for none.
pub struct ReportSocket;
impl Kind for ReportSocket {
    type Value = Option<String>;
    fn parse(v: &str, _: &Cx) -> Result<Option<String>, String> {
        match v {
            "" => Ok(None),
            v => crate::hosts::validate_report_socket(v).map(|p| Some(p.to_string())),
        }
    }
    fn show(v: &Option<String>) -> String {
        v.clone().unwrap_or_default()
    }
}

/// A comma-separated list of distinct ports; empty for none.
pub struct Ports;
impl Kind for Ports {
    type Value = Vec<u16>;
    fn parse(v: &str, _: &Cx) -> Result<Vec<u16>, String> {
        let mut out: Vec<u16> = Vec::new();
        for p in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let p = parse_port(p).map_err(|e| e.to_string())?;
            if out.contains(&p) {
                return Err(format!("port {p} is listed twice"));
            }
            out.push(p);
        }
        Ok(out)
    }
    fn show(v: &Vec<u16>) -> String {
        v.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
    }
}

pub struct Port;
impl Kind for Port {
    type Value = u16;
    fn parse(v: &str, _: &Cx) -> Result<u16, String> {
        parse_port(v).map_err(|e| e.to_string())
    }
    fn show(v: &u16) -> String {
        v.to_string()
    }
}

/// A whole number, 0 or more.
pub struct Whole<T>(PhantomData<T>);
impl<T: FromStr + ToString> Kind for Whole<T> {
    type Value = T;
    fn parse(v: &str, _: &Cx) -> Result<T, String> {
        v.parse()
            .map_err(|_| format!("{v:?} is not valid; expected a whole number, 0 or more"))
    }
    fn show(v: &T) -> String {
        v.to_string()
    }
}

/// A percentage, 0–100, with or without `%`.
pub struct Percent;
impl Kind for Percent {
    type Value = f64;
    fn parse(v: &str, _: &Cx) -> Result<f64, String> {
        match v.trim_end_matches('%').trim().parse::<f64>() {
            Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
            _ => Err(format!("{v:?} is not a percentage between 0 and 100")),
        }
    }
    fn show(v: &f64) -> String {
        v.to_string()
    }
}

/// A per-node target for a load signal: a positive number, or empty (the signal is off).
/// Zero is refused: it would ask for endless nodes.
pub struct Target;
impl Kind for Target {
    type Value = Option<f64>;
    fn parse(v: &str, _: &Cx) -> Result<Option<f64>, String> {
        if v.is_empty() || v == "off" {
            return Ok(None);
        }
        match v.parse::<f64>() {
            Ok(t) if t.is_finite() && t > 0.0 => Ok(Some(t)),
            Ok(_) => Err(format!(
                "{v} is not a target: use a number above 0, or leave it empty to turn the signal off"
            )),
            Err(_) => Err(format!(
                "{v:?} is not a number (a target above 0, or empty to turn the signal off)"
            )),
        }
    }
    fn show(v: &Option<f64>) -> String {
        v.map(|t| t.to_string()).unwrap_or_default()
    }
}

/// A duration that turns something on, or empty (off). Zero is refused.
pub struct OptionalDur;
impl Kind for OptionalDur {
    type Value = Option<Duration>;
    fn parse(v: &str, cx: &Cx) -> Result<Option<Duration>, String> {
        if v.is_empty() || v == "off" {
            return Ok(None);
        }
        match Dur::parse(v, cx)? {
            d if d.is_zero() => Err(format!(
                "{v} is not a target: use a duration above 0 (e.g. 250ms), or leave it empty to turn the signal off"
            )),
            d => Ok(Some(d)),
        }
    }
    fn show(v: &Option<Duration>) -> String {
        v.map(|d| Dur::show(&d)).unwrap_or_default()
    }
}

/// A fraction in [0, 1).
pub struct Fraction;
impl Kind for Fraction {
    type Value = f64;
    fn parse(v: &str, _: &Cx) -> Result<f64, String> {
        let f: f64 = v
            .parse()
            .map_err(|_| format!("{v:?} is not valid; expected a number such as 0.1"))?;
        match (0.0..1.0).contains(&f) {
            true => Ok(f),
            false => Err(format!("{f} is not in [0, 1), e.g. 0.1")),
        }
    }
    fn show(v: &f64) -> String {
        v.to_string()
    }
}

/// A duration: `500ms`, `30s`, `5m`, `1h 30m`.
pub struct Dur;
impl Kind for Dur {
    type Value = Duration;
    fn parse(v: &str, _: &Cx) -> Result<Duration, String> {
        humantime::parse_duration(v).map_err(|_| {
            format!("{v:?} is not a duration; write e.g. 500ms, 30s, 5m, 1h or 1h 30m")
        })
    }
    fn show(v: &Duration) -> String {
        humantime::format_duration(*v).to_string()
    }
    fn too_low(shown: &str, limit: &str, inclusive: bool) -> String {
        match inclusive {
            true => format!("{shown} is too short; it must be at least {limit}"),
            false => format!("must be longer than {limit}"),
        }
    }
}

/// true/false (also yes/no, on/off, 1/0).
pub struct Flag;
impl Kind for Flag {
    type Value = bool;
    fn parse(v: &str, _: &Cx) -> Result<bool, String> {
        match v.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(true),
            "false" | "no" | "off" | "0" => Ok(false),
            other => Err(format!("{other:?} is not true or false")),
        }
    }
    fn show(v: &bool) -> String {
        v.to_string()
    }
}

/// Relative paths are relative to the configuration file's directory.
fn anchor(v: &str, cx: &Cx) -> PathBuf {
    let p = Path::new(v);
    match cx.base {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// A path that must be given.
pub struct FilePath;
impl Kind for FilePath {
    type Value = PathBuf;
    fn parse(v: &str, cx: &Cx) -> Result<PathBuf, String> {
        match v.is_empty() {
            true => Err("must not be empty".into()),
            false => Ok(anchor(&text(v)?, cx)),
        }
    }
    fn show(v: &PathBuf) -> String {
        v.display().to_string()
    }
}

/// A path, or empty for none.
pub struct OptionalPath;
impl Kind for OptionalPath {
    type Value = Option<PathBuf>;
    fn parse(v: &str, cx: &Cx) -> Result<Option<PathBuf>, String> {
        let v = text(v)?;
        Ok((!v.is_empty()).then(|| anchor(&v, cx)))
    }
    fn show(v: &Option<PathBuf>) -> String {
        v.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }
}

/// `IP:PORT` to listen on, or empty for off.
pub struct OptionalListen;
impl Kind for OptionalListen {
    type Value = Option<std::net::SocketAddr>;
    fn parse(v: &str, _: &Cx) -> Result<Self::Value, String> {
        match v {
            "" => Ok(None),
            v => v.parse().map(Some).map_err(|_| {
                "must be IP:PORT (127.0.0.1:9701, [::1]:9701) or empty for off".into()
            }),
        }
    }
    fn show(v: &Self::Value) -> String {
        v.map(|a| a.to_string()).unwrap_or_default()
    }
}

/// A Unix socket path that HAProxy's configuration can hold (no spaces or '#').
pub struct SocketPath;
impl Kind for SocketPath {
    type Value = PathBuf;
    fn parse(v: &str, cx: &Cx) -> Result<PathBuf, String> {
        let p = FilePath::parse(v, cx)?;
        match p
            .to_str()
            .is_none_or(|p| p.contains(char::is_whitespace) || p.contains('#'))
        {
            true => Err("must be a path without spaces or '#'".into()),
            false => Ok(p),
        }
    }
    fn show(v: &PathBuf) -> String {
        v.display().to_string()
    }
}

/// A comma-separated list of words; empty items are dropped.
pub struct Words;
impl Kind for Words {
    type Value = Vec<String>;
    fn parse(v: &str, _: &Cx) -> Result<Vec<String>, String> {
        Ok(v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect())
    }
    fn show(v: &Vec<String>) -> String {
        v.join(", ")
    }
}

/// A comma-separated list of HAProxy servers; every bad item is named.
pub struct Targets;
impl Kind for Targets {
    type Value = Vec<HaproxyTarget>;
    fn parse(v: &str, cx: &Cx) -> Result<Vec<HaproxyTarget>, String> {
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for item in Words::parse(v, cx)? {
            match item.parse::<HaproxyTarget>() {
                Ok(t) => out.push(t),
                Err(e) => bad.push(format!("{item:?} is not valid; expected {e}")),
            }
        }
        match bad.is_empty() {
            true => Ok(out),
            false => Err(bad.join("; ")),
        }
    }
    fn show(v: &Vec<HaproxyTarget>) -> String {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One of a closed set of spellings.
pub struct Choice<T>(PhantomData<T>);
impl<T: FromStr<Err = String> + ToString> Kind for Choice<T> {
    type Value = T;
    fn parse(v: &str, _: &Cx) -> Result<T, String> {
        v.parse()
            .map_err(|e| format!("{v:?} is not valid; expected {e}"))
    }
    fn show(v: &T) -> String {
        v.to_string()
    }
}

/// A command line (shell quoting, no shell); may be empty.
pub struct Command;
impl Kind for Command {
    type Value = CommandLine;
    const RAW: bool = true;
    fn parse(v: &str, _: &Cx) -> Result<CommandLine, String> {
        v.parse()
            .map_err(|e| format!("{v:?} is not valid; expected {e}"))
    }
    fn show(v: &CommandLine) -> String {
        v.to_string()
    }
}

/// A command line that must be given.
pub struct RequiredCommand;
impl Kind for RequiredCommand {
    type Value = CommandLine;
    const RAW: bool = true;
    fn parse(v: &str, cx: &Cx) -> Result<CommandLine, String> {
        let c = Command::parse(v, cx)?;
        match c.is_empty() {
            true => Err("must not be empty".into()),
            false => Ok(c),
        }
    }
    fn show(v: &CommandLine) -> String {
        v.to_string()
    }
}

/// A command that validates a file named by the `{config}` placeholder.
pub struct CheckCommand;
impl Kind for CheckCommand {
    type Value = CommandLine;
    const RAW: bool = true;
    fn parse(v: &str, cx: &Cx) -> Result<CommandLine, String> {
        let c = Command::parse(v, cx)?;
        match c.0.iter().any(|a| a.contains(CONFIG_PLACEHOLDER)) {
            true => Ok(c),
            false => Err(format!(
                "must contain {CONFIG_PLACEHOLDER} where the file to check goes, \
                 e.g. haproxy -c -f {CONFIG_PLACEHOLDER}"
            )),
        }
    }
    fn show(v: &CommandLine) -> String {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signal's target is above 0 or off: 0, a negative number, a word and a zero duration
    /// are refused, each saying how to turn the signal off.
    #[test]
    fn targets_are_above_zero_or_off() {
        for bad in ["0", "-5", "0.0", "inf", "NaN"] {
            let e = Target::parse(bad, &Cx::PLAIN).unwrap_err();
            assert!(e.contains("empty to turn the signal off"), "{bad}: {e}");
        }
        assert!(Target::parse("lots", &Cx::PLAIN)
            .unwrap_err()
            .contains("not a number"));
        assert_eq!(Target::parse("off", &Cx::PLAIN).unwrap(), None);
        assert_eq!(Target::parse("40", &Cx::PLAIN).unwrap(), Some(40.0));
        let e = OptionalDur::parse("0s", &Cx::PLAIN).unwrap_err();
        assert!(e.contains("above 0"), "{e}");
        assert!(OptionalDur::parse("fast", &Cx::PLAIN).is_err());
        assert_eq!(
            OptionalDur::parse("250ms", &Cx::PLAIN).unwrap(),
            Some(Duration::from_millis(250))
        );
    }

    /// Every kind writes back text that parses to the same value.
    #[test]
    fn shown_values_parse_back() {
        fn round<K: Kind>(text: &str)
        where
            K::Value: PartialEq + std::fmt::Debug,
        {
            let v = K::parse(text, &Cx::PLAIN).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(K::parse(&K::show(&v), &Cx::PLAIN).unwrap(), v, "{text:?}");
        }
        round::<Dur>("1h 30m");
        round::<Dur>("250ms");
        round::<Percent>("75%");
        round::<Percent>("12.5");
        round::<Fraction>("0.25");
        round::<Target>("150");
        round::<Target>("2.5");
        round::<Target>("");
        round::<OptionalDur>("250ms");
        round::<OptionalDur>("");
        round::<Words>("sg-1, sg-2,");
        round::<Targets>("local, ops@lb2:2222, ssh://[2001:db8::2]:22");
        round::<Command>("sh -c 'kill -USR2 $(cat /run/h.pid)'");
        round::<CheckCommand>("haproxy -c -f {config}");
        round::<Binds>("*:80; [::]:443 v4v6 ssl crt /etc/haproxy/site.pem alpn h2,http/1.1");
        round::<Flag>("yes");
        round::<OptionalPath>("");
        round::<Whole<u32>>("7");
    }

    #[test]
    fn quotes_around_a_value_go_command_lines_keep_theirs() {
        assert_eq!(unquote("\"web 1\""), "web 1");
        assert_eq!(unquote("'web 1'"), "web 1");
        assert_eq!(
            unquote("\"a\" and \"b\""),
            "\"a\" and \"b\"",
            "not one quoted value"
        );
        assert_eq!(unquote("\""), "\"");
        for v in ["plain", " lead", "trail ", "\"q", "q'", "it's x "] {
            let shown = quote_if_needed(v.to_string());
            assert_eq!(unquote(&shown), v, "{v:?} shown as {shown:?}");
        }
        for p in ["/healthz?full=1&x=%20", "/a/b-c_d.e~f"] {
            assert!(UrlPath::parse(p, &Cx::PLAIN).is_ok(), "{p}");
        }
        for p in ["/a b", "/a#b", "/a\"b", "/a'b", "/a\\b", "/${x}", "/a\tb"] {
            assert!(UrlPath::parse(p, &Cx::PLAIN).is_err(), "{p:?}");
        }
        assert!(FilePath::parse("/tmp/a\u{7}b", &Cx::PLAIN).is_err());
    }

    #[test]
    fn bounds_say_what_is_allowed() {
        assert_eq!(
            check_bound::<Dur>(
                &Duration::from_millis(100),
                Bound::AtLeast("200ms"),
                "; why"
            ),
            Err("100ms is too short; it must be at least 200ms; why".into())
        );
        assert_eq!(
            check_bound::<Dur>(&Duration::ZERO, Bound::Above("0s"), ""),
            Err("must be longer than 0s".into())
        );
        assert!(
            check_bound::<Dur>(&Duration::from_millis(200), Bound::AtLeast("200ms"), "").is_ok()
        );
        assert_eq!(
            check_bound::<Whole<u32>>(&0, Bound::AtLeast("1"), ""),
            Err("must be at least 1".into())
        );
        assert_eq!(
            check_bound::<Percent>(&0.0, Bound::Above("0"), ""),
            Err("must be above 0".into())
        );
    }

    #[test]
    fn binds_take_options_but_nothing_haproxy_would_interpret() {
        let ok = Binds::parse(
            "*:80;  :::8080 v4v6 ;*:443 ssl crt /etc/h/s.pem alpn h2,http/1.1",
            &Cx::PLAIN,
        )
        .unwrap();
        assert_eq!(
            ok,
            [
                "*:80",
                ":::8080 v4v6",
                "*:443 ssl crt /etc/h/s.pem alpn h2,http/1.1"
            ]
        );
        for (bad, why) in [
            ("80", "is not ADDRESS:PORT"),
            ("*:80 ssl#x", "would interpret"),
            ("*:80 crt '/x y'", "would interpret"),
            ("*:80 crt \"x\"", "would interpret"),
            ("*:80 $(id)", "would interpret"),
            ("bad host:80", "is not ADDRESS:PORT"),
            (";", "needs at least one"),
            ("*:0", "is not ADDRESS:PORT"),
        ] {
            let e = Binds::parse(bad, &Cx::PLAIN).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn relative_paths_follow_the_file() {
        let cx = Cx {
            base: Some(Path::new("/srv/as")),
        };
        assert_eq!(
            FilePath::parse("hosts", &cx).unwrap(),
            Path::new("/srv/as/hosts")
        );
        assert_eq!(FilePath::parse("/abs", &cx).unwrap(), Path::new("/abs"));
        assert_eq!(
            FilePath::parse("hosts", &Cx::PLAIN).unwrap(),
            Path::new("hosts")
        );
    }
}
