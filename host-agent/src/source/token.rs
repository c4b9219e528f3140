//! Scoped registry tokens (link version 4): the host exchanges the registry's stored
//! credential at the registry's own token realm for a bearer token limited to the scopes the
//! VM's policy grants, so the VM holds a token that expires in minutes instead of the secret.
//!
//! The realm and service come from the registry's challenge (`GET https://R/v2/`), never from
//! the guest: no guest can make the host send a password to a realm it chose. The token
//! protocol is distribution's (`docs/content/spec/auth/token.md`): `GET realm?service=S&
//! scope=…` with Basic credentials, or the OAuth2 `refresh_token` grant when the stored user is
//! `<token>`; the answer's `token` (or `access_token`) lives `expires_in` seconds (60 when
//! omitted).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use finch_shared::Secret;
use finch_shared::message::WireError;
use finch_shared::registry::{Pattern, Registry};
use tokio::time::Instant;

/// Most bytes of a scope string.
pub const MAX_SCOPE_LEN: usize = 256;
/// Most bytes of a token answer read.
pub const MAX_TOKEN_BODY: usize = 64 * 1024;
/// Most tokens cached per VM; the oldest goes first.
pub const MAX_TOKENS_PER_VM: usize = 256;
/// How long a registry's challenge (its realm and service) is remembered.
const CHALLENGE_TTL: Duration = Duration::from_secs(600);
/// Most registries whose challenge is remembered.
const MAX_CHALLENGES: usize = 256;
/// The deadline of one call to a registry or a realm, connection included.
pub const CALL_DEADLINE: Duration = Duration::from_secs(10);
/// A token is given out again until this share of its life is left.
const REUSE_UNTIL_LEFT: u32 = 10;
/// The OAuth2 client id sent with a refresh-token grant.
const CLIENT_ID: &str = "finch-credential-bridge";

/// An action on a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// `pull`.
    Pull,
    /// `push`.
    Push,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
        }
    }
}

/// One `repository:NAME:ACTIONS` scope.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    /// The repository, `team/app`.
    pub repository: String,
    /// Its actions, sorted, each once.
    pub actions: Vec<Action>,
}

impl Scope {
    /// Parses a scope as a client's challenge names it. Only repository scopes with `pull`
    /// and `push` are taken (a VM never needs `delete` or `*`); names follow distribution's
    /// grammar (lower-case alphanumerics and `._-/`).
    pub fn parse(text: &str) -> Result<Scope, WireError> {
        let bad = |why: &str| WireError::BadRequest { reason: format!("scope: {why}") };
        if text.len() > MAX_SCOPE_LEN {
            return Err(bad("longer than 256 bytes"));
        }
        let rest = text.strip_prefix("repository:").ok_or_else(|| bad("not a repository scope"))?;
        let (name, actions) = rest.rsplit_once(':').ok_or_else(|| bad("no actions"))?;
        let name_ok = !name.is_empty()
            && name.split('/').all(|part| {
                !part.is_empty()
                    && part.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !name_ok {
            return Err(bad("not a repository name"));
        }
        let mut parsed = Vec::new();
        for action in actions.split(',') {
            let action = match action {
                "pull" => Action::Pull,
                "push" => Action::Push,
                _ => return Err(bad("actions are pull and push")),
            };
            if !parsed.contains(&action) {
                parsed.push(action);
            }
        }
        parsed.sort();
        Ok(Scope { repository: name.to_owned(), actions: parsed })
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let actions: Vec<&str> = self.actions.iter().map(|a| a.as_str()).collect();
        write!(f, "repository:{}:{}", self.repository, actions.join(","))
    }
}

/// A pattern of `pull`/`push` policy: `REGISTRY/REPOSITORY`, where the registry part is a
/// [`Pattern`] and the repository part is a name, `PREFIX/*` (anything under it) or `*`; a
/// lone `*` is every repository of every registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoPattern {
    registry: Pattern,
    repository: Option<String>,
}

impl RepoPattern {
    /// Parses one pattern.
    pub fn parse(text: &str) -> Result<RepoPattern, String> {
        if text == "*" {
            return Ok(RepoPattern { registry: Pattern::Any, repository: None });
        }
        let (registry, repository) = text.split_once('/').ok_or_else(|| {
            format!("{text:?}: give REGISTRY/REPOSITORY (REPOSITORY may end in /*, or be *)")
        })?;
        let registry = registry.parse::<Pattern>().map_err(|e| format!("{text:?}: {}", e.0))?;
        let repository = match repository {
            "*" => None,
            r if r.is_empty() || r.contains("//") => {
                return Err(format!("{text:?}: empty repository"));
            }
            r => Some(r.to_owned()),
        };
        Ok(RepoPattern { registry, repository })
    }

