//! Accepts the host's link and runs the guest side of the handshake.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use finch_shared::endpoint::Endpoint;
use finch_shared::handshake::GuestHandshake;
use finch_shared::io::{read_msg, write_msg};
use finch_shared::key::LinkKey;
use finch_shared::limit::LogGate;
use finch_shared::message::Handshake;
use tokio::io::{AsyncRead, AsyncWrite};

use super::link::LinkSlot;
use tokio::net::UnixStream;

use super::accept_loop;
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
    /// Connections still in their handshake, bounded (see [`MAX_HANDSHAKES`]).
    pub handshakes: Arc<Pending>,
    /// Refused or failed link connections, logged through a gate.
    pub refusals: Arc<std::sync::Mutex<LogGate>>,
}

/// Most link connections in their handshake at once. A new one closes the oldest still
/// waiting: idle connections cannot hold the port shut to the host, whose handshake takes a
/// round trip, and they cannot grow the agent either.
pub const MAX_HANDSHAKES: usize = 32;

/// Most link connections served at once: the pending handshakes, the active link, and room
/// for the ones closing. Past it, connections wait in the kernel's backlog.
pub const MAX_LINK_CONNECTIONS: usize = 2 * MAX_HANDSHAKES;

/// The connections in their handshake, oldest first, each with the trigger that closes it.
#[derive(Debug, Default)]
pub struct Pending {
    queue: std::sync::Mutex<std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>>,
    next: std::sync::atomic::AtomicU64,
}

/// A place among the pending handshakes; left when dropped.
#[derive(Debug)]
pub struct PendingSlot {
    pending: Arc<Pending>,
    id: u64,
    /// Fires when a newer connection took this one's place.
    pub evicted: tokio::sync::oneshot::Receiver<()>,
}

impl Pending {
    /// Takes a place, closing the oldest pending handshake when all are taken.
    pub fn admit(self: &Arc<Self>) -> PendingSlot {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, evicted) = tokio::sync::oneshot::channel();
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while queue.len() >= MAX_HANDSHAKES {
            if let Some((_, oldest)) = queue.pop_front() {
                let _ = oldest.send(());
            }
        }
        queue.push_back((id, tx));
        PendingSlot { pending: self.clone(), id, evicted }
    }

    /// How many handshakes are pending.
    pub fn count(&self) -> usize {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut queue =
            self.pending.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        queue.retain(|(id, _)| *id != self.id);
    }
}
/// Refused link connections logged per window; the rest are counted.
pub const REFUSAL_BURST: u32 = 10;
/// See [`REFUSAL_BURST`].
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

impl LinkSettings {
    /// Settings for `key`, with fresh bounds.
    pub fn new(key: LinkKey, allowed_uids: Arc<[u32]>, heartbeat: Duration) -> Self {
        LinkSettings {
            key,
            allowed_uids,
            heartbeat,
            handshakes: Arc::default(),
            refusals: Arc::new(std::sync::Mutex::new(LogGate::new(REFUSAL_WINDOW, REFUSAL_BURST))),
        }
    }

    /// Logs a refused connection if the gate lets it through.
    fn refused(&self, what: &str, detail: &str) {
        let admitted = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .admit(std::time::Instant::now());
        if let Some(suppressed) = admitted {
            tracing::warn!(detail = ?detail, suppressed, "{what}");
        }
    }
}

/// A bound link listener: a unix socket (checked by peer uid), on Linux a vsock port
/// (checked by peer CID: only the host, CID 2), or a TCP port (loopback unless allowed
/// otherwise; only the handshake keeps others out).
#[derive(Debug)]
pub(crate) enum LinkListener {
    /// A unix socket, mode 0600.
    Unix(Listening),
    /// A vsock port.
    #[cfg(target_os = "linux")]
    Vsock(tokio_vsock::VsockListener),
    /// A TCP port.
    Tcp(tokio::net::TcpListener),
}

