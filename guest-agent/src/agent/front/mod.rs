//! The registry front (issue 22): a loopback HTTPS endpoint that containerd's `hosts.toml`
//! names as a host of each registry, so clients in the VM are handed short-lived scoped
//! tokens instead of the registry's password.
//!
//! * Each `/r/<registry>/v2/…` request (also `/v2/…?ns=<registry>`) is forwarded to
//!   `https://<registry>/v2/…` over the VM's own network (TLS verified against the VM's CA
//!   store, or `SSL_CERT_FILE`), bodies streamed both ways.
//! * A Bearer challenge's realm becomes the front's `/token/<registry>`, which the host's
//!   broker answers over the link ([`LinkSlot::token`]): the client asks the front
//!   anonymously and gets a token cut to the VM's `pull`/`push` policy.
//! * `Location`s on the registry come back to the front; a redirect elsewhere (blob storage)
//!   passes through, and the client follows it without the registry's `Authorization`.
//! * A registry that asks for Basic credentials (ECR) gets the host's answer from the front
//!   itself, so the credential stays in this process.
//! * containers-image tools (podman, skopeo) reach it as a pull mirror: `/v2/m/<name>/…`, the
//!   registry in the repository's path; their ping (`/v2/`) is answered with the front's
//!   `/token/mirror`, which reads the registry from the scopes ([`rewrite::Form`]).
//!
//! Who may ask: a caller of an allowed uid (the helper socket's: root, the agent's own,
//! `--allow-uid`), found through the kernel's socket table ([`peer`]) before a byte is read,
//! that then completes a TLS handshake with the front's client certificate ([`tls`]): root in
//! a container on the VM's network has the uid but not the certificate. Bounds:
//! [`MAX_CONNECTIONS`] at once, [`MAX_HEADER_BYTES`] of request head, deadlines on the
//! handshake, on connecting, on upstream's answer and on a body that stops moving.

pub mod peer;
pub mod rewrite;
pub mod tls;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use finch_shared::limit::LogGate;
use finch_shared::message::{
    Request as LinkRequest, Response as LinkResponse, TokenRequest, WireError,
};
use finch_shared::registry::Registry;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use self::rewrite::{Form, Refusal, Route};
use super::link::LinkSlot;
use super::{Shutdown, accept_loop};

/// The front's port when `--front-listen` names none (the link's vsock port is 6127).
pub const DEFAULT_FRONT_PORT: u16 = 6128;
/// Most connections served at once; past it, clients wait in the backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// Most bytes of a request's head (request line and headers).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// hyper's read buffer for upstream's response head: a head still incomplete once the buffer
/// passes it is refused (one read may fill past it, so a head of up to about twice this gets
/// through).
pub const MAX_UPSTREAM_HEADER_BYTES: usize = 64 * 1024;
/// Deadline for a TCP connection to a registry.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for upstream's answer to a request without a body (`--front-answer-timeout-secs`).
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for upstream's answer to a request with a body (an upload), counted from its
/// start: its body has [`IDLE_TIMEOUT`] besides.
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest a body (either way) may stop moving.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a client may take to send a request's head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Most registries remembered as asking for Basic credentials.
pub const MAX_BASIC_REGISTRIES: usize = 256;
/// Most bytes of a token request's form body.
const MAX_TOKEN_FORM: usize = 8 * 1024;
/// Refusals logged per window; the rest are counted.
const REFUSAL_BURST: u32 = 10;
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;
type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// The bound front, ready to [`Front::run`].
pub struct Front {
    listener: TcpListener,
    local: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
}

