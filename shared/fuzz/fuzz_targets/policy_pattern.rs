//! Policy patterns from the host config, matched against guest server names: parsing and
//! matching never panic, a parsed pattern prints back to itself, and `*` covers everything.
#![no_main]

use finch_shared::registry::{Pattern, Registry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (pattern, server) = text.split_once('\n').unwrap_or((text, text));
    let registry = Registry::parse(server).ok();
    if let Ok(p) = pattern.parse::<Pattern>() {
        let again: Pattern = p.to_string().parse().expect("a printed pattern parses");
        assert_eq!(again, p);
        if let Some(r) = &registry {
            let _ = p.matches(r);
        }
    }
    if let Some(r) = &registry {
        assert!(Pattern::Any.matches(r));
    }
});
