//! What the registry front changes on the way through, as functions of text: where a
//! request goes, the challenge and `Location` a client sees, and the token answer. No I/O.

use finch_shared::challenge::Challenge;
use finch_shared::message::MAX_SCOPES;
use finch_shared::registry::Registry;

/// Where Docker Hub's registry API is served (`docker.io` names the registry, not the host).
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// The front's token endpoint: `/token/<registry>`.
pub const TOKEN_PATH: &str = "/token/";
/// The front's API root per registry: `/r/<registry>/v2/…`, what install.sh's hosts.toml
/// names (containerd 1.6 adds no `ns` to a push's requests, so the path carries it).
pub const REGISTRY_PATH: &str = "/r/";
/// The mirror form, for containers-image (podman, skopeo): `/v2/m/<name>/<repository>/…`, the
/// registry's name (`:` spelled `__`, which a repository path may hold) first in the
/// repository's path, as `registries.conf`'s `[[registry.mirror]] location =
/// "127.0.0.1:6128/m/<name>"` makes it.
pub const MIRROR_PREFIX: &str = "m/";
/// The token endpoint of the mirror form: the registry rides in the scopes' repositories.
pub const MIRROR_TOKEN_PATH: &str = "/token/mirror";

/// A request the front refuses, with the status and the message the client is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// Registry error code (distribution's spec).
    pub code: &'static str,
    /// What is wrong, for the client.
    pub message: String,
}

impl Refusal {
    fn bad(message: impl Into<String>) -> Refusal {
        Refusal { status: 400, code: "UNSUPPORTED", message: message.into() }
    }
}

/// How a client names the registry: containerd's hosts.toml (the proxy form: `/r/<registry>`
/// or `ns=`) or containers-image's mirror (`/v2/m/<name>/…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `/r/<registry>/v2/…` or `/v2/…?ns=<registry>`.
    Proxy,
    /// `/v2/m/<name>/…`.
    Mirror,
}

/// What a request to the front is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/token/<registry>`: a token, from the host's broker.
    Token(Registry),
    /// `/token/mirror`: a token for the registry the scopes name (mirror form).
    MirrorToken,
    /// `/v2/` alone: a mirror client's ping, answered with the front's own challenge.
    Ping,
    /// `/r/<registry>/v2/…`, or `/v2/…?ns=<registry>`: forwarded to the registry, with
    /// this path and query (`ns` taken out).
    Forward {
        /// The registry, as containerd's `ns` names it.
        registry: Registry,
        /// Path and query to send upstream.
        path_and_query: String,
        /// How the client named the registry (what answers are rewritten to).
        form: Form,
    },
}

/// Routes a request by its path and query.
pub fn route(path: &str, query: Option<&str>) -> Result<Route, Refusal> {
    if path == MIRROR_TOKEN_PATH {
        return Ok(Route::MirrorToken);
    }
    if let Some(rest) = path.strip_prefix("/v2/").and_then(|p| p.strip_prefix(MIRROR_PREFIX)) {
        let (name, tail) = rest.split_once('/').unwrap_or((rest, ""));
        let registry = registry(&from_mirror_name(name))?;
        let path = format!("/v2/{tail}");
        let path_and_query = match query {
            Some(q) if !q.is_empty() => format!("{path}?{q}"),
            _ => path,
        };
        return Ok(Route::Forward { registry, path_and_query, form: Form::Mirror });
    }
    if let Some(name) = path.strip_prefix(TOKEN_PATH) {
        return registry(&percent_decode(name)?).map(Route::Token);
    }
    let (in_path, path) = match path.strip_prefix(REGISTRY_PATH) {
        Some(rest) => {
            let (name, api) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            (Some(percent_decode(name)?), api)
        }
        None => (None, path),
    };
    if path != "/v2" && !path.starts_with("/v2/") {
        return Err(Refusal {
            status: 404,
            code: "NAME_UNKNOWN",
            message: "finch's registry front serves /r/REGISTRY/v2/, /v2/ and /token/ only".into(),
        });
    }
    let mut ns = in_path;
    let mut kept = Vec::new();
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("ns", value)) => {
                let value = percent_decode(value)?;
                if ns.as_ref().is_some_and(|n| *n != value) {
                    return Err(Refusal::bad("two different registries in one request"));
                }
                ns = Some(value);
            }
            _ => kept.push(pair),
        }
    }
    let Some(ns) = ns else {
        if path == "/v2/" || path == "/v2" {
            return Ok(Route::Ping);
        }
        return Err(Refusal::bad(
            "no registry named: this is finch's registry front; name \
             https://127.0.0.1:PORT/r/REGISTRY as a host of the registry in containerd's hosts.toml",
        ));
    };
    let registry = registry(&ns)?;
    let path_and_query =
        if kept.is_empty() { path.to_owned() } else { format!("{path}?{}", kept.join("&")) };
    Ok(Route::Forward { registry, path_and_query, form: Form::Proxy })
}

