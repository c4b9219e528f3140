//! Link endpoints as users write them:
//!
//! * `unix:///abs/path`: a unix socket (Lima's forwarded socket, the local bridge).
//! * `vsock://CID:PORT`: AF_VSOCK; `CID` may be `-1` (any) where the guest listens.
//! * `hybrid:///abs/path/to/vmm.sock:PORT`: hybrid vsock (Firecracker, Cloud Hypervisor,
//!   vhost-device-vsock): the VMM's unix socket, then `CONNECT PORT\n`.
//! * `hvsock://VMID:PORT` or `hvsock://wsl:PORT`: a Hyper-V socket to a VM by id (a GUID), or
//!   to the WSL2 utility VM (its id asked of WSL at every dial).
//! * `tcp://HOST:PORT`: TCP, `HOST` an IPv4 literal, a bracketed IPv6 literal or a DNS name
//!   (WSL2's localhost forwarding, QEMU user networking's host forward). Only the link's
//!   mutual authentication protects it: anyone who can reach the port can try.
//!
//! Parsing only; the agents own the sockets.

use std::path::PathBuf;

/// The vsock port the guest agent listens on unless told otherwise.
pub const DEFAULT_VSOCK_PORT: u32 = 6127;
/// `VMADDR_CID_ANY` (`-1`).
pub const CID_ANY: u32 = u32::MAX;
/// `VMADDR_CID_HOST`: the host, as a guest sees it.
pub const CID_HOST: u32 = 2;

/// Which Hyper-V VM a `hvsock://` endpoint names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HvVm {
    /// A VM id, as a lower-case GUID `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    Id(String),
    /// The WSL2 utility VM, whose id changes at every WSL restart.
    Wsl,
}

/// Where a link is dialed or listened on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket.
    Unix(PathBuf),
    /// AF_VSOCK.
    Vsock {
        /// Context id ([`CID_ANY`] for `-1`).
        cid: u32,
        /// Port.
        port: u32,
    },
    /// Hybrid vsock through a VMM's unix socket.
    Hybrid {
        /// The VMM's socket.
        path: PathBuf,
        /// The guest port asked for with `CONNECT`.
        port: u32,
    },
    /// TCP.
    Tcp {
        /// An IP literal (IPv6 without brackets) or a DNS name, lower case.
        host: String,
        /// Port, 1–65535.
        port: u16,
    },
    /// A Hyper-V socket (Windows hosts).
    HvSock {
        /// The VM.
        vm: HvVm,
        /// The vsock port (its service id is [`hv_service_id`]).
        port: u32,
    },
}

/// The Hyper-V service id of vsock port `port`: `PPPPPPPP-facb-11e6-bd58-64006a7986d3`.
pub fn hv_service_id(port: u32) -> String {
    format!("{port:08x}-facb-11e6-bd58-64006a7986d3")
}

/// Why an endpoint string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Not a form this build knows.
    #[error(
        "unsupported endpoint {0:?}: expected unix:///abs/path, vsock://CID:PORT, hybrid:///abs/vmm.sock:PORT, hvsock://VMID|wsl:PORT or tcp://HOST:PORT"
    )]
    EndpointUnsupported(String),
    /// A path that is not absolute.
    #[error("endpoint {0:?}: the socket path must be absolute (unix:///abs/path)")]
    EndpointRelative(String),
    /// A CID, port or VM id that does not parse.
    #[error("endpoint {0:?}: {1}")]
    EndpointInvalid(String, &'static str),
}

fn port(s: &str, whole: &str) -> Result<u32, EndpointError> {
    match s.parse::<u32>() {
        Ok(p) if p != u32::MAX && !s.starts_with('+') => Ok(p),
        _ => Err(EndpointError::EndpointInvalid(
            whole.to_owned(),
            "the port must be a number below 4294967295",
        )),
    }
}

/// `HOST:PORT` of a `tcp://` endpoint: an IPv4 literal, `[IPv6]` or a DNS name, and a port.
fn tcp(rest: &str, whole: &str) -> Result<Endpoint, EndpointError> {
    let invalid = |why| EndpointError::EndpointInvalid(whole.to_owned(), why);
    let (host, p) = rest.rsplit_once(':').ok_or_else(|| invalid("expected tcp://HOST:PORT"))?;
    let port = p
        .parse::<u16>()
        .ok()
        .filter(|&n| n != 0 && !p.starts_with('+'))
        .ok_or_else(|| invalid("the port must be a number from 1 to 65535"))?;
    let host = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>()
            .map_err(|_| invalid("[…] must hold an IPv6 address"))?
            .to_string()
    } else if let Ok(v4) = host.parse::<std::net::Ipv4Addr>() {
        v4.to_string()
    } else if dns_name(host) {
        host.to_ascii_lowercase()
    } else {
        return Err(invalid("the host must be an IPv4 address, [IPv6] or a DNS name"));
    };
    Ok(Endpoint::Tcp { host, port })
}

