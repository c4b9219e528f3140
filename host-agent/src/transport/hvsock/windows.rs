//! The Windows implementation: a blocking AF_HYPERV socket, bridged by two threads.
#![allow(unsafe_code)]

use std::io::{Read, Write};

use anyhow::Context;

/// A Hyper-V socket, bridged into the runtime.
pub type Stream = tokio::io::DuplexStream;
use finch_shared::endpoint::{HvVm, hv_service_id};
use windows_sys::Win32::Networking::WinSock::AF_HYPERV;
use windows_sys::Win32::System::Hypervisor::{HV_PROTOCOL_RAW, SOCKADDR_HV};
use windows_sys::core::GUID;

fn parse_guid(s: &str) -> anyhow::Result<GUID> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    anyhow::ensure!(hex.len() == 32, "{s:?} is not a GUID");
    let n = u128::from_str_radix(&hex, 16).with_context(|| format!("{s:?} is not a GUID"))?;
    Ok(GUID::from_u128(n))
}

/// The WSL2 utility VM's current id, as WSL reports it from inside the default distro.
fn wsl_vm_id() -> anyhow::Result<String> {
    let out = std::process::Command::new("wsl.exe")
        .args(["--exec", "wslinfo", "--vm-id"])
        .output()
        .context("cannot run wsl.exe")?;
    anyhow::ensure!(
        out.status.success(),
        "wslinfo --vm-id failed (is WSL running, and recent enough?)"
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().trim_matches(['{', '}']).to_owned())
}

/// Connects to `vm` on vsock port `port` and bridges the socket into a duplex stream.
pub async fn dial(vm: &HvVm, port: u32) -> anyhow::Result<Stream> {
    let vm = vm.clone();
    let socket = tokio::task::spawn_blocking(move || -> anyhow::Result<socket2::Socket> {
        let id = match &vm {
            HvVm::Id(id) => id.clone(),
            HvVm::Wsl => wsl_vm_id()?,
        };
        let addr = SOCKADDR_HV {
            Family: AF_HYPERV,
            Reserved: 0,
            VmId: parse_guid(&id)?,
            ServiceId: parse_guid(&hv_service_id(port))?,
        };
        let socket = socket2::Socket::new(
            socket2::Domain::from(AF_HYPERV as i32),
            socket2::Type::STREAM,
            Some(socket2::Protocol::from(HV_PROTOCOL_RAW as i32)),
        )
        .context("cannot create a Hyper-V socket")?;
        // SAFETY: `addr` is a fully initialised SOCKADDR_HV and the length is its size.
        let sockaddr = unsafe {
            socket2::SockAddr::try_init(|storage, len| {
                std::ptr::copy_nonoverlapping(
                    (&addr as *const SOCKADDR_HV).cast::<u8>(),
                    storage.cast::<u8>(),
                    size_of::<SOCKADDR_HV>(),
                );
                *len = size_of::<SOCKADDR_HV>() as _;
                Ok(())
            })
        }
        .map(|((), a)| a)?;
        socket
            .connect(&sockaddr)
            .with_context(|| format!("cannot connect to Hyper-V VM {id} port {port}"))?;
        Ok(socket)
    })
    .await
    .context("the dial task failed")??;
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut rd_half, mut wr_half) = tokio::io::split(theirs);
    let mut reader = socket.try_clone()?;
    let mut writer = socket;
    let rt = tokio::runtime::Handle::current();
    let rt2 = rt.clone();
    std::thread::spawn(move || {
        use tokio::io::AsyncWriteExt;
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || rt.block_on(wr_half.write_all(&buf[..n])).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = rt2.block_on(rd_half.read(&mut buf)) {
            if n == 0 || writer.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = writer.shutdown(std::net::Shutdown::Both);
    });
    Ok(ours)
}
