//! Endpoint strings from flags and config files: parsing never panics, and whatever parses
//! prints back to a string that parses to the same endpoint.
#![no_main]

use finch_shared::endpoint::Endpoint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(endpoint) = text.parse::<Endpoint>()
    {
        let again: Endpoint = endpoint.to_string().parse().expect("printed endpoint parses");
        assert_eq!(again, endpoint);
    }
});
