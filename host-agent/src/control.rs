//! The control socket, `STATE/control.sock`: mode 0600 inside the 0700 state directory,
//! answering only its own user (or root). One JSON line in (`{"command":"status"}` or
//! `{"command":"reload"}`), one JSON line out. `STATE/agent.lock` (flock) keeps a second agent
//! off the same state directory.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::agent::Agent;
use crate::status::AgentStatus;

/// File name of the control socket in the state directory.
pub const SOCKET_FILE: &str = "control.sock";
/// File name of the lock in the state directory.
pub const LOCK_FILE: &str = "agent.lock";
/// Longest request line.
const MAX_LINE: u64 = 4096;
/// Time a client gets to send its request, and a command-line client waits for an answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The control socket of the agent using `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_FILE)
}

/// A request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlRequest {
    /// `status` or `reload`.
    pub command: String,
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

/// Takes the state directory's lock, or says which agent holds it.
pub fn lock(state_dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!(
            "another finch-host-agent is running with the state directory {} (see `finch-host-agent status`)",
            state_dir.display()
        )
    })
}

/// Binds the control socket (the caller holds the lock, so any old socket file is stale).
pub fn bind(state_dir: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(state_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove stale {}", path.display())),
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    Ok(listener)
}

/// Serves the control socket until shutdown; removes it at the end.
pub async fn serve(listener: UnixListener, agent: Arc<Agent>, mut shutdown: watch::Receiver<bool>) {
    let own = nix::unistd::getuid().as_raw();
    loop {
        let stream = tokio::select! {
            () = crate::link::stopped(&mut shutdown) => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        match stream.peer_cred() {
            Ok(c) if c.uid() == own || c.uid() == 0 => {}
            Ok(c) => {
                tracing::warn!(uid = c.uid(), "control connection from another user refused");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "control connection without credentials refused");
                continue;
            }
        }
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &agent).await {
                tracing::debug!(error = %e, "control connection ended early");
            }
        });
    }
    if let Ok(addr) = listener.local_addr()
        && let Some(path) = addr.as_pathname()
    {
        let _ = std::fs::remove_file(path);
    }
}

async fn answer(stream: UnixStream, agent: &Agent) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        IO_TIMEOUT,
        tokio::io::BufReader::new(rd.take(MAX_LINE)).read_line(&mut line),
    )
    .await
    .context("no request in time")??;
    let reply = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(r) if r.command == "status" => {
            ControlReply { ok: true, status: Some(agent.status()), ..ControlReply::default() }
        }
        Ok(r) if r.command == "reload" => match agent.reload("control socket").await {
            Ok(applied) => ControlReply {
                ok: true,
                message: Some(format!("config reloaded: {applied}")),
                ..ControlReply::default()
            },
            Err(e) => ControlReply {
                ok: false,
                message: Some(format!(
                    "config not reloaded (the previous config stays in force): {e}"
                )),
                ..ControlReply::default()
            },
        },
        Ok(r) => ControlReply {
            ok: false,
            message: Some(format!("unknown command {:?}", r.command)),
            ..ControlReply::default()
        },
        Err(_) => ControlReply {
            ok: false,
            message: Some("malformed request".into()),
            ..ControlReply::default()
        },
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    wr.write_all(&out).await?;
    Ok(())
}

/// Sends `command` to the agent using `state_dir` (blocking; for the command line).
pub fn call(state_dir: &Path, command: &str) -> anyhow::Result<ControlReply> {
    let path = socket_path(state_dir);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!("no finch-host-agent is answering on {} (is it running?)", path.display())
    })?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut request = serde_json::to_vec(&ControlRequest { command: command.to_owned() })?;
    request.push(b'\n');
    stream.write_all(&request)?;
    let mut line = String::new();
    std::io::BufReader::new(std::io::Read::take(stream, 16 * 1024 * 1024))
        .read_line(&mut line)
        .context("reading the agent's answer")?;
    serde_json::from_str(&line).context("the agent's answer is not valid")
}
