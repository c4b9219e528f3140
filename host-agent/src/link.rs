//! The host's side of each VM link: dial, authenticate, serve, and reconnect with capped
//! backoff when anything fails.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use finch_shared::endpoint::Endpoint;
use finch_shared::handshake::{Established, HostHandshake};
use finch_shared::io::{FrameQueue, QueueError, read_msg, write_msg};
use finch_shared::key::LinkKey;
pub use finch_shared::link::HEARTBEAT_MISSES;
use finch_shared::link::{Flow, Role, Shutdown, Timing, drive};
use finch_shared::message::{
    Handshake, LINK_VERSION_LIST_CUT, LINK_VERSION_TOKENS, LinkMsg, Outcome, Request, Token,
    TokenRequest, WireError,
};
use finch_shared::seal::Session;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::resolve::Resolver;
use crate::settings::VmName;
use crate::status::StatusBoard;

/// Longest a dial or a handshake may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Most requests a link holds at once: the ones being resolved and the ones waiting their
/// turn; past it, `busy`.
pub const MAX_IN_FLIGHT: usize = 256;
/// Requests of one VM started per second, sustained; a burst of [`REQUEST_BURST`] starts at
/// once. A pull needs one or two lookups, so no client in a VM meets it; a flood waits its
/// turn in order (its callers wait, then `busy`), so what the host spends on one VM is
/// bounded and other VMs keep their pace ([`crate::fair`]).
pub const REQUEST_RATE: u32 = 100;
/// See [`REQUEST_RATE`].
pub const REQUEST_BURST: u32 = 200;

/// A token bucket of request starts.
#[derive(Debug)]
struct RequestBudget {
    tokens: f64,
    at: Instant,
}

impl RequestBudget {
    fn full(now: Instant) -> Self {
        RequestBudget { tokens: f64::from(REQUEST_BURST), at: now }
    }

    fn refill(&mut self, now: Instant) {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * f64::from(REQUEST_RATE);
        self.tokens = (self.tokens + gained).min(f64::from(REQUEST_BURST));
        self.at = now;
    }

    /// Takes a start at `now`, if there is one.
    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the next start will be there.
    fn next(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.at + Duration::from_secs_f64(missing / f64::from(REQUEST_RATE))
    }
}
/// Longest one write to the guest may take; a guest that stops reading loses its link.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Frames waiting to be written (every answer in flight, and pings and pongs).
const WRITE_QUEUE: usize = MAX_IN_FLIGHT + 64;

/// One VM the host agent serves.
#[derive(Debug, Clone)]
pub struct VmLink {
    /// The VM's name (in audit lines and the handshake).
    pub name: VmName,
    /// Where to dial.
    pub endpoint: Endpoint,
    /// The VM's link key.
    pub key: LinkKey,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Cap of the reconnect delay.
    pub backoff_max: Duration,
}

impl VmLink {
    /// Whether a running link for `self` can stay as it is under `other`.
    pub fn same_as(&self, other: &VmLink) -> bool {
        self.name == other.name
            && self.endpoint == other.endpoint
            && self.key.same_as(&other.key)
            && self.heartbeat == other.heartbeat
            && self.backoff_max == other.backoff_max
    }
}

