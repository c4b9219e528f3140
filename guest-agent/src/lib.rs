//! The guest side of the finch credential bridge.
//!
//! * [`helper`]: `docker-credential-finchhost`, synchronous, no async runtime.
//! * [`agent`]: `finch-guest-agent serve`, the tokio daemon that holds the host link.
//! * [`docker_config`]: `finch-guest-agent docker-config`, for provisioning scripts.

pub mod agent;
pub mod docker_config;
pub mod helper;
