//! Who may talk to whom: disallowed uids on the helper socket, impostors on either end of the
//! link (no key, wrong key, replayed handshake bytes). None of them is served or sees a secret.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use finch_shared::codec;
use finch_shared::frame::{read_frame, write_frame};
use finch_shared::message::{Handshake, LINK_VERSIONS, LinkMsg, Request};
use finch_tests::{Bridge, STARTUP, wait_until};

const NOT_FOUND: &str = "credentials not found in native keychain\n";
const SECRET: &str = "auth-test-secret";
// u:auth-test-secret
const CONFIG: &str = r#"{"auths":{"reg.example":{"auth":"dTphdXRoLXRlc3Qtc2VjcmV0"}}}"#;

fn send(s: &mut UnixStream, msg: &Handshake) {
    write_frame(s, &codec::encode(msg).unwrap()).unwrap();
}

/// Everything the peer sends until it closes (bounded).
fn drain(s: &mut UnixStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    all
}

fn get_request(id: u64) -> LinkMsg {
    LinkMsg::Request { id, request: Request::Get { server: "reg.example".into() } }
}

#[test]
fn helper_calls_from_disallowed_uids_are_refused() {
    if !finch_tests::require_root("helper_calls_from_disallowed_uids_are_refused") {
        return;
    }
    let mut b = Bridge::new(CONFIG);
    // Other uids must be able to reach the socket to be refused by uid: open up the dir and
    // run a copy of the helper from it.
    std::fs::set_permissions(b.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let helper = b.path("docker-credential-finchhost");
    std::fs::copy(finch_tests::bin("docker-credential-finchhost"), &helper).unwrap();
    b.guest_flags = ["--socket-group", "nogroup", "--allow-uid", "4242"].map(String::from).to_vec();
    b.start();

    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(b.helper_socket()).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o660,
        "helper socket must not be world-writable"
    );
    assert_eq!(meta.gid(), 65534);

    let as_user = |uid: u32, gid: u32, action: &str, stdin: &str| {
        let mut cmd = std::process::Command::new(&helper);
        cmd.arg(action).env("FINCH_GUEST_AGENT_SOCKET", b.helper_socket()).uid(uid).gid(gid);
        finch_tests::run_with_input(cmd, stdin.as_bytes(), Duration::from_secs(30))
    };
    // In the socket's group but not allowed: refused by the agent's uid check.
    let r = as_user(4343, 65534, "get", "reg.example");
    assert_eq!((r.out(), r.code), (NOT_FOUND, 1));
    assert!(r.stderr.contains("uid 4343 may not use"), "{}", r.stderr);
    let r =
        as_user(4343, 65534, "store", r#"{"ServerURL":"reg.example","Username":"u","Secret":"x"}"#);
    assert_eq!(r.code, 1);
    assert!(r.out().contains("may not use"), "{}", r.out());
    // Not in the group: the socket's mode keeps it out.
    let r = as_user(4444, 4444, "get", "reg.example");
    assert_eq!((r.out(), r.code), (NOT_FOUND, 1));
    assert!(r.stderr.contains("cannot reach the guest agent"), "{}", r.stderr);
    // Allowed uid: served.
    let r = as_user(4242, 65534, "get", "reg.example");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.out().contains(SECRET));
    // The refused calls never reached the host.
    assert_eq!(b.host_log().matches("finch_audit").count(), 1, "{}", b.host_log());
}

/// An impostor guest: the test listens where the host agent dials.
fn impostor_guest(b: &mut Bridge) -> UnixListener {
    let path = b.path("impostor.sock");
    let listener = UnixListener::bind(&path).unwrap();
    b.host_dials = Some(path);
    b.start_host();
    listener
}

#[test]
fn impostor_guest_without_the_key_is_not_served() {
    let mut b = Bridge::new(CONFIG);
    let listener = impostor_guest(&mut b);

    // 1. Wrong key: answers the hello with a made-up proof, then asks anyway.
    let mut s = finch_tests::accept_within(&listener, STARTUP);
    let hello: Handshake = codec::decode(&read_frame(&mut s).unwrap()).unwrap();
    assert!(matches!(hello, Handshake::HostHello { .. }));
    send(
        &mut s,
        &Handshake::GuestHello {
            version: LINK_VERSIONS[0],
            boot_id: "fake".into(),
            nonce: [1; 32],
            proof: [2; 32],
        },
    );
    let _ = write_frame(&mut s, &codec::encode(&get_request(1)).unwrap());
    let got = drain(&mut s);
    let reject: Handshake = codec::decode(&got[4..]).unwrap();
    assert_eq!(reject, Handshake::Reject { reason: finch_shared::message::RejectReason::BadProof });

    // 2. No key at all: skips the handshake and sends a request straight away.
    let mut s = finch_tests::accept_within(&listener, STARTUP);
    let _ = read_frame(&mut s).unwrap();
    let _ = write_frame(&mut s, &codec::encode(&get_request(1)).unwrap());
    let got2 = drain(&mut s);

    // 3. Garbage and an oversized frame header.
    let mut s = finch_tests::accept_within(&listener, STARTUP);
    let _ = read_frame(&mut s).unwrap();
    let _ = s.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
    let got3 = drain(&mut s);

    for bytes in [&got, &got2, &got3] {
        assert!(!String::from_utf8_lossy(bytes).contains(SECRET));
    }
    // The host logs the refusal after closing the connection: wait for it.
    assert!(wait_until(STARTUP, || b.host_log().contains("not authenticated")), "{}", b.host_log());
    let log = b.host_log();
    assert!(!log.contains("finch_audit"), "an unauthenticated guest was served:\n{log}");
    assert!(!log.contains("link up"), "{log}");
}

