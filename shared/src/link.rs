//! One authenticated link, driven: the loop both ends run once the handshake is done.
//!
//! The loop is the same on both ends: frames are read by one reader task and written by one
//! writer task under a deadline ([`crate::io`]), so a peer that stops reading stalls neither
//! the heartbeat nor shutdown; a ping goes out every heartbeat, every ping is answered, and
//! a link silent for [`HEARTBEAT_MISSES`] heartbeats is dead. What differs is the [`Role`]:
//! the host answers requests, the guest sends them and waits for answers. The loop returns
//! why the link ended, for the log and the status board.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::io::{FrameQueue, spawn_reader, spawn_writer};
use crate::message::LinkMsg;
use crate::seal::Session;

/// Heartbeats a link may miss before it counts as dead.
pub const HEARTBEAT_MISSES: u32 = 3;

/// Stops tasks when fired: every [`Shutdown`] made from it resolves. Dropping it fires too.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

impl Trigger {
    /// Fires.
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

/// Waits for a [`Trigger`]. Cheap to clone; every clone sees the same trigger.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A trigger and its listener.
    pub fn new() -> (Trigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Trigger(tx), Shutdown(rx))
    }

    /// Resolves once the trigger fired (or is gone). Cancel-safe.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Whether the trigger fired.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
}

/// Whether the link goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// It goes on.
    Go,
    /// It ends, for this reason.
    End(String),
}

impl Flow {
    /// `End` with the error's text, or `Go`.
    pub fn from_send<E: std::fmt::Display>(sent: Result<(), E>) -> Flow {
        match sent {
            Ok(()) => Flow::Go,
            Err(e) => Flow::End(e.to_string()),
        }
    }
}

/// What one end does beyond the heartbeat: the messages only it takes, and its own events.
pub trait Role: Send {
    /// A message that is not a ping or a pong (the host takes requests, the guest answers).
    /// Anything this end does not take ends the link as a protocol error.
    fn on_message(&mut self, msg: LinkMsg, out: &FrameQueue) -> Flow;

    /// Waits for this end's next event (an answer ready, a caller's request, a timer) and
    /// handles it. Dropped whenever the loop wakes for something else, so it must be
    /// cancel-safe: nothing is lost when it is dropped before it resolves.
    fn next_event(&mut self, out: &FrameQueue) -> impl Future<Output = Flow> + Send;

    /// A frame arrived from the peer.
    fn heard(&mut self) {}

    /// A heartbeat ping went out.
    fn pinged(&mut self) {}

