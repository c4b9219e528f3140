//! Golden tests pin the wire encoding of every message; property tests round-trip every
//! message and feed arbitrary bytes to every decoder.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use finch_shared::Secret;
use finch_shared::codec::{decode, encode};
use finch_shared::message::*;
use proptest::prelude::*;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn golden<T>(msg: T, want: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = encode(&msg).unwrap();
    assert_eq!(hex(&bytes), want, "encoding of {msg:?} changed: that is a new protocol version");
    assert_eq!(decode::<T>(&bytes).unwrap(), msg);
}

#[test]
fn golden_encodings() {
    golden(
        Handshake::HostHello { versions: vec![1], vm: "vm".into(), nonce: [0xaa; 32] },
        &format!("00010102766d{}", "aa".repeat(32)),
    );
    golden(
        Handshake::GuestHello { version: 1, boot_id: "b".into(), nonce: [1; 32], proof: [2; 32] },
        &format!("01010162{}{}", "01".repeat(32), "02".repeat(32)),
    );
    golden(Handshake::HostProof { proof: [3; 32] }, &format!("02{}", "03".repeat(32)));
    golden(Handshake::Reject { reason: RejectReason::BadProof }, "0301");
    golden(
        LinkMsg::Request { id: 300, request: Request::Get { server: "h".into() } },
        "00ac02000168",
    );
    golden(
        LinkMsg::Request {
            id: 1,
            request: Request::Store {
                server: "h".into(),
                username: "u".into(),
                secret: Secret::from("s"),
            },
        },
        "000101016801750173",
    );
    golden(
        LinkMsg::Request { id: 2, request: Request::Erase { server: "h".into() } },
        "0002020168",
    );
    golden(LinkMsg::Request { id: 3, request: Request::List }, "000303");
    golden(
        LinkMsg::Response {
            id: 1,
            outcome: Ok(Response::Credential { username: "u".into(), secret: Secret::from("s") }),
        },
        "0101000001750173",
    );
    golden(LinkMsg::Response { id: 1, outcome: Ok(Response::Done) }, "01010001");
    golden(
        LinkMsg::Response {
            id: 1,
            outcome: Ok(Response::List {
                entries: vec![ListEntry { server: "h".into(), username: "u".into() }],
            }),
        },
        "010100020101680175",
    );
    golden(LinkMsg::Response { id: 1, outcome: Err(WireError::NotFound) }, "01010100");
    golden(
        LinkMsg::Response { id: 1, outcome: Err(WireError::Denied { reason: "r".into() }) },
        "010101010172",
    );
    golden(LinkMsg::Response { id: 1, outcome: Err(WireError::unavailable("r")) }, "010101020172");
    golden(
        LinkMsg::Response { id: 1, outcome: Err(WireError::BadRequest { reason: "r".into() }) },
        "010101030172",
    );
    golden(
        LinkMsg::Response { id: 1, outcome: Err(WireError::Internal { reason: "r".into() }) },
        "010101040172",
    );
    golden(LinkMsg::Ping { seq: 7 }, "0207");
    golden(LinkMsg::Pong { seq: 7 }, "0307");
    // Version 4: scoped tokens.
    golden(
        LinkMsg::TokenRequest {
            id: 1,
            request: TokenRequest { registry: "r".into(), scopes: vec!["s".into()] },
        },
        "04010172010173",
    );
    golden(
        LinkMsg::TokenResponse {
            id: 1,
            outcome: Ok(Token {
                token: Secret::new("t".into()),
                expires_in: 300,
                granted: vec!["s".into()],
            }),
        },
        "0501000174ac02010173",
    );
    golden(LinkMsg::TokenResponse { id: 2, outcome: Err(WireError::NotFound) }, "05020100");
    golden(HelperCall { version: 1, request: Request::List }, "0103");
    // Version 2 (link and helper): a list cut to fit, with the count left out.
    golden(HelperCall { version: HELPER_VERSION, request: Request::List }, "0203");
    golden(
        LinkMsg::Response {
            id: 1,
            outcome: Ok(Response::ListCut {
                entries: vec![ListEntry { server: "h".into(), username: "u".into() }],
                omitted: 5,
            }),
        },
        "01010003010168017505",
    );
    golden(HelperReply { outcome: Err(WireError::NotFound) }, "0100");
}

