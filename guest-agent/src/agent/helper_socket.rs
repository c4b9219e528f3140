//! The helper socket: one call per connection, from allowed uids only.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;
use finch_shared::frame::async_io::{read_msg, write_msg};
use finch_shared::message::{HELPER_VERSION, HelperCall, HelperReply, WireError};
use tokio::net::{UnixListener, UnixStream};

use super::link::LinkSlot;
use super::{IO_TIMEOUT, Shutdown, SocketFile, prepare_socket_path};

/// Mode of the helper socket: owner and group may connect, nobody else.
pub const HELPER_SOCKET_MODE: u32 = 0o660;

/// The bound helper socket.
#[derive(Debug)]
pub struct HelperSocket {
    listener: UnixListener,
    _file: SocketFile,
}

impl HelperSocket {
    /// Binds `path` (mode 0660, group `group` when given).
    pub fn bind(path: &Path, group: Option<u32>) -> anyhow::Result<Self> {
        prepare_socket_path(path)?;
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot listen on helper socket {}", path.display()))?;
        let file = SocketFile(path.to_owned());
        if let Some(gid) = group {
            std::os::unix::fs::chown(path, None, Some(gid))
                .with_context(|| format!("cannot give {} to group {gid}", path.display()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(HELPER_SOCKET_MODE))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        Ok(HelperSocket { listener, _file: file })
    }

    /// Accepts helper calls until shutdown.
    pub async fn run(
        self,
        slot: LinkSlot,
        allowed: Vec<u32>,
        mut shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let mut calls = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                () = shutdown.wait() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        calls.spawn(serve_call(stream, slot.clone(), allowed.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "helper socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                Some(_) = calls.join_next(), if !calls.is_empty() => {}
            }
        }
        calls.shutdown().await;
        Ok(())
    }
}

async fn serve_call(mut stream: UnixStream, slot: LinkSlot, allowed: Vec<u32>) {
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