/// A DNS name: dot-separated labels of 1–63 letters, digits and inner hyphens, 253 at most,
/// not all digits (that would be a malformed IPv4 address).
fn dns_name(s: &str) -> bool {
    s.len() <= 253
        && !s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && s.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn guid(s: &str) -> Option<String> {
    let lower = s.trim_start_matches('{').trim_end_matches('}').to_ascii_lowercase();
    let groups: Vec<&str> = lower.split('-').collect();
    let shape = [8, 4, 4, 4, 12];
    (groups.len() == 5
        && groups
            .iter()
            .zip(shape)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit())))
    .then_some(lower)
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let absolute = |path: &str| {
            if !path.starts_with('/') || path.len() < 2 {
                return Err(EndpointError::EndpointRelative(s.to_owned()));
            }
            Ok(PathBuf::from(path))
        };
        if let Some(path) = s.strip_prefix("unix://") {
            return absolute(path).map(Endpoint::Unix);
        }
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, p) = rest.split_once(':').ok_or_else(|| {
                EndpointError::EndpointInvalid(s.to_owned(), "expected vsock://CID:PORT")
            })?;
            let cid = match cid {
                "-1" => CID_ANY,
                c => c.parse::<u32>().ok().filter(|_| !c.starts_with('+')).ok_or_else(|| {
                    EndpointError::EndpointInvalid(
                        s.to_owned(),
                        "the CID must be a number (or -1 for any)",
                    )
                })?,
            };
            return Ok(Endpoint::Vsock { cid, port: port(p, s)? });
        }
        if let Some(rest) = s.strip_prefix("hybrid://") {
            let (path, p) = rest.rsplit_once(':').ok_or_else(|| {
                EndpointError::EndpointInvalid(s.to_owned(), "expected hybrid:///abs/vmm.sock:PORT")
            })?;
            return Ok(Endpoint::Hybrid { path: absolute(path)?, port: port(p, s)? });
        }
        if let Some(rest) = s.strip_prefix("hvsock://") {
            let (vm, p) = rest.rsplit_once(':').ok_or_else(|| {
                EndpointError::EndpointInvalid(
                    s.to_owned(),
                    "expected hvsock://VMID:PORT or hvsock://wsl:PORT",
                )
            })?;
            let vm = if vm.eq_ignore_ascii_case("wsl") {
                HvVm::Wsl
            } else {
                HvVm::Id(guid(vm).ok_or_else(|| {
                    EndpointError::EndpointInvalid(
                        s.to_owned(),
                        "the VM id must be a GUID (or wsl)",
                    )
                })?)
            };
            return Ok(Endpoint::HvSock { vm, port: port(p, s)? });
        }
        if let Some(rest) = s.strip_prefix("tcp://") {
            return tcp(rest, s);
        }
        Err(EndpointError::EndpointUnsupported(s.to_owned()))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix://{}", path.display()),
            Endpoint::Vsock { cid: CID_ANY, port } => write!(f, "vsock://-1:{port}"),
            Endpoint::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Endpoint::Hybrid { path, port } => write!(f, "hybrid://{}:{port}", path.display()),
            Endpoint::HvSock { vm: HvVm::Wsl, port } => write!(f, "hvsock://wsl:{port}"),
            Endpoint::HvSock { vm: HvVm::Id(id), port } => write!(f, "hvsock://{id}:{port}"),
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp://[{host}]:{port}")
            }
            Endpoint::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let cases: &[(&str, Endpoint)] = &[
            ("unix:///run/x.sock", Endpoint::Unix("/run/x.sock".into())),
            ("vsock://3:6127", Endpoint::Vsock { cid: 3, port: 6127 }),
            ("vsock://-1:6127", Endpoint::Vsock { cid: CID_ANY, port: 6127 }),
            (
                "hybrid:///run/vm/v.sock:6127",
                Endpoint::Hybrid { path: "/run/vm/v.sock".into(), port: 6127 },
            ),
            ("hvsock://wsl:6127", Endpoint::HvSock { vm: HvVm::Wsl, port: 6127 }),
            (
                "hvsock://0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0:6127",
                Endpoint::HvSock {
                    vm: HvVm::Id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into()),
                    port: 6127,
                },
            ),
            ("tcp://127.0.0.1:6127", Endpoint::Tcp { host: "127.0.0.1".into(), port: 6127 }),
            ("tcp://[::1]:1", Endpoint::Tcp { host: "::1".into(), port: 1 }),
            ("tcp://LocalHost:65535", Endpoint::Tcp { host: "localhost".into(), port: 65535 }),
            (
                "tcp://vm-1.lima.internal:80",
                Endpoint::Tcp { host: "vm-1.lima.internal".into(), port: 80 },
            ),
        ];
        for (text, want) in cases {
            let got: Endpoint = text.parse().unwrap();
            assert_eq!(&got, want, "{text}");
            assert_eq!(got.to_string().parse::<Endpoint>().unwrap(), got, "{text} round trip");
        }
        assert_eq!("hvsock://wsl:1".parse::<Endpoint>().unwrap().to_string(), "hvsock://wsl:1");
        for bad in [
            "unix://run/x",
            "unix://",
            "/run/x.sock",
            "tcp://1.2.3.4",
            "tcp://1.2.3.4:0",
            "tcp://1.2.3.4:65536",
            "tcp://1.2.3.4:+5",
            "tcp://1.2.3.400:5",
            "tcp://1.2.3:5",
            "tcp://::1:5",
            "tcp://[::g]:5",
            "tcp://:5",
            "tcp://a_b:5",
            "tcp://-a:5",
            "tcp://a..b:5",
            "tcp://user@host:5",
            "tcp://host:5/path",
            "",
            "vsock://3",
            "vsock://x:1",
            "vsock://3:x",
            "vsock://3:-1",
            "vsock://+3:1",
            "vsock://3:4294967295",
            "hybrid://rel/v.sock:1",
            "hybrid:///v.sock",
            "hybrid:///v.sock:x",
            "hvsock://not-a-guid:1",
            "hvsock://wsl",
            "hvsock://0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f:1",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn hyper_v_service_ids() {
        assert_eq!(hv_service_id(DEFAULT_VSOCK_PORT), "000017ef-facb-11e6-bd58-64006a7986d3");
        assert_eq!(hv_service_id(1), "00000001-facb-11e6-bd58-64006a7986d3");
    }
}
