//! Output (aligned tables for people, JSON for scripts) and the one place
//! errors become exit codes.

use std::{
    fmt::Write as _,
    io::Write,
    time::{Duration, SystemTime},
};

use chaos_proto::convert::{duration_from_pb, human_duration, timestamp_from_pb};
use tonic::Code;

/// Exit codes scripts can rely on (also listed in `chaos --help`).
pub mod exit {
    pub const OK: u8 = 0;
    /// Anything not below.
    pub const FAILURE: u8 = 1;
    /// Bad flags or a spec refused as INVALID_ARGUMENT.
    pub const USAGE: u8 = 2;
    /// Refused by a safety rule: disarmed, lease lost, protected target, id in use.
    pub const REFUSED: u8 = 3;
    /// The fault, agent or target does not exist.
    pub const NOT_FOUND: u8 = 4;
    /// The server could not be reached or did not answer in time.
    pub const UNREACHABLE: u8 = 5;
    /// The server does not implement this (fault family, RPC) yet.
    pub const UNIMPLEMENTED: u8 = 6;
    /// Emergency stop did not reach every agent (they revert by their lease).
    pub const PARTIAL: u8 = 7;
    /// `chaos run`: the steady-state hypothesis did not hold.
    pub const DEVIATED: u8 = 8;
    /// `chaos run`: a stop condition, a safety rule or Ctrl-C ended the method (faults reverted).
    pub const ABORTED: u8 = 9;
}

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  failure not listed below
  2  usage error, or the spec was refused as invalid (the message names the field)
  3  refused by a safety rule: fleet/agent disarmed, dead-man lease lost, protected target, id in use,
     blast radius, severity cap, queue full; `scenario watch`: the scenario was aborted;
     or refused by trust: no/unknown certificate (UNAUTHENTICATED), role too low (PERMISSION_DENIED)
  4  not found: fault, agent or target process
  5  server unreachable or no answer in time
  6  not implemented by the server yet (e.g. a fault family)
  7  emergency stop not confirmed everywhere: an agent not reached, a duplicate agent process, or a revert that failed
  8  `chaos run`: the steady-state hypothesis did not hold (before the method, or after it within recovery_timeout)
  9  `chaos run`: a stop condition, a safety rule or Ctrl-C ended the method early (its faults were reverted)";

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// A failed command: a message and an exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub grpc: Option<Code>,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self { code, grpc: None, message: message.into() }
    }
}

/// The causes under an error, "a: b: c".
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.contains(&t) {
            out.push(t);
        }
        cur = c.source();
    }
    out.join(": ")
}

/// Map a gRPC failure, naming the server it came from.
pub fn from_status(server: &str, s: tonic::Status) -> CliError {
    // A connection that never came up (TCP refused, TLS handshake refused,
    // the server's certificate not the one expected) reaches us as an
    // UNKNOWN "transport error" through a custom connector: it is unreachability.
    if s.code() == Code::Unknown && s.message() == "transport error" {
        let why = causes(&s);
        let why = if why.is_empty() { s.message().to_string() } else { why };
        return CliError { code: exit::UNREACHABLE, grpc: Some(Code::Unavailable), message: format!("cannot reach {server}: {why}") };
    }
    let code = match s.code() {
        Code::InvalidArgument | Code::OutOfRange => exit::USAGE,
        Code::FailedPrecondition | Code::PermissionDenied | Code::Unauthenticated | Code::AlreadyExists | Code::ResourceExhausted => {
            exit::REFUSED
        }
        Code::NotFound => exit::NOT_FOUND,
        Code::Unavailable | Code::DeadlineExceeded => exit::UNREACHABLE,
        Code::Unimplemented => exit::UNIMPLEMENTED,
        _ => exit::FAILURE,
    };
    let msg = if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) {
        format!("cannot reach {server}: {}", s.message())
    } else {
        s.message().to_string()
    };
    CliError { code, grpc: Some(s.code()), message: msg }
}

/// Print an error the way the format wants it, on stderr.
pub fn print_error(format: Format, e: &CliError) {
    let mut err = std::io::stderr().lock();
    let _ = match format {
        Format::Json => writeln!(
            err,
            "{}",
            serde_json::json!({"error": {"exit_code": e.code, "grpc_code": e.grpc.map(|c| format!("{c:?}")), "message": e.message}})
        ),
        Format::Table => writeln!(err, "error: {}", e.message),
    };
}

/// Print a line of output (stdout).
pub fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
}

pub fn emit_json(v: &serde_json::Value) {
    emit(&serde_json::to_string_pretty(v).unwrap_or_default());
}

/// `KEY=VALUE` flags (`--label`, `--selector`) as a map; the error names the flag.
pub fn key_values(flag: &str, pairs: &[String]) -> Result<std::collections::HashMap<String, String>, CliError> {
    pairs
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| CliError::new(exit::USAGE, format!("{flag}: expected KEY=VALUE, got {l:?}")))
        })
        .collect()
}

/// Labels as `k=v,k=v`, sorted.
pub fn labels_text(m: &std::collections::HashMap<String, String>) -> String {
    let mut v: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    v.join(",")
}

/// An aligned text table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut s = String::new();
    let line = |s: &mut String, cells: Vec<&str>| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                let _ = write!(s, "{c}");
            } else {
                let _ = write!(s, "{c:<w$}  ", w = widths[i]);
            }
        }
        s.push('\n');
    };
    line(&mut s, headers.to_vec());
    for r in rows {
        line(&mut s, r.iter().map(String::as_str).collect());
    }
    s.trim_end().to_string()
}

pub fn rfc3339(t: Option<&prost_types::Timestamp>) -> Option<String> {
    t.map(|t| humantime::format_rfc3339_millis(timestamp_from_pb(t)).to_string())
}

pub fn dur(d: Option<&prost_types::Duration>) -> String {
    d.and_then(duration_from_pb).map(human_duration).unwrap_or_else(|| "-".into())
}

pub fn dur_secs(d: Option<&prost_types::Duration>) -> Option<f64> {
    d.and_then(duration_from_pb).map(|d| d.as_secs_f64())
}

/// "in 12.0s" / "3.0s ago" relative to now.
pub fn relative(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else { return "-".into() };
    let t = timestamp_from_pb(t);
    match t.duration_since(SystemTime::now()) {
        Ok(d) => format!("in {}", human_duration(d)),
        Err(e) => format!("{} ago", human_duration(e.duration().max(Duration::ZERO))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(&["ID", "STATE"], &[vec!["a-long-id".into(), "APPLIED".into()], vec!["b".into(), "REVERTED".into()]]);
        assert_eq!(t, "ID         STATE\na-long-id  APPLIED\nb          REVERTED");
    }

    #[test]
    fn grpc_codes_map_to_documented_exit_codes() {
        assert_eq!(from_status("x", tonic::Status::failed_precondition("disarmed")).code, exit::REFUSED);
        assert_eq!(from_status("x", tonic::Status::invalid_argument("bad")).code, exit::USAGE);
        assert_eq!(from_status("x", tonic::Status::not_found("gone")).code, exit::NOT_FOUND);
        assert_eq!(from_status("x", tonic::Status::unimplemented("later")).code, exit::UNIMPLEMENTED);
        let e = from_status("agent http://h:1", tonic::Status::unavailable("refused"));
        assert_eq!(e.code, exit::UNREACHABLE);
        assert!(e.message.contains("http://h:1"));
    }
}
