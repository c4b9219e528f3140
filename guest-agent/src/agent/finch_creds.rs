//! Finch's credential socket, answered by the bridge.
//!
//! Finch 1.18 puts its own `docker-credential-finchhost` in `/usr/bin` at every boot; it asks
//! `GET /credentials?server=S` over HTTP on `/run/user/UID/finch-creds.sock` (`UID` is
//! `SUDO_UID` under sudo), which Lima reverse-forwards to Finch's host `credserver`: no policy,
//! and the caller picks the host's `AWS_PROFILE` and config through `X-Finch-Env-*` headers
//! (runfinch/finch `cmd/finchhost-credential-helper/main.go`, `cmd/credserver/main.go`).
//!
//! With `--finch-creds-socket`, the guest agent listens on that path itself and answers the
//! same protocol from the bridge: the request goes over the link like a helper's `get`, under
//! the host's policy and audit. `X-Finch-Env-*` headers are ignored: a VM does not choose the
//! host's profile. Whichever `docker-credential-finchhost` a client's PATH finds, the answer
//! comes from the bridge.
//!
//! Lima sets up a reverse forward by first running `rm -f` on the guest path, then asking
//! sshd to listen there (lima-vm/lima `pkg/hostagent/hostagent.go` `forwardSSH`). The
//! bridge's sshd drop-in refuses remote forwards (`AllowStreamLocalForwarding local`), and
//! the agent checks the path every [`RECHECK`]: when it is gone or is another socket, the agent
//! removes what is there and listens again. Only a socket is ever removed.
//!
//! Callers are checked as on the helper socket (uid allowed, fair share) and every read is
//! bounded: the request head is at most [`MAX_HEAD`] bytes and must arrive within the I/O
//! timeout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use finch_shared::gojson::push_go_string;
use finch_shared::message::{Request, Response, WireError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use zeroize::Zeroizing;

use super::helper_socket::Shared;
use super::{Access, IO_TIMEOUT, Listening, Shutdown, identity};

/// Most bytes of a request line and headers read.
pub const MAX_HEAD: usize = 8 * 1024;
/// How often the path is checked for a socket that replaced ours.
pub const RECHECK: Duration = Duration::from_secs(1);
/// Most connections served at once on this socket.
const MAX_CONNECTIONS: usize = 64;

/// What a request asked for, or why it is refused (status and text).
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// `GET /credentials?server=S`, with `S` decoded and trimmed (not empty).
    Get(String),
    /// An HTTP status and a reason.
    Refused(u16, &'static str),
}

/// Reads the request head from `bytes` (everything before the blank line).
pub fn parse(head: &[u8]) -> Parsed {
    let Ok(head) = std::str::from_utf8(head) else {
        return Parsed::Refused(400, "the request is not text");
    };
    let line = head.split("\r\n").next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Refused(400, "malformed request line");
    };
    if !version.starts_with("HTTP/1.") {
        return Parsed::Refused(400, "not HTTP/1");
    }
    if method != "GET" {
        return Parsed::Refused(405, "only GET");
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/credentials" {
        return Parsed::Refused(404, "only /credentials");
    }
    let server = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("server="))
        .map(percent_decode)
        .unwrap_or_default();
    let server = server.trim();
    if server.is_empty() {
        return Parsed::Refused(400, "server query parameter is required");
    }
    Parsed::Get(server.to_owned())
}

