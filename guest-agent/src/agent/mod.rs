//! `finch-guest-agent serve`: holds the one link to the host agent and answers helper calls
//! over it.
//!
//! * `accept`: the one accept loop: peers checked inline, live connections bounded,
//!   finished ones reaped.
//! * [`helper_socket`]: the unix socket the helper calls; peers checked by uid.
//! * [`listener`]: accepts the host's link and runs the handshake (guest side).
//! * [`link`]: the established link: request ids, answers in any order, heartbeat.
//! * [`front`]: the registry front (optional): containerd's requests forwarded to the
//!   registries, with scoped tokens from the host instead of passwords.

pub mod finch_creds;
pub mod front;
pub mod helper_socket;
pub mod link;
pub mod listener;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use finch_shared::endpoint::Endpoint;
use finch_shared::key::LinkKey;
use tokio::net::{UnixListener, UnixStream};

/// Default helper socket (the same default the helper uses).
pub const DEFAULT_HELPER_SOCKET: &str = crate::helper::client::DEFAULT_SOCKET;
/// Default link endpoint.
pub const DEFAULT_LINK_LISTEN: &str = "unix:///run/finch-guest-agent/link.sock";
/// Default link key file.
pub const DEFAULT_LINK_KEY_FILE: &str = "/etc/finch-guest-agent/link.key";
/// How long a helper call waits for a link that is not up yet.
pub const DEFAULT_LINK_WAIT: Duration = Duration::from_secs(3);
/// How long a request may take on the host before the helper is told it is unavailable.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Backlog of the agent's unix sockets. Kept short: a flood of connections waits there, and
/// a legitimate caller queued behind it waits for all of them to be refused.
pub const BACKLOG: i32 = 64;
/// Heartbeat interval; a link silent for [`HEARTBEAT_MISSES`] intervals is dead.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Silent intervals after which a link is declared dead.
pub use finch_shared::link::HEARTBEAT_MISSES;
/// Longest a handshake or a helper's request frame may take to arrive.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything `serve` needs, resolved from flags.
#[derive(Debug)]
pub struct Config {
    /// Helper socket path.
    pub helper_socket: PathBuf,
    /// Extra uids allowed to call the helper (root and the agent's own uid always are).
    pub allow_uids: Vec<u32>,
    /// Group that owns the helper socket (mode 0660), so allowed users can connect.
    pub socket_group: Option<u32>,
    /// Where the host's link arrives.
    pub link_listen: Endpoint,
    /// Extra uids allowed to connect to a unix link socket (the forwarder's uid).
    pub link_allow_uids: Vec<u32>,
    /// Whether a `tcp://` link may listen on an address that is not loopback.
    pub link_listen_non_loopback: bool,
    /// The VM's link key.
    pub key: LinkKey,
    /// Bounded wait for a link that is not up.
    pub link_wait: Duration,
    /// Bounded wait for the host's answer.
    pub request_timeout: Duration,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Finch's credential socket (`/run/user/UID/finch-creds.sock`), answered by the bridge.
    pub finch_creds_socket: Option<PathBuf>,
    /// Where the registry front listens (loopback), if it runs.
    pub front_listen: Option<std::net::SocketAddr>,
    /// How long the front waits for a registry's answer to a request without a body.
    pub front_answer_timeout: Duration,
    /// Where the front's TLS certificates are (made there when missing).
    pub front_certs_dir: PathBuf,
}

/// Fires once when the agent should stop; every task selects on it.
pub use finch_shared::link::Shutdown;

/// Serves `accept`'s connections with finch-shared's accept loop, logging failed accepts
/// as `what`; connections still open at shutdown are stopped.
async fn accept_loop<S, Fut>(
    what: &'static str,
    max_live: usize,
    accept: impl AsyncFnMut() -> std::io::Result<S>,
    admit: impl FnMut(S) -> Option<Fut>,
    shutdown: Shutdown,
) where
    Fut: Future<Output = ()> + Send + 'static,
{
    let failed = |e: &std::io::Error| tracing::warn!(listener = what, error = %e, "accept failed");
    finch_shared::accept::accept_loop(max_live, accept, admit, failed, Duration::ZERO, shutdown)
        .await;
}