    fn matches(&self, registry: &Registry, repository: &str) -> bool {
        if !self.registry.matches(registry) {
            return false;
        }
        match &self.repository {
            None => true,
            Some(p) => match p.strip_suffix("/*") {
                Some(prefix) => repository.strip_prefix(prefix).is_some_and(|r| r.starts_with('/')),
                None => p == repository,
            },
        }
    }
}

impl std::fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.registry, &self.repository) {
            (Pattern::Any, None) => f.write_str("*"),
            (r, Some(repo)) => write!(f, "{r}/{repo}"),
            (r, None) => write!(f, "{r}/*"),
        }
    }
}

/// What a VM may get tokens for: `pull` and `push` patterns, nothing by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenPolicy {
    /// Repositories the VM may pull.
    pub pull: Vec<RepoPattern>,
    /// Repositories the VM may push.
    pub push: Vec<RepoPattern>,
}

impl TokenPolicy {
    /// The registries these rules name one by one (`host[:port]`, `docker.io` for Docker
    /// Hub), sorted, each once: what the VM's registry front is wired for. A pattern naming
    /// many registries (`*`, `*.example.com`) names none here.
    pub fn registries(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .pull
            .iter()
            .chain(&self.push)
            .filter_map(|p| match &p.registry {
                Pattern::Exact { host, .. } if host == finch_shared::registry::DOCKER_HUB_KEY => {
                    Some("docker.io".to_owned())
                }
                Pattern::Exact { host, port: Some(port) } => Some(format!("{host}:{port}")),
                Pattern::Exact { host, port: None } => Some(host.clone()),
                Pattern::Any | Pattern::Suffix(_) => None,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// `scopes` cut to what this policy allows on `registry`: the granted scopes (each with
    /// the actions allowed, none empty) and the refused ones (each with the actions refused).
    pub fn intersect(&self, registry: &Registry, scopes: &[Scope]) -> (Vec<Scope>, Vec<Scope>) {
        let (mut granted, mut refused) = (Vec::new(), Vec::new());
        for scope in scopes {
            let (yes, no): (Vec<Action>, Vec<Action>) = scope.actions.iter().partition(|a| {
                let rule = match a {
                    Action::Pull => &self.pull,
                    Action::Push => &self.push,
                };
                rule.iter().any(|p| p.matches(registry, &scope.repository))
            });
            if !yes.is_empty() {
                granted.push(Scope { repository: scope.repository.clone(), actions: yes });
            }
            if !no.is_empty() {
                refused.push(Scope { repository: scope.repository.clone(), actions: no });
            }
        }
        (granted, refused)
    }
}

/// A registry's Bearer challenge: where its tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The token endpoint.
    pub realm: String,
    /// The service name the registry expects in its tokens.
    pub service: Option<String>,
}

/// Parses a `WWW-Authenticate` header; `None` unless it is a Bearer challenge with a realm
/// that is `https://`, or `http://` to a loopback address (a password never crosses a
/// network in the clear).
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let parsed = finch_shared::challenge::Challenge::parse(header)?;
    if !parsed.is("bearer") {
        return None;
    }
    let realm = parsed.param("realm").map(str::to_owned);
    let service = parsed.param("service").map(str::to_owned);
    let realm = realm?;
    let uri: hyper::Uri = realm.parse().ok()?;
    let loopback = uri
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|h| h.parse::<std::net::IpAddr>().ok())
        .is_some_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if loopback => {}
        _ => return None,
    }
    Some(Challenge { realm, service })
}

