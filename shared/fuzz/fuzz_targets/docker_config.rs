//! The docker config's JSON, which holds what guests stored: decoding never panics, routing
//! and every `auths` entry decode, and what is encoded decodes back to the same credential.
#![no_main]

use finch_shared::docker_config::{
    TOKEN_USERNAME, cred_helpers, creds_store, decode_entry, encode_entry, parse,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = parse(data) else { return };
    let _ = creds_store(&config);
    let _ = cred_helpers(&config);
    if let Some(auths) = config.get("auths").and_then(|a| a.as_object()) {
        for entry in auths.values() {
            if let Some((user, secret)) = decode_entry(entry)
                && !user.contains(':')
                && !(user == TOKEN_USERNAME && secret.is_empty())
            {
                let (u, s) = decode_entry(&encode_entry(&user, &secret)).expect("round trip");
                assert_eq!((u.as_str(), s.expose()), (user.as_str(), secret.expose()));
            }
        }
    }
});
