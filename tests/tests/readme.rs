//! The README's first command: `scripts/local-bridge` starts both agents linked on this
//! machine, and `docker-credential-finchhost get` answers through them; `--bin-dir` runs it
//! from binaries that are already built (an unpacked release), without cargo.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use finch_tests::{Proc, STARTUP, run_with_input, wait_until};

/// The most a cold build of the workspace may take (CI's whole run is bounded at 90 min).
const BUILD: Duration = Duration::from_secs(45 * 60);

/// Runs `scripts/local-bridge ARGS`, waits until it says it starts the agents, and checks
/// the whole README path: the printed exports, a `get`, Ctrl-C. Returns the script's output.
fn local_bridge_answers_get(args: &[&str]) -> String {
    local_bridge_answers_get_and(args, &[], |_| {})
}

/// [`local_bridge_answers_get`] with `env` set, running `more` (given the script's output)
/// while the bridge is up.
fn local_bridge_answers_get_and(
    args: &[&str],
    env: &[(&str, String)],
    more: impl FnOnce(&str),
) -> String {
    let dir = tempfile::Builder::new().prefix("finch-readme-").tempdir().unwrap();
    let run = dir.path().join("bridge");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/local-bridge");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).args(args).env("FINCH_BRIDGE_DIR", &run);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let mut bridge = Proc::spawn("local-bridge", cmd, &dir.path().join("bridge.log"));
    // How long a build takes depends on how warm the cache is (CI builds the binaries before
    // the tests; a newcomer's first run compiles everything), so that wait is bounded only by
    // CI's own limit while the script runs; the agents then have the usual startup bound.
    let started = wait_until(BUILD, || {
        bridge.output().contains("local-bridge: starting the agents from") || bridge.exited()
    });
    assert!(
        started && !bridge.exited(),
        "the local bridge did not build (or stopped):\n{}",
        bridge.output()
    );
    let socket = run.join("helper.sock");
    let up =
        wait_until(STARTUP * 3, || socket.exists() && bridge.output().contains("host link up"));
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

    more(&bridge.output());

    // Ctrl-C (SIGINT to the script) stops both agents, which remove their sockets.
    bridge.signal(nix::sys::signal::Signal::SIGINT);
    assert!(bridge.wait_exit(STARTUP).is_some(), "the script did not stop");
    assert!(wait_until(STARTUP, || !socket.exists() && !run.join("link.sock").exists()));
    bridge.output()
}

#[test]
fn local_bridge_script_answers_get() {
    let out = local_bridge_answers_get(&[]);
    // A first run on a cold machine must not look hung.
    assert!(out.contains("local-bridge: building the bridge (debug;"), "{out}");
}

#[test]
fn local_bridge_runs_from_a_bin_dir_without_building() {
    let bins = finch_tests::bin_dir();
    let out = local_bridge_answers_get(&["--bin-dir", bins.to_str().unwrap()]);
    assert!(!out.contains("building"), "{out}");
    assert!(out.contains(&format!("starting the agents from {}", bins.display())), "{out}");
}

#[test]
fn local_bridge_refuses_a_bin_dir_without_the_binaries() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/local-bridge"))
        .args(["--bin-dir", empty.path().to_str().unwrap()])
        .env("FINCH_BRIDGE_DIR", empty.path().join("run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("finch-guest-agent is missing"), "{err}");
    assert!(!empty.path().join("run").exists(), "it started nothing");
}

/// `--scoped`: the registry front runs beside the helper socket, and the host's demo policy
/// grants pulls of Docker Hub's official images only: the push the printed `curl` asks for
/// is refused by the host, as printed. (The pull's token needs Docker Hub, which CI cannot
/// reach; `tests/tests/front.rs` gets real tokens from a local registry.)
#[test]
fn local_bridge_scoped_runs_the_registry_front_under_the_demo_policy() {
    let bins = finch_tests::bin_dir();
    let port = finch_tests::free_port();
    let args = ["--scoped", "--bin-dir", bins.to_str().unwrap()];
    local_bridge_answers_get_and(&args, &[("FINCH_FRONT_PORT", port.to_string())], |out| {
        let push = format!(
            "'https://127.0.0.1:{port}/token/docker.io?scope=repository:library/alpine:push'"
        );
        // The command as printed: TLS with the front's client certificate.
        let line = out
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("curl -s --cacert ") && l.ends_with(&push))
            .unwrap_or_else(|| panic!("no push curl printed: {out}"));
        let answer = Command::new("sh")
            .arg("-c")
            .arg(format!("{line} -w '\\n%{{http_code}}'"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&answer.stdout);
        assert!(text.ends_with("\n403"), "{text}");
        assert!(text.contains("\"DENIED\"") && text.contains("grants no token"), "{text}");
    });
}