    /// The link ended: settle what is in flight.
    fn end(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// The link's timing and write bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Interval between pings.
    pub heartbeat: Duration,
    /// Frames that may wait for the writer.
    pub write_queue: usize,
    /// Longest one frame's write may take before the link counts as dead.
    pub write_deadline: Duration,
}

/// Drives an authenticated link until shutdown, the peer's silence, a failed write, a frame
/// that does not open, or the role ends it; returns why it ended.
pub async fn drive<S, R>(
    stream: S,
    session: Session,
    timing: Timing,
    role: &mut R,
    mut shutdown: Shutdown,
) -> String
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    R: Role,
{
    let (rd, wr) = tokio::io::split(stream);
    let (mut incoming, _reader) = spawn_reader::<LinkMsg, _>(rd, session.opener);
    let (out, _writer) =
        spawn_writer(wr, session.sealer, timing.write_queue, timing.write_deadline);
    let mut ticker = tokio::time::interval(timing.heartbeat);
    let mut last_heard = Instant::now();
    let mut seq: u64 = 0;
    let dead_after = timing.heartbeat * HEARTBEAT_MISSES;
    let reason = loop {
        let flow = tokio::select! {
            () = shutdown.wait() => Flow::End("agent shutting down".to_owned()),
            () = out.failed() => Flow::End(format!("write failed: {}", out.error())),
            flow = role.next_event(&out) => flow,
            msg = incoming.recv() => {
                last_heard = Instant::now();
                role.heard();
                match msg {
                    Some(Ok(LinkMsg::Ping { seq })) => Flow::from_send(out.send(&LinkMsg::Pong { seq })),
                    Some(Ok(LinkMsg::Pong { .. })) => Flow::Go,
                    Some(Ok(other)) => role.on_message(other, &out),
                    Some(Err(e)) => Flow::End(e.to_string()),
                    None => Flow::End("reader stopped".to_owned()),
                }
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > dead_after {
                    Flow::End(format!("no heartbeat for {} ms", dead_after.as_millis()))
                } else {
                    seq += 1;
                    let sent = Flow::from_send(out.send(&LinkMsg::Ping { seq }));
                    role.pinged();
                    sent
                }
            }
        };
        if let Flow::End(reason) = flow {
            break reason;
        }
    };
    role.end().await;
    reason
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Request;

    /// A role that sends requests nobody reads and takes nothing.
    struct Flood(u32);

    impl Role for Flood {
        fn on_message(&mut self, _: LinkMsg, _: &FrameQueue) -> Flow {
            Flow::End("unexpected".into())
        }
        async fn next_event(&mut self, out: &FrameQueue) -> Flow {
            if self.0 == 0 {
                return std::future::pending().await;
            }
            self.0 -= 1;
            let request = Request::Get { server: "h".repeat(100) };
            // A full queue is the point: the peer does not read.
            let _ = out.send(&LinkMsg::Request { id: u64::from(self.0), request });
            Flow::Go
        }
    }

    /// A peer that stops reading cannot stall the loop: pings and requests queue, and
    /// shutdown ends it at once, not after a write that never ends.
    #[tokio::test]
    async fn a_peer_that_stops_reading_cannot_stall_shutdown() {
        let (ours, _theirs_never_read) = tokio::io::duplex(64);
        let (stop, shutdown) = Shutdown::new();
        let key = crate::key::LinkKey::from_bytes(&[1; 32]).unwrap();
        let session = Session::new(&key, b"t", crate::seal::Role::Guest);
        let timing = Timing {
            heartbeat: Duration::from_millis(50),
            write_queue: 64,
            write_deadline: Duration::from_secs(30),
        };
        let driver = tokio::spawn(async move {
            let mut role = Flood(20);
            drive(ours, session, timing, &mut role, shutdown).await
        });
        tokio::time::sleep(Duration::from_millis(80)).await;
        stop.fire();
        let reason = tokio::time::timeout(Duration::from_secs(1), driver)
            .await
            .expect("the loop did not stop within 1 s of shutdown")
            .unwrap();
        assert_eq!(reason, "agent shutting down");
    }

    /// A silent peer is dead after the heartbeats it may miss.
    #[tokio::test]
    async fn a_silent_peer_ends_the_link() {
        let (ours, _theirs_silent) = tokio::io::duplex(1 << 16);
        let (_stop, shutdown) = Shutdown::new();
        let key = crate::key::LinkKey::from_bytes(&[1; 32]).unwrap();
        let session = Session::new(&key, b"t", crate::seal::Role::Host);
        let timing = Timing {
            heartbeat: Duration::from_millis(20),
            write_queue: 64,
            write_deadline: Duration::from_secs(30),
        };
        let reason = tokio::time::timeout(Duration::from_secs(2), async {
            drive(ours, session, timing, &mut Flood(0), shutdown).await
        })
        .await
        .expect("a silent peer kept the link up");
        assert_eq!(reason, "no heartbeat for 60 ms");
    }

    #[tokio::test]
    async fn a_trigger_fired_or_dropped_releases_every_waiter() {
        let (stop, mut shutdown) = Shutdown::new();
        let mut other = shutdown.clone();
        assert!(!shutdown.is_set());
        stop.fire();
        assert!(shutdown.is_set() && other.is_set());
        shutdown.wait().await;
        other.wait().await;
        let (stop, mut shutdown) = Shutdown::new();
        drop(stop);
        tokio::time::timeout(Duration::from_secs(1), shutdown.wait())
            .await
            .expect("a dropped trigger left its waiter waiting");
    }
}
