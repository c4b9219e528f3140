//! The host config file through the whole chain: per-VM policy for every operation and
//! pattern kind, reloads (command, SIGHUP, file change, a bad file) that keep the link, the
//! control socket's `status`, and `doctor` on a working and on a broken setup.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use finch_tests::{Bridge, STARTUP, bin, wait_until};

/// base64("user:pw-<host>") entries for each host.
fn auths(hosts: &[&str]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for (i, host) in hosts.iter().enumerate() {
        let token = base64_encode(format!("user{i}:pw-{host}").as_bytes());
        let _ = write!(out, "{}\"{host}\":{{\"auth\":\"{token}\"}}", if i == 0 { "" } else { "," });
    }
    format!("{{\"auths\":{{{out}}}}}")
}

fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

const HOSTS: &[&str] = &["allowed.test", "denied.test", "a.corp.test", "corp.test", "other.test"];

fn policy_bridge(policy: &str) -> Bridge {
    let mut b = Bridge::new(&auths(HOSTS));
    std::fs::write(b.host_config(), format!("[vm.itvm.policy]\n{policy}")).unwrap();
    b.start();
    b
}

fn denied(b: &Bridge, action: &str, input: &str, op: &str, registry: &str) {
    let r = b.helper(action, input);
    assert_ne!(r.code, 0, "{action} {input} was allowed");
    let said = format!("{}{}", r.out(), r.stderr);
    let want = format!(
        "denied by the host: the host's policy for VM itvm does not allow {op} for {registry}"
    );
    assert!(said.contains(&want), "{action} {input}: {said}");
}

#[test]
fn policy_allows_and_denies_each_operation_by_pattern() {
    let b = policy_bridge(
        "get = [\"allowed.test\", \"*.corp.test\"]\nstore = [\"allowed.test\"]\nerase = [\"allowed.test\"]\nlist = [\"*.corp.test\"]\n",
    );
    // get: exact, suffix (not the apex), any spelling.
    assert_eq!(b.helper("get", "allowed.test").code, 0);
    assert_eq!(b.helper("get", "https://allowed.test/v2/").code, 0);
    denied(&b, "get", "https://DENIED.test:443/v2/", "get", "denied.test:443");
    assert_eq!(b.helper("get", "a.corp.test").code, 0);
    denied(&b, "get", "corp.test", "get", "corp.test");
    let r = b.helper("get", "denied.test");
    assert_eq!(
        r.out(),
        "credentials not found in native keychain\n",
        "a denied get must look like not-found"
    );
    assert!(r.stderr.contains("does not allow get for denied.test"), "{}", r.stderr);
    // store and erase.
    let store =
        |host: &str| format!(r#"{{"ServerURL":"{host}","Username":"u","Secret":"new-pw"}}"#);
    assert_eq!(b.helper("store", &store("allowed.test")).code, 0);
    denied(&b, "store", &store("denied.test"), "store", "denied.test");
    denied(&b, "store", &store("a.corp.test"), "store", "a.corp.test");
    denied(&b, "erase", "denied.test", "erase", "denied.test");
    assert_eq!(b.helper("erase", "allowed.test").code, 0);
    // list: only what its rule covers.
    let r = b.helper("list", "");
    let listed: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(listed, serde_json::json!({"a.corp.test": "user2"}), "{}", r.out());
    // Every denial is audited as such.
    let log = b.host_log();
    assert_eq!(log.matches("result=\"denied\"").count(), 6, "{log}");
    // The denied store changed nothing on the host.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.docker_config.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["auths"]["denied.test"]["auth"], base64_encode(b"user1:pw-denied.test"));
}

#[test]
fn an_empty_list_rule_refuses_list() {
    let b = policy_bridge("list = []\n");
    let r = b.helper("list", "");
    assert_ne!(r.code, 0);
    let said = format!("{}{}", r.out(), r.stderr);
    assert!(said.contains("the host's policy for VM itvm does not allow list"), "{said}");
    assert_eq!(b.helper("get", "other.test").code, 0, "get keeps its default");
}

fn set_policy(b: &Bridge, get: &str) {
    // Write then rename, so the poller never sees a half-written file.
    let tmp = b.path("host-agent.toml.new");
    std::fs::write(&tmp, format!("[vm.itvm.policy]\nget = {get}\n")).unwrap();
    std::fs::rename(&tmp, b.host_config()).unwrap();
}

fn allowed(b: &Bridge, host: &str) -> bool {
    b.helper("get", host).code == 0
}

#[test]
fn reloads_keep_the_link_and_a_bad_file_keeps_the_old_config() {
    let b = policy_bridge("get = [\"allowed.test\"]\n");
    assert!(allowed(&b, "allowed.test") && !allowed(&b, "other.test"));

    // `finch-host-agent reload`.
    set_policy(&b, "[\"other.test\"]");
    let (code, out, err) = b.host_cli(&["reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("config reloaded: 1 links kept, 0 started, 0 stopped"), "{out}");
    assert!(allowed(&b, "other.test") && !allowed(&b, "allowed.test"));

    // A bad file: the reload fails naming file, line and key; the old policy stays.
    std::fs::write(
        b.host_config(),
        "[vm.itvm.policy]\nget = [\"other.test\"]\nstore = [\"https://bad/\"]\n",
    )
    .unwrap();
    let (code, out, err) = b.host_cli(&["reload"]);
    assert_ne!(code, 0);
    assert!(err.contains("host-agent.toml:3:10: key `vm.itvm.policy.store`"), "{out}{err}");
    assert!(err.contains("the previous config stays in force"), "{err}");
    assert!(allowed(&b, "other.test") && !allowed(&b, "allowed.test"));
    let (code, out, _) = b.host_cli(&["status"]);
    assert_eq!(code, 0, "status must work while the file is broken");
    assert!(out.contains("config error:") && out.contains("vm.itvm.policy.store"), "{out}");

    // SIGHUP.
    set_policy(&b, "[\"allowed.test\"]");
    b.host.as_ref().unwrap().signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(20), || allowed(&b, "allowed.test")),
        "{}",
        b.host_log()
    );

    // The file changing on its own (polled every 2 s).
    set_policy(&b, "[\"denied.test\"]");
    assert!(wait_until(Duration::from_secs(20), || allowed(&b, "denied.test")), "{}", b.host_log());
    assert!(!allowed(&b, "allowed.test"));

    // One link the whole time.
    assert_eq!(b.guest_log().matches("host link up").count(), 1, "{}", b.guest_log());
}

#[test]
fn status_over_a_private_control_socket_and_one_agent_per_state_dir() {
    let b = policy_bridge("get = [\"*\"]\n");
    assert!(allowed(&b, "other.test"));
    let state = b.state_dir();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("control.sock")), 0o600);

    let (code, out, err) = b.host_cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("finch-host-agent: running (pid"), "{out}");
    assert!(out.contains("vm itvm: link up for"), "{out}");
    let (code, out, _) = b.host_cli(&["status", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["vms"]["itvm"]["up"], true);
    assert!(v["vms"]["itvm"]["requests"].as_u64().unwrap() >= 1);
    assert_eq!(v["pid"].as_u64().unwrap(), b.host.as_ref().unwrap().pid() as u64);

    let out = Command::new(bin("finch-host-agent"))
        .args(["run", "--vm", "itvm=unix:///nonexistent.sock", "--state-dir"])
        .arg(&state)
        .arg("--config")
        .arg(b.host_config())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another finch-host-agent is running with the state directory"), "{err}");
    // The first agent was not disturbed.
    assert!(allowed(&b, "other.test"));
}

