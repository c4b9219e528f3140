//! Messages on the link (host agent ⇄ guest agent) and on the helper socket
//! (`docker-credential-finchhost` ⇄ guest agent).
//!
//! Every type here is part of the wire format: the golden tests in `tests/golden.rs` pin its
//! bytes. A breaking change adds a protocol version and new types; it never edits these.

use serde::{Deserialize, Serialize};

use crate::Secret;

/// Link protocol versions this build speaks, newest last. Version 2 added
/// [`Response::ListCut`]. Version 3 seals every frame after the handshake
/// ([`crate::seal`]) and puts the offered versions in the handshake's transcript; versions 1
/// and 2 sent those frames in plaintext and are no longer spoken, so an older peer is told
/// "no common protocol version" and nothing else. Version 4 adds [`LinkMsg::TokenRequest`]
/// and [`LinkMsg::TokenResponse`] (scoped registry tokens); a version 3 peer never sees them.
pub const LINK_VERSIONS: &[u16] = &[3, 4];

/// The first link version that may carry token requests.
pub const LINK_VERSION_TOKENS: u16 = 4;

/// Most scopes one token request may ask for.
pub const MAX_SCOPES: usize = 16;

/// The first link version that may carry [`Response::ListCut`].
pub const LINK_VERSION_LIST_CUT: u16 = 2;

/// Version of the helper-socket protocol this build's helper speaks. Version 2 adds
/// [`Response::ListCut`].
pub const HELPER_VERSION: u16 = 2;

/// Helper-socket versions the guest agent answers.
pub const HELPER_VERSIONS: &[u16] = &[1, 2];

/// Most versions a hello may list.
pub const MAX_VERSIONS: usize = 16;

/// Most entries a `list` answer may carry.
pub const MAX_LIST_ENTRIES: usize = 1024;

/// A fresh random value for one handshake.
pub type Nonce = [u8; 32];

/// An HMAC-SHA256 proof of the link key.
pub type Proof = [u8; 32];

/// One credential operation, as a client of the helper asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// `get`: the server string exactly as the client sent it (trimmed).
    Get {
        /// Server string.
        server: String,
    },
    /// `store`: save a credential.
    Store {
        /// Server string.
        server: String,
        /// Username, or `<token>` for an identity token.
        username: String,
        /// Password or token.
        secret: Secret,
    },
    /// `erase`: forget a credential.
    Erase {
        /// Server string.
        server: String,
    },
    /// `list`: server names and usernames, never secrets.
    List,
}

/// The credential operations, as policy, routing and audit lines name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `get`.
    Get,
    /// `store`.
    Store,
    /// `erase`.
    Erase,
    /// `list`.
    List,
}

impl Op {
    /// Every operation.
    pub const ALL: [Op; 4] = [Op::Get, Op::Store, Op::Erase, Op::List];

    /// Its name in the helper protocol, the config and audit lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Store => "store",
            Op::Erase => "erase",
            Op::List => "list",
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Request {
    /// The operation.
    pub fn op(&self) -> Op {
        match self {
            Request::Get { .. } => Op::Get,
            Request::Store { .. } => Op::Store,
            Request::Erase { .. } => Op::Erase,
            Request::List => Op::List,
        }
    }

    /// The server the request is about, if any.
    pub fn server(&self) -> Option<&str> {
        match self {
            Request::Get { server } | Request::Store { server, .. } | Request::Erase { server } => {
                Some(server)
            }
            Request::List => None,
        }
    }
}

/// One entry of a `list` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    /// Server name as stored.
    pub server: String,
    /// Username stored with it.
    pub username: String,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `get`.
    Credential {
        /// Username, or `<token>`.
        username: String,
        /// Password or token.
        secret: Secret,
    },
    /// Answer to `store` and `erase`.
    Done,
    /// Answer to `list`.
    List {
        /// Entries, in no particular order.
        #[serde(
            serialize_with = "bounded_vec::serialize",
            deserialize_with = "bounded_vec::deserialize::<_, _, MAX_LIST_ENTRIES>"
        )]
        entries: Vec<ListEntry>,
    },
    /// Answer to `list` cut to fit one frame (link and helper version 2 and later).
    ListCut {
        /// The entries that fit.
        #[serde(
            serialize_with = "bounded_vec::serialize",
            deserialize_with = "bounded_vec::deserialize::<_, _, MAX_LIST_ENTRIES>"
        )]
        entries: Vec<ListEntry>,
        /// How many more there were.
        omitted: u64,
    },
}

impl Response {
    /// This answer as a peer speaking protocol `version` understands: below the version that
    /// brought [`Response::ListCut`], a cut list is a plain list.
    pub fn for_version(self, version: u16, list_cut_since: u16) -> Response {
        match self {
            Response::ListCut { entries, .. } if version < list_cut_since => {
                Response::List { entries }
            }
            other => other,
        }
    }
}

/// An error that crosses the link. Reasons are for people and never carry a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WireError {
    /// No credential for this registry.
    #[error("no credentials for this registry on the host")]
    NotFound,
    /// The host's policy refuses this VM the operation.
    #[error("denied by the host: {reason}")]
    Denied {
        /// Why.
        reason: String,
    },
    /// The source could not be asked (link down, helper hung, keychain locked, …).
    #[error("unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// The request was malformed.
    #[error("bad request: {reason}")]
    BadRequest {
        /// Why.
        reason: String,
    },
    /// A bug or an unexpected failure on the other side.
    #[error("internal error: {reason}")]
    Internal {
        /// Why.
        reason: String,
    },
}

