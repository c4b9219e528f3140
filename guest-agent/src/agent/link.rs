//! The established link, guest side: requests go out with ids, answers come back in any
//! order, heartbeats both ways; when the link dies every caller in flight is answered.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use finch_shared::io::{FrameQueue, QueueError};
use finch_shared::link::{Flow, Role, Timing, drive};
use finch_shared::message::{
    LINK_VERSION_TOKENS, LinkMsg, Outcome, Request, Token, TokenRequest, WireError,
};
use finch_shared::seal::Session;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{IO_TIMEOUT, Shutdown};

/// Most requests waiting for an answer on one link (the host answers at most 256 at once;
/// the rest are answered `busy` by the host).
pub const MAX_IN_FLIGHT: usize = 1024;
/// How long a ping may go unanswered by any frame before the host agent counts as stalled:
/// then every call waiting, and every new one, is answered `unavailable` at once until a
/// frame arrives (a host agent stopped or frozen holds no call for long).
pub const STALL_AFTER: Duration = Duration::from_secs(2);
/// Silence after which a call is sent with a ping, so a stalled host is known quickly.
const PROBE_AFTER: Duration = Duration::from_secs(1);

fn stalled_error() -> WireError {
    WireError::unavailable(format!(
        "the host agent has not answered for {} s: is it running (not stopped)?",
        STALL_AFTER.as_secs()
    ))
}

/// Frames waiting to be written to the host.
const WRITE_QUEUE: usize = MAX_IN_FLIGHT + 64;

/// A caller's request and where its answer goes.
#[derive(Debug)]
enum Call {
    /// A helper call.
    Credential(Request, oneshot::Sender<Outcome>),
    /// A scoped token (link version 4).
    Token(TokenRequest, oneshot::Sender<TokenOutcome>),
}

/// The answer to a token request.
type TokenOutcome = Result<Token, WireError>;

/// Where the answer to a request sent on the link goes.
#[derive(Debug)]
enum Waiter {
    Credential(oneshot::Sender<Outcome>),
    Token(oneshot::Sender<TokenOutcome>),
}

impl Waiter {
    fn fail(self, e: WireError) {
        match self {
            Waiter::Credential(tx) => drop(tx.send(Err(e))),
            Waiter::Token(tx) => drop(tx.send(Err(e))),
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Waiter::Credential(tx) => tx.is_closed(),
            Waiter::Token(tx) => tx.is_closed(),
        }
    }
}

impl Call {
    fn split(self) -> (LinkMsgFor, Waiter) {
        match self {
            Call::Credential(request, tx) => {
                (LinkMsgFor::Credential(request), Waiter::Credential(tx))
            }
            Call::Token(request, tx) => (LinkMsgFor::Token(request), Waiter::Token(tx)),
        }
    }
}

/// A request before it has an id.
enum LinkMsgFor {
    Credential(Request),
    Token(TokenRequest),
}

impl LinkMsgFor {
    fn with_id(self, id: u64) -> LinkMsg {
        match self {
            LinkMsgFor::Credential(request) => LinkMsg::Request { id, request },
            LinkMsgFor::Token(request) => LinkMsg::TokenRequest { id, request },
        }
    }
}

/// Why a call sent to the link got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unanswered {
    /// The link had closed before the call was handed over.
    Closed,
    /// The link ended while the call waited for its answer.
    Lost,
}

/// The active link's generation and the trigger that closes it.
type Closer = (u64, oneshot::Sender<()>);

#[derive(Debug, Clone)]
struct Handle {
    generation: u64,
    /// The link's protocol version.
    version: u16,
    calls: mpsc::Sender<Call>,
}

/// Where helper calls find the current link, if any. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LinkSlot {
    current: watch::Sender<Option<Handle>>,
    closers: Arc<Mutex<Option<Closer>>>,
    generation: Arc<AtomicU64>,
    down_since: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    link_wait: Duration,
    request_timeout: Duration,
}

impl LinkSlot {
    /// An empty slot.
    pub fn new(link_wait: Duration, request_timeout: Duration) -> Self {
        LinkSlot {
            current: watch::Sender::new(None),
            closers: Arc::new(Mutex::new(None)),
            generation: Arc::new(AtomicU64::new(0)),
            down_since: Arc::new(std::sync::Mutex::new(Some(std::time::Instant::now()))),
            link_wait,
            request_timeout,
        }
    }

    /// Sends `request` over the current link and waits a bounded time for the answer. With
    /// no link, it waits a bounded time for one, unless the link is known to be down (none
    /// for longer than the link wait): then it answers at once.
    pub async fn request(&self, request: Request) -> Outcome {
        let handle = self.handle().await?;
        let (tx, answer) = oneshot::channel();
        self.send(&handle, Call::Credential(request, tx), answer).await?
    }

