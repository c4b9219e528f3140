//! One stream type over every way the host reaches a guest, chosen by the endpoint string:
//!
//! * `unix:///path`: Lima's forwarded socket (or the local bridge).
//! * `vsock://CID:PORT`: AF_VSOCK (Linux hosts running QEMU with vhost-vsock). CIDs 0–2 and
//!   `-1` are refused: the host agent never dials its own host.
//! * `hybrid:///vmm.sock:PORT`: the VMM's unix socket, `CONNECT PORT\n`, then `OK <n>\n`
//!   (Firecracker, Cloud Hypervisor, vhost-device-vsock).
//! * `hvsock://VMID|wsl:PORT`: a Hyper-V socket (Windows hosts; the `hvsock` module).
//! * `tcp://HOST:PORT`: TCP (WSL2's localhost forwarding, QEMU's host forward); only the
//!   link's mutual authentication protects it.
//!
//! Every transport is compiled on every OS: where the OS lacks it (unix sockets on Windows,
//! AF_VSOCK off Linux, Hyper-V sockets off Windows) its stand-in says so at dial time.
//!
//! The link itself is generic over `AsyncRead + AsyncWrite`; this module only dials.

pub mod hvsock;
mod unix;
mod vsock;

use std::io;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use finch_shared::endpoint::{CID_ANY, CID_HOST, Endpoint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Longest a dial (with the hybrid `CONNECT` exchange) may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest `OK <n>\n` line accepted from a VMM.
const MAX_OK_LINE: usize = 64;

/// A connected link stream.
#[derive(Debug)]
pub enum LinkStream {
    /// Unix socket (also the hybrid vsock case, after `CONNECT`).
    Unix(unix::Stream),
    /// AF_VSOCK.
    Vsock(vsock::Stream),
    /// Hyper-V socket, bridged into the runtime.
    HvSock(hvsock::Stream),
    /// TCP.
    Tcp(TcpStream),
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            LinkStream::Unix($s) => $e,
            LinkStream::Vsock($s) => $e,
            LinkStream::HvSock($s) => $e,
            LinkStream::Tcp($s) => $e,
        }
    };
}

impl AsyncRead for LinkStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for LinkStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// The stream of a transport this OS lacks: it has no values, so its arm of [`LinkStream`]
/// can never be reached, and the compiler proves it.
#[derive(Debug)]
pub enum Unavailable {}

impl AsyncRead for Unavailable {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match *self {}
    }
}

impl AsyncWrite for Unavailable {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
        _buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match *self {}
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match *self {}
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match *self {}
    }
}

/// Dials `endpoint` within [`DIAL_TIMEOUT`] (no handshake).
pub async fn dial(endpoint: &Endpoint) -> anyhow::Result<LinkStream> {
    tokio::time::timeout(DIAL_TIMEOUT, dial_unbounded(endpoint))
        .await
        .with_context(|| format!("dialing {endpoint} timed out"))?
}

async fn dial_unbounded(endpoint: &Endpoint) -> anyhow::Result<LinkStream> {
    match endpoint {
        Endpoint::Unix(path) => unix::connect(path)
            .await
            .map(LinkStream::Unix)
            .with_context(|| format!("cannot connect to {endpoint}")),
        Endpoint::Vsock { cid, port } => {
            anyhow::ensure!(
                *cid > CID_HOST && *cid != CID_ANY,
                "{endpoint}: CID {} is not a guest (guests have CID 3 or more; the host agent never dials its own host)",
                if *cid == CID_ANY { "-1".to_owned() } else { cid.to_string() }
            );
            vsock::connect(*cid, *port)
                .await
                .map(LinkStream::Vsock)
                .with_context(|| format!("cannot connect to {endpoint}"))
        }
        Endpoint::Hybrid { path, port } => {
            let mut stream = unix::connect(path)
                .await
                .with_context(|| format!("cannot connect to the VMM socket {}", path.display()))?;
            hybrid_connect(&mut stream, *port).await.with_context(|| format!("{endpoint}"))?;
            Ok(LinkStream::Unix(stream))
        }
        Endpoint::HvSock { vm, port } => hvsock::dial(vm, *port).await.map(LinkStream::HvSock),
        Endpoint::Tcp { host, port } => {
            let stream = TcpStream::connect((host.as_str(), *port))
                .await
                .with_context(|| format!("cannot connect to {endpoint}"))?;
            // Frames are small and latency matters more than packet count.
            let _ = stream.set_nodelay(true);
            Ok(LinkStream::Tcp(stream))
        }
    }
}

