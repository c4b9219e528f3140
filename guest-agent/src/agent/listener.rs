//! Accepts the host's link and runs the guest side of the handshake.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use finch_shared::endpoint::Endpoint;
use finch_shared::frame::async_io::{read_msg, write_msg};
use finch_shared::handshake::GuestHandshake;
use finch_shared::key::LinkKey;
use finch_shared::message::Handshake;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

use super::link::LinkSlot;
use super::{Access, IO_TIMEOUT, Listening, Shutdown};

/// Mode of a unix link socket: only its owner may connect.
pub const LINK_SOCKET_MODE: u32 = 0o600;

/// Where the boot id comes from.
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// What an accepted link needs.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// The VM's key.
    pub key: LinkKey,
    /// Uids allowed to connect on a unix link socket.
    pub allowed_uids: Arc<[u32]>,
    /// Heartbeat interval.
    pub heartbeat: Duration,
}

/// A bound link listener: a unix socket (checked by peer uid) or, on Linux, a vsock port
/// (checked by peer CID: only the host, CID 2).
#[derive(Debug)]
pub(crate) enum LinkListener {
    /// A unix socket, mode 0600.
    Unix(Listening),
    /// A vsock port.
    #[cfg(target_os = "linux")]
    Vsock(tokio_vsock::VsockListener),
}

impl LinkListener {
    /// Binds the endpoint. A unix socket gets mode 0600 and, when a forwarder uid other than
    /// root is allowed, that uid as its owner.
    pub fn bind(endpoint: &Endpoint, extra_uids: &[u32]) -> anyhow::Result<Self> {
        match endpoint {
            Endpoint::Unix(path) => {
                let owner = extra_uids.iter().copied().find(|&u| u != 0);
                let access = Access { mode: LINK_SOCKET_MODE, owner, group: None };
                Listening::bind(path, "link socket", access).map(LinkListener::Unix)
            }
            #[cfg(target_os = "linux")]
            Endpoint::Vsock { cid, port } => {
                tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(*cid, *port))
                    .with_context(|| format!("cannot listen on {endpoint}"))
                    .map(LinkListener::Vsock)
            }
            other => anyhow::bail!(
                "the guest agent listens on unix:///path or vsock://-1:PORT, not {other}"
            ),
        }
    }

    /// Accepts links until shutdown; each authenticated one becomes the active link.
    pub async fn run(self, slot: LinkSlot, settings: LinkSettings, shutdown: Shutdown) {
        let links_shutdown = shutdown.clone();
        match self {
            LinkListener::Unix(listening) => {
                listening
                    .serve(shutdown, |stream| {
                        accept_unix(stream, slot.clone(), settings.clone(), links_shutdown.clone())
                    })
                    .await;
            }
            #[cfg(target_os = "linux")]
            LinkListener::Vsock(listener) => serve_vsock(listener, slot, settings, shutdown).await,
        }
    }
}

#[cfg(target_os = "linux")]
async fn serve_vsock(
    listener: tokio_vsock::VsockListener,
    slot: LinkSlot,
    settings: LinkSettings,
    mut shutdown: Shutdown,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) if peer.cid() == finch_shared::endpoint::CID_HOST => {
                    tasks.spawn(authenticate(stream, slot.clone(), settings.clone(), shutdown.clone()));
                }
                Ok((_, peer)) => tracing::warn!(
                    cid = peer.cid(),
                    port = peer.port(),
                    "vsock link connection not from the host (CID 2); dropped"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "vsock accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

async fn accept_unix(
    stream: UnixStream,
    slot: LinkSlot,
    settings: LinkSettings,
    shutdown: Shutdown,
) {
    match stream.peer_cred() {
        Ok(cred) if settings.allowed_uids.contains(&cred.uid()) => {}
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid(),
                "link connection from a uid that is not allowed; dropped"
            );
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the link peer's credentials; dropped");
            return;
        }
    }
    authenticate(stream, slot, settings, shutdown).await;
}

/// Runs the handshake on an accepted connection; an authenticated host becomes the link.
async fn authenticate<S>(mut stream: S, slot: LinkSlot, settings: LinkSettings, shutdown: Shutdown)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match tokio::time::timeout(IO_TIMEOUT, handshake(&mut stream, settings.key)).await {
        Ok(Ok(established)) => {
            tracing::info!(vm = %established.vm, version = established.version, "host authenticated");
            slot.run(stream, settings.heartbeat, shutdown).await;
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "link handshake failed; connection closed"),
        Err(_) => tracing::warn!("link handshake timed out; connection closed"),
    }
}

async fn handshake<S>(
    stream: &mut S,
    key: LinkKey,
) -> anyhow::Result<finch_shared::handshake::Established>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let hello: Handshake = read_msg(stream).await.context("reading the host's hello")?;
    let boot_id = std::fs::read_to_string(BOOT_ID_PATH).unwrap_or_default();
    let (guest, answer) = match GuestHandshake::answer(key, boot_id.trim(), hello) {
        Ok(ok) => ok,
        Err(e) => {
            if let Some(reject) = e.reject() {
                let _ = write_msg(stream, &reject).await;
            }
            return Err(e.into());
        }
    };
    write_msg(stream, &answer).await.context("sending our hello")?;
    let proof: Handshake = read_msg(stream).await.context("reading the host's proof")?;
    match guest.finish(proof) {
        Ok(established) => Ok(established),
        Err(e) => {
            if let Some(reject) = e.reject() {
                let _ = write_msg(stream, &reject).await;
            }
            Err(e.into())
        }
    }
}
