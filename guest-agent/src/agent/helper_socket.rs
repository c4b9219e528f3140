//! The helper socket: one call per connection, from allowed uids only.
//!
//! The peer's uid is checked before a byte of its call is read: a uid that is not allowed is
//! answered `denied` at once and its connection closed. Allowed callers share the agent
//! fairly: at most [`MAX_CALLS`] calls are served at once; a uid may take a new slot only
//! while it holds less than its fair share (the slots but [`RESERVED_FOR_OTHERS`], divided
//! among the uids calling, never less than [`MIN_SHARE`]), so one user of the VM flooding
//! the socket or waiting on slow ECR calls always leaves room for the others. Past either
//! bound the caller is answered `busy` at once. Refusals are logged through a gate: a flood costs a line per
//! window, with a count.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use finch_shared::io::{read_msg, write_msg};
use finch_shared::limit::LogGate;
use finch_shared::message::{HELPER_VERSIONS, HelperCall, HelperReply, Outcome, WireError};
use tokio::net::UnixStream;

use super::link::LinkSlot;
use super::{Access, IO_TIMEOUT, Listening, Shutdown};

/// Mode of the helper socket: owner and group may connect, nobody else.
pub const HELPER_SOCKET_MODE: u32 = 0o660;
/// Most helper calls served at once (the host answers at most 256 at once per link).
pub const MAX_CALLS: usize = 256;
/// Slots no single uid can take: kept for the VM's other users.
pub const RESERVED_FOR_OTHERS: usize = 32;
/// The share of the slots every uid is promised, however many uids are calling.
pub const MIN_SHARE: usize = 16;
/// Most helper connections served at once: the admitted calls, and room for the ones being
/// answered `busy`. Past it, callers wait in the socket's backlog.
pub const MAX_CONNECTIONS: usize = MAX_CALLS + RESERVED_FOR_OTHERS;
/// Refusals logged per [`REFUSAL_WINDOW`]; the rest are counted.
pub const REFUSAL_BURST: u32 = 10;
/// See [`REFUSAL_BURST`].
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(10);
/// The first helper version whose answers may be [`finch_shared::message::Response::ListCut`].
const HELPER_VERSION_LIST_CUT: u16 = 2;

/// The bound helper socket.
#[derive(Debug)]
pub struct HelperSocket(Listening);

/// Calls being served, per uid and in all.
#[derive(Debug, Default)]
struct Calls {
    per_uid: Mutex<HashMap<u32, usize>>,
}

/// One admitted call; its slot is given back when dropped.
pub(crate) struct Admitted {
    calls: Arc<Calls>,
    uid: u32,
}

impl Calls {
    fn admit(self: &Arc<Self>, uid: u32) -> Result<Admitted, WireError> {
        let mut per_uid = self.per_uid.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let total: usize = per_uid.values().sum();
        let mine = per_uid.get(&uid).copied().unwrap_or(0);
        let callers = per_uid.len() + usize::from(mine == 0);
        let share = ((MAX_CALLS - RESERVED_FOR_OTHERS) / callers).max(MIN_SHARE);
        if mine >= share {
            return Err(WireError::unavailable(format!(
                "guest agent busy: uid {uid} already has {mine} calls in progress, its share"
            )));
        }
        if total >= MAX_CALLS {
            return Err(WireError::unavailable(format!(
                "guest agent busy: {MAX_CALLS} calls in progress"
            )));
        }
        per_uid.insert(uid, mine + 1);
        Ok(Admitted { calls: self.clone(), uid })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut per_uid =
            self.calls.per_uid.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                per_uid.remove(&self.uid);
            }
        }
    }
}

/// What every connection's task shares: the helper socket's and Finch's credential socket's
/// (one fair share of calls between both).
pub(crate) struct Shared {
    slot: LinkSlot,
    allowed: Arc<[u32]>,
    calls: Arc<Calls>,
    refusals: Mutex<LogGate>,
    /// Failed calls (the host's not-found answers, say) are logged through a gate too.
    failures: Mutex<LogGate>,
}

/// Whether `gate` lets a line through now; if so, how many it held back before it.
fn admit(gate: &Mutex<LogGate>) -> Option<u64> {
    gate.lock().unwrap_or_else(std::sync::PoisonError::into_inner).admit(Instant::now())
}

impl Shared {
    /// Calls from `allowed` uids, answered over `slot`.
    pub(crate) fn new(slot: LinkSlot, allowed: Arc<[u32]>) -> Arc<Self> {
        Arc::new(Shared {
            slot,
            allowed,
            calls: Arc::default(),
            refusals: Mutex::new(LogGate::new(REFUSAL_WINDOW, REFUSAL_BURST)),
            failures: Mutex::new(LogGate::new(REFUSAL_WINDOW, REFUSAL_BURST)),
        })
    }

    /// The link calls go over.
    pub(crate) fn slot(&self) -> &LinkSlot {
        &self.slot
    }

    /// Logs a refusal if the gate lets it through.
    pub(crate) fn refused(&self, uid: u32, what: &str, detail: &str) {
        if let Some(suppressed) = admit(&self.refusals) {
            tracing::warn!(uid, detail = ?detail, suppressed, "{what}");
        }
    }

    /// Logs a call the bridge did not answer with success, if the gate lets it through.
    pub(crate) fn failed(&self, uid: u32, op: &str, e: &WireError) {
        if let Some(suppressed) = admit(&self.failures) {
            tracing::info!(uid, op, result = e.class(), suppressed, "helper call failed");
        }
    }