/// Keeps the link to one VM up until shutdown.
pub async fn run_vm(
    vm: VmLink,
    resolver: Arc<Resolver>,
    board: Arc<StatusBoard>,
    mut shutdown: Shutdown,
) {
    let mut backoff = BACKOFF_MIN;
    let mut last_error = String::new();
    loop {
        let attempt = async {
            let mut stream = crate::transport::dial(&vm.endpoint).await?;
            let (established, session) =
                tokio::time::timeout(IO_TIMEOUT, handshake(&mut stream, &vm))
                    .await
                    .context("handshake timed out")??;
            Ok::<_, anyhow::Error>((stream, established, session))
        };
        let result = tokio::select! {
            r = attempt => r,
            () = shutdown.wait() => return,
        };
        match result {
            Ok((stream, established, session)) => {
                // The boot id is the guest's word: escaped, so it cannot forge a log line.
                tracing::info!(vm = %vm.name, boot_id = ?established.boot_id, version = established.version, "link up");
                last_error.clear();
                board.link_up(&vm.name);
                let up = Instant::now();
                let link = Sealed { stream, session, version: established.version };
                let reason = serve(link, &vm, resolver.clone(), shutdown.clone()).await;
                // A link that ends soon after it came up (a guest sending bad frames, say)
                // does not reset the backoff: relinks slow down to the cap, not stay at full
                // speed.
                if up.elapsed() >= stable_after(&vm) {
                    backoff = BACKOFF_MIN;
                }
                tracing::info!(vm = %vm.name, %reason, "link down");
                board.link_down(&vm.name, &reason);
                if shutdown.is_set() {
                    return;
                }
            }
            Err(e) => {
                let text = format!("{e:#}");
                board.link_down(&vm.name, &text);
                // Say it once per distinct failure, not at every retry.
                if text != last_error {
                    tracing::warn!(vm = %vm.name, endpoint = %vm.endpoint, error = %text, "cannot link to the VM; retrying");
                    last_error = text;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.wait() => return,
        }
        backoff = (backoff * 2).min(vm.backoff_max);
    }
}

/// How long a link must have lasted for the next dial to start again from [`BACKOFF_MIN`].
fn stable_after(vm: &VmLink) -> Duration {
    (vm.heartbeat * HEARTBEAT_MISSES).max(Duration::from_secs(2))
}

/// Queues an answer in the form the guest's protocol `version` knows; one too large for a
/// frame becomes an `unavailable` error, so a big answer never takes the link down.
fn send_response(
    queue: &FrameQueue,
    version: u16,
    id: u64,
    outcome: Outcome,
) -> Result<(), QueueError> {
    let outcome = outcome.map(|r| r.for_version(version, LINK_VERSION_LIST_CUT));
    match queue.send(&LinkMsg::Response { id, outcome }) {
        Err(e @ (QueueError::Codec(_) | QueueError::Seal(_))) => {
            tracing::warn!(id, error = %e, "answer too large for the link");
            let outcome = Err(WireError::unavailable("the answer is too large for the link"));
            queue.send(&LinkMsg::Response { id, outcome })
        }
        other => other,
    }
}

async fn handshake<S>(stream: &mut S, vm: &VmLink) -> anyhow::Result<(Established, Session)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (host, hello) = HostHandshake::start(vm.key.clone(), &vm.name)?;
    write_msg(stream, &hello).await.context("sending hello")?;
    let answer: Handshake = read_msg(stream).await.context("reading the guest's hello")?;
    match host.finish(answer) {
        Ok((established, session, proof)) => {
            write_msg(stream, &proof).await.context("sending our proof")?;
            Ok((established, session))
        }
        Err(e) => {
            if let Some(reject) = e.reject() {
                let _ = write_msg(stream, &reject).await;
            }
            Err(anyhow::Error::new(e).context("the guest was not authenticated; nothing served"))
        }
    }
}

/// An authenticated link: its stream, the session that seals its frames, its version.
#[derive(Debug)]
pub struct Sealed<S> {
    /// The stream, after the handshake.
    pub stream: S,
    /// The handshake's keys.
    pub session: Session,
    /// The negotiated protocol version.
    pub version: u16,
}

/// Serves an authenticated link until it ends; returns why it ended. Every frame is sealed
/// and opened with the link's session (one that does not open ends the link). Every write
/// goes through one writer task under [`WRITE_DEADLINE`], so a guest that stops reading
/// cannot stall the heartbeat or shutdown.
pub async fn serve<S>(
    link: Sealed<S>,
    vm: &VmLink,
    resolver: Arc<Resolver>,
    shutdown: Shutdown,
) -> String
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let Sealed { stream, session, version } = link;
    let timing = Timing {
        heartbeat: vm.heartbeat,
        write_queue: WRITE_QUEUE,
        write_deadline: WRITE_DEADLINE,
    };
    let mut role = Answering {
        vm: vm.name.clone(),
        resolver,
        version,
        answering: JoinSet::new(),
        waiting: std::collections::VecDeque::new(),
        budget: RequestBudget::full(Instant::now()),
    };
    drive(stream, session, timing, &mut role, shutdown).await
}

