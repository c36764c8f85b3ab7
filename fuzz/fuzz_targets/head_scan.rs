//! The request-head scan (gateway/src/edge/framing.rs): any bytes, fed in
//! any pieces, give the same answer as fed whole, and never panic.
#![no_main]

use flashgate_fuzz::framing::HeadScan;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the piece size, the rest is the head.
    let Some((&step, head)) = data.split_first() else {
        return;
    };
    let mut whole = HeadScan::new();
    whole.feed(head);
    let mut pieces = HeadScan::new();
    for piece in head.chunks(usize::from(step).max(1)) {
        pieces.feed(piece);
    }
    assert_eq!(whole.found_length(), pieces.found_length());
    assert_eq!(whole.done(), pieces.done());
    assert_eq!(whole.absurd_length(), pieces.absurd_length());
});