    /// The caller's uid, if it may call at all (logged and `Err` when not).
    pub(crate) fn caller(&self, stream: &UnixStream) -> Result<u32, WireError> {
        let uid = match stream.peer_cred() {
            Ok(cred) => cred.uid(),
            Err(e) => {
                self.refused(
                    u32::MAX,
                    "cannot read the caller's credentials; closed",
                    &e.to_string(),
                );
                return Err(WireError::unavailable("cannot read the caller's credentials"));
            }
        };
        if !self.allowed.contains(&uid) {
            self.refused(uid, "helper call from a uid that is not allowed", "");
            let reason = format!("uid {uid} may not use the finch credential helper");
            return Err(WireError::Denied { reason });
        }
        Ok(uid)
    }

    /// A slot for a call of `uid`, within its fair share (logged and `Err` when busy).
    pub(crate) fn admit(&self, uid: u32) -> Result<Admitted, WireError> {
        self.calls.admit(uid).inspect_err(|_| self.refused(uid, "helper call refused: busy", ""))
    }
}

impl HelperSocket {
    /// Binds `path` (mode 0660, group `group` when given).
    pub fn bind(path: &Path, group: Option<u32>) -> anyhow::Result<Self> {
        let access = Access { mode: HELPER_SOCKET_MODE, owner: None, group };
        Listening::bind(path, "helper socket", access).map(HelperSocket)
    }

    /// Answers helper calls until shutdown; only `shared`'s allowed uids are served.
    pub(crate) async fn run(self, shared: Arc<Shared>, shutdown: Shutdown) {
        let listening = &self.0;
        let accept = async || listening.accept().await;
        let admit = |stream| admit_call(stream, &shared);
        super::accept_loop(listening.what(), MAX_CONNECTIONS, accept, admit, shutdown).await;
    }
}

/// Checks the caller before anything is read or a task exists: a uid that may not ask, or
/// one over its share, is answered at once and costs nothing more.
fn admit_call(
    stream: UnixStream,
    shared: &Arc<Shared>,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let uid = match shared.caller(&stream) {
        Ok(uid) => uid,
        Err(e @ WireError::Denied { .. }) => {
            reply_now(&stream, Err(e));
            return None;
        }
        Err(_) => return None,
    };
    let admitted = match shared.admit(uid) {
        Ok(admitted) => admitted,
        Err(busy) => {
            reply_now(&stream, Err(busy));
            return None;
        }
    };
    Some(serve_call(stream, uid, admitted, shared.clone()))
}

/// Writes a refusal once, without waiting (see [`super::send_now`]).
fn reply_now(stream: &UnixStream, outcome: Outcome) {
    let Ok(payload) = finch_shared::codec::encode(&HelperReply { outcome }) else { return };
    let Ok(header) = finch_shared::frame::header_for(&payload) else { return };
    let mut frame = Vec::with_capacity(header.len() + payload.len());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(&payload);
    super::send_now(stream, &frame);
}

async fn serve_call(mut stream: UnixStream, uid: u32, _admitted: Admitted, shared: Arc<Shared>) {
    let call = match tokio::time::timeout(IO_TIMEOUT, read_msg::<HelperCall, _>(&mut stream)).await
    {
        Ok(Ok(call)) => call,
        Ok(Err(e)) => {
            let reason = format!("malformed call: {e}");
            shared.refused(uid, "bad helper call", &reason);
            reply(&mut stream, Err(WireError::BadRequest { reason })).await;
            return;
        }
        Err(_) => {
            shared.refused(uid, "helper sent no call in time", "");
            return;
        }
    };
    let op = call.request.op();
    let outcome = if !HELPER_VERSIONS.contains(&call.version) {
        Err(WireError::BadRequest {
            reason: format!(
                "helper protocol version {} is not supported (agent speaks {HELPER_VERSIONS:?})",
                call.version
            ),
        })
    } else {
        shared
            .slot
            .request(call.request)
            .await
            .map(|r| r.for_version(call.version, HELPER_VERSION_LIST_CUT))
    };
    match &outcome {
        Ok(_) => tracing::debug!(uid, op = op.as_str(), "helper call answered"),
        Err(e) => shared.failed(uid, op.as_str(), e),
    }
    reply(&mut stream, outcome).await;
}

async fn reply(stream: &mut UnixStream, outcome: Outcome) {
    let sent = tokio::time::timeout(IO_TIMEOUT, write_msg(stream, &HelperReply { outcome })).await;
    if !matches!(sent, Ok(Ok(()))) {
        tracing::debug!("the helper went away before its answer");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_uid_cannot_take_every_slot() {
        let calls = Arc::new(Calls::default());
        let alone = MAX_CALLS - RESERVED_FOR_OTHERS;
        let mut mine: Vec<_> = (0..alone).map(|_| calls.admit(1000).unwrap()).collect();
        let e = calls.admit(1000).err().unwrap();
        assert!(e.to_string().contains("busy"), "{e}");
        // Another uid gets in at once, and the flooder cannot grow while over its share.
        let mut other: Vec<_> =
            (0..RESERVED_FOR_OTHERS).map(|_| calls.admit(2000).unwrap()).collect();
        assert!(calls.admit(3000).is_err(), "past the overall bound");
        mine.truncate(120);
        assert!(calls.admit(1000).is_err(), "over its share of two");
        other.extend((0..20).map(|_| calls.admit(2000).unwrap()));
        drop(mine);
        drop(other);
        assert!(calls.per_uid.lock().unwrap().is_empty(), "slots were not given back");
        assert!(calls.admit(1000).is_ok());
    }
}
