//! The guest's side of the handshake fed arbitrary host messages: never a panic, never a
//! success without the key.
#![no_main]

use finch_shared::codec::decode;
use finch_shared::handshake::GuestHandshake;
use finch_shared::key::LinkKey;
use finch_shared::message::Handshake;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(key) = LinkKey::from_bytes(&[7u8; 32]) else { return };
    let mut parts = data.splitn(2, |&b| b == 0xff);
    let (Some(first), second) = (parts.next(), parts.next()) else { return };
    let Ok(hello) = decode::<Handshake>(first) else { return };
    let Ok((guest, _answer)) = GuestHandshake::answer(key, "boot", hello) else { return };
    if let Some(Ok(proof)) = second.map(decode::<Handshake>) {
        assert!(guest.finish(proof).is_err(), "a proof made without the key was accepted");
    }
});
