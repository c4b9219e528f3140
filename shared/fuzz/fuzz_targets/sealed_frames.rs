//! Arbitrary bytes offered as sealed link frames, as a process on the link's path would
//! offer them: never a panic, never a frame that opens without the link's keys.
#![no_main]

use finch_shared::key::LinkKey;
use finch_shared::seal::{Role, Session};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(key) = LinkKey::from_bytes(&[7u8; 32]) else { return };
    let mut session = Session::new(&key, b"fuzzed link", Role::Host);
    for frame in data.split(|&b| b == 0xff).take(64) {
        assert!(session.opener.open(frame).is_err(), "a made-up frame opened");
    }
});
