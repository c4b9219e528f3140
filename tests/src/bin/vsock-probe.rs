//! A tiny tool for the real-VM test, linked statically into its initramfs:
//!
//! * `vsock-probe connect CID PORT`: opens AF_VSOCK to CID:PORT and says what the other side
//!   did within 5 s: `closed` (hung up without a byte), `data`, `silent`, or `refused: …`.
//! * `vsock-probe as-uid UID PROGRAM ARGS…`: runs PROGRAM as UID (gid UID, no groups), which
//!   busybox cannot do.

use std::process::ExitCode;

#[allow(clippy::print_stdout)]
fn say(text: &str) {
    println!("{text}");
}

fn connect(cid: u32, port: u32) -> String {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, VsockAddr, connect, setsockopt, socket, sockopt,
    };
    let fd = match socket(AddressFamily::Vsock, SockType::Stream, SockFlag::empty(), None) {
        Ok(fd) => fd,
        Err(e) => return format!("refused: socket: {e}"),
    };
    if let Err(e) = connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &VsockAddr::new(cid, port)) {
        return format!("refused: {e}");
    }
    let timeout = nix::sys::time::TimeVal::new(5, 0);
    let _ = setsockopt(&fd, sockopt::ReceiveTimeout, &timeout);
    let mut buf = [0u8; 64];
    match nix::unistd::read(&fd, &mut buf) {
        Ok(0) => "closed".into(),
        Ok(_) => "data".into(),
        Err(nix::errno::Errno::EAGAIN) => "silent".into(),
        Err(nix::errno::Errno::ECONNRESET) => "closed".into(),
        Err(e) => format!("error: {e}"),
    }
}

fn as_uid(uid: u32, program: &str, args: &[String]) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let id = nix::unistd::Uid::from_raw(uid);
    let gid = nix::unistd::Gid::from_raw(uid);
    if let Err(e) = nix::unistd::setgroups(&[])
        .and_then(|()| nix::unistd::setgid(gid))
        .and_then(|()| nix::unistd::setuid(id))
    {
        return std::io::Error::other(format!("cannot become uid {uid}: {e}"));
    }
    std::process::Command::new(program).args(args).exec()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["connect", cid, port] => match (cid.parse(), port.parse()) {
            (Ok(cid), Ok(port)) => {
                say(&connect(cid, port));
                ExitCode::SUCCESS
            }
            _ => ExitCode::from(2),
        },
        ["as-uid", uid, program, ..] => match uid.parse() {
            Ok(uid) => {
                let e = as_uid(uid, program, &args[3..]);
                eprintln!("vsock-probe: {e}");
                ExitCode::from(126)
            }
            Err(_) => ExitCode::from(2),
        },
        _ => {
            eprintln!("usage: vsock-probe connect CID PORT | as-uid UID PROGRAM [ARGS…]");
            ExitCode::from(2)
        }
    }
}