#[test]
fn impostor_host_is_refused_and_sees_no_request() {
    let mut b = Bridge::new(CONFIG);
    b.start_guest();
    // An impostor host connects while a store (which carries a secret) is waiting for a link.
    let mut s = UnixStream::connect(b.link_socket()).unwrap();
    let cmd = b.helper_cmd("store");
    let store = std::thread::spawn(move || {
        let input = format!(r#"{{"ServerURL":"reg.example","Username":"u","Secret":"{SECRET}"}}"#);
        finch_tests::run_with_input(cmd, input.as_bytes(), Duration::from_secs(60))
    });
    let versions = LINK_VERSIONS.to_vec();
    send(&mut s, &Handshake::HostHello { versions, vm: "itvm".into(), nonce: [3; 32] });
    let answer: Handshake = codec::decode(&read_frame(&mut s).unwrap()).unwrap();
    let Handshake::GuestHello { proof, .. } = answer else { panic!("{answer:?}") };
    // Reflecting the guest's own proof back does not work either.
    send(&mut s, &Handshake::HostProof { proof });
    let rest = drain(&mut s);
    assert!(!String::from_utf8_lossy(&rest).contains(SECRET));
    let r = store.join().unwrap();
    assert_eq!(r.code, 1);
    assert!(r.out().contains("no link to the host agent"), "{}", r.out());

    // No handshake at all: a response frame, then garbage.
    let mut s = UnixStream::connect(b.link_socket()).unwrap();
    let _ = write_frame(&mut s, &codec::encode(&LinkMsg::Ping { seq: 1 }).unwrap());
    assert!(!String::from_utf8_lossy(&drain(&mut s)).contains(SECRET));
    assert!(b.guest_log().contains("link handshake failed"), "{}", b.guest_log());
    assert!(!b.guest_log().contains("host link up"));
}

/// Copies bytes both ways between the host agent and the guest agent, recording each side.
fn recording_proxy(listen: &Path, target: &Path) -> std::thread::JoinHandle<(Vec<u8>, Vec<u8>)> {
    let listener = UnixListener::bind(listen).unwrap();
    let target = target.to_owned();
    std::thread::spawn(move || {
        let host_side = finch_tests::accept_within(&listener, STARTUP);
        let guest_side = UnixStream::connect(&target).unwrap();
        let pump = |mut from: UnixStream, mut to: UnixStream| {
            std::thread::spawn(move || {
                from.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                let _ = to.shutdown(std::net::Shutdown::Both);
                seen
            })
        };
        let h2g = pump(host_side.try_clone().unwrap(), guest_side.try_clone().unwrap());
        let g2h = pump(guest_side, host_side);
        (h2g.join().unwrap(), g2h.join().unwrap())
    })
}

/// Splits recorded bytes into frames.
fn frames(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Ok(f) = read_frame(&mut bytes) {
        out.push(f.to_vec());
    }
    out
}

#[test]
fn replayed_handshakes_are_refused_both_ways() {
    let mut b = Bridge::new(CONFIG);
    b.start_guest();
    let proxy_path = b.path("proxy.sock");
    let proxy = recording_proxy(&proxy_path, &b.link_socket());
    b.host_dials = Some(proxy_path.clone());
    b.start_host();
    b.wait_link_up(1);
    // Record a real session, then stop the host (the proxy ends with it).
    let r = b.helper("get", "reg.example");
    assert_eq!(r.code, 0, "{r:?}");
    b.host.take().unwrap().kill();
    let (host_to_guest, guest_to_host) = proxy.join().unwrap();
    let host_frames = frames(&host_to_guest);
    let guest_frames = frames(&guest_to_host);
    assert!(host_frames.len() >= 2 && guest_frames.len() >= 2);

    // Replay the host's hello and proof to the guest: its fresh nonce makes the proof stale.
    let mut s = UnixStream::connect(b.link_socket()).unwrap();
    write_frame(&mut s, &host_frames[0]).unwrap();
    let _fresh_hello = read_frame(&mut s).unwrap();
    write_frame(&mut s, &host_frames[1]).unwrap();
    let _ = drain(&mut s);
    assert!(wait_until(Duration::from_secs(10), || b
        .guest_log()
        .contains("link handshake failed")));
    assert_eq!(b.guest_log().matches("host link up").count(), 1);

    // Replay the guest's hello (and its recorded traffic) to a new host: refused, nothing served.
    std::fs::remove_file(&proxy_path).unwrap();
    let listener = UnixListener::bind(&proxy_path).unwrap();
    let audits_before = b.host_log().matches("finch_audit").count();
    b.start_host();
    let mut s = finch_tests::accept_within(&listener, STARTUP);
    let _fresh_hello = read_frame(&mut s).unwrap();
    for f in &guest_frames {
        let _ = write_frame(&mut s, f);
    }
    let _ = write_frame(&mut s, &codec::encode(&get_request(99)).unwrap());
    let got = drain(&mut s);
    assert!(!String::from_utf8_lossy(&got).contains(SECRET));
    // The host logs the refusal after closing the connection: wait for it.
    assert!(
        wait_until(STARTUP, || b.host_log().matches("not authenticated").count() >= 1),
        "{}",
        b.host_log()
    );
    let log = b.host_log();
    assert_eq!(log.matches("finch_audit").count(), audits_before, "{log}");
}
