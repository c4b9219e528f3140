//! The boundary under attack, as a process in the VM would attack it: server names that
//! parse two ways, floods that grow maps and logs, stores that fill a shared file, callers
//! that hold the socket, a forged boot id, concurrent writers, a config file that blocks.
//! Each test covers a class of input, not one example.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use finch_shared::codec;
use finch_shared::frame::{read_frame, write_frame};
use finch_shared::message::{
    HELPER_VERSION, Handshake, HelperCall, HelperReply, Outcome, Request, Response, WireError,
};
use finch_tests::aws::FakeEcr;
use finch_tests::{Bridge, STARTUP, wait_until};

/// One call on the helper socket, as the helper makes it (the test runs as root: allowed).
fn call(socket: &Path, request: Request) -> Outcome {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let payload = codec::encode(&HelperCall { version: HELPER_VERSION, request }).unwrap();
    write_frame(&mut s, &payload).unwrap();
    let reply: HelperReply = codec::decode(&read_frame(&mut s).unwrap()).unwrap();
    reply.outcome
}

fn get(server: &str) -> Request {
    Request::Get { server: server.into() }
}

fn status(b: &Bridge) -> serde_json::Value {
    let (code, out, err) = b.host_cli(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn ecr_bridge(docker_config: &str, host_config: &str, fake: &FakeEcr) -> Bridge {
    ecr_bridge_with(docker_config, host_config, fake, &[])
}

/// [`ecr_bridge`] with more VMs ([`Bridge::more_vms`]).
fn ecr_bridge_with(
    docker_config: &str,
    host_config: &str,
    fake: &FakeEcr,
    more: &[&str],
) -> Bridge {
    let mut b = Bridge::new(docker_config);
    b.more_vms = more.iter().map(|v| (*v).to_owned()).collect();
    std::fs::write(b.host_config(), host_config).unwrap();
    b.host_env = vec![
        ("AWS_ENDPOINT_URL".into(), fake.url()),
        ("AWS_ACCESS_KEY_ID".into(), "AKIAFAKEFAKEFAKE".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "boundary-aws-secret-key".into()),
    ];
    b.start();
    b
}

/// Item 1: a server name the ECR parser and the policy once read differently. Every
/// spelling with something after the host that is not a port is refused before routing, so
/// no token is minted and the policy never sees a name it could misread.
#[test]
fn a_server_name_that_parses_two_ways_is_refused_before_routing() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeEcr::start(dir.path());
    let policy = "[vm.itvm.policy]\nget = [\"*.allowed.example\"]\n";
    let b = ecr_bridge("{}", policy, &fake);
    for server in [
        "123456789012.dkr.ecr.us-east-1.amazonaws.com:x.allowed.example",
        "public.ecr.aws:x.allowed.example",
        "https://123456789012.dkr.ecr.us-east-1.amazonaws.com:x.allowed.example/v2/",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com:443:x.allowed.example",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com@x.allowed.example",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com#x.allowed.example",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com%2fx.allowed.example",
    ] {
        match call(&b.helper_socket(), get(server)) {
            Err(WireError::BadRequest { reason }) => {
                assert!(reason.contains("server name"), "{server}: {reason}")
            }
            other => panic!("{server}: {other:?}"),
        }
    }
    // The policy still denies ECR itself, and allows what it names.
    let denied = call(&b.helper_socket(), get("123456789012.dkr.ecr.us-east-1.amazonaws.com"));
    assert!(matches!(denied, Err(WireError::Denied { .. })), "{denied:?}");
    assert_eq!(fake.calls(), (0, 0), "a token was minted for a refused name");
    assert!(matches!(call(&b.helper_socket(), get("r.allowed.example")), Err(WireError::NotFound)));
}

/// Item 2: every map keyed by what a guest sends stays within its bound: distinct made-up
/// regions are not ECR (no client set is built for them), and distinct real registries keep
/// at most the cache's bound of tokens.
#[test]
fn guest_chosen_regions_and_registries_do_not_grow_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeEcr::start(dir.path());
    fake.control(r#"{"password": "bound-{n}"}"#);
    let b = ecr_bridge("{}", "", &fake);
    let pid = b.host.as_ref().unwrap().pid();
    let socket = b.helper_socket();
    // Warm up the allocator and one client set.
    call(&socket, get("123456789012.dkr.ecr.us-west-2.amazonaws.com")).unwrap();
    let before = rss_kib(pid);
    for n in 0..2000 {
        let outcome =
            call(&socket, get(&format!("123456789012.dkr.ecr.xx-fake-{n}.amazonaws.com")));
        assert!(matches!(outcome, Err(WireError::NotFound)), "{outcome:?}");
    }
    let after_regions = rss_kib(pid);
    assert_eq!(fake.calls(), (1, 0), "a made-up region reached AWS");
    // 700 made-up accounts: AWS is asked at most the VM's budget of new tokens, and the cache
    // holds at most the VM's share (the cache's own bound of 512 is a unit test).
    let mut refused = 0;
    for n in 0..700u64 {
        let server = format!("{:012}.dkr.ecr.us-west-2.amazonaws.com", 100_000_000_000 + n);
        match call(&socket, get(&server)) {
            Ok(Response::Credential { .. }) => {}
            Err(WireError::Unavailable { reason }) if reason.contains("new ECR tokens") => {
                refused += 1
            }
            other => panic!("{other:?}"),
        }
    }
    let (calls, _) = fake.calls();
    println!("700 made-up ECR accounts from one VM: {calls} calls to AWS, {refused} refused");
    assert!(calls <= 1 + 32 + 1, "{calls} GetAuthorizationToken calls for one VM's flood");
    assert!(refused >= 700 - 33, "{refused}");
    let v = status(&b);
    let cached = v["cache_entries"].as_u64().unwrap();
    assert!(cached <= 64, "one VM holds {cached} tokens, over its share of 64");
    let after_registries = rss_kib(pid);
    println!(
        "host agent RSS: {before} KiB; after 2000 made-up regions {after_regions} KiB; after 700 registries {after_registries} KiB"
    );
    assert!(after_regions < before + 20 * 1024, "{before} -> {after_regions} KiB");
}

/// Item 3: what a guest may store is bounded in size and count, and the shared docker config
/// stays readable for every VM.
#[test]
fn stores_are_bounded_and_the_shared_file_stays_readable() {
    let mut b = Bridge::new("{}");
    b.start();
    let socket = b.helper_socket();
    let store = |server: &str, secret: String| {
        call(
            &socket,
            Request::Store {
                server: server.into(),
                username: "u".into(),
                secret: finch_shared::Secret::new(secret),
            },
        )
    };
    // Too large: refused, nothing written.
    for size in [16 * 1024 + 1, 62 * 1024] {
        let outcome = store("big.example", "s".repeat(size));
        assert!(matches!(outcome, Err(WireError::BadRequest { .. })), "{size}: {outcome:?}");
    }
    let long_user = call(
        &socket,
        Request::Store {
            server: "u.example".into(),
            username: "u".repeat(257),
            secret: finch_shared::Secret::new("x".into()),
        },
    );
    assert!(matches!(long_user, Err(WireError::BadRequest { .. })), "{long_user:?}");
    // The largest allowed secret, up to the VM's budget: 64 registries or 256 KiB.
    let mut stored = 0;
    let refusal = loop {
        match store(&format!("r{stored}.example"), "s".repeat(16 * 1024)) {
            Ok(Response::Done) => stored += 1,
            Err(e) => break e,
            other => panic!("{other:?}"),
        }
        assert!(stored <= 64, "no budget");
    };
    assert_eq!(refusal.class(), "denied", "{refusal}");
    assert!(refusal.to_string().contains("erase"), "{refusal}");
    assert!((10..=16).contains(&stored), "stored {stored} secrets of 16 KiB before the budget");
    // The file is readable and every stored entry is served; erasing frees budget.
    let config = std::fs::read(b.docker_config.join("config.json")).unwrap();
    assert!(config.len() < 4 * 1024 * 1024);
    let v: serde_json::Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(v["auths"].as_object().unwrap().len(), stored);
    assert!(matches!(call(&socket, get("r0.example")), Ok(Response::Credential { .. })));
    assert_eq!(call(&socket, Request::Erase { server: "r0.example".into() }), Ok(Response::Done));
    assert_eq!(store("after-erase.example", "s".into()), Ok(Response::Done));
    // Full again; the budget outlives a restart of the host agent.
    let mut n = 0;
    while store(&format!("refill{n}.example"), "s".repeat(16 * 1024)).is_ok() {
        n += 1;
        assert!(n < 64, "no budget");
    }
    b.host.as_mut().unwrap().kill();
    b.start_host();
    b.wait_link_up(2);
    let again = store("after-restart.example", "s".repeat(16 * 1024));
    assert_eq!(again.map_err(|e| e.class()), Err("denied"));
}

/// Item 5: input is validated before it is logged; a flood of rejected requests costs a few
/// lines, counted.
#[test]
fn a_flood_of_rejected_requests_barely_grows_the_log() {
    let mut b = Bridge::new("{}");
    b.start();
    let socket = b.helper_socket();
    let log = b.path("host.log");
    let before = std::fs::metadata(&log).unwrap().len();
    let huge = "x".repeat(60 * 1024 - 100);
    for n in 0..300 {
        let server = if n % 2 == 0 { huge.clone() } else { format!("{huge}:{n}") };
        let outcome = call(&socket, get(&server));
        assert!(matches!(outcome, Err(WireError::BadRequest { .. })), "{outcome:?}");
    }
    assert!(wait_until(STARTUP, || b.host_log().contains("finch_audit")));
    let grown = std::fs::metadata(&log).unwrap().len() - before;
    assert!(grown < 16 * 1024, "300 rejected 60 KB names grew the host log by {grown} bytes");
    assert!(!b.host_log().contains(&"x".repeat(1000)), "a rejected name was logged");
    // The next window's line counts what was held back.
    std::thread::sleep(Duration::from_secs(10));
    let _ = call(&socket, get(&huge));
    let counted = || {
        b.host_log().lines().any(|l| {
            l.split("suppressed=")
                .nth(1)
                .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit() && c != '0'))
        })
    };
    assert!(wait_until(STARTUP, counted), "{}", b.host_log());
}