/// The registry's name in the mirror form: `:` spelled `__`.
pub fn mirror_name(registry: &Registry) -> String {
    registry.host_port().replace(':', "__")
}

fn from_mirror_name(name: &str) -> String {
    name.replace("__", ":")
}

/// The registry and the scopes to ask it for, from a mirror client's scopes
/// (`repository:m/<name>/<repository>:<actions>`): every scope must name the same registry.
pub fn mirror_scopes(scopes: &[String]) -> Result<(Registry, Vec<String>), Refusal> {
    let mut found: Option<String> = None;
    let mut out = Vec::with_capacity(scopes.len());
    for scope in scopes {
        let rest = scope
            .strip_prefix("repository:")
            .and_then(|r| r.strip_prefix(MIRROR_PREFIX))
            .ok_or_else(|| {
                Refusal::bad("a mirror token's scope names no m/REGISTRY/ repository")
            })?;
        let (name, repository) = rest
            .split_once('/')
            .ok_or_else(|| Refusal::bad("a mirror scope names no repository"))?;
        if found.as_ref().is_some_and(|f| f != name) {
            return Err(Refusal::bad("a mirror token's scopes name two registries"));
        }
        found = Some(name.to_owned());
        out.push(format!("repository:{repository}"));
    }
    let name = found.ok_or_else(|| Refusal::bad("a token request names no scope"))?;
    Ok((registry(&from_mirror_name(&name))?, out))
}

/// The challenge a mirror client's ping gets: the front's own token endpoint.
pub fn ping_challenge(origin: &str) -> String {
    Challenge {
        scheme: "Bearer".into(),
        params: vec![
            ("realm".into(), format!("{origin}{MIRROR_TOKEN_PATH}")),
            ("service".into(), "finch-registry-front".into()),
        ],
    }
    .render()
}

/// A registry name as `ns=` or the token path gives it: `host[:port]` and nothing else.
fn registry(name: &str) -> Result<Registry, Refusal> {
    let plain = name.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b))
        && !name.is_empty();
    if !plain {
        return Err(Refusal::bad("the registry is not a host[:port]"));
    }
    Registry::parse(name).map_err(|e| Refusal::bad(format!("the registry: {e}")))
}

/// `host[:port]` the registry's API is served at.
pub fn upstream_authority(registry: &Registry) -> String {
    if registry.is_docker_hub() { DOCKER_HUB_API.to_owned() } else { registry.host_port() }
}

/// The challenge a client sees for upstream's `header`: a Bearer challenge's realm becomes
/// the front's token endpoint for `registry` (the rest is kept: service, scope, error).
/// Anything else, or a challenge that does not parse, is `None` (sent as it came).
pub fn challenge(header: &str, registry: &Registry, origin: &str, form: Form) -> Option<String> {
    let mut c = Challenge::parse(header)?;
    if !c.is("bearer") {
        return None;
    }
    match form {
        Form::Proxy => c.set("realm", format!("{origin}{TOKEN_PATH}{}", registry.host_port())),
        Form::Mirror => {
            c.set("realm", format!("{origin}{MIRROR_TOKEN_PATH}"));
            // Scopes as the client names its repositories, so an insufficient_scope retry
            // asks for what it means.
            if let Some(scope) = c.param("scope") {
                let name = mirror_name(registry);
                let ours: Vec<String> = scope
                    .split(' ')
                    .map(|s| match s.strip_prefix("repository:") {
                        Some(rest) => format!("repository:{MIRROR_PREFIX}{name}/{rest}"),
                        None => s.to_owned(),
                    })
                    .collect();
                c.set("scope", ours.join(" "));
            }
        }
    }
    Some(c.render())
}