    /// Asks the host for a scoped token (link version 4); a host that speaks an older
    /// version has none to give (not found: the caller keeps the `get` path).
    pub async fn token(&self, request: TokenRequest) -> TokenOutcome {
        let handle = self.handle().await?;
        if handle.version < LINK_VERSION_TOKENS {
            return Err(WireError::NotFound);
        }
        let (tx, answer) = oneshot::channel();
        self.send(&handle, Call::Token(request, tx), answer).await?
    }

    /// The current link: waited for a bounded time unless the link is known to be down.
    async fn handle(&self) -> Result<Handle, WireError> {
        let mut rx = self.current.subscribe();
        let known_down = self.down_since().is_some_and(|t| t.elapsed() >= self.link_wait);
        let wait = if known_down { Duration::ZERO } else { self.link_wait };
        let waited = match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
            Ok(Ok(h)) => Some(h.clone()),
            _ => None,
        };
        let handle = waited.flatten().or_else(|| rx.borrow().clone());
        handle.ok_or_else(|| {
            let waited = if known_down {
                "it has been down for a while".to_owned()
            } else {
                format!("waited {} ms", self.link_wait.as_millis())
            };
            WireError::unavailable(format!(
                "no link to the host agent ({waited}): is finch-host-agent running on the host?"
            ))
        })
    }

    /// Hands `call` to the link and waits a bounded time for its answer on `answer`.
    async fn send<T>(
        &self,
        handle: &Handle,
        call: Call,
        answer: oneshot::Receiver<Result<T, WireError>>,
    ) -> Result<Result<T, WireError>, WireError> {
        let call = async {
            handle.calls.send(call).await.map_err(|_| Unanswered::Closed)?;
            answer.await.map_err(|_| Unanswered::Lost)
        };
        match tokio::time::timeout(self.request_timeout, call).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(Unanswered::Closed)) => {
                Err(WireError::unavailable("the link to the host agent closed"))
            }
            Ok(Err(Unanswered::Lost)) => {
                Err(WireError::unavailable("the link to the host agent was lost mid-request"))
            }
            Err(_) => Err(WireError::unavailable(format!(
                "the host agent did not answer within {} s",
                self.request_timeout.as_secs()
            ))),
        }
    }

    /// Since when there has been no link (since the agent started, if never one).
    fn down_since(&self) -> Option<std::time::Instant> {
        *self.down_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_down_since(&self, when: Option<std::time::Instant>) {
        *self.down_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = when;
    }

    /// Makes `stream` (already authenticated) the active link, closing the previous one, and
    /// serves it until it ends.
    pub async fn run<S>(
        &self,
        stream: S,
        session: Session,
        version: u16,
        heartbeat: Duration,
        shutdown: Shutdown,
    ) where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (calls_tx, calls) = mpsc::channel(64);
        let (close_tx, close) = oneshot::channel();
        if let Some((old, closer)) = self.closers.lock().await.replace((generation, close_tx)) {
            tracing::info!(
                old_link = old,
                new_link = generation,
                "a new host link replaces the old one"
            );
            let _ = closer.send(());
        }
        self.current.send_replace(Some(Handle { generation, version, calls: calls_tx }));
        self.set_down_since(None);
        tracing::info!(link = generation, "host link up");
        let timing = Timing { heartbeat, write_queue: WRITE_QUEUE, write_deadline: IO_TIMEOUT };
        let reason =
            drive(stream, session, timing, &mut Calling::new(calls, close), shutdown).await;
        let gone = self.current.send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|h| h.generation == generation) {
                *cur = None;
                true
            } else {
                false
            }
        });
        if gone {
            self.set_down_since(Some(std::time::Instant::now()));
        }
        let mut closers = self.closers.lock().await;
        if closers.as_ref().is_some_and(|(g, _)| *g == generation) {
            *closers = None;
        }
        tracing::info!(link = generation, %reason, "host link down");
    }

    /// Closes the active link (at shutdown).
    pub fn close(&self) {
        self.current.send_replace(None);
        self.set_down_since(Some(std::time::Instant::now()));
    }
}

/// An answer from the host, by kind.
enum Answer {
    Credential(Outcome),
    Token(TokenOutcome),
}

/// The guest's end of a link: it sends the helpers' calls with ids, matches answers to
/// them, and answers every waiting caller at once when the host stalls or the link ends.
struct Calling {
    calls: mpsc::Receiver<Call>,
    close: oneshot::Receiver<()>,
    pending: HashMap<u64, Waiter>,
    next_id: u64,
    last_heard: Instant,
    /// A ping sent and not answered by any frame yet: past [`STALL_AFTER`], the host is
    /// stalled.
    probe: Option<Instant>,
    stalled: bool,
}

