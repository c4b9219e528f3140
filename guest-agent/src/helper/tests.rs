//! Golden tests: every byte the helper prints, for every case of the protocol reference.

use std::cell::RefCell;
use std::ffi::OsString;

use finch_shared::message::{ListEntry, Outcome, Request, Response, WireError};
use finch_shared::{NOT_FOUND_TEXT, Secret};

use super::*;

/// A fake agent that records the request and answers with a canned outcome.
struct Fake {
    answer: Result<Outcome, AgentError>,
    seen: RefCell<Vec<Request>>,
}

impl Fake {
    fn new(answer: Result<Outcome, AgentError>) -> Self {
        Fake { answer, seen: RefCell::new(Vec::new()) }
    }
}

impl Agent for Fake {
    fn call(&self, request: Request) -> Result<Outcome, AgentError> {
        self.seen.borrow_mut().push(request);
        self.answer.clone()
    }
}

fn go(args: &[&str], stdin: &[u8], agent: &Fake) -> Run {
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    run(&args, &mut &stdin[..], agent)
}

fn cred(user: &str, secret: &str) -> Result<Outcome, AgentError> {
    Ok(Ok(Response::Credential { username: user.into(), secret: Secret::from(secret) }))
}

fn text(run: &Run) -> &str {
    std::str::from_utf8(&run.stdout).unwrap()
}

#[test]
fn get_prints_compact_json_in_field_order() {
    let agent = Fake::new(cred("alice", "s3cret"));
    let r = go(&["get"], b"  registry.example:5000/v2 \n", &agent);
    assert_eq!(
        text(&r),
        "{\"ServerURL\":\"registry.example:5000/v2\",\"Username\":\"alice\",\"Secret\":\"s3cret\"}\n"
    );
    assert_eq!((r.code, r.stderr), (0, None));
    assert_eq!(agent.seen.borrow()[0], Request::Get { server: "registry.example:5000/v2".into() });
}

#[test]
fn get_escapes_identity_tokens_like_go() {
    let agent = Fake::new(cred("<token>", "a&b"));
    let r = go(&["get"], b"h", &agent);
    assert_eq!(
        text(&r),
        "{\"ServerURL\":\"h\",\"Username\":\"\\u003ctoken\\u003e\",\"Secret\":\"a\\u0026b\"}\n"
    );
}

#[test]
fn get_joins_lines_and_trims() {
    let agent = Fake::new(cred("u", "p"));
    go(&["get"], b"reg\r\nistry.example\n", &agent);
    assert_eq!(agent.seen.borrow()[0], Request::Get { server: "registry.example".into() });
}

#[test]
fn get_not_found_is_exact() {
    let agent = Fake::new(Ok(Err(WireError::NotFound)));
    let r = go(&["get"], b"h", &agent);
    assert_eq!(text(&r), format!("{NOT_FOUND_TEXT}\n"));
    assert_eq!((r.code, r.stderr), (1, None));
}

#[test]
fn get_falls_back_to_not_found_with_a_reason() {
    for answer in [
        Ok(Err(WireError::Denied { reason: "policy forbids h".into() })),
        Ok(Err(WireError::unavailable("no link to the host agent"))),
        Err(AgentError::Unreachable { path: "/x".into(), reason: "refused".into() }),
        Ok(Ok(Response::Done)),
    ] {
        let agent = Fake::new(answer);
        let r = go(&["get"], b"h", &agent);
        assert_eq!(text(&r), format!("{NOT_FOUND_TEXT}\n"));
        assert_eq!(r.code, 1);
        let reason = r.stderr.expect("a reason on stderr");
        assert!(!reason.contains('\n'), "{reason}");
    }
}

#[test]
fn empty_server_is_refused_before_asking() {
    for action in ["get", "erase"] {
        let agent = Fake::new(cred("u", "p"));
        let r = go(&[action], b" \n\t", &agent);
        assert_eq!((text(&r), r.code), ("no credentials server URL\n", 1));
        assert!(agent.seen.borrow().is_empty());
    }
}

#[test]
fn long_line_fails_like_bufio() {
    let agent = Fake::new(cred("u", "p"));
    let r = go(&["get"], &vec![b'a'; 70_000], &agent);
    assert_eq!((text(&r), r.code), ("bufio.Scanner: token too long\n", 1));
    let r = go(&["get"], &vec![b'a'; MAX_STDIN + 1], &agent);
    assert_eq!(r.code, 1);
    assert!(agent.seen.borrow().is_empty());
}

