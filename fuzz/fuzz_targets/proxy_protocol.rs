//! The PROXY protocol parser (gateway/src/edge/proxy_protocol.rs): never
//! panics; a whole header is within the bytes given and parses the same
//! on its own.
#![no_main]

use flashgate_fuzz::proxy_protocol::{parse, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Done { len, source }) = parse(data) {
        assert!(len <= data.len());
        assert_eq!(parse(&data[..len]), Ok(Parsed::Done { len, source }));
    }
});
