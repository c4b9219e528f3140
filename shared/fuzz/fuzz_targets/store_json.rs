//! The helper's Go-compatible JSON decoder for `store` payloads.
#![no_main]

use finch_shared::gojson::decode_credentials;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_credentials(data);
});