/// The address a `tcp://` link listens on: an IP literal (or `localhost`), loopback unless
/// `non_loopback` allows another.
fn tcp_listen_addr(
    endpoint: &Endpoint,
    host: &str,
    port: u16,
    non_loopback: bool,
) -> anyhow::Result<std::net::SocketAddr> {
    let ip: std::net::IpAddr = if host == "localhost" {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        host.parse().map_err(|_| {
            anyhow::anyhow!("{endpoint}: the guest agent listens on an IP address, not a name")
        })?
    };
    anyhow::ensure!(
        ip.is_loopback() || non_loopback,
        "{endpoint}: {ip} is not a loopback address; anyone who reaches it could try the link \
         (only its key keeps them out): pass --link-listen-non-loopback to mean it"
    );
    Ok((ip, port).into())
}

impl LinkListener {
    /// Binds the endpoint. A unix socket gets mode 0600 and, when a forwarder uid other than
    /// root is allowed, that uid as its owner.
    pub fn bind(
        endpoint: &Endpoint,
        extra_uids: &[u32],
        non_loopback: bool,
    ) -> anyhow::Result<Self> {
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
            Endpoint::Tcp { host, port } => {
                let addr = tcp_listen_addr(endpoint, host, *port, non_loopback)?;
                let socket = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("cannot listen on {endpoint}"))?;
                socket.set_nonblocking(true)?;
                Ok(LinkListener::Tcp(tokio::net::TcpListener::from_std(socket)?))
            }
            other => anyhow::bail!(
                "the guest agent listens on unix:///path, vsock://-1:PORT or tcp://IP:PORT, not {other}"
            ),
        }
    }

    /// Accepts links until shutdown; each authenticated one becomes the active link.
    pub async fn run(self, slot: LinkSlot, settings: LinkSettings, shutdown: Shutdown) {
        let stop = shutdown.clone();
        match self {
            LinkListener::Unix(listening) => {
                let accept = async || listening.accept().await;
                let admit = |stream: UnixStream| match stream.peer_cred().map(|c| c.uid()) {
                    Ok(uid) if settings.allowed_uids.contains(&uid) => {
                        Some(admitted(stream, &slot, &settings, &stop))
                    }
                    Ok(uid) => {
                        let uid = format!("uid {uid}");
                        settings.refused("link connection from a uid that is not allowed", &uid);
                        None
                    }
                    Err(e) => {
                        let e = e.to_string();
                        settings.refused("cannot read the link peer's credentials", &e);
                        None
                    }
                };
                accept_loop(listening.what(), MAX_LINK_CONNECTIONS, accept, admit, shutdown).await;
            }
            #[cfg(target_os = "linux")]
            LinkListener::Vsock(listener) => {
                let accept = async || listener.accept().await;
                let admit = |(stream, peer): (tokio_vsock::VsockStream, tokio_vsock::VsockAddr)| {
                    if peer.cid() == finch_shared::endpoint::CID_HOST {
                        return Some(admitted(stream, &slot, &settings, &stop));
                    }
                    settings.refused(
                        "vsock link connection not from the host (CID 2); dropped",
                        &format!("cid {} port {}", peer.cid(), peer.port()),
                    );
                    None
                };
                accept_loop("vsock link", MAX_LINK_CONNECTIONS, accept, admit, shutdown).await;
            }
            LinkListener::Tcp(listener) => {
                let accept = async || listener.accept().await;
                let admit = |(stream, peer): (tokio::net::TcpStream, std::net::SocketAddr)| {
                    let _ = stream.set_nodelay(true);
                    tracing::debug!(%peer, "tcp link connection");
                    Some(admitted(stream, &slot, &settings, &stop))
                };
                accept_loop("tcp link", MAX_LINK_CONNECTIONS, accept, admit, shutdown).await;
            }
        }
    }
}

/// A connection that passed its listener's check: it takes a place among the pending
/// handshakes (closing the oldest when all are taken) and becomes a task.
fn admitted<S>(
    stream: S,
    slot: &LinkSlot,
    settings: &LinkSettings,
    shutdown: &Shutdown,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let place = settings.handshakes.admit();
    authenticate(stream, place, slot.clone(), settings.clone(), shutdown.clone())
}

