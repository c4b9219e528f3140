//! The link under stress: drops and reconnects, a host agent killed mid-request, slow and
//! hung host helpers. Every helper call must answer within its bounded wait.

use std::time::Duration;

use finch_tests::{Bridge, STARTUP, free_port, wait_until};

const NOT_FOUND: &str = "credentials not found in native keychain\n";
const CONFIG: &str = r#"{"auths":{"reg.example":{"auth":"dTpsaW5rLXNlY3JldA=="}}}"#; // u:link-secret

fn assert_found(b: &Bridge) {
    let r = b.helper("get", "reg.example");
    assert_eq!(r.code, 0, "{r:?}\n--- guest\n{}\n--- host\n{}", b.guest_log(), b.host_log());
    assert!(r.out().contains("\"Secret\":\"link-secret\""));
}

#[test]
fn link_drops_and_comes_back() {
    let mut b = Bridge::new(CONFIG);
    b.start();
    assert_found(&b);

    // The guest agent dies and comes back: the host redials.
    b.guest.take().unwrap().kill();
    b.start_guest();
    b.wait_link_up(2);
    assert_found(&b);

    // The host agent dies: get answers not-found with the reason, within the link wait.
    b.host.take().unwrap().kill();
    assert!(wait_until(STARTUP, || b.guest_log().contains("host link down")));
    let r = b.helper("get", "reg.example");
    assert_eq!((r.out(), r.code), (NOT_FOUND, 1));
    assert!(r.stderr.contains("no link to the host agent"), "{}", r.stderr);
    assert!(r.took < Duration::from_secs(15), "took {:?}", r.took);
    // store fails clearly.
    let r = b.helper("store", r#"{"ServerURL":"x.example","Username":"u","Secret":"p"}"#);
    assert_eq!(r.code, 1);
    assert!(r.out().contains("no link to the host agent"), "{}", r.out());

    // It comes back: the next get succeeds.
    b.start_host();
    b.wait_link_up(3);
    assert_found(&b);

    // SIGTERM: clean shutdown, sockets removed.
    let mut guest = b.guest.take().unwrap();
    guest.signal(nix::sys::signal::Signal::SIGTERM);
    let status = guest.wait_exit(Duration::from_secs(20)).expect("guest agent exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(!b.helper_socket().exists() && !b.link_socket().exists());
    let mut host = b.host.take().unwrap();
    host.signal(nix::sys::signal::Signal::SIGINT);
    assert!(host.wait_exit(Duration::from_secs(20)).expect("host agent exits on SIGINT").success());
}

#[test]
fn a_tcp_link_answers_and_comes_back_and_an_impostor_gets_nothing() {
    let mut b = Bridge::new(CONFIG);
    b.tcp_link = Some(free_port());
    b.start();
    assert_found(&b);
    let (_, status, _) = b.host_cli(&["status"]);
    assert!(status.contains("link up") && status.contains("endpoint tcp://127.0.0.1:"), "{status}");

    // The guest agent restarts on the same port: the host redials it.
    b.guest.take().unwrap().kill();
    b.start_guest();
    b.wait_link_up(2);
    assert_found(&b);

    // Anyone on loopback can reach the port: without the key a client gets no link, and the
    // real one stays up.
    let mut rogue = std::net::TcpStream::connect(("127.0.0.1", b.tcp_link.unwrap())).unwrap();
    rogue.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    use std::io::{Read, Write};
    let _ = rogue.write_all(&[0, 0, 0, 4, 1, 2, 3, 4]);
    let mut buf = [0u8; 64];
    let n = rogue.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "a peer without the key was answered: {:?}", &buf[..n]);
    assert_found(&b);
    assert_eq!(b.guest_log().matches("host link up").count(), 2, "{}", b.guest_log());
}

#[test]
fn host_killed_while_a_request_is_in_flight() {
    let mut b = Bridge::new(r#"{"credsStore":"slow"}"#);
    let marker = b.path("slow.pid");
    b.fake_helper("slow", &format!("echo $$ > {}; exec sleep 30", marker.display()));
    b.start();
    let cmd = b.helper_cmd("get");
    let call = std::thread::spawn(move || {
        finch_tests::run_with_input(cmd, b"reg.example", Duration::from_secs(60))
    });
    assert!(
        wait_until(Duration::from_secs(20), || marker.exists()),
        "the host helper never started"
    );
    b.host.take().unwrap().kill();
    let r = call.join().unwrap();
    assert_eq!((r.out(), r.code), (NOT_FOUND, 1));
    assert!(r.stderr.contains("lost"), "{}", r.stderr);
    assert!(r.took < Duration::from_secs(20), "took {:?}", r.took);
    // The orphaned helper is not the bridge's to clean up, but the test's.
    if let Some(pid) =
        std::fs::read_to_string(&marker).ok().and_then(|p| p.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[test]
fn slow_helper_answers_and_hung_helper_is_stopped() {
    let mut b = Bridge::new(r#"{"credHelpers":{"slow.example":"slow","hung.example":"hung"}}"#);
    b.host_flags = vec!["--helper-timeout-secs".into(), "2".into()];
    b.fake_helper(
        "slow",
        r#"sleep 0.5; echo '{"ServerURL":"slow.example","Username":"u","Secret":"slow-secret"}'"#,
    );
    let marker = b.path("hung.pid");
    // The hung helper also starts a child that would outlive a plain kill.
    b.fake_helper("hung", &format!("sleep 300 & echo $! > {}; wait", marker.display()));
    b.start();

    let r = b.helper("get", "slow.example");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.out().contains("slow-secret"));

    let r = b.helper("get", "hung.example");
    assert_eq!((r.out(), r.code), (NOT_FOUND, 1));
    assert!(r.stderr.contains("did not finish within 2 s"), "{}", r.stderr);
    assert!(r.took < Duration::from_secs(20), "took {:?}", r.took);
    // The whole process group of the hung helper was stopped.
    let child: i32 = std::fs::read_to_string(&marker).unwrap().trim().parse().unwrap();
    let gone = wait_until(Duration::from_secs(10), || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), None).is_err()
    });
    assert!(gone, "the hung helper's child {child} is still running");

    let r = b.helper("store", r#"{"ServerURL":"hung.example","Username":"u","Secret":"p"}"#);
    assert_eq!(r.code, 1);
    assert!(r.out().contains("did not finish"), "{}", r.out());
    finch_tests::assert_no_secret(
        "slow-secret",
        &[("host log", &b.host_log()), ("guest log", &b.guest_log())],
    );
}

#[test]
fn heartbeat_detects_a_silent_host() {
    let mut b = Bridge::new(CONFIG);
    b.start();
    assert_found(&b);
    // A frozen host keeps the socket open but says nothing: the guest's heartbeat (500 ms in
    // tests, three misses) declares the link dead.
    let host = b.host.as_ref().unwrap();
    host.signal(nix::sys::signal::Signal::SIGSTOP);
    let dead = wait_until(STARTUP, || b.guest_log().contains("no heartbeat"));
    let log = b.guest_log();
    host.signal(nix::sys::signal::Signal::SIGCONT);
    assert!(dead, "the guest never noticed the silent host:\n{log}");
    // Thawed, the host notices the closed link, redials, and is served again.
    b.wait_link_up(2);
    assert_found(&b);
}
