//! The one accept loop behind every listener of both agents: the guest's helper socket and
//! link listeners, the host's control channel.
//!
//! A connection costs the agent something only once it is admitted: the peer is checked
//! inline, before a task exists (`admit` returns `None` for a connection it refused and
//! already answered). At most `max_live` admitted connections are served at once: the loop
//! takes a permit *before* it accepts, so a flood waits in the kernel's bounded backlog, not in
//! the agent's memory or file table. Finished tasks are reaped as the loop goes (a `JoinSet`
//! keeps every finished task until it is joined), and the tasks still running at shutdown are
//! given `grace` to finish, then stopped. A failed accept (out of descriptors, say) is
//! reported and retried after a pause; it never ends the loop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::link::Shutdown;

/// Pause after a failed accept, so an error that repeats cannot spin or flood the log.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Accepts with `accept` until `shutdown`; each connection `admit` lets through is served on a
/// task of its own, at most `max_live` at once. `failed` hears of each failed accept.
pub async fn accept_loop<S, Fut>(
    max_live: usize,
    mut accept: impl AsyncFnMut() -> std::io::Result<S>,
    mut admit: impl FnMut(S) -> Option<Fut>,
    mut failed: impl FnMut(&std::io::Error),
    grace: Duration,
    mut shutdown: Shutdown,
) where
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_live));
    let mut tasks = JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = shutdown.wait() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = shutdown.wait() => break,
            accepted = accept() => accepted,
        };
        match accepted {
            Ok(connection) => {
                if let Some(serve) = admit(connection) {
                    tasks.spawn(async move {
                        serve.await;
                        drop(permit);
                    });
                }
            }
            Err(e) => {
                failed(&e);
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
    let drained = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tasks.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// However many connections arrive, at most `max_live` are served at once, and every
    /// finished one is reaped: the set of tasks never grows with the connections served.
    #[tokio::test]
    async fn live_connections_are_bounded_and_finished_ones_reaped() {
        let (stop, shutdown) = Shutdown::new();
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
        let feeder = tokio::spawn(async move {
            for n in 0..5000 {
                if tx.send(n).await.is_err() {
                    break;
                }
            }
        });
        let (l, p, s) = (live.clone(), peak.clone(), served.clone());
        let accept = async move || rx.recv().await.ok_or(std::io::ErrorKind::BrokenPipe.into());
        let admit = move |n: u32| {
            if n % 2 == 1 {
                return None; // refused inline: never a task
            }
            let (l, p, s) = (l.clone(), p.clone(), s.clone());
            Some(async move {
                let now = l.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                l.fetch_sub(1, Ordering::SeqCst);
                s.fetch_add(1, Ordering::SeqCst);
            })
        };
        let looping = tokio::spawn(accept_loop(8, accept, admit, |_| {}, Duration::ZERO, shutdown));
        feeder.await.unwrap();
        while served.load(Ordering::SeqCst) < 2500 {
            tokio::task::yield_now().await;
        }
        stop.fire();
        tokio::time::timeout(Duration::from_secs(1), looping).await.unwrap().unwrap();
        assert!(peak.load(Ordering::SeqCst) <= 8, "peak {}", peak.load(Ordering::SeqCst));
        assert_eq!(served.load(Ordering::SeqCst), 2500);
    }
}