/// Whether upstream's challenge asks for Basic credentials (ECR's does).
pub fn is_basic(header: &str) -> bool {
    Challenge::parse(header).is_some_and(|c| c.is("basic"))
}

/// The `Location` a client sees for upstream's `location`: a path on the registry, or an
/// absolute URL on it, becomes the same path under the front's `/r/<registry>` (containerd
/// drops its credentials when an upload's host changes, and 1.6 adds no `ns` to it). A URL
/// elsewhere (blob storage) is `None`: passed through as it came.
pub fn location(location: &str, registry: &Registry, origin: &str, form: Form) -> Option<String> {
    let path_and_query = if location.starts_with('/') && !location.starts_with("//") {
        location.to_owned()
    } else {
        let uri: hyper::Uri = location.parse().ok()?;
        let authority = uri.authority()?;
        let upstream = upstream_authority(registry);
        let same_host = authority.as_str().eq_ignore_ascii_case(&upstream)
            || (authority.port_u16() == Some(443)
                && registry.port().is_none()
                && authority.host().eq_ignore_ascii_case(&upstream));
        if uri.scheme_str() != Some("https") || !same_host {
            return None;
        }
        uri.path_and_query()?.as_str().to_owned()
    };
    match form {
        Form::Proxy => {
            Some(format!("{origin}{REGISTRY_PATH}{}{path_and_query}", registry.host_port()))
        }
        Form::Mirror => {
            let tail = path_and_query.strip_prefix("/v2/")?;
            Some(format!("{origin}/v2/{MIRROR_PREFIX}{}/{tail}", mirror_name(registry)))
        }
    }
}

/// The scopes a token request asks for: every `scope` parameter of the query and of a form
/// body, each split at spaces (OAuth2's form), each once.
pub fn scopes(query: Option<&str>, form: Option<&str>) -> Result<Vec<String>, Refusal> {
    let mut out: Vec<String> = Vec::new();
    for text in [query, form].into_iter().flatten() {
        for pair in text.split('&') {
            let Some(("scope", value)) = pair.split_once('=') else { continue };
            for scope in percent_decode(&value.replace('+', " "))?.split(' ') {
                if !scope.is_empty() && !out.iter().any(|s| s == scope) {
                    out.push(scope.to_owned());
                }
            }
        }
    }
    if out.len() > MAX_SCOPES {
        return Err(Refusal::bad(format!("more than {MAX_SCOPES} scopes")));
    }
    if out.is_empty() {
        return Err(Refusal::bad("a token request names no scope"));
    }
    Ok(out)
}

/// The token answer, in both spellings distribution's spec allows (`token` for the token
/// flow, `access_token` for OAuth2's).
pub fn token_body(token: &str, expires_in: u32) -> String {
    serde_json::json!({ "token": token, "access_token": token, "expires_in": expires_in })
        .to_string()
}

/// A registry error body (distribution's spec), the message JSON-escaped.
pub fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({ "errors": [{ "code": code, "message": message }] }).to_string()
}