#[test]
fn trailing_bytes_and_bounds_are_errors() {
    assert!(decode::<LinkMsg>(&[0x02, 0x07, 0x00]).is_err());
    // A list claiming 2^32 entries in a few bytes.
    assert!(decode::<LinkMsg>(&[0x01, 0x01, 0x00, 0x02, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    // A hello with more versions than allowed.
    let mut hello = vec![0x00, (MAX_VERSIONS + 1) as u8];
    hello.extend(std::iter::repeat_n(0x01, MAX_VERSIONS + 1));
    hello.extend([0x00]);
    hello.extend([0u8; 32]);
    assert!(decode::<Handshake>(&hello).is_err());
}

fn text() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        text().prop_map(|server| Request::Get { server }),
        (text(), text(), text()).prop_map(|(server, username, s)| Request::Store {
            server,
            username,
            secret: Secret::new(s)
        }),
        text().prop_map(|server| Request::Erase { server }),
        Just(Request::List),
    ]
}

fn wire_error() -> impl Strategy<Value = WireError> {
    prop_oneof![
        Just(WireError::NotFound),
        text().prop_map(|reason| WireError::Denied { reason }),
        text().prop_map(|reason| WireError::Unavailable { reason }),
        text().prop_map(|reason| WireError::BadRequest { reason }),
        text().prop_map(|reason| WireError::Internal { reason }),
    ]
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        (text(), text()).prop_map(|(username, s)| Ok(Response::Credential {
            username,
            secret: Secret::new(s)
        })),
        Just(Ok(Response::Done)),
        proptest::collection::vec((text(), text()), 0..8).prop_map(|v| Ok(Response::List {
            entries: v
                .into_iter()
                .map(|(server, username)| ListEntry { server, username })
                .collect()
        })),
        wire_error().prop_map(Err),
    ]
}

fn link_msg() -> impl Strategy<Value = LinkMsg> {
    prop_oneof![
        (any::<u64>(), request()).prop_map(|(id, request)| LinkMsg::Request { id, request }),
        (any::<u64>(), outcome()).prop_map(|(id, outcome)| LinkMsg::Response { id, outcome }),
        any::<u64>().prop_map(|seq| LinkMsg::Ping { seq }),
        any::<u64>().prop_map(|seq| LinkMsg::Pong { seq }),
        (any::<u64>(), text(), proptest::collection::vec(text(), 0..=MAX_SCOPES)).prop_map(
            |(id, registry, scopes)| LinkMsg::TokenRequest {
                id,
                request: TokenRequest { registry, scopes }
            }
        ),
        (any::<u64>(), text(), any::<u32>(), proptest::collection::vec(text(), 0..=MAX_SCOPES))
            .prop_map(|(id, token, expires_in, granted)| LinkMsg::TokenResponse {
                id,
                outcome: Ok(Token { token: Secret::new(token), expires_in, granted })
            }),
        (any::<u64>(), wire_error())
            .prop_map(|(id, e)| LinkMsg::TokenResponse { id, outcome: Err(e) }),
    ]
}

fn handshake() -> impl Strategy<Value = Handshake> {
    prop_oneof![
        (proptest::collection::vec(any::<u16>(), 0..MAX_VERSIONS), text(), any::<[u8; 32]>())
            .prop_map(|(versions, vm, nonce)| Handshake::HostHello { versions, vm, nonce }),
        (any::<u16>(), text(), any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(
            |(version, boot_id, nonce, proof)| {
                Handshake::GuestHello { version, boot_id, nonce, proof }
            }
        ),
        any::<[u8; 32]>().prop_map(|proof| Handshake::HostProof { proof }),
        prop_oneof![
            Just(RejectReason::NoCommonVersion),
            Just(RejectReason::BadProof),
            Just(RejectReason::Unexpected)
        ]
        .prop_map(|reason| Handshake::Reject { reason }),
    ]
}

proptest! {
    #[test]
    fn link_messages_round_trip(msg in link_msg()) {
        prop_assert_eq!(decode::<LinkMsg>(&encode(&msg).unwrap()).unwrap(), msg);
    }

    #[test]
    fn handshakes_round_trip(msg in handshake()) {
        prop_assert_eq!(decode::<Handshake>(&encode(&msg).unwrap()).unwrap(), msg);
    }

    #[test]
    fn helper_messages_round_trip(version in any::<u16>(), request in request(), outcome in outcome()) {
        let call = HelperCall { version, request };
        prop_assert_eq!(decode::<HelperCall>(&encode(&call).unwrap()).unwrap(), call);
        let reply = HelperReply { outcome };
        prop_assert_eq!(decode::<HelperReply>(&encode(&reply).unwrap()).unwrap(), reply);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<LinkMsg>(&bytes);
        let _ = decode::<Handshake>(&bytes);
        let _ = decode::<HelperCall>(&bytes);
        let _ = decode::<HelperReply>(&bytes);
        let _ = finch_shared::frame::read_frame(&mut &bytes[..]);
    }
}
