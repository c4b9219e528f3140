//! The guest binaries' command lines: refusals at start, and the helper with no agent.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_finch-guest-agent"))
}

fn key_file(dir: &std::path::Path, len: usize, mode: u32) -> std::path::PathBuf {
    let path = dir.join(format!("key-{len}-{mode:o}"));
    std::fs::write(&path, vec![9u8; len]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn serve_fails(dir: &std::path::Path, key: &std::path::Path, link: &str) -> String {
    let out = agent()
        .arg("serve")
        .arg("--helper-socket")
        .arg(dir.join("h.sock"))
        .args(["--link-listen", link])
        .arg("--link-key-file")
        .arg(key)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn unsafe_keys_and_bad_endpoints_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let link = format!("unix://{}/l.sock", dir.path().display());
    let err = serve_fails(dir.path(), &key_file(dir.path(), 32, 0o640), &link);
    assert!(err.contains("is open to other users (mode 0640): run chmod 600"), "{err}");
    let err = serve_fails(dir.path(), &key_file(dir.path(), 16, 0o600), &link);
    assert!(err.contains("needs 32"), "{err}");
    let err = serve_fails(dir.path(), &dir.path().join("missing"), &link);
    assert!(err.contains("cannot read link key file"), "{err}");
    let err = serve_fails(dir.path(), &key_file(dir.path(), 32, 0o600), "ftp://127.0.0.1:1");
    assert!(err.contains("unsupported endpoint"), "{err}");
    let err = serve_fails(dir.path(), &key_file(dir.path(), 32, 0o600), "tcp://0.0.0.0:1");
    assert!(err.contains("pass --link-listen-non-loopback to mean it"), "{err}");
    // Nothing was left behind.
    assert!(!dir.path().join("h.sock").exists());
}

#[test]
fn helper_without_an_agent_answers_within_bounds() {
    let run = |action: &str, stdin: &[u8]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_docker-credential-finchhost"))
            .arg(action)
            .env("FINCH_GUEST_AGENT_SOCKET", "/nonexistent/finch/helper.sock")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        // `list` does not read stdin: a broken pipe is fine.
        let _ = child.stdin.take().unwrap().write_all(stdin);
        child.wait_with_output().unwrap()
    };
    let out = run("get", b"registry.example");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(out.stdout, b"credentials not found in native keychain\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the guest agent at /nonexistent/finch/helper.sock"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
    let out = run("store", br#"{"ServerURL":"r","Username":"u","Secret":"s"}"#);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cannot reach the guest agent"));
    let out = run("list", b"unused");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_second_agent_does_not_steal_live_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), 32, 0o600);
    let link = format!("unix://{}/l.sock", dir.path().display());
    let mut first = agent()
        .arg("serve")
        .arg("--helper-socket")
        .arg(dir.path().join("h.sock"))
        .args(["--link-listen", &link])
        .arg("--link-key-file")
        .arg(&key)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sock = dir.path().join("h.sock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !(sock.exists() && dir.path().join("l.sock").exists()) {
        assert!(std::time::Instant::now() < deadline, "first agent did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let err = serve_fails(dir.path(), &key, &link);
    let _ = first.kill();
    let _ = first.wait();
    assert!(err.contains("is in use"), "{err}");
}
