//! The cache entry codec (gateway/src/cache/entry.rs): bytes someone else
//! wrote into Redis decode to a record or to `None`, never a panic; a
//! decoded record encodes to bytes that decode to the same encoding.
#![no_main]

use bytes::Bytes;
use flashgate_fuzz::entry::Record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(record) = Record::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    let now = u64::MAX / 2;
    let _ = (record.weight(), record.is_dead(now), record.is_dead(0));
    if let Record::Response(e) = &record {
        let _ = (
            e.freshness(now),
            e.served_age(now),
            e.lifetime_ms(),
            e.matches_variant(&e.headers),
        );
    }
    let once = record.encode();
    let again = Record::decode(once.clone()).expect("an encoded record decodes");
    assert_eq!(again.encode(), once);
});