/// A python client on the helper socket as `uid`: opens `count` connections, sends `what`
/// on each (`silent`: nothing) and prints, per connection, the reply's class or `none`.
fn socket_client(
    b: &Bridge,
    uid: u32,
    count: usize,
    what: Option<&HelperCall>,
    hold: Duration,
) -> std::process::Child {
    let payload = what.map(|c| {
        let body = codec::encode(c).unwrap();
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        framed.iter().map(|b| format!("{b:02x}")).collect::<String>()
    });
    let script = r#"
import socket, sys, time
path, count, payload, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
conns = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    if payload != "silent":
        s.sendall(bytes.fromhex(payload))
    conns.append(s)
print("connected", flush=True)
time.sleep(hold)
for s in conns:
    s.settimeout(0.5)
    try:
        data = s.recv(70000)
        print("reply" if data else "closed")
    except socket.timeout:
        print("none")
    except OSError:
        print("closed")
"#;
    use std::os::unix::process::CommandExt;
    Command::new("python3")
        .args(["-c", script])
        .arg(b.helper_socket())
        .arg(count.to_string())
        .arg(payload.as_deref().unwrap_or("silent"))
        .arg(format!("{}", hold.as_secs_f64()))
        .uid(uid)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap()
}

fn open_socket_to_group(b: &Bridge) {
    std::fs::set_permissions(b.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
}

/// Item 6: the peer is checked before a byte is read: a disallowed uid that sends nothing is
/// answered `denied` at once and holds nothing, and legitimate calls are not delayed.
#[test]
fn a_disallowed_uid_is_refused_before_it_sends_anything() {
    if !finch_tests::require_root("a_disallowed_uid_is_refused_before_it_sends_anything") {
        return;
    }
    let mut b = Bridge::new(r#"{"auths":{"reg.example":{"auth":"dTpw"}}}"#);
    b.guest_flags = ["--socket-group", "nogroup"].map(String::from).to_vec();
    b.start();
    open_socket_to_group(&b);
    let guest_pid = b.guest.as_ref().unwrap().pid();
    let before = rss_kib(guest_pid);
    let flood = socket_client(&b, 4343, 500, None, Duration::from_secs(1));
    let started = Instant::now();
    assert!(matches!(
        call(&b.helper_socket(), get("reg.example")),
        Ok(Response::Credential { .. })
    ));
    println!("legitimate get during the flood: {:?}", started.elapsed());
    let out = flood.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let replies = text.lines().filter(|l| *l == "reply").count();
    assert_eq!(replies, 500, "silent connections of a disallowed uid were not answered at once");
    let after = rss_kib(guest_pid);
    assert!(after < before + 8 * 1024, "guest agent RSS {before} -> {after} KiB");
    // Logged through the gate: a few lines, not 500.
    let lines = b.guest_log().matches("not allowed").count();
    assert!((1..=20).contains(&lines), "{lines} lines for 500 refusals");
}

/// Item 7: one user of the VM holding many slow calls leaves room for the others.
#[test]
fn one_uid_cannot_starve_the_others() {
    if !finch_tests::require_root("one_uid_cannot_starve_the_others") {
        return;
    }
    let mut b = Bridge::new(
        r#"{"credHelpers":{"slow.example":"slow"},"auths":{"reg.example":{"auth":"dTpw"}}}"#,
    );
    b.fake_helper("slow", "sleep 6; exit 1");
    b.guest_flags = ["--socket-group", "nogroup", "--allow-uid", "4242"].map(String::from).to_vec();
    b.host_flags = ["--helper-timeout-secs", "10"].map(String::from).to_vec();
    b.start();
    open_socket_to_group(&b);
    let slow = HelperCall { version: HELPER_VERSION, request: get("slow.example") };
    let mut flood = socket_client(&b, 4242, 250, Some(&slow), Duration::from_secs(3));
    let mut line = String::new();
    {
        use std::io::BufRead;
        let stdout = flood.stdout.as_mut().unwrap();
        std::io::BufReader::new(stdout).read_line(&mut line).unwrap();
    }
    assert_eq!(line.trim(), "connected");
    std::thread::sleep(Duration::from_millis(500));
    let outcome = call(&b.helper_socket(), get("reg.example"));
    assert!(
        matches!(outcome, Ok(Response::Credential { .. })),
        "another uid was starved: {outcome:?}"
    );
    let _ = flood.kill();
    let _ = flood.wait();
}

/// Item 8: `list` is bounded by bytes and says when it was cut; it shows one VM only what
/// it may see.
#[test]
fn a_long_list_is_cut_to_fit_and_says_so() {
    let mut auths = serde_json::Map::new();
    for n in 0..400 {
        let label = "a".repeat(63);
        let host = format!("{n:03}.{label}.{label}.{label}.example");
        auths.insert(host, serde_json::json!({"auth": "dTpw"}));
    }
    let config = serde_json::json!({ "auths": auths }).to_string();
    let mut b = Bridge::new(&config);
    b.start();
    let r = b.helper("list", "");
    assert_eq!(r.code, 0, "{} {}", r.out(), r.stderr);
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let shown = v.as_object().unwrap().len();
    assert!((100..400).contains(&shown), "{shown} entries");
    assert!(r.stderr.contains(&format!("{} more", 400 - shown)), "{}", r.stderr);
}

/// A bridge whose host agent dials a socket the test answers (a guest holding the key, run
/// by the test), with the key.
fn keyed_guest_bridge() -> (Bridge, std::os::unix::net::UnixListener, finch_shared::key::LinkKey) {
    let mut b = Bridge::new("{}");
    let path = b.path("keyed-guest.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    b.host_dials = Some(path);
    b.start_host();
    let key = finch_shared::key::LinkKey::load(&b.path("link.key")).unwrap();
    (b, listener, key)
}

/// Item 9: a boot id from a guest that holds the key cannot forge a log line.
#[test]
fn a_forged_boot_id_is_logged_escaped() {
    let (b, listener, key) = keyed_guest_bridge();
    let mut s = finch_tests::accept_within(&listener, STARTUP);
    let hello: Handshake = codec::decode(&read_frame(&mut s).unwrap()).unwrap();
    let forged = "b\nINFO finch_audit: vm=\"other\" op=\"get\" result=\"ok\"";
    let (guest, answer) =
        finch_shared::handshake::GuestHandshake::answer(key, forged, hello).unwrap();
    write_frame(&mut s, &codec::encode(&answer).unwrap()).unwrap();
    let proof: Handshake = codec::decode(&read_frame(&mut s).unwrap()).unwrap();
    guest.finish(proof).unwrap();
    assert!(wait_until(STARTUP, || b.host_log().contains("link up")), "{}", b.host_log());
    let log = b.host_log();
    assert!(log.lines().all(|l| !l.starts_with("INFO finch_audit")), "forged line:\n{log}");
    assert!(log.contains(r#"boot_id="b\nINFO"#), "{log}");
    drop(s);
}

/// Item 11: the docker config is read off the async runtime: a config file that blocks (a
/// FIFO nobody writes) holds requests for it, not the agent.
#[test]
fn a_blocking_config_file_does_not_stall_the_agent() {
    let mut b = Bridge::new("{}");
    b.start();
    let config = b.docker_config.join("config.json");
    std::fs::remove_file(&config).unwrap();
    nix::unistd::mkfifo(&config, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let socket = b.helper_socket();
    let stuck: Vec<_> = (0..8)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || call(&socket, get("reg.example")))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // The agent still answers its control socket and keeps the link (heartbeats every 500 ms).
    let v = status(&b);
    assert_eq!(v["vms"]["itvm"]["up"], true, "{v}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!b.guest_log().contains("no heartbeat"), "{}", b.guest_log());
    // Unblock the readers.
    let mut w = std::fs::OpenOptions::new().write(true).open(&config).unwrap();
    w.write_all(b"{}").unwrap();
    drop(w);
    for t in stuck {
        let _ = t.join();
    }
}

/// Item 13: with the link known to be down, calls are answered at once (`docker logout`
/// makes four `erase`s).
#[test]
fn calls_are_answered_at_once_when_the_link_is_known_down() {
    let mut b = Bridge::new("{}");
    b.start_guest();
    // Down longer than the link wait (3 s in the bridge).
    std::thread::sleep(Duration::from_millis(3200));
    // The answer says which path each call took: "down for a while" is given without
    // waiting; a call that waited the link wait out says "waited 3000 ms".
    for server in ["reg.example", "https://reg.example", "reg.example:443", "http://reg.example"] {
        let outcome = call(&b.helper_socket(), Request::Erase { server: server.into() });
        let at_once = matches!(&outcome, Err(WireError::Unavailable { reason }) if reason.contains("down for a while"));
        assert!(at_once, "erase waited for a link known down: {outcome:?}");
    }
}

/// Item 14: concurrent stores into the plaintext docker config: every success answered is
/// a write that lasts (erases too).
#[test]
fn concurrent_stores_and_erases_lose_nothing() {
    let mut b = Bridge::new(r#"{"proxies":{"keep":"me"}}"#);
    b.start();
    let socket = b.helper_socket();
    let run = |make: fn(usize) -> Request| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let socket = socket.clone();
                std::thread::spawn(move || {
                    (0..15)
                        .map(|i| call(&socket, make(t * 15 + i)))
                        .filter(|o| *o == Ok(Response::Done))
                        .count()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum::<usize>()
    };
    let stored = run(|n| Request::Store {
        server: format!("r{n}.example"),
        username: "u".into(),
        secret: finch_shared::Secret::new(format!("p{n}")),
    });
    let auths = |b: &Bridge| {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(b.docker_config.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(v["proxies"]["keep"], "me");
        v["auths"].as_object().map(|m| m.len()).unwrap_or(0)
    };
    assert_eq!(stored, 60);
    assert_eq!(auths(&b), 60, "answered success but the write did not last");
    let erased = run(|n| Request::Erase { server: format!("r{n}.example") });
    assert_eq!(erased, 60);
    assert_eq!(auths(&b), 0);
}

/// Item 4: at `RUST_LOG=trace`, for every target, no token, secret or key reaches a log:
/// native ECR (the SDK logs whole responses at trace), the native keychain, a host helper and
/// the plaintext `auths`, each read and written through the bridge.
#[test]
fn nothing_secret_reaches_a_log_at_trace() {
    use finch_tests::keyring::{TOOLS, start_keyring};
    if !finch_tests::require("nothing_secret_reaches_a_log_at_trace", TOOLS) {
        return;
    }
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeEcr::start(dir.path());
    fake.control(r#"{"password": "trace-ecr-token-{n}"}"#);
    let docker_config = serde_json::json!({
        "credsStore": "secretservice",
        "credHelpers": {"helper.example": "tracehelper", "plain.example": "", "plain2.example": ""},
        "auths": {"plain.example": {"auth": b64("u:trace-plain-secret")}},
    });
    let mut b = Bridge::new(&docker_config.to_string());
    let keyring = start_keyring(b.dir.path());
    b.fake_helper(
        "tracehelper",
        r#"[ "$1" = get ] && { cat >/dev/null; echo '{"Username":"h","Secret":"trace-helper-secret"}'; exit 0; }; cat >/dev/null; exit 0"#,
    );
    b.host_env = keyring.env.clone();
    b.host_env.extend([
        ("RUST_LOG".into(), "trace".into()),
        ("AWS_ENDPOINT_URL".into(), fake.url()),
        ("AWS_ACCESS_KEY_ID".into(), "AKIAFAKEFAKEFAKE".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "trace-aws-secret-key".into()),
    ]);
    b.guest_env = vec![("RUST_LOG".into(), "trace".into())];
    b.start();
    let socket = b.helper_socket();
    let store = |server: &str, secret: &str| {
        let outcome = call(
            &socket,
            Request::Store {
                server: server.into(),
                username: "u".into(),
                secret: finch_shared::Secret::new(secret.into()),
            },
        );
        assert_eq!(outcome, Ok(Response::Done), "store {server}");
    };
    let got = |server: &str| match call(&socket, get(server)) {
        Ok(Response::Credential { secret, .. }) => secret.expose().to_owned(),
        other => panic!("get {server}: {other:?}"),
    };
    store("kc.example", "trace-keychain-secret");
    assert_eq!(got("kc.example"), "trace-keychain-secret");
    assert_eq!(got("helper.example"), "trace-helper-secret");
    assert_eq!(got("plain.example"), "trace-plain-secret");
    store("plain2.example", "trace-plain-stored");
    assert_eq!(got("plain2.example"), "trace-plain-stored");
    assert_eq!(got("123456789012.dkr.ecr.us-west-2.amazonaws.com"), "trace-ecr-token-1");
    assert_eq!(got("public.ecr.aws"), "trace-ecr-token-2");
    assert!(matches!(call(&socket, Request::List), Ok(Response::List { .. })));
    // Trace was in force in both agents (so the cap is what keeps the token out, not a
    // quieter level).
    let host = b.host_log();
    assert!(host.contains("library events capped"), "the host agent was not at trace:\n{host}");
    let secrets = [
        "trace-keychain-secret",
        "trace-helper-secret",
        "trace-plain-secret",
        "trace-plain-stored",
        "trace-ecr-token",
        "trace-aws-secret-key",
    ];
    let mut forms: Vec<String> = secrets.iter().map(|s| (*s).to_owned()).collect();
    forms.extend(
        ["AWS:trace-ecr-token-1", "AWS:trace-ecr-token-2", "u:trace-plain-secret"].map(b64),
    );
    let logs = [("host", host), ("guest", b.guest_log())];
    for (name, log) in &logs {
        for form in &forms {
            assert!(!log.contains(form.as_str()), "{form} is in the {name} log");
        }
    }
}

/// Idle connections to a `tcp://` link port (any process in the VM can open them) neither
/// pile up in the guest agent nor keep the host out: the oldest pending handshakes make room.
#[test]
fn idle_link_connections_do_not_keep_the_host_out() {
    let mut b = Bridge::new(r#"{"auths":{"reg.example":{"auth":"dTpw"}}}"#);
    let port = finch_tests::free_port();
    b.tcp_link = Some(port);
    b.start_guest();
    let idle: Vec<_> =
        (0..200).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    b.start_host();
    b.wait_link_up(1);
    assert!(matches!(
        call(&b.helper_socket(), get("reg.example")),
        Ok(Response::Credential { .. })
    ));
    let evicted = b.guest_log().matches("newer connections took its place").count();
    assert!((1..=20).contains(&evicted), "{evicted} eviction lines for 200 idle connections");
    drop(idle);
}

/// Runs `churn` on `socket` as `uid` for `secs` while timing a legitimate `get` every 250 ms;
/// returns the connects churn made and the calls' latencies.
fn churn_while_calling(b: &Bridge, socket: &Path, uid: u32, secs: u64) -> (u64, Vec<Duration>) {
    use std::os::unix::process::CommandExt;
    let churn = Command::new(finch_tests::bin("churn"))
        .arg(socket)
        .arg(secs.to_string())
        .uid(uid)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} as uid {uid} ({e}): every directory above it must let other users in (chmod a+rx the target directory)",
                finch_tests::bin("churn").display()
            )
        });
    let until = Instant::now() + Duration::from_secs(secs);
    let mut latencies = Vec::new();
    while Instant::now() < until {
        let started = Instant::now();
        let outcome = call(&b.helper_socket(), get("reg.example"));
        latencies.push(started.elapsed());
        assert!(matches!(outcome, Ok(Response::Credential { .. })), "{outcome:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = churn.wait_with_output().unwrap();
    let connects = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    latencies.sort();
    (connects, latencies)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Round 2, item 1: connections opened and closed as fast as a process can, for 30 s, on
/// the helper socket by a uid that may not use it, and on the link socket by the uid that may
/// connect there (Lima's login user): the guest agent keeps nothing per connection (RSS
/// within 32 MiB of where it was, a handful of descriptors) and every legitimate call made
/// meanwhile is answered (their latencies are printed for the record, not bounded).
#[test]
fn connection_churn_grows_nothing_in_the_guest_agent() {
    if !finch_tests::require_root("connection_churn_grows_nothing_in_the_guest_agent") {
        return;
    }
    let mut b = Bridge::new(r#"{"auths":{"reg.example":{"auth":"dTpw"}}}"#);
    b.guest_flags =
        ["--socket-group", "nogroup", "--link-allow-uid", "4345"].map(String::from).to_vec();
    b.start();
    open_socket_to_group(&b);
    let guest_pid = b.guest.as_ref().unwrap().pid();
    let _ = call(&b.helper_socket(), get("reg.example"));
    for (what, socket, uid) in
        [("helper socket", b.helper_socket(), 4344), ("link socket", b.link_socket(), 4345)]
    {
        let before = rss_kib(guest_pid);
        let (connects, latencies) = churn_while_calling(&b, &socket, uid, 30);
        let after = rss_kib(guest_pid);
        let fds = open_fds(guest_pid);
        let median = latencies[latencies.len() / 2];
        println!(
            "{what}: {connects} connects in 30 s; guest RSS {before} -> {after} KiB, {fds} fds; \
             legitimate get median {median:?}, worst {:?} ({} calls)",
            latencies[latencies.len() - 1],
            latencies.len()
        );
        assert!(connects > 100_000, "{what}: the churn made only {connects} connects");
        assert!(after <= before + 32 * 1024, "{what}: guest agent RSS {before} -> {after} KiB");
        assert!(fds < 64, "{what}: the guest agent holds {fds} descriptors after the churn");
    }
    // The link survived the churn on its own socket, and the refusals were gated.
    assert!(matches!(
        call(&b.helper_socket(), get("reg.example")),
        Ok(Response::Credential { .. })
    ));
    let lines = b.guest_log().matches("not allowed").count();
    assert!(lines <= 40, "{lines} log lines for the refusals");
}

/// Round 2, item 2: one VM storing and erasing the same registries at the same moment
/// cannot place more in the shared docker config than its budget lets it hold, and the
/// file stays usable for the other VMs, also after the host user's own `docker login`.
#[test]
fn a_store_erase_race_cannot_beat_the_budget() {
    let mut b = Bridge::new("{}");
    b.more_vms = vec!["vm2".into()];
    b.start();
    let socket = b.helper_socket();
    let store = |socket: &Path, server: &str| {
        call(
            socket,
            Request::Store {
                server: server.into(),
                username: "u".into(),
                secret: finch_shared::Secret::new("s".repeat(1000)),
            },
        )
    };
    let rounds = 300;
    std::thread::scope(|s| {
        for lane in 0..4 {
            let socket = &socket;
            s.spawn(move || {
                for n in (lane..rounds).step_by(4) {
                    let _ = store(socket, &format!("r{n}.example"));
                }
            });
            s.spawn(move || {
                for n in (lane..rounds).step_by(4) {
                    let _ = call(socket, Request::Erase { server: format!("r{n}.example") });
                }
            });
        }
    });
    let config = b.docker_config.join("config.json");
    let entries = |path: &Path| -> usize {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        v["auths"].as_object().map_or(0, serde_json::Map::len)
    };
    let placed = entries(&config);
    let ledger: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.state_dir().join("stores.json")).unwrap()).unwrap();
    let counted = ledger["itvm"].as_object().map_or(0, serde_json::Map::len);
    println!(
        "after {rounds} racing store/erase pairs: {placed} entries in the file, {counted} in the ledger"
    );
    assert!(placed <= 64, "one VM placed {placed} entries; its budget is 64 registries");
    assert_eq!(placed, counted, "the file and the ledger disagree");
    // The host user logs in with a large token: every VM still reads the file, and another
    // VM can still store.
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    let token = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("me:{}", "t".repeat(3000)),
    );
    v["auths"]["host-login.example"] = serde_json::json!({ "auth": token });
    std::fs::write(&config, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let vm2 = b.helper_socket_of("vm2");
    assert!(matches!(call(&vm2, get("host-login.example")), Ok(Response::Credential { .. })));
    assert_eq!(store(&vm2, "vm2.example"), Ok(Response::Done));
    assert!(matches!(call(&socket, get("vm2.example")), Ok(Response::Credential { .. })));
}

/// A Lima home laid out as plain Lima lays it out (`~/.lima`), with the guest binaries the
/// agent puts in bundles, and an agent config serving it.
struct LimaHome {
    t: tempfile::TempDir,
}

impl LimaHome {
    fn new() -> LimaHome {
        let t = tempfile::tempdir().unwrap();
        let guest = t.path().join("guest/linux-x86_64");
        std::fs::create_dir_all(&guest).unwrap();
        for b in ["finch-guest-agent", "docker-credential-finchhost"] {
            std::fs::write(guest.join(b), b).unwrap();
        }
        std::fs::create_dir_all(t.path().join("home/.lima/_config")).unwrap();
        LimaHome { t }
    }

    fn lima(&self) -> std::path::PathBuf {
        self.t.path().join("home/.lima")
    }

    fn instance(&self, name: &str, yaml: &str) -> std::path::PathBuf {
        let dir = self.lima().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("lima.yaml"), yaml).unwrap();
        dir
    }

    fn config(&self, instances: &str, extra: &str) {
        let text = format!(
            "key_store = \"file\"\n{extra}\n[lima]\nhome = {:?}\ninstances = {instances}\nguest_dir = {:?}\n",
            self.lima().display().to_string(),
            self.t.path().join("guest").display().to_string(),
        );
        std::fs::write(self.t.path().join("host-agent.toml"), text).unwrap();
    }

    fn state(&self) -> std::path::PathBuf {
        self.t.path().join("state")
    }

    fn keys(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.state().join("vms"))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    fn agent(&self, log: &str) -> finch_tests::Proc {
        let mut run = Command::new(finch_tests::bin("finch-host-agent"));
        run.args(["run", "--config"])
            .arg(self.t.path().join("host-agent.toml"))
            .arg("--state-dir")
            .arg(self.state())
            .env("HOME", self.t.path().join("home"))
            .env_remove("LIMA_HOME")
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env("RUST_LOG", "info");
        let agent = finch_tests::Proc::spawn("host", run, &self.t.path().join(log));
        assert!(
            wait_until(STARTUP, || agent.output().contains("host agent ready")),
            "the agent did not start:\n{}",
            agent.output()
        );
        agent
    }
}

/// Round 2, item 3: with `instances = ["*"]` and a Lima home a VM can write (plain Lima's
/// `~/.lima` under a writable `~` mount), a directory made from inside the VM is not adopted:
/// no bundle, no key, no link; and that holds after the VM hides its mount.
#[test]
fn lima_discovery_adopts_nothing_from_a_home_a_vm_can_write() {
    let h = LimaHome::new();
    let real = h.instance("real", "mounts:\n- location: \"~\"\n  writable: true\n");
    let fake = h.instance("fake", "");
    h.config("[\"*\"]", "");
    let agent = h.agent("host1.log");
    assert!(
        wait_until(STARTUP, || agent.output().contains("adopts no instance")),
        "{}",
        agent.output()
    );
    let out = agent.output();
    assert!(out.contains("VM real mounts") && out.contains(".lima"), "{out}");
    drop(agent);
    for dir in [&real, &fake] {
        assert!(!dir.join("finch-bridge").exists(), "a bundle was written in {}", dir.display());
    }
    assert!(h.keys().iter().all(|k| !k.ends_with(".key")), "keys were made: {:?}", h.keys());
    // The VM rewrites its lima.yaml to hide the mount it still has: the marker remembers.
    std::fs::write(real.join("lima.yaml"), "").unwrap();
    let agent = h.agent("host2.log");
    assert!(
        wait_until(STARTUP, || agent.output().contains("adopts no instance")),
        "{}",
        agent.output()
    );
    drop(agent);
    assert!(!fake.join("finch-bridge").exists() && h.keys().is_empty(), "{:?}", h.keys());
}

/// Round 2, item 3: an instance named in `instances` is found among any number of other
/// entries; a bundle directory that is a link is replaced, never written through; a
/// `[vm.NAME]` policy for an instance not there yet does not stop the agent; and the keys of
/// instances that are gone are removed.
#[test]
fn lima_discovery_holds_against_junk_links_and_churn() {
    let h = LimaHome::new();
    let finch = h.instance("finch", "arch: x86_64\n");
    for i in 0..12_000 {
        if i % 2 == 0 {
            std::fs::write(h.lima().join(format!("junk{i:05}")), "").unwrap();
        } else {
            h.instance(&format!("aaa{i:05}"), "");
        }
    }
    let outside = h.t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, finch.join("finch-bridge")).unwrap();
    h.config("[\"finch\", \"later\"]", "[vm.later.policy]\nget = [\"reg.example\"]\n");
    let agent = h.agent("host1.log");
    let bundle = finch.join("finch-bridge");
    assert!(
        wait_until(STARTUP, || bundle.join("SHA256SUMS").exists()),
        "the named instance was not served:\n{}",
        agent.output()
    );
    assert!(std::fs::symlink_metadata(&bundle).unwrap().is_dir(), "the link was kept");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "written through the link");
    assert_eq!(h.keys(), ["finch.key", "finch.lima"]);
    drop(agent);
    // Every instance: names come and go, their keys with them.
    for i in 0..12_000 {
        let _ = std::fs::remove_file(h.lima().join(format!("junk{i:05}")));
        let _ = std::fs::remove_dir_all(h.lima().join(format!("aaa{i:05}")));
    }
    for i in 0..5 {
        h.instance(&format!("vm{i}"), "");
    }
    h.config("[\"*\"]", "");
    let agent = h.agent("host2.log");
    let six = || h.keys().iter().filter(|k| k.ends_with(".key")).count() == 6;
    assert!(wait_until(STARTUP, six), "{:?}\n{}", h.keys(), agent.output());
    for i in 0..4 {
        std::fs::remove_dir_all(h.lima().join(format!("vm{i}"))).unwrap();
    }
    let left = || h.keys() == ["finch.key", "finch.lima", "vm4.key", "vm4.lima"];
    assert!(wait_until(Duration::from_secs(20), left), "{:?}\n{}", h.keys(), agent.output());
}

/// What a process on the link's path does with the frames it relays.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Relay {
    /// Passes every frame on.
    Forward,
    /// Flips one bit of the next frame from the guest.
    Alter,
    /// Drops the guest and sends its own plaintext request on the host's stream.
    Hijack,
}

/// A relay between the host agent and the guest's link socket, frame by frame, that keeps
/// every byte it sees (both directions) and acts as `mode` says on frames after the
/// handshake (the first three).
fn start_relay(
    listener: std::os::unix::net::UnixListener,
    guest: std::path::PathBuf,
    mode: std::sync::Arc<std::sync::Mutex<Relay>>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    std::thread::spawn(move || {
        for host in listener.incoming() {
            let Ok(host) = host else { continue };
            let Ok(guest) = UnixStream::connect(&guest) else { continue };
            let pipe = |mut from: UnixStream, mut to: UnixStream, from_guest: bool| {
                let (mode, seen) = (mode.clone(), seen.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    while let Ok(frame) = read_frame(&mut from) {
                        n += 1;
                        seen.lock().unwrap().extend_from_slice(&frame);
                        let mut frame = frame.to_vec();
                        let now = *mode.lock().unwrap();
                        if from_guest && n > 1 && now == Relay::Alter {
                            frame[0] ^= 1;
                            *mode.lock().unwrap() = Relay::Forward;
                        }
                        if from_guest && n > 1 && now == Relay::Hijack {
                            let _ = from.shutdown(std::net::Shutdown::Both);
                            let request = finch_shared::message::LinkMsg::Request {
                                id: 1,
                                request: get("reg.example"),
                            };
                            frame = codec::encode(&request).unwrap().to_vec();
                        }
                        if write_frame(&mut to, &frame).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            };
            pipe(guest.try_clone().unwrap(), host.try_clone().unwrap(), true);
            pipe(host, guest, false);
        }
    });
}

/// Round 2, the link: every frame after the handshake is sealed. A relay on the link's path
/// sees no secret, no user and no registry name; a frame it alters closes the link; and
/// requests it makes up on the host's authenticated stream are never answered.
#[test]
fn a_relay_on_the_link_sees_nothing_and_changes_nothing() {
    use std::sync::{Arc, Mutex};
    let secret = "relay-sees-this-secret";
    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("relay-user:{secret}"),
    );
    let mut b = Bridge::new(&format!(r#"{{"auths":{{"reg.example":{{"auth":"{auth}"}}}}}}"#));
    let relay_path = b.path("relay.sock");
    let listener = std::os::unix::net::UnixListener::bind(&relay_path).unwrap();
    b.host_dials = Some(relay_path);
    let mode = Arc::new(Mutex::new(Relay::Forward));
    let seen = Arc::new(Mutex::new(Vec::new()));
    b.start_guest();
    start_relay(listener, b.link_socket(), mode.clone(), seen.clone());
    b.start_host();
    b.wait_link_up(1);
    for _ in 0..3 {
        let got = call(&b.helper_socket(), get("reg.example"));
        assert!(matches!(&got, Ok(Response::Credential { .. })), "{got:?}");
    }
    let _ = call(&b.helper_socket(), Request::List);
    let relayed = seen.lock().unwrap().clone();
    assert!(relayed.len() > 200, "the relay saw {} bytes", relayed.len());
    for plain in [secret, "relay-user", "reg.example", auth.as_str()] {
        assert!(
            !relayed.windows(plain.len()).any(|w| w == plain.as_bytes()),
            "the relay read {plain:?}"
        );
    }
    // One bit flipped in a frame from the guest: the host closes the link.
    *mode.lock().unwrap() = Relay::Alter;
    let forged = || b.host_log().matches("failed authentication").count();
    assert!(wait_until(STARTUP, || forged() >= 1), "{}", b.host_log());
    b.wait_link_up(2);
    // The relay drops the guest and asks the host itself: no answer, the link closes.
    seen.lock().unwrap().clear();
    *mode.lock().unwrap() = Relay::Hijack;
    let _ = call(&b.helper_socket(), get("reg.example"));
    assert!(wait_until(STARTUP, || forged() >= 2), "{}", b.host_log());
    let relayed = seen.lock().unwrap().clone();
    assert!(!relayed.windows(secret.len()).any(|w| w == secret.as_bytes()), "answered");
    assert!(!b.host_log().contains(secret) && !b.guest_log().contains(secret));
}

/// Round 2, degraded: a VM naming many ECR accounts costs AWS its budget of calls and no more,
/// and pushes no other VM's token out of the cache; the other VM's own budget is untouched.
#[test]
fn an_ecr_name_flood_costs_aws_a_budget_and_spares_other_vms() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeEcr::start(dir.path());
    fake.control(r#"{"password": "share-{n}"}"#);
    let b = ecr_bridge_with("{}", "", &fake, &["vm2"]);
    let vm2 = b.helper_socket_of("vm2");
    let theirs = "210987654321.dkr.ecr.us-west-2.amazonaws.com";
    assert!(matches!(call(&vm2, get(theirs)), Ok(Response::Credential { .. })));
    let before = fake.calls().0;
    let socket = b.helper_socket();
    for n in 0..300u64 {
        let server = format!("{:012}.dkr.ecr.us-east-1.amazonaws.com", 300_000_000_000 + n);
        let _ = call(&socket, get(&server));
    }
    let flood = fake.calls().0 - before;
    println!("300 ECR accounts from one VM: {flood} calls to AWS");
    assert!(flood <= 32, "{flood} calls for one VM's flood");
    // The other VM's token is still cached (no call), and its own budget is whole.
    assert!(matches!(call(&vm2, get(theirs)), Ok(Response::Credential { .. })));
    assert_eq!(fake.calls().0, before + flood, "the other VM's token was pushed out");
    let fresh = "210987654322.dkr.ecr.us-west-2.amazonaws.com";
    assert!(matches!(call(&vm2, get(fresh)), Ok(Response::Credential { .. })));
}

/// Round 2, degraded: a host agent that stops answering (frozen with SIGSTOP) holds no call
/// for long: the first call is answered `unavailable` by the stall probe (2 s, not after
/// three missed 5 s heartbeats, nor at the request deadline), the next ones at once by the
/// stalled link, with one warning, and calls work again once it runs.
#[test]
fn a_stalled_host_agent_holds_no_call() {
    use nix::sys::signal::Signal;
    let mut b = Bridge::new(r#"{"auths":{"reg.example":{"auth":"dTpw"}}}"#);
    b.heartbeat_ms = 5000;
    b.start();
    assert!(matches!(
        call(&b.helper_socket(), get("reg.example")),
        Ok(Response::Credential { .. })
    ));
    std::thread::sleep(Duration::from_millis(1200));
    b.host.as_ref().unwrap().signal(Signal::SIGSTOP);
    // Which answer a call gets says which path it took: the stall answer ("has not
    // answered for 2 s") comes from the probe, sent with the first call after a second of
    // silence, and is given at once to every later call until the host speaks again; a call
    // held until the request deadline gets "did not answer within" instead. No clock here:
    // the durations are printed for the record only.
    let stalled = |outcome: &Result<Response, WireError>| matches!(outcome, Err(WireError::Unavailable { reason }) if reason.contains("has not answered for"));
    let timed = |request: Request| {
        let started = Instant::now();
        let outcome = call(&b.helper_socket(), request);
        (outcome, started.elapsed())
    };
    // `docker logout` of another registry: the host does the erase once it runs again.
    let (first, took) = timed(Request::Erase { server: "other.example".into() });
    println!("first call to a stopped host agent: {took:?}: {first:?}");
    assert!(stalled(&first), "the first call was not answered by the stall probe: {first:?}");
    for _ in 0..4 {
        let (next, took) = timed(Request::Erase { server: "other.example".into() });
        println!("a later call: {took:?}");
        assert!(stalled(&next), "a call on a stalled link was not answered at once: {next:?}");
    }
    let warned = b.guest_log().matches("the host agent is not answering").count();
    assert_eq!(warned, 1, "one stall, one warning: {}", b.guest_log());
    b.host.as_ref().unwrap().signal(Signal::SIGCONT);
    let again =
        || matches!(call(&b.helper_socket(), get("reg.example")), Ok(Response::Credential { .. }));
    assert!(wait_until(Duration::from_secs(20), again), "{}", b.guest_log());
}

/// Round 2, degraded: a guest holding the key that answers every link with a bad frame is
/// relinked with a growing delay (up to the reconnect cap), not ten times a second.
#[test]
fn bad_frames_slow_the_relinks_down() {
    let (_b, listener, key) = keyed_guest_bridge();
    let started = Instant::now();
    let mut links = 0;
    listener.set_nonblocking(true).unwrap();
    while started.elapsed() < Duration::from_secs(6) {
        let Ok((mut s, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        s.set_nonblocking(false).unwrap();
        let hello: Handshake = codec::decode(&read_frame(&mut s).unwrap()).unwrap();
        let (guest, answer) =
            finch_shared::handshake::GuestHandshake::answer(key.clone(), "b", hello).unwrap();
        write_frame(&mut s, &codec::encode(&answer).unwrap()).unwrap();
        let proof: Handshake = codec::decode(&read_frame(&mut s).unwrap()).unwrap();
        guest.finish(proof).unwrap();
        let _ = write_frame(&mut s, b"not a sealed frame");
        links += 1;
    }
    println!("links in 6 s to a guest sending bad frames: {links}");
    assert!(links >= 3, "the host stopped relinking: {links}");
    assert!(links <= 16, "{links} relinks in 6 s: no backoff");
}

/// Round 2, degraded: a VM's flood of allowed requests that are not found grows the host's
/// log at a bounded rate (audit lines per VM per window, then a count), and the guest's too.
#[test]
fn a_flood_of_allowed_requests_barely_grows_the_logs() {
    let mut b = Bridge::new("{}");
    b.start();
    let (host_log, guest_log) = (b.path("host.log"), b.path("guest.log"));
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    let (host_before, guest_before) = (size(&host_log), size(&guest_log));
    let socket = b.helper_socket();
    std::thread::scope(|s| {
        for t in 0..4 {
            let socket = &socket;
            s.spawn(move || {
                for n in 0..500 {
                    let outcome = call(socket, get(&format!("r{t}-{n}.example")));
                    assert_eq!(outcome, Err(WireError::NotFound));
                }
            });
        }
    });
    let (host_grew, guest_grew) = (size(&host_log) - host_before, size(&guest_log) - guest_before);
    println!("2000 not-found gets: host log +{host_grew} B, guest log +{guest_grew} B");
    // Debug logging is on in the bridge; the audit lines are what grows with requests.
    let audit = b.host_log().matches("finch_audit").count();
    assert!(audit <= 2 * 60 + 10, "{audit} audit lines for 2000 requests");
    assert!(b.host_log().contains("suppressed="), "no count of the lines held back");
    let failed = b.guest_log().matches("helper call failed").count();
    assert!(failed <= 40, "{failed} guest lines for 2000 failed calls");
}

/// Round 2, degraded: one VM flooding the host (not-found requests, or a registry routed to
/// a host helper) does not put another VM's `get` behind its queue: each VM starts at most
/// 100 requests a second after a burst of 200, and runs at most 2 host helpers. Counted, not
/// timed: while one of the other VM's gets is in flight, a get queued behind the flood would
/// see every flood call ahead of it finish first (one per flooding thread); it sees almost
/// none. The medians are printed for the record; `benches/` measures speed.
#[test]
fn one_vms_flood_leaves_another_vms_gets_quick() {
    let mut b = Bridge::new(
        r#"{"credHelpers":{"slow.example":"slow","fast.example":"fast"},"auths":{"reg.example":{"auth":"dTpw"}}}"#,
    );
    b.fake_helper("slow", "sleep 0.2; exit 1");
    b.fake_helper("fast", r#"read -r _; echo '{"Username":"u","Secret":"s"}'"#);
    b.more_vms = vec!["vm2".into()];
    b.start();
    let (flooder, other) = (b.helper_socket(), b.helper_socket_of("vm2"));
    // Helper processes the host agent started (children of a helper's shell do not count).
    let host_pid = b.host.as_ref().unwrap().pid().to_string();
    let helpers = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
                let ppid = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1));
                ppid == Some(host_pid.as_str())
                    && std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                        String::from_utf8_lossy(&c).contains("docker-credential-slow")
                    })
            })
            .count()
    };
    // The flood is switched on and off, a get of each kind timed in every phase: whatever else
    // the machine does meets both sets alike.
    let finished = std::sync::atomic::AtomicUsize::new(0);
    // A get of the other VM: how long it took, and how many flood calls finished meanwhile.
    let timed = |server: &str| {
        let (started, before) = (Instant::now(), finished.load(Ordering::SeqCst));
        let outcome = call(&other, get(server));
        assert!(matches!(outcome, Ok(Response::Credential { .. })), "{outcome:?}");
        (started.elapsed(), finished.load(Ordering::SeqCst) - before)
    };
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    use std::sync::atomic::{AtomicBool, Ordering};
    for (what, flood_server, threads) in
        [("not-found", None, 32), ("host helper", Some("slow.example"), 16)]
    {
        let (stop, flooding) = (AtomicBool::new(false), AtomicBool::new(false));
        let mut peak_helpers = 0;
        let (mut quiet, mut flooded) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
        let mut overtaken = Vec::new();
        std::thread::scope(|s| {
            for t in 0..threads {
                let (flooder, stop, flooding, finished) = (&flooder, &stop, &flooding, &finished);
                s.spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if !flooding.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                        let server =
                            flood_server.map_or_else(|| format!("f{t}-{n}.example"), str::to_owned);
                        let _ = call(flooder, get(&server));
                        finished.fetch_add(1, Ordering::SeqCst);
                        n += 1;
                    }
                });
            }
            for round in 0..30 {
                let on = round % 2 == 1;
                flooding.store(on, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(300));
                if !on {
                    // The flood's last calls drain before a quiet sample.
                    assert!(wait_until(Duration::from_secs(10), || helpers() == 0));
                }
                let sample = (timed("reg.example"), timed("fast.example"));
                let into = if on { &mut flooded } else { &mut quiet };
                into.0.push(sample.0.0);
                into.1.push(sample.1.0);
                if on {
                    overtaken.push(sample.0.1);
                    overtaken.push(sample.1.1);
                    peak_helpers = peak_helpers.max(helpers());
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        let (quiet, flooded) =
            ((median(quiet.0), median(quiet.1)), (median(flooded.0), median(flooded.1)));
        overtaken.sort();
        let overtaken = overtaken[overtaken.len() / 2];
        println!(
            "{what} flood from one VM: the other VM's get median {:?} -> {:?} (auths), {:?} -> {:?} (host helper); median flood calls finished during one of its gets {overtaken} (behind the flood: {threads}); {peak_helpers} flood helpers running",
            quiet.0, flooded.0, quiet.1, flooded.1
        );
        // Behind the flood's queue, every one of the `threads` calls ahead would finish first.
        assert!(
            overtaken < threads / 2,
            "{what}: {overtaken} flood calls finished during the other VM's median get: it waited behind the flood"
        );
        assert!(peak_helpers <= 2, "{peak_helpers} helper processes for one VM");
        if flood_server.is_some() {
            assert!(peak_helpers >= 1, "the helper flood ran no helper");
        }
    }
}
