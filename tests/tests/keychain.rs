//! The native Secret Service source against a real gnome-keyring in a private D-Bus session,
//! checked both ways against Debian's docker-credential-secretservice: what either stores,
//! the other reads, lists and erases. Plus what the reference gets wrong (a new username
//! adds a second item), a locked keyring, and no session bus at all; and the VM link keys
//! kept in the keyring.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use finch_tests::keyring::{Keyring, TOOLS, secretservice, start_keyring};
use finch_tests::{Bridge, HelperRun, assert_no_secret, run_ok};

fn bridge_with_keyring(test: &str) -> Option<(Bridge, Keyring)> {
    if !finch_tests::require(test, TOOLS) {
        return None;
    }
    let mut b = Bridge::new(r#"{"credsStore":"secretservice"}"#);
    let keyring = start_keyring(b.dir.path());
    b.host_env = keyring.env.clone();
    b.start();
    Some((b, keyring))
}

fn store_json(server: &str, user: &str, secret: &str) -> String {
    format!(r#"{{"ServerURL":"{server}","Username":"{user}","Secret":"{secret}"}}"#)
}

fn credential(run: &HelperRun) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(&run.stdout)
        .unwrap_or_else(|_| panic!("not JSON: {:?} / {}", run.out(), run.stderr));
    (v["Username"].as_str().unwrap().to_owned(), v["Secret"].as_str().unwrap().to_owned())
}

fn list(run: &HelperRun) -> serde_json::Map<String, serde_json::Value> {
    assert_eq!(run.code, 0, "list failed: {}", run.stderr);
    serde_json::from_slice::<serde_json::Value>(&run.stdout).unwrap().as_object().unwrap().clone()
}

#[test]
fn ours_and_the_reference_read_list_and_erase_each_others_items() {
    let Some((b, keyring)) = bridge_with_keyring("keychain_cross_compatibility") else { return };

    // Ours stores (through the VM's helper); theirs reads under docker/cli's key.
    let ours = [
        ("reg-a.test:5000", "reg-a.test:5000"),
        ("https://reg-b.test:5001/v2/", "reg-b.test:5001"),
        ("ghcr.io", "ghcr.io"),
        ("docker.io", "https://index.docker.io/v1/"),
    ];
    for (i, (server, key)) in ours.iter().enumerate() {
        let (user, secret) = (format!("ours{i}"), format!("ours-secret-{i}"));
        let r = b.helper("store", &store_json(server, &user, &secret));
        assert_eq!(r.code, 0, "store {server}: {}\n{}", r.stderr, b.host_log());
        let theirs = secretservice(&keyring, "get", key);
        assert_eq!(theirs.code, 0, "reference cannot read {key}: {}", theirs.out());
        assert_eq!(credential(&theirs), (user, secret), "{key}");
    }

    // Theirs stores; ours reads, under the spelling a client would send.
    let theirs = [
        ("reg-c.test:6000", "reg-c.test:6000"),
        ("https://reg-d.test", "https://reg-d.test"),
        ("reg-e.test", "https://reg-e.test/v2/"),
        ("reg-f.test", "reg-f.test:443"),
    ];
    for (i, (stored, asked)) in theirs.iter().enumerate() {
        let (user, secret) = (format!("theirs{i}"), format!("theirs-secret-{i}"));
        let r = secretservice(&keyring, "store", &store_json(stored, &user, &secret));
        assert_eq!(r.code, 0, "reference store {stored}: {}", r.stderr);
        let got = b.helper("get", asked);
        assert_eq!(got.code, 0, "ours cannot read {stored} as {asked}: {}", got.stderr);
        assert_eq!(credential(&got), (user, secret), "{asked}");
    }

    // Each lists the other's (names and usernames only).
    let our_list = list(&b.helper("list", ""));
    for (stored, _) in &theirs {
        assert!(our_list.contains_key(*stored), "ours does not list {stored}: {our_list:?}");
    }
    let their_list = list(&secretservice(&keyring, "list", ""));
    for (_, key) in &ours {
        assert!(their_list.contains_key(*key), "reference does not list {key}: {their_list:?}");
    }
    assert_eq!(their_list["reg-a.test:5000"], "ours0");

    // Each erases the other's.
    assert_eq!(b.helper("erase", "reg-c.test:6000").code, 0);
    let gone = secretservice(&keyring, "get", "reg-c.test:6000");
    assert_eq!(gone.out(), "credentials not found in native keychain\n");
    assert_eq!(secretservice(&keyring, "erase", "ghcr.io").code, 0);
    let gone = b.helper("get", "ghcr.io");
    assert_eq!((gone.code, gone.out()), (1, "credentials not found in native keychain\n"));

    let host_log = b.host_log();
    assert!(host_log.contains("source=\"keychain:secretservice\""), "{host_log}");
    for i in 0..4 {
        assert_no_secret(&format!("ours-secret-{i}"), &[("host log", &host_log)]);
        assert_no_secret(&format!("theirs-secret-{i}"), &[("host log", &host_log)]);
    }
}

/// Items in the keyring for `server`, counted with libsecret's own `secret-tool`.
fn items_for(keyring: &Keyring, server: &str) -> usize {
    let mut c = Command::new("secret-tool");
    c.args(["search", "--all", "server", server]).envs(keyring.env.iter().map(|(k, v)| (k, v)));
    let out = c.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines().filter(|l| l.starts_with("[/")).count()
}

#[test]
fn a_new_username_replaces_and_the_newest_duplicate_wins() {
    let Some((b, keyring)) = bridge_with_keyring("keychain_replace_and_duplicates") else { return };
    if !finch_tests::require("keychain_replace_and_duplicates", &["secret-tool"]) {
        return;
    }
    // Ours: storing again with another username leaves one item, the new one.
    assert_eq!(b.helper("store", &store_json("repl.test", "first", "pw-1")).code, 0);
    assert_eq!(b.helper("store", &store_json("repl.test", "second", "pw-2")).code, 0);
    assert_eq!(items_for(&keyring, "repl.test"), 1, "ours left more than one item");
    let theirs = secretservice(&keyring, "get", "repl.test");
    assert_eq!(credential(&theirs), ("second".into(), "pw-2".into()));
    assert_eq!(list(&secretservice(&keyring, "list", ""))["repl.test"], "second");

    // The reference adds a second item; ours answers the most recently modified one.
    assert_eq!(secretservice(&keyring, "store", &store_json("dup.test", "old", "pw-old")).code, 0);
    std::thread::sleep(Duration::from_millis(1100)); // item times have one-second resolution
    assert_eq!(secretservice(&keyring, "store", &store_json("dup.test", "new", "pw-new")).code, 0);
    assert_eq!(items_for(&keyring, "dup.test"), 2, "the reference no longer duplicates");
    assert_eq!(credential(&b.helper("get", "dup.test")), ("new".into(), "pw-new".into()));
    // Erasing removes every item for the server.
    assert_eq!(b.helper("erase", "dup.test").code, 0);
    assert_eq!(items_for(&keyring, "dup.test"), 0);
}

#[test]
fn a_locked_keyring_is_a_clear_error_not_a_hang() {
    let Some((b, keyring)) = bridge_with_keyring("keychain_locked") else { return };
    if !finch_tests::require("keychain_locked", &["dbus-send"]) {
        return;
    }
    assert_eq!(b.helper("store", &store_json("locked.test", "u", "locked-secret-1")).code, 0);
    let mut lock = Command::new("dbus-send");
    lock.args([
        "--session",
        "--print-reply",
        "--dest=org.freedesktop.secrets",
        "/org/freedesktop/secrets",
        "org.freedesktop.Secret.Service.Lock",
        "array:objpath:/org/freedesktop/secrets/collection/login",
    ])
    .envs(keyring.env.iter().map(|(k, v)| (k, v)));
    run_ok(&mut lock, "locking the keyring");

    let r = b.helper("get", "locked.test");
    assert_eq!(
        (r.code, r.out()),
        (1, "credentials not found in native keychain\n"),
        "{}\n{}",
        r.stderr,
        b.host_log()
    );
    assert!(r.stderr.contains("secretservice keychain: the keychain is locked"), "{}", r.stderr);
    // Bounded: well inside the helper's own 45 s wait (the keychain bound is 10 s).
    assert!(r.took < Duration::from_secs(30), "took {:?}", r.took);
    let r = b.helper("store", &store_json("locked.test", "u", "locked-secret-2"));
    assert_ne!(r.code, 0, "a store into a locked keyring succeeded");
    let said = format!("{}{}", r.out(), r.stderr);
    assert!(said.contains("the keychain is locked"), "{said}");
    let host_log = b.host_log();
    assert!(host_log.contains("result=\"unavailable\""), "{host_log}");
    assert_no_secret("locked-secret", &[("host log", &host_log), ("guest log", &b.guest_log())]);
}

#[test]
fn no_session_bus_is_a_clear_error() {
    if !finch_tests::require("keychain_no_bus", TOOLS) {
        return;
    }
    let mut b = Bridge::new(r#"{"credsStore":"secretservice"}"#);
    b.host_env = vec![(
        "DBUS_SESSION_BUS_ADDRESS".into(),
        format!("unix:path={}", b.path("no-such-bus").display()),
    )];
    b.start();
    let r = b.helper("get", "nobus.test");
    assert_eq!((r.code, r.out()), (1, "credentials not found in native keychain\n"));
    assert!(r.stderr.contains("the keychain service is not reachable"), "{}", r.stderr);
    assert!(r.stderr.contains("is DBUS_SESSION_BUS_ADDRESS set?"), "{}", r.stderr);
}

/// VM keys live in the Secret Service, where no VM mount reaches (issue 12, item 3): a new
/// VM's key is made there and no file is written; a key file made before is moved in (same
/// key, file gone); `key-path` says where the key is instead of printing a path; docker's
/// helper does not list the items; and the host agent links with the key from the keyring.
#[test]
fn vm_keys_live_in_the_keyring_and_a_key_file_moves_in() {
    if !finch_tests::require("vm_keys_in_the_keyring", &[TOOLS, &["secret-tool"]].concat()) {
        return;
    }
    let mut b = Bridge::new("{}");
    let keyring = start_keyring(b.dir.path());
    b.host_env = keyring.env.clone();
    let vms = b.state_dir().join("vms");

    let (code, out, err) = b.host_cli(&["key-path", "moved", "--key-store", "file"]);
    assert_eq!(code, 0, "{err}");
    let moved_file = vms.join("moved.key");
    assert_eq!(out.trim(), moved_file.display().to_string());
    let file_key = std::fs::read(&moved_file).unwrap();

    let fresh_out = b.path("fresh.key");
    let (code, out, err) =
        b.host_cli(&["key-export", "fresh", "--out", fresh_out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("kept in the secretservice keychain"), "{out}");
    assert!(!vms.join("fresh.key").exists(), "a key file was written beside the keychain item");
    let fresh_key = std::fs::read(&fresh_out).unwrap();
    assert_eq!(fresh_key.len(), 32);
    let mode = std::fs::metadata(&fresh_out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut search = Command::new("secret-tool");
    search
        .args(["search", "--all", "xdg:schema", "dev.finch.credential-bridge.LinkKey"])
        .envs(keyring.env.iter().map(|(k, v)| (k, v)));
    let items = run_ok(&mut search, "secret-tool search");
    assert!(items.contains("label = finch credential bridge: link key of VM fresh"), "{items}");

    let (code, _, err) = b.host_cli(&["key-path", "fresh"]);
    assert_ne!(code, 0);
    assert!(err.contains("key-export fresh --out FILE"), "{err}");

    let moved_out = b.path("moved.out");
    let (code, _, err) = b.host_cli(&["key-export", "moved", "--out", moved_out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&moved_out).unwrap(), file_key, "the moved key changed");
    assert!(!moved_file.exists(), "the moved key file is still there");

    let listed = secretservice(&keyring, "list", "");
    assert_eq!((listed.code, listed.out().trim()), (0, "{}"), "{}", listed.stderr);

    // The guest holds the exported key; the host agent has no key file for the VM.
    std::fs::copy(&fresh_out, b.path("link.key")).unwrap();
    b.start_guest();
    b.host_vm = Some(format!("fresh=unix://{}", b.link_socket().display()));
    b.host_flags = vec!["--key-store".into(), "keychain".into()];
    b.host_env.push(("RUST_LOG".into(), "trace".into()));
    b.start_host();
    b.wait_link_up(1);
    assert!(!vms.join("fresh.key").exists());
    // At trace, no form of the key reaches either log.
    let host_log = b.host_log();
    assert!(host_log.contains("TRACE"), "trace was not in force");
    let logs = [("host log", host_log.as_str()), ("guest log", &b.guest_log())];
    use base64::Engine;
    let hex: String = fresh_key.iter().map(|b| format!("{b:02x}")).collect();
    for form in [hex, base64::engine::general_purpose::STANDARD.encode(&fresh_key)] {
        assert_no_secret(&form, &logs);
    }
}
