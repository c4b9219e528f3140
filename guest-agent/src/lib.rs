//! The guest side of the finch credential bridge.
//!
//! * [`helper`]: `docker-credential-finchhost`, synchronous, no async runtime.
//! * [`agent`]: `finch-guest-agent serve`, the tokio daemon that holds the host link.

pub mod agent;
pub mod helper;
