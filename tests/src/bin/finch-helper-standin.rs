//! A stand-in of Finch 1.18's in-VM `docker-credential-finchhost`, for the Lima-style VM test,
//! written from what Finch's source does (runfinch/finch
//! `cmd/finchhost-credential-helper/main.go`), not from its code: `get` reads the server from
//! stdin, asks `GET /credentials?server=SERVER` over HTTP on
//! `/run/user/UID/finch-creds.sock` (`UID` is `$SUDO_UID` under sudo, else the caller's),
//! with every `AWS_*`/`HOST_DOCKER_CONFIG` variable of its environment as an
//! `X-Finch-Env-NAME` header, and prints `{"ServerURL","Username","Secret"}` on 200; anything
//! else is "credentials not found in native keychain" and exit 1, as Finch's does. `store`,
//! `erase` and `list` are "not implemented", as in Finch.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

const ENV: [&str; 9] = [
    "COSIGN_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ECR_DISABLE_CACHE",
    "AWS_ECR_CACHE_DIR",
    "AWS_ECR_IGNORE_CREDS_STORAGE",
    "AWS_PROFILE",
    "HOST_DOCKER_CONFIG",
];

fn socket_path() -> String {
    let uid = std::env::var("SUDO_UID")
        .ok()
        .and_then(|u| u.parse::<u32>().ok())
        .unwrap_or_else(|| nix::unistd::getuid().as_raw());
    format!("/run/user/{uid}/finch-creds.sock")
}

fn get(server: &str) -> Option<String> {
    let mut s = UnixStream::connect(socket_path()).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut request = format!("GET /credentials?server={server} HTTP/1.1\r\nHost: unix\r\n");
    for key in ENV {
        if let Ok(v) = std::env::var(key) {
            request.push_str(&format!("X-Finch-Env-{key}: {v}\r\n"));
        }
    }
    request.push_str("\r\n");
    s.write_all(request.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200 ").then(|| body.trim_end().to_owned())
}

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    let action = std::env::args().nth(1).unwrap_or_default();
    let mut stdout = std::io::stdout();
    match action.as_str() {
        "get" => {
            let mut input = String::new();
            let _ = std::io::stdin().read_to_string(&mut input);
            match get(input.trim()) {
                Some(json) => {
                    let _ = writeln!(stdout, "{json}");
                    ExitCode::SUCCESS
                }
                None => {
                    let _ = writeln!(stdout, "credentials not found in native keychain");
                    ExitCode::FAILURE
                }
            }
        }
        "store" | "erase" | "list" => {
            let _ = writeln!(stdout, "not implemented");
            ExitCode::FAILURE
        }
        _ => {
            let _ = writeln!(
                stdout,
                "Usage: docker-credential-finchhost <store|get|erase|list|version>"
            );
            ExitCode::FAILURE
        }
    }
}