/// A token given out, kept for reuse.
#[derive(Debug, Clone)]
struct Cached {
    token: Secret,
    issued: Instant,
    lifetime: u32,
}

impl Cached {
    /// Seconds it is still given out for, if any.
    fn left(&self, now: Instant) -> Option<u32> {
        let age = u32::try_from(now.duration_since(self.issued).as_secs()).unwrap_or(u32::MAX);
        let reuse = self.lifetime - self.lifetime / REUSE_UNTIL_LEFT;
        (age < reuse).then(|| self.lifetime - age)
    }
}

/// Tokens per (VM, registry, scopes), at most [`MAX_TOKENS_PER_VM`] per VM.
#[derive(Debug, Default)]
pub struct TokenCache {
    tokens: HashMap<(String, String, String), Cached>,
}

impl TokenCache {
    fn get(&self, key: &(String, String, String), now: Instant) -> Option<(Secret, u32)> {
        let cached = self.tokens.get(key)?;
        cached.left(now).map(|left| (cached.token.clone(), left))
    }

    fn put(&mut self, key: (String, String, String), cached: Cached, now: Instant) {
        self.tokens.retain(|_, c| c.left(now).is_some());
        let vm = key.0.clone();
        while self.tokens.keys().filter(|k| k.0 == vm).count() >= MAX_TOKENS_PER_VM {
            let oldest = self
                .tokens
                .iter()
                .filter(|(k, _)| k.0 == vm)
                .min_by_key(|(_, c)| c.issued)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.tokens.remove(&k),
                None => break,
            };
        }
        self.tokens.insert(key, cached);
    }

    /// How many tokens `vm` has cached.
    #[cfg(test)]
    fn count(&self, vm: &str) -> usize {
        self.tokens.keys().filter(|k| k.0 == vm).count()
    }
}

type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;
type Body = http_body_util::Full<bytes::Bytes>;

/// Exchanges stored credentials for scoped tokens, with a cache.
pub struct Broker {
    client: hyper_util::client::legacy::Client<Https, Body>,
    cache: Mutex<TokenCache>,
    challenges: Mutex<HashMap<String, (Challenge, Instant)>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

/// The stored credential a token is exchanged for.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Username, or `<token>` for an identity (refresh) token.
    pub username: String,
    /// Password or identity token.
    pub secret: Secret,
}