/// Runs the handshake on an accepted connection; an authenticated host becomes the link.
/// The place among pending handshakes is held only while the handshake runs.
async fn authenticate<S>(
    mut stream: S,
    mut place: PendingSlot,
    slot: LinkSlot,
    settings: LinkSettings,
    shutdown: Shutdown,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let outcome = tokio::select! {
        r = tokio::time::timeout(IO_TIMEOUT, handshake(&mut stream, settings.key.clone())) => r,
        _ = &mut place.evicted => {
            settings.refused("link handshake closed: newer connections took its place", "");
            return;
        }
    };
    drop(place);
    match outcome {
        Ok(Ok((established, session))) => {
            tracing::info!(vm = ?established.vm, version = established.version, "host authenticated");
            slot.run(stream, session, established.version, settings.heartbeat, shutdown).await;
        }
        Ok(Err(e)) => settings.refused("link handshake failed; connection closed", &e.to_string()),
        Err(_) => settings.refused("link handshake timed out; connection closed", ""),
    }
}

async fn handshake<S>(
    stream: &mut S,
    key: LinkKey,
) -> anyhow::Result<(finch_shared::handshake::Established, finch_shared::seal::Session)>
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
        Ok(done) => Ok(done),
        Err(e) => {
            if let Some(reject) = e.reject() {
                let _ = write_msg(stream, &reject).await;
            }
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(endpoint: &str, non_loopback: bool) -> Result<String, String> {
        let e: Endpoint = endpoint.parse().unwrap();
        let Endpoint::Tcp { host, port } = &e else { panic!("{endpoint} is not tcp") };
        tcp_listen_addr(&e, host, *port, non_loopback)
            .map(|a| a.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn tcp_listens_on_loopback_unless_told_otherwise() {
        assert_eq!(addr("tcp://127.0.0.1:6127", false).unwrap(), "127.0.0.1:6127");
        assert_eq!(addr("tcp://127.3.2.1:1", false).unwrap(), "127.3.2.1:1");
        assert_eq!(addr("tcp://[::1]:6127", false).unwrap(), "[::1]:6127");
        assert_eq!(addr("tcp://localhost:6127", false).unwrap(), "127.0.0.1:6127");
        for wide in ["tcp://0.0.0.0:6127", "tcp://10.0.2.15:6127", "tcp://[::]:6127"] {
            let e = addr(wide, false).unwrap_err();
            assert!(e.contains("--link-listen-non-loopback"), "{e}");
            assert!(addr(wide, true).is_ok(), "{wide}");
        }
        assert!(addr("tcp://vm.example:6127", true).unwrap_err().contains("not a name"));
    }

    #[tokio::test]
    async fn binds_tcp_and_refuses_a_wide_address() {
        // Port 0 (an ephemeral port) is refused by the endpoint parser, not by bind.
        let e = Endpoint::Tcp { host: "127.0.0.1".into(), port: 0 };
        assert!(matches!(LinkListener::bind(&e, &[], false), Ok(LinkListener::Tcp(_))));
        let wide = Endpoint::Tcp { host: "0.0.0.0".into(), port: 0 };
        assert!(LinkListener::bind(&wide, &[], false).is_err());
    }

    #[test]
    fn idle_connections_are_evicted_oldest_first_and_never_pile_up() {
        let pending = Arc::new(Pending::default());
        let mut first = pending.admit();
        let mut held: Vec<_> = (1..MAX_HANDSHAKES).map(|_| pending.admit()).collect();
        assert_eq!(pending.count(), MAX_HANDSHAKES);
        assert!(first.evicted.try_recv().is_err());
        // One more: the oldest is told to close, the newest gets its place.
        let newest = pending.admit();
        assert!(first.evicted.try_recv().is_ok(), "the oldest was not evicted");
        assert!(held[0].evicted.try_recv().is_err());
        assert_eq!(pending.count(), MAX_HANDSHAKES);
        for _ in 0..1000 {
            drop(pending.admit());
        }
        assert!(pending.count() <= MAX_HANDSHAKES);
        drop((first, newest));
        held.clear();
        assert_eq!(pending.count(), 0, "places were not given back");
    }
}
