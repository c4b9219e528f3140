//! Server names from guests: the one parser never panics; what parses keeps its key through
//! every spelling (each spelling parses back to the same registry key).
#![no_main]

use finch_shared::registry::Registry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(registry) = Registry::parse(text) else { return };
    let key = registry.key();
    assert!(key.len() <= 300, "key longer than a host and port: {key:?}");
    for spelling in registry.spellings() {
        let again = Registry::parse(&spelling).expect("a spelling parses");
        assert_eq!(again.key(), key, "{spelling:?}");
    }
});