impl Calling {
    fn new(calls: mpsc::Receiver<Call>, close: oneshot::Receiver<()>) -> Self {
        Calling {
            calls,
            close,
            pending: HashMap::new(),
            next_id: 1,
            last_heard: Instant::now(),
            probe: None,
            stalled: false,
        }
    }

    fn call(&mut self, call: Call, out: &FrameQueue) -> Flow {
        let (msg, waiter) = call.split();
        if self.stalled {
            waiter.fail(stalled_error());
            return Flow::Go;
        }
        // Nothing heard for a while: ask the host to show it is there, so a host that
        // stopped is known within STALL_AFTER, not after missed heartbeats.
        if self.probe.is_none() && self.last_heard.elapsed() >= PROBE_AFTER {
            if let Err(e) = out.send(&LinkMsg::Ping { seq: self.next_id }) {
                return Flow::End(e.to_string());
            }
            self.probe = Some(Instant::now());
        }
        if self.pending.len() >= MAX_IN_FLIGHT {
            self.pending.retain(|_, w| !w.is_closed());
        }
        if self.pending.len() >= MAX_IN_FLIGHT {
            waiter.fail(WireError::unavailable("too many requests in flight"));
            return Flow::Go;
        }
        let id = self.next_id;
        self.next_id += 1;
        match out.send(&msg.with_id(id)) {
            Ok(()) => {
                self.pending.insert(id, waiter);
                Flow::Go
            }
            Err(e @ (QueueError::Codec(_) | QueueError::Seal(_))) => {
                let reason = format!("the request cannot be sent: {e}");
                waiter.fail(WireError::BadRequest { reason });
                Flow::Go
            }
            Err(e) => Flow::End(e.to_string()),
        }
    }
}

impl Role for Calling {
    fn on_message(&mut self, msg: LinkMsg, _out: &FrameQueue) -> Flow {
        let (id, answered) = match msg {
            LinkMsg::Response { id, outcome } => (id, Answer::Credential(outcome)),
            LinkMsg::TokenResponse { id, outcome } => (id, Answer::Token(outcome)),
            _ => return Flow::End("protocol error: the host sent a request".to_owned()),
        };
        // The caller may have given up; nothing to do then. An answer of the other kind
        // than its request is the host's error: the caller is told, the link goes on.
        match (self.pending.remove(&id), answered) {
            (Some(Waiter::Credential(tx)), Answer::Credential(outcome)) => drop(tx.send(outcome)),
            (Some(Waiter::Token(tx)), Answer::Token(outcome)) => drop(tx.send(outcome)),
            (Some(waiter), _) => waiter.fail(WireError::Internal {
                reason: "the host answered another kind of request".into(),
            }),
            (None, _) => tracing::debug!(id, "answer for a request no longer waiting"),
        }
        Flow::Go
    }