impl Broker {
    /// A broker trusting the platform's CA store (and `SSL_CERT_FILE` where set).
    pub fn new() -> Result<Broker, WireError> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| WireError::Internal { reason: format!("no CA store: {e}") })?
            .https_or_http()
            .enable_http1()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        Ok(Broker { client, cache: Mutex::default(), challenges: Mutex::default() })
    }

    /// The cached token for `vm` on `registry` carrying `granted`, if one is still given out,
    /// and the seconds it stays valid. Asked first, so a hit costs no credential lookup.
    pub fn cached(
        &self,
        vm: &str,
        registry: &Registry,
        granted: &[Scope],
    ) -> Option<(Secret, u32)> {
        lock(&self.cache).get(&cache_key(vm, registry, granted), Instant::now())
    }

    /// A new token for `vm` on `registry` carrying `granted`, from the registry's realm (with
    /// `stored` when there is one; anonymously otherwise), cached. The answer is the token
    /// and the seconds it stays valid.
    pub async fn fetch(
        &self,
        vm: &str,
        registry: &Registry,
        granted: &[Scope],
        stored: Option<&Stored>,
    ) -> Result<(Secret, u32), WireError> {
        let key = cache_key(vm, registry, granted);
        let scopes: Vec<String> = granted.iter().map(ToString::to_string).collect();
        let challenge = self.challenge(registry).await?;
        let issued = Instant::now();
        let (token, lifetime) = self.exchange(&challenge, &scopes, stored).await?;
        lock(&self.cache).put(
            key,
            Cached { token: token.clone(), issued, lifetime },
            Instant::now(),
        );
        Ok((token, lifetime))
    }

    /// The registry's challenge, remembered for [`CHALLENGE_TTL`].
    async fn challenge(&self, registry: &Registry) -> Result<Challenge, WireError> {
        let key = registry.key();
        if let Some((c, at)) = lock(&self.challenges).get(&key)
            && at.elapsed() < CHALLENGE_TTL
        {
            return Ok(c.clone());
        }
        let host = if registry.is_docker_hub() {
            "registry-1.docker.io".to_owned()
        } else {
            registry.host_port()
        };
        let url = format!("https://{host}/v2/");
        let request = hyper::Request::get(&url).body(Body::default()).map_err(internal)?;
        let response = self.call(request, &url).await?;
        let header = response
            .headers()
            .get(hyper::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let challenge = (response.status() == hyper::StatusCode::UNAUTHORIZED)
            .then(|| parse_challenge(header))
            .flatten()
            // No Bearer challenge: the registry has no token service (ECR's is Basic), and
            // the guest keeps the `get` path for it.
            .ok_or(WireError::NotFound)?;
        let mut known = lock(&self.challenges);
        if known.len() >= MAX_CHALLENGES {
            known.clear();
        }
        known.insert(key, (challenge.clone(), Instant::now()));
        Ok(challenge)
    }

    /// One exchange at the realm.
    async fn exchange(
        &self,
        challenge: &Challenge,
        scopes: &[String],
        stored: Option<&Stored>,
    ) -> Result<(Secret, u32), WireError> {
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(service) = &challenge.service {
            query.push(("service", service));
        }
        for scope in scopes {
            query.push(("scope", scope));
        }
        let request = match stored {
            Some(s) if s.username == finch_shared::docker_config::TOKEN_USERNAME => {
                let mut form = query.clone();
                form.extend([
                    ("grant_type", "refresh_token"),
                    ("refresh_token", s.secret.expose()),
                    ("client_id", CLIENT_ID),
                ]);
                let body = zeroize::Zeroizing::new(encode(&form));
                hyper::Request::post(&challenge.realm)
                    .header(hyper::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(Body::from(body.as_bytes().to_vec()))
                    .map_err(internal)?
            }
            stored => {
                let sep = if challenge.realm.contains('?') { '&' } else { '?' };
                let url = format!("{}{sep}{}", challenge.realm, encode(&query));
                let mut builder = hyper::Request::get(url);
                if let Some(s) = stored {
                    use base64::Engine as _;
                    let pair =
                        zeroize::Zeroizing::new(format!("{}:{}", s.username, s.secret.expose()));
                    let basic = zeroize::Zeroizing::new(format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
                    ));
                    let mut value = hyper::header::HeaderValue::from_str(&basic).map_err(|_| {
                        WireError::BadRequest {
                            reason: "the stored credential cannot be sent in a header".into(),
                        }
                    })?;
                    value.set_sensitive(true);
                    builder = builder.header(hyper::header::AUTHORIZATION, value);
                }
                builder.body(Body::default()).map_err(internal)?
            }
        };
        let response = self.call(request, &challenge.realm).await?;
        let status = response.status();
        let body = read_body(response).await?;
        if status == hyper::StatusCode::UNAUTHORIZED || status == hyper::StatusCode::FORBIDDEN {
            return Err(WireError::Denied {
                reason: format!(
                    "the registry's token service refused the host's credential ({status})"
                ),
            });
        }
        if !status.is_success() {
            return Err(WireError::unavailable(format!(
                "the registry's token service answered {status}"
            )));
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u32>,
        }
        let answer: Answer = serde_json::from_slice(&body).map_err(|_| {
            WireError::unavailable("the registry's token service answered no token")
        })?;
        let token =
            answer.token.or(answer.access_token).filter(|t| !t.is_empty()).ok_or_else(|| {
                WireError::unavailable("the registry's token service answered no token")
            })?;
        let lifetime = answer.expires_in.filter(|s| *s > 0).unwrap_or(60).min(24 * 3600);
        Ok((Secret::new(token), lifetime))
    }

    /// One HTTP call under [`CALL_DEADLINE`]; `what` names it in errors (never a secret).
    async fn call(
        &self,
        request: hyper::Request<Body>,
        what: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, WireError> {
        let what = what.split('?').next().unwrap_or_default().to_owned();
        match tokio::time::timeout(CALL_DEADLINE, self.client.request(request)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                // hyper says "client error (Connect)"; the cause (refused, TLS, DNS) is below.
                let mut reason = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    reason = format!("{reason}: {cause}");
                    source = cause.source();
                }
                Err(WireError::unavailable(format!("cannot reach {what}: {reason}")))
            }
            Err(_) => Err(WireError::unavailable(format!(
                "{what} did not answer within {} s",
                CALL_DEADLINE.as_secs()
            ))),
        }
    }
}

