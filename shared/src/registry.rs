//! Registry names: the one parser every part of the host uses, and the spellings clients use.
//!
//! A client sends a server string (`registry.example`, `https://registry.example:5000/v2/`,
//! `https://index.docker.io/v1/`, …). [`Registry::parse`] turns it into a typed registry: a
//! valid host (a DNS name, an IPv4 literal or a bracketed IPv6 literal), lower-cased, and an
//! optional numeric port; one leading `http://` or `https://` and any path are dropped. Anything
//! else (a second colon, a non-numeric port, a character no host name has, an empty label) is
//! refused. Policy, routing, every source and the audit line use that value and nothing else,
//! so no two parts can disagree about which registry a request names.
//!
//! docker/cli keys credentials by the registry's host (port kept), except Docker Hub, which is
//! always `https://index.docker.io/v1/`. nerdctl, BuildKit, containers-image and `docker
//! logout` each send or store other spellings of the same registry; [`Registry::spellings`]
//! lists them so that a credential stored under one is found under all.
//!
//! [`Pattern`] is the policy's registry pattern (`*`, `*.suffix`, `host[:port]`).

use std::fmt;
use std::net::Ipv6Addr;

/// The key docker/cli uses for Docker Hub.
pub const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// Longest server string accepted.
pub const MAX_SERVER_LEN: usize = 1024;

/// Longest host name (RFC 1035).
pub const MAX_HOST_LEN: usize = 253;

const MAX_LABEL_LEN: usize = 63;

const DOCKER_HUB_HOSTS: &[&str] =
    &["docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"];

/// Why a server string is not a registry. The text never repeats the input (it may be huge or
/// hold anything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegistryInvalid {
    /// Nothing, or only a scheme.
    #[error("the server name is empty")]
    Empty,
    /// Over [`MAX_SERVER_LEN`] bytes.
    #[error("the server name is longer than {MAX_SERVER_LEN} bytes")]
    TooLong,
    /// The host is not a DNS name, an IPv4 literal or a bracketed IPv6 literal.
    #[error(
        "the server name's host is not a valid host name or IP address (letters, digits, '-', '_' and '.' in labels of 1 to 63, at most 253 in all; IPv6 in brackets)"
    )]
    Host,
    /// The port is not a number from 1 to 65535.
    #[error("the server name's port is not a number from 1 to 65535")]
    Port,
}

/// A registry: a valid host, lower-cased, and an optional port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Registry {
    host: String,
    port: Option<u16>,
    plain_http: bool,
}

impl Registry {
    /// Parses a server string the way a registry client means it.
    pub fn parse(server: &str) -> Result<Registry, RegistryInvalid> {
        if server.len() > MAX_SERVER_LEN {
            return Err(RegistryInvalid::TooLong);
        }
        let (rest, plain_http) = if let Some(r) = strip_prefix_ci(server, "https://") {
            (r, false)
        } else if let Some(r) = strip_prefix_ci(server, "http://") {
            (r, true)
        } else {
            (server, false)
        };
        let hostport = rest.split('/').next().unwrap_or_default();
        if hostport.is_empty() {
            return Err(RegistryInvalid::Empty);
        }
        let (host, port) = split_host_port(hostport)?;
        let port = port.map(parse_port).transpose()?;
        Ok(Registry { host, port, plain_http })
    }

    /// The host, lower-cased (an IPv6 literal in brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, when the server string named one.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Whether the client said `http://` (some sources refuse to hand tokens to plain HTTP).
    pub fn plain_http(&self) -> bool {
        self.plain_http
    }

    /// Whether this is Docker Hub (one of its names, on the default port or 443: the same
    /// registry, so one policy rule and one stored credential cover every spelling).
    pub fn is_docker_hub(&self) -> bool {
        matches!(self.port, None | Some(443)) && DOCKER_HUB_HOSTS.contains(&self.host.as_str())
    }

