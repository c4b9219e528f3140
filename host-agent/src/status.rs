//! What `finch-host-agent status` reports: per VM, whether its link is up, since when, how
//! many requests it made and the last link error (with its time, and only while it is newer
//! than the link's `up since`: a link that came up afterwards has no error to show); plus the
//! agent's own facts.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One VM's link, as last seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Where it is dialed.
    pub endpoint: String,
    /// Whether the link is up (authenticated).
    pub up: bool,
    /// Unix time of the last change of `up` (or of configuration).
    pub since: u64,
    /// Requests answered since the agent started.
    pub requests: u64,
    /// Why the link last failed, while that is newer than its coming up.
    pub last_error: Option<String>,
    /// Unix time of `last_error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_at: Option<u64>,
    /// How each registry reached the VM since the agent started, by its key
    /// (`finch_shared::registry::Registry::key`): scoped tokens, or the secret itself through `get`. At most
    /// [`MAX_PATHS_PER_VM`] registries; more are counted in `other_paths`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub paths: BTreeMap<String, Paths>,
    /// Answers for registries past [`MAX_PATHS_PER_VM`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub other_paths: u64,
    /// A Lima instance's config that changed after the VM started (the agent wired it while
    /// the VM ran): the VM runs without what the file says until it is restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_for: Option<String>,
}

/// Most registries whose path `status` keeps per VM (a guest names the registries).
pub const MAX_PATHS_PER_VM: usize = 64;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What one registry's answers to one VM were.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paths {
    /// Scoped tokens given (link version 4: the registry front).
    pub tokens: u64,
    /// Secrets given through `get` (the helper, or the front's Basic answer).
    pub secrets: u64,
}

/// Which path an answer took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A scoped token.
    Token,
    /// The secret itself.
    Secret,
}

/// The agent as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The agent's pid.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// The config file consulted, and whether it existed.
    pub config_file: String,
    /// Whether the config file existed at the last (re)load.
    pub config_file_found: bool,
    /// The last reload error, if the last reload failed.
    pub config_error: Option<String>,
    /// The host's docker config directory.
    pub docker_config: String,
    /// Cached credentials (ECR tokens) being served from memory.
    pub cache_entries: u64,
    /// Every VM, by name.
    pub vms: BTreeMap<String, VmStatus>,
}

/// Unix time now, in seconds.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The live status of every VM, updated by the links and the resolver.
#[derive(Debug, Default)]
pub struct StatusBoard {
    vms: Mutex<BTreeMap<String, VmStatus>>,
}

impl StatusBoard {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, VmStatus>) -> T) -> T {
        f(&mut self.vms.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Makes the board hold exactly these VMs (new ones down, dropped ones gone).
    pub fn configure<'a>(&self, vms: impl IntoIterator<Item = (&'a str, String)>) {
        self.with(|map| {
            let mut next = BTreeMap::new();
            for (name, endpoint) in vms {
                let mut entry = map
                    .remove(name)
                    .unwrap_or_else(|| VmStatus { since: now_secs(), ..VmStatus::default() });
                entry.endpoint = endpoint;
                next.insert(name.to_owned(), entry);
            }
            *map = next;
        });
    }

    /// The link of `vm` came up.
    pub fn link_up(&self, vm: &str) {
        self.with(|map| {
            if let Some(s) = map.get_mut(vm) {
                s.up = true;
                s.since = now_secs();
                // An error from before the link came up is history, not news.
                s.last_error = None;
                s.last_error_at = None;
            }
        });
    }

    /// The link of `vm` went down, or could not be made, for `reason`.
    pub fn link_down(&self, vm: &str, reason: &str) {
        self.with(|map| {
            if let Some(s) = map.get_mut(vm) {
                if s.up {
                    s.since = now_secs();
                }
                s.up = false;
                s.last_error = Some(reason.to_owned());
                s.last_error_at = Some(now_secs());
            }
        });
    }

    /// `vm` made a request.
    pub fn count_request(&self, vm: &str) {
        self.with(|map| {
            if let Some(s) = map.get_mut(vm) {
                s.requests += 1;
            }
        });
    }

    /// `vm` was given an answer for `registry` (its key) by `via`.
    pub fn count_path(&self, vm: &str, registry: &str, via: Via) {
        self.with(|map| {
            let Some(s) = map.get_mut(vm) else { return };
            if !s.paths.contains_key(registry) && s.paths.len() >= MAX_PATHS_PER_VM {
                s.other_paths += 1;
                return;
            }
            let entry = s.paths.entry(registry.to_owned()).or_default();
            match via {
                Via::Token => entry.tokens += 1,
                Via::Secret => entry.secrets += 1,
            }
        });
    }

    /// A copy of every VM's status.
    pub fn snapshot(&self) -> BTreeMap<String, VmStatus> {
        self.with(|map| map.clone())
    }
}

