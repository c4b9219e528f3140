//! The helper protocol through the whole chain (helper → guest agent → link → host agent →
//! docker config), compared byte for byte.

use finch_tests::Bridge;

const NOT_FOUND: &str = "credentials not found in native keychain\n";

fn auths_config() -> String {
    // user "alice", password "pa:ss&<w>" (colon kept: split once), and an identity token.
    let alice = "YWxpY2U6cGE6c3MmPHc+";
    format!(
        r#"{{"auths":{{"registry.example:5000":{{"auth":"{alice}"}},"https://tok.example":{{"identitytoken":"idtok"}}}}}}"#
    )
}

#[test]
fn every_protocol_case_through_the_chain() {
    let mut b = Bridge::new(&auths_config());
    b.start();

    // get: found, exact bytes, Go escaping, ServerURL echoes the trimmed input.
    let r = b.helper("get", " registry.example:5000\n");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.out(),
        "{\"ServerURL\":\"registry.example:5000\",\"Username\":\"alice\",\"Secret\":\"pa:ss\\u0026\\u003cw\\u003e\"}\n"
    );
    // Other spellings of the same registry find it.
    for spelling in ["https://registry.example:5000", "http://registry.example:5000/v2/"] {
        let r = b.helper("get", spelling);
        assert_eq!(r.code, 0, "{spelling}: {r:?}");
        assert!(r.out().contains("\"Username\":\"alice\""), "{spelling}");
    }
    // An identity token stored as https://host is found for host:443 (nerdctl's spelling).
    let r = b.helper("get", "tok.example:443");
    assert_eq!(
        r.out(),
        "{\"ServerURL\":\"tok.example:443\",\"Username\":\"\\u003ctoken\\u003e\",\"Secret\":\"idtok\"}\n"
    );

    // get: not found is the exact text, exit 1, nothing on stderr.
    let r = b.helper("get", "nothing.example");
    assert_eq!((r.out(), r.code, r.stderr.as_str()), (NOT_FOUND, 1, ""));

    // get / erase with no server.
    for action in ["get", "erase"] {
        let r = b.helper(action, "  \n");
        assert_eq!((r.out(), r.code), ("no credentials server URL\n", 1));
    }

    // store: errors as the reference prints them.
    for (input, want) in [
        ("", "EOF\n"),
        ("{\"ServerURL\":\"x\"", "unexpected EOF\n"),
        ("{\"ServerURL\":\"x\"}", "no credentials username\n"),
        ("null", "no credentials server URL\n"),
        ("{b", "invalid character 'b' looking for beginning of object key string\n"),
    ] {
        let r = b.helper("store", input);
        assert_eq!((r.out(), r.code), (want, 1), "store {input:?}");
    }

    // store with lower-case keys, then get under another spelling, list, erase.
    let r = b.helper(
        "store",
        "{\"serverurl\":\"https://new.example/v2/\",\"username\":\"bob\",\"secret\":\"hunter2\"}\n",
    );
    assert_eq!((r.out(), r.code), ("", 0), "{r:?}");
    let r = b.helper("get", "new.example");
    assert_eq!(
        r.out(),
        "{\"ServerURL\":\"new.example\",\"Username\":\"bob\",\"Secret\":\"hunter2\"}\n"
    );
    let r = b.helper("list", "unused");
    assert_eq!(
        (r.out(), r.code),
        (
            "{\"https://tok.example\":\"\\u003ctoken\\u003e\",\"new.example\":\"bob\",\"registry.example:5000\":\"alice\"}\n",
            0
        )
    );
    let r = b.helper("erase", "https://new.example");
    assert_eq!((r.out(), r.code), ("", 0), "{r:?}");
    let r = b.helper("get", "new.example");
    assert_eq!((r.out(), r.code), (NOT_FOUND, 1));
    // Erasing what is not there succeeds, as the reference helpers do.
    let r = b.helper("erase", "never.example");
    assert_eq!((r.out(), r.code), ("", 0));

    // Arguments.
    let usage = "Usage: docker-credential-finchhost <store|get|erase|list|version>\n";
    let r = finch_tests::run_with_input(
        std::process::Command::new(finch_tests::bin("docker-credential-finchhost")),
        b"",
        std::time::Duration::from_secs(10),
    );
    assert_eq!((r.out(), r.code), (usage, 1));
    let r = b.helper("bogus", "");
    assert_eq!((r.out(), r.code), ("docker-credential-finchhost: unknown action: bogus\n", 1));
    let r = b.helper("version", "");
    assert!(r.out().starts_with("docker-credential-finchhost (finch-credential-bridge) "), "{r:?}");
    assert_eq!(r.code, 0);

    // The plaintext store was written with a warning, and no secret reached a log.
    assert!(b.host_log().contains("unencrypted"));
    finch_tests::assert_no_secret(
        "hunter2",
        &[("host log", &b.host_log()), ("guest log", &b.guest_log())],
    );
    finch_tests::assert_no_secret(
        "idtok",
        &[("host log", &b.host_log()), ("guest log", &b.guest_log())],
    );
    // One audit line per request that reached the host.
    assert!(b.host_log().matches("finch_audit").count() >= 10);
}

#[test]
fn routes_to_host_helpers_in_docker_cli_order() {
    // credHelpers beats credsStore; a helper gets the spellings until one hits.
    let mut b =
        Bridge::new(r#"{"credsStore":"storeall","credHelpers":{"special.example":"special"}}"#);
    let log = b.path("calls.log");
    b.fake_helper(
        "storeall",
        &format!(
            r#"read -r server; echo "storeall $1 $server" >> {log}
case "$1" in
  get) if [ "$server" = "https://other.example" ]; then echo '{{"ServerURL":"x","Username":"u1","Secret":"s1"}}'; exit 0; fi
       echo "credentials not found in native keychain"; exit 1;;
  list) echo '{{"a.example":"ua"}}';;
esac"#,
            log = log.display()
        ),
    );
    b.fake_helper(
        "special",
        &format!(
            r#"read -r server; echo "special $1 $server" >> {log}; echo '{{"ServerURL":"x","Username":"u2","Secret":"s2"}}'"#,
            log = log.display()
        ),
    );
    b.start();
    let r = b.helper("get", "other.example");
    assert_eq!(
        r.out(),
        "{\"ServerURL\":\"other.example\",\"Username\":\"u1\",\"Secret\":\"s1\"}\n"
    );
    let r = b.helper("get", "special.example");
    assert_eq!(
        r.out(),
        "{\"ServerURL\":\"special.example\",\"Username\":\"u2\",\"Secret\":\"s2\"}\n"
    );
    let calls = std::fs::read_to_string(&log).unwrap();
    // nerdctl's order of spellings, stopping at the first hit.
    assert!(
        calls.starts_with(
            "storeall get other.example\nstoreall get other.example:443\nstoreall get https://other.example:443\nstoreall get http://other.example:443\nstoreall get https://other.example\nspecial get special.example\n"
        ),
        "{calls}"
    );
    // The helpers' output (secrets included) never reaches the logs.
    finch_tests::assert_no_secret("s1", &[("host log", &b.host_log())]);
    finch_tests::assert_no_secret("s2", &[("host log", &b.host_log())]);
}
