//! The control channel: `STATE/control.sock` on unix (mode 0600 inside the 0700 state
//! directory, own uid or root only), a named pipe only this user may open on Windows (see
//! [`crate::platform`]). One JSON line in (`{"command":"status"}` or `{"command":"reload"}`),
//! one JSON line out. `STATE/agent.lock` (an OS file lock) keeps a second agent off the same
//! state directory.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use finch_shared::accept::accept_loop;
use finch_shared::link::Shutdown;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::agent::Agent;
use crate::platform::{ControlListener, control_address, control_connect};
use crate::status::AgentStatus;

/// File name of the lock in the state directory.
pub const LOCK_FILE: &str = "agent.lock";
/// Longest request line.
const MAX_LINE: u64 = 4096;
/// Time a client gets to send its request, and a command-line client waits for an answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Time answers under way get to finish when the agent stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Most control connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 8;

/// A request: `{"command":"status"}` or `{"command":"reload"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum ControlRequest {
    /// The agent's status.
    Status,
    /// Re-read the config.
    Reload,
}

/// An answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ControlReply {
    /// Whether the command succeeded.
    pub ok: bool,
    /// What happened, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The status, for `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AgentStatus>,
}

/// The state directory's lock, held while the agent runs (released when dropped, or by the
/// OS when the process dies).
#[derive(Debug)]
pub struct AgentLock {
    _file: std::fs::File,
}

/// Takes the state directory's lock, or says which agent holds it.
pub fn lock(state_dir: &Path) -> anyhow::Result<AgentLock> {
    let path = state_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(AgentLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow::anyhow!(
            "another finch-host-agent is running with the state directory {} (see `finch-host-agent status`)",
            state_dir.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Binds the control channel (the caller holds the lock, so an old socket file is stale).
pub fn bind(state_dir: &Path) -> anyhow::Result<ControlListener> {
    ControlListener::bind(state_dir)
}

/// Serves the control channel until shutdown, at most [`MAX_CONNECTIONS`] at a time
/// (finch-shared's accept loop); answers under way get [`SHUTDOWN_GRACE`] to finish, then
/// the channel is removed.
pub async fn serve(mut listener: ControlListener, agent: Arc<Agent>, shutdown: Shutdown) {
    let accept = async || listener.accept().await;
    let admit = |accepted: Result<_, crate::platform::Refused>| match accepted {
        Ok(stream) => {
            let agent = agent.clone();
            Some(async move {
                if let Err(e) = answer(stream, &agent).await {
                    tracing::debug!(error = %e, "control connection ended early");
                }
            })
        }
        Err(refused) => {
            tracing::warn!(peer = %refused.0, "control connection from another user refused");
            None
        }
    };
    let failed = |e: &std::io::Error| tracing::warn!(error = %e, "control channel accept failed");
    accept_loop(MAX_CONNECTIONS, accept, admit, failed, SHUTDOWN_GRACE, shutdown).await;
    listener.remove();
}

async fn answer<S>(stream: S, agent: &Agent) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let (rd, mut wr) = tokio::io::split(stream);
    let mut line = String::new();
    tokio::time::timeout(
        IO_TIMEOUT,
        tokio::io::BufReader::new(rd.take(MAX_LINE)).read_line(&mut line),
    )
    .await
    .context("no request in time")??;
    let reply = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(ControlRequest::Status) => {
            ControlReply { ok: true, status: Some(agent.status()), ..ControlReply::default() }
        }
        Ok(ControlRequest::Reload) => match agent.reload("control socket").await {
            Ok(applied) => ControlReply {
                ok: true,
                message: Some(format!("config reloaded: {applied}")),
                ..ControlReply::default()
            },
            Err(e) => ControlReply {
                ok: false,
                message: Some(format!(
                    "config not reloaded (the previous config stays in force): {e:#}"
                )),
                ..ControlReply::default()
            },
        },
        Err(_) => {
            ControlReply { ok: false, message: Some(refusal(&line)), ..ControlReply::default() }
        }
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    wr.write_all(&out).await?;
    Ok(())
}

/// Why a request line is refused: an unknown command is named (capped), anything else is
/// malformed.
fn refusal(line: &str) -> String {
    #[derive(Deserialize)]
    struct Named {
        command: String,
    }
    match serde_json::from_str::<Named>(line) {
        Ok(n) => format!("unknown command {:?}", finch_shared::limit::cap(&n.command, 64)),
        Err(_) => "malformed request".into(),
    }
}

/// Sends `command` to the agent using `state_dir` (blocking; for the command line). The
/// exchange runs on a thread of its own so that an agent that never answers costs at most
/// [`IO_TIMEOUT`] on every OS.
pub fn call(state_dir: &Path, command: ControlRequest) -> anyhow::Result<ControlReply> {
    let address = control_address(state_dir);
    let mut stream = control_connect(state_dir).with_context(|| {
        format!("no finch-host-agent is answering on {address} (is it running?)")
    })?;
    let mut request = serde_json::to_vec(&command)?;
    request.push(b'\n');
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let exchange = || -> std::io::Result<String> {
            stream.write_all(&request)?;
            let mut line = String::new();
            std::io::BufReader::new(std::io::Read::take(stream, 16 * 1024 * 1024))
                .read_line(&mut line)?;
            Ok(line)
        };
        let _ = tx.send(exchange());
    });
    let line = rx
        .recv_timeout(IO_TIMEOUT)
        .map_err(|_| {
            anyhow::anyhow!("the agent on {address} did not answer within {IO_TIMEOUT:?}")
        })?
        .context("reading the agent's answer")?;
    serde_json::from_str(&line).context("the agent's answer is not valid")
}