/// Renders `status` for people.
pub fn render(status: &AgentStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "finch-host-agent: running (pid {}, up {})",
        status.pid,
        duration(status.uptime_secs)
    );
    let found = if status.config_file_found { "" } else { " (not present: defaults)" };
    let _ = writeln!(out, "config file:   {}{found}", status.config_file);
    if let Some(e) = &status.config_error {
        let _ = writeln!(out, "config error:  {e} (the previous config is in force)");
    }
    let _ = writeln!(out, "docker config: {}", status.docker_config);
    let _ = writeln!(out, "cache entries: {}", status.cache_entries);
    if status.vms.is_empty() {
        let _ = writeln!(out, "no VMs configured");
    }
    let now = now_secs();
    for (name, vm) in &status.vms {
        let state = if vm.up { "up" } else { "down" };
        let _ = writeln!(
            out,
            "vm {name}: link {state} for {}, {} requests, endpoint {}",
            duration(now.saturating_sub(vm.since)),
            vm.requests,
            vm.endpoint
        );
        if let Some(config) = &vm.restart_for {
            let _ = writeln!(
                out,
                "  restart needed: {config} changed after the VM started, so it runs without \
                 it (finch vm stop && finch vm start)"
            );
        }
        if let Some(e) = &vm.last_error {
            match vm.last_error_at {
                Some(at) => {
                    let ago = duration(now.saturating_sub(at));
                    let _ = writeln!(out, "  last error ({ago} ago): {e}");
                }
                None => {
                    let _ = writeln!(out, "  last error: {e}");
                }
            }
        }
        for (registry, paths) in &vm.paths {
            let said = match (paths.tokens, paths.secrets) {
                (t, 0) => format!("scoped tokens ({t})"),
                (0, n) => format!("secrets through get ({n})"),
                (t, n) => format!("scoped tokens ({t}) and secrets through get ({n})"),
            };
            let _ = writeln!(out, "  {registry}: {said}");
        }
        if vm.other_paths > 0 {
            let _ = writeln!(out, "  {} more answers for other registries", vm.other_paths);
        }
    }
    out
}

fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{}s", secs / 60, secs % 60),
        _ => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_each_registry_took_is_kept_bounded_and_said() {
        let board = StatusBoard::default();
        board.configure([("a", "unix:///a".to_owned())]);
        board.count_path("a", "ghcr.io", Via::Token);
        board.count_path("a", "ghcr.io", Via::Token);
        board.count_path("a", "quay.io", Via::Secret);
        board.count_path("gone", "ghcr.io", Via::Token);
        for i in 0..MAX_PATHS_PER_VM + 5 {
            board.count_path("a", &format!("r{i}.example"), Via::Secret);
        }
        let snap = board.snapshot();
        let a = &snap["a"];
        assert_eq!(a.paths.len(), MAX_PATHS_PER_VM);
        assert_eq!(a.paths["ghcr.io"], Paths { tokens: 2, secrets: 0 });
        assert_eq!(a.other_paths, 7);
        let status = AgentStatus { vms: snap, ..AgentStatus::default() };
        let text = render(&status);
        assert!(text.contains("  ghcr.io: scoped tokens (2)\n"), "{text}");
        assert!(text.contains("  quay.io: secrets through get (1)\n"), "{text}");
        assert!(text.contains("  7 more answers for other registries"), "{text}");
    }

    #[test]
    fn board_tracks_links_and_requests() {
        let board = StatusBoard::default();
        board.configure([("a", "unix:///a".to_owned()), ("b", "unix:///b".to_owned())]);
        board.link_up("a");
        board.count_request("a");
        board.count_request("a");
        board.link_down("b", "cannot connect");
        board.count_request("gone");
        let snap = board.snapshot();
        assert!(snap["a"].up && snap["a"].requests == 2);
        assert_eq!(snap["b"].last_error.as_deref(), Some("cannot connect"));
        assert!(snap["b"].last_error_at.is_some_and(|at| at >= snap["b"].since));
        // The link comes up afterwards: its old error is no longer shown.
        board.link_up("b");
        let snap = board.snapshot();
        assert_eq!(
            (snap["b"].up, &snap["b"].last_error, snap["b"].last_error_at),
            (true, &None, None)
        );
        assert!(
            !render(&AgentStatus { vms: snap, ..AgentStatus::default() }).contains("last error")
        );
        board.configure([("a", "unix:///a2".to_owned())]);
        let snap = board.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!((snap["a"].requests, snap["a"].endpoint.as_str()), (2, "unix:///a2"));
    }

    #[test]
    fn renders_for_people() {
        let mut status = AgentStatus {
            pid: 42,
            uptime_secs: 3725,
            config_file: "/h/.finch/host-agent.toml".into(),
            docker_config: "/h/.finch".into(),
            ..AgentStatus::default()
        };
        status.vms.insert(
            "finch".into(),
            VmStatus {
                endpoint: "unix:///s".into(),
                up: false,
                since: now_secs(),
                requests: 3,
                last_error: Some("refused".into()),
                last_error_at: Some(now_secs().saturating_sub(75)),
                restart_for: Some("/l/finch/lima.yaml".into()),
                ..VmStatus::default()
            },
        );
        let text = render(&status);
        assert!(
            text.contains("  restart needed: /l/finch/lima.yaml changed after the VM started"),
            "{text}"
        );
        assert!(text.contains("running (pid 42, up 1h2m)"), "{text}");
        assert!(text.contains("(not present: defaults)"));
        assert!(
            text.contains("vm finch: link down for 0s, 3 requests, endpoint unix:///s"),
            "{text}"
        );
        assert!(text.contains("  last error (1m15s ago): refused"), "{text}");
        status.vms.get_mut("finch").unwrap().restart_for = None;
        assert!(!render(&status).contains("restart needed"));
    }
}
