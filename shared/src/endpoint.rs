//! Link endpoints as users write them: `unix:///abs/path`.
//!
//! Parsing only; the agents own the sockets. Later transports (vsock, hybrid vsock, Hyper-V
//! sockets) add variants here.

use std::path::PathBuf;

/// Where a link is dialed or listened on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket (Lima's forwarded socket, or the local bridge).
    Unix(PathBuf),
}

/// Why an endpoint string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Not a form this build knows.
    #[error("unsupported endpoint {0:?}: expected unix:///absolute/path")]
    EndpointUnsupported(String),
    /// A unix endpoint whose path is not absolute.
    #[error("endpoint {0:?}: the socket path must be absolute (unix:///abs/path)")]
    EndpointRelative(String),
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') || path.len() < 2 {
                return Err(EndpointError::EndpointRelative(s.to_owned()));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        Err(EndpointError::EndpointUnsupported(s.to_owned()))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok: Endpoint = "unix:///run/x.sock".parse().unwrap();
        assert_eq!(ok, Endpoint::Unix("/run/x.sock".into()));
        assert_eq!(ok.to_string(), "unix:///run/x.sock");
        for bad in ["unix://run/x", "unix://", "/run/x.sock", "tcp://1.2.3.4:5", ""] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }
}
