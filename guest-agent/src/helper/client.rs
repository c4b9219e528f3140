//! The helper's side of the helper socket: one call per connection, every wait bounded.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use finch_shared::codec;
use finch_shared::frame::{read_frame, write_frame};
use finch_shared::message::{HELPER_VERSION, HelperCall, HelperReply, Outcome, Request};

use super::{Agent, AgentError};

/// Where the guest agent listens for helper calls unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/finch-guest-agent/helper.sock";

/// Environment variable that overrides [`DEFAULT_SOCKET`].
pub const SOCKET_ENV: &str = "FINCH_GUEST_AGENT_SOCKET";

/// Longest the helper waits for the agent's answer. The agent bounds its own waits (link
/// wait plus request timeout) well below this.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(45);

/// Longest the helper waits to hand its request to the agent.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The guest agent, reached over its unix socket.
#[derive(Debug)]
pub struct SocketAgent {
    path: PathBuf,
}

impl SocketAgent {
    /// The agent at `$FINCH_GUEST_AGENT_SOCKET`, or at [`DEFAULT_SOCKET`].
    pub fn from_env() -> Self {
        let path = std::env::var_os(SOCKET_ENV)
            .filter(|p| !p.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from);
        SocketAgent { path }
    }
}

impl Agent for SocketAgent {
    fn call(&self, request: Request) -> Result<Outcome, AgentError> {
        let path = self.path.display().to_string();
        let mut stream = UnixStream::connect(&self.path)
            .map_err(|e| AgentError::Unreachable { path: path.clone(), reason: e.to_string() })?;
        let socket =
            |e: std::io::Error| AgentError::Socket { path: path.clone(), reason: e.to_string() };
        stream.set_write_timeout(Some(SEND_TIMEOUT)).map_err(socket)?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(socket)?;
        let payload = codec::encode(&HelperCall { version: HELPER_VERSION, request })
            .map_err(|e| AgentError::Codec(e.to_string()))?;
        // The agent may answer before reading (a refused uid, or busy) and close: its answer
        // is still there to read when our write fails.
        let sent = write_frame(&mut stream, &payload);
        let reply = match (read_frame(&mut stream), sent) {
            (Ok(reply), _) => reply,
            (Err(_), Err(e)) => return Err(AgentError::Send { path, reason: e.to_string() }),
            (Err(e), Ok(())) => return Err(AgentError::NoAnswer { path, reason: describe(&e) }),
        };
        let reply: HelperReply = codec::decode(&reply)
            .map_err(|e| AgentError::Codec(format!("bad answer from the guest agent: {e}")))?;
        Ok(reply.outcome)
    }
}

fn describe(e: &finch_shared::frame::FrameError) -> String {
    use finch_shared::frame::FrameError;
    match e {
        FrameError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            format!("timed out after {}s", REPLY_TIMEOUT.as_secs())
        }
        FrameError::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}
