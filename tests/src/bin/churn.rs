//! `churn PATH SECONDS [THREADS]`: opens and closes connections to the unix socket at PATH as
//! fast as it can for SECONDS (a non-blocking connect, then close, never waiting for the
//! other side), on THREADS threads (default 2), and prints how many connects the kernel
//! took. What a process in the VM that may not use a socket can still do to it.

use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};

fn churn(addr: &UnixAddr, until: Instant) -> u64 {
    let mut connected = 0;
    while Instant::now() < until {
        for _ in 0..256 {
            let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
            let Ok(fd) = socket(AddressFamily::Unix, SockType::Stream, flags, None) else {
                continue;
            };
            if connect(fd.as_raw_fd(), addr).is_ok() {
                connected += 1;
            }
        }
    }
    connected
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(path), Some(Ok(seconds))) = (args.first(), args.get(1).map(|s| s.parse::<f64>()))
    else {
        eprintln!("usage: churn PATH SECONDS [THREADS]");
        return ExitCode::from(2);
    };
    let threads = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(2usize);
    let addr = match UnixAddr::new(path.as_str()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("churn: {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let total: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads).map(|_| s.spawn(|| churn(&addr, until))).collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    #[allow(clippy::print_stdout)]
    {
        println!("{total}");
    }
    ExitCode::SUCCESS
}