/// Decodes `%XX` escapes; `None` (a refusal) for a broken escape or text that is not UTF-8.
fn percent_decode(text: &str) -> Result<String, Refusal> {
    let bad = || Refusal::bad("a broken %-escape in the request");
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "https://127.0.0.1:6128";

    fn reg(name: &str) -> Registry {
        Registry::parse(name).unwrap()
    }

    #[test]
    fn requests_are_routed_by_ns_and_ns_is_taken_out() {
        assert_eq!(
            route("/v2/a/manifests/latest", Some("ns=r.example%3A5000")).unwrap(),
            Route::Forward {
                registry: reg("r.example:5000"),
                path_and_query: "/v2/a/manifests/latest".into(),
                form: Form::Proxy,
            }
        );
        assert_eq!(
            route(
                "/v2/a/blobs/uploads/u",
                Some("_state=x%3D&ns=r.example&digest=sha256%3A1&ns=r.example")
            )
            .unwrap(),
            Route::Forward {
                registry: reg("r.example"),
                path_and_query: "/v2/a/blobs/uploads/u?_state=x%3D&digest=sha256%3A1".into(),
                form: Form::Proxy,
            }
        );
        assert_eq!(
            route("/token/r.example:5000", None).unwrap(),
            Route::Token(reg("r.example:5000"))
        );
        assert_eq!(
            route("/token/docker.io", Some("scope=x")).unwrap(),
            Route::Token(reg("docker.io"))
        );
    }

    #[test]
    fn requests_the_front_cannot_place_are_refused() {
        assert_eq!(route("/v2/a/manifests/x", None).unwrap_err().status, 400);
        assert_eq!(route("/v2/m/a%2Fb/x", None).unwrap_err().status, 400);
        assert_eq!(route("/v2/", Some("ns=a&ns=b")).unwrap_err().status, 400);
        assert_eq!(route("/r/a/v2/", Some("ns=b")).unwrap_err().status, 400);
        assert_eq!(route("/r/a/metrics", None).unwrap_err().status, 404);
        assert_eq!(route("/r/evil.example%2Fx/v2/", None).unwrap_err().status, 400);
        assert_eq!(route("/metrics", Some("ns=a")).unwrap_err().status, 404);
        for ns in ["evil.example/x", "user@r.example", "r.example%2Fx", "", "%zz", "a%ff"] {
            let err = route("/v2/", Some(&format!("ns={ns}"))).unwrap_err();
            assert_eq!(err.status, 400, "{ns}");
        }
        assert_eq!(route("/token/evil.example%2Fx", None).unwrap_err().status, 400);
    }

    #[test]
    fn the_mirror_form_names_the_registry_in_the_repository() {
        let r = reg("10.1.2.3:5000");
        assert_eq!(mirror_name(&r), "10.1.2.3__5000");
        assert_eq!(
            route("/v2/m/10.1.2.3__5000/team/app/manifests/v1", Some("x=1")).unwrap(),
            Route::Forward {
                registry: r.clone(),
                path_and_query: "/v2/team/app/manifests/v1?x=1".into(),
                form: Form::Mirror
            }
        );
        assert_eq!(route("/v2/", None).unwrap(), Route::Ping);
        assert_eq!(route("/token/mirror", Some("scope=x")).unwrap(), Route::MirrorToken);
        let ping = Challenge::parse(&ping_challenge(ORIGIN)).unwrap();
        assert_eq!(ping.param("realm"), Some("https://127.0.0.1:6128/token/mirror"));

        let scopes = ["repository:m/10.1.2.3__5000/team/app:pull".to_owned()];
        assert_eq!(
            mirror_scopes(&scopes).unwrap(),
            (r.clone(), vec!["repository:team/app:pull".into()])
        );
        let two = ["repository:m/a/x:pull".to_owned(), "repository:m/b/x:pull".to_owned()];
        assert_eq!(mirror_scopes(&two).unwrap_err().status, 400);
        assert_eq!(mirror_scopes(&["repository:x:pull".to_owned()]).unwrap_err().status, 400);

        let up = r#"Bearer realm="https://auth/t",service="s",scope="repository:team/app:pull""#;
        let seen = Challenge::parse(&challenge(up, &r, ORIGIN, Form::Mirror).unwrap()).unwrap();
        assert_eq!(seen.param("realm"), Some("https://127.0.0.1:6128/token/mirror"));
        assert_eq!(seen.param("scope"), Some("repository:m/10.1.2.3__5000/team/app:pull"));
        assert_eq!(
            location("/v2/team/app/blobs/sha256:1", &r, ORIGIN, Form::Mirror).unwrap(),
            "https://127.0.0.1:6128/v2/m/10.1.2.3__5000/team/app/blobs/sha256:1"
        );
    }

    #[test]
    fn bearer_challenges_point_at_the_front_and_keep_the_rest() {
        let up = r#"Bearer realm="https://auth.example/token",service="registry",scope="repository:a:pull",error="insufficient_scope""#;
        let seen = challenge(up, &reg("r.example:5000"), ORIGIN, Form::Proxy).unwrap();
        let c = Challenge::parse(&seen).unwrap();
        assert_eq!(c.param("realm"), Some("https://127.0.0.1:6128/token/r.example:5000"));
        assert_eq!(c.param("service"), Some("registry"));
        assert_eq!(c.param("scope"), Some("repository:a:pull"));
        assert_eq!(c.param("error"), Some("insufficient_scope"));
        let hub = challenge(up, &reg("docker.io"), ORIGIN, Form::Proxy).unwrap();
        assert!(hub.contains("/token/docker.io\""), "{hub}");

        assert_eq!(challenge(r#"Basic realm="https://x/""#, &reg("r"), ORIGIN, Form::Proxy), None);
        assert!(is_basic(r#"Basic realm="https://x/""#));
        assert!(!is_basic(up));
    }

    #[test]
    fn locations_on_the_registry_come_back_to_the_front() {
        let r = reg("r.example:5000");
        assert_eq!(
            location("/v2/a/blobs/uploads/u?_state=s", &r, ORIGIN, Form::Proxy).unwrap(),
            "https://127.0.0.1:6128/r/r.example:5000/v2/a/blobs/uploads/u?_state=s"
        );
        assert_eq!(
            location("https://r.example:5000/v2/a/blobs/uploads/u", &r, ORIGIN, Form::Proxy)
                .unwrap(),
            "https://127.0.0.1:6128/r/r.example:5000/v2/a/blobs/uploads/u"
        );
        let ecr = reg("1.dkr.ecr.us-east-1.amazonaws.com");
        assert!(
            location(
                "https://1.dkr.ecr.us-east-1.amazonaws.com:443/v2/x",
                &ecr,
                ORIGIN,
                Form::Proxy
            )
            .is_some()
        );
        // Blob storage, plain http to the registry, protocol-relative: passed through.
        for elsewhere in [
            "https://bucket.s3.amazonaws.com/blob?X-Amz-Signature=s",
            "http://r.example:5000/v2/a",
            "//evil.example/v2/a",
        ] {
            assert_eq!(location(elsewhere, &r, ORIGIN, Form::Proxy), None, "{elsewhere}");
        }
        let hub = reg("docker.io");
        assert_eq!(
            location("https://registry-1.docker.io/v2/x", &hub, ORIGIN, Form::Proxy).unwrap(),
            "https://127.0.0.1:6128/r/docker.io/v2/x"
        );
    }

    #[test]
    fn token_requests_give_their_scopes_each_once() {
        assert_eq!(
            scopes(
                Some("service=s&scope=repository%3Aa%3Apull&scope=repository:b:pull,push"),
                None
            )
            .unwrap(),
            ["repository:a:pull", "repository:b:pull,push"]
        );
        assert_eq!(
            scopes(
                None,
                Some("grant_type=password&scope=repository:a:pull+repository:a:pull&client_id=c")
            )
            .unwrap(),
            ["repository:a:pull"]
        );
        assert_eq!(scopes(Some("service=s"), None).unwrap_err().status, 400);
        let many: Vec<String> =
            (0..=MAX_SCOPES).map(|i| format!("scope=repository:r{i}:pull")).collect();
        assert_eq!(scopes(Some(&many.join("&")), None).unwrap_err().status, 400);
    }

    #[test]
    fn answers_are_json_with_everything_escaped() {
        let body: serde_json::Value = serde_json::from_str(&token_body("t\"k", 300)).unwrap();
        assert_eq!(body["token"], "t\"k");
        assert_eq!(body["access_token"], "t\"k");
        assert_eq!(body["expires_in"], 300);
        let err: serde_json::Value =
            serde_json::from_str(&error_body("DENIED", "a \"b\"\n")).unwrap();
        assert_eq!(err["errors"][0]["message"], "a \"b\"\n");
    }
}
