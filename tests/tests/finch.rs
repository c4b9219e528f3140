//! Finch's own credential path, answered by the bridge: the guest agent listens on Finch's
//! credential socket (`/run/user/UID/finch-creds.sock` in a Finch VM; a directory of the test
//! here) and answers Finch's HTTP protocol (`GET /credentials?server=S`, as Finch's
//! `docker-credential-finchhost` sends it) from the host, under the host's policy. When
//! something replaces the socket (Lima's reverse forward removes the path and listens there),
//! the agent takes the path back.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use finch_tests::{Bridge, assert_no_secret, wait_until};

const AUTHS: &str =
    r#"{"auths":{"registry.example:5000":{"auth":"YWxpY2U6ZmluY2gtY2FuYXJ5LXB3"}}}"#;
const SECRET: &str = "finch-canary-pw";

/// One request as Finch's helper sends it (env headers included); the status and body.
fn ask(socket: &Path, target: &str) -> (u16, String) {
    let mut s = UnixStream::connect(socket).expect("connect to Finch's credential socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: unix\r\nUser-Agent: Go-http-client/1.1\r\n\
         X-Finch-Env-Aws_profile: prod\r\nX-Finch-Env-Host_docker_config: /Users/me/.docker\r\n\
         Accept-Encoding: gzip\r\n\r\n"
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

fn start(policy: &str) -> (Bridge, PathBuf) {
    let mut b = Bridge::new(AUTHS);
    let run_user = b.path("run-user-501");
    std::fs::create_dir(&run_user).unwrap();
    let socket = run_user.join("finch-creds.sock");
    b.guest_flags = vec!["--finch-creds-socket".into(), socket.display().to_string()];
    std::fs::write(b.host_config(), format!("[vm.itvm.policy]\n{policy}")).unwrap();
    b.start();
    assert!(wait_until(Duration::from_secs(10), || socket.exists()), "no socket");
    (b, socket)
}

#[test]
fn finchs_helper_protocol_is_answered_by_the_bridge_under_policy() {
    let (b, socket) = start("get = [\"registry.example:5000\", \"ghcr.io\"]\n");
    let (status, body) = ask(&socket, "/credentials?server=registry.example:5000");
    assert_eq!(status, 200, "{}", body.replace(SECRET, "<SECRET>"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ServerURL"], "registry.example:5000");
    assert_eq!(v["Username"], "alice");
    assert!(v["Secret"] == SECRET, "another secret");
    // Spelled as Finch's helper spells Docker Hub, unescaped; not stored: not found.
    assert_eq!(ask(&socket, "/credentials?server=https://index.docker.io/v1/").0, 403);
    assert_eq!(ask(&socket, "/credentials?server=ghcr.io").0, 404);
    assert_eq!(ask(&socket, "/credentials?server=").0, 400);
    assert_eq!(ask(&socket, "/other").0, 404);
    // The host's audit line names the request; the host saw no env header.
    let host = b.host_log();
    assert!(host.contains(r#"registry="registry.example:5000""#), "{host}");
    assert!(!host.contains("Aws_profile") && !host.contains("/Users/me"), "{host}");
    assert_no_secret(
        SECRET,
        &[("host log", &host), ("guest log", &b.guest.as_ref().unwrap().output())],
    );
}

#[test]
fn a_socket_that_replaces_finchs_is_removed_and_the_path_answered_again() {
    let (_b, socket) = start("");
    assert_eq!(ask(&socket, "/credentials?server=registry.example:5000").0, 200);
    // What Lima does for a reverse forward: remove the path, listen there.
    std::fs::remove_file(&socket).unwrap();
    let intruder = UnixListener::bind(&socket).unwrap();
    intruder.set_nonblocking(true).unwrap();
    let ours_again = wait_until(Duration::from_secs(10), || {
        UnixStream::connect(&socket).is_ok()
            && intruder.accept().is_err()
            && ask(&socket, "/credentials?server=registry.example:5000").0 == 200
    });
    assert!(ours_again, "the path was not taken back");
    assert!(intruder.accept().is_err(), "a client reached the intruder");
    // Only a socket is ever removed: a file there is left, and the agent keeps trying.
    let file = socket.with_extension("file");
    std::fs::write(&file, "not a socket").unwrap();
    std::fs::rename(&file, &socket).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "not a socket");
}

#[test]
fn a_head_that_never_ends_is_refused() {
    let (_b, socket) = start("");
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(
        format!("GET /credentials?server={} HTTP/1.1\r\n", "a".repeat(20_000)).as_bytes(),
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
}