    /// `host[:port]`.
    pub fn host_port(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.host),
            None => self.host.clone(),
        }
    }

    /// The key under which docker/cli stores the credential: `host[:port]`, or
    /// [`DOCKER_HUB_KEY`].
    pub fn key(&self) -> String {
        if self.is_docker_hub() { DOCKER_HUB_KEY.to_owned() } else { self.host_port() }
    }

    /// Every spelling under which a credential for this registry may have been stored, most
    /// specific first and without duplicates: docker/cli's key, then the variants nerdctl
    /// tries (`host:443`, `https://host:443`, `http://host:443`, `host`, `https://host`,
    /// `http://host`) and those `docker logout` erases.
    pub fn spellings(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(10);
        let mut push = |s: String| {
            if !out.contains(&s) {
                out.push(s);
            }
        };
        push(self.key());
        if self.is_docker_hub() {
            for host in DOCKER_HUB_HOSTS {
                push((*host).to_owned());
                push(format!("https://{host}"));
            }
            return out;
        }
        let mut hosts = vec![self.host_port()];
        match self.port {
            None => hosts.insert(0, format!("{}:443", self.host)),
            Some(443) => hosts.push(self.host.clone()),
            Some(_) => {}
        }
        for h in hosts {
            push(h.clone());
            push(format!("https://{h}"));
            push(format!("http://{h}"));
        }
        out
    }
}

impl fmt::Display for Registry {
    /// docker/cli's key; always safe to log (only host characters).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

/// Splits `host[:port]` and checks and lower-cases the host.
fn split_host_port(hostport: &str) -> Result<(String, Option<&str>), RegistryInvalid> {
    if let Some(rest) = hostport.strip_prefix('[') {
        let (inside, tail) = rest.split_once(']').ok_or(RegistryInvalid::Host)?;
        inside.parse::<Ipv6Addr>().map_err(|_| RegistryInvalid::Host)?;
        let port = match tail {
            "" => None,
            t => Some(t.strip_prefix(':').ok_or(RegistryInvalid::Port)?),
        };
        return Ok((format!("[{}]", inside.to_ascii_lowercase()), port));
    }
    let (host, port) = match hostport.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (hostport, None),
    };
    if !valid_host(host) {
        return Err(RegistryInvalid::Host);
    }
    Ok((host.to_ascii_lowercase(), port))
}

fn parse_port(port: &str) -> Result<u16, RegistryInvalid> {
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RegistryInvalid::Port);
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(RegistryInvalid::Port),
    }
}

/// A DNS name (or an IPv4 literal, which is one syntactically): labels of 1 to 63 letters,
/// digits, `-` and `_`, not starting or ending with `-`; at most 253 bytes; no trailing dot.
pub fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAX_LABEL_LEN
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// One pattern of a policy rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// `*`: every registry.
    Any,
    /// `*.example.com`: every host under `example.com` (lower-cased, without the `*.`).
    Suffix(String),
    /// `host` or `host:port` (Docker Hub, by any of its names, as [`DOCKER_HUB_KEY`]).
    Exact {
        /// Host, lower-cased.
        host: String,
        /// Port, if the pattern names one.
        port: Option<u16>,
    },
}

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a registry pattern: use \"*\", \"*.example.com\" or \"host[:port]\" (no scheme, path or other wildcard)"
)]
pub struct PatternInvalid(pub String);

impl std::str::FromStr for Pattern {
    type Err = PatternInvalid;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PatternInvalid(s.to_owned());
        if s == "*" {
            return Ok(Pattern::Any);
        }
        if s == DOCKER_HUB_KEY {
            return Ok(Pattern::Exact { host: DOCKER_HUB_KEY.to_owned(), port: None });
        }
        if let Some(suffix) = s.strip_prefix("*.") {
            if !valid_host(suffix) {
                return Err(bad());
            }
            return Ok(Pattern::Suffix(suffix.to_ascii_lowercase()));
        }
        if s.contains('/') || s.is_empty() {
            return Err(bad());
        }
        let registry = Registry::parse(s).map_err(|_| bad())?;
        if registry.is_docker_hub() {
            return Ok(Pattern::Exact { host: DOCKER_HUB_KEY.to_owned(), port: None });
        }
        Ok(Pattern::Exact { host: registry.host, port: registry.port })
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Suffix(s) => write!(f, "*.{s}"),
            Pattern::Exact { host, port: Some(p) } => write!(f, "{host}:{p}"),
            Pattern::Exact { host, port: None } => f.write_str(host),
        }
    }
}