/// A cache entry's key: the VM, the registry and the scopes.
fn cache_key(vm: &str, registry: &Registry, granted: &[Scope]) -> (String, String, String) {
    let scopes: Vec<String> = granted.iter().map(ToString::to_string).collect();
    (vm.to_owned(), registry.key(), scopes.join(" "))
}

/// The body, at most [`MAX_TOKEN_BODY`] bytes, within [`CALL_DEADLINE`].
async fn read_body(
    response: hyper::Response<hyper::body::Incoming>,
) -> Result<zeroize::Zeroizing<Vec<u8>>, WireError> {
    use http_body_util::BodyExt as _;
    let limited = http_body_util::Limited::new(response.into_body(), MAX_TOKEN_BODY);
    match tokio::time::timeout(CALL_DEADLINE, limited.collect()).await {
        Ok(Ok(collected)) => Ok(zeroize::Zeroizing::new(collected.to_bytes().to_vec())),
        Ok(Err(_)) => Err(WireError::unavailable(format!(
            "the registry's token service answered more than {MAX_TOKEN_BODY} bytes, or broke off"
        ))),
        Err(_) => Err(WireError::unavailable("the registry's token service stalled mid-answer")),
    }
}

/// `application/x-www-form-urlencoded` (also a URL query).
fn encode(pairs: &[(&str, &str)]) -> String {
    fn part(s: &str, out: &mut String) {
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        part(k, &mut out);
        out.push('=');
        part(v, &mut out);
    }
    out
}

