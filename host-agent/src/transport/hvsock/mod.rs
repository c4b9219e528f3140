//! Hyper-V sockets (Windows hosts): AF_HYPERV to `SOCKADDR_HV { VmId, ServiceId }`, where the
//! service id of vsock port P is `PPPPPPPP-facb-11e6-bd58-64006a7986d3` (the guest's AF_VSOCK
//! listener on port P answers it). For `hvsock://wsl:PORT` the WSL2 utility VM's id is asked
//! of WSL at every dial (`wsl.exe --exec wslinfo --vm-id`), so a restarted WSL (new id) is
//! found by the next reconnect.
//!
//! Compiled for Windows (clippy in CI); not run here: Wine has no AF_HYPERV. On other OSes a
//! stand-in refuses `hvsock://` at dial time.

#[cfg(windows)]
mod windows;
#[cfg(windows)]
pub use windows::{Stream, dial};

#[cfg(not(windows))]
pub use standin::{Stream, dial};

#[cfg(not(windows))]
mod standin {
    use finch_shared::endpoint::HvVm;

    /// No Hyper-V socket exists off Windows.
    pub type Stream = super::super::Unavailable;

    /// Refuses: Hyper-V sockets exist only on Windows hosts.
    pub async fn dial(_vm: &HvVm, port: u32) -> anyhow::Result<Stream> {
        anyhow::bail!("hvsock://…:{port}: Hyper-V sockets exist only on Windows hosts")
    }
}