/// What every connection shares.
struct Shared {
    slot: LinkSlot,
    client: Client<Https, Body>,
    /// Deadline for upstream's answer to a request without a body.
    answer_timeout: Duration,
    /// `https://127.0.0.1:PORT`: what challenges and locations are rewritten to.
    origin: String,
    allowed: Arc<[u32]>,
    /// Registries that asked for Basic credentials, newest last.
    basic: Mutex<VecDeque<Registry>>,
    refusals: Mutex<LogGate>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front").field("local", &self.local).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl Front {
    /// Binds `listen` (a loopback address only) with the TLS certificates in `certs` (made
    /// there when missing; `group` may read the clients' key) and makes the upstream client,
    /// trusting the VM's CA store. Callers from `allowed` uids holding the clients'
    /// certificate are served over `slot`.
    pub fn bind(
        listen: SocketAddr,
        certs: &std::path::Path,
        group: Option<u32>,
        answer_timeout: Duration,
        slot: LinkSlot,
        allowed: Arc<[u32]>,
    ) -> anyhow::Result<Front> {
        anyhow::ensure!(
            listen.ip().is_loopback(),
            "--front-listen must be a loopback address (127.0.0.1 or [::1]), not {listen}"
        );
        let (server_config, made) = tls::server_config(certs, listen.ip(), group)
            .with_context(|| format!("the registry front's certificates in {}", certs.display()))?;
        if made {
            tracing::info!(dir = %certs.display(), "registry front: new certificates made");
        }
        let std_listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("cannot listen on the registry front {listen}"))?;
        std_listener.set_nonblocking(true)?;
        let local = std_listener.local_addr()?;
        let listener = TcpListener::from_std(std_listener)?;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .context(
                "the registry front verifies registries against the VM's CA store, and found none",
            )?
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .http1_max_buf_size(MAX_UPSTREAM_HEADER_BYTES)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        let shared = Arc::new(Shared {
            slot,
            client,
            answer_timeout,
            origin: format!("https://{local}"),
            allowed,
            basic: Mutex::default(),
            refusals: Mutex::new(LogGate::new(REFUSAL_WINDOW, REFUSAL_BURST)),
        });
        let tls = tokio_rustls::TlsAcceptor::from(server_config);
        Ok(Front { listener, local, tls, shared })
    }

    /// The address bound (its port chosen by the kernel when `listen` named 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serves until `shutdown`.
    pub async fn run(self, shutdown: Shutdown) {
        let Front { listener, local, tls, shared } = self;
        let admit = |(stream, peer): (TcpStream, SocketAddr)| {
            let uid = match peer::loopback_peer_uid(local, peer) {
                Ok(Some(uid)) if shared.allowed.contains(&uid) => uid,
                found => {
                    shared.refused(peer, &found);
                    return None;
                }
            };
            let shared = shared.clone();
            let tls = tls.clone();
            let mut stop = shutdown.clone();
            Some(async move {
                tokio::select! {
                    () = shared.serve_connection(&tls, stream, peer, uid) => {}
                    () = stop.wait() => {}
                }
            })
        };
        accept_loop(
            "registry front",
            MAX_CONNECTIONS,
            async || listener.accept().await,
            admit,
            shutdown.clone(),
        )
        .await;
    }
}

impl Shared {
    /// Whether a refusal is logged now (with how many went unlogged), or only counted.
    fn refusal_gate(&self) -> Option<u64> {
        self.refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .admit(tokio::time::Instant::now().into_std())
    }

    /// A caller that did not complete the TLS handshake (no client certificate, or not ours).
    fn no_handshake(&self, peer: SocketAddr, uid: u32, why: &str) {
        let gate = self.refusal_gate();
        if let Some(suppressed) = gate {
            tracing::warn!(%peer, uid, error = %why, suppressed, "registry front: TLS handshake refused (a client needs the front's client certificate)");
        }
    }