    async fn next_event(&mut self, out: &FrameQueue) -> Flow {
        let stall_check = async {
            match self.probe {
                Some(sent) if !self.stalled => tokio::time::sleep_until(sent + STALL_AFTER).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut self.close => Flow::End("replaced by a new link".to_owned()),
            () = stall_check => {
                self.stalled = true;
                tracing::warn!(waited_ms = STALL_AFTER.as_millis() as u64, waiting = self.pending.len(), "the host agent is not answering: calls are answered unavailable until it does");
                // Every caller waiting is answered now, not when the link is declared dead.
                for (_, waiter) in self.pending.drain() {
                    waiter.fail(stalled_error());
                }
                Flow::Go
            }
            call = self.calls.recv() => match call {
                Some(call) => self.call(call, out),
                None => Flow::End("no more callers".to_owned()),
            },
        }
    }

    fn heard(&mut self) {
        self.last_heard = Instant::now();
        self.probe = None;
        if self.stalled {
            self.stalled = false;
            tracing::info!("the host agent answers again");
        }
    }

    fn pinged(&mut self) {
        self.probe.get_or_insert_with(Instant::now);
    }

    async fn end(&mut self) {
        // Dropping the senders answers every waiting caller with "link lost".
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host that stops reading cannot stall the link: calls queue, and shutdown (or a
    /// new link) ends it at once, not after a write that never ends.
    #[tokio::test]
    async fn a_peer_that_stops_reading_cannot_stall_shutdown() {
        let (ours, _theirs_never_read) = tokio::io::duplex(64);
        let (calls_tx, calls) = mpsc::channel(64);
        let (_close_tx, close) = oneshot::channel();
        let (stop, shutdown) = Shutdown::new();
        let key = finch_shared::key::LinkKey::from_bytes(&[1; 32]).unwrap();
        let session = Session::new(&key, b"t", finch_shared::seal::Role::Guest);
        let timing = Timing {
            heartbeat: Duration::from_millis(50),
            write_queue: WRITE_QUEUE,
            write_deadline: IO_TIMEOUT,
        };
        let driver = tokio::spawn(async move {
            drive(ours, session, timing, &mut Calling::new(calls, close), shutdown).await
        });
        // Fill the pipe: pings, and requests nobody will read.
        for _ in 0..20 {
            let (tx, _rx) = oneshot::channel();
            let _ =
                calls_tx.try_send(Call::Credential(Request::Get { server: "h".repeat(100) }, tx));
        }
        tokio::time::sleep(Duration::from_millis(80)).await;
        stop.fire();
        let reason = tokio::time::timeout(Duration::from_secs(1), driver)
            .await
            .expect("the driver did not stop within 1 s of shutdown")
            .unwrap();
        assert!(reason.contains("shutting down"), "{reason}");
    }

    /// Callers waiting when the link ends are answered, not left to their timeout.
    #[tokio::test]
    async fn callers_in_flight_are_answered_when_the_link_ends() {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let (calls_tx, calls) = mpsc::channel(64);
        let (close_tx, close) = oneshot::channel();
        let (_stop, shutdown) = Shutdown::new();
        let key = finch_shared::key::LinkKey::from_bytes(&[1; 32]).unwrap();
        let session = Session::new(&key, b"t", finch_shared::seal::Role::Guest);
        let timing = Timing {
            heartbeat: Duration::from_secs(5),
            write_queue: WRITE_QUEUE,
            write_deadline: IO_TIMEOUT,
        };
        let driver = tokio::spawn(async move {
            drive(ours, session, timing, &mut Calling::new(calls, close), shutdown).await
        });
        let (tx, answer) = oneshot::channel();
        calls_tx.send(Call::Credential(Request::List, tx)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = close_tx.send(());
        assert_eq!(driver.await.unwrap(), "replaced by a new link");
        assert!(answer.await.is_err(), "the caller was not released");
        drop(theirs);
    }

    /// A host that answers every request at once: tokens carry the scopes asked for.
    struct AnsweringHost;

    impl Role for AnsweringHost {
        fn on_message(&mut self, msg: LinkMsg, out: &FrameQueue) -> Flow {
            let answer = match msg {
                LinkMsg::TokenRequest { id, request } => LinkMsg::TokenResponse {
                    id,
                    outcome: Ok(Token {
                        token: finch_shared::Secret::new(format!("t-{}", request.registry)),
                        expires_in: 60,
                        granted: request.scopes,
                    }),
                },
                LinkMsg::Request { id, .. } => {
                    LinkMsg::Response { id, outcome: Ok(finch_shared::message::Response::Done) }
                }
                _ => return Flow::Go,
            };
            Flow::from_send(out.send(&answer))
        }

        async fn next_event(&mut self, _out: &FrameQueue) -> Flow {
            std::future::pending().await
        }
    }

    /// Token requests go over a version 4 link and their answers come back to the caller,
    /// beside credential calls; over a version 3 link the host has no tokens to give (not
    /// found: the caller keeps the `get` path), and nothing is sent.
    #[tokio::test]
    async fn token_requests_are_answered_on_a_version_4_link_only() {
        for version in [4, 3] {
            let (ours, theirs) = tokio::io::duplex(1 << 16);
            let (_stop, shutdown) = Shutdown::new();
            let key = finch_shared::key::LinkKey::from_bytes(&[1; 32]).unwrap();
            let guest = Session::new(&key, b"t", finch_shared::seal::Role::Guest);
            let host = Session::new(&key, b"t", finch_shared::seal::Role::Host);
            let timing = Timing {
                heartbeat: Duration::from_secs(5),
                write_queue: WRITE_QUEUE,
                write_deadline: IO_TIMEOUT,
            };
            let host_shutdown = shutdown.clone();
            tokio::spawn(async move {
                drive(theirs, host, timing, &mut AnsweringHost, host_shutdown).await
            });
            let slot = LinkSlot::new(Duration::from_secs(1), Duration::from_secs(5));
            let running = slot.clone();
            tokio::spawn(async move {
                running.run(ours, guest, version, Duration::from_secs(5), shutdown).await
            });
            let request = TokenRequest {
                registry: "reg.example".into(),
                scopes: vec!["repository:a:pull".into()],
            };
            let token = slot.token(request).await;
            if version == 4 {
                let token = token.unwrap();
                assert_eq!(token.token.expose(), "t-reg.example");
                assert_eq!(token.granted, ["repository:a:pull"]);
            } else {
                assert_eq!(token, Err(WireError::NotFound));
            }
            let done = slot.request(Request::Erase { server: "reg.example".into() }).await;
            assert_eq!(done, Ok(finch_shared::message::Response::Done), "version {version}");
        }
    }
}