/// The uid this process runs as.
pub fn current_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// Runs the agent until `shutdown` fires; removes its sockets on the way out.
pub async fn serve(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let slot = link::LinkSlot::new(config.link_wait, config.request_timeout);
    let me = current_uid();
    let helper_uids: Arc<[u32]> = [0, me].iter().chain(&config.allow_uids).copied().collect();
    let link_uids: Arc<[u32]> = [0, me].iter().chain(&config.link_allow_uids).copied().collect();

    let helper = helper_socket::HelperSocket::bind(&config.helper_socket, config.socket_group)?;
    let calls = helper_socket::Shared::new(slot.clone(), helper_uids.clone());
    let finch = config.finch_creds_socket.clone().map(finch_creds::FinchCredsSocket::new);
    let link_listener = listener::LinkListener::bind(
        &config.link_listen,
        &config.link_allow_uids,
        config.link_listen_non_loopback,
    )?;
    tracing::info!(
        helper_socket = %config.helper_socket.display(),
        link = %config.link_listen,
        "guest agent ready"
    );
    let front = config
        .front_listen
        .map(|addr| {
            front::Front::bind(
                addr,
                &config.front_certs_dir,
                config.socket_group,
                config.front_answer_timeout,
                slot.clone(),
                helper_uids.clone(),
            )
        })
        .transpose()?;
    if let Some(front) = &front {
        tracing::info!(listen = %front.local_addr(), "registry front ready");
    }
    let settings = listener::LinkSettings::new(config.key, link_uids, config.heartbeat);
    let finch_creds = async {
        if let Some(finch) = finch {
            finch.run(calls.clone(), shutdown.clone()).await;
        }
    };
    let front = async {
        if let Some(front) = front {
            front.run(shutdown.clone()).await;
        }
    };
    tokio::join!(
        helper.run(calls.clone(), shutdown.clone()),
        link_listener.run(slot.clone(), settings, shutdown.clone()),
        finch_creds,
        front,
    );
    slot.close();
    tracing::info!("guest agent stopped");
    Ok(())
}

/// A unix socket the agent listens on: bound with its mode (and owner or group), removed
/// when dropped. Both the helper socket and a unix link socket are one of these.
#[derive(Debug)]
pub(crate) struct Listening {
    listener: UnixListener,
    path: PathBuf,
    what: &'static str,
    /// The socket file's (device, inode): only that file is removed on drop.
    identity: Option<(u64, u64)>,
}

/// Who may open a [`Listening`] socket, by file permissions (peers are checked again by uid).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Access {
    /// Permission bits.
    pub mode: u32,
    /// New owner, if not the agent.
    pub owner: Option<u32>,
    /// New group, if not the agent's.
    pub group: Option<u32>,
}

impl Listening {
    /// Binds `path` (replacing only a stale socket) with a backlog of [`BACKLOG`], then sets
    /// its owner, group and mode.
    pub(crate) fn bind(path: &Path, what: &'static str, access: Access) -> anyhow::Result<Self> {
        use nix::sys::socket::{
            AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
        };
        use std::os::unix::fs::PermissionsExt;
        prepare_socket_path(path)?;
        let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
        let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)
            .with_context(|| format!("cannot make the {what}"))?;
        let addr = UnixAddr::new(path).with_context(|| format!("{}", path.display()))?;
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)
            .with_context(|| format!("cannot listen on the {what} {}", path.display()))?;
        // The socket file exists from here on: removed if what follows fails, and by `this`
        // when it is dropped.
        let listening = listen(&fd, Backlog::new(BACKLOG)?)
            .map_err(std::io::Error::from)
            .and_then(|()| UnixListener::from_std(std::os::unix::net::UnixListener::from(fd)));
        let listener = match listening {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e)
                    .with_context(|| format!("cannot listen on the {what} {}", path.display()));
            }
        };
        let this = Listening { listener, path: path.to_owned(), what, identity: identity(path) };
        if access.owner.is_some() || access.group.is_some() {
            std::os::unix::fs::chown(path, access.owner, access.group)
                .with_context(|| format!("cannot change the owner of {}", path.display()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        Ok(this)
    }

    /// Accepts one connection.
    pub(crate) async fn accept(&self) -> std::io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }

    /// What the socket is, for logs.
    pub(crate) fn what(&self) -> &'static str {
        self.what
    }
}

/// Sends `bytes` once, never waiting: a refusal on a connection that was just accepted (its
/// buffer is empty, so a caller still there gets it whole; one already gone costs nothing).
pub(crate) fn send_now(stream: &UnixStream, bytes: &[u8]) {
    use nix::sys::socket::{MsgFlags, send};
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    let _ = send(std::os::fd::AsRawFd::as_raw_fd(stream), bytes, flags);
}

/// A file's (device, inode), if it exists.
pub(crate) fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Drop for Listening {
    /// Removes the socket file, if it is still the one bound: a file that replaced it at the
    /// path is someone else's and stays.
    fn drop(&mut self) {
        if self.identity.is_some() && identity(&self.path) == self.identity {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes a stale socket file at `path` (only a socket nobody answers on, never any other
/// file) and makes the parent directory.
fn prepare_socket_path(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A socket that still answers belongs to a running agent: never steal it.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "{} is in use: is another finch-guest-agent running?",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))
        }
        Ok(_) => {
            anyhow::bail!("{} exists and is not a socket; refusing to replace it", path.display())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
}
