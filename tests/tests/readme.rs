//! The README's first command: `scripts/local-bridge` starts both agents linked on this
//! machine, and `docker-credential-finchhost get` answers through them.

use std::process::Command;
use std::time::Duration;

use finch_tests::{Proc, STARTUP, run_with_input, wait_until};

#[test]
fn local_bridge_script_answers_get() {
    let dir = tempfile::Builder::new().prefix("finch-readme-").tempdir().unwrap();
    let run = dir.path().join("bridge");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/local-bridge");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).env("FINCH_BRIDGE_DIR", &run);
    let mut bridge = Proc::spawn("local-bridge", cmd, &dir.path().join("bridge.log"));
    // The script builds first (a no-op after `cargo test` built everything), then starts both.
    let socket = run.join("helper.sock");
    let up =
        wait_until(STARTUP * 6, || socket.exists() && bridge.output().contains("host link up"));
    assert!(up, "the local bridge did not come up:\n{}", bridge.output());

    let mut get = Command::new(finch_tests::bin("docker-credential-finchhost"));
    get.arg("get").env("FINCH_GUEST_AGENT_SOCKET", &socket);
    let r = run_with_input(get, b"registry.example", Duration::from_secs(30));
    assert_eq!(
        (r.out(), r.code),
        (
            "{\"ServerURL\":\"registry.example\",\"Username\":\"demo\",\"Secret\":\"demo-secret\"}\n",
            0
        ),
        "{}",
        bridge.output()
    );
    // The printed instructions are the ones that work.
    assert!(
        bridge.output().contains(&format!("FINCH_GUEST_AGENT_SOCKET=\"{}\"", socket.display()))
    );

    // Ctrl-C (SIGINT to the script) stops both agents, which remove their sockets.
    bridge.signal(nix::sys::signal::Signal::SIGINT);
    assert!(bridge.wait_exit(STARTUP).is_some(), "the script did not stop");
    assert!(wait_until(STARTUP, || !socket.exists() && !run.join("link.sock").exists()));
}
