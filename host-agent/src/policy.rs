//! Per-VM policy: which registries a VM may `get`, `store`, `erase` and `list`.
//!
//! A rule is a list of patterns: `*` (any registry), `*.suffix` (any host under `suffix`, not
//! `suffix` itself), or `host[:port]` (that host; a bare host also matches it on `:443`).
//! Matching is on the registry's host as docker/cli normalizes it, case-insensitive, and every
//! spelling of Docker Hub (`docker.io`, `index.docker.io`, `https://index.docker.io/v1/`, …)
//! is one registry. The defaults (`*` for every operation) keep `finch login`, `finch logout`
//! and pulls from any registry working; `list` only ever answers names and usernames.

use finch_shared::registry::{DOCKER_HUB_KEY, is_docker_hub, registry_key, split_port};

/// One pattern of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// `*`: every registry.
    Any,
    /// `*.example.com`: every host under `example.com` (lower-cased, without the `*.`).
    Suffix(String),
    /// `host` or `host:port` (lower-cased; Docker Hub as [`DOCKER_HUB_KEY`]).
    Exact {
        /// Host, lower-cased.
        host: String,
        /// Port, if the pattern names one.
        port: Option<String>,
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
        if is_docker_hub(s) {
            return Ok(Pattern::Exact { host: DOCKER_HUB_KEY.to_owned(), port: None });
        }
        let valid_host = |h: &str| {
            !h.is_empty()
                && h.len() <= 253
                && !h.starts_with(['.', '-'])
                && !h.ends_with('.')
                && !h.contains("..")
                && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        };
        if let Some(suffix) = s.strip_prefix("*.") {
            if !valid_host(suffix) {
                return Err(bad());
            }
            return Ok(Pattern::Suffix(suffix.to_ascii_lowercase()));
        }
        let (host, port) = split_port(s);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port_ok = port
            .is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
        let ipv6 = s.starts_with('[') && host.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
        if !(port_ok && (valid_host(host) || ipv6)) {
            return Err(bad());
        }
        Ok(Pattern::Exact { host: host.to_ascii_lowercase(), port: port.map(str::to_owned) })
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Suffix(s) => write!(f, "*.{s}"),
            Pattern::Exact { host, port: Some(p) } => write!(f, "{host}:{p}"),
            Pattern::Exact { host, port: None } => f.write_str(host),
        }
    }
}

impl Pattern {
    /// Whether this pattern covers `server` (any spelling a client sends).
    pub fn matches(&self, server: &str) -> bool {
        let key = registry_key(server);
        if key == DOCKER_HUB_KEY {
            return matches!(self, Pattern::Any)
                || matches!(self, Pattern::Exact { host, .. } if host == DOCKER_HUB_KEY);
        }
        let (host, port) = split_port(&key);
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        match self {
            Pattern::Any => true,
            Pattern::Suffix(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix.as_str())
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
            Pattern::Exact { host: h, port: p } => {
                *h == host
                    && match (p.as_deref(), port) {
                        (None, None | Some("443")) => true,
                        (Some(a), Some(b)) => a == b,
                        (Some("443"), None) => true,
                        _ => false,
                    }
            }
        }
    }
}

/// The patterns of one operation; empty means nothing is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule(pub Vec<Pattern>);

impl Rule {
    /// Every registry.
    pub fn any() -> Rule {
        Rule(vec![Pattern::Any])
    }

    /// Whether `server` is allowed.
    pub fn allows(&self, server: &str) -> bool {
        self.0.iter().any(|p| p.matches(server))
    }

    /// Whether nothing at all is allowed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        write!(f, "[{}]", parts.join(", "))
    }
}

/// What one VM may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `get`.
    pub get: Rule,
    /// `store` (`finch login` from the VM).
    pub store: Rule,
    /// `erase` (`finch logout` from the VM).
    pub erase: Rule,
    /// `list`: the registries whose names and usernames the VM may see.
    pub list: Rule,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { get: Rule::any(), store: Rule::any(), erase: Rule::any(), list: Rule::any() }
    }
}

impl Policy {
    /// The rule of operation `op` (`get`, `store`, `erase`, `list`).
    pub fn rule(&self, op: &str) -> Option<&Rule> {
        match op {
            "get" => Some(&self.get),
            "store" => Some(&self.store),
            "erase" => Some(&self.erase),
            "list" => Some(&self.list),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        s.parse().unwrap()
    }

    #[test]
    fn match_table() {
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
            assert_eq!(p(pattern).matches(server), *want, "{pattern} vs {server}");
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
        ] {
            assert!(bad.parse::<Pattern>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rules_and_defaults() {
        let policy = Policy::default();
        for op in ["get", "store", "erase", "list"] {
            assert!(policy.rule(op).unwrap().allows("anything"));
        }
        assert!(policy.rule("version").is_none());
        let empty = Rule(Vec::new());
        assert!(empty.is_empty() && !empty.allows("x"));
        let r = Rule(vec![p("ghcr.io"), p("*.corp.example")]);
        assert!(r.allows("ghcr.io") && r.allows("r.corp.example") && !r.allows("quay.io"));
        assert_eq!(r.to_string(), "[ghcr.io, *.corp.example]");
    }
}
