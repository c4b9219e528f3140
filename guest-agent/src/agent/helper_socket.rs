//! The helper socket: one call per connection, from allowed uids only.

use std::path::Path;
use std::sync::Arc;

use finch_shared::frame::async_io::{read_msg, write_msg};
use finch_shared::message::{HELPER_VERSION, HelperCall, HelperReply, WireError};
use tokio::net::UnixStream;

use super::link::LinkSlot;
use super::{Access, IO_TIMEOUT, Listening, Shutdown};

/// Mode of the helper socket: owner and group may connect, nobody else.
pub const HELPER_SOCKET_MODE: u32 = 0o660;

/// The bound helper socket.
#[derive(Debug)]
pub struct HelperSocket(Listening);

impl HelperSocket {
    /// Binds `path` (mode 0660, group `group` when given).
    pub fn bind(path: &Path, group: Option<u32>) -> anyhow::Result<Self> {
        let access = Access { mode: HELPER_SOCKET_MODE, owner: None, group };
        Listening::bind(path, "helper socket", access).map(HelperSocket)
    }

    /// Answers helper calls until shutdown; only `allowed` uids are served.
    pub async fn run(self, slot: LinkSlot, allowed: Arc<[u32]>, shutdown: Shutdown) {
        self.0.serve(shutdown, |stream| serve_call(stream, slot.clone(), allowed.clone())).await;
    }
}

async fn serve_call(mut stream: UnixStream, slot: LinkSlot, allowed: Arc<[u32]>) {
    let uid = match stream.peer_cred() {
        Ok(cred) => cred.uid(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the helper's credentials; closing");
            return;
        }
    };
    let call = match tokio::time::timeout(IO_TIMEOUT, read_msg::<HelperCall, _>(&mut stream)).await
    {
        Ok(Ok(call)) => call,
        Ok(Err(e)) => {
            tracing::warn!(uid, error = %e, "bad helper call");
            let reason = format!("malformed call: {e}");
            reply(&mut stream, Err(WireError::BadRequest { reason })).await;
            return;
        }
        Err(_) => {
            tracing::warn!(uid, "helper sent no call in time");
            return;
        }
    };
    let op = call.request.op();
    let outcome = if !allowed.contains(&uid) {
        tracing::warn!(uid, op, "helper call from a uid that is not allowed");
        Err(WireError::Denied {
            reason: format!("uid {uid} may not use the finch credential helper"),
        })
    } else if call.version != HELPER_VERSION {
        Err(WireError::BadRequest {
            reason: format!(
                "helper protocol version {} is not supported (agent speaks {HELPER_VERSION})",
                call.version
            ),
        })
    } else {
        slot.request(call.request).await
    };
    match &outcome {
        Ok(_) => tracing::debug!(uid, op, "helper call answered"),
        Err(e) => tracing::info!(uid, op, result = e.class(), "helper call failed"),
    }
    reply(&mut stream, outcome).await;
}

async fn reply(stream: &mut UnixStream, outcome: finch_shared::message::Outcome) {
    let sent = tokio::time::timeout(IO_TIMEOUT, write_msg(stream, &HelperReply { outcome })).await;
    if !matches!(sent, Ok(Ok(()))) {
        tracing::debug!("the helper went away before its answer");
    }
}