/// The host's end of a link: it answers the guest's requests, at most [`MAX_IN_FLIGHT`]
/// held and started at [`REQUEST_RATE`], each answered in the form the guest's version
/// knows.
struct Answering {
    vm: VmName,
    resolver: Arc<Resolver>,
    version: u16,
    answering: JoinSet<Answered>,
    waiting: std::collections::VecDeque<Asked>,
    budget: RequestBudget,
}

/// A guest's request: a credential operation, or (version 4) a scoped token.
#[derive(Debug)]
enum Asked {
    Credential(u64, Request),
    Token(u64, TokenRequest),
}

/// Its answer.
enum Answered {
    Credential(u64, Outcome),
    Token(u64, Result<Token, WireError>),
}

impl Answering {
    fn start(&mut self, asked: Asked) {
        let resolver = self.resolver.clone();
        let name = self.vm.clone();
        self.answering.spawn(async move {
            match asked {
                Asked::Credential(id, request) => {
                    Answered::Credential(id, resolver.handle(&name, request).await)
                }
                Asked::Token(id, request) => {
                    Answered::Token(id, resolver.token(&name, request).await)
                }
            }
        });
    }
}

impl Role for Answering {
    fn on_message(&mut self, msg: LinkMsg, out: &FrameQueue) -> Flow {
        let asked = match msg {
            LinkMsg::Request { id, request } => Asked::Credential(id, request),
            LinkMsg::TokenRequest { id, request } if self.version >= LINK_VERSION_TOKENS => {
                Asked::Token(id, request)
            }
            _ => {
                return Flow::End("protocol error: the guest sent a message it may not".to_owned());
            }
        };
        if self.answering.len() + self.waiting.len() >= MAX_IN_FLIGHT {
            let busy = WireError::unavailable("host agent busy: too many requests in flight");
            let answer = match asked {
                Asked::Credential(id, _) => LinkMsg::Response { id, outcome: Err(busy) },
                Asked::Token(id, _) => LinkMsg::TokenResponse { id, outcome: Err(busy) },
            };
            Flow::from_send(out.send(&answer))
        } else if self.waiting.is_empty() && self.budget.take(Instant::now()) {
            self.start(asked);
            Flow::Go
        } else {
            self.waiting.push_back(asked);
            Flow::Go
        }
    }

    async fn next_event(&mut self, out: &FrameQueue) -> Flow {
        tokio::select! {
            () = tokio::time::sleep_until(self.budget.next()), if !self.waiting.is_empty() => {
                while !self.waiting.is_empty() && self.budget.take(Instant::now()) {
                    if let Some(asked) = self.waiting.pop_front() {
                        self.start(asked);
                    }
                }
                Flow::Go
            }
            Some(done) = self.answering.join_next(), if !self.answering.is_empty() => {
                match done {
                    Ok(Answered::Credential(id, outcome)) => {
                        Flow::from_send(send_response(out, self.version, id, outcome))
                    }
                    Ok(Answered::Token(id, outcome)) => {
                        Flow::from_send(out.send(&LinkMsg::TokenResponse { id, outcome }))
                    }
                    Err(_) => {
                        tracing::error!(vm = %self.vm, "a request task failed; the guest will time out");
                        Flow::Go
                    }
                }
            }
            else => std::future::pending().await,
        }
    }