fn internal(e: impl std::fmt::Display) -> WireError {
    WireError::Internal { reason: e.to_string() }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use finch_shared::challenge::MAX_CHALLENGE;

    #[test]
    fn the_registries_to_wire_are_those_named_one_by_one() {
        let pattern = |t: &str| RepoPattern::parse(t).unwrap();
        let policy = TokenPolicy {
            pull: vec![
                pattern("ghcr.io/team/*"),
                pattern("docker.io/library/*"),
                pattern("r.example:5000/a"),
                pattern("*.example.com/x"),
                pattern("*"),
            ],
            push: vec![pattern("ghcr.io/team/app"), pattern("index.docker.io/me/x")],
        };
        assert_eq!(policy.registries(), ["docker.io", "ghcr.io", "r.example:5000"]);
        assert!(TokenPolicy::default().registries().is_empty());
    }

    #[test]
    fn scopes_are_repository_pulls_and_pushes_only() {
        let s = Scope::parse("repository:team/app:push,pull,pull").unwrap();
        assert_eq!(s.to_string(), "repository:team/app:pull,push");
        for bad in [
            "registry:catalog:*",
            "repository:team/app:delete",
            "repository:Team/app:pull",
            "repository::pull",
            "repository:a//b:pull",
            "repository:a",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
        assert!(Scope::parse(&format!("repository:{}:pull", "a".repeat(300))).is_err());
    }

    #[test]
    fn policy_grants_only_what_its_patterns_name() {
        let reg = Registry::parse("reg.example").unwrap();
        let other = Registry::parse("other.example").unwrap();
        let policy = TokenPolicy {
            pull: vec![RepoPattern::parse("reg.example/*").unwrap()],
            push: vec![RepoPattern::parse("reg.example/team/*").unwrap()],
        };
        let scopes = [
            Scope::parse("repository:team/app:pull,push").unwrap(),
            Scope::parse("repository:teamx/app:pull,push").unwrap(),
        ];
        let (granted, refused) = policy.intersect(&reg, &scopes);
        let text = |v: &[Scope]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(text(&granted), ["repository:team/app:pull,push", "repository:teamx/app:pull"]);
        assert_eq!(text(&refused), ["repository:teamx/app:push"]);
        let (granted, refused) = policy.intersect(&other, &scopes);
        assert!(granted.is_empty() && refused.len() == 2);
        let (granted, _) = TokenPolicy::default().intersect(&reg, &scopes);
        assert!(granted.is_empty(), "the default grants nothing");
        assert!(RepoPattern::parse("reg.example").is_err());
        assert_eq!(RepoPattern::parse("*").unwrap().to_string(), "*");
    }

    #[test]
    fn challenges_name_an_https_realm_or_a_loopback_one() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull""#,
        )
        .unwrap();
        assert_eq!(c.realm, "https://auth.example/token");
        assert_eq!(c.service.as_deref(), Some("registry.example"));
        assert!(parse_challenge(r#"Bearer realm="http://127.0.0.1:5001/token""#).is_some());
        for bad in [
            r#"Bearer realm="http://auth.example/token""#,
            r#"Basic realm="https://auth.example""#,
            r#"Bearer service="x""#,
            r#"Bearer realm="file:///etc/passwd""#,
            r#"Bearer realm="https://x"#,
        ] {
            assert!(parse_challenge(bad).is_none(), "{bad}");
        }
        let huge = format!(r#"Bearer realm="https://a/{}""#, "x".repeat(MAX_CHALLENGE));
        assert!(parse_challenge(&huge).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_gives_a_token_out_until_a_tenth_of_its_life_is_left_and_is_bounded() {
        let mut cache = TokenCache::default();
        let key = |vm: &str, n: usize| (vm.to_owned(), "reg".to_owned(), format!("s{n}"));
        let now = Instant::now();
        let token =
            |n: usize| Cached { token: Secret::new(format!("t{n}")), issued: now, lifetime: 300 };
        cache.put(key("vm", 0), token(0), now);
        assert_eq!(cache.get(&key("vm", 0), now).unwrap().1, 300);
        tokio::time::advance(Duration::from_secs(269)).await;
        assert_eq!(cache.get(&key("vm", 0), Instant::now()).unwrap().1, 31);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(cache.get(&key("vm", 0), Instant::now()).is_none(), "reused past 90 % of its life");
        let now = Instant::now();
        for n in 0..MAX_TOKENS_PER_VM + 10 {
            let t = Cached { token: Secret::new(format!("t{n}")), issued: now, lifetime: 300 };
            cache.put(key("vm", n), t, now);
        }
        cache.put(key("other", 0), token(0), now);
        assert_eq!(cache.count("vm"), MAX_TOKENS_PER_VM);
        assert_eq!(cache.count("other"), 1);
    }

    #[test]
    fn forms_are_percent_encoded() {
        assert_eq!(
            encode(&[("scope", "repository:a/b:pull,push"), ("service", "r.example:5000")]),
            "scope=repository%3Aa%2Fb%3Apull%2Cpush&service=r.example%3A5000"
        );
    }
}