impl Pattern {
    /// Whether this pattern covers `registry`.
    pub fn matches(&self, registry: &Registry) -> bool {
        if registry.is_docker_hub() {
            return matches!(self, Pattern::Any)
                || matches!(self, Pattern::Exact { host, .. } if host == DOCKER_HUB_KEY);
        }
        let host = registry.host();
        match self {
            Pattern::Any => true,
            Pattern::Suffix(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix.as_str())
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
            Pattern::Exact { host: h, port: p } => {
                h == host
                    && match (*p, registry.port()) {
                        (None, None | Some(443)) | (Some(443), None) => true,
                        (Some(a), Some(b)) => a == b,
                        _ => false,
                    }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &str) -> Registry {
        Registry::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn keys_follow_docker_cli() {
        let table = [
            ("registry.example", "registry.example"),
            ("Registry.EXAMPLE", "registry.example"),
            ("registry.example:5000", "registry.example:5000"),
            ("https://registry.example:5000/v2/", "registry.example:5000"),
            ("HTTPS://registry.example/v2/", "registry.example"),
            ("http://registry.example/path", "registry.example"),
            ("docker.io", DOCKER_HUB_KEY),
            ("index.docker.io", DOCKER_HUB_KEY),
            ("https://index.docker.io/v1/", DOCKER_HUB_KEY),
            ("registry-1.docker.io", DOCKER_HUB_KEY),
            ("docker.io:5000", "docker.io:5000"),
            ("docker.io:443", DOCKER_HUB_KEY),
            ("https://registry.hub.docker.com:443/v2/", DOCKER_HUB_KEY),
            ("[::1]:5000", "[::1]:5000"),
            ("[FE80::1]", "[fe80::1]"),
            ("localhost:5000", "localhost:5000"),
            ("127.0.0.1:5000", "127.0.0.1:5000"),
            ("my_registry.local", "my_registry.local"),
        ];
        for (input, key) in table {
            assert_eq!(reg(input).key(), key, "{input}");
        }
        assert!(reg("http://r.example").plain_http() && !reg("https://r.example").plain_http());
    }

    /// The class of the ECR bypass: anything after a host that is not `:PORT` or a path.
    #[test]
    fn refused_server_names() {
        let long = "a".repeat(MAX_SERVER_LEN + 1);
        let long_label = format!("{}.example", "a".repeat(64));
        let long_host = ["a"; 128].join(".");
        let cases: &[(&str, RegistryInvalid)] = &[
            ("", RegistryInvalid::Empty),
            ("https://", RegistryInvalid::Empty),
            ("/v2/", RegistryInvalid::Empty),
            (&long, RegistryInvalid::TooLong),
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com:x.allowed.example",
                RegistryInvalid::Port,
            ),
            ("public.ecr.aws:x.allowed.example", RegistryInvalid::Port),
            ("reg.example:5000:6000", RegistryInvalid::Port),
            ("reg.example:", RegistryInvalid::Port),
            ("reg.example:0", RegistryInvalid::Port),
            ("reg.example:65536", RegistryInvalid::Port),
            ("reg.example:+80", RegistryInvalid::Port),
            ("reg.example:080000", RegistryInvalid::Port),
            ("[::1]x", RegistryInvalid::Port),
            ("::1", RegistryInvalid::Host),
            ("[::1", RegistryInvalid::Host),
            ("[zz::1]:80", RegistryInvalid::Host),
            ("user@reg.example", RegistryInvalid::Host),
            ("reg.example?x=1", RegistryInvalid::Host),
            ("reg.example#frag", RegistryInvalid::Host),
            ("re g.example", RegistryInvalid::Host),
            ("reg..example", RegistryInvalid::Host),
            (".reg.example", RegistryInvalid::Host),
            ("reg.example.", RegistryInvalid::Host),
            ("-reg.example", RegistryInvalid::Host),
            ("reg-.example", RegistryInvalid::Host),
            ("reg\n.example", RegistryInvalid::Host),
            ("régistry.example", RegistryInvalid::Host),
            (&long_label, RegistryInvalid::Host),
            (&long_host, RegistryInvalid::Host),
            ("ftp://reg.example", RegistryInvalid::Port),
            ("https://https://reg.example", RegistryInvalid::Port),
        ];
        for (input, want) in cases {
            assert_eq!(Registry::parse(input), Err(*want), "{input:?}");
        }
        let e = Registry::parse(&format!("x{}", "\u{1b}".repeat(10))).unwrap_err().to_string();
        assert!(!e.contains('\u{1b}'), "the error repeats the input: {e:?}");
    }

    #[test]
    fn spellings_cover_nerdctl_and_logout() {
        let s = reg("registry.example").spellings();
        for want in [
            "registry.example",
            "registry.example:443",
            "https://registry.example:443",
            "http://registry.example:443",
            "https://registry.example",
            "http://registry.example",
        ] {
            assert!(s.iter().any(|x| x == want), "{want} missing from {s:?}");
        }
        assert_eq!(s[0], "registry.example");
        let s = reg("https://registry.example:443").spellings();
        assert_eq!(s[0], "registry.example:443");
        assert!(s.contains(&"registry.example".to_owned()));
        assert_eq!(reg("h:5000").spellings(), vec!["h:5000", "https://h:5000", "http://h:5000"]);
        let s = reg("docker.io").spellings();
        assert_eq!(s[0], DOCKER_HUB_KEY);
        let mut dedup = s.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), s.len());
    }

