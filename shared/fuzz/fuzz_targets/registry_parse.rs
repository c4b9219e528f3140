//! Server names from guests: the one parser never panics; every spelling of what parses
//! parses again, and the policy pattern naming the registry covers every spelling (so no
//! spelling can slip past a rule that names its registry).
#![no_main]

use finch_shared::registry::{Pattern, Registry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(registry) = Registry::parse(text) else { return };
    let key = registry.key();
    assert!(key.len() <= 300, "key longer than a host and port: {key:?}");
    let pattern: Pattern = key.parse().expect("a registry's key is a pattern");
    assert!(pattern.matches(&registry), "{key:?}");
    for spelling in registry.spellings() {
        let again = Registry::parse(&spelling).expect("a spelling parses");
        assert!(pattern.matches(&again), "{key:?} does not cover its spelling {spelling:?}");
    }
});
