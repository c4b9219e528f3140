//! Small bounds shared by both agents: a log gate that counts what it does not write, and a
//! length cap for logged text.

use std::time::{Duration, Instant};

/// Lets through at most `burst` log lines per `window`; the rest are counted, and the count
/// is handed to the next line let through, so a flood costs one line per window.
#[derive(Debug, Clone)]
pub struct LogGate {
    window: Duration,
    burst: u32,
    started: Option<Instant>,
    written: u32,
    suppressed: u64,
}

impl LogGate {
    /// A gate of `burst` lines per `window`.
    pub fn new(window: Duration, burst: u32) -> Self {
        LogGate { window, burst: burst.max(1), started: None, written: 0, suppressed: 0 }
    }

    /// Whether a line may be written at `now`; if so, how many were held back before it.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let expired = self.started.is_none_or(|s| now.saturating_duration_since(s) >= self.window);
        if expired {
            self.started = Some(now);
            self.written = 0;
        }
        if self.written >= self.burst {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.written += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// `text` cut to at most `max` bytes on a character boundary, with `…` when cut.
pub fn cap(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

/// Whether log target `target` belongs to one of the crates `capped` names (the crate itself
/// or one of its modules): the agents cap such library crates at `warn`, whatever `RUST_LOG`
/// says, because below it they log requests and answers whole.
pub fn is_capped_target(target: &str, capped: &[&str]) -> bool {
    capped.iter().any(|t| {
        target.strip_prefix(t).is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_crate_is_the_crate_and_its_modules_only() {
        let capped = ["hyper", "rustls"];
        assert!(is_capped_target("hyper", &capped));
        assert!(is_capped_target("hyper::proto::h1", &capped));
        assert!(is_capped_target("rustls::client", &capped));
        assert!(!is_capped_target("hyper_util::client", &capped));
        assert!(!is_capped_target("finch_guest_agent::agent::front", &capped));
    }

    #[test]
    fn a_flood_costs_one_line_per_window_and_is_counted() {
        let t0 = Instant::now();
        let mut gate = LogGate::new(Duration::from_secs(1), 3);
        let admitted: Vec<_> = (0..1000).filter_map(|_| gate.admit(t0)).collect();
        assert_eq!(admitted, vec![0, 0, 0]);
        assert_eq!(gate.admit(t0 + Duration::from_secs(1)), Some(997));
        assert_eq!(gate.admit(t0 + Duration::from_secs(1)), Some(0));
    }

    #[test]
    fn cap_keeps_characters_whole() {
        assert_eq!(cap("short", 10), "short");
        assert_eq!(cap("ééé", 3), "é…");
        assert_eq!(cap(&"x".repeat(100), 8).len(), 8 + '…'.len_utf8());
    }
}
