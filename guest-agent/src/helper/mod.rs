//! `docker-credential-finchhost`: the docker credential-helper protocol, byte for byte, in
//! front of the guest agent. Synchronous std I/O only, so it starts in well under a millisecond.
//!
//! Everything the protocol defines goes to stdout (answers and errors alike); the one-line
//! reason behind a not-found answer that is not a plain "no such credential" goes to stderr.

pub mod client;

use std::collections::BTreeMap;
use std::io::{Read, Write};

use finch_shared::gojson::{self, GoJsonError};
use finch_shared::message::{Outcome, Request, Response, WireError};
use finch_shared::{NOT_FOUND_TEXT, Secret};
use zeroize::Zeroizing;

/// The helper's name, as clients invoke it.
pub const NAME: &str = "docker-credential-finchhost";

/// The package name printed by `version`.
pub const PACKAGE: &str = "finch-credential-bridge";

/// Largest stdin accepted (the reference's line limit is 64 KiB; a few lines more are fine).
pub const MAX_STDIN: usize = 1024 * 1024;

/// Go's `bufio.Scanner` line limit: a longer line fails like the reference.
const MAX_LINE: usize = 64 * 1024 - 1;

/// Something that can answer a request: the guest agent over its socket, or a test fake.
pub trait Agent {
    /// Sends one request and waits (bounded) for its outcome. `Err` is a local failure to
    /// reach the agent.
    fn call(&self, request: Request) -> Result<Outcome, AgentError>;
}

/// Why the guest agent gave no answer. Each is one line naming the helper and the socket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// Connecting failed.
    #[error("{NAME}: cannot reach the guest agent at {path}: {reason}")]
    Unreachable {
        /// The socket.
        path: String,
        /// Why.
        reason: String,
    },
    /// Setting up the connection failed.
    #[error("{NAME}: guest agent socket {path}: {reason}")]
    Socket {
        /// The socket.
        path: String,
        /// Why.
        reason: String,
    },
    /// The request could not be sent, and no answer came.
    #[error("{NAME}: cannot send to the guest agent at {path}: {reason}")]
    Send {
        /// The socket.
        path: String,
        /// Why.
        reason: String,
    },
    /// The request went out, and no answer came.
    #[error("{NAME}: no answer from the guest agent at {path}: {reason}")]
    NoAnswer {
        /// The socket.
        path: String,
        /// Why (a timeout names its limit).
        reason: String,
    },
    /// The request or the answer did not encode or decode.
    #[error("{NAME}: {0}")]
    Codec(String),
}

/// Why the helper refuses its input, before asking anyone. Each displays as the line the
/// reference helpers print (Go's texts where they come from Go).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Reading stdin failed.
    #[error("{NAME}: cannot read stdin: {0}")]
    Stdin(std::io::Error),
    /// More than [`MAX_STDIN`] bytes.
    #[error("{NAME}: input larger than {MAX_STDIN} bytes")]
    TooLarge,
    /// A line longer than Go's scanner takes.
    #[error("bufio.Scanner: token too long")]
    LineTooLong,
    /// No server, or `ServerURL` empty.
    #[error("no credentials server URL")]
    NoServerUrl,
    /// `Username` empty.
    #[error("no credentials username")]
    NoUsername,
    /// The `store` payload is not the JSON Go would decode.
    #[error(transparent)]
    Json(#[from] GoJsonError),
}

/// A finished run: what to print and the exit code.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Run {
    /// Bytes for stdout.
    pub stdout: Vec<u8>,
    /// One line for stderr, if any.
    pub stderr: Option<String>,
    /// Exit status.
    pub code: u8,
}

impl Run {
    fn ok(stdout: Vec<u8>) -> Self {
        Run { stdout, stderr: None, code: 0 }
    }

    fn fail(message: &str) -> Self {
        let mut stdout = message.as_bytes().to_vec();
        stdout.push(b'\n');
        Run { stdout, stderr: None, code: 1 }
    }

    fn not_found(reason: Option<String>) -> Self {
        Run { stderr: reason, ..Run::fail(NOT_FOUND_TEXT) }
    }
}

fn usage() -> String {
    format!("Usage: {NAME} <store|get|erase|list|version>")
}

/// Runs the helper for `args` (without the program name).
pub fn run(args: &[std::ffi::OsString], stdin: &mut dyn Read, agent: &dyn Agent) -> Run {
    let [action] = args else {
        return Run { code: 1, ..Run::ok(format!("{}\n", usage()).into_bytes()) };
    };
    let action = action.to_string_lossy();
    match action.as_ref() {
        "--version" | "-v" | "version" => Run::ok(version_line().into_bytes()),
        "--help" | "-h" => Run::ok(format!("{}\n", usage()).into_bytes()),
        "get" => match read_server(stdin) {
            Ok(server) => get(server, agent),
            Err(e) => Run::fail(&e.to_string()),
        },
        "erase" => match read_server(stdin) {
            Ok(server) => expect_done(agent.call(Request::Erase { server })),
            Err(e) => Run::fail(&e.to_string()),
        },
        "store" => match read_store(stdin) {
            Ok(request) => expect_done(agent.call(request)),
            Err(e) => Run::fail(&e.to_string()),
        },
        "list" => list(agent),
        other => Run::fail(&format!("{NAME}: unknown action: {other}")),
    }
}