    fn refused(&self, peer: SocketAddr, found: &std::io::Result<Option<u32>>) {
        let gate = self.refusal_gate();
        if let Some(suppressed) = gate {
            match found {
                Ok(Some(uid)) => {
                    tracing::warn!(%peer, uid, suppressed, "registry front: uid not allowed")
                }
                Ok(None) => {
                    tracing::warn!(%peer, suppressed, "registry front: caller not found in the socket table")
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, suppressed, "registry front: cannot read the socket table")
                }
            }
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        tls: &tokio_rustls::TlsAcceptor,
        stream: TcpStream,
        peer: SocketAddr,
        uid: u32,
    ) {
        // Only a client holding the clients' certificate gets a handshake (within the head's
        // deadline): a container on the VM's network, root or not, does not hold it.
        let stream = match tokio::time::timeout(HEAD_TIMEOUT, tls.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                self.no_handshake(peer, uid, &e.to_string());
                return;
            }
            Err(_) => {
                self.no_handshake(peer, uid, "no handshake within the deadline");
                return;
            }
        };
        let service = hyper::service::service_fn(move |req| {
            let shared = self.clone();
            async move { Ok::<_, Infallible>(shared.handle(req, uid).await) }
        });
        let served = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .max_buf_size(MAX_HEADER_BYTES)
            .serve_connection(TokioIo::new(stream), service)
            .await;
        if let Err(e) = served {
            tracing::debug!(uid, error = %e, "registry front: connection ended");
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, uid: u32) -> Response<Body> {
        match rewrite::route(req.uri().path(), req.uri().query()) {
            Err(refusal) => {
                tracing::debug!(uid, method = %req.method(), path = ?req.uri().path(), status = refusal.status, "registry front: refused");
                refuse(&refusal)
            }
            Ok(Route::Token(registry)) => self.token(req, Some(registry), uid).await,
            Ok(Route::MirrorToken) => self.token(req, None, uid).await,
            Ok(Route::Ping) => {
                let mut resp = refuse(&Refusal {
                    status: 401,
                    code: "UNAUTHORIZED",
                    message: "ask the front's token endpoint".into(),
                });
                if let Ok(value) = HeaderValue::from_str(&rewrite::ping_challenge(&self.origin)) {
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, value);
                }
                resp.headers_mut().insert(
                    "docker-distribution-api-version",
                    HeaderValue::from_static("registry/2.0"),
                );
                resp
            }
            Ok(Route::Forward { registry, path_and_query, form }) => {
                self.forward(req, registry, path_and_query, form, uid).await
            }
        }
    }

    /// `/token/<registry>` (or `/token/mirror`, `registry` `None`: the scopes name it): the
    /// scopes asked for (query, or a POSTed form) go to the host.
    async fn token(
        &self,
        req: Request<Incoming>,
        registry: Option<Registry>,
        uid: u32,
    ) -> Response<Body> {
        let query = req.uri().query().map(str::to_owned);
        let form = if req.method() == Method::POST {
            let limited = Limited::new(req.into_body(), MAX_TOKEN_FORM);
            match tokio::time::timeout(super::IO_TIMEOUT, limited.collect()).await {
                Ok(Ok(body)) => Some(String::from_utf8_lossy(&body.to_bytes()).into_owned()),
                _ => {
                    return refuse(&Refusal {
                        status: 400,
                        code: "UNSUPPORTED",
                        message: format!(
                            "a token form must arrive whole, within {MAX_TOKEN_FORM} bytes"
                        ),
                    });
                }
            }
        } else {
            None
        };
        let scopes = match rewrite::scopes(query.as_deref(), form.as_deref()) {
            Ok(s) => s,
            Err(r) => return refuse(&r),
        };
        let (registry, scopes) = match registry {
            Some(registry) => (registry, scopes),
            None => match rewrite::mirror_scopes(&scopes) {
                Ok(found) => found,
                Err(r) => return refuse(&r),
            },
        };
        let request = TokenRequest { registry: registry.host_port(), scopes };
        match self.slot.token(request).await {
            Ok(token) => {
                tracing::debug!(uid, registry = %registry, granted = ?token.granted, expires_in = token.expires_in, "registry front: token");
                let body = rewrite::token_body(token.token.expose(), token.expires_in);
                let mut resp = Response::new(full(body));
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                resp.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                resp
            }
            Err(e) => {
                tracing::info!(uid, registry = %registry, result = e.class(), "registry front: no token");
                refuse(&wire_refusal(&e))
            }
        }
    }

    /// Forwards one request upstream and rewrites what comes back.
    async fn forward(
        &self,
        req: Request<Incoming>,
        registry: Registry,
        path_and_query: String,
        form: Form,
        uid: u32,
    ) -> Response<Body> {
        let uri: Uri =
            match format!("https://{}{path_and_query}", rewrite::upstream_authority(&registry))
                .parse()
            {
                Ok(u) => u,
                Err(_) => {
                    return refuse(&Refusal {
                        status: 400,
                        code: "UNSUPPORTED",
                        message: "the request's path is not a URI path".into(),
                    });
                }
            };
        let (parts, body) = req.into_parts();
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        let client_auth = headers.contains_key(header::AUTHORIZATION);
        let bodyless = matches!(parts.method, Method::GET | Method::HEAD) && body.is_end_stream();
        let mut injected = false;
        if !client_auth
            && self.asks_basic(&registry)
            && let Some(auth) = self.basic(&registry).await
        {
            headers.insert(header::AUTHORIZATION, auth);
            injected = true;
        }
        let deadline = if body.is_end_stream() { self.answer_timeout } else { UPLOAD_TIMEOUT };
        let body = Idle::new(body).boxed();
        let mut answer = self.send(&parts.method, &uri, &headers, body, deadline).await;
        // A registry first seen asking for Basic: answered once more, with the host's
        // credential, when the request can be sent again (it has no body).
        if let Ok(resp) = &answer
            && resp.status() == StatusCode::UNAUTHORIZED
            && bodyless
            && !client_auth
            && !injected
            && resp
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .any(|v| v.to_str().is_ok_and(rewrite::is_basic))
        {
            self.remember_basic(&registry);
            if let Some(auth) = self.basic(&registry).await {
                headers.insert(header::AUTHORIZATION, auth);
                let empty = Empty::new().map_err(|never| match never {}).boxed();
                answer = self.send(&parts.method, &uri, &headers, empty, self.answer_timeout).await;
            }
        }
        match answer {
            Ok(resp) => {
                tracing::debug!(uid, method = %parts.method, registry = %registry, status = resp.status().as_u16(), "registry front: forwarded");
                self.answer(resp, &registry, form)
            }
            Err(message) => {
                tracing::info!(uid, method = %parts.method, registry = %registry, error = %message, "registry front: upstream failed");
                refuse(&Refusal { status: 502, code: "UNAVAILABLE", message })
            }
        }
    }

    /// Sends one request upstream; the error is said for the client.
    async fn send(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Body,
        deadline: Duration,
    ) -> Result<Response<Incoming>, String> {
        let mut req = Request::new(body);
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = headers.clone();
        let authority = uri.authority().map_or("", |a| a.as_str());
        match tokio::time::timeout(deadline, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                Err(format!("finch's registry front cannot reach {authority}: {}", chain(&e)))
            }
            Err(_) => Err(format!("{authority} did not answer within {} s", deadline.as_secs())),
        }
    }

    /// Upstream's answer as the client sees it.
    fn answer(&self, resp: Response<Incoming>, registry: &Registry, form: Form) -> Response<Body> {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(loc) = parts.headers.get(header::LOCATION).and_then(|v| v.to_str().ok())
            && let Some(ours) = rewrite::location(loc, registry, &self.origin, form)
            && let Ok(value) = HeaderValue::from_str(&ours)
        {
            parts.headers.insert(header::LOCATION, value);
        }
        let challenges: Vec<HeaderValue> = parts
            .headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|text| rewrite::challenge(text, registry, &self.origin, form))
                    .and_then(|ours| HeaderValue::from_str(&ours).ok())
                    .unwrap_or_else(|| v.clone())
            })
            .collect();
        if !challenges.is_empty() {
            parts.headers.remove(header::WWW_AUTHENTICATE);
            for c in challenges {
                parts.headers.append(header::WWW_AUTHENTICATE, c);
            }
        }
        Response::from_parts(parts, Idle::new(body).boxed())
    }

    fn asks_basic(&self, registry: &Registry) -> bool {
        lock(&self.basic).contains(registry)
    }

    fn remember_basic(&self, registry: &Registry) {
        remember(&mut lock(&self.basic), registry);
    }

    /// The host's credential for `registry` as a Basic `Authorization`, if it has one; an
    /// identity token (user `<token>`) is no Basic credential.
    async fn basic(&self, registry: &Registry) -> Option<HeaderValue> {
        use base64::Engine as _;
        let asked = self.slot.request(LinkRequest::Get { server: registry.host_port() }).await;
        match asked {
            Ok(LinkResponse::Credential { username, secret }) if username != "<token>" => {
                let pair = zeroize::Zeroizing::new(format!("{username}:{}", secret.expose()));
                let encoded = zeroize::Zeroizing::new(
                    base64::engine::general_purpose::STANDARD.encode(pair.as_bytes()),
                );
                let mut value =
                    HeaderValue::from_str(&format!("Basic {}", encoded.as_str())).ok()?;
                value.set_sensitive(true);
                Some(value)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::info!(registry = %registry, result = e.class(), "registry front: no credential to add");
                None
            }
        }
    }
}