impl WireError {
    /// A short class name for logs and audit lines.
    pub fn class(&self) -> &'static str {
        match self {
            WireError::NotFound => "not-found",
            WireError::Denied { .. } => "denied",
            WireError::Unavailable { .. } => "unavailable",
            WireError::BadRequest { .. } => "bad-request",
            WireError::Internal { .. } => "internal",
        }
    }

    /// Shorthand for [`WireError::Unavailable`].
    pub fn unavailable(reason: impl Into<String>) -> Self {
        WireError::Unavailable { reason: reason.into() }
    }
}

/// The outcome of one request.
pub type Outcome = Result<Response, WireError>;

/// Handshake frames. Their shape is fixed for every protocol version so that two builds can
/// always agree on which version to speak, or say clearly that they cannot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Handshake {
    /// First frame, host → guest.
    HostHello {
        /// Versions the host speaks.
        #[serde(
            serialize_with = "bounded_vec::serialize",
            deserialize_with = "bounded_vec::deserialize::<_, _, MAX_VERSIONS>"
        )]
        versions: Vec<u16>,
        /// The name the host knows this VM by.
        vm: String,
        /// The host's fresh nonce.
        nonce: Nonce,
    },
    /// Guest → host: the chosen version and the guest's proof.
    GuestHello {
        /// Chosen version.
        version: u16,
        /// The guest's boot id (`/proc/sys/kernel/random/boot_id`).
        boot_id: String,
        /// The guest's fresh nonce.
        nonce: Nonce,
        /// HMAC proving the guest holds the link key.
        proof: Proof,
    },
    /// Host → guest: the host's proof. After it, both sides speak [`LinkMsg`].
    HostProof {
        /// HMAC proving the host holds the link key.
        proof: Proof,
    },
    /// Either side: the handshake cannot go on.
    Reject {
        /// Why, for the other side's log.
        reason: RejectReason,
    },
}

/// Why a handshake was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// No protocol version in common.
    NoCommonVersion,
    /// The proof did not verify.
    BadProof,
    /// A message arrived out of order.
    Unexpected,
}

/// Guest → host (link version 4): a bearer token for `registry`, limited to `scopes`
/// (`repository:NAME:ACTIONS`, as the registry's challenge asked for them). The host learns
/// the registry's token realm from the registry itself, never from this request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// The registry, as the image reference names it (`host[:port]`).
    pub registry: String,
    /// The scopes asked for.
    #[serde(
        serialize_with = "bounded_vec::serialize",
        deserialize_with = "bounded_vec::deserialize::<_, _, MAX_SCOPES>"
    )]
    pub scopes: Vec<String>,
}

/// Host → guest: a token limited to `granted` (the scopes asked for that the VM's policy
/// allows), good for `expires_in` seconds from when it was issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// The bearer token.
    pub token: Secret,
    /// Seconds it stays valid.
    pub expires_in: u32,
    /// The scopes it carries.
    #[serde(
        serialize_with = "bounded_vec::serialize",
        deserialize_with = "bounded_vec::deserialize::<_, _, MAX_SCOPES>"
    )]
    pub granted: Vec<String>,
}

/// Frames on an established link (protocol version 1), both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkMsg {
    /// Guest → host: a request; `id` is unique among the requests in flight on this link.
    Request {
        /// Request id.
        id: u64,
        /// The request.
        request: Request,
    },
    /// Host → guest: the answer to request `id` (answers may come in any order).
    Response {
        /// Request id.
        id: u64,
        /// The outcome.
        outcome: Outcome,
    },
    /// Either side: are you there?
    Ping {
        /// Echoed in the pong.
        seq: u64,
    },
    /// Answer to a ping.
    Pong {
        /// The ping's sequence number.
        seq: u64,
    },
    /// Guest → host (version 4): a scoped token; `id` shares the requests' numbering.
    TokenRequest {
        /// Request id.
        id: u64,
        /// What is asked for.
        request: TokenRequest,
    },
    /// Host → guest (version 4): the answer to token request `id`.
    TokenResponse {
        /// Request id.
        id: u64,
        /// The token, or why not.
        outcome: Result<Token, WireError>,
    },
}

/// Helper → guest agent: one call per connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelperCall {
    /// [`HELPER_VERSION`] of the helper.
    pub version: u16,
    /// The request.
    pub request: Request,
}

/// Guest agent → helper: the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelperReply {
    /// The outcome.
    pub outcome: Outcome,
}

/// A `Vec` whose decoding never pre-allocates from the length the peer announces (capacity
/// grows only with elements actually decoded, each of which consumed input bytes) and that
/// refuses more than `MAX` elements.
mod bounded_vec {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>, const MAX: usize>(
        d: D,
    ) -> Result<Vec<T>, D::Error> {
        struct V<T, const MAX: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for V<T, MAX> {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a sequence of at most {MAX} elements")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                if seq.size_hint().is_some_and(|n| n > MAX) {
                    return Err(serde::de::Error::invalid_length(MAX + 1, &self));
                }
                let mut out = Vec::new();
                while let Some(item) = seq.next_element()? {
                    if out.len() == MAX {
                        return Err(serde::de::Error::invalid_length(MAX + 1, &self));
                    }
                    out.push(item);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V::<T, MAX>(PhantomData))
    }
}