fn version_line() -> String {
    format!("{NAME} ({PACKAGE}) {}\n", env!("CARGO_PKG_VERSION"))
}

/// Reads stdin like the reference: all lines joined with no separator (a `\r` before each
/// `\n` dropped), bounded.
fn read_joined(stdin: &mut dyn Read) -> Result<Vec<u8>, InputError> {
    let mut raw = Vec::new();
    stdin.take(MAX_STDIN as u64 + 1).read_to_end(&mut raw).map_err(InputError::Stdin)?;
    if raw.len() > MAX_STDIN {
        return Err(InputError::TooLarge);
    }
    let mut joined = Vec::with_capacity(raw.len());
    let mut lines = raw.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        if lines.peek().is_none() && line.is_empty() {
            break;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > MAX_LINE {
            return Err(InputError::LineTooLong);
        }
        joined.extend_from_slice(line);
    }
    Ok(joined)
}

/// The server string for `get` and `erase`: joined lines, trimmed; empty is an error.
fn read_server(stdin: &mut dyn Read) -> Result<String, InputError> {
    let joined = read_joined(stdin)?;
    let server = String::from_utf8_lossy(&joined).trim().to_owned();
    if server.is_empty() {
        return Err(InputError::NoServerUrl);
    }
    Ok(server)
}

fn read_store(stdin: &mut dyn Read) -> Result<Request, InputError> {
    // Stdin of `store` holds the secret: wipe the buffer when done.
    let joined = Zeroizing::new(read_joined(stdin)?);
    let creds = gojson::decode_credentials(&joined)?;
    if creds.server_url.is_empty() {
        return Err(InputError::NoServerUrl);
    }
    if creds.username.is_empty() {
        return Err(InputError::NoUsername);
    }
    Ok(Request::Store {
        server: creds.server_url,
        username: creds.username,
        secret: Secret::new(creds.secret),
    })
}

fn get(server: String, agent: &dyn Agent) -> Run {
    match agent.call(Request::Get { server: server.clone() }) {
        Ok(Ok(Response::Credential { username, secret })) => {
            let mut out = Vec::with_capacity(64 + server.len() + secret.expose().len());
            out.extend_from_slice(b"{\"ServerURL\":");
            gojson::push_go_string(&mut out, server.as_bytes());
            out.extend_from_slice(b",\"Username\":");
            gojson::push_go_string(&mut out, username.as_bytes());
            out.extend_from_slice(b",\"Secret\":");
            gojson::push_go_string(&mut out, secret.expose().as_bytes());
            out.extend_from_slice(b"}\n");
            Run::ok(out)
        }
        Ok(Ok(other)) => Run::not_found(Some(unexpected(&other))),
        Ok(Err(WireError::NotFound)) => Run::not_found(None),
        Ok(Err(e)) => Run::not_found(Some(format!("{NAME}: {e}"))),
        Err(e) => Run::not_found(Some(e.to_string())),
    }
}

fn expect_done(answer: Result<Outcome, AgentError>) -> Run {
    match answer {
        Ok(Ok(Response::Done)) => Run::ok(Vec::new()),
        Ok(Ok(other)) => Run::fail(&unexpected(&other)),
        Ok(Err(e)) => Run::fail(&format!("{NAME}: {e}")),
        Err(e) => Run::fail(&e.to_string()),
    }
}

fn list(agent: &dyn Agent) -> Run {
    let (entries, omitted) = match agent.call(Request::List) {
        Ok(Ok(Response::List { entries })) => (entries, 0),
        Ok(Ok(Response::ListCut { entries, omitted })) => (entries, omitted),
        Ok(Ok(other)) => return Run::fail(&unexpected(&other)),
        Ok(Err(e)) => return Run::fail(&format!("{NAME}: {e}")),
        Err(e) => return Run::fail(&e.to_string()),
    };
    let map: BTreeMap<String, String> =
        entries.into_iter().map(|e| (e.server, e.username)).collect();
    let mut out = Vec::new();
    out.push(b'{');
    for (i, (server, username)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        gojson::push_go_string(&mut out, server.as_bytes());
        out.push(b':');
        gojson::push_go_string(&mut out, username.as_bytes());
    }
    out.extend_from_slice(b"}\n");
    let mut run = Run::ok(out);
    if omitted > 0 {
        run.stderr = Some(format!(
            "{NAME}: the list was cut to fit one answer: {omitted} more entries on the host are not shown"
        ));
    }
    run
}

fn unexpected(answer: &Response) -> String {
    let kind = match answer {
        Response::Credential { .. } => "a credential",
        Response::Done => "an acknowledgement",
        Response::List { .. } | Response::ListCut { .. } => "a list",
    };
    format!("{NAME}: the guest agent answered with {kind}, which does not fit the request")
}

/// Writes a finished run to the real stdout/stderr and returns the exit status.
pub fn emit(run: &Run) -> std::process::ExitCode {
    let mut stdout = std::io::stdout().lock();
    // If stdout is gone there is no one left to tell.
    let _ = stdout.write_all(&run.stdout).and_then(|()| stdout.flush());
    if let Some(reason) = &run.stderr {
        let _ = writeln!(std::io::stderr().lock(), "{reason}");
    }
    std::process::ExitCode::from(run.code)
}

#[cfg(test)]
mod tests;