    fn p(s: &str) -> Pattern {
        s.parse().unwrap()
    }

    #[test]
    fn pattern_match_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "anything.example:5000", true),
            ("*", "https://index.docker.io/v1/", true),
            ("*.example.com", "reg.example.com", true),
            ("*.example.com", "https://a.b.EXAMPLE.com/v2/", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "badexample.com", false),
            ("*.example.com", "reg.example.com:5000", true),
            ("ghcr.io", "ghcr.io", true),
            ("ghcr.io", "GHCR.IO", true),
            ("ghcr.io", "https://ghcr.io/v2/", true),
            ("ghcr.io", "ghcr.io:443", true),
            ("ghcr.io", "ghcr.io:5000", false),
            ("ghcr.io", "evil-ghcr.io", false),
            ("ghcr.io", "ghcr.io.evil.com", false),
            ("reg:5000", "reg:5000", true),
            ("reg:5000", "reg", false),
            ("reg:5000", "reg:5001", false),
            ("reg:443", "reg", true),
            ("docker.io", "https://index.docker.io/v1/", true),
            ("docker.io", "registry-1.docker.io", true),
            ("index.docker.io", "docker.io", true),
            ("docker.io", "ghcr.io", false),
            ("*.docker.io", "docker.io", false),
            ("[::1]:5000", "[::1]:5000", true),
        ];
        for (pattern, server, want) in cases {
            assert_eq!(p(pattern).matches(&reg(server)), *want, "{pattern} vs {server}");
        }
    }

    #[test]
    fn refused_patterns() {
        for bad in [
            "",
            "**",
            "*example.com",
            "reg.*",
            "https://reg",
            "reg/path",
            "reg:",
            "reg:abc",
            "reg:123456",
            ".reg",
            "reg..x",
            "re g",
            "*.",
            "*.a..b",
            "reg:x.allowed.example",
        ] {
            assert!(bad.parse::<Pattern>().is_err(), "{bad:?}");
        }
        assert_eq!(p("Docker.IO"), p(DOCKER_HUB_KEY));
    }
}