/// Adds `registry` to the registries known to ask for Basic credentials, at most
/// [`MAX_BASIC_REGISTRIES`], the oldest out first.
fn remember(known: &mut VecDeque<Registry>, registry: &Registry) {
    if !known.contains(registry) {
        if known.len() >= MAX_BASIC_REGISTRIES {
            known.pop_front();
        }
        known.push_back(registry.clone());
    }
}

/// The status and registry error a host's refusal is told to the client as.
fn wire_refusal(e: &WireError) -> Refusal {
    let (status, code) = match e {
        WireError::NotFound => (404, "NAME_UNKNOWN"),
        WireError::Denied { .. } => (403, "DENIED"),
        WireError::BadRequest { .. } => (400, "UNSUPPORTED"),
        WireError::Unavailable { .. } => (503, "UNAVAILABLE"),
        WireError::Internal { .. } => (500, "UNKNOWN"),
    };
    Refusal { status, code, message: e.to_string() }
}

/// A refusal as a registry error answer.
fn refuse(refusal: &Refusal) -> Response<Body> {
    let mut resp = Response::new(full(rewrite::error_body(refusal.code, &refusal.message)));
    *resp.status_mut() = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_GATEWAY);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed()
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1), those `Connection` names among them,
/// and `Expect` (the front answers `100 Continue` itself).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::EXPECT,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// An error and its causes, `: `-joined.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A body that fails when it stops moving for [`IDLE_TIMEOUT`].
struct Idle {
    inner: Incoming,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Idle {
    fn new(inner: Incoming) -> Idle {
        Idle { inner, timer: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)) }
    }
}

impl hyper::body::Body for Idle {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.timer.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                    "the body sent nothing for {} s",
                    IDLE_TIMEOUT.as_secs()
                )
                .into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registries_remembered_as_basic_are_bounded() {
        let mut known = VecDeque::new();
        for i in 0..MAX_BASIC_REGISTRIES + 10 {
            let r = Registry::parse(&format!("r{i}.example")).unwrap();
            remember(&mut known, &r);
            remember(&mut known, &r);
        }
        assert_eq!(known.len(), MAX_BASIC_REGISTRIES);
        assert_eq!(known.front().map(Registry::host), Some("r10.example"));
    }

    #[test]
    fn hop_by_hop_headers_do_not_cross() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("expect", "100-continue"),
            ("authorization", "Bearer t"),
            ("docker-upload-uuid", "u"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "docker-upload-uuid"]);
    }

    #[test]
    fn refusals_are_registry_errors_with_their_status() {
        let denied = wire_refusal(&WireError::Denied { reason: "no".into() });
        assert_eq!((denied.status, denied.code), (403, "DENIED"));
        assert_eq!(wire_refusal(&WireError::NotFound).status, 404);
        let resp = refuse(&Refusal { status: 1000, code: "X", message: "m".into() });
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    }
}