    async fn end(&mut self) {
        self.answering.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_start_in_a_burst_then_at_the_rate() {
        let t0 = Instant::now();
        let mut b = RequestBudget::full(t0);
        for _ in 0..REQUEST_BURST {
            assert!(b.take(t0));
        }
        assert!(!b.take(t0));
        assert!(b.next() > t0 && b.next() <= t0 + Duration::from_millis(11));
        let one_second = t0 + Duration::from_secs(1);
        let started = (0..1000).filter(|_| b.take(one_second)).count();
        assert_eq!(started as u32, REQUEST_RATE);
    }

    /// A link end to end without a process or a socket: the host's loop on one side of a
    /// pipe, the guest's frames written and read by hand on the other.
    mod served {
        use finch_shared::io::{spawn_reader, spawn_writer};
        use finch_shared::seal::Role as Side;

        use super::*;

        struct Guest {
            out: FrameQueue,
            incoming: tokio::sync::mpsc::Receiver<Result<LinkMsg, finch_shared::io::MessageError>>,
            _tasks: (finch_shared::io::ReaderTask, finch_shared::io::ReaderTask),
            /// The resolver's files, kept while the link runs.
            _files: crate::resolve::tests::Fixture,
        }

        impl Guest {
            async fn next(&mut self) -> LinkMsg {
                loop {
                    let msg = tokio::time::timeout(Duration::from_secs(5), self.incoming.recv())
                        .await
                        .expect("no frame from the host")
                        .expect("the host closed the link")
                        .expect("a frame did not open");
                    if !matches!(msg, LinkMsg::Ping { .. }) {
                        return msg;
                    }
                }
            }
        }

        fn link() -> (tokio::task::JoinHandle<String>, Guest, finch_shared::link::Trigger) {
            let key = LinkKey::from_bytes(&[7; 32]).unwrap();
            let (host_end, guest_end) = tokio::io::duplex(1 << 20);
            let vm = VmLink {
                name: "a".parse().unwrap(),
                endpoint: "unix:///a.sock".parse().unwrap(),
                key: key.clone(),
                heartbeat: Duration::from_secs(5),
                backoff_max: Duration::from_secs(1),
            };
            let mut files = crate::resolve::tests::fixture();
            let resolver = files.take_resolver();
            let (stop, shutdown) = Shutdown::new();
            let host = Sealed {
                stream: host_end,
                session: Session::new(&key, b"t", Side::Host),
                version: 3,
            };
            let served = tokio::spawn(async move { serve(host, &vm, resolver, shutdown).await });
            let guest = Session::new(&key, b"t", Side::Guest);
            let (rd, wr) = tokio::io::split(guest_end);
            let (incoming, reader) = spawn_reader::<LinkMsg, _>(rd, guest.opener);
            let (out, writer) = spawn_writer(wr, guest.sealer, 1024, Duration::from_secs(5));
            (served, Guest { out, incoming, _tasks: (reader, writer), _files: files }, stop)
        }

        #[tokio::test]
        async fn a_request_is_answered_by_id_from_the_resolver() {
            let (served, mut guest, stop) = link();
            let request = Request::Get { server: "registry.example:5000".into() };
            guest.out.send(&LinkMsg::Request { id: 41, request }).unwrap();
            let LinkMsg::Response { id, outcome } = guest.next().await else { panic!() };
            assert_eq!(id, 41);
            assert!(matches!(outcome, Ok(finch_shared::message::Response::Credential { .. })));
            stop.fire();
            assert_eq!(served.await.unwrap(), "agent shutting down");
        }

        #[tokio::test]
        async fn a_response_from_the_guest_ends_the_link() {
            for msg in [
                LinkMsg::Response { id: 1, outcome: Err(WireError::NotFound) },
                LinkMsg::TokenResponse { id: 1, outcome: Err(WireError::NotFound) },
            ] {
                let (served, guest, _stop) = link();
                guest.out.send(&msg).unwrap();
                let reason =
                    tokio::time::timeout(Duration::from_secs(5), served).await.unwrap().unwrap();
                assert_eq!(reason, "protocol error: the guest sent a message it may not");
            }
        }

        #[tokio::test]
        async fn past_the_burst_requests_wait_their_turn_and_are_all_answered() {
            let (served, mut guest, stop) = link();
            let n = REQUEST_BURST as u64 + 20;
            for id in 0..n {
                let request = Request::Get { server: "nowhere.example".into() };
                guest.out.send(&LinkMsg::Request { id, request }).unwrap();
            }
            let mut answered = std::collections::BTreeSet::new();
            while (answered.len() as u64) < n {
                let LinkMsg::Response { id, outcome } = guest.next().await else { panic!() };
                assert_eq!(outcome, Err(WireError::NotFound));
                answered.insert(id);
            }
            stop.fire();
            assert_eq!(served.await.unwrap(), "agent shutting down");
        }
    }
}
