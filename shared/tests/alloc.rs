//! Decoding never allocates in proportion to a length the peer claims: a few bytes that
//! announce 2^32 elements allocate almost nothing, and no input up to the frame limit makes
//! the decoder hold more than twice the frame limit.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use finch_shared::codec::decode;
use finch_shared::frame::{FIRST_CHUNK, MAX_FRAME, read_frame};
use finch_shared::message::{Handshake, HelperCall, HelperReply, LinkMsg, MAX_LIST_ENTRIES};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(now, Ordering::SeqCst);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes allocated at the peak of `f`, above what was live before it.
fn peak_of(f: impl FnOnce()) -> usize {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    f();
    PEAK.load(Ordering::SeqCst) - base
}

fn decode_all(bytes: &[u8]) {
    let _ = decode::<LinkMsg>(bytes);
    let _ = decode::<Handshake>(bytes);
    let _ = decode::<HelperCall>(bytes);
    let _ = decode::<HelperReply>(bytes);
}

// One test function: the counters are global, so the cases must not run in parallel.
#[test]
fn decoding_allocation_is_bounded() {
    let claims: &[&[u8]] = &[
        // Response { id 1, Ok(List { entries: 2^32 - 1 … }) }
        &[0x01, 0x01, 0x00, 0x02, 0xff, 0xff, 0xff, 0xff, 0x0f],
        // Request { id 1, Get { server: string of 2^32 - 1 bytes } }
        &[0x00, 0x01, 0x00, 0xff, 0xff, 0xff, 0xff, 0x0f],
        // HostHello { versions: 2^32 - 1 … }
        &[0x00, 0xff, 0xff, 0xff, 0xff, 0x0f],
    ];
    for bytes in claims {
        let peak = peak_of(|| decode_all(bytes));
        assert!(peak < 1024, "{bytes:02x?} made the decoder allocate {peak} bytes");
    }
    // A frame header announcing 4 GiB allocates nothing for it.
    let peak = peak_of(|| {
        let _ = read_frame(&mut &[0xffu8, 0xff, 0xff, 0xff, 0, 0][..]);
    });
    assert!(peak < 1024, "{peak}");
    // A header announcing the largest frame, then a few bytes: the buffer grows only once the
    // peer has sent the first chunk (a silent peer cannot make the agent hold 64 KiB).
    let mut short = (MAX_FRAME as u32).to_be_bytes().to_vec();
    short.extend_from_slice(&[7; 100]);
    let peak = peak_of(|| {
        let _ = read_frame(&mut &short[..]);
    });
    assert!(peak <= FIRST_CHUNK + 1024, "a 100-byte frame start allocated {peak} bytes");
    let mut full = (MAX_FRAME as u32).to_be_bytes().to_vec();
    full.extend_from_slice(&vec![7; MAX_FRAME]);
    assert_eq!(read_frame(&mut &full[..]).unwrap().len(), MAX_FRAME);

    // The worst list that fits in a frame: the most entries allowed, then far too many.
    for count in [MAX_LIST_ENTRIES, MAX_LIST_ENTRIES * 16] {
        let mut bytes = vec![0x01, 0x01, 0x00, 0x02];
        let mut n = count;
        while n >= 0x80 {
            bytes.push((n as u8) | 0x80);
            n >>= 7;
        }
        bytes.push(n as u8);
        for _ in 0..count {
            bytes.extend_from_slice(&[0x01, b'h', 0x01, b'u']);
        }
        bytes.truncate(MAX_FRAME);
        let peak = peak_of(|| decode_all(&bytes));
        assert!(peak <= 2 * MAX_FRAME, "{count} entries: peak {peak} bytes");
    }

    // Arbitrary frames up to the limit.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for size in [0, 1, 7, 100, 4096, MAX_FRAME] {
        for _ in 0..20 {
            let bytes: Vec<u8> = (0..size)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let peak = peak_of(|| decode_all(&bytes));
            assert!(peak <= 2 * MAX_FRAME, "random {size} bytes: peak {peak}");
        }
    }
}
