//! Unix sockets (Lima's forwarded socket, hybrid vsock's VMM socket). Windows builds have a
//! stand-in that refuses them at dial time: tokio has no AF_UNIX there.

use std::path::Path;

/// A unix socket stream.
#[cfg(unix)]
pub type Stream = tokio::net::UnixStream;
/// No unix sockets on this OS.
#[cfg(not(unix))]
pub type Stream = super::Unavailable;

/// Connects to the socket at `path`.
#[cfg(unix)]
pub async fn connect(path: &Path) -> std::io::Result<Stream> {
    tokio::net::UnixStream::connect(path).await
}

/// Refuses: this build has no unix sockets.
#[cfg(not(unix))]
pub async fn connect(_path: &Path) -> std::io::Result<Stream> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "unix sockets are not available on Windows: use tcp:// (WSL2 localhost forwarding) or hvsock://",
    ))
}
