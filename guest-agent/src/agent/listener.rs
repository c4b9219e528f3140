//! Accepts the host's link and runs the guest side of the handshake.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::Context;
use finch_shared::endpoint::Endpoint;
use finch_shared::frame::async_io::{read_msg, write_msg};
use finch_shared::handshake::GuestHandshake;
use finch_shared::key::LinkKey;
use finch_shared::message::Handshake;
use tokio::net::{UnixListener, UnixStream};

use super::link::LinkSlot;
use super::{IO_TIMEOUT, Shutdown, SocketFile, prepare_socket_path};

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
    pub allowed_uids: Vec<u32>,
    /// Heartbeat interval.
    pub heartbeat: Duration,
}

/// A bound link listener.
#[derive(Debug)]
pub struct LinkListener {
    listener: UnixListener,
    _file: SocketFile,
}

impl LinkListener {
    /// Binds the endpoint. A unix socket gets mode 0600 and, when a forwarder uid other than
    /// root is allowed, that uid as its owner.
    pub fn bind(endpoint: &Endpoint, extra_uids: &[u32]) -> anyhow::Result<Self> {
        let Endpoint::Unix(path) = endpoint;
        prepare_socket_path(path)?;
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot listen for the host link on {endpoint}"))?;
        let file = SocketFile(path.clone());
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(LINK_SOCKET_MODE))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        if let Some(&owner) = extra_uids.iter().find(|&&u| u != 0) {
            std::os::unix::fs::chown(path, Some(owner), None)
                .with_context(|| format!("cannot give {} to uid {owner}", path.display()))?;
        }
        Ok(LinkListener { listener, _file: file })
    }

    /// Accepts links until shutdown; each authenticated one becomes the active link.
    pub async fn run(
        self,
        slot: LinkSlot,
        settings: LinkSettings,
        mut shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let mut links = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                () = shutdown.wait() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        links.spawn(accept_link(stream, slot.clone(), settings.clone(), shutdown.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "link accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = links.join_next(), if !links.is_empty() => {}
            }
        }
        links.shutdown().await;
        Ok(())
    }
}

async fn accept_link(
    mut stream: UnixStream,
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
    match tokio::time::timeout(IO_TIMEOUT, handshake(&mut stream, settings.key)).await {
        Ok(Ok(established)) => {
            tracing::info!(vm = %established.vm, version = established.version, "host authenticated");
            slot.run(stream, settings.heartbeat, shutdown).await;
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "link handshake failed; connection closed"),
        Err(_) => tracing::warn!("link handshake timed out; connection closed"),
    }
}

async fn handshake(
    stream: &mut UnixStream,
    key: LinkKey,
) -> anyhow::Result<finch_shared::handshake::Established> {
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