/// Decodes `%XX` and `+` as Go's `url.QueryUnescape` does; a bad escape is kept as is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One HTTP/1.1 answer, closing the connection.
fn answer(status: u16, body: &[u8]) -> Zeroizing<Vec<u8>> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let kind = if status == 200 { "application/json" } else { "text/plain; charset=utf-8" };
    let mut out = Zeroizing::new(Vec::with_capacity(128 + body.len()));
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// The answer to an outcome of the bridge, as Finch's helper reads it: 200 with
/// `{"ServerURL","Username","Secret"}`, anything else is "not found" to it.
fn answer_outcome(server: &str, outcome: finch_shared::message::Outcome) -> Zeroizing<Vec<u8>> {
    match outcome {
        Ok(Response::Credential { username, secret }) => {
            // As Go's encoder writes it (HTML-safe escapes), into a buffer that is wiped.
            let mut body = Zeroizing::new(Vec::with_capacity(64 + secret.expose().len()));
            body.extend_from_slice(b"{\"ServerURL\":");
            push_go_string(&mut body, server.as_bytes());
            body.extend_from_slice(b",\"Username\":");
            push_go_string(&mut body, username.as_bytes());
            body.extend_from_slice(b",\"Secret\":");
            push_go_string(&mut body, secret.expose().as_bytes());
            body.extend_from_slice(b"}\n");
            answer(200, &body)
        }
        Ok(_) => answer(503, b"unexpected answer from the bridge\n"),
        Err(WireError::NotFound) => answer(404, b"credentials not found\n"),
        Err(WireError::Denied { .. }) => answer(403, b"denied by the host's policy\n"),
        Err(WireError::BadRequest { .. }) => answer(400, b"bad request\n"),
        Err(_) => answer(503, b"the bridge cannot answer now\n"),
    }
}

/// Finch's credential socket, served from the bridge.
#[derive(Debug)]
pub struct FinchCredsSocket {
    path: PathBuf,
}

impl FinchCredsSocket {
    /// The socket at `path` (usually `/run/user/UID/finch-creds.sock`).
    pub fn new(path: PathBuf) -> Self {
        FinchCredsSocket { path }
    }

    /// Serves the socket until shutdown, taking the path back whenever something else
    /// replaces it. Waits while its directory does not exist (the user's runtime directory
    /// comes with the first login).
    pub(crate) async fn run(self, shared: Arc<Shared>, mut shutdown: Shutdown) {
        let mut said_waiting = false;
        loop {
            let listening = match take_over(&self.path) {
                Ok(l) => l,
                Err(e) => {
                    if !said_waiting {
                        tracing::info!(path = %self.path.display(), reason = %format!("{e:#}"), "Finch's credential socket: waiting to listen");
                        said_waiting = true;
                    }
                    tokio::select! {
                        () = shutdown.wait() => return,
                        () = tokio::time::sleep(RECHECK) => continue,
                    }
                }
            };
            said_waiting = false;
            let Some(ours) = identity(&self.path) else { continue };
            tracing::info!(path = %self.path.display(), "Finch's credential socket is answered by the bridge");
            let accept = async || listening.accept().await;
            let admit = |stream| admit(stream, &shared);
            let serving = super::accept_loop(
                "Finch's credential socket",
                MAX_CONNECTIONS,
                accept,
                admit,
                shutdown.clone(),
            );
            tokio::select! {
                () = serving => return,
                () = replaced(&self.path, ours) => {
                    tracing::warn!(path = %self.path.display(), "Finch's credential socket was replaced (a reverse forward?): taking it back");
                }
            }
        }
    }
}

/// Resolves once `path` is no longer the socket `ours`.
async fn replaced(path: &Path, ours: (u64, u64)) {
    loop {
        tokio::time::sleep(RECHECK).await;
        if identity(path) != Some(ours) {
            return;
        }
    }
}

/// Listens on `path`, removing a socket there first (never another kind of file), owned by
/// the directory's owner, mode 0600. The directory must exist.
fn take_over(path: &Path) -> anyhow::Result<Listening> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let dir = path.parent().unwrap_or(Path::new("/"));
    let owner = std::fs::metadata(dir)?.uid();
    if let Ok(m) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(
            m.file_type().is_socket(),
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        );
        std::fs::remove_file(path)?;
    }
    let access = Access { mode: 0o600, owner: Some(owner), group: None };
    Listening::bind(path, "Finch's credential socket", access)
}

