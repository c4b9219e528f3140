//! The established link, guest side: requests go out with ids, answers come back in any
//! order, heartbeats both ways; when the link dies every caller in flight is answered.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use finch_shared::frame::async_io::{spawn_reader, write_msg};
use finch_shared::message::{LinkMsg, Outcome, Request, WireError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{HEARTBEAT_MISSES, Shutdown};

/// Most requests waiting for an answer on one link.
pub const MAX_IN_FLIGHT: usize = 1024;

type Call = (Request, oneshot::Sender<Outcome>);

/// The active link's generation and the trigger that closes it.
type Closer = (u64, oneshot::Sender<()>);

#[derive(Debug, Clone)]
struct Handle {
    generation: u64,
    calls: mpsc::Sender<Call>,
}

/// Where helper calls find the current link, if any. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LinkSlot {
    current: watch::Sender<Option<Handle>>,
    closers: Arc<Mutex<Option<Closer>>>,
    generation: Arc<AtomicU64>,
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
            link_wait,
            request_timeout,
        }
    }

    /// Sends `request` over the current link (waiting a bounded time for one) and waits a
    /// bounded time for the answer.
    pub async fn request(&self, request: Request) -> Outcome {
        let mut rx = self.current.subscribe();
        let handle = match tokio::time::timeout(self.link_wait, rx.wait_for(Option::is_some)).await
        {
            Ok(Ok(h)) => h.clone(),
            _ => None,
        };
        let Some(handle) = handle else {
            return Err(WireError::unavailable(format!(
                "no link to the host agent (waited {} ms): is finch-host-agent running on the host?",
                self.link_wait.as_millis()
            )));
        };
        let (tx, answer) = oneshot::channel();
        if handle.calls.send((request, tx)).await.is_err() {
            return Err(WireError::unavailable("the link to the host agent closed"));
        }
        match tokio::time::timeout(self.request_timeout, answer).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => {
                Err(WireError::unavailable("the link to the host agent was lost mid-request"))
            }
            Err(_) => Err(WireError::unavailable(format!(
                "the host agent did not answer within {} s",
                self.request_timeout.as_secs()
            ))),
        }
    }

    /// Makes `stream` (already authenticated) the active link, closing the previous one, and
    /// serves it until it ends.
    pub async fn run<S>(&self, stream: S, heartbeat: Duration, shutdown: Shutdown)
    where
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
        self.current.send_replace(Some(Handle { generation, calls: calls_tx }));
        tracing::info!(link = generation, "host link up");
        let reason = drive(stream, calls, close, heartbeat, shutdown).await;
        self.current.send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|h| h.generation == generation) {
                *cur = None;
                true
            } else {
                false
            }
        });
        let mut closers = self.closers.lock().await;
        if closers.as_ref().is_some_and(|(g, _)| *g == generation) {
            *closers = None;
        }
        tracing::info!(link = generation, %reason, "host link down");
    }

    /// Closes the active link (at shutdown).
    pub fn close(&self) {
        self.current.send_replace(None);
    }
}

/// Runs one link until it ends; returns why it ended.
async fn drive<S>(
    stream: S,
    mut calls: mpsc::Receiver<Call>,
    mut close: oneshot::Receiver<()>,
    heartbeat: Duration,
    mut shutdown: Shutdown,
) -> String
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(stream);
    let (mut incoming, _reader) = spawn_reader::<LinkMsg, _>(rd);
    let mut pending: HashMap<u64, oneshot::Sender<Outcome>> = HashMap::new();
    let mut next_id: u64 = 1;
    let mut ticker = tokio::time::interval(heartbeat);
    let mut last_heard = Instant::now();
    let dead_after = heartbeat * HEARTBEAT_MISSES;
    let reason = loop {
        tokio::select! {
            () = shutdown.wait() => break "agent shutting down".to_owned(),
            _ = &mut close => break "replaced by a new link".to_owned(),
            msg = incoming.recv() => {
                last_heard = Instant::now();
                match msg {
                    Some(Ok(LinkMsg::Response { id, outcome })) => match pending.remove(&id) {
                        // The caller may have given up; nothing to do then.
                        Some(tx) => { let _ = tx.send(outcome); }
                        None => tracing::debug!(id, "answer for a request no longer waiting"),
                    },
                    Some(Ok(LinkMsg::Ping { seq })) => {
                        if let Err(e) = write_msg(&mut wr, &LinkMsg::Pong { seq }).await {
                            break format!("write failed: {e}");
                        }
                    }
                    Some(Ok(LinkMsg::Pong { .. })) => {}
                    Some(Ok(LinkMsg::Request { .. })) => break "protocol error: the host sent a request".to_owned(),
                    Some(Err(e)) => break e.to_string(),
                    None => break "reader stopped".to_owned(),
                }
            }
            call = calls.recv() => {
                let Some((request, tx)) = call else { break "no more callers".to_owned() };
                if pending.len() >= MAX_IN_FLIGHT {
                    pending.retain(|_, tx| !tx.is_closed());
                }
                if pending.len() >= MAX_IN_FLIGHT {
                    let _ = tx.send(Err(WireError::unavailable("too many requests in flight")));
                    continue;
                }
                let id = next_id;
                next_id += 1;
                pending.insert(id, tx);
                if let Err(e) = write_msg(&mut wr, &LinkMsg::Request { id, request }).await {
                    break format!("write failed: {e}");
                }
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > dead_after {
                    break format!("no heartbeat for {} ms", dead_after.as_millis());
                }
                if let Err(e) = write_msg(&mut wr, &LinkMsg::Ping { seq: next_id }).await {
                    break format!("write failed: {e}");
                }
            }
        }
    };
    // Dropping `pending` answers every waiting caller with "link lost".
    drop(pending);
    reason
}