#[test]
fn store_parses_case_insensitive_keys() {
    let agent = Fake::new(Ok(Ok(Response::Done)));
    let r = go(
        &["store"],
        b"{\"serverurl\":\"h:5000\",\"USERNAME\":\"u\",\"Secret\":\"\",\"x\":1}\n",
        &agent,
    );
    assert_eq!((text(&r), r.code), ("", 0));
    assert_eq!(
        agent.seen.borrow()[0],
        Request::Store { server: "h:5000".into(), username: "u".into(), secret: Secret::from("") }
    );
}

#[test]
fn store_errors_are_exact() {
    let table: &[(&[u8], &str)] = &[
        (b"", "EOF"),
        (b"{\"ServerURL\":\"h\"", "unexpected EOF"),
        (b"{b", "invalid character 'b' looking for beginning of object key string"),
        (b"null", "no credentials server URL"),
        (b"{\"ServerURL\":\"h\"}", "no credentials username"),
        (b"{\"ServerURL\":\"h\",\"Username\":\"\"}", "no credentials username"),
    ];
    for (input, want) in table {
        let agent = Fake::new(Ok(Ok(Response::Done)));
        let r = go(&["store"], input, &agent);
        assert_eq!((text(&r), r.code), (format!("{want}\n").as_str(), 1), "{input:?}");
        assert!(agent.seen.borrow().is_empty());
    }
}

#[test]
fn store_and_erase_failures_are_clear_and_on_stdout() {
    let agent = Fake::new(Ok(Err(WireError::Denied { reason: "store not allowed for h".into() })));
    let r = go(&["store"], b"{\"ServerURL\":\"h\",\"Username\":\"u\",\"Secret\":\"p\"}", &agent);
    assert_eq!(r.code, 1);
    assert_eq!(
        text(&r),
        "docker-credential-finchhost: denied by the host: store not allowed for h\n"
    );
    let agent =
        Fake::new(Err(AgentError::Unreachable { path: "/x".into(), reason: "refused".into() }));
    let r = go(&["erase"], b"h", &agent);
    assert_eq!(
        (text(&r), r.code),
        ("docker-credential-finchhost: cannot reach the guest agent at /x: refused\n", 1)
    );
    let agent = Fake::new(Ok(Ok(Response::Done)));
    let r = go(&["erase"], b"h\n", &agent);
    assert_eq!((text(&r), r.code), ("", 0));
    assert_eq!(agent.seen.borrow()[0], Request::Erase { server: "h".into() });
}

#[test]
fn list_is_sorted_json() {
    let entries = vec![
        ListEntry { server: "z.example".into(), username: "zed".into() },
        ListEntry { server: "a.example:5000".into(), username: "<token>".into() },
    ];
    let agent = Fake::new(Ok(Ok(Response::List { entries })));
    let r = go(&["list"], b"unused", &agent);
    assert_eq!(text(&r), "{\"a.example:5000\":\"\\u003ctoken\\u003e\",\"z.example\":\"zed\"}\n");
    let agent = Fake::new(Ok(Ok(Response::List { entries: vec![] })));
    assert_eq!(text(&go(&["list"], b"", &agent)), "{}\n");
}

#[test]
fn a_cut_list_says_so_on_stderr() {
    let entries = vec![ListEntry { server: "a.example".into(), username: "u".into() }];
    let agent = Fake::new(Ok(Ok(Response::ListCut { entries, omitted: 7 })));
    let r = go(&["list"], b"", &agent);
    assert_eq!((text(&r), r.code), ("{\"a.example\":\"u\"}\n", 0));
    let stderr = r.stderr.unwrap_or_default();
    assert!(stderr.contains("cut") && stderr.contains("7 more"), "{stderr}");
}

#[test]
fn arguments_follow_the_reference() {
    let agent = Fake::new(Ok(Ok(Response::Done)));
    let usage = "Usage: docker-credential-finchhost <store|get|erase|list|version>\n";
    for args in [&[][..], &["get", "extra"][..]] {
        let r = go(args, b"", &agent);
        assert_eq!((text(&r), r.code), (usage, 1));
    }
    let r = go(&["--help"], b"", &agent);
    assert_eq!((text(&r), r.code), (usage, 0));
    let r = go(&["bogus"], b"", &agent);
    assert_eq!((text(&r), r.code), ("docker-credential-finchhost: unknown action: bogus\n", 1));
    let r = go(&["version"], b"", &agent);
    assert_eq!(
        (text(&r), r.code),
        (
            format!(
                "docker-credential-finchhost (finch-credential-bridge) {}\n",
                env!("CARGO_PKG_VERSION")
            )
            .as_str(),
            0
        )
    );
    assert!(agent.seen.borrow().is_empty());
}