/// Checks the caller as the helper socket does; refusals are answered at once.
fn admit(
    stream: UnixStream,
    shared: &Arc<Shared>,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let uid = match shared.caller(&stream) {
        Ok(uid) => uid,
        Err(refusal) => {
            let status = if matches!(refusal, WireError::Denied { .. }) { 403 } else { 503 };
            super::send_now(&stream, &answer(status, b"refused\n"));
            return None;
        }
    };
    let admitted = match shared.admit(uid) {
        Ok(a) => a,
        Err(_) => {
            super::send_now(&stream, &answer(503, b"busy\n"));
            return None;
        }
    };
    let shared = shared.clone();
    Some(async move {
        let _admitted = admitted;
        serve(stream, uid, &shared).await;
    })
}

async fn serve(mut stream: UnixStream, uid: u32, shared: &Shared) {
    let head = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream)).await {
        Ok(Some(head)) => head,
        Ok(None) => {
            shared.refused(uid, "Finch credential request too large or cut short", "");
            let _ = stream.write_all(&answer(400, b"bad request\n")).await;
            return;
        }
        Err(_) => {
            shared.refused(uid, "Finch credential request not sent in time", "");
            return;
        }
    };
    let reply = match parse(&head) {
        Parsed::Refused(status, reason) => {
            shared.refused(uid, "Finch credential request refused", reason);
            answer(status, format!("{reason}\n").as_bytes())
        }
        Parsed::Get(server) => {
            let outcome = shared.slot().request(Request::Get { server: server.clone() }).await;
            if let Err(e) = &outcome {
                shared.failed(uid, "get", e);
            }
            answer_outcome(&server, outcome)
        }
    };
    let _ = tokio::time::timeout(IO_TIMEOUT, stream.write_all(&reply)).await;
}

/// Reads up to the blank line that ends the head; `None` past [`MAX_HEAD`] or at EOF first.
async fn read_head(stream: &mut UnixStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(end);
            return Some(head);
        }
        if head.len() > MAX_HEAD {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_as_finchs_helper_sends_them() {
        let get = |t: &str| {
            parse(
                format!("GET {t} HTTP/1.1\r\nHost: unix\r\nX-Finch-Env-AWS_PROFILE: prod")
                    .as_bytes(),
            )
        };
        assert_eq!(get("/credentials?server=ghcr.io"), Parsed::Get("ghcr.io".into()));
        assert_eq!(
            get("/credentials?server=https://index.docker.io/v1/"),
            Parsed::Get("https://index.docker.io/v1/".into())
        );
        assert_eq!(get("/credentials?server=%20h%3A5000+"), Parsed::Get("h:5000".into()));
        assert_eq!(get("/credentials?x=1&server=a.io"), Parsed::Get("a.io".into()));
        assert_eq!(get("/credentials?server=%zz"), Parsed::Get("%zz".into()));
        assert_eq!(get("/credentials?server=%"), Parsed::Get("%".into()));
        assert!(matches!(get("/credentials?server=+"), Parsed::Refused(400, _)));
        assert!(matches!(get("/credentials"), Parsed::Refused(400, _)));
        assert!(matches!(get("/other?server=a"), Parsed::Refused(404, _)));
        assert!(matches!(parse(b"POST /credentials?server=a HTTP/1.1"), Parsed::Refused(405, _)));
        assert!(matches!(parse(b"GET /credentials?server=a"), Parsed::Refused(400, _)));
        assert!(matches!(parse(b"\xff\xfe"), Parsed::Refused(400, _)));
    }

    #[test]
    fn answers_are_what_finchs_helper_reads() {
        let ok = answer_outcome(
            "ghcr.io",
            Ok(Response::Credential { username: "u".into(), secret: "s".into() }),
        );
        let text = String::from_utf8(ok.to_vec()).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            (v["ServerURL"].as_str(), v["Username"].as_str(), v["Secret"].as_str()),
            (Some("ghcr.io"), Some("u"), Some("s"))
        );
        let nf = answer_outcome("h", Err(WireError::NotFound));
        assert!(nf.starts_with(b"HTTP/1.1 404 "));
        let denied = answer_outcome("h", Err(WireError::Denied { reason: "secret-ish".into() }));
        assert!(denied.starts_with(b"HTTP/1.1 403 "));
        assert!(
            !String::from_utf8_lossy(&denied).contains("secret-ish"),
            "the host's reason stays in the log"
        );
    }
}
