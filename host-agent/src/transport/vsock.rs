//! AF_VSOCK (Linux hosts running QEMU with vhost-vsock). Other OSes have a stand-in that
//! refuses it at dial time (macOS VMMs expose vsock as hybrid vsock over a unix socket).

/// A vsock stream.
#[cfg(target_os = "linux")]
pub type Stream = tokio_vsock::VsockStream;
/// No AF_VSOCK on this OS.
#[cfg(not(target_os = "linux"))]
pub type Stream = super::Unavailable;

/// Connects to `cid:port` (the caller has refused the host's own CIDs).
#[cfg(target_os = "linux")]
pub async fn connect(cid: u32, port: u32) -> anyhow::Result<Stream> {
    Ok(tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(cid, port)).await?)
}

/// Refuses: AF_VSOCK dialing exists on Linux hosts only.
#[cfg(not(target_os = "linux"))]
pub async fn connect(_cid: u32, _port: u32) -> anyhow::Result<Stream> {
    anyhow::bail!("AF_VSOCK dialing is available on Linux hosts only (use hybrid:// or tcp://)")
}
