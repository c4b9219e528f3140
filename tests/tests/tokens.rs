//! Scoped tokens, the host's half (issue 22; link version 4): a guest asks the host agent for
//! a token over the link, and the host exchanges the stored password at the registry's own
//! token realm for a token carrying only the scopes the VM's `pull`/`push` policy grants.
//! Real parts: Debian's docker-registry with `auth: token` (TLS), trusting a token server
//! the test writes (`tests/tokens/token_server.py`: RS256 JWTs with `x5c`, grants per user,
//! one log line per request). The test plays the guest end of the link itself.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use finch_shared::codec;
use finch_shared::frame::{read_frame, write_frame};
use finch_shared::key::LinkKey;
use finch_shared::message::{Handshake, LinkMsg, Token, TokenRequest, WireError};
use finch_shared::seal::Session;
use finch_tests::{Bridge, Proc, STARTUP, wait_until};

pub(crate) const USER: &str = "alice";
pub(crate) const PASSWORD: &str = "tok-Pa55word-91c2";
/// The user's identity (refresh) token at the token server.
const REFRESH: &str = "tok-refresh-5d1e77";
const SERVICE: &str = "finch-test-registry";
/// Lifetime of the token server's tokens.
const LIFETIME: u32 = 300;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A self-signed certificate for `san` that is its own trust anchor (not a CA: rustls
/// refuses a CA as an end entity), and its key.
pub(crate) fn self_signed(dir: &Path, name: &str, san: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    finch_tests::self_signed_cert(&cert, &key, san, &["basicConstraints=critical,CA:FALSE"]);
    (cert, key)
}

/// The guest end of one link, played by the test.
struct Guest {
    stream: UnixStream,
    session: Session,
    next: u64,
}

impl Guest {
    fn accept(listener: &UnixListener, key: LinkKey) -> Guest {
        let mut stream = finch_tests::accept_within(listener, STARTUP);
        let hello: Handshake = codec::decode(&read_frame(&mut stream).unwrap()).unwrap();
        let (guest, answer) =
            finch_shared::handshake::GuestHandshake::answer(key, "boot", hello).unwrap();
        write_frame(&mut stream, &codec::encode(&answer).unwrap()).unwrap();
        let proof: Handshake = codec::decode(&read_frame(&mut stream).unwrap()).unwrap();
        let (established, session) = guest.finish(proof).unwrap();
        assert_eq!(established.version, 4, "the link speaks version 4");
        Guest { stream, session, next: 1 }
    }

    fn send(&mut self, msg: &LinkMsg) {
        let sealed = self.session.sealer.seal(&codec::encode(msg).unwrap()).unwrap();
        write_frame(&mut self.stream, &sealed).unwrap();
    }

    /// Asks for a token and waits for its answer, answering the host's pings meanwhile.
    fn token(&mut self, registry: &str, scopes: &[&str]) -> Result<Token, WireError> {
        let id = self.next;
        self.next += 1;
        let request = TokenRequest {
            registry: registry.to_owned(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        };
        self.send(&LinkMsg::TokenRequest { id, request });
        loop {
            let frame = read_frame(&mut self.stream).unwrap();
            let msg: LinkMsg = codec::decode(&self.session.opener.open(&frame).unwrap()).unwrap();
            match msg {
                LinkMsg::Ping { seq } => self.send(&LinkMsg::Pong { seq }),
                LinkMsg::TokenResponse { id: got, outcome } if got == id => return outcome,
                _ => {}
            }
        }
    }
}

/// What the registry answers `method url` with `token`.
fn registry_says(ca: &Path, method: &str, url: &str, token: &Token) -> String {
    let out = Command::new("python3")
        .arg(script("probe.py"))
        .arg(ca)
        .args([method, url])
        .env("TOKEN", token.token.expose())
        .output()
        .unwrap();
    assert!(out.status.success(), "probe: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The token server's log: one JSON object per request.
pub(crate) fn token_log(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The test's token server (`tests/tokens/token_server.py`) on 127.0.0.1, TLS, granting
/// [`USER`] pull and push on `a` and `b` with tokens living `lifetime` seconds.
pub(crate) struct TokenServer {
    pub(crate) proc: Proc,
    pub(crate) port: u16,
    pub(crate) log: PathBuf,
    signing: PathBuf,
}

impl TokenServer {
    pub(crate) fn start(dir: &Path, tls: &Path, tls_key: &Path, lifetime: u32) -> TokenServer {
        let port = free_port();
        let (signing, signing_key) = self_signed(dir, "signing", "DNS:token-issuer");
        let users = dir.join("users.json");
        let grants = serde_json::json!({USER: {
            "password": PASSWORD,
            "refresh_token": REFRESH,
            "grants": {"a": ["pull", "push"], "b": ["pull", "push"], "slow": ["pull", "push"]},
        }});
        std::fs::write(&users, grants.to_string()).unwrap();
        let log = dir.join("token-server.log");
        let mut cmd = Command::new("python3");
        cmd.arg(script("token_server.py")).arg(port.to_string());
        cmd.args([tls, tls_key, &signing_key, &signing, &users, &log]);
        cmd.args(["token-issuer", &lifetime.to_string()]);
        let proc = Proc::spawn("token-server", cmd, &dir.join("token-server.out"));
        let up = wait_until(STARTUP, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(up, "{}", proc.output());
        TokenServer { proc, port, log, signing }
    }

    /// Debian's docker-registry on `addr` (TLS), trusting this token server.
    pub(crate) fn registry(&self, dir: &Path, addr: &str, tls: &Path, tls_key: &Path) -> Proc {
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {root}\n\
                 http:\n  addr: {addr}\n  tls:\n    certificate: {tls}\n    key: {tls_key}\n\
                 auth:\n  token:\n    realm: https://127.0.0.1:{port}/token\n    service: {SERVICE}\n\
                 \x20   issuer: token-issuer\n    rootcertbundle: {signing}\n",
                root = dir.join("data").display(),
                tls = tls.display(),
                tls_key = tls_key.display(),
                port = self.port,
                signing = self.signing.display(),
            ),
        )
        .unwrap();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        let proc = Proc::spawn("docker-registry", cmd, &dir.join("registry.log"));
        let up = wait_until(STARTUP, || std::net::TcpStream::connect(addr).is_ok());
        assert!(up, "{}", proc.output());
        proc
    }
}

/// A token server and a docker-registry trusting it (TLS on 127.0.0.1), and a host agent
/// whose docker config holds `auth_entry` for the registry (none when empty) and whose VM may
/// pull what `pull` names, dialing the test's guest end.
struct Scene {
    b: Bridge,
    guest: Guest,
    registry: String,
    tls: PathBuf,
    log: PathBuf,
    _procs: Vec<Proc>,
}

impl Scene {
    fn start(auth_entry: &str, pull: &str) -> Option<Scene> {
        let tools = ["docker-registry", "openssl", "python3"];
        if !finch_tests::require("scoped tokens", &tools) {
            return None;
        }
        let registry_port = free_port();
        let registry = format!("127.0.0.1:{registry_port}");
        let auths = if auth_entry.is_empty() {
            "{}".to_owned()
        } else {
            format!(r#"{{"auths":{{"{registry}":{auth_entry}}}}}"#)
        };
        let mut b = Bridge::new(&auths);
        let dir = b.path("tokens");
        std::fs::create_dir_all(&dir).unwrap();
        let (tls, tls_key) = self_signed(&dir, "tls", "IP:127.0.0.1");
        let issuer = TokenServer::start(&dir, &tls, &tls_key, LIFETIME);
        let registry_proc = issuer.registry(&dir, &registry, &tls, &tls_key);
        let (log, token_server) = (issuer.log, issuer.proc);
        let pull = pull.replace("REGISTRY", &registry);
        std::fs::write(b.host_config(), format!("[vm.itvm.policy]\npull = {pull}\n")).unwrap();
        let listener_path = b.path("guest.sock");
        let listener = UnixListener::bind(&listener_path).unwrap();
        b.host_dials = Some(listener_path);
        // The host trusts the test's TLS certificate (rustls-native-certs reads SSL_CERT_FILE).
        b.host_env.push(("SSL_CERT_FILE".into(), tls.display().to_string()));
        // Trace: every level of the token path is checked for the test's secrets.
        b.host_env.push(("RUST_LOG".into(), "trace".into()));
        b.start_host();
        let key = LinkKey::load(&b.path("link.key")).unwrap();
        let guest = Guest::accept(&listener, key);
        Some(Scene { b, guest, registry, tls, log, _procs: vec![token_server, registry_proc] })
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}/v2/{path}", self.registry)
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tokens").join(name)
}

/// The host exchanges the stored password at the registry's realm (learned from the
/// registry's challenge) for a token the registry honours only for what the policy grants:
/// `pull` of `a` (asked with `push` too, the push is cut); `b` and any push are refused by
/// the policy before anything is sent; the same scopes again come from the cache; the
/// password reaches the token server only with a grant to exchange; nothing secret is logged.
#[test]
fn the_host_exchanges_the_password_for_a_token_the_registry_scopes() {
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    };
    let Some(mut s) = Scene::start(&format!(r#"{{"auth":"{auth}"}}"#), r#"["REGISTRY/a"]"#) else {
        return;
    };
    let registry = s.registry.clone();
    let token = s.guest.token(&registry, &["repository:a:pull,push"]).unwrap();
    assert_eq!(token.granted, ["repository:a:pull"], "the push was not cut");
    assert_eq!(token.expires_in, LIFETIME);
    // Authorized for `a` (unknown there yet: 404), not for `b`, and never to push.
    assert_eq!(registry_says(&s.tls, "GET", &s.url("a/tags/list"), &token), "404");
    assert_eq!(registry_says(&s.tls, "GET", &s.url("b/tags/list"), &token), "401");
    assert_eq!(registry_says(&s.tls, "POST", &s.url("a/blobs/uploads/"), &token), "401");

    // Again: from the cache, no second exchange.
    let again = s.guest.token(&registry, &["repository:a:pull,push"]).unwrap();
    assert_eq!(again.token.expose(), token.token.expose());
    assert!(again.expires_in <= LIFETIME);
    // Refused by the policy before anything leaves the host.
    for scopes in [&["repository:b:pull"][..], &["repository:a:push"]] {
        match s.guest.token(&registry, scopes) {
            Err(WireError::Denied { reason }) => {
                assert!(reason.contains("grants no token"), "{reason}")
            }
            other => panic!("{scopes:?}: {other:?}"),
        }
    }
    match s.guest.token(&registry, &["registry:catalog:*"]) {
        Err(WireError::BadRequest { .. }) => {}
        other => panic!("a catalog scope: {other:?}"),
    }
    let lines = token_log(&s.log);
    assert_eq!(lines.len(), 1, "one exchange: {lines:?}");
    assert_eq!((&lines[0]["how"], &lines[0]["password"]), (&"basic".into(), &true.into()));
    assert_eq!(lines[0]["user"], USER);
    assert_eq!(
        lines[0]["asked"],
        serde_json::json!(["repository:a:pull"]),
        "asked beyond the grant"
    );

    let host_log = s.b.host_log();
    assert!(host_log.contains(" TRACE "), "trace was not in force");
    assert!(host_log.contains("op=\"token\""), "no audit line:\n{host_log}");
    // The second token came from the cache without asking the credential source.
    let sources: Vec<&str> = host_log
        .lines()
        .filter(|l| l.contains("op=\"token\"") && l.contains("result=\"ok\""))
        .filter_map(|l| l.split("source=").nth(1)?.split(' ').next())
        .collect();
    assert_eq!(sources.len(), 2, "{host_log}");
    assert!(sources[0] != "\"cache\"" && sources[1] == "\"cache\"", "{sources:?}");
    assert!(host_log.contains("refused=[\"repository:b:pull\"]"), "{host_log}");
    for secret in [PASSWORD, token.token.expose(), &auth] {
        assert!(!host_log.contains(secret), "a secret in the host log");
    }
}

/// An identity token (`identitytoken` in the docker config: user `<token>`) is exchanged
/// with the OAuth2 refresh-token grant; with nothing stored, the host asks anonymously and
/// the token carries nothing the registry would let a stranger read.
#[test]
fn identity_tokens_use_the_refresh_grant_and_nothing_stored_is_anonymous() {
    let Some(mut s) =
        Scene::start(&format!(r#"{{"identitytoken":"{REFRESH}"}}"#), r#"["REGISTRY/*"]"#)
    else {
        return;
    };
    let registry = s.registry.clone();
    let token = s.guest.token(&registry, &["repository:a:pull"]).unwrap();
    assert_eq!(registry_says(&s.tls, "GET", &s.url("a/tags/list"), &token), "404");
    let lines = token_log(&s.log);
    assert_eq!((&lines[0]["how"], &lines[0]["user"]), (&"refresh_token".into(), &USER.into()));
    let host_log = s.b.host_log();
    assert!(host_log.contains(" TRACE "), "trace was not in force");
    for secret in [REFRESH, token.token.expose()] {
        assert!(!host_log.contains(secret), "a secret in the host log");
    }

    let Some(mut s) = Scene::start("", r#"["REGISTRY/*"]"#) else { return };
    let registry = s.registry.clone();
    let token = s.guest.token(&registry, &["repository:a:pull"]).unwrap();
    assert_eq!(registry_says(&s.tls, "GET", &s.url("a/tags/list"), &token), "401");
    let lines = token_log(&s.log);
    assert_eq!((&lines[0]["how"], &lines[0]["password"]), (&"anonymous".into(), &false.into()));
}

/// A registry whose realm never answers holds a token request for the call deadline (10 s),
/// then it is answered `unavailable`; a challenge far beyond 8 KiB is not read as one (the
/// registry keeps the `get` path: not found); neither takes the link down.
#[test]
fn a_hung_realm_or_a_huge_challenge_holds_nothing() {
    let Some(mut s) = Scene::start("", r#"["*"]"#) else { return };
    let dir = s.b.path("stubs");
    std::fs::create_dir_all(&dir).unwrap();
    let (tls, tls_key) = (s.tls.clone(), s.tls.with_extension("key"));
    // Accepts connections and never says a word.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_port = hung.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in hung.incoming().take(2).flatten() {
            held.push(c);
        }
        std::thread::sleep(std::time::Duration::from_secs(30));
    });
    let mut procs = Vec::new();
    let mut stub = |name: &str, challenge: String| {
        let port = free_port();
        let file = dir.join(format!("{name}.challenge"));
        std::fs::write(&file, challenge).unwrap();
        let mut cmd = Command::new("python3");
        cmd.arg(script("stub_registry.py")).arg(port.to_string()).args([&tls, &tls_key, &file]);
        procs.push(Proc::spawn(name, cmd, &dir.join(format!("{name}.out"))));
        let up = wait_until(STARTUP, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(up, "{name} did not listen");
        format!("127.0.0.1:{port}")
    };
    let hung_registry =
        stub("hung", format!(r#"Bearer realm="https://127.0.0.1:{hung_port}/token",service="x""#));
    let huge_registry = stub(
        "huge",
        format!(r#"Bearer realm="https://127.0.0.1:1/{}",service="x""#, "x".repeat(100_000)),
    );
    match s.guest.token(&hung_registry, &["repository:a:pull"]) {
        Err(WireError::Unavailable { reason }) => {
            assert!(reason.contains("did not answer within 10 s"), "{reason}")
        }
        other => panic!("a hung realm: {other:?}"),
    }
    assert_eq!(s.guest.token(&huge_registry, &["repository:a:pull"]), Err(WireError::NotFound));
    // The link is still up: the real registry still answers.
    let registry = s.registry.clone();
    assert!(s.guest.token(&registry, &["repository:a:pull"]).is_ok());
    drop(held);
}
