//! The wire protocol of the finch credential bridge, shared by the guest agent, the helper and
//! the host agent. It knows nothing of async runtimes, keychains or AWS.
//!
//! * [`frame`]: length-prefixed frames with a hard size limit.
//! * `io` (feature `tokio`): frames, sealed frames and typed messages over async streams.
//! * `accept` (feature `tokio`): the one accept loop, bounded and tracked.
//! * `link` (feature `tokio`): the loop that drives an authenticated link, and `Shutdown`.
//! * [`endpoint`]: endpoint strings such as `unix:///run/x.sock`.
//! * [`codec`]: payload encoding (postcard) behind two functions.
//! * [`docker_config`]: the docker config's JSON, decoded as docker/cli reads it.
//! * [`gojson`]: the credential-helper protocol's JSON as Go reads and writes it.
//! * [`message`]: link and helper-socket messages, typed errors that cross the link.
//! * [`handshake`]: the mutually authenticated, versioned link handshake (sans I/O).
//! * [`key`]: the per-VM link key and its file checks.
//! * [`limit`]: a log gate for floods and a length cap for logged text.
//! * [`private`]: owner-only files and directories (mode bits on unix, a DACL on Windows).
//! * [`registry`]: the one parser of server names, their spellings, and policy patterns.
//! * [`Secret`]: a credential that never prints.
//! * [`vm_name`]: the one parser of VM names.

#[cfg(feature = "tokio")]
pub mod accept;
pub mod challenge;
pub mod codec;
pub mod docker_config;
pub mod endpoint;
pub mod frame;
pub mod gojson;
pub mod handshake;
#[cfg(feature = "tokio")]
pub mod io;
pub mod key;
pub mod limit;
#[cfg(feature = "tokio")]
pub mod link;
pub mod message;
pub mod private;
pub mod registry;
pub mod seal;
mod secret;
pub mod vm_name;

pub use secret::Secret;

/// The not-found text of the docker credential-helper protocol.
pub const NOT_FOUND_TEXT: &str = "credentials not found in native keychain";
