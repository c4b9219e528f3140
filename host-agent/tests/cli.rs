//! The host agent's command line: every refusal at start names what is wrong.
// Mode bits and unix sockets: the Windows command line is run under Wine by
// tests/tests/wine.rs instead.
#![cfg(unix)]
// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

fn run_fails(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_finch-host-agent"))
        .arg("run")
        .args(args)
        .arg("--state-dir")
        .arg(dir.path())
        .arg("--docker-config")
        .arg(dir.path())
        .env("HOME", dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_vm_specs_and_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("host-agent.toml");
    std::fs::write(&config, "[vm.a]\nendpoint = \"unix:///a\"\npolicy = 3\n").unwrap();
    let err = run_fails(&["--config", config.to_str().unwrap()]);
    assert!(err.contains("host-agent.toml:3:10: key `vm.a.policy`: invalid type"), "{err}");
    let err = run_fails(&["--config", "/nonexistent/host-agent.toml"]);
    assert!(err.contains("cannot read config file /nonexistent/host-agent.toml"), "{err}");
    assert!(run_fails(&["--vm", "noendpoint"]).contains("NAME=ENDPOINT"));
    assert!(run_fails(&["--vm", "../x=unix:///x"]).contains("VM name"));
    assert!(run_fails(&["--vm", "a=ftp://1.2.3.4:1"]).contains("unsupported endpoint"));
    assert!(run_fails(&["--vm", "a=tcp://1.2.3.4"]).contains("expected tcp://HOST:PORT"));
    assert!(run_fails(&["--vm", "a=unix:///x", "--vm", "a=unix:///y"]).contains("given twice"));
    let err = run_fails(&["--vm", "a=unix:///x,key=/nonexistent/key"]);
    assert!(err.contains("cannot read link key file /nonexistent/key"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, [1u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = run_fails(&["--vm", &format!("a=unix:///x,key={}", key.display())]);
    assert!(err.contains("is open to other users (mode 0644): run chmod 600"), "{err}");
}

#[test]
fn a_state_dir_others_can_enter_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_finch-host-agent"))
        .args(["run", "--vm", "a=unix:///x", "--state-dir"])
        .arg(&state)
        .env("HOME", dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is open to other users (mode 0755): run chmod 700 "), "{err}");
}