#[test]
fn status_shows_a_link_error_with_its_time_only_until_the_link_comes_up() {
    let mut b = Bridge::new(&auths(HOSTS));
    // The host first: its VM is not listening yet, so every dial fails.
    b.start_host();
    let status_text = |b: &Bridge| b.host_cli(&["status"]).1;
    assert!(
        wait_until(STARTUP, || status_text(&b).contains("link down")
            && status_text(&b).contains("  last error (")),
        "{}",
        status_text(&b)
    );
    let (_, json, _) = b.host_cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let vm = &v["vms"]["itvm"];
    assert!(vm["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{json}");
    assert!(vm["last_error_at"].as_u64().is_some_and(|at| at >= vm["since"].as_u64().unwrap()));

    // The guest comes up: the error from before is no longer news.
    b.start_guest();
    b.wait_link_up(1);
    assert!(wait_until(STARTUP, || status_text(&b).contains("vm itvm: link up")));
    let text = status_text(&b);
    assert!(!text.contains("last error"), "{text}");
    let (_, json, _) = b.host_cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["vms"]["itvm"]["last_error"].is_null(), "{json}");
}

#[test]
fn doctor_passes_on_a_working_bridge_without_taking_the_link() {
    let mut b = Bridge::new(r#"{"auths":{},"credHelpers":{"h.test":"fakeok"}}"#);
    b.fake_helper("fakeok", "echo '{}'");
    b.start();
    let (code, out, err) = b.host_cli(&["doctor", "--vm", &b.vm_arg()]);
    assert_eq!(code, 0, "doctor failed:\n{out}{err}");
    for want in [
        "OK   config:",
        "OK   docker config:",
        "OK   helper fakeok: docker-credential-fakeok found",
        "OK   state dir:",
        "OK   vm itvm endpoint:",
        "OK   agent: running",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(!out.contains("FAIL"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(b.helper("get", "nothing.test").stderr.is_empty(), "the link was disturbed");
    assert_eq!(b.guest_log().matches("host link up").count(), 1);
}

#[test]
fn doctor_names_each_failure_with_a_fix_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let docker = dir.path().join("docker");
    std::fs::create_dir(&docker).unwrap();
    std::fs::write(docker.join("config.json"), r#"{"credsStore":"nosuchhelper"}"#).unwrap();
    let config = dir.path().join("host-agent.toml");
    std::fs::write(&config, "[vm.broken]\nendpoint = \"unix:///nonexistent/link.sock\"\n").unwrap();
    let doctor = |config: &std::path::Path| {
        Command::new(bin("finch-host-agent"))
            .arg("doctor")
            .arg("--config")
            .arg(config)
            .arg("--state-dir")
            .arg(&state)
            .arg("--docker-config")
            .arg(&docker)
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = doctor(&config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for want in [
        "FAIL helper nosuchhelper: docker-credential-nosuchhelper was not found",
        "FAIL state dir:",
        "FAIL vm broken key:",
        "FAIL vm broken endpoint:",
        "FAIL agent:",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let fails = text.matches("\nFAIL ").count() + usize::from(text.starts_with("FAIL "));
    assert_eq!(fails, 5, "{text}");
    assert_eq!(text.matches("     fix: ").count(), 5, "every FAIL has a fix:\n{text}");
    assert!(!state.join("vms").exists(), "doctor created a key");

    // An unparsable config file is one FAIL naming the line and the key.
    std::fs::write(&config, "[vm.broken]\nendpoint = 5\n").unwrap();
    let out = doctor(&config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(text.starts_with("FAIL config: "), "{text}");
    assert!(text.contains("host-agent.toml:2:12: key `vm.broken.endpoint`"), "{text}");
}