/// The hybrid vsock exchange: `CONNECT <port>\n`, then exactly one `OK <n>\n`, read byte by
/// byte so nothing of the guest's stream is consumed.
pub async fn hybrid_connect<S>(stream: &mut S, port: u32) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.context("sending CONNECT")?;
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.context("reading the VMM's answer")?;
        if n == 0 {
            anyhow::bail!(
                "the VMM closed the connection after CONNECT {port}: nothing listens on guest port {port} (is the guest agent running?)"
            );
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        anyhow::ensure!(line.len() <= MAX_OK_LINE, "the VMM's answer to CONNECT is too long");
    }
    let text = String::from_utf8_lossy(&line);
    let ok = text.strip_prefix("OK ").is_some_and(|n| {
        !n.is_empty() && n.trim_end_matches('\r').bytes().all(|b| b.is_ascii_digit())
    });
    anyhow::ensure!(
        ok,
        "the VMM refused CONNECT {port}: {:?}",
        finch_shared::limit::cap(&text, MAX_OK_LINE)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VMM stand-in: reads `CONNECT`, answers `reply`, then echoes.
    async fn vmm(reply: &'static [u8]) -> String {
        let (mut host, mut vmm) = tokio::io::duplex(256);
        let task = tokio::spawn(async move {
            let mut got = vec![0u8; 13];
            vmm.read_exact(&mut got).await.unwrap();
            assert_eq!(got, b"CONNECT 6127\n");
            vmm.write_all(reply).await.unwrap();
            if reply.ends_with(b"\n") && reply.starts_with(b"OK") {
                vmm.write_all(b"guest-bytes").await.unwrap();
            }
        });
        let result = hybrid_connect(&mut host, 6127).await;
        let text = match result {
            Ok(()) => {
                let mut rest = [0u8; 11];
                host.read_exact(&mut rest).await.unwrap();
                assert_eq!(&rest, b"guest-bytes", "the OK line ate guest bytes");
                "ok".to_owned()
            }
            Err(e) => format!("{e:#}"),
        };
        task.await.unwrap();
        text
    }

    #[tokio::test]
    async fn hybrid_exchange() {
        assert_eq!(vmm(b"OK 1073741824\n").await, "ok");
        assert!(vmm(b"").await.contains("nothing listens on guest port 6127"));
        assert!(vmm(b"NO\n").await.contains("refused CONNECT 6127"));
        assert!(vmm(b"OK \n").await.contains("refused"));
        assert!(vmm(&[b'O'; 100]).await.contains("too long"));
    }

    #[tokio::test]
    async fn dials_tcp_and_refuses_what_this_os_lacks() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tcp = Endpoint::Tcp { host: "127.0.0.1".into(), port };
        assert!(matches!(dial(&tcp).await.unwrap(), LinkStream::Tcp(_)));
        let hv = Endpoint::HvSock { vm: finch_shared::endpoint::HvVm::Wsl, port: 6127 };
        if !cfg!(windows) {
            let e = dial(&hv).await.unwrap_err().to_string();
            assert!(e.contains("only on Windows hosts"), "{e}");
        }
        if cfg!(windows) {
            let e = format!("{:#}", dial(&Endpoint::Unix("/x.sock".into())).await.unwrap_err());
            assert!(e.contains("use tcp://"), "{e}");
        }
    }

    #[tokio::test]
    async fn own_host_is_never_dialed() {
        for cid in [0, 1, 2, CID_ANY] {
            let e = dial(&Endpoint::Vsock { cid, port: 6127 }).await.unwrap_err().to_string();
            assert!(e.contains("is not a guest"), "{e}");
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn dials_a_unix_socket_and_a_silent_vmm_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let _listener = tokio::net::UnixListener::bind(&path).unwrap();
        assert!(matches!(dial(&Endpoint::Unix(path.clone())).await.unwrap(), LinkStream::Unix(_)));
        tokio::time::pause();
        let e = dial(&Endpoint::Hybrid { path, port: 1 }).await.unwrap_err().to_string();
        assert!(e.contains("timed out"), "{e}");
    }
}
