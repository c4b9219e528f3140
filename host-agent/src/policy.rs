//! Per-VM policy: which registries a VM may `get`, `store`, `erase` and `list`.
//!
//! A rule is a list of patterns: `*` (any registry), `*.suffix` (any host under `suffix`, not
//! `suffix` itself), or `host[:port]` (that host; a bare host also matches it on `:443`).
//! Matching is on the registry's host as docker/cli normalizes it, case-insensitive, and every
//! spelling of Docker Hub (`docker.io`, `index.docker.io`, `https://index.docker.io/v1/`, …)
//! is one registry. The defaults (`*` for every operation) keep `finch login`, `finch logout`
//! and pulls from any registry working; `list` only ever answers names and usernames.

use finch_shared::message::Op;
pub use finch_shared::registry::Pattern;
use finch_shared::registry::Registry;

/// The patterns of one operation; empty means nothing is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule(pub Vec<Pattern>);

impl Rule {
    /// Every registry.
    pub fn any() -> Rule {
        Rule(vec![Pattern::Any])
    }

    /// Whether `registry` is allowed.
    pub fn allows(&self, registry: &Registry) -> bool {
        self.0.iter().any(|p| p.matches(registry))
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
    /// `pull` and `push`: the repositories the VM may get scoped tokens for (none by default).
    pub tokens: crate::source::token::TokenPolicy,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            get: Rule::any(),
            store: Rule::any(),
            erase: Rule::any(),
            list: Rule::any(),
            tokens: crate::source::token::TokenPolicy::default(),
        }
    }
}

impl Policy {
    /// The rule of operation `op`.
    pub fn rule(&self, op: Op) -> &Rule {
        match op {
            Op::Get => &self.get,
            Op::Store => &self.store,
            Op::Erase => &self.erase,
            Op::List => &self.list,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        s.parse().unwrap()
    }

    fn reg(s: &str) -> Registry {
        Registry::parse(s).unwrap()
    }

    #[test]
    fn rules_and_defaults() {
        let policy = Policy::default();
        for op in Op::ALL {
            assert!(policy.rule(op).allows(&reg("anything")));
        }
        let empty = Rule(Vec::new());
        assert!(empty.is_empty() && !empty.allows(&reg("x")));
        let r = Rule(vec![p("ghcr.io"), p("*.corp.example")]);
        assert!(r.allows(&reg("ghcr.io")) && r.allows(&reg("r.corp.example")));
        assert!(!r.allows(&reg("quay.io")));
        assert_eq!(r.to_string(), "[ghcr.io, *.corp.example]");
    }
}
