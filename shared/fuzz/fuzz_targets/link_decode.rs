//! Every decoder of bytes from the other side of the link or the helper socket.
#![no_main]

use finch_shared::codec::decode;
use finch_shared::frame::read_frame;
use finch_shared::message::{Handshake, HelperCall, HelperReply, LinkMsg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<LinkMsg>(data);
    let _ = decode::<Handshake>(data);
    let _ = decode::<HelperCall>(data);
    let _ = decode::<HelperReply>(data);
    let mut rest = data;
    while let Ok(frame) = read_frame(&mut rest) {
        let _ = decode::<LinkMsg>(&frame);
    }
});
